"""The log redaction processor (worker/logs.py): key material never survives into an event."""

from __future__ import annotations

import base64
import json
import logging
import os
import secrets
import sys
import threading

import pytest
import structlog

from keyrotor import Settings
from keyrotor.redaction import REDACTED
from keyrotor.worker.logs import Redactor, configure_logging, known_secrets

ANTHROPIC = "sk-ant-api03-" + "Ab3_x-" * 16
OPENAI = "sk-proj-" + "Zq9xY8wV7uT6sR5q" * 3
GOOGLE = "AIzaSyD" + "k3Jf8-Lm_Qw2" * 3
DEK = os.urandom(32)


@pytest.mark.parametrize(
    "secret",
    [
        ANTHROPIC,
        OPENAI,
        GOOGLE,
        base64.b64encode(DEK).decode(),
        base64.urlsafe_b64encode(DEK).decode(),
        DEK.hex(),
        "kr1:3:" + base64.urlsafe_b64encode(os.urandom(60)).decode().rstrip("="),
        secrets.token_urlsafe(32),
    ],
    # Fixed ids: most values are random, and parallel test processes must collect the same names
    # (and a test id is no place for key material anyway).
    ids=["anthropic", "openai", "google", "dek-base64", "dek-urlsafe", "dek-hex", "kr1", "token"],
)
def test_key_material_is_redacted_anywhere_in_a_string(secret: str) -> None:
    r = Redactor()
    out = r.redact(f"failed for value {secret} in row 42")
    assert secret not in out and REDACTED in out
    assert out.startswith("failed for value ") and out.endswith(" in row 42")


def test_ordinary_text_is_left_alone() -> None:
    r = Redactor()
    for text in (
        "batch_reencrypted",
        "keyrotor:queue:rotate_dek:tenant-42/openai:17",
        "/work/main/.venv/lib/python3.11/site-packages/sqlalchemy/ext/asyncio/engine.py",
        "2026-11-28T19:45:00.123456Z",
        "worker_background_failed: StoreUnavailable: cannot reach the database",
        "rotation_completed mode=single_transaction rows=40 to_version=3",
    ):
        assert r.redact(text) == text


def test_known_secrets_and_url_passwords() -> None:
    settings = Settings.from_env(
        {"ENCRYPTION_KEY": "short-but-known-master", "ENCRYPTION_KEYS_PREVIOUS": '{"1": "older-master-key"}'}
    )
    r = Redactor(known_secrets(settings))
    out = r.redact("keys short-but-known-master and older-master-key, postgresql://kr:hunter2pw@db:5432/kr")
    assert "short-but-known-master" not in out and "older-master-key" not in out
    assert "hunter2pw" not in out and "postgresql://kr:***@db:5432/kr" in out


def test_provider_credentials_and_region_keys_from_the_environment() -> None:
    # An AppRole secret id is a lowercase UUID: no pattern would call it key material.
    secret_id = "5a1c9f3e-8b2d-4e6f-a0b1-c2d3e4f5a6b7"
    environ = {
        "VAULT_SECRET_ID": secret_id,
        "VAULT_TOKEN": "hvs.short-token-x",
        "AWS_SECRET_ACCESS_KEY": "plain-lowercase-secret-access-key",
        "KEYROTOR_REGION_EU_WEST_1__ENCRYPTION_KEY": "eu-region-master-key",
        "KEYROTOR_REGION_EU_WEST_1__ENCRYPTION_KEYS_PREVIOUS": '{"1": "eu-older-region-key"}',
        "KEYROTOR_REGION_AP_SOUTH_1__VAULT_TOKEN": "ap-south-vault-token",
        "VAULT_ADDR": "http://vault.internal:8200",  # not a secret: kept
    }
    r = Redactor(known_secrets(Settings.from_env({}), environ))
    text = " ".join(v for k, v in environ.items() if k != "VAULT_ADDR")
    out = r.redact(f"login failed: {text} at http://vault.internal:8200")
    for name, value in environ.items():
        if name != "VAULT_ADDR":
            assert value not in out, name
    assert "eu-older-region-key" not in out
    assert "http://vault.internal:8200" in out


def test_every_value_of_an_event_nested_and_bytes() -> None:
    r = Redactor()
    event = {
        "event": f"got {OPENAI}",
        "detail": {"keys": [ANTHROPIC, {"g": GOOGLE}], "n": 3, "ok": True},
        "raw": DEK,
        "exception": f"Traceback ...\nValueError: bad key {ANTHROPIC}",
        "_record": object(),
    }
    out = r(None, "info", event)
    text = json.dumps({k: v for k, v in out.items() if not k.startswith("_")})
    for secret in (OPENAI, ANTHROPIC, GOOGLE):
        assert secret not in text
    assert out["detail"]["n"] == 3 and out["detail"]["ok"] is True
    assert out["raw"] == "<32 bytes>"


def _reset_logging() -> None:
    """Undo configure_logging in this (pytest's) process."""
    structlog.reset_defaults()
    logging.getLogger().handlers = []
    logging.captureWarnings(False)
    sys.unraisablehook = sys.__unraisablehook__
    threading.excepthook = threading.__excepthook__


def test_configured_logging_redacts_stdlib_structlog_and_exceptions(
    capsys: pytest.CaptureFixture[str],
) -> None:
    settings = Settings.from_env(
        {"KEYROTOR_LOG_FORMAT": "json", "ENCRYPTION_KEY": "configured-master-key-xyz"}
    )
    configure_logging(settings, force=True)
    try:
        structlog.get_logger("t").info("stored", value=ANTHROPIC, scope="anthropic", run_id=7)
        logging.getLogger("arq.worker").warning("job failed with %s", OPENAI)
        try:
            raise ValueError(f"cannot use configured-master-key-xyz or {GOOGLE}")
        except ValueError:
            structlog.get_logger("t").exception("boom")
        out = capsys.readouterr().out
    finally:
        _reset_logging()
    lines = out.strip().splitlines()
    assert len(lines) == 3
    events = [json.loads(line) for line in lines]  # one JSON event a line
    assert events[0]["scope"] == "anthropic" and events[0]["run_id"] == 7
    for secret in (ANTHROPIC, OPENAI, GOOGLE, "configured-master-key-xyz"):
        assert secret not in out
    assert "ValueError" in out


_TTY_SCRIPT = """
import logging, structlog
from keyrotor import Settings
from keyrotor.worker.logs import configure_logging
configure_logging(Settings.from_env())
structlog.get_logger("t").info("stored", value=%r, scope="anthropic", run_id=7)
logging.getLogger("arq.worker").info("job done")
"""


def test_auto_format_is_pretty_on_a_terminal_and_json_otherwise() -> None:
    """``KEYROTOR_LOG_FORMAT=auto``: a process whose stdout is a terminal (a real pty) gets the
    console renderer, still redacted and one event a line; a pipe gets JSON."""
    import pty
    import subprocess

    env = {**os.environ, "KEYROTOR_LOG_FORMAT": "auto", "ENCRYPTION_KEY": "tty-test-master-key-123"}
    script = _TTY_SCRIPT % ANTHROPIC
    main, sub = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=sub, stderr=sub, env=env)
    os.close(sub)
    chunks = []
    while True:
        try:
            chunk = os.read(main, 4096)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(main)
    assert proc.wait(30) == 0
    tty_out = b"".join(chunks).decode(errors="replace")
    lines = [line for line in tty_out.splitlines() if line.strip()]
    assert len(lines) == 2, tty_out
    assert "stored" in lines[0] and "scope" in lines[0] and "anthropic" in lines[0]
    assert "\x1b[" in tty_out  # coloured
    assert not lines[0].lstrip().startswith("{")  # not JSON
    assert ANTHROPIC not in tty_out and REDACTED in tty_out
    assert "job done" in lines[1]  # arq's stdlib logger, same renderer

    piped = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, check=True
    )
    events = [json.loads(line) for line in piped.stdout.splitlines()]
    assert [e["event"] for e in events] == ["stored", "job done"]
    assert ANTHROPIC not in piped.stdout and events[0]["value"] == REDACTED


# 32 random bytes whose base64 happens to hold no digit (about one key in 1,500 does): mixed
# case without digits is also how CamelCase names look, so "has a digit" alone missed it.
NO_DIGIT_DEK = "MEbvdsluBTrbsokQHmmlGxvvZDgYe+XrzxzNIHBXaXI="
# keyrotor's own API token (keyrotor/api/tokens.py), again without a digit.
NO_DIGIT_TOKEN = "krt_JuEPUXdDGXUVVNgFKkisrDJoMHyDBQcHOUEsXLpCbNo"


@pytest.mark.parametrize(
    ("text", "secret"),
    [
        (f"unwrapped {NO_DIGIT_DEK}", NO_DIGIT_DEK),
        (f"token {NO_DIGIT_TOKEN} refused", NO_DIGIT_TOKEN[4:]),
        ("GET /v1/scopes Authorization: Bearer krt_abcDEF123", "abcDEF123"),
        ("headers={'Authorization': 'Bearer hvs.CAESIabcdefghij'}", "CAESIabcdefghij"),
        ("postgresql://kr@db:5432/kr?sslmode=require&password=hunter2pw", "hunter2pw"),
        ("connect(host=db user=kr password=hunter2pw dbname=kr)", "hunter2pw"),
        ("redis://db:6379/0?password=hunter2pw", "hunter2pw"),
        (
            "invalid input for query argument $2: b'\\x92\\x90\\xa0\\x02W\\x06\\xe1\\xfd\\x02\\x8c' (bad)",
            "\\x92\\x90",
        ),
        (
            'duplicate key value violates unique constraint "secrets_pkey"\n'
            "DETAIL:  Key (scope_id, name)=(3, acme-corp-openai) already exists.",
            "acme-corp-openai",
        ),
        (
            'new row for relation "secrets" violates check constraint\n'
            "DETAIL:  Failing row contains (7, acme-corp, x).",
            "acme-corp",
        ),
    ],
    ids=[
        "dek-no-digit",
        "api-token-no-digit",
        "bearer-api-token",
        "bearer-vault-token",
        "url-query-password",
        "libpq-keyword-password",
        "redis-query-password",
        "bytes-literal",
        "postgres-detail-key",
        "postgres-failing-row",
    ],
)
def test_shapes_the_patterns_missed(text: str, secret: str) -> None:
    out = Redactor().redact(text)
    assert secret not in out, out


def test_camel_case_and_snake_case_names_are_not_key_material() -> None:
    r = Redactor()
    for text in (
        "ReencryptRangeJobFailedWithStoreBusyError",
        "keyrotor_unregistered_locations_total",
        "KEYROTOR_METRICS_SCOPE_LABELS_AND_MORE_OF_THEM",
        'password authentication failed for user "postgres"',
        "DETAIL:  Process 4242 waits for ShareLock on transaction 77; blocked by process 4343.",
    ):
        assert r.redact(text) == text
    # A digest is blanked; the line after it, which is no part of it, is kept.
    digest = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
    assert r.redact(f"sha {digest}\nTraceback (most recent call last):") == (
        f"sha {REDACTED}\nTraceback (most recent call last):"
    )


async def test_a_failed_jobs_traceback_does_not_quote_the_row_postgres_names(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A duplicate secret on the real database, failed the way a job fails: keyrotor's error
    names no value, but its cause (asyncpg's error, whose text carries the DETAIL line) is
    printed in the traceback arq logs; the tenant's secret name must not reach the log."""
    import asyncio

    import asyncpg

    from keyrotor.errors import StoreRejected
    from keyrotor.store.db import wrap_exceptions

    name = "acme-corp-billing-openai"
    conn = await asyncio.wait_for(
        asyncpg.connect("postgresql://postgres@127.0.0.1:5432/postgres"), timeout=10
    )
    configure_logging(Settings.from_env({"KEYROTOR_LOG_FORMAT": "json"}), force=True)
    try:
        await conn.execute("CREATE TEMP TABLE names (name text PRIMARY KEY)", timeout=10)
        await conn.execute("INSERT INTO names VALUES ($1)", name, timeout=10)
        with pytest.raises(StoreRejected) as caught, wrap_exceptions():
            await asyncio.wait_for(conn.execute("INSERT INTO names VALUES ($1)", name), timeout=10)
        assert name not in str(caught.value)
        try:
            raise caught.value
        except StoreRejected as exc:  # arq's own line for a failed job
            logging.getLogger("arq.worker").exception(
                "%6.2fs ! %s failed, %s: %s", 0.01, "abc:put_secret", type(exc).__name__, exc
            )
        out = capsys.readouterr().out
    finally:
        _reset_logging()
        await conn.close(timeout=10)
    event = json.loads(out.strip().splitlines()[-1])
    assert "UniqueViolationError" in json.dumps(event["exception"])  # the cause is still shown
    assert name not in out


_STDERR_SCRIPT = """
import gc, sys, threading, warnings
from keyrotor import Settings
from keyrotor.worker.logs import configure_logging
configure_logging(Settings.from_env({"KEYROTOR_LOG_FORMAT": "json"}))
warnings.warn("a library warns about value %(key)s", UserWarning)

class Closing:
    def __del__(self):
        raise ValueError("cannot close with %(key)s")

Closing()
gc.collect()
thread = threading.Thread(target=lambda: (_ for _ in ()).throw(ValueError("thread saw %(key)s")))
thread.start()
thread.join(10)
"""


def test_warnings_and_errors_printed_outside_a_logger_are_redacted() -> None:
    """Python prints a warning, an exception a destructor ignored and a thread's uncaught
    exception straight to stderr; a third-party library's text must pass the redactor too."""
    import subprocess

    script = _STDERR_SCRIPT % {"key": ANTHROPIC}
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    )
    output = done.stdout + done.stderr
    assert ANTHROPIC not in output, output
    events = [json.loads(line) for line in done.stdout.splitlines()]
    assert len(events) == 3 and not done.stderr.strip()  # each one event, through the handler
    assert {e["logger"] for e in events} == {"py.warnings", "keyrotor.unraisable", "keyrotor.thread"}


def test_keys_of_a_mapping_are_redacted_too(capsys: pytest.CaptureFixture[str]) -> None:
    """A mapping keyed by a value (counts by ciphertext, an ``extra`` dict a library passes)."""
    ciphertext = "kr1:3:" + base64.urlsafe_b64encode(b"\x01" * 40).decode().rstrip("=")
    configure_logging(Settings.from_env({"KEYROTOR_LOG_FORMAT": "json"}), force=True)
    try:
        structlog.get_logger("t").info("counted", seen={ciphertext: 2, "plain": 1})
        logging.getLogger("some.library").warning("retrying", extra={"by_key": {OPENAI: "x"}})
        out = capsys.readouterr().out
    finally:
        _reset_logging()
    assert ciphertext not in out and OPENAI not in out
    first = json.loads(out.splitlines()[0])
    assert first["seen"] == {REDACTED: 2, "plain": 1}


# A master key chosen as a passphrase, with characters that repr() and JSON escape.
PASSPHRASE = 'Grüße "an" C:\\keys\\master'


@pytest.mark.parametrize(
    "quoted",
    [repr(PASSPHRASE), json.dumps(PASSPHRASE), json.dumps(PASSPHRASE, ensure_ascii=False)],
    ids=["repr", "json-ascii", "json-unicode"],
)
def test_a_known_secret_is_blanked_in_its_escaped_forms(quoted: str) -> None:
    settings = Settings.from_env({"ENCRYPTION_KEY": PASSPHRASE})
    r = Redactor(known_secrets(settings, {}))
    out = r.redact(f'provider answered {{"key": {quoted}}} for the request')
    assert quoted[1:-1] not in out and "an\\" not in out, out


# 64 bytes as MIME base64 wraps them: a 76-character line, then a 12-character one.
WRAPPED = base64.encodebytes(bytes(range(7, 71))).decode()


@pytest.mark.parametrize(
    "text",
    [
        f"key material:\n{WRAPPED}next line",
        "body " + json.dumps({"pem": f"-----BEGIN KEY-----\n{WRAPPED}-----END KEY-----"}),
    ],
    ids=["newlines", "json-escaped-newlines"],
)
def test_base64_wrapped_over_lines_is_blanked_to_its_last_line(text: str) -> None:
    out = Redactor().redact(text)
    for line in WRAPPED.split():
        assert line not in out, out


def test_botocore_debug_lines_do_not_show_the_dek_kms_returns(capsys: pytest.CaptureFixture[str]) -> None:
    """At DEBUG botocore logs every request's and response's body: KMS's ``Plaintext`` is a DEK
    (here one whose base64 has no digit). A real botocore client against a local endpoint."""
    import http.server

    import botocore.session

    answer = json.dumps({"KeyId": "arn:aws:kms:eu-west-1:1:key/k", "Plaintext": NO_DIGIT_DEK}).encode()

    class Kms(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers["Content-Length"]))
            self.send_response(200)
            self.send_header("Content-Type", "application/x-amz-json-1.1")
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Kms)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    configure_logging(
        Settings.from_env({"KEYROTOR_LOG_FORMAT": "json", "KEYROTOR_LOG_LEVEL": "DEBUG"}), force=True
    )
    try:
        kms = botocore.session.get_session().create_client(
            "kms",
            region_name="eu-west-1",
            endpoint_url=f"http://127.0.0.1:{server.server_address[1]}",
            aws_access_key_id="AKIAEXAMPLE",
            aws_secret_access_key="example-secret-access-key",
            config=botocore.config.Config(connect_timeout=5, read_timeout=5, retries={"max_attempts": 1}),
        )
        plaintext = kms.decrypt(CiphertextBlob=b"wrapped")["Plaintext"]
        out = capsys.readouterr().out
    finally:
        _reset_logging()
        server.shutdown()
        server.server_close()
        thread.join(10)
    assert plaintext == base64.b64decode(NO_DIGIT_DEK)
    assert "Response body" in out  # botocore's line is there, the key is not
    assert NO_DIGIT_DEK not in out
