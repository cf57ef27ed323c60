"""The consent package's errors (one subclass of the hub's root per package, STYLE.md 5)."""

from __future__ import annotations

from kernel.errors import CivitasError


class ConsentError(CivitasError):
    status_code = 400
    public_message = "This consent request could not be completed."


class FormExpired(ConsentError):
    status_code = 400
    public_message = "This form has expired. Please go back, reload the page and try again."


class AccountClosed(ConsentError):
    status_code = 409
    public_message = "This account is closed: nothing was recorded."


class NothingToWithdraw(ConsentError):
    status_code = 404
    public_message = "There is no consent to withdraw for that agency. Nothing was changed."


class RequiredClaimWithdrawal(ConsentError):
    status_code = 409
    public_message = (
        "That information is required by the agency, so it cannot be withdrawn on its own. "
        "To stop sharing it, withdraw your whole consent for that agency."
    )


class ReceiptNotFound(ConsentError):
    status_code = 404
    public_message = "There is no consent receipt at this address."
