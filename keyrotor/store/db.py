"""Connections: the engine, error translation, database creation and migrations."""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import AsyncIterator, Iterator
from contextvars import ContextVar
from pathlib import Path
from typing import Any

import asyncpg
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.engine.url import URL
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine

from keyrotor.errors import ConfigurationError, SchemaMissing, StoreBusy, StoreRejected, StoreUnavailable
from keyrotor.redaction import blank_patterns

MIGRATIONS = Path(__file__).parent / "migrations"


def async_url(database_url: str) -> URL:
    """Accept ``postgresql://`` (the usual form) or ``postgresql+asyncpg://``; return the asyncpg URL.

    Raises:
        ConfigurationError: not a PostgreSQL URL.
    """
    try:
        url = make_url(database_url)
    except sa_exc.ArgumentError:
        raise ConfigurationError("DATABASE_URL is not a valid URL") from None
    if url.get_backend_name() not in ("postgresql", "postgres"):
        raise ConfigurationError("DATABASE_URL must be a postgresql:// URL")
    return _driver_query(url).set(drivername="postgresql+asyncpg")


# libpq's TLS modes, which asyncpg takes as its ``ssl`` argument.
_SSL_MODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")
# libpq's TLS file parameters, which asyncpg reads from the environment only in this setup.
_SSL_FILES = {
    "sslrootcert": "PGSSLROOTCERT",
    "sslcert": "PGSSLCERT",
    "sslkey": "PGSSLKEY",
    "sslcrl": "PGSSLCRL",
}


def _driver_query(url: URL) -> URL:
    """``url`` with libpq's ``sslmode`` (what providers' URLs carry) as asyncpg's ``ssl``.

    SQLAlchemy hands each query parameter to ``asyncpg.connect`` as a keyword, which knows no
    ``sslmode``: every connection failed with a TypeError. The TLS file parameters are refused
    with the variable asyncpg reads them from.

    Raises:
        ConfigurationError: an unknown ``sslmode``, ``sslmode`` and ``ssl`` both, or a TLS file
            parameter (the message names them, never the URL).
    """
    for name, variable in _SSL_FILES.items():
        if name in url.query:
            raise ConfigurationError(f"DATABASE_URL: {name} is not read from the URL: set {variable} instead")
    if "sslmode" not in url.query:
        return url
    mode = url.query["sslmode"]
    if "ssl" in url.query:
        raise ConfigurationError("DATABASE_URL: give sslmode or ssl, not both")
    if mode not in _SSL_MODES:
        raise ConfigurationError(f"DATABASE_URL: sslmode must be one of {', '.join(_SSL_MODES)}")
    return url.difference_update_query(["sslmode"]).update_query_dict({"ssl": mode})


def create_engine(database_url: str, **kwargs: Any) -> AsyncEngine:
    """An async engine for ``database_url`` with keyrotor's pool defaults.

    ``hide_parameters``: a driver error's text leaves out the statement's parameters, which
    carry ciphertexts and wrapped DEKs; it is kept as the ``__cause__`` of keyrotor's errors,
    and a logged traceback prints it.
    """
    options: dict[str, Any] = {
        "pool_pre_ping": True,
        "pool_size": 5,
        "max_overflow": 10,
        "hide_parameters": True,
    }
    options.update(kwargs)
    return create_async_engine(async_url(database_url), **options)


def sessionmaker(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    """Sessions that keep loaded attributes after commit (we never lazy-load)."""
    return async_sessionmaker(engine, expire_on_commit=False)


# Driver and network errors that mean "the database is not there right now".
_TRANSIENT: tuple[type[BaseException], ...] = (
    sa_exc.OperationalError,
    sa_exc.InterfaceError,
    sa_exc.DisconnectionError,
    sa_exc.TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.CannotConnectNowError,
    asyncpg.TooManyConnectionsError,
    asyncpg.AdminShutdownError,
    ConnectionError,
    OSError,
    TimeoutError,
)


def _is_transient(exc: BaseException) -> bool:
    if isinstance(exc, sa_exc.DBAPIError) and exc.connection_invalidated:
        return True
    if _not_accepting(exc):
        return True
    if isinstance(exc, sa_exc.DBAPIError) and exc.orig is not None:
        return _is_transient(exc.orig) or isinstance(exc, sa_exc.OperationalError | sa_exc.InterfaceError)
    if isinstance(exc, _TRANSIENT):
        return True
    cause = getattr(exc, "__cause__", None)
    return isinstance(cause, _TRANSIENT) or _not_accepting(cause)


# SQLSTATEs a later attempt may not meet: 40 (serialization failure, deadlock), 55P03 (lock
# timeout), 57014 (statement timeout, cancelled), 53 (insufficient resources), 58 (I/O error).
_BUSY_CLASSES = ("40", "53", "58")
_BUSY_STATES = ("55P03", "57014")
# asyncpg's own message for a parameter it cannot encode echoes the value; it is left out.
_ARGUMENT = re.compile(r"(invalid input for query argument \$\d+): .* \(([^()]*)\)$", re.S)


def _postgres_error(exc: BaseException) -> asyncpg.PostgresError | None:
    """The asyncpg error behind ``exc`` (raw, or wrapped by SQLAlchemy), if any."""
    seen: BaseException | None = exc
    for _ in range(4):
        if seen is None:
            return None
        if isinstance(seen, asyncpg.PostgresError):
            return seen
        seen = getattr(seen, "orig", None) or seen.__cause__
    return None


def _is_busy(pg: asyncpg.PostgresError) -> bool:
    state = str(getattr(pg, "sqlstate", "") or "")
    return state[:2] in _BUSY_CLASSES or state in _BUSY_STATES


def describe(exc: BaseException) -> str:
    """One line naming a database error: its class, SQLSTATE and message, never a bound value.

    Statements carry ciphertexts and keys, never plaintext; still, an argument echoed by the
    driver is dropped and whatever looks like key material is blanked.
    """
    pg = _postgres_error(exc)
    err: BaseException = pg if pg is not None else exc
    message = str(getattr(err, "message", None) or err).strip().splitlines()[0] if str(err).strip() else ""
    message = _ARGUMENT.sub(r"\1 (\2)", message)
    state = getattr(pg, "sqlstate", None)
    where = f" [SQLSTATE {state}]" if state else ""
    return blank_patterns(f"{type(err).__name__}{where}: {message}")[:500]


# What Postgres says of a table that is not there (SQLSTATE 42P01), schema-qualified or not.
_MISSING_RELATION = re.compile(r'relation "(?:[^"]*\.)?([^".]+)" does not exist')


def missing_schema(exc: BaseException) -> SchemaMissing | None:
    """The permanent error for ``exc`` if it is a statement that met no keyrotor table (the
    database was never upgraded, or is older than this code), else None.

    Only keyrotor's own tables count: a registered application table that is missing is the
    application's affair, and ``keyrotor db upgrade`` would not create it.
    """
    pg = _postgres_error(exc)
    if pg is None or getattr(pg, "sqlstate", None) != "42P01":
        return None
    found = _MISSING_RELATION.search(str(getattr(pg, "message", None) or pg))
    if found is None or found.group(1) not in _keyrotor_tables():
        return None
    return SchemaMissing(
        f"the database has no keyrotor schema (or an older one: no table {found.group(1)!r}): "
        "run `keyrotor db upgrade`"
    )


def _keyrotor_tables() -> frozenset[str]:
    # Imported here: the models are not needed to connect, and most errors never get here.
    from keyrotor.store.models import Base

    return frozenset(Base.metadata.tables) | {"alembic_version"}


def _not_accepting(exc: BaseException | None) -> bool:
    # SQLSTATE 55000 "database ... is not currently accepting connections" (ALTER DATABASE ...
    # ALLOW_CONNECTIONS false, as in maintenance) is an outage, not a bug; other 55000 errors
    # are not outages, hence the test of the message.
    return isinstance(exc, asyncpg.ObjectNotInPrerequisiteStateError) and "accepting connections" in str(exc)


@contextlib.contextmanager
def wrap_exceptions() -> Iterator[None]:
    """Translate driver errors into keyrotor's error tree, once, here: transient or permanent.

    - the database is not there (connection lost, refused, shut down): :class:`StoreUnavailable`;
    - it could not run the statement now (serialization failure, deadlock, lock or statement
      timeout, resources): :class:`StoreBusy`;

    both transient (a job retries them with backoff). Any other database error -- invalid data
    (``DataError``: a value out of a column's range), a statement that cannot work
    (``ProgrammingError``: a dropped column), a constraint violation -- is
    :class:`StoreRejected`, permanent: a run that meets it is failed with its message rather
    than retried for ever. A statement on a keyrotor table the database does not have is
    :class:`SchemaMissing` (a ``StoreRejected`` and a ``ConfigurationError``), whose message says
    to run ``keyrotor db upgrade``. The driver's exception stays chained as ``__cause__``.
    """
    try:
        yield
    except (StoreUnavailable, StoreBusy, StoreRejected):
        raise
    except Exception as exc:
        if _is_transient(exc):
            raise StoreUnavailable(f"database unavailable: {type(exc).__name__}") from exc
        missing = missing_schema(exc)
        if missing is not None:  # not an outage, and not a bug: one command fixes it
            raise missing from exc
        pg = _postgres_error(exc)
        if pg is not None and _is_busy(pg):
            raise StoreBusy(f"database busy: {describe(exc)}") from exc
        if pg is not None or isinstance(exc, sa_exc.DBAPIError):
            raise StoreRejected(f"database refused the statement: {describe(exc)}") from exc
        raise


class CommitWatch:
    """Whether a transaction of one unit of work (and of the units it runs within) sent COMMIT.

    A unit cancelled before any of its transactions sent COMMIT rolled back; one cancelled after
    may have committed (the server can have applied a COMMIT whose answer never came back), and
    must be reported as possibly committed, never as rolled back. Installed by
    :func:`watch_commits`; :func:`transaction` marks it.
    """

    __slots__ = ("committing", "parent")

    def __init__(self, parent: CommitWatch | None = None) -> None:
        self.committing = False
        self.parent = parent

    def mark(self) -> None:
        """Record that a COMMIT is about to be sent (here and in every enclosing unit)."""
        watch: CommitWatch | None = self
        while watch is not None:
            watch.committing = True
            watch = watch.parent


_COMMIT_WATCH: ContextVar[CommitWatch | None] = ContextVar("keyrotor_commit_watch", default=None)


@contextlib.contextmanager
def watch_commits() -> Iterator[CommitWatch]:
    """A :class:`CommitWatch` for the tasks created inside the block (they copy the context)."""
    watch = CommitWatch(_COMMIT_WATCH.get())
    token = _COMMIT_WATCH.set(watch)
    try:
        yield watch
    finally:
        _COMMIT_WATCH.reset(token)


@contextlib.asynccontextmanager
async def transaction(maker: async_sessionmaker[AsyncSession]) -> AsyncIterator[AsyncSession]:
    """One explicit transaction: commit on success, roll back on any error (or cancellation)."""
    with wrap_exceptions():
        async with maker() as session, session.begin():
            yield session
            # The body ended without an error: COMMIT goes out next. From here a cancellation
            # leaves the outcome unknown (see CommitWatch).
            watch = _COMMIT_WATCH.get()
            if watch is not None:
                watch.mark()


async def ensure_database(database_url: str) -> bool:
    """Create the database named in ``database_url`` if it does not exist. Returns True if created.

    Raises:
        StoreUnavailable: the server cannot be reached.
    """
    url = async_url(database_url)
    name = url.database
    if not name:
        raise ConfigurationError("DATABASE_URL names no database")
    admin = url.set(drivername="postgresql", database="postgres")
    with wrap_exceptions():
        conn = await asyncpg.connect(admin.render_as_string(hide_password=False), timeout=10)
        try:
            exists = await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name)
            if exists:
                return False
            quoted = '"' + name.replace('"', '""') + '"'
            try:
                await conn.execute(f"CREATE DATABASE {quoted}")
            except asyncpg.DuplicateDatabaseError:
                return False  # created concurrently by another process
            return True
        finally:
            await conn.close()


def _alembic_config(connection: Connection | None = None) -> Any:
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.attributes["connection"] = connection
    return cfg


async def upgrade(engine: AsyncEngine, revision: str = "heads") -> None:
    """Apply migrations up to ``revision`` (all heads by default), in one transaction."""
    from alembic import command

    def _run(sync_conn: Connection) -> None:
        command.upgrade(_alembic_config(sync_conn), revision)

    with wrap_exceptions():
        async with engine.begin() as conn:
            await conn.run_sync(_run)


@contextlib.contextmanager
def _quiet_alembic() -> Iterator[None]:
    """Keep alembic's set-up lines ("setup plugin ...", "Context impl ...") out of a process's
    log while it only reads revisions: at info, they bury the one line that matters."""
    loggers = [logging.getLogger(name) for name in ("alembic.runtime.plugins", "alembic.runtime.migration")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(max(lg.getEffectiveLevel(), logging.WARNING))
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


async def current_revisions(engine: AsyncEngine) -> set[str]:
    """The revisions the database is at (empty if never migrated)."""

    def _heads(sync_conn: Connection) -> set[str]:
        with _quiet_alembic():  # the import too: alembic logs its plugins' set-up on first import
            from alembic.runtime.migration import MigrationContext

            return set(MigrationContext.configure(sync_conn).get_current_heads())

    with wrap_exceptions():
        async with engine.connect() as conn:
            return await conn.run_sync(_heads)


def head_revisions() -> set[str]:
    """The revisions this code expects."""
    with _quiet_alembic():
        from alembic.script import ScriptDirectory

        return set(ScriptDirectory.from_config(_alembic_config()).get_heads())


async def require_schema(engine: AsyncEngine) -> None:
    """Refuse to go on unless the database is at the migrations' head.

    Raises:
        SchemaMissing: no keyrotor schema at all, or one without some migration (named);
            either way the fix is ``keyrotor db upgrade``.
        StoreUnavailable: the database cannot be reached.
    """
    current = await current_revisions(engine)
    if not current:  # never upgraded: no migration is "missing", they all are
        raise SchemaMissing("the database has no keyrotor schema: run `keyrotor db upgrade`")
    missing = head_revisions() - current
    if missing:
        raise SchemaMissing(
            f"the database schema is not up to date (missing {', '.join(sorted(missing))}): "
            "run `keyrotor db upgrade`"
        )
