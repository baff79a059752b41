"""Logging for the worker, configured once: structlog, JSON on stdout (console on a tty).

Everything goes through one stdlib handler whose formatter is structlog's
``ProcessorFormatter``, so arq's own ``arq.*`` loggers, keyrotor's stdlib loggers and structlog
loggers all come out the same way, with the per-job context vars (job_id, job_try, scope,
run_id) merged in first.

Tracebacks never show frame locals (where keys and plaintexts live):
``ExceptionRenderer(ExceptionDictTransformer(show_locals=False))`` for JSON and
``RichTracebackFormatter(show_locals=False)`` on a console.

Python's own stderr printers go through the same handler: warnings (``py.warnings``), an
exception a destructor or a finalizer could not raise (``keyrotor.unraisable``) and a thread's
uncaught exception (``keyrotor.thread``) -- third-party text that would otherwise bypass the
redactor.

Every rendered event then passes :class:`Redactor`, the last processor before the renderer:
it replaces anything that looks like key material in every value and mapping key (nested dicts
and lists, the message, the rendered exception): what :mod:`keyrotor.redaction` matches
(provider API keys, ``krt_`` and ``Bearer`` tokens, ``kr1:`` ciphertexts, URL and ``password=``
passwords, bytes literals, the row values PostgreSQL quotes, long random base64/hex runs, also
wrapped over lines), and verbatim, also as repr() and JSON quote them, the configured master
keys and tokens, the KEK providers' credentials (``VAULT_TOKEN``, ``VAULT_SECRET_ID``,
``AWS_SECRET_ACCESS_KEY``, ...) and every region's own key variables. Redaction is the last
line of defence, not the first: keyrotor's messages never carry values to begin with.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
from collections.abc import Iterable, Mapping, MutableMapping
from typing import Any

import structlog
from structlog.dev import ConsoleRenderer, RichTracebackFormatter
from structlog.processors import ExceptionRenderer
from structlog.tracebacks import ExceptionDictTransformer

from keyrotor.redaction import REDACTED, blank_patterns
from keyrotor.settings import Settings

_configured = False

# Shortest literal secret matched verbatim (shorter ones would blank ordinary words).
_MIN_LITERAL = 8


class Redactor:
    """A structlog processor that blanks key material in every value of an event.

    Args:
        secrets: values to blank verbatim wherever they appear (the master keys, API tokens).
    """

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        found = {s for s in secrets if s and len(s) >= _MIN_LITERAL}
        # A secret quoted by repr() or JSON in a message (a provider's answer, a driver's error)
        # appears escaped: a quote, a backslash or a non-ASCII letter breaks the verbatim match.
        found |= {q for s in found for q in _escaped(s)}
        self.literals = sorted(found, key=len, reverse=True)

    def redact(self, text: str) -> str:
        """``text`` with everything that looks like key material replaced by ``[REDACTED]``."""
        for literal in self.literals:
            if literal in text:
                text = text.replace(literal, REDACTED)
        return blank_patterns(text)

    def _value(self, value: Any) -> Any:
        if isinstance(value, str):
            return self.redact(value)
        if isinstance(value, bytes | bytearray | memoryview):
            return f"<{len(value)} bytes>"  # raw bytes in a log are key material until proven otherwise
        if isinstance(value, Mapping):  # keys too: a mapping may be keyed by a value
            return {self.redact(k) if isinstance(k, str) else k: self._value(v) for k, v in value.items()}
        if isinstance(value, list | tuple | set | frozenset):
            return [self._value(v) for v in value]
        if value is None or isinstance(value, bool | int | float):
            return value
        return self.redact(str(value))

    def __call__(self, logger: Any, method: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
        for key in list(event):
            if not key.startswith("_"):  # structlog's own meta keys (_record, _from_structlog)
                event[key] = self._value(event[key])
        return event


def _escaped(secret: str) -> set[str]:
    """The forms ``secret`` takes inside a repr() or a JSON string (itself left out)."""
    forms = {repr(secret)[1:-1], json.dumps(secret)[1:-1], json.dumps(secret, ensure_ascii=False)[1:-1]}
    return forms - {secret}


# Environment variables holding credentials that are not Settings fields: the KEK providers'
# (keyrotor/kek/) and, behind `KEYROTOR_REGION_<NAME>__`, every secondary region's own key
# (keyrotor/replication/regions.py). Pattern matching alone would miss some (an AppRole secret id is a
# lowercase UUID), so their values are blanked verbatim too.
_SECRET_VARIABLES = (
    "ENCRYPTION_KEY",
    "KEYROTOR_LEGACY_KEY",
    "KEYROTOR_AUDIT_API_TOKEN",
    "VAULT_TOKEN",
    "VAULT_SECRET_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
)


def _env_secrets(environ: Mapping[str, str]) -> list[str]:
    found: list[str] = []
    for name, value in environ.items():
        base = name.rsplit("__", 1)[-1] if name.startswith("KEYROTOR_REGION_") else name
        if base in _SECRET_VARIABLES:
            found.append(value)
        elif base == "ENCRYPTION_KEYS_PREVIOUS":  # JSON {"1": "old key"}; unparsable: the whole text
            try:
                previous = json.loads(value)
            except ValueError:
                previous = None
            found += [str(v) for v in previous.values()] if isinstance(previous, dict) else [value]
    return found


def known_secrets(settings: Settings, environ: Mapping[str, str] | None = None) -> list[str]:
    """The configured secret values a log must never show verbatim: the master keys and tokens
    of ``settings``, and the credential variables of the KEK providers and of every region's key
    in ``environ`` (default ``os.environ``)."""
    found = [settings.encryption_key, settings.legacy_encryption_key, settings.audit_api_token]
    found += list(settings.encryption_keys_previous.values())
    values = [s.get_secret_value() for s in found if s is not None]
    return values + _env_secrets(os.environ if environ is None else environ)


def _log_unraisable(unraisable: Any) -> None:
    # Python's default prints the object's repr and the traceback to stderr, unredacted.
    exc = unraisable.exc_value
    info = (type(exc), exc, unraisable.exc_traceback) if exc is not None else None
    where = unraisable.err_msg or "Exception ignored in"
    logging.getLogger("keyrotor.unraisable").error(
        "%s: %s", where, type(unraisable.object).__name__, exc_info=info
    )


def _log_thread_exception(args: threading.ExceptHookArgs) -> None:
    if args.exc_type is SystemExit:
        return  # as threading's default: a thread's SystemExit is silent
    name = args.thread.name if args.thread is not None else "?"
    info = (args.exc_type, args.exc_value, args.exc_traceback) if args.exc_value is not None else None
    logging.getLogger("keyrotor.thread").error("uncaught exception in thread %s", name, exc_info=info)


def _route_stderr_printers() -> None:
    """Send what Python prints to stderr by itself through the logging handler (redacted)."""
    logging.captureWarnings(True)
    sys.unraisablehook = _log_unraisable
    threading.excepthook = _log_thread_exception


def use_json(settings: Settings) -> bool:
    """JSON unless asked for a console, or ``auto`` and stdout is a terminal."""
    if settings.log_format == "auto":
        return not sys.stdout.isatty()
    return settings.log_format == "json"


def configure_logging(settings: Settings, *, force: bool = False) -> None:
    """Configure structlog and the stdlib root logger (once per process)."""
    global _configured
    if _configured and not force:
        return
    level = logging.getLevelName(settings.log_level.upper())
    if not isinstance(level, int):
        level = logging.INFO
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_logger_name,
        structlog.stdlib.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.stdlib.ExtraAdder(),
    ]
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.stdlib.filter_by_level,
            structlog.stdlib.add_logger_name,
            structlog.stdlib.add_log_level,
            structlog.stdlib.PositionalArgumentsFormatter(),
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    redactor = Redactor(known_secrets(settings))
    if use_json(settings):
        final: list[Any] = [
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            ExceptionRenderer(ExceptionDictTransformer(show_locals=False)),
            redactor,
            structlog.processors.JSONRenderer(),
        ]
    else:
        final = [
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            # Rendered to text first, so the redactor sees the exception too.
            structlog.processors.format_exc_info,
            redactor,
            ConsoleRenderer(exception_formatter=RichTracebackFormatter(show_locals=False)),
        ]
    formatter = structlog.stdlib.ProcessorFormatter(foreign_pre_chain=shared, processors=final)
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(level)
    # arq's CLI installs its own handlers on the `arq` loggers: route them through ours.
    for name in ("arq", "arq.worker", "arq.jobs", "arq.connections", "arq.cron"):
        arq_logger = logging.getLogger(name)
        arq_logger.handlers = []
        arq_logger.propagate = True
        arq_logger.setLevel(level)
    _route_stderr_printers()
    _configured = True
