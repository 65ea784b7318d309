"""Text normalisation and PII masking.

Normalisation: Unicode NFC (or another form), control characters removed (tab and newline
kept; C0/C1 controls, and NUL), runs of spaces and tabs inside a line collapsed to one space,
lines stripped of trailing spaces, runs of three or more newlines cut to two (a paragraph
break), leading and trailing whitespace removed.

PII: e-mail addresses, phone numbers and IPv4 addresses are replaced by `<EMAIL>`, `<PHONE>`
and `<IP>` (NeMo Curator's style of placeholder; datatrove writes fake addresses instead).
The patterns are deliberately plain regular expressions: they find the usual forms
(`name@host.tld`, `(012) 555-0123`, `+44 20 7946 0958`, `555-0123`, `192.168.0.1`), not every
form, and a number like a date or a sum is left alone unless it is written as a phone number.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

from temper.config import opt

_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
_SPACES = re.compile(r"[ \t\u00a0\u2000-\u200b\u3000]+")
_BLANKS = re.compile(r"\n{3,}")

EMAIL = re.compile(r"\b[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b")
IPV4 = re.compile(r"\b(?:(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\b")
PHONE = re.compile(r"(?<![\w.+])(?:\+\d{1,3}(?:[ .-]?\d{2,4}){2,4}"  # +44 20 7946 0958
                   r"|(?:\(\d{2,5}\)[ .-]?|\d{2,5}[ .-])?\d{3}[ .-]\d{4})(?![\w])")  # (012) 555-0123, 555-0123


@dataclass
class NormalizeConfig:
    enabled: bool = opt(True, "normalise text before anything else")
    form: str = opt("NFC", "Unicode normal form: NFC, NFKC, NFD, NFKD")
    whitespace: bool = opt(True, "collapse runs of spaces/tabs, strip lines, cut 3+ newlines to 2")
    control_chars: bool = opt(True, "remove control characters (tab and newline kept)")

    def validate(self) -> None:
        if self.form not in ("NFC", "NFKC", "NFD", "NFKD"):
            from temper.errors import TemperError
            raise TemperError(f"normalize.form must be NFC, NFKC, NFD or NFKD, got {self.form!r}")


def normalize(text: str, cfg: NormalizeConfig) -> str:
    if not cfg.enabled:
        return text
    text = unicodedata.normalize(cfg.form, text.replace("\r\n", "\n").replace("\r", "\n"))
    if cfg.control_chars:
        text = _CONTROL.sub("", text)
    if cfg.whitespace:
        text = "\n".join(_SPACES.sub(" ", line).strip() for line in text.split("\n"))
        text = _BLANKS.sub("\n\n", text)
    return text.strip()


@dataclass
class PiiConfig:
    enabled: bool = opt(True, "mask PII in every document written (kept and rejected)")
    email: bool = opt(True, "replace e-mail addresses by <EMAIL>")
    phone: bool = opt(True, "replace phone numbers by <PHONE>")
    ip: bool = opt(True, "replace IPv4 addresses by <IP>")


def mask_pii(text: str, cfg: PiiConfig) -> tuple[str, dict[str, int]]:
    """(masked text, {kind: replacements}); kinds with none are left out."""
    counts: dict[str, int] = {}
    if not cfg.enabled:
        return text, counts
    for kind, on, pattern, placeholder in (("email", cfg.email, EMAIL, "<EMAIL>"), ("ip", cfg.ip, IPV4, "<IP>"),
                                           ("phone", cfg.phone, PHONE, "<PHONE>")):
        if on:
            text, n = pattern.subn(placeholder, text)
            if n:
                counts[kind] = n
    return text, counts
