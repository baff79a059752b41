"""What counts as key material in text: the patterns the log redaction blanks.

One definition for two uses: ``worker/logs.py``'s redaction processor blanks these in every log
event, and labels callers choose (request ids, ``keyrotor.runs``) are refused when they contain
one, so that a key pasted by mistake is never stored and an id is never shown blanked.

Matched: provider API keys (Anthropic, OpenAI, Google), ``kr1`` ciphertexts, the password of a
URL, and runs of 32+ base64/base64url/hex characters that look random (DEKs, wrapped DEKs,
master keys). Identifiers, paths and snake_case names are left alone.
"""

from __future__ import annotations

import re

REDACTED = "[REDACTED]"

PATTERNS = [
    # Provider API keys: Anthropic, OpenAI (sk-, sk-proj-), Google.
    re.compile(r"sk-ant-[A-Za-z0-9_\-]{8,}"),
    re.compile(r"sk-[A-Za-z0-9_\-]{16,}"),
    re.compile(r"AIza[0-9A-Za-z_\-]{20,}"),
    # keyrotor ciphertexts.
    re.compile(r"kr1:\d+:[A-Za-z0-9_\-]+=*"),
]
URL_PASSWORD = re.compile(r"(://[^:/@\s]*:)[^@\s/]+@")
# Candidate runs of base64 / base64url / hex; judged by looks_random.
RUN = re.compile(r"[A-Za-z0-9+/_\-]{32,}={0,2}")
HEX = re.compile(r"[0-9a-fA-F]{32,}")


def looks_random(run: str) -> bool:
    """Whether a long base64/hex run looks like key material rather than a name."""
    if HEX.fullmatch(run) and any(c.isdigit() for c in run) and any(c.isalpha() for c in run):
        return True
    # Random base64 of 24+ bytes practically always mixes all three; identifiers, paths and
    # snake_case names do not.
    return any(c.isupper() for c in run) and any(c.islower() for c in run) and any(c.isdigit() for c in run)


def blank_patterns(text: str) -> str:
    """``text`` with everything matching the patterns above replaced (a URL password by ``***``)."""
    for pattern in PATTERNS:
        text = pattern.sub(REDACTED, text)
    text = URL_PASSWORD.sub(lambda m: m.group(1) + "***@", text)
    return RUN.sub(lambda m: REDACTED if looks_random(m.group(0)) else m.group(0), text)


def looks_like_key_material(text: str) -> bool:
    """Whether the redaction would blank any part of ``text``."""
    return blank_patterns(text) != text
