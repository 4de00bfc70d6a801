"""The Saga view's answers for people: is it over, did it complete, which step failed."""

from __future__ import annotations

from sagaplane.sagas import Saga, SagaState, StepStatus
from sagaplane.v1 import saga_pb2


def saga(state: int, *statuses: int) -> Saga:
    return Saga.from_proto(
        saga_pb2.Saga(
            id="01M8SJ3J5XJNY9Y7T6XHYJRB15",
            name="order.place",
            state=state,
            steps=[saga_pb2.Step(name=f"s{i}", status=s) for i, s in enumerate(statuses)],
        )
    )


def test_a_completed_saga_is_over_and_completed_with_no_failed_step() -> None:
    done = saga(saga_pb2.SAGA_STATE_COMPLETED, saga_pb2.STEP_STATUS_COMPLETED)
    assert done.ended and done.completed and done.failed_step is None
    assert done.state == "completed" and done.state is SagaState.COMPLETED


def test_a_compensated_saga_names_the_step_that_failed() -> None:
    undone = saga(
        saga_pb2.SAGA_STATE_COMPENSATED,
        saga_pb2.STEP_STATUS_COMPENSATED,
        saga_pb2.STEP_STATUS_FAILED,
        saga_pb2.STEP_STATUS_SKIPPED,
    )
    assert undone.ended and not undone.completed
    assert undone.failed_step is not None and undone.failed_step.name == "s1"


def test_a_failed_compensation_is_the_step_that_stopped_the_saga() -> None:
    stuck = saga(
        saga_pb2.SAGA_STATE_COMPENSATION_FAILED,
        saga_pb2.STEP_STATUS_COMPENSATION_FAILED,
        saga_pb2.STEP_STATUS_FAILED,
    )
    assert stuck.ended and not stuck.completed
    assert (
        stuck.failed_step is not None and stuck.failed_step.status is StepStatus.COMPENSATION_FAILED
    )


def test_a_running_saga_is_not_over() -> None:
    running = saga(saga_pb2.SAGA_STATE_STARTED, saga_pb2.STEP_STATUS_STARTED)
    assert not running.ended and not running.completed and running.failed_step is None
