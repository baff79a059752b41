"""What counts as key material in text: the patterns the log redaction blanks.

One definition for two uses: ``worker/logs.py``'s redaction processor blanks these in every log
event, and labels callers choose (request ids, ``keyrotor.runs``) are refused when they contain
one, so that a key pasted by mistake is never stored and an id is never shown blanked.

Matched: provider API keys (Anthropic, OpenAI, Google), keyrotor's API tokens (``krt_``), the
credential after ``Bearer``, ``kr1`` ciphertexts, the password of a URL (``user:pw@`` or
``password=`` in a query string or a libpq keyword DSN), bytes literals with escaped bytes
(``b'\\x92...'``, as a driver's message quotes an argument), the values PostgreSQL quotes in an
error's DETAIL (``Key (name)=(...)``, ``Failing row contains (...)``) or in an invalid-input
message, and runs of 32+ base64/base64url/hex characters that look random (DEKs, wrapped DEKs,
master keys), also when wrapped over lines. Identifiers, paths, CamelCase and snake_case names are left alone.
"""

from __future__ import annotations

import re

REDACTED = "[REDACTED]"

PATTERNS = [
    # Provider API keys: Anthropic, OpenAI (sk-, sk-proj-), Google.
    re.compile(r"sk-ant-[A-Za-z0-9_\-]{8,}"),
    re.compile(r"sk-[A-Za-z0-9_\-]{16,}"),
    re.compile(r"AIza[0-9A-Za-z_\-]{20,}"),
    # keyrotor's own API tokens (keyrotor/api/tokens.py), whatever characters they drew.
    re.compile(r"krt_[A-Za-z0-9_\-]{8,}"),
    # keyrotor ciphertexts.
    re.compile(r"kr1:\d+:[A-Za-z0-9_\-]+=*"),
]
URL_PASSWORD = re.compile(r"(://[^:/@\s]*:)[^@\s/]+@")
# Patterns that keep their first group (the name of what is blanked) and blank the rest.
NAMED = [
    # A bearer credential of any shape: a Vault token (hvs.), a short or test token.
    re.compile(r"(\bBearer\s+)[^\s'\",;]+", re.I),
    # A password as a URL query parameter or in a libpq keyword DSN.
    re.compile(r"(\bpassword=)[^\s&'\",;)]+", re.I),
    # PostgreSQL quotes the row in a constraint error's DETAIL: a secret's name, a ciphertext.
    re.compile(
        r"(\bKey \(.*?\)=\().*?(?=\) (?:already exists|is not present|is still referenced|conflicts)|$)", re.M
    ),
    re.compile(r"(\bFailing row contains \().*$", re.M),
    re.compile(r"(\binvalid input (?:syntax|value) for [^:\n]*: )\".*?(?:\"|$)", re.M),
]
# A bytes literal (closed, or cut short as asyncpg cuts an argument's repr at 100 characters);
# blanked when it holds an escaped byte, as raw bytes are key material until proven otherwise.
BYTES_LITERAL = re.compile(r"(?<![\w'\"])b(['\"])(?:\\.|(?!\1)[^\\\n])*(?:\1|$)", re.M)
# Base64 wrapped over lines (MIME at 76 columns, PEM at 64), the newlines real or JSON-escaped:
# full lines of one width and a shorter last line (itself a whole line), which alone is too short
# to look random.
WRAPPED = re.compile(
    r"(?:(?<=\\n)|(?<![A-Za-z0-9+/\\]))"  # a line's start, or just after an escaped newline
    r"(?:[A-Za-z0-9+/]{32,}(?:\r?\n|(?:\\r)?\\n))+"  # full lines
    r"[A-Za-z0-9+/]+={0,2}"  # the last line, which ends a line, a string or the text
    r"""(?=$|\r?\n|(?:\\r)?\\n|["'])"""
)
_NEWLINE = re.compile(r"\r?\n|(?:\\r)?\\n")
# Candidate runs of base64 / base64url / hex; judged by looks_random.
RUN = re.compile(r"[A-Za-z0-9+/_\-]{32,}={0,2}")
HEX = re.compile(r"[0-9a-fA-F]{32,}")


def looks_random(run: str) -> bool:
    """Whether a long base64/hex run looks like key material rather than a name."""
    if HEX.fullmatch(run) and any(c.isdigit() for c in run) and any(c.isalpha() for c in run):
        return True
    upper = sum(c.isupper() for c in run)
    lower = sum(c.islower() for c in run)
    if upper and lower and any(c.isdigit() for c in run):
        return True  # identifiers, paths and snake_case names do not mix all three
    # About one 32-byte key in 1,500 draws no digit in its base64; its letters are still about
    # half capitals, where a CamelCase name has one a word.
    return upper * 4 >= len(run) and lower * 4 >= len(run)


def _wrapped(block: str) -> str:
    *full, last = _NEWLINE.split(block)
    joined = "".join([*full, last])
    if len({len(line) for line in full}) == 1 and len(last) <= len(full[0]) and looks_random(joined):
        return REDACTED
    return block


def blank_patterns(text: str) -> str:
    """``text`` with everything matching the patterns above replaced (a URL password by ``***``)."""
    for pattern in PATTERNS:
        text = pattern.sub(REDACTED, text)
    text = URL_PASSWORD.sub(lambda m: m.group(1) + "***@", text)
    for named in NAMED:
        text = named.sub(lambda m: m.group(1) + REDACTED, text)
    text = BYTES_LITERAL.sub(lambda m: REDACTED if "\\x" in m.group(0) else m.group(0), text)
    text = WRAPPED.sub(lambda m: _wrapped(m.group(0)), text)
    return RUN.sub(lambda m: REDACTED if looks_random(m.group(0)) else m.group(0), text)


def looks_like_key_material(text: str) -> bool:
    """Whether the redaction would blank any part of ``text``."""
    return blank_patterns(text) != text
