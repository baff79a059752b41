"""Resilience: retries, timeouts, circuit breaker, rate budget, error translation, metrics.

The state machine and the translation are tested with plain fakes (a flaky coroutine, a fake
clock, real client exception objects); outages and rate budgets against real servers.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from typing import Literal

import hvac.exceptions as hv
import pytest
import requests
from aiolimiter import AsyncLimiter
from botocore.exceptions import ClientError, EndpointConnectionError, ParamValidationError

from keyrotor.errors import ConfigurationError, KekError, KekUnavailable, KeyrotorError, QueueUnavailable
from keyrotor.kek.aws_client import aws_error_code, aws_translator
from keyrotor.kek.base import WrapContext
from keyrotor.kek.metrics import KEK_CIRCUIT_OPEN
from keyrotor.kek.remote import open_remote_provider
from keyrotor.kek.resilience import (
    CircuitBreaker,
    CircuitOpen,
    Concealed,
    Resilience,
    ResiliencePolicy,
    Throttled,
)
from keyrotor.kek.vault_client import vault_translator
from tests.kek.conftest import fast_policy
from tests.servers import ServerProcess, aws_env, create_kms_key, vault_env

CTX = WrapContext("tenant-1/openai", 1)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class RecordingObserver:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str, str]] = []
        self.attempts: list[tuple[str, str, str]] = []
        self.circuit: list[str] = []

    def call_finished(self, provider: str, operation: str, outcome: str, seconds: float) -> None:
        self.calls.append((provider, operation, outcome))

    def attempt_failed(self, provider: str, operation: str, outcome: str) -> None:
        self.attempts.append((provider, operation, outcome))

    def circuit_changed(self, provider: str, state: str) -> None:
        self.circuit.append(state)

    def failed_over(self, provider: str, operation: str) -> None:
        pass


def translate(exc: BaseException, operation: str) -> KeyrotorError | None:
    if isinstance(exc, ConnectionRefusedError):
        return KekUnavailable(f"fake {operation}: connection refused")
    if isinstance(exc, OverflowError):
        return Throttled(f"fake {operation}: throttled")
    if isinstance(exc, PermissionError):
        return KekError(f"fake {operation}: access denied")
    return None


class Flaky:
    """Fails with ``errors`` in turn, then returns "ok"."""

    def __init__(self, *errors: BaseException, delay_s: float = 0.0) -> None:
        self.errors = list(errors)
        self.delay_s = delay_s
        self.attempts = 0

    async def __call__(self) -> str:
        self.attempts += 1
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        if self.errors:
            raise self.errors.pop(0)
        return "ok"


def resilience(observer: RecordingObserver | None = None, **policy: float | int) -> Resilience:
    return Resilience("fake", fast_policy(**policy), translate, observer=observer or RecordingObserver())


# --- the state machine, with fakes ----------------------------------------------------------


def state_of(breaker: CircuitBreaker) -> str:
    """The state, read through a call: mypy would keep narrowing ``breaker.state`` across calls."""
    return breaker.state


def test_breaker_opens_after_threshold_then_half_opens_then_closes() -> None:
    clock = FakeClock()
    states: list[str] = []
    breaker = CircuitBreaker("fake", threshold=3, cooldown_s=10, clock=clock, on_change=states.append)
    for _ in range(2):
        assert breaker.acquire() is False
        breaker.record_failure(False)
    assert state_of(breaker) == "closed"
    breaker.record_failure(breaker.acquire())
    assert state_of(breaker) == "open"
    with pytest.raises(CircuitOpen, match="3 consecutive"):
        breaker.acquire()
    clock.now += 10
    probe = breaker.acquire()
    assert probe is True and state_of(breaker) == "half_open"
    with pytest.raises(CircuitOpen, match="probe"):  # one probe at a time
        breaker.acquire()
    breaker.record_failure(probe)  # failed probe: open again for a full cool-down
    assert state_of(breaker) == "open"
    clock.now += 9.9
    with pytest.raises(CircuitOpen):
        breaker.acquire()
    clock.now += 0.1
    breaker.record_success(breaker.acquire())
    assert state_of(breaker) == "closed" and breaker.consecutive_failures == 0
    assert states == ["open", "half_open", "open", "half_open", "closed"]


def test_a_permanent_error_resets_the_breaker() -> None:
    breaker = CircuitBreaker("fake", threshold=2, cooldown_s=10)
    breaker.record_failure(breaker.acquire())
    breaker.record_success(breaker.acquire())  # the provider answered, if with a refusal
    breaker.record_failure(breaker.acquire())
    assert state_of(breaker) == "closed"


async def test_transient_errors_are_retried_then_succeed() -> None:
    observer = RecordingObserver()
    flaky = Flaky(ConnectionRefusedError(), OverflowError())
    assert await resilience(observer).call("encrypt", flaky) == "ok"
    assert flaky.attempts == 3
    assert observer.attempts == [("fake", "encrypt", "unavailable"), ("fake", "encrypt", "throttled")]
    assert observer.calls == [("fake", "encrypt", "ok")]


async def test_transient_errors_give_up_after_max_attempts() -> None:
    observer = RecordingObserver()
    flaky = Flaky(*(ConnectionRefusedError() for _ in range(5)))
    with pytest.raises(KekUnavailable, match="fake encrypt: connection refused") as info:
        await resilience(observer, max_attempts=3).call("encrypt", flaky)
    assert isinstance(info.value.__cause__, ConnectionRefusedError)
    assert flaky.attempts == 3
    assert observer.calls == [("fake", "encrypt", "unavailable")]


async def test_permanent_errors_are_not_retried() -> None:
    observer = RecordingObserver()
    flaky = Flaky(PermissionError())
    with pytest.raises(KekError, match="access denied"):
        await resilience(observer).call("decrypt", flaky)
    assert flaky.attempts == 1
    assert observer.calls == [("fake", "decrypt", "error")]


async def test_non_idempotent_calls_are_tried_once() -> None:
    flaky = Flaky(ConnectionRefusedError())
    with pytest.raises(KekUnavailable):
        await resilience().call("rotate", flaky, retry=False)
    assert flaky.attempts == 1


async def test_each_attempt_has_a_timeout() -> None:
    observer = RecordingObserver()
    flaky = Flaky(delay_s=1.0)
    started = time.monotonic()
    with pytest.raises(KekUnavailable, match=r"no answer within 0\.05s"):
        await resilience(observer, timeout_s=0.05, max_attempts=2).call("encrypt", flaky)
    assert time.monotonic() - started < 0.5
    assert observer.attempts == [("fake", "encrypt", "timeout")] * 2


async def test_unknown_exceptions_propagate_untouched() -> None:
    with pytest.raises(ZeroDivisionError):
        await resilience().call("encrypt", Flaky(ZeroDivisionError()))


async def test_open_circuit_fails_fast_without_calling() -> None:
    observer = RecordingObserver()
    guard = resilience(observer, breaker_threshold=2, max_attempts=1, breaker_cooldown_s=60)
    for _ in range(2):
        with pytest.raises(KekUnavailable):
            await guard.call("encrypt", Flaky(ConnectionRefusedError()))
    flaky = Flaky()
    with pytest.raises(CircuitOpen):
        await guard.call("encrypt", flaky)
    assert flaky.attempts == 0
    assert observer.calls[-1] == ("fake", "encrypt", "circuit_open")
    assert observer.circuit == ["open"]


# --- error translation, with the clients' real exception objects ----------------------------


def client_error(code: str, status: int = 400, message: str = "") -> ClientError:
    return ClientError(
        {"Error": {"Code": code, "Message": message}, "ResponseMetadata": {"HTTPStatusCode": status}},
        "Encrypt",
    )


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (client_error("ThrottlingException", message="Rate exceeded"), Throttled),
        (client_error("TooManyRequestsException", 429), Throttled),
        (client_error("KMSInternalException", 500), KekUnavailable),
        (client_error("KeyUnavailableException", 500), KekUnavailable),
        (client_error("InternalServiceError", 500), KekUnavailable),
        (client_error("SomethingNew", 503), KekUnavailable),
        (client_error("AccessDeniedException"), KekError),
        (client_error("InvalidCiphertextException"), KekError),
        (client_error("DisabledException"), KekError),
        (client_error("KMSInvalidStateException"), KekError),
        (client_error("NotFoundException"), KekError),
        (client_error("LimitExceededException"), KekError),
        (EndpointConnectionError(endpoint_url="http://127.0.0.1:1"), KekUnavailable),
    ],
)
def test_aws_errors_are_classified(exc: BaseException, expected: type[KeyrotorError]) -> None:
    error = aws_translator("aws-kms (us-east-1)")(exc, "encrypt")
    assert type(error) is expected
    assert str(error).startswith("aws-kms (us-east-1) encrypt")


@pytest.mark.parametrize(
    ("exc", "code"),
    [
        (client_error("UnrecognizedClientException", message="The security token is invalid."), None),
        (client_error("ExpiredTokenException", message="The security token has expired."), None),
        # An XML error body for a JSON-protocol call (moto): botocore's code is the HTTP status.
        (
            client_error(
                "403",
                message="<?xml version='1.0'?><ErrorResponse><Errors><Error><Code>SignatureDoesNotMatch"
                "</Code><Message>Check your AWS Secret Access Key</Message></Error></Errors></ErrorResponse>",
            ),
            "SignatureDoesNotMatch",
        ),
    ],
)
def test_aws_refused_credentials_say_so(exc: ClientError, code: str | None) -> None:
    error = aws_translator("aws-kms (us-east-1)")(exc, "encrypt")
    assert type(error) is KekError
    expected = code or exc.response["Error"]["Code"]
    assert str(error).startswith(f"aws-kms (us-east-1) encrypt: {expected}: AWS refused the credentials")
    assert aws_error_code(KekError("x")) is None
    wrapped = KekError("wrapped")
    wrapped.__cause__ = exc
    assert aws_error_code(wrapped) == expected


def test_aws_parameter_errors_do_not_quote_values() -> None:
    error = aws_translator("aws-kms")(
        ParamValidationError(report="Plaintext: b'super-secret-dek'"), "encrypt"
    )
    # Concealed: Resilience raises the KekError with neither cause nor context.
    assert isinstance(error, Concealed) and isinstance(error.error, KekError)
    assert "super-secret" not in str(error.error)


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (hv.RateLimitExceeded("slow down"), Throttled),
        (hv.VaultDown("sealed"), KekUnavailable),
        (hv.InternalServerError("boom"), KekUnavailable),
        (hv.BadGateway(), KekUnavailable),
        (requests.exceptions.ConnectionError("refused"), KekUnavailable),
        (requests.exceptions.ReadTimeout("slow"), KekUnavailable),
        (hv.Forbidden("permission denied"), KekError),
        (hv.InvalidRequest("cipher: message authentication failed"), KekError),
        (hv.InvalidPath(), KekError),
    ],
)
def test_vault_errors_are_classified(exc: BaseException, expected: type[KeyrotorError]) -> None:
    error = vault_translator("vault (http://127.0.0.1:8200)")(exc, "decrypt")
    assert type(error) is expected
    assert str(error).startswith("vault (http://127.0.0.1:8200) decrypt")


# --- outages of real servers -----------------------------------------------------------------


Spawn = Callable[[Literal["moto", "bao"]], ServerProcess]


def circuit_gauge(provider: str) -> float:
    return KEK_CIRCUIT_OPEN.labels(provider)._value.get()


async def test_stopped_vault_fails_fast_through_the_circuit_breaker(spawn_server: Spawn) -> None:
    bao = spawn_server("bao")
    policy = fast_policy(timeout_s=1.0, max_attempts=2, breaker_threshold=3, breaker_cooldown_s=60)
    provider = await open_remote_provider("vault", vault_env(bao), policy=policy)
    try:
        wrapped = await provider.wrap(os.urandom(32), CTX)
        bao.stop()
        with pytest.raises(KekUnavailable) as first:  # two refused attempts
            await provider.unwrap(wrapped, CTX)
        assert not isinstance(first.value, CircuitOpen)
        with pytest.raises(CircuitOpen):  # third failure opens the circuit mid-call
            await provider.unwrap(wrapped, CTX)
        assert circuit_gauge("vault") == 1
        took: list[float] = []
        for _ in range(20):
            started = time.monotonic()
            with pytest.raises(CircuitOpen, match="circuit open"):
                await provider.unwrap(wrapped, CTX)
            took.append(time.monotonic() - started)
        # No request, no thread hop: the typical refusal is immediate. The median, not the worst,
        # since a test process beside another one can be descheduled for a moment mid-call.
        assert sorted(took)[len(took) // 2] < 0.02, took
    finally:
        await provider.aclose()


async def test_hung_kms_times_out_then_recovers_via_half_open(spawn_server: Spawn) -> None:
    moto = spawn_server("moto")
    env = aws_env(moto, AWS_KMS_KEY_ID=create_kms_key(moto))
    policy = fast_policy(timeout_s=0.3, max_attempts=1, breaker_threshold=2, breaker_cooldown_s=0.5)
    provider = await open_remote_provider("aws", env, policy=policy)
    try:
        dek = os.urandom(32)
        wrapped = await provider.wrap(dek, CTX)
        moto.pause()  # connections are accepted, nothing answers
        for _ in range(2):
            started = time.monotonic()
            with pytest.raises(KekUnavailable, match=r"no answer within 0\.3s"):
                await provider.unwrap(wrapped, CTX)
            assert time.monotonic() - started < 1.0
        with pytest.raises(CircuitOpen):
            await provider.unwrap(wrapped, CTX)
        assert circuit_gauge("aws-kms") == 1
        moto.resume()
        await asyncio.sleep(0.55)  # cool-down over: the next call is the half-open probe
        assert await provider.unwrap(wrapped, CTX) == dek
        assert circuit_gauge("aws-kms") == 0
        await provider.check()
    finally:
        await provider.aclose()


# --- rate budget -----------------------------------------------------------------------------


async def test_rate_budget_is_honoured(moto_server: ServerProcess) -> None:
    env = aws_env(moto_server, AWS_KMS_KEY_ID=create_kms_key(moto_server))
    provider = await open_remote_provider("aws", env, policy=fast_policy(rate_limit=10, rate_period_s=1.0))
    try:
        started = time.monotonic()
        await asyncio.gather(*(provider.wrap(os.urandom(32), CTX) for _ in range(25)))
        elapsed = time.monotonic() - started
    finally:
        await provider.aclose()
    # A burst of 10, then 15 more at 10/s.
    assert 1.3 <= elapsed < 6, elapsed


async def test_a_shared_budget_spans_providers(moto_server: ServerProcess) -> None:
    # KMS quotas are per account and region: two providers on one quota share one limiter.
    shared = AsyncLimiter(10, 1.0)
    providers = [
        await open_remote_provider(
            "aws",
            aws_env(moto_server, AWS_KMS_KEY_ID=create_kms_key(moto_server)),
            policy=fast_policy(),
            limiter=shared,
        )
        for _ in range(2)
    ]
    try:
        started = time.monotonic()
        await asyncio.gather(*(providers[i % 2].wrap(os.urandom(32), CTX) for i in range(25)))
        elapsed = time.monotonic() - started
    finally:
        for provider in providers:
            await provider.aclose()
    assert 1.3 <= elapsed < 6, elapsed


def test_policy_is_validated() -> None:
    with pytest.raises(ConfigurationError, match="timeout_s"):
        ResiliencePolicy(timeout_s=0)
    with pytest.raises(ConfigurationError, match="rate_limit"):
        ResiliencePolicy(rate_limit=0)
    assert ResiliencePolicy().new_limiter() is None
    assert isinstance(ResiliencePolicy(rate_limit=5).new_limiter(), AsyncLimiter)


async def test_an_unreachable_vault_is_named_without_the_credentials_of_its_address() -> None:
    env = {"VAULT_ADDR": "http://kr-user:hunter2-s3cret@127.0.0.1:1/", "VAULT_TOKEN": "t0ken-never-shown"}
    with pytest.raises(KekUnavailable) as refused:
        await open_remote_provider("vault", env, policy=fast_policy(timeout_s=1.0, max_attempts=1))
    assert "vault (http://127.0.0.1:1)" in str(refused.value)
    assert "hunter2" not in str(refused.value) and "kr-user" not in str(refused.value)
    assert "t0ken" not in str(refused.value)


class DeadBudget:
    """A shared budget whose Redis is down."""

    def __init__(self) -> None:
        self.tries = 0

    async def acquire(self) -> float:
        self.tries += 1
        raise QueueUnavailable("the shared KEK call budget cannot be read from Redis")


async def test_a_budget_that_cannot_be_read_sends_nothing_and_is_not_retried() -> None:
    observer = RecordingObserver()
    budget = DeadBudget()
    fn = Flaky()
    r = Resilience("fake", fast_policy(), translate, limiter=budget, observer=observer)
    with pytest.raises(QueueUnavailable):
        await r.call("encrypt", fn)
    # The budget retried its own round trips already: one try here, no request, no breaker failure.
    assert (budget.tries, fn.attempts, r.breaker.consecutive_failures) == (1, 0, 0)
    assert observer.calls == [("fake", "encrypt", "no_budget")] and observer.attempts == []
