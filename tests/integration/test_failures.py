"""Failure semantics over the real stack: retries, timeouts, deadlines, resolution."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import grpc
import pytest
from google.protobuf import duration_pb2

from coordinator import engine
from coordinator.app import Coordinator
from coordinator.engine import RetryPolicy
from helpers.coordinators import coordinator_settings
from helpers.database import create_database, drop_database, server_url, unique_name
from sagaplane import NonRetryableError, Participant, RetryableError, StepContext, structs
from sagaplane.v1 import coordinator_pb2 as api
from sagaplane.v1 import coordinator_pb2_grpc
from sagaplane.v1 import saga_pb2 as model

Stub = coordinator_pb2_grpc.SagaCoordinatorServiceStub
TERMINAL = {
    model.SAGA_STATE_COMPLETED,
    model.SAGA_STATE_FAILED,
    model.SAGA_STATE_COMPENSATED,
    model.SAGA_STATE_COMPENSATION_FAILED,
}


def seconds(value: float) -> duration_pb2.Duration:
    d = duration_pb2.Duration()
    d.FromMilliseconds(int(value * 1000))
    return d


FAST_RETRY = model.RetryPolicy(
    max_attempts=3, initial_interval=seconds(0.05), max_interval=seconds(0.1)
)


@pytest.fixture
async def fast_stub(database_url: str, amqp_url: str) -> AsyncIterator[Stub]:
    """A coordinator whose timers look every 50 ms, so timeouts show quickly."""
    settings = coordinator_settings(database_url, amqp_url, timer_interval=0.05)
    async with (
        Coordinator(settings) as coordinator,
        grpc.aio.insecure_channel(f"127.0.0.1:{coordinator.port}") as channel,
    ):
        yield coordinator_pb2_grpc.SagaCoordinatorServiceStub(channel)


@pytest.fixture
async def flaky(amqp_url: str) -> AsyncIterator[dict[str, list[int]]]:
    """A participant whose handlers misbehave on purpose; returns the attempts it saw."""
    name = unique_name("sagaplane_flaky")
    await create_database(name)
    seen: dict[str, list[int]] = {}
    p = Participant("flaky", amqp_url=amqp_url, database_url=server_url(name))

    def note(ctx: StepContext) -> None:
        seen.setdefault(ctx.action, []).append(ctx.attempt)

    @p.step("flaky.once")
    async def fails_once(ctx: StepContext) -> dict[str, Any]:
        note(ctx)
        if ctx.attempt == 1:
            raise RetryableError("temporarily out of stock")
        return {"attempt": ctx.attempt}

    @p.step("flaky.always")
    async def always(ctx: StepContext) -> None:
        note(ctx)
        raise ValueError("plain exceptions are retryable")

    @p.step("flaky.slow")
    async def slow(ctx: StepContext) -> dict[str, Any]:
        note(ctx)
        if ctx.attempt == 1:
            await asyncio.sleep(1.5)  # past the step's 0.5 s timeout
        return {"slow": True}

    @p.step("flaky.ok")
    async def ok(ctx: StepContext) -> None:
        note(ctx)

    @p.compensation("flaky.undo")
    async def undo(ctx: StepContext) -> None:
        note(ctx)

    @p.compensation("flaky.undo_never")
    async def undo_never(ctx: StepContext) -> None:
        note(ctx)
        raise NonRetryableError("the ledger is closed")

    @p.compensation("flaky.undo_after_fix")
    async def undo_after_fix(ctx: StepContext) -> None:
        note(ctx)
        if ctx.attempt == 1:
            raise NonRetryableError("refund API rejected the request")

    async with p:
        yield seen
    await drop_database(name)


async def wait(stub: Stub, saga_id: str, timeout: float = 30.0) -> model.Saga:
    async with asyncio.timeout(timeout):
        while True:
            saga = (await stub.GetSaga(api.GetSagaRequest(id=saga_id, include_history=True))).saga
            if saga.state in TERMINAL:
                return saga
            await asyncio.sleep(0.05)


def step(name: str, action: str, compensation: str = "", **kw: Any) -> api.StepSpec:
    return api.StepSpec(name=name, action=action, compensation=compensation, **kw)


async def test_a_retryable_failure_is_retried_before_anything_compensates(
    fast_stub: Stub, flaky: dict[str, list[int]]
) -> None:
    saga_id = (
        await fast_stub.StartSaga(
            api.StartSagaRequest(
                name="retry",
                steps=[step("a", "flaky.ok", "flaky.undo"), step("b", "flaky.once")],
                retry_policy=FAST_RETRY,
            )
        )
    ).saga.id
    saga = await wait(fast_stub, saga_id)

    assert saga.state == model.SAGA_STATE_COMPLETED
    assert saga.steps[1].attempts == 2
    assert flaky["flaky.once"] == [1, 2]
    assert "flaky.undo" not in flaky
    events = [(h.event, h.step_name) for h in saga.history]
    assert ("step_attempt_failed", "b") in events
    assert events.count(("step_dispatched", "b")) == 2
    failed = next(h for h in saga.history if h.event == "step_attempt_failed")
    assert "temporarily out of stock" in failed.reason and "attempt 1" in failed.reason


async def test_attempts_stop_at_the_policy_then_the_saga_compensates(
    fast_stub: Stub, flaky: dict[str, list[int]]
) -> None:
    saga_id = (
        await fast_stub.StartSaga(
            api.StartSagaRequest(
                name="exhaust",
                steps=[step("a", "flaky.ok", "flaky.undo"), step("b", "flaky.always")],
                retry_policy=FAST_RETRY,
            )
        )
    ).saga.id
    saga = await wait(fast_stub, saga_id)

    assert saga.state == model.SAGA_STATE_COMPENSATED
    assert saga.steps[1].status == model.STEP_STATUS_FAILED
    assert saga.steps[1].attempts == 3
    assert "ValueError" in saga.steps[1].error
    assert flaky["flaky.always"] == [1, 2, 3]
    assert flaky["flaky.undo"] == [1]


async def test_a_slow_attempt_is_cut_at_its_deadline_and_retried(
    fast_stub: Stub, flaky: dict[str, list[int]]
) -> None:
    saga_id = (
        await fast_stub.StartSaga(
            api.StartSagaRequest(
                name="slow",
                steps=[step("s", "flaky.slow", "flaky.undo", timeout=seconds(0.5))],
                retry_policy=FAST_RETRY,
            )
        )
    ).saga.id
    saga = await wait(fast_stub, saga_id)

    assert saga.state == model.SAGA_STATE_COMPLETED
    assert saga.steps[0].attempts == 2
    assert structs.to_dict(saga.steps[0].output) == {"slow": True}
    # The participant cancelled attempt 1 at its deadline and said so before the
    # coordinator's own timer: its writes are known to be rolled back.
    [failed] = [h.reason for h in saga.history if h.event == "step_attempt_failed"]
    assert failed.startswith("DeadlineExceeded: deadline exceeded after 0.5s")
    assert not saga.steps[0].outcome_unknown
    assert flaky["flaky.slow"] == [1, 2]


async def test_an_attempt_nobody_answers_times_out_and_is_retried(fast_stub: Stub) -> None:
    saga_id = (
        await fast_stub.StartSaga(
            api.StartSagaRequest(
                name="unanswered",
                steps=[step("s", "nobody.home", timeout=seconds(0.3))],
                retry_policy=FAST_RETRY,
            )
        )
    ).saga.id
    saga = await wait(fast_stub, saga_id)

    assert saga.state == model.SAGA_STATE_FAILED
    assert saga.steps[0].attempts == 3
    reasons = [h.reason for h in saga.history if h.event == "step_attempt_failed"]
    # Each may add that its command reached no queue (when the relay had tried it).
    assert len(reasons) == 2
    assert reasons[0].startswith("attempt 1 timed out after 0.3s")
    assert reasons[1].startswith("attempt 2 timed out after 0.3s")
    assert saga.steps[0].error.startswith("attempt 3 timed out after 0.3s")


async def test_a_saga_past_its_deadline_compensates(
    fast_stub: Stub, flaky: dict[str, list[int]]
) -> None:
    saga_id = (
        await fast_stub.StartSaga(
            api.StartSagaRequest(
                name="deadline",
                steps=[
                    step("a", "flaky.ok", "flaky.undo"),
                    step("s", "flaky.slow", "flaky.undo", timeout=seconds(10)),
                    step("never", "flaky.ok"),
                ],
                timeout=seconds(0.7),
            )
        )
    ).saga.id
    saga = await wait(fast_stub, saga_id)

    assert saga.state == model.SAGA_STATE_COMPENSATED
    assert "saga_deadline_passed" in [h.event for h in saga.history]
    # The slow step was in flight at the deadline: awaited, then undone first.
    assert [s.status for s in saga.steps] == [
        model.STEP_STATUS_COMPENSATED,
        model.STEP_STATUS_COMPENSATED,
        model.STEP_STATUS_SKIPPED,
    ]
    assert flaky["flaky.undo"] == [1, 1]


async def test_a_compensation_that_cannot_finish_waits_for_a_person(
    fast_stub: Stub, flaky: dict[str, list[int]]
) -> None:
    saga_id = (
        await fast_stub.StartSaga(
            api.StartSagaRequest(
                name="stuck",
                steps=[step("a", "flaky.ok", "flaky.undo_never"), step("b", "flaky.ok")],
            )
        )
    ).saga.id
    await wait(fast_stub, saga_id)
    await fast_stub.Compensate(api.CompensateRequest(id=saga_id, reason="changed my mind"))
    saga = await wait(fast_stub, saga_id)
    assert saga.state == model.SAGA_STATE_COMPENSATION_FAILED
    assert "the ledger is closed" in saga.steps[0].error
    active = await fast_stub.ListActive(api.ListActiveRequest())
    assert saga_id in [s.id for s in active.sagas]

    with pytest.raises(grpc.aio.AioRpcError) as err:
        await fast_stub.ResolveCompensation(
            api.ResolveCompensationRequest(
                id=saga_id, resolution=api.COMPENSATION_RESOLUTION_MARK_COMPENSATED
            )
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (err.value.details() or "").startswith("reason:")

    resolved = await fast_stub.ResolveCompensation(
        api.ResolveCompensationRequest(
            id=saga_id,
            resolution=api.COMPENSATION_RESOLUTION_MARK_COMPENSATED,
            reason="refunded by hand, ticket OPS-7",
        )
    )
    assert resolved.saga.state == model.SAGA_STATE_COMPENSATED
    saga = await wait(fast_stub, saga_id)
    entry = next(h for h in saga.history if h.event.startswith("compensation_resolved"))
    assert entry.reason == "refunded by hand, ticket OPS-7"
    assert entry.from_state == model.SAGA_STATE_COMPENSATION_FAILED

    with pytest.raises(grpc.aio.AioRpcError) as err:
        await fast_stub.ResolveCompensation(
            api.ResolveCompensationRequest(
                id=saga_id, resolution=api.COMPENSATION_RESOLUTION_RETRY, reason="again"
            )
        )
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION


async def test_list_active_can_ask_for_stale_sagas_only(fast_stub: Stub) -> None:
    # Nobody handles this action: the saga stays started, untouched.
    saga_id = (
        await fast_stub.StartSaga(
            api.StartSagaRequest(
                name="idle", steps=[step("a", "nobody.home")], step_timeout=seconds(3600)
            )
        )
    ).saga.id
    stale = api.ListActiveRequest(stale_for=seconds(1))
    assert saga_id not in [s.id for s in (await fast_stub.ListActive(stale)).sagas]
    await asyncio.sleep(1.2)
    assert saga_id in [s.id for s in (await fast_stub.ListActive(stale)).sagas]


BAD_POLICIES = {
    "too many attempts": (
        dict(retry_policy=model.RetryPolicy(max_attempts=101)),
        "retry_policy.max_attempts",
    ),
    "shrinking backoff": (
        dict(compensation_retry_policy=model.RetryPolicy(backoff_coefficient=0.5)),
        "compensation_retry_policy.backoff_coefficient",
    ),
    "max below initial": (
        dict(retry_policy=model.RetryPolicy(initial_interval=seconds(10), max_interval=seconds(1))),
        "retry_policy.max_interval",
    ),
    "zero step timeout": (dict(step_timeout=duration_pb2.Duration()), "step_timeout"),
    "negative saga timeout": (dict(timeout=duration_pb2.Duration(seconds=-5)), "timeout"),
    "step timeout over a day": (
        dict(steps=[step("a", "x.y", timeout=duration_pb2.Duration(seconds=90000))]),
        "steps[0].timeout",
    ),
}


@pytest.mark.parametrize("case", list(BAD_POLICIES), ids=list(BAD_POLICIES))
async def test_bad_retry_and_timeout_settings_name_the_field(stub: Stub, case: str) -> None:
    fields, name = BAD_POLICIES[case]
    request = api.StartSagaRequest(name="bad", steps=[step("a", "x.y")])
    for key, value in fields.items():
        if key == "steps":
            del request.steps[:]
            request.steps.extend(value)
        else:
            getattr(request, key).CopyFrom(value)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.StartSaga(request)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (err.value.details() or "").startswith(f"{name}:")


async def test_retry_settings_are_recorded_on_each_step(stub: Stub) -> None:
    saga = (
        await stub.StartSaga(
            api.StartSagaRequest(
                name="policies",
                steps=[
                    step("a", "x.a"),
                    step("b", "x.b", retry_policy=model.RetryPolicy(max_attempts=7)),
                ],
                retry_policy=model.RetryPolicy(max_attempts=5, initial_interval=seconds(2)),
                step_timeout=seconds(12),
            )
        )
    ).saga
    a, b = saga.steps
    assert a.retry_policy.max_attempts == 5
    assert a.retry_policy.initial_interval.ToMilliseconds() == 2000
    assert b.retry_policy.max_attempts == 7
    # A field left at zero inherits the saga's policy, which inherits the default.
    assert b.retry_policy.initial_interval.ToMilliseconds() == 2000
    assert b.retry_policy.max_interval.ToSeconds() == 60
    assert a.compensation_retry_policy.max_attempts == 10
    assert a.timeout.ToSeconds() == 12
    assert a.HasField("deadline_at") and not b.HasField("deadline_at")


def change_default(monkeypatch: pytest.MonkeyPatch, name: str, policy: RetryPolicy) -> None:
    """What a release with another default does: every module of the coordinator that
    holds the engine's ``name`` (DEFAULT_RETRY, DEFAULT_COMPENSATION_RETRY) sees ``policy``."""
    old = getattr(engine, name)
    for module_name, module in list(sys.modules.items()):
        if module_name.split(".")[0] == "coordinator" and getattr(module, name, None) is old:
            monkeypatch.setattr(module, name, policy)


def policy_of(policy: model.RetryPolicy) -> tuple[int, int, float, int]:
    return (
        policy.max_attempts,
        policy.initial_interval.ToMilliseconds(),
        policy.backoff_coefficient,
        policy.max_interval.ToMilliseconds(),
    )


async def test_a_saga_keeps_the_retry_policies_it_started_with_when_the_defaults_change(
    stub: Stub, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def start() -> str:
        request = api.StartSagaRequest(name="x", steps=[step("a", "x.y")])
        return (await stub.StartSaga(request)).saga.id

    async def stored(saga_id: str) -> model.Step:
        (got,) = (await stub.GetSaga(api.GetSagaRequest(id=saga_id))).saga.steps
        return got

    then = (3, 1000, 2.0, 60000), (10, 1000, 2.0, 60000)
    before = await start()
    a = await stored(before)
    assert (policy_of(a.retry_policy), policy_of(a.compensation_retry_policy)) == then

    change_default(monkeypatch, "DEFAULT_RETRY", RetryPolicy(max_attempts=4))
    change_default(
        monkeypatch,
        "DEFAULT_COMPENSATION_RETRY",
        RetryPolicy(max_attempts=20, max_interval=timedelta(seconds=30)),
    )
    b = await stored(await start())
    assert policy_of(b.retry_policy) == (4, 1000, 2.0, 60000)
    assert policy_of(b.compensation_retry_policy) == (20, 1000, 2.0, 30000)

    a = await stored(before)
    assert (policy_of(a.retry_policy), policy_of(a.compensation_retry_policy)) == then


async def test_resolving_a_saga_that_needs_no_resolution_is_refused(
    stub: Stub, coordinator: Coordinator
) -> None:
    saga_id = (
        await stub.StartSaga(api.StartSagaRequest(name="x", steps=[step("a", "x.y")]))
    ).saga.id
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.ResolveCompensation(
            api.ResolveCompensationRequest(
                id=saga_id, resolution=api.COMPENSATION_RESOLUTION_RETRY, reason="why not"
            )
        )
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.ResolveCompensation(api.ResolveCompensationRequest(id=saga_id, reason="r"))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (err.value.details() or "").startswith("resolution:")


async def test_an_operator_retry_reruns_a_compensation_that_failed_non_retryably(
    fast_stub: Stub, flaky: dict[str, list[int]]
) -> None:
    saga_id = (
        await fast_stub.StartSaga(
            api.StartSagaRequest(
                name="fixed", steps=[step("a", "flaky.ok", "flaky.undo_after_fix")]
            )
        )
    ).saga.id
    await wait(fast_stub, saga_id)
    await fast_stub.Compensate(api.CompensateRequest(id=saga_id))
    saga = await wait(fast_stub, saga_id)
    assert saga.state == model.SAGA_STATE_COMPENSATION_FAILED
    assert saga.steps[0].compensation_attempts == 1  # non-retryable: no automatic retry

    await fast_stub.ResolveCompensation(
        api.ResolveCompensationRequest(
            id=saga_id,
            resolution=api.COMPENSATION_RESOLUTION_RETRY,
            reason="refund API fixed, OPS-9",
        )
    )
    saga = await wait(fast_stub, saga_id)
    assert saga.state == model.SAGA_STATE_COMPENSATED
    assert flaky["flaky.undo_after_fix"] == [1, 2]
    assert "compensation_resolved_retry" in [h.event for h in saga.history]
