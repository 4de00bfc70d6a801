"""sagaplane.runtime.run: the event loop a coordinator or participant process runs on."""

from __future__ import annotations

import asyncio

import pytest

from coordinator import config
from coordinator.cli import build_parser, main
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


def _serve(argv: list[str], env: dict[str, str]) -> config.Settings:
    """The settings ``sagaplane serve`` (and ``python -m coordinator``) would run with."""
    return config.from_args(build_parser(env).parse_args(["serve", *argv]))


def test_coordinator_setting_from_flag_and_environment() -> None:
    assert _serve([], {}).event_loop == "uvloop"
    assert _serve(["--event-loop", "asyncio"], {}).event_loop == "asyncio"
    assert _serve([], {"SAGAPLANE_EVENT_LOOP": "asyncio"}).event_loop == "asyncio"


def test_a_bad_event_loop_variable_is_refused_by_name(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SAGAPLANE_EVENT_LOOP", "trio")
    with pytest.raises(SystemExit) as exit_:
        main(["serve"])
    assert exit_.value.code == 2
    assert (
        "SAGAPLANE_EVENT_LOOP must be one of uvloop, asyncio, not 'trio'" in capsys.readouterr().err
    )
