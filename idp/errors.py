from kernel.errors import CivitasError


class IdpError(CivitasError):
    status_code = 400
    public_message = "The request from the agency site is not valid."


class AgencyRegistrationError(IdpError):
    """Invalid agency registration data (CLI or admin API)."""
