"""Detectors for personal data in text: e-mail, phone, IP address, credit card, IBAN.

Each detector is a regular expression for candidates plus, where the data carries one, a
checksum that confirms them, so ordinary numbers survive: credit-card numbers must pass the
Luhn check (ISO/IEC 7812-1), IBANs the ISO 13616 mod-97 check, IPv6 addresses must parse
(`ipaddress`), and phone numbers need a country code (+CC, 8-15 digits, ITU-T E.164) or the
US layout (area code, exchange, 4-digit line) with separators. Dates, times, versions, prices and plain numbers
are left alone. `scrub_pii.py` replaces the matches with typed placeholders.
"""
from __future__ import annotations

import ipaddress
import re
from typing import Callable, Optional

PLACEHOLDERS = {"email": "[EMAIL]", "phone": "[PHONE]", "ip": "[IP]",
                "credit_card": "[CREDIT_CARD]", "iban": "[IBAN]"}

EMAIL = re.compile(
    r"(?<![\w.%+-])[A-Za-z0-9][A-Za-z0-9._%+-]{0,63}"
    r"@(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,24}(?![\w-])"
)
# 2 letters, 2 check digits, 11-30 letters/digits, optionally in groups separated by one space
IBAN = re.compile(r"(?<![\w-])[A-Z]{2}\d{2}(?: ?[A-Z0-9]){11,30}(?![\w-])")
# 13-19 digits, optionally separated by single spaces or dashes
CARD = re.compile(r"(?<![\w.,-])\d(?:[ -]?\d){12,18}(?![\w]|[.,-]\d)")
_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
IPV4 = re.compile(rf"(?<![\w.]){_OCTET}(?:\.{_OCTET}){{3}}(?![\w]|\.\d)")
IPV6 = re.compile(r"(?<![\w:.])(?:[0-9A-Fa-f]{0,4}:){2,7}(?:[0-9A-Fa-f]{1,4}|" + _OCTET
                  + r"(?:\." + _OCTET + r"){3})?(?![\w:])")
PHONE_INTL = re.compile(r"(?<![\w+])\+\d{1,3}(?:[ .-]?(?:\(\d{1,4}\)|\d{1,4})){2,6}(?![\w]|[.-]\d)")
PHONE_US = re.compile(r"(?<![\w+(-])(?:1[ .-])?(?:\(\d{3}\) ?|\d{3}[ .-])\d{3}[ .-]\d{4}(?![\w]|[.-]\d)")


def luhn_valid(digits: str) -> bool:
    """The Luhn check: from the right, double every second digit, sum digits, divisible by 10."""
    if not digits.isdigit():
        return False
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2 == 1:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def iban_valid(iban: str) -> bool:
    """ISO 13616: move the first 4 characters to the end, letters -> 10..35, value mod 97 == 1."""
    s = iban.replace(" ", "").upper()
    if not (15 <= len(s) <= 34 and s[:2].isalpha() and s[2:4].isdigit() and s.isalnum()):
        return False
    return int("".join(str(int(c, 36)) for c in s[4:] + s[:4])) % 97 == 1


def card_valid(candidate: str) -> bool:
    digits = re.sub(r"[ -]", "", candidate)
    return 13 <= len(digits) <= 19 and luhn_valid(digits)


def ipv6_valid(candidate: str) -> bool:
    if not any(c.isdigit() for c in candidate):  # "cafe::face" style words are not addresses
        return False
    try:
        ipaddress.IPv6Address(candidate)
    except ValueError:
        return False
    return True


def phone_intl_valid(candidate: str) -> bool:
    return 8 <= sum(c.isdigit() for c in candidate) <= 15


def longest_valid_prefix(candidate: str, valid: Callable[[str], bool], sep: str = r"[ -]") -> Optional[str]:
    """The longest prefix made of whole separator-delimited groups that passes `valid`.

    A greedy regex may run on into the next word or number ("DE89 3704 ... 00 NOW"); trying
    shorter prefixes finds the real number inside.
    """
    cuts = [m.start() for m in re.finditer(sep, candidate)] + [len(candidate)]
    for end in reversed(cuts):
        if valid(candidate[:end]):
            return candidate[:end]
    return None


# (kind, pattern, validator or None, whether to try shorter prefixes), applied in this order:
# e-mails first (they contain dots and digits), then the checksummed numbers, then the rest.
DETECTORS: list[tuple[str, re.Pattern, Optional[Callable[[str], bool]], bool]] = [
    ("email", EMAIL, None, False),
    ("iban", IBAN, iban_valid, True),
    ("credit_card", CARD, card_valid, True),
    ("ip", IPV6, ipv6_valid, False),
    ("ip", IPV4, None, False),
    ("phone", PHONE_INTL, phone_intl_valid, False),
    ("phone", PHONE_US, None, False),
]
