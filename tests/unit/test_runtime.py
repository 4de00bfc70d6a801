"""sagaplane.runtime.run: the event loop a coordinator or participant process runs on."""

from __future__ import annotations

import asyncio

import pytest

from coordinator.config import parse
from sagaplane.runtime import run


async def _loop_module() -> str:
    return type(asyncio.get_running_loop()).__module__


def test_uvloop_is_the_default() -> None:
    assert run(_loop_module()).startswith("uvloop")


def test_asyncio_on_request() -> None:
    assert run(_loop_module(), event_loop="asyncio").startswith("asyncio")


def test_unknown_event_loop_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match="event_loop must be one of uvloop, asyncio"):
        run(_loop_module(), event_loop="trio")


def test_coordinator_setting_from_flag_and_environment() -> None:
    assert parse([]).event_loop == "uvloop"
    assert parse(["--event-loop", "asyncio"]).event_loop == "asyncio"
    assert parse([], env={"SAGAPLANE_EVENT_LOOP": "asyncio"}).event_loop == "asyncio"


def test_a_bad_event_loop_variable_is_refused_by_name(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        parse([], env={"SAGAPLANE_EVENT_LOOP": "trio"})
    assert exit_.value.code == 2
    assert (
        "SAGAPLANE_EVENT_LOOP must be one of uvloop, asyncio, not 'trio'" in capsys.readouterr().err
    )
