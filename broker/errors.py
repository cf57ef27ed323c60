from kernel.errors import CivitasError


class BrokerError(CivitasError):
    status_code = 400
    public_message = "This sign-in could not be completed."


class LoginExpired(BrokerError):
    status_code = 400
    public_message = (
        "This sign-in has expired or was started in a different browser. "
        "Please go back to the site you were using and sign in again."
    )


class UnknownUpstream(BrokerError):
    status_code = 404
    public_message = "That sign-in option does not exist."
