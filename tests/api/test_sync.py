"""keyrotor.sync.KeyManager: the same methods, blocking, from many threads at once."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import asyncpg
import pytest

from keyrotor import KeyManager as AsyncKeyManager
from keyrotor import Settings
from keyrotor.audit.log import actor_context
from keyrotor.errors import (
    CallTimedOut,
    ConfigurationError,
    DecryptionFailed,
    ManagerForked,
    SecretNotFound,
    TransientError,
)
from keyrotor.kek.factory import open_provider
from keyrotor.sync import KeyManager

ROOT = Path(__file__).resolve().parents[2]


def test_round_trips_and_errors(settings: Settings) -> None:
    with KeyManager(settings) as km:
        ct = km.encrypt("openai", "sk-1", context="settings.api_key:1")
        assert km.decrypt("openai", ct, context="settings.api_key:1") == "sk-1"
        with pytest.raises(DecryptionFailed):
            km.decrypt("openai", ct, context="settings.api_key:2")
        km.put_secret("openai", "prod", "sk-2")
        assert km.get_secret("openai", "prod") == "sk-2"
        assert km.put_secrets("openai", [("a", "1"), ("b", "2")]) == 2
        with pytest.raises(SecretNotFound):
            km.get_secret("openai", "missing")
    with pytest.raises(ConfigurationError):
        km.encrypt("openai", "x")
    km.close()  # idempotent


def test_safe_from_threads_and_read_by_the_async_manager(settings: Settings) -> None:
    with KeyManager(settings) as km:

        def work(i: int) -> tuple[int, str]:
            with actor_context(f"worker-{i % 3}"):
                ct = km.encrypt("tenant-1/openai", f"sk-{i}", context=f"c:{i}")
                assert km.decrypt("tenant-1/openai", ct, context=f"c:{i}") == f"sk-{i}"
                return i, ct

        with ThreadPoolExecutor(8) as pool:
            written = list(pool.map(work, range(64)))

    async def check() -> None:
        async with AsyncKeyManager(settings) as akm:
            for i, ct in written:
                assert await akm.decrypt("tenant-1/openai", ct, context=f"c:{i}") == f"sk-{i}"
        conn = await asyncpg.connect(settings.database_url)
        try:
            actors = await conn.fetch(
                "SELECT DISTINCT actor FROM encryption_audit_log WHERE event_type = 'encrypt'"
            )
        finally:
            await conn.close()
        assert {r["actor"] for r in actors} == {"worker-0", "worker-1", "worker-2"}

    asyncio.run(check())


def test_a_call_that_times_out_is_cancelled_not_left_to_finish(settings: Settings) -> None:
    """``timeout_s`` ends the call, not only the wait: a ``put_secret`` that raised TimeoutError
    must not write its value later, behind the caller's back (a retry with a newer value could
    otherwise be overwritten by the one the caller was told had failed)."""

    async def lock_secrets(locked: threading.Event, release: threading.Event) -> None:
        conn = await asyncpg.connect(settings.database_url)
        try:
            async with conn.transaction():
                await conn.execute("LOCK TABLE secrets IN ACCESS EXCLUSIVE MODE")
                locked.set()
                await asyncio.to_thread(release.wait, 30)
        finally:
            await conn.close()

    async def stored() -> str:
        async with AsyncKeyManager(settings) as akm:
            return await akm.get_secret("openai", "prod")

    with KeyManager(settings, timeout_s=0.5) as km:
        km.put_secret("openai", "prod", "sk-old")
        locked, release = threading.Event(), threading.Event()
        holder = threading.Thread(target=asyncio.run, args=(lock_secrets(locked, release),))
        holder.start()
        try:
            assert locked.wait(10)
            with pytest.raises(CallTimedOut) as timed_out:
                km.put_secret("openai", "prod", "sk-timed-out")
            # keyrotor's own error, retryable, and still what `except TimeoutError` catches
            assert isinstance(timed_out.value, TransientError) and isinstance(timed_out.value, TimeoutError)
            assert "0.5 s" in str(timed_out.value) and "sk-" not in repr(timed_out.value)
        finally:
            release.set()
            holder.join(30)
        deadline = time.monotonic() + 2.0  # long enough for a write left running to land
        while time.monotonic() < deadline:
            assert asyncio.run(stored()) == "sk-old"
            time.sleep(0.2)
        km.put_secret("openai", "prod", "sk-new")  # the manager still works
        assert km.get_secret("openai", "prod") == "sk-new"


def test_the_same_methods_as_the_async_manager(settings: Settings) -> None:
    """README: ``keyrotor.sync.KeyManager``, the same methods: every public coroutine method of
    the async manager has a blocking twin, and ``decrypt_many`` answers as the async one does."""
    public = {
        name
        for name in dir(AsyncKeyManager)
        if not name.startswith("_") and asyncio.iscoroutinefunction(getattr(AsyncKeyManager, name))
    }
    assert public - {"open", "close"} <= set(dir(KeyManager)), public - set(dir(KeyManager))
    with KeyManager(settings) as km:
        ct = km.encrypt("openai", "sk-1", context="c:1")
        results = km.decrypt_many("openai", [(ct, "c:1"), (ct, "c:2")])
        assert results[0] == "sk-1" and isinstance(results[1], DecryptionFailed)


def _run_forked(env: dict[str, str], **extra: str) -> subprocess.CompletedProcess[str]:
    full_env = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(ROOT), **env, **extra}
    return subprocess.run(
        [sys.executable, "-m", "tests.api.forked"],
        env=full_env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,  # each call inside has a 10 s deadline; this bounds the whole scenario
    )


@pytest.mark.parametrize(("child_closes", "child_aborts"), [("0", "0"), ("1", "0"), ("0", "1")])
def test_a_forked_child_gets_a_manager_of_its_own(
    env: dict[str, str], child_closes: str, child_aborts: str
) -> None:
    """A prefork server (gunicorn --preload, celery) forks after the manager was made. In the
    child the inherited manager works, on a loop, connections and KEK provider of its own; and
    neither its use, nor the child's exit (closed or not), nor the inherited connections being
    torn down there as their finalizers would, disturbs the parent's connections."""
    done = _run_forked(env, FORKED_CHILD_CLOSES=child_closes, FORKED_CHILD_ABORTS=child_aborts)
    lines = done.stdout.splitlines()
    assert done.returncode == 0, (lines, done.stderr[-3000:])
    assert lines == ["child: ok", "parent: child exited 0", "parent: ok"], lines


def _call_in_child(km: KeyManager, answers: multiprocessing.Queue[str]) -> None:
    try:
        km.encrypt("openai", "sk-child")
        answers.put("ok")
    except Exception as exc:
        answers.put(f"{type(exc).__name__}: {exc}")
    try:
        km.encrypt("openai", "sk-child")
    except Exception as exc:
        answers.put(type(exc).__name__)


def test_a_manager_given_a_kek_provider_refuses_to_cross_a_fork(settings: Settings) -> None:
    """A provider the caller made may hold the parent's connections (an AWS or Vault client), so
    the child gets a clear ManagerForked saying where to make the manager, call after call,
    instead of a hang; the parent's manager goes on working."""
    kek = asyncio.run(open_provider(settings))
    with KeyManager(settings, kek=kek, timeout_s=10) as km:
        km.encrypt("openai", "sk-parent")
        fork = multiprocessing.get_context("fork")
        answers: multiprocessing.Queue[str] = fork.Queue()
        child = fork.Process(target=_call_in_child, args=(km, answers))
        child.start()
        try:
            first, second = answers.get(timeout=30), answers.get(timeout=30)
        finally:
            child.join(30)
            if child.is_alive():
                child.kill()
        assert first.startswith("ManagerForked: ") and "post_fork" in first, first
        assert second == "ManagerForked"
        assert issubclass(ManagerForked, ConfigurationError)
        ct = km.encrypt("openai", "sk-parent")
        assert km.decrypt("openai", ct) == "sk-parent"


def test_from_env_takes_the_managers_own_arguments(env: dict[str, str]) -> None:
    """``from_env(timeout_s=...)`` sets the call deadline; it is not handed to ``Settings``,
    which would drop it without a word and leave the 60 s default."""
    with KeyManager.from_env(env, timeout_s=0.5) as km:
        assert km.timeout_s == 0.5
