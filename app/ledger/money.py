"""Money is an integer count of a currency's minor unit (DESIGN D3). No float ever touches it."""

from __future__ import annotations

from app import limits

# ISO 4217 codes this platform accepts: an explicit list, not "any three letters".
CURRENCIES = frozenset(
    {
        "AUD", "BRL", "CAD", "CHF", "CNY", "CZK", "DKK", "EUR", "GBP", "HKD", "HUF", "INR", "JPY", "KRW",
        "MXN", "NOK", "NZD", "PLN", "SEK", "SGD", "TRY", "USD", "ZAR",
    }
)


def is_amount(value: object) -> bool:
    """A valid amount: an int (not a bool) in 1..2^53-1."""
    return type(value) is int and 1 <= value <= limits.AMOUNT_MINOR_MAX


def is_currency(value: object) -> bool:
    return isinstance(value, str) and value in CURRENCIES
