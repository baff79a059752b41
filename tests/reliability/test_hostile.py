"""Hostile input: property-based tests on every parser, and the CLI fed SQL, paths and junk.

Every parser either returns a correct result or raises its typed keyrotor error: never another
exception, never garbage, never a message that echoes a value. Parsers: the kr1 envelope
(keyrotor/crypto/envelope.py), the legacy format (keyrotor/crypto/legacy_format.py), scope names, the
JSON-lines
import (worker/cli/secrets.py), environment configuration (keyrotor/settings.py), and the
CLI's arguments against a real database.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import sys
from collections.abc import Callable
from typing import Any

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from keyrotor import KeyManager, Settings
from keyrotor.crypto import envelope
from keyrotor.crypto import legacy_format as legacy
from keyrotor.errors import (
    ConfigurationError,
    DecryptionFailed,
    InvalidInput,
    InvalidScope,
    KeyrotorError,
    MalformedCiphertext,
)
from keyrotor.inputs import check_scope
from keyrotor.worker.cli import main as cli_main
from keyrotor.worker.cli.secrets import read_rows
from tests.conftest import MASTER_KEY
from tests.reliability.harness import SLOW
from tests.rotation_helpers import fetch

DEK = bytes(range(32))
CIPHER = AESGCM(DEK)
SQLISH = [
    "'; DROP TABLE secrets; --",
    "openai' OR '1'='1",
    'openai"; DELETE FROM data_keys; --',
    "../../etc/passwd",
    "tenant/../../openai",
    "/absolute",
    "a\x00b",
    "tenant-1/openai\n",
    "%2e%2e%2f",
    "OpenAI",
    "a" * 5000,
    "\u202eimna",
    "tenant-1//openai",
    "a/b/c/d/e",
    "$(reboot)",
    "`id`",
]

# Hypothesis budgets: enough to find shape bugs, cheap enough for the default run.
FAST = settings(
    max_examples=2_000 if SLOW else 200, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
SCRYPT = settings(
    max_examples=200 if SLOW else 20, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)

counts: dict[str, int] = {}


def _count(name: str) -> None:
    counts[name] = counts.get(name, 0) + 1


def _sealed(plain: bytes, scope: str = "openai", version: int = 3, context: str = "secret:a") -> str:
    return envelope.seal(plain, cipher=CIPHER, scope=scope, dek_version=version, context=context)


# --- kr1 ----------------------------------------------------------------------------------


_PARSE_ERRORS = {
    "ciphertext must be text",
    "not a kr1 ciphertext",
    "ciphertext is too long",
    "kr1 ciphertext has no version field",
    "kr1 ciphertext body is not base64url",
    "kr1 ciphertext is truncated",
    "kr1 ciphertext body is not canonical base64url",
    "kr1 ciphertext has an invalid version field",
}


@FAST
@given(st.text(max_size=300))
@example("kr1:")
@example("kr1:1:")
@example("kr1:0:AAAA")
@example("kr1:01:AAAA")
@example("kr1:2147483648:AAAA")
@example("kr1:1:" + "A" * (envelope.MAX_SEALED_CHARS + 1))
@example("kr1:1:\x00")
@example("kr1:1:\udcff")
@example("kr1:\u0661:AAAA")  # an Arabic-Indic digit: isdigit() but not ASCII
@example("cipherte")  # a word of the messages themselves
def test_kr1_parser_accepts_only_canonical_values(text: str) -> None:
    _count("kr1 arbitrary text")
    for candidate in (text, "kr1:" + text, "kr1:1:" + text):
        try:
            version, raw = envelope.split(candidate)
        except MalformedCiphertext as exc:
            # Every parse error is one fixed sentence, so no input can ever show in one. (Looking
            # for the input in the message instead fails on inputs like "cipherte", which the
            # fixed words themselves contain.)
            assert str(exc) in _PARSE_ERRORS, str(exc)
            continue
        # Accepted: then it is canonical (re-encoding gives the same text).
        assert 1 <= version <= envelope.MAX_VERSION
        assert candidate == f"kr1:{version}:" + envelope._b64url(raw)
        with pytest.raises(DecryptionFailed):
            envelope.open_raw(raw, cipher=CIPHER, scope="openai", dek_version=version)


@FAST
@given(st.binary(max_size=200), st.data())
def test_kr1_any_change_to_a_value_is_refused(plain: bytes, data: st.DataObject) -> None:
    _count("kr1 mutated values")
    value = _sealed(plain)
    i = data.draw(st.integers(0, len(value) - 1))
    kind = data.draw(st.sampled_from(["replace", "delete", "insert", "truncate"]))
    ch = data.draw(st.characters())
    if kind == "replace":
        mutated = value[:i] + ch + value[i + 1 :]
    elif kind == "delete":
        mutated = value[:i] + value[i + 1 :]
    elif kind == "insert":
        mutated = value[:i] + ch + value[i:]
    else:
        mutated = value[:i]
    assume(mutated != value)
    try:
        version, raw = envelope.split(mutated)
        out = envelope.open_raw(raw, cipher=CIPHER, scope="openai", dek_version=version, context="secret:a")
    except (MalformedCiphertext, DecryptionFailed):
        return
    raise AssertionError(f"a changed value opened: {out!r}")


@FAST
@given(st.binary(max_size=100), st.text(max_size=40), st.text(max_size=40))
def test_kr1_value_moved_to_another_scope_or_row_does_not_open(
    plain: bytes, scope: str, context: str
) -> None:
    _count("kr1 moved values")
    assume((scope, context) != ("openai", "secret:a"))
    value = _sealed(plain)
    version, raw = envelope.split(value)
    with pytest.raises(DecryptionFailed):
        envelope.open_raw(raw, cipher=CIPHER, scope=scope, dek_version=version, context=context)
    assert envelope.open_raw(raw, cipher=CIPHER, scope="openai", dek_version=3, context="secret:a") == plain


# --- legacy ---------------------------------------------------------------------------------


@FAST
@given(st.one_of(st.text(max_size=400), st.binary(max_size=100), st.none(), st.integers()))
@example("A" * 88)  # the shape of an empty plaintext's value: 64 bytes
@example("A" * (legacy.MAX_VALUE_CHARS + 4))
@example("kr1:1:" + "A" * 100)
def test_legacy_shape_check_never_raises(value: Any) -> None:
    _count("legacy is_legacy")
    assert legacy.is_legacy(value) in (True, False)


@SCRYPT
@given(st.text(max_size=300))
def test_legacy_decrypt_raises_only_typed_errors(text: str) -> None:
    _count("legacy decrypt arbitrary")
    with pytest.raises((MalformedCiphertext, DecryptionFailed)):
        legacy.decrypt(text, MASTER_KEY)


@SCRYPT
@given(st.data())
def test_legacy_mutated_value_is_refused(data: st.DataObject) -> None:
    _count("legacy decrypt mutated")
    value = _LEGACY_VALUE
    i = data.draw(st.integers(0, len(value) - 1))
    ch = data.draw(
        st.sampled_from("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=-_\x00é")
    )
    mutated = value[:i] + ch + value[i + 1 :]
    assume(mutated != value)
    with pytest.raises((MalformedCiphertext, DecryptionFailed)):
        legacy.decrypt(mutated, MASTER_KEY)


_LEGACY_VALUE = legacy.encrypt("sk-ant-api03-hostile-0123456789", MASTER_KEY)


def test_legacy_master_key_must_be_text() -> None:
    for bad in ("", "   ", None, b"bytes-key"):
        with pytest.raises(KeyrotorError):
            legacy.decrypt(_LEGACY_VALUE, bad)  # type: ignore[arg-type]


# --- scope names ----------------------------------------------------------------------------


def _masked(text: str) -> str:
    """``text`` with every ASCII letter and digit replaced by one of its kind."""
    return "".join(
        "x" if "a" <= c <= "z" else "X" if "A" <= c <= "Z" else "0" if "0" <= c <= "9" else c for c in text
    )


@FAST
@given(st.one_of(st.text(max_size=250), st.sampled_from(SQLISH)))
def test_scope_names_are_validated_not_escaped(scope: str) -> None:
    _count("scope names")
    try:
        assert check_scope(scope) == scope
    except InvalidScope as exc:
        message = str(exc)
        assert "\x00" not in message and "\n" not in message
        # The message depends on the shape of the text only, never on its letters and digits
        # (a key pasted into a scope field must not come back in an answer or the audit log).
        with pytest.raises(InvalidScope) as masked:
            check_scope(_masked(scope))
        assert str(masked.value) == message
        return
    # Accepted names carry no SQL, path or control characters.
    assert set(scope) <= set("abcdefghijklmnopqrstuvwxyz0123456789._-/")
    assert ".." not in scope.split("/") and not scope.startswith("/")


# --- JSON-lines import ------------------------------------------------------------------------


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=8,
)


@FAST
@given(
    st.lists(
        st.one_of(
            st.text(max_size=200),
            _json_values.map(json.dumps),
            st.fixed_dictionaries(
                {
                    "scope": st.one_of(st.text(max_size=20), st.sampled_from(SQLISH)),
                    "name": st.text(max_size=20),
                },
                optional={"value": st.one_of(st.text(max_size=30), st.integers())},
            ).map(json.dumps),
        ),
        max_size=6,
    )
)
def test_import_lines_parse_or_raise_invalid_input(lines: list[str]) -> None:
    _count("import JSON lines")
    text = "\n".join(line.replace("\n", " ") for line in lines) + "\n"
    try:
        rows = list(read_rows(io.StringIO(text)))
    except InvalidInput as exc:
        assert str(exc).startswith("line ")
        return
    for row in rows:
        assert check_scope(row.scope) == row.scope and row.value
        row.value.encode("utf-8")


@FAST
@given(st.binary(max_size=200))
def test_import_bytes_of_any_encoding_give_typed_errors(raw: bytes) -> None:
    _count("import raw bytes")
    stream = io.TextIOWrapper(io.BytesIO(raw), encoding="utf-8", errors="strict")
    with contextlib.suppress(InvalidInput):
        list(read_rows(stream))


def test_import_oversized_line_is_refused_unparsed() -> None:
    huge = json.dumps({"scope": "openai", "name": "a", "value": "x" * 2_000_000}) + "\n"
    with pytest.raises(InvalidInput, match="line 1: longer than"):
        list(read_rows(io.StringIO(huge)))


# --- environment configuration -----------------------------------------------------------------

_ENV_NAMES = [
    "DATABASE_URL",
    "ENCRYPTION_KEY",
    "ENCRYPTION_KEY_VERSION",
    "ENCRYPTION_KEYS_PREVIOUS",
    "SECRETS_PROVIDER",
    "KEYROTOR_MAX_VALUE_BYTES",
    "KEYROTOR_DEFAULT_INTERVAL_DAYS",
    "KEYROTOR_REENCRYPT_BATCH_ROWS",
    "KEYROTOR_JOB_LEASE_SECONDS",
    "KEYROTOR_QUEUE_NAME",
    "KEYROTOR_LOG_FORMAT",
    "KEYROTOR_LISTEN_KEY_CHANGES",
    "KEYROTOR_KEK_CALLS_PER_SECOND",
    "KEYROTOR_AUDIT_BATCH_SIZE",
    "KEYROTOR_LEGACY_KEY",
    "KEYROTOR_METRICS_PORT",
]
_env_values = st.one_of(
    st.text(max_size=40),
    st.sampled_from(
        ["-1", "0", "1e309", "nan", "inf", "99999999999999999999", "true", "{}", '{"x": 1}', "\x00"]
    ),
    st.integers().map(str),
)


@FAST
@given(st.dictionaries(st.sampled_from(_ENV_NAMES), _env_values, max_size=5))
def test_environment_gives_settings_or_configuration_error(environ: dict[str, str]) -> None:
    _count("environment configurations")
    try:
        s = Settings.from_env(environ)
    except ConfigurationError as exc:
        message = str(exc)
        for name, value in environ.items():
            if (
                name in ("ENCRYPTION_KEY", "ENCRYPTION_KEYS_PREVIOUS", "KEYROTOR_LEGACY_KEY")
                and len(value) >= 6
            ):
                assert value not in message  # a key is never echoed
        return
    # repr never shows a key or a URL (which may carry a password). Only values that no other
    # variable (or a default) could have put there are conclusive.
    defaults = repr(Settings.from_env({}))
    for name in ("ENCRYPTION_KEY", "DATABASE_URL", "KEYROTOR_LEGACY_KEY"):
        value = environ.get(name, "")
        shared = value in defaults or any(value in v for k, v in environ.items() if k != name)
        if len(value) >= 6 and value.strip() and not shared:
            assert value not in repr(s)


# --- the library and the CLI against a real database ------------------------------------------


@pytest.mark.parametrize(
    ("scope", "name", "value"),
    [
        ("openai", "na\x00me", "v"),
        ("openai", "\udc80", "v"),
        ("openai", "n" * 5000, "v"),
        ("openai", "ok", "x" * 40_000),
        ("openai", "ok", "\ud800"),
        ("openai", "ok", ""),
        *[(s, "ok", "v") for s in SQLISH],
    ],
)
async def test_key_manager_refuses_hostile_input_with_typed_errors(
    km: KeyManager, settings: Settings, scope: str, name: str, value: str
) -> None:
    with pytest.raises(InvalidInput) as info:
        await km.put_secret(scope, name, value)
    assert value not in str(info.value) or len(value) < 2
    tables = await fetch(settings.database_url, "SELECT count(*) FROM pg_tables WHERE tablename = 'secrets'")
    assert tables[0][0] == 1


def _cli_in_process(argv: tuple[str, ...], stdin: bytes | None) -> tuple[int, str]:
    """``keyrotor ARGV`` through the console script's own ``main()`` (in-process: a subprocess
    per command line costs seconds of imports on a loaded 2-core machine)."""
    err = io.StringIO()
    stream = io.TextIOWrapper(io.BytesIO(stdin or b""), encoding="utf-8", errors="surrogateescape")
    old_stdin = sys.stdin
    sys.stdin = stream
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            try:
                cli_main(list(argv))
                code = 0
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else 1
    finally:
        sys.stdin = old_stdin
    return code, err.getvalue()


async def test_cli_refuses_hostile_arguments_with_one_line_errors(
    env: dict[str, str], km: KeyManager, record: Callable[..., None], monkeypatch: pytest.MonkeyPatch
) -> None:
    await km.put_secret("openai", "prod", "sk-proj-the-real-value-0123456789")
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("KEYROTOR_DEBUG", raising=False)
    bad_utf8 = b'{"scope": "openai", "name": "x", "value": "\xff\xfe"}\n'
    cases: list[tuple[tuple[str, ...], bytes | None]] = [
        (("secrets", "get", "'; DROP TABLE secrets; --", "prod"), None),
        (("secrets", "get", "../../etc/passwd", "prod"), None),
        (("secrets", "get", "openai", "prod\x00"), None),
        (("secrets", "put", 'openai"; DELETE FROM data_keys; --', "x"), b"v"),
        (("secrets", "put", "openai", "x"), b"\xff\xfe\x00"),
        (("secrets", "put", "openai", "big"), b"x" * 40_000),
        (("rotate", "$(reboot)"), None),
        (("retire", "openai", "0"), None),
        (("retire", "openai", "-1"), None),
        (("retire", "openai", "99999999999999999999"), None),
        (("policy", "set", "openai", "--interval-days", "'; DROP TABLE x; --"), None),
        (("status", "a" * 5000), None),
        (("secrets", "import", "-"), bad_utf8),
        (("secrets", "import", "-"), b'{"scope": "Open AI", "name": "x", "value": "v"}\n'),
        (("secrets", "import", "-"), b"[1, 2, 3]\n"),
        (("secrets", "import", "-"), b'{"scope": "openai", "name": "x", "value": "\\ud800"}\n'),
        (("secrets", "import", "/nonexistent/../../etc/shadow"), None),
        (
            (
                "columns",
                "register",
                'settings.api_key"; DROP TABLE secrets; --',
                "--pk",
                "id",
                "--scope",
                "openai",
            ),
            None,
        ),
    ]

    def run_all() -> list[tuple[tuple[str, ...], int, str]]:
        return [(args, *_cli_in_process(args, stdin)) for args, stdin in cases]

    failures = []
    for args, code, text in await asyncio.to_thread(run_all):
        if code not in (1, 2) or "Traceback" in text or "unexpected" in text:
            failures.append((args[:3], code, text[-300:]))
        elif "keyrotor: error:" in text and text.strip().count("\n") > 0:
            failures.append((args[:3], code, text[-300:]))  # one line, no more
        elif "keyrotor: error:" not in text and "Usage:" not in text:
            failures.append((args[:3], code, text[-300:]))
    assert failures == []
    # Nothing was dropped, deleted or written.
    assert await km.get_secret("openai", "prod") == "sk-proj-the-real-value-0123456789"
    rows = await fetch(env["DATABASE_URL"], "SELECT count(*) FROM secrets")
    assert rows[0][0] == 1
    record("hostile_cli", commands=len(cases), refused_typed=len(cases) - len(failures))


def test_zz_record_how_many_examples_ran(record: Callable[..., None]) -> None:
    """Runs last in this module (pytest keeps file order): the example counts for RELIABILITY.md."""
    record("hostile", examples=dict(sorted(counts.items())), total=sum(counts.values()))
