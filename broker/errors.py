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


class SignInRefusedUpstream(BrokerError):
    """The citizen cancelled at the upstream, or it refused them: the flow is open again
    (``flow_id``), to choose another way or cancel; ``public_message`` is the upstream's
    refusal, in words for the citizen."""

    status_code = 403

    def __init__(self, flow_id: str, public_message: str) -> None:
        super().__init__()
        self.flow_id = flow_id
        self.public_message = public_message


class UnknownUpstream(BrokerError):
    status_code = 404
    public_message = "That sign-in option does not exist."


class CredentialAlreadyLinked(BrokerError):
    status_code = 409
    public_message = (
        "That sign-in is already linked to another Civitas account, so it cannot be added to "
        "this one. Nothing was changed."
    )


class LastCredential(BrokerError):
    status_code = 409
    public_message = (
        "This is the only way you can sign in, so it cannot be removed. To stop using Civitas, "
        "delete your account instead."
    )


class NotYourCredential(BrokerError):
    """A linked credential that is not the signed-in citizen's (or none at all): not found,
    so a citizen cannot tell another's id from one that does not exist."""

    status_code = 404
    public_message = "That sign-in is not linked to your account."


class TooManyAttempts(BrokerError):
    status_code = 429
    public_message = (
        "Too many failed sign-in attempts. Please wait 15 minutes and try again later."
    )


class AssuranceNotOffered(BrokerError):
    status_code = 403
    public_message = (
        "The site you came from needs a stronger way to prove who you are than this sign-in "
        "option provides. Please choose another."
    )
