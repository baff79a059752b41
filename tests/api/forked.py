"""A process that makes a ``keyrotor.sync.KeyManager``, forks, and uses it on both sides.

Run as ``python -m tests.api.forked`` with a keyrotor environment; the parent prints one line a
step and exits 0 when every step passed. The child leaves as a prefork worker (gunicorn, celery)
does: through the interpreter's own shutdown, which finalizes whatever it inherited, so a child
that touched the parent's connections on its way out shows as a parent that hangs afterwards.
"""

from __future__ import annotations

import os
import sys

from keyrotor import sync
from keyrotor.settings import Settings
from keyrotor.sync import KeyManager

CALL_TIMEOUT_S = 10.0


def child(km: KeyManager, ct: str) -> int:
    try:
        assert km.decrypt("forked", ct, context="c:parent") == "sk-parent"
        mine = km.encrypt("forked", "sk-child", context="c:child")
        assert km.decrypt("forked", mine, context="c:child") == "sk-child"
        km.put_secret("forked", "from-child", "sk-child-secret")
    except Exception as exc:  # the test reads the line
        print(f"child: {type(exc).__name__}: {exc}", flush=True)
        return 1
    print("child: ok", flush=True)
    return 0


def main() -> int:
    km = KeyManager(Settings.from_env(), timeout_s=CALL_TIMEOUT_S)
    ct = km.encrypt("forked", "sk-parent", context="c:parent")  # the pools hold live connections
    pid = os.fork()
    if pid == 0:
        code = child(km, ct)
        if os.environ.get("FORKED_CHILD_ABORTS") == "1":
            # What the finalizer of an inherited connection does when it is collected in the
            # child (asyncpg's and redis's __del__: terminate, then transport.abort()).
            for loop, _, _ in sync._INHERITED:
                for transport in list(getattr(loop, "_transports").values()):  # noqa: B009
                    transport.abort()
        if os.environ.get("FORKED_CHILD_CLOSES") == "1":
            km.close()
        del km
        sys.exit(code)  # a normal exit: the interpreter finalizes what the child holds
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    print(f"parent: child exited {code}", flush=True)
    # The parent's own connections must have come through the child's life and death.
    for i in range(5):
        assert km.decrypt("forked", ct, context="c:parent") == "sk-parent"
        if code == 0:
            assert km.get_secret("forked", "from-child") == "sk-child-secret"
        km.encrypt("forked", f"sk-{i}", context=f"c:{i}")
    km.close()
    print("parent: ok", flush=True)
    return 0 if code == 0 else 2


if __name__ == "__main__":
    sys.exit(main())
