from kernel.errors import CivitasError


class IdpError(CivitasError):
    status_code = 400
    public_message = "The request from the agency site is not valid."


class AgencyRegistrationError(IdpError):
    """Invalid agency registration data (settings, CLI or admin API), read as
    ``<field>: <problem>``; ``field`` is the registration field at fault (RFC 7591 2 names)."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem
