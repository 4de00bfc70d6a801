"""The retention settings: flags win over SAGAPLANE_* variables, which win over the
defaults; a bad window is refused with a clear error (exit status 2)."""

from __future__ import annotations

from datetime import timedelta

import pytest

from coordinator import config
from coordinator.cli import build_parser, main
from coordinator.retention import Retention, describe
from sagaplane.retention import parse_retention


def settings(argv: list[str], env: dict[str, str] | None = None) -> config.Settings:
    return config.from_args(build_parser(env or {}).parse_args(["serve", *argv]))


def test_by_default_sagas_are_kept_and_sent_outbox_rows_go_after_a_day() -> None:
    rules = settings([]).retention
    assert rules == Retention()
    assert (rules.sagas, rules.outbox, rules.prunes_sagas) == (None, timedelta(hours=24), False)
    assert describe(rules) == "finished sagas: kept; sent outbox rows: 1d"


def test_a_window_per_name_and_flags_over_the_environment() -> None:
    env = {
        "SAGAPLANE_RETENTION": "7d",
        "SAGAPLANE_RETENTION_FOR": "reports=off, payments=90d",
        "SAGAPLANE_OUTBOX_RETENTION": "off",
        "SAGAPLANE_PRUNE_BATCH": "200",
    }
    rules = settings(["--retention", "30d", "--retention-for", "payments=365d"], env).retention
    assert rules.sagas == timedelta(days=30)
    assert rules.sagas_by_name == {"reports": None, "payments": timedelta(days=365)}
    assert (rules.outbox, rules.batch, rules.prunes_sagas) == (None, 200, True)
    # A name kept forever alone prunes nothing; one with a window does.
    assert not Retention(sagas_by_name={"reports": None}).prunes_sagas
    assert Retention(sagas_by_name={"x": timedelta(days=1)}).prunes_sagas


@pytest.mark.parametrize(
    "argv",
    [
        ["--retention", "a month"],
        ["--retention", "0"],
        ["--retention-for", "payments"],
        ["--retention-for", "=30d"],
        ["--outbox-retention", "-1h"],
        ["--prune-batch", "0"],
    ],
)
def test_a_bad_flag_is_a_usage_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        build_parser({}).parse_args(["serve", *argv])
    assert exited.value.code == 2
    assert argv[0] in capsys.readouterr().err


def test_a_bad_variable_names_itself(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("SAGAPLANE_RETENTION_FOR", "payments:365d")
    with pytest.raises(SystemExit) as exited:
        main(["serve", "--help"])
    assert exited.value.code == 2
    assert "SAGAPLANE_RETENTION_FOR" in capsys.readouterr().err


def test_off_and_durations() -> None:
    assert parse_retention("off") is None and parse_retention(None) is None
    assert parse_retention("Forever") is None
    assert parse_retention("1d12h") == timedelta(days=1, hours=12)
    assert parse_retention(3600) == timedelta(hours=1)
    with pytest.raises(ValueError, match="longer than zero"):
        parse_retention("0s")
