"""Real servers for the KEK tests: moto (AWS KMS and Secrets Manager) and an OpenBao dev server.

Each runs as a subprocess on a free loopback port; nothing is mocked. Fixtures:

- ``moto_server`` and ``bao_server`` (session): one shared server each, ready to use, stopped at
  the end. Tests create their own keys and secrets (unique names) so they never interfere.
- ``spawn_server`` (function): starts a dedicated server a test may ``stop()``, ``start()``
  again, ``pause()`` (SIGSTOP: connections hang, as behind a dead network path) and
  ``resume()``, for outage tests. Stopped at the end of the test.

If a server cannot run here, the tests that need it are skipped with the reason (and a warning),
never silently.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import boto3
import hvac
import pytest

from keyrotor.kek.aws_secret_material import new_secret_string, rotation_token

_BIN = Path(sys.executable).parent
MOTO_SERVER = shutil.which("moto_server", path=str(_BIN)) or shutil.which("moto_server")
BAO = shutil.which("bao", path=str(_BIN)) or shutil.which("bao")

AWS_REGION = "us-east-1"
AWS_ACCESS_KEY_ID = "testing"
AWS_SECRET_ACCESS_KEY = "testing"  # moto accepts any credentials
BAO_ROOT_TOKEN = "keyrotor-test-root"
BAO_POLICY = "keyrotor-transit"


class ServerUnavailable(RuntimeError):
    """A test server did not start."""


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port(*, pair: bool = False) -> int:
    """A free loopback port (with ``pair``: one whose successor is free too)."""
    for _ in range(200):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        if not pair or (port < 65535 and _port_free(port + 1)):
            return port
    raise ServerUnavailable("no free loopback port")


def dead_endpoint() -> str:
    """A loopback URL nothing listens on (connections are refused at once)."""
    return f"http://127.0.0.1:{free_port()}"


@dataclass
class ServerProcess:
    """One server subprocess; restartable on the same port."""

    kind: Literal["moto", "bao"]
    port: int
    workdir: Path
    proc: subprocess.Popen[bytes] | None = None
    paused: bool = False
    starts: int = 0
    _log: Any = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _argv(self) -> list[str]:
        if self.kind == "moto":
            assert MOTO_SERVER
            return [MOTO_SERVER, "-H", "127.0.0.1", "-p", str(self.port)]
        assert BAO
        return [
            BAO,
            "server",
            "-dev",
            f"-dev-root-token-id={BAO_ROOT_TOKEN}",
            f"-dev-listen-address=127.0.0.1:{self.port}",
            "-dev-no-store-token",
        ]

    def _ready(self) -> bool:
        path = "/moto-api/" if self.kind == "moto" else "/v1/sys/health"
        try:
            with urllib.request.urlopen(self.url + path, timeout=1) as response:  # noqa: S310 (loopback)
                return bool(response.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def log_tail(self, lines: int = 20) -> str:
        path = self.workdir / f"{self.kind}.log"
        if not path.exists():
            return ""
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    def start(self, timeout_s: float = 30.0) -> ServerProcess:
        """Start the server (state starts empty; bao gets transit and AppRole) and wait until it answers."""
        env = {**os.environ, "HOME": str(self.workdir)}  # bao dev writes nothing outside it
        for name in ("VAULT_ADDR", "VAULT_TOKEN", "BAO_ADDR", "BAO_TOKEN", "AWS_ENDPOINT_URL"):
            env.pop(name, None)
        self._log = open(self.workdir / f"{self.kind}.log", "ab")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(
            self._argv(), stdout=self._log, stderr=subprocess.STDOUT, env=env, cwd=self.workdir
        )
        self.starts += 1
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            if self._ready():
                if self.kind == "bao":
                    prepare_bao(self)  # a dev server starts empty, also after a restart
                return self
            time.sleep(0.05)
        self.stop()
        raise ServerUnavailable(f"{self.kind} did not become ready on {self.url}:\n{self.log_tail()}")

    def stop(self) -> None:
        """Terminate the server (SIGTERM, then SIGKILL after 5 s). Its state is lost."""
        if self.proc is not None:
            if self.paused:
                self.resume()
            if self.proc.poll() is None:
                self.proc.terminate()
                try:
                    self.proc.wait(5)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(5)
            self.proc = None
        if self._log is not None:
            self._log.close()
            self._log = None

    def pause(self) -> None:
        """SIGSTOP: the port still accepts connections, but nothing answers (timeouts)."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)
        self.paused = True

    def resume(self) -> None:
        """SIGCONT after :meth:`pause`; the server carries on with its state."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)
        self.paused = False


def launch(kind: Literal["moto", "bao"], workdir: Path, attempts: int = 3) -> ServerProcess:
    """Start a server of ``kind`` on a free port (retrying on another port if one is taken)."""
    binary = MOTO_SERVER if kind == "moto" else BAO
    if binary is None:
        raise ServerUnavailable(f"no {'moto_server' if kind == 'moto' else 'bao'} executable found")
    error: ServerUnavailable | None = None
    for _ in range(attempts):
        # bao dev also binds a cluster listener on port + 1.
        server = ServerProcess(kind, free_port(pair=kind == "bao"), workdir)
        try:
            server.start()
        except ServerUnavailable as exc:
            error = exc
            continue
        return server
    assert error is not None
    raise error


def _skip(kind: str, exc: Exception) -> None:
    reason = f"{kind} server cannot run here, skipping its provider tests: {exc}"
    warnings.warn(reason, stacklevel=2)
    pytest.skip(reason)


# --- moto ------------------------------------------------------------------------------------


def aws_client(server: ServerProcess, service: str, region: str = AWS_REGION) -> Any:
    """A synchronous boto3 client on moto, for test set-up."""
    return boto3.client(
        service,
        region_name=region,
        endpoint_url=server.url,
        aws_access_key_id=AWS_ACCESS_KEY_ID,
        aws_secret_access_key=AWS_SECRET_ACCESS_KEY,
    )


def aws_env(server: ServerProcess, **extra: str) -> dict[str, str]:
    """The variables of an ``aws`` provider talking to ``server``."""
    return {
        "AWS_SECRETS_REGION": AWS_REGION,
        "AWS_ENDPOINT_URL": server.url,
        "AWS_ACCESS_KEY_ID": AWS_ACCESS_KEY_ID,
        "AWS_SECRET_ACCESS_KEY": AWS_SECRET_ACCESS_KEY,
        **extra,
    }


def create_kms_key(server: ServerProcess, region: str = AWS_REGION) -> str:
    """A new symmetric KMS key on moto; returns its ARN."""
    meta = aws_client(server, "kms", region).create_key(Description="keyrotor test KEK")["KeyMetadata"]
    return str(meta["Arn"])


def create_kek_secret(
    server: ServerProcess, *, region: str = AWS_REGION, replica_regions: tuple[str, ...] = ()
) -> str:
    """A new KEK secret (version 1, with its rotation token as VersionId) on moto; returns its name."""
    name = f"keyrotor-kek-{uuid.uuid4().hex[:10]}"
    kwargs: dict[str, Any] = {
        "Name": name,
        "SecretString": new_secret_string(1),
        "ClientRequestToken": rotation_token(name, 1),
    }
    if replica_regions:
        kwargs["AddReplicaRegions"] = [{"Region": r} for r in replica_regions]
    aws_client(server, "secretsmanager", region).create_secret(**kwargs)
    return name


# --- OpenBao ---------------------------------------------------------------------------------


def bao_root(server: ServerProcess, namespace: str | None = None) -> hvac.Client:
    """An hvac client with the dev root token."""
    return hvac.Client(url=server.url, token=BAO_ROOT_TOKEN, namespace=namespace, timeout=10)


def prepare_bao(server: ServerProcess) -> None:
    """Mount transit, enable AppRole and write the policy the provider needs."""
    root = bao_root(server)
    root.sys.enable_secrets_engine("transit", path="transit")
    root.sys.enable_auth_method("approle")
    root.sys.create_or_update_policy(
        BAO_POLICY,
        'path "transit/keys/*" { capabilities = ["create", "read", "update"] }\n'
        'path "transit/encrypt/*" { capabilities = ["update"] }\n'
        'path "transit/decrypt/*" { capabilities = ["update"] }\n'
        'path "transit/rewrap/*" { capabilities = ["update"] }\n',
    )


def bao_approle(server: ServerProcess, *, ttl: str = "1h", max_ttl: str = "4h") -> tuple[str, str]:
    """A new AppRole with the transit policy and these token TTLs; returns (role_id, secret_id)."""
    root = bao_root(server)
    role = f"keyrotor-{uuid.uuid4().hex[:8]}"
    root.auth.approle.create_or_update_approle(
        role, token_policies=[BAO_POLICY], token_ttl=ttl, token_max_ttl=max_ttl
    )
    role_id = root.auth.approle.read_role_id(role)["data"]["role_id"]
    secret_id = root.auth.approle.generate_secret_id(role)["data"]["secret_id"]
    return str(role_id), str(secret_id)


def vault_env(server: ServerProcess, **extra: str) -> dict[str, str]:
    """The variables of a ``vault`` provider on ``server`` with the root token and a fresh key."""
    return {
        "VAULT_ADDR": server.url,
        "VAULT_TOKEN": BAO_ROOT_TOKEN,
        "VAULT_TRANSIT_KEY": f"kek-{uuid.uuid4().hex[:10]}",
        **extra,
    }


# --- fixtures --------------------------------------------------------------------------------


def _session_server(kind: Literal["moto", "bao"], factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    try:
        server = launch(kind, factory.mktemp(f"session-{kind}"))
    except (ServerUnavailable, OSError) as exc:
        _skip(kind, exc)
        raise AssertionError("unreachable") from exc
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def moto_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """The session's moto server (KMS and Secrets Manager, all regions on one endpoint)."""
    yield from _session_server("moto", tmp_path_factory)


@pytest.fixture(scope="session")
def bao_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """The session's OpenBao dev server, with transit mounted and AppRole enabled."""
    yield from _session_server("bao", tmp_path_factory)


@pytest.fixture
def spawn_server(tmp_path: Path) -> Iterator[Callable[[Literal["moto", "bao"]], ServerProcess]]:
    """Start dedicated servers for one test (to stop, restart, pause); all stopped afterwards."""
    started: list[ServerProcess] = []

    def spawn(kind: Literal["moto", "bao"]) -> ServerProcess:
        directory = tmp_path / f"{kind}-{len(started)}"
        directory.mkdir()
        try:
            server = launch(kind, directory)
        except (ServerUnavailable, OSError) as exc:
            _skip(kind, exc)
            raise AssertionError("unreachable") from exc
        started.append(server)
        return server

    yield spawn
    for server in started:
        with contextlib.suppress(Exception):
            server.stop()
