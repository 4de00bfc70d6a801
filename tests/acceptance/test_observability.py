"""examples/observability tells the truth: promtool accepts its scrape config and alert
rules (and their unit test passes), the Grafana dashboard is one Grafana can load, every
metric a panel or an alert asks for is one a running coordinator or participant serves,
and docker-compose.yml mounts these very files."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from coordinator.app import Coordinator
from helpers.coordinators import coordinator_settings
from helpers.database import create_database, drop_database, server_url, unique_name
from sagaplane import Participant, StepContext

ROOT = Path(__file__).resolve().parents[2]
HERE = ROOT / "examples" / "observability"
PROMETHEUS = HERE / "prometheus.yml"
ALERTS = HERE / "alerts.yml"
ALERTS_TEST = HERE / "alerts.test.yml"
DATASOURCES = HERE / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
PROVIDERS = HERE / "grafana" / "provisioning" / "dashboards" / "sagaplane.yml"
DASHBOARD = HERE / "grafana" / "dashboards" / "sagaplane.json"
COMPOSE = ROOT / "docker-compose.yml"

GENERATED_BY_PROMETHEUS = {"up"}
"""Series Prometheus makes itself for each target (an alert on a target down uses it)."""


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def alert_rules() -> list[dict[str, Any]]:
    return [rule for group in load_yaml(ALERTS)["groups"] for rule in group["rules"]]


def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return loaded


def queried_panels() -> Iterator[dict[str, Any]]:
    """Every panel that queries (rows only group), nested ones included."""
    for panel in dashboard()["panels"]:
        if panel["type"] == "row":
            yield from panel.get("panels", [])
        else:
            yield panel


# -- promtool ------------------------------------------------------------------------------


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("promtool")
    if binary is None:
        pytest.fail("promtool is missing: scripts/observability-setup installs it (CI runs it)")
    return subprocess.run(
        [binary, *args], cwd=HERE, capture_output=True, text=True, timeout=60, check=False
    )


@pytest.mark.parametrize(
    "args",
    [
        ("check", "rules", ALERTS.name),
        ("check", "config", PROMETHEUS.name),
        ("test", "rules", ALERTS_TEST.name),
    ],
    ids=" ".join,
)
def test_promtool_accepts_the_files(args: tuple[str, ...]) -> None:
    ran = promtool(*args)
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert "SUCCESS" in ran.stdout + ran.stderr


def test_the_alerts_cover_the_questions_and_each_says_what_to_do() -> None:
    rules = {rule["alert"]: rule for rule in alert_rules()}
    asked = {
        "SagaplaneSagaStuck": "sagaplane_active_saga_oldest_age_seconds",
        "SagaplaneCompensationFailed": 'sagaplane_sagas_active{state="compensation_failed"}',
        "SagaplaneOutboxBacklogGrowing": "sagaplane_outbox_backlog",
        "SagaplaneOutboxParked": "sagaplane_outbox_parked",
        "SagaplaneDeadLetters": "sagaplane_dead_lettered_total",
        "SagaplaneSagasFailing": "sagaplane_sagas_ended_total",
    }
    for name, metric in asked.items():
        assert name in rules, f"no alert {name}"
        assert metric in rules[name]["expr"], f"{name} does not look at {metric}"
    for name, rule in rules.items():
        notes = rule.get("annotations", {})
        assert notes.get("summary") and notes.get("description"), f"{name}: annotations"
        assert rule.get("labels", {}).get("severity") in {"warning", "critical"}, name


# -- the dashboard ------------------------------------------------------------------------

PANEL_TYPES = {"timeseries", "stat", "gauge", "bargauge", "table", "text", "heatmap", "row"}


def test_the_dashboard_has_what_grafana_requires() -> None:
    """A hand-written check (no dashboard schema package is used): the fields Grafana
    needs to load a provisioned dashboard, a layout without overlaps, and every query's
    data source the provisioned one."""
    board = dashboard()
    assert board["uid"] and board["title"]
    assert isinstance(board["schemaVersion"], int) and board["schemaVersion"] >= 36
    (source,) = load_yaml(DATASOURCES)["datasources"]
    assert source["type"] == "prometheus"
    want = {"type": "prometheus", "uid": source["uid"]}
    ids: set[int] = set()
    cells: set[tuple[int, int]] = set()
    panels = list(board["panels"])
    panels += [p for row in board["panels"] if row["type"] == "row" for p in row.get("panels", [])]
    for panel in panels:
        title = panel.get("title")
        assert title, f"panel {panel.get('id')} has no title"
        assert isinstance(panel["id"], int) and panel["id"] not in ids, f"{title}: id"
        ids.add(panel["id"])
        assert panel["type"] in PANEL_TYPES, f"{title}: type {panel['type']!r}"
        grid = panel["gridPos"]
        assert all(isinstance(grid[k], int) for k in ("h", "w", "x", "y")), title
        assert grid["w"] > 0 and grid["h"] > 0 and grid["x"] + grid["w"] <= 24, title
        mine = {
            (x, y)
            for x in range(grid["x"], grid["x"] + grid["w"])
            for y in range(grid["y"], grid["y"] + grid["h"])
        }
        assert not mine & cells, f"{title} overlaps another panel"
        cells |= mine
        if panel["type"] in ("row", "text"):
            continue
        assert panel["datasource"] == want, f"{title}: datasource"
        assert panel["targets"], f"{title}: no query"
        refs = [t["refId"] for t in panel["targets"]]
        assert len(set(refs)) == len(refs), f"{title}: refIds"
        for target in panel["targets"]:
            assert target["expr"].strip(), f"{title}: empty expr"
            assert target.get("datasource", want) == want, f"{title}: target datasource"
    assert len(ids) > 10


def test_grafana_provisioning_finds_the_dashboard_and_prometheus() -> None:
    (provider,) = load_yaml(PROVIDERS)["providers"]
    grafana = load_yaml(COMPOSE)["services"]["grafana"]
    mounts = dict(_mount(v) for v in grafana["volumes"])
    assert mounts[provider["options"]["path"]] == DASHBOARD.parent
    assert mounts["/etc/grafana/provisioning"] == DATASOURCES.parent.parent
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{provider['options']['path']}/{DASHBOARD.name}"
    (source,) = load_yaml(DATASOURCES)["datasources"]
    assert source["url"] == "http://prometheus:9090"


# -- every metric used is served ----------------------------------------------------------

_STRIPPED = (
    r'"(?:[^"\\]|\\.)*"',  # label values
    r"\{[^}]*\}",  # label matchers
    r"\[[^\]]*\]",  # ranges ([5m], [$__rate_interval])
    r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)",  # label lists
)
_KEYWORDS = {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring"}
_KEYWORDS |= {"group_left", "group_right"}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (functions and keywords left out)."""
    for pattern in _STRIPPED:
        expr = re.sub(pattern, " ", expr)
    names = set()
    for match in re.finditer(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(\s*\()?", expr):
        if match.group(2) is None and match.group(1) not in _KEYWORDS:
            names.add(match.group(1))
    return names


def test_metric_names_reads_promql() -> None:
    expr = (
        'sum by (saga) (rate(sagaplane_sagas_ended_total{state!="completed", x="a}b"}'
        "[$__rate_interval])) / on (saga) group_left max(up) > bool 0.5"
    )
    assert metric_names(expr) == {"sagaplane_sagas_ended_total", "up"}
    assert metric_names("histogram_quantile(0.99, sum by (le) (rate(a_bucket[5m])))") == {
        "a_bucket"
    }


def used_metrics() -> dict[str, set[str]]:
    """Metric name -> where it is used (alert names, panel titles)."""
    used: dict[str, set[str]] = {}
    for rule in alert_rules():
        for name in metric_names(rule["expr"]):
            used.setdefault(name, set()).add(f"alert {rule['alert']}")
    for panel in queried_panels():
        for target in panel.get("targets", []):
            for name in metric_names(target["expr"]):
                used.setdefault(name, set()).add(f"panel {panel['title']!r}")
    return used


def served_names(text: str) -> set[str]:
    """Every series name the exposition declares: from each family's type, so that a
    labelled counter nothing incremented yet (dead letters) still counts."""
    suffixes = {
        "counter": ("_total", "_created"),
        "histogram": ("_bucket", "_count", "_sum", "_created"),
        "summary": ("", "_count", "_sum", "_created"),
        "gauge": ("",),
        "info": ("_info",),
    }
    names = set()
    for family in text_string_to_metric_families(text):
        names |= {family.name + s for s in suffixes.get(family.type, ("",))}
        names |= {s.name for s in family.samples}
    return names


async def scrape(port: int | None) -> str:
    """GET /metrics (in a thread: the server runs on this event loop)."""
    assert port is not None

    def get() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
            return str(response.read().decode())

    return await asyncio.to_thread(get)


@pytest.fixture
async def served(database_url: str, amqp_url: str) -> AsyncIterator[set[str]]:
    """The series names a running coordinator and participant serve, together."""
    name = unique_name("sagaplane_observability")
    await create_database(name)
    p = Participant(
        "observed", amqp_url=amqp_url, database_url=server_url(name), metrics_listen="127.0.0.1:0"
    )

    @p.step("observed.ok")
    async def ok(ctx: StepContext) -> None:
        pass

    settings = coordinator_settings(database_url, amqp_url, metrics_listen="127.0.0.1:0")
    try:
        async with Coordinator(settings) as coordinator, p:
            texts = [await scrape(coordinator.metrics_port), await scrape(p.metrics_port)]
            yield served_names(texts[0]) | served_names(texts[1])
    finally:
        await drop_database(name)


async def test_every_metric_of_the_dashboard_and_the_alerts_is_served(served: set[str]) -> None:
    missing = {
        name: sorted(where)
        for name, where in used_metrics().items()
        if name not in served and name not in GENERATED_BY_PROMETHEUS
    }
    assert not missing, f"not served by a coordinator or participant: {missing}"
    # Both sides are there, and the dead letters nothing has counted yet: not vacuous.
    both = {"sagaplane_sagas_active", "sagaplane_commands_total", "sagaplane_dead_lettered_total"}
    assert both <= set(used_metrics()) & served


# -- docker compose ------------------------------------------------------------------------


def _mount(volume: str) -> tuple[str, Path]:
    """A short-syntax bind mount as (container path, host path)."""
    host, container, *_ = volume.split(":")
    return container, (ROOT / host).resolve()


def test_compose_runs_prometheus_on_these_files_and_it_scrapes_what_serves_metrics() -> None:
    services = load_yaml(COMPOSE)["services"]
    prometheus = services["prometheus"]
    mounts = dict(_mount(v) for v in prometheus["volumes"])
    for host in mounts.values():
        assert host.exists(), f"prometheus mounts {host}, which does not exist"
        assert host.is_relative_to(HERE), host
    assert mounts["/etc/prometheus/prometheus.yml"] == PROMETHEUS
    config = load_yaml(PROMETHEUS)
    for rule_file in config["rule_files"]:
        assert mounts[f"/etc/prometheus/{rule_file}"] == HERE / rule_file
    for volume in services["grafana"]["volumes"]:
        assert _mount(volume)[1].exists(), volume

    # Each target is a compose service serving metrics on that port.
    scraped = {
        target
        for job in config["scrape_configs"]
        for static in job["static_configs"]
        for target in static["targets"]
    }
    serving = set()
    for name, service in services.items():
        command = service.get("command") or []
        if "--metrics-listen" in command:
            serving.add(f"{name}:{command[command.index('--metrics-listen') + 1].split(':')[-1]}")
        listen = (service.get("environment") or {}).get("SAGAPLANE_PARTICIPANT_METRICS_LISTEN")
        if listen:
            serving.add(f"{name}:{listen.split(':')[-1]}")
    assert scraped == serving
    assert {"coordinator:9464", "orders:9465", "payment:9465"} <= serving
