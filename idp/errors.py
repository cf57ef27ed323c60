from kernel.errors import CivitasError


class IdpError(CivitasError):
    status_code = 400
    public_message = "The request from the agency site is not valid."


class ConsentAlreadyAnswered(IdpError):
    """The consent page of a request the citizen answered already in this browser (Back
    after Allow or Deny, or a second click on the button)."""

    status_code = 400
    public_message = ("You have already answered this request, so there is nothing more to "
                      "do here. If the site you were using did not sign you in, go back to "
                      "it and sign in again.")


class AgencyRegistrationError(IdpError):
    """Invalid agency registration data (settings, CLI or admin API), read as
    ``<field>: <problem>``; ``field`` is the registration field at fault (RFC 7591 2 names)."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem
