"""Every refusal the ledger can give, one class per rule, named for the domain.

The HTTP layer maps the families to status codes: ``InvalidRequest`` 400,
``NotFound`` 404, ``Conflict`` 409, ``Refused`` 422. A refusal writes nothing.
Amounts in messages are in major units with the currency, as callers send them.
"""

from decimal import Decimal


class DomainError(Exception):
    """Base class of every refusal; ``code`` is a stable machine-readable name."""

    code = "domain_error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidRequest(DomainError):
    code = "invalid_request"


class InvalidAmount(InvalidRequest):
    code = "invalid_amount"


class UnknownCurrency(InvalidRequest):
    code = "unknown_currency"


class InvalidCard(InvalidRequest):
    code = "invalid_card"


class RedemptionCodeMismatch(InvalidRequest):
    code = "redemption_code_mismatch"


class RedemptionTokenMismatch(InvalidRequest):
    code = "redemption_token_mismatch"


class NotFound(DomainError):
    code = "not_found"


class CardNotFound(NotFound):
    code = "card_not_found"


class TransactionNotFound(NotFound):
    code = "transaction_not_found"


class Conflict(DomainError):
    code = "conflict"


class RequestIdReused(Conflict):
    code = "request_id_reused"


class DuplicateRelationName(Conflict):
    code = "duplicate_relation_name"


class HoldVoided(Conflict):
    code = "hold_voided"


class ConcurrentUpdate(Conflict):
    """Another writer appended to the card first; retried inside the ledger before it ever escapes."""

    code = "concurrent_update"


class Refused(DomainError):
    code = "refused"


class InsufficientFunds(Refused):
    code = "insufficient_funds"


class CardExpired(Refused):
    code = "card_expired"


class CardNotYetValid(Refused):
    code = "card_not_yet_valid"


class CreditNotAllowed(Refused):
    code = "multiple_credits_not_allowed"


class RedemptionNotAllowed(Refused):
    code = "multiple_redemptions_not_allowed"


class NotOwner(Refused):
    code = "restricted_to_owner"


class OverAmount(Refused):
    """Asked for more than a transaction has left; ``left`` (major units of ``currency``) is what
    remains, so that a caller who asked for a total (the hub) can restate the refusal in its terms."""

    def __init__(self, message: str, *, left: Decimal, currency: str) -> None:
        super().__init__(message)
        self.left = left
        self.currency = currency


class OverSettlement(OverAmount):
    code = "over_settlement"


class OverCancellation(OverAmount):
    code = "over_cancellation"


class BalanceLimitExceeded(Refused):
    code = "balance_limit_exceeded"
