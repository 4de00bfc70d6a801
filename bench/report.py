"""The results as a table on stdout, as JSON, and as a PNG plot of latency against
throughput."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from bench import observability, peers, security, variants
from bench.tables import fmt, table


def _lat_row(label: str, s: dict[str, Any] | None) -> list[Any]:
    s = s or {}
    return [label, s.get("p50"), s.get("p95"), s.get("p99"), s.get("max"), s.get("n")]


_LAT_HEADER = ["latency (ms)", "p50", "p95", "p99", "max", "n"]
_DB_KEYS = ["commits", "rollbacks", "inserted", "updated", "deleted", "fetched"]


def _main_pct(p: dict[str, Any], wall: float) -> float | None:
    main = p.get("threads_cpu_s", {}).get("main")
    return None if main is None or not wall else round(100 * main / wall, 1)


def _disturbed(label: str, run: dict[str, Any]) -> list[str]:
    lines = []
    for d in run.get("disturbed") or []:
        lines.append(f"  !! {label} DISTURBED (not valid): {d}")
    return lines


def _breakdown(label: str, run: dict[str, Any]) -> list[str]:
    b = run.get("breakdown") or {}
    if not b.get("legs"):
        return []
    rows = [
        [f"{name}: {leg['meaning']}", leg["p50"], leg["p95"], leg["p99"]]
        for name, leg in b["legs"].items()
    ]
    return [
        f"  where the time goes, {label} ({b['steps']} steps; per step, except 'start'):",
        *table(rows, ["leg (transaction starts, one DB clock)", "p50 ms", "p95 ms", "p99 ms"]),
    ]


def _peers(p: dict[str, Any] | None) -> list[str]:
    """Sagaplane beside DBOS Transact (``--phases peers``)."""
    if not p or "dbos" not in p:
        return []
    tp, lat = p["sagaplane"]["throughput"], p["sagaplane"]["latency"]
    dbos = p["dbos"]
    closed, single = dbos["closed_loop"], dbos["one_at_a_time_ms"]
    lat_ms = lat["start_to_terminal_ms"]
    lines = [
        "",
        f"Beside a peer: DBOS Transact {dbos['version']} ({dbos['api']}), the same 3 steps of"
        f" one INSERT each, {dbos['context_bytes']:,} B context, on the same PostgreSQL",
    ]
    lines += table(
        [
            [
                "closed loop, per s",
                tp["sagas_per_s"],
                closed["workflows_per_s"],
                fmt(p["throughput_ratio"], 3),
                f"in flight {tp['concurrency']} / {closed['concurrency']}",
            ],
            [
                "  CPU ms each (system)",
                tp.get("cpu_ms_per_saga"),
                closed.get("cpu_ms_per_workflow"),
                fmt(p["cpu_ratio"], 3),
                f"DBOS: its process {fmt(closed.get('dbos_cpu_ms_per_workflow'), 2)} +"
                f" PostgreSQL {fmt(closed.get('postgres_cpu_ms_per_workflow'), 2)}",
            ],
            [
                "latency p50 ms",
                lat_ms.get("p50"),
                single["p50"],
                fmt(p["p50_ratio"], 3),
                f"Sagaplane at {lat['rate']:g} sagas/s offered, DBOS one at a time",
            ],
            ["latency p99 ms", lat_ms.get("p99"), single["p99"], fmt(p["p99_ratio"], 3), ""],
            [
                "  transactions each",
                peers.commits((tp.get("steady") or {}).get("per_saga")),
                peers.commits(closed.get("per_workflow")),
                "",
                "all databases, read-only ones too (pg_stat_database xact_commit;"
                " Sagaplane: its steady window)",
            ],
        ],
        ["", "Sagaplane", "DBOS", "ratio", "notes"],
    )
    lines.append(
        f"  Sagaplane's figures from {tp.get('from', '?')} and {lat.get('from', '?')};"
        f" DBOS errors {closed['errors']}, Sagaplane not completed {tp['not_completed']}"
    )
    lines += ["  what differs:"] + [f"    - {d}" for d in peers.DIFFERENCES]
    lines += _disturbed("peers: Sagaplane throughput", tp) + _disturbed("peers: latency", lat)
    return lines


def _growth(results: dict[str, Any]) -> list[str]:
    """Cost as the work grows (``--phases steps,context,waiting``)."""
    lines: list[str] = []
    steps = results.get("steps")
    if steps:
        lines += [
            "",
            "Steps per saga (open loop, the same steps/s offered each, below capacity; CPU of"
            " the system under test, the broker counted whole)",
        ]
        lines += table(
            [
                [
                    r["steps"],
                    r["rate"],
                    r["terminal"],
                    r["cpu_ms_per_saga"],
                    r["cpu_ms_per_step"],
                    fmt(steps["cpu_per_step_ratio"].get(str(r["steps"])), 3),
                    r["start_to_terminal_ms"]["p50"],
                    r.get("p50_ms_per_step"),
                    r["start_to_terminal_ms"]["p99"],
                    r["not_completed"],
                ]
                for r in steps["runs"]
            ],
            [
                "steps",
                "sagas/s",
                "sagas",
                "CPU ms/saga",
                "CPU ms/step",
                "vs 3",
                "p50 ms",
                "p50 ms/step",
                "p99 ms",
                "not completed",
            ],
        )
        for r in steps["runs"]:
            roles = r.get("cpu_ms_per_step_by_role") or {}
            lines.append(
                f"  {r['steps']} steps, CPU ms per step by process: "
                + ", ".join(f"{k} {fmt(v, 2)}" for k, v in roles.items() if k != "harness")
            )
        for r in steps["runs"]:
            lines += _disturbed(f"{r['steps']}-step run", r)
    context = results.get("context")
    if context:
        lines += ["", "Context size (open loop, the standard saga, the same sagas/s each)"]
        lines += table(
            [
                [
                    r["context_bytes"],
                    r["rate"],
                    r["terminal"],
                    r["cpu_ms_per_saga"],
                    r["start_to_terminal_ms"]["p50"],
                    r["start_to_terminal_ms"]["p99"],
                    r["not_completed"],
                ]
                for r in context["runs"]
            ],
            ["context B", "sagas/s", "sagas", "CPU ms/saga", "p50 ms", "p99 ms", "not completed"],
        )
        lines.append(
            f"  CPU per saga, largest / smallest context: {fmt(context['cpu_per_saga_ratio'], 3)}"
        )
        for r in context["runs"]:
            lines += _disturbed(f"{r['context_bytes']} B run", r)
    w = results.get("waiting")
    if w:
        lines += [
            "",
            f"Waiting sagas: {w['sagas']:,} in flight on a stopped participant ({w['stopped']}),"
            f" started in {fmt(w['start_s'], 1)} s, commands all published after"
            f" {fmt(w['relayed_s'], 1)} s",
        ]
        for label, idle in (("nothing waiting", w.get("empty")), ("sagas waiting", w["idle"])):
            if not idle:
                continue
            lines.append(
                f"  coordinator idle, {label}, over {fmt(idle['seconds'], 1)} s:"
                f" {fmt(idle['coordinator_cpu_s'], 3)} CPU s ="
                f" {fmt(idle['coordinator_cpu_pct_of_core'], 2)}% of a core (machine"
                f" {fmt(idle['machine_busy_pct'])}% busy); timer loop"
                f" {idle.get('timer_rounds', '-')} rounds of"
                f" {fmt(idle.get('timer_round_ms_mean'), 2)} ms on average"
            )
        if w.get("timer_round_ratio") is not None:
            lines.append(
                "  timer loop round, sagas waiting / nothing waiting:"
                f" x{fmt(w['timer_round_ratio'], 3)}"
            )
        rows = []
        for key, name in (("start_saga_ms", "StartSaga"), ("get_saga_ms", "GetSaga")):
            a, b = w["calls_idle"][key], w["calls_waiting"][key]
            ratio = w[f"{key.removesuffix('_ms')}_p99_ratio"]
            rows.append([name, a["p50"], a["p99"], b["p50"], b["p99"], fmt(ratio, 3)])
        lines += table(
            rows,
            ["one call at a time", "idle p50", "idle p99", "waiting p50", "waiting p99", "p99 x"],
        )
        ref = w["reference"]
        lines.append(
            f"  drain once it starts again: {w['sagas']:,} sagas in"
            f" {fmt(w['drain']['seconds'], 1)} s"
            f" = {fmt(w['drain']['sagas_per_s'])}/s; the same system's closed loop"
            f" {fmt(ref['sagas_per_s'])}/s: x{fmt(w['drain_vs_reference'], 3)}"
            + (
                f" (the throughput phase's: x{fmt(w['drain_vs_throughput'], 3)})"
                if w.get("drain_vs_throughput") is not None
                else ""
            )
        )
        lines += _disturbed("waiting run", w)
    return lines


def render(results: dict[str, Any]) -> str:
    """The human-readable report."""
    meta = results["meta"]
    lines = [
        "=" * 78,
        f"Sagaplane benchmark ({meta['mode']}) {meta['started_at']}  run {meta['run_id']}",
        f"  {meta['cpus']} CPUs, load average at start {meta['load_average']}; "
        f"PostgreSQL {meta.get('postgres', '?')}, RabbitMQ {meta.get('rabbitmq', '?')}; "
        f"commit {meta.get('commit', '?')}",
        "  workload: 3-step sagas (orders.create, inventory.reserve, payment.charge, each with "
        "a compensation), 1 KB context;",
        "  3 participant processes (own database each, one INSERT per handler), "
        "fsync and synchronous_commit on.",
    ]
    if meta.get("note"):
        lines.append(f"  NOTE: {meta['note']}")
    for error in results.get("errors") or []:
        lines.append(f"  !! ERROR (phase not completed): {error[:300]}")

    base = results.get("baselines", {})
    if base:
        lines += ["", "Baselines (this machine's own limits)"]
        pg = base.get("pgbench")
        if pg:
            lines.append(
                f"  pgbench, one coordinator transition per tx, {pg['clients']} clients, "
                f"{pg['seconds']} s: {fmt(pg['tps'])} tps (avg {fmt(pg['latency_avg_ms'], 2)} ms; "
                f"backends {fmt(pg.get('backend_cpu_ms_per_tx'), 3)} ms CPU per tx)"
            )
        br = base.get("broker")
        if br:
            lines.append(
                f"  aio-pika publish w/ confirms + consume w/ ack, {br['size_bytes']} B "
                f"persistent, quorum queue: {fmt(br['messages_per_s'])} msg/s end to end "
                f"(publish {fmt(br['publish_per_s'])}/s, consume {fmt(br['consume_per_s'])}/s; "
                f"broker {fmt(br.get('broker_cpu_ms_per_message'), 3)} ms CPU per message)"
            )
        if pg and pg.get("single_client_latency_ms") is not None:
            lines.append(
                "  pgbench, the same transaction, 1 client: "
                f"{fmt(pg['single_client_latency_ms'], 2)} ms each (commit included)"
            )
        hop = base.get("broker_hop")
        if hop:
            d, c = hop["delivered_ms"], hop["confirmed_ms"]
            lines.append(
                f"  one message at a time, {hop['size_bytes']} B persistent, quorum queue: "
                f"publish->delivered p50 {fmt(d['p50'], 2)} ms (p99 {fmt(d['p99'], 2)}), "
                f"publish->confirmed p50 {fmt(c['p50'], 2)} ms (p99 {fmt(c['p99'], 2)})"
            )
        floor = base.get("latency_floor")
        if floor:
            lines.append(
                f"  a 3-step saga's latency floor from these, with no Python at all: "
                f"{floor['transactions']} transactions x {fmt(floor['transaction_ms'], 2)} ms + "
                f"{floor['hops']} broker hops x {fmt(floor['hop_p50_ms'], 2)} ms = "
                f"{fmt(floor['floor_ms'], 1)} ms"
            )

    runs = [(k, results[k]) for k in ("throughput",) if k in results]
    if runs:
        lines += ["", "Throughput (closed loop)"]
        rows = []
        for key, r in runs:
            rows.append(
                [
                    f"{key}: {r['coordinators']} coordinator(s)",
                    r["sagas"],
                    r["concurrency"],
                    r["sagas_per_s"],
                    r["steps_per_s"],
                    r["not_completed"],
                    r["errors"],
                ]
            )
        lines += table(
            rows, ["run", "sagas", "in flight", "sagas/s", "steps/s", "not completed", "errors"]
        )
        for key, r in runs:
            lines += _disturbed(key, r)
        for key, r in runs:
            lines.append(f"  {key}:")
            lines += table(
                [
                    _lat_row("start->terminal", r["start_to_terminal_ms"]),
                    _lat_row("  in coordinator (DB)", r["db_created_to_terminal_ms"]),
                    _lat_row("StartSaga RPC", r["start_saga_rpc_ms"]),
                ],
                _LAT_HEADER,
            )
        for key, r in runs:
            steady = r.get("steady", {})
            if "per_saga" in steady:
                lines.append(
                    f"  {key}, steady state ({steady['sagas']} sagas between 20% and 80% done): "
                    f"{fmt(steady['sagas_per_s'])} sagas/s; per saga in each database:"
                )
                lines += table(
                    [
                        [db.rsplit("_", 1)[-1], *(v[k] for k in _DB_KEYS)]
                        for db, v in steady["per_saga"].items()
                    ],
                    ["database", *_DB_KEYS],
                )
        if "throughput" in results:
            lines += _breakdown("throughput run", results["throughput"])
        t = results.get("throughput", {})
        if "ratios" in t:
            ra = t["ratios"]
            lines += [
                "  vs baselines (throughput run):",
                f"    transitions/s {fmt(ra['transitions_per_s'])} (StartSaga + replies applied;"
                f" {fmt(ra['history_rows_per_s'])} history rows/s) / pgbench tps = "
                f"{fmt(ra.get('transitions_vs_pgbench'), 3)}",
                f"    messages/s {fmt(ra['messages_per_s'])} (commands + replies, each published "
                f"with confirm and consumed with ack) / broker = "
                f"{fmt(ra.get('messages_vs_broker'), 3)}",
            ]

    lat = results.get("latency")
    if lat:
        lines += [
            "",
            f"Latency (open loop, {lat['rate']} sagas/s for {lat['duration_s']} s, measured "
            f"from the scheduled send time): achieved {fmt(lat['sagas_per_s'])} sagas/s, "
            f"{lat['not_completed']} not completed",
        ]
        lines += table(
            [
                _lat_row("start->terminal", lat["start_to_terminal_ms"]),
                _lat_row("  in coordinator (DB)", lat["db_created_to_terminal_ms"]),
                _lat_row("StartSaga RPC", lat["start_saga_rpc_ms"]),
                _lat_row("send lag (harness)", lat["send_lag_ms"]),
            ],
            _LAT_HEADER,
        )
        floor = base.get("latency_floor")
        p50 = lat["start_to_terminal_ms"].get("p50")
        if floor and p50 is not None:
            lines.append(
                f"  start->terminal p50 / the baselines' floor ({fmt(floor['floor_ms'], 1)} ms) = "
                f"{fmt(p50 / floor['floor_ms'], 2)}"
            )
        lines += _disturbed("latency run", lat)
        lines += _breakdown("latency run", lat)

    fan = results.get("fanout")
    if fan:
        graph, line = fan["fanout"], fan["line4"]
        lines += [
            "",
            f"Steps side by side (open loop, {graph['rate']} sagas/s for {graph['duration_s']} s"
            " each): one step then 3 independent ones (2 deep) against the same 4 steps in a "
            "line (4 deep)",
        ]
        lines += table(
            [
                _lat_row("fan-out, 2 deep", graph["start_to_terminal_ms"]),
                _lat_row("line, 4 deep", line["start_to_terminal_ms"]),
            ],
            _LAT_HEADER,
        )
        ratio = fan["ratio"]
        lines.append(
            f"  start->terminal fan-out / line: p50 {fmt(ratio['p50'], 3)}, p99 "
            f"{fmt(ratio['p99'], 3)} (the depth alone would make it 0.5)"
        )
        lines += _disturbed("fan-out run", graph) + _disturbed("line run", line)

    starting = results.get("starts")
    if starting:
        single, batch, ratio = starting["single"], starting["batch"], starting["ratio"]
        lines += [
            "",
            f"Starting sagas ({single['sagas']} each way; no participant: until every first "
            f"command is relayed): StartSaga with {starting['concurrency']} in flight against "
            f"StartSagas in chunks of {starting['chunk']}, one call at a time",
        ]
        lines += table(
            [
                [
                    label,
                    run["calls"],
                    fmt(run["sagas_per_s"]),
                    fmt(run["answered_s"], 2),
                    fmt(run["relayed_s"], 2),
                    fmt(run["coordinator_cpu_ms_per_saga"], 3),
                    fmt(run["postgres_cpu_ms_per_saga"], 3),
                ]
                for label, run in (("StartSaga", single), ("StartSagas", batch))
            ],
            ["", "calls", "sagas/s", "answered s", "relayed s", "coord CPU ms", "PG CPU ms"],
        )
        lines.append(
            f"  StartSagas / StartSaga: sagas/s {fmt(ratio['sagas_per_s'], 2)}x, coordinator CPU "
            f"per saga {fmt(ratio['coordinator_cpu_ms_per_saga'], 3)}, PostgreSQL CPU per saga "
            f"{fmt(ratio['postgres_cpu_ms_per_saga'], 3)}"
        )
        lines += _disturbed("starts run", starting)

    watching = results.get("watchers")
    if watching:
        streams = watching["watchers"]
        lines += [
            "",
            f"WatchSaga streams (closed loop, 1 coordinator): without watchers, then with one"
            f" stream per saga in flight ({streams['peak_concurrent']} open at most,"
            f" {streams['streams']} in all, {streams['messages']} messages) and without again,"
            " each with-run set against the runs on either side",
        ]
        lines += table(
            [
                [
                    "with watchers" if r["watchers"] else "no watchers",
                    fmt(r["sagas_per_s"]),
                    fmt(r["p50_ms"]),
                    fmt(r["coordinator_cpu_ms_per_saga"], 3),
                    fmt(r["coordinator_cpu_pct"]),
                ]
                for r in watching["runs"]
            ],
            ["", "sagas/s", "p50 ms", "coord CPU ms/saga", "coord CPU %"],
        )
        by_round = watching.get("coordinator_cpu_increase_pct_by_round")
        lines.append(
            f"  watchers: coordinator CPU per saga {watching['coordinator_cpu_increase_pct']:+}%"
            + (f" (median; by round {', '.join(f'{x:+}%' for x in by_round)})" if by_round else "")
            + f", {watching['coordinator_cpu_extra_pct_of_core']:+}% of a core"
            + (
                f", {watching['coordinator_cpu_ms_per_stream']} ms per stream"
                if "coordinator_cpu_ms_per_stream" in watching
                else ""
            )
            + f"; sagas/s ratio {fmt(watching['sagas_per_s_ratio'], 3)}; streams ended"
            f" {streams['ended']}, errors {len(streams['errors'])}"
        )
        for i, r in enumerate(watching["runs"]):
            lines += _disturbed(f"watchers run {i + 1}", r)

    sweep = results.get("sweep")
    if sweep:
        lines += ["", "Latency against offered load (open loop)"]
        lines += table(
            [
                [
                    r["rate"],
                    r["sagas_per_s"],
                    r["start_to_terminal_ms"]["p50"],
                    r["start_to_terminal_ms"]["p95"],
                    r["start_to_terminal_ms"]["p99"],
                    r["not_completed"],
                ]
                for r in sweep
            ],
            ["offered/s", "achieved/s", "p50 ms", "p95 ms", "p99 ms", "not completed"],
        )
        for r in sweep:
            lines += _disturbed(f"sweep {r['rate']:g}/s", r)

    res = results.get("resources")
    if res:
        lines += [
            "",
            f"Resources during the throughput run ({res['sagas']} sagas, "
            f"{fmt(res['wall_s'])} s; machine {fmt(res['machine_busy_pct'])}% busy, of which "
            f"{fmt(res.get('others_cpu_pct'))}% not by the processes below)",
        ]
        rows = [
            [
                name,
                p["cpu_s"],
                p["cpu_s_per_1000_sagas"],
                p["cpu_pct"],
                _main_pct(p, res["wall_s"]),
                p.get("peak_rss_mb"),
            ]
            for name, p in res["processes"].items()
        ]
        lines += table(
            rows,
            ["process", "CPU s", "CPU s/1000 sagas", "CPU %", "main thread %", "peak RSS MiB"],
        )
        lines.append(
            f"  system under test: {fmt(res['total_cpu_ms_per_saga'], 2)} ms CPU per saga "
            "(all of the above but the harness; the broker counted whole)"
        )

    stored = results.get("stored")
    if stored:
        lines += ["", "Reads against stored sagas (one call at a time)"]
        rows = []
        for s in stored:
            rows.append(
                [
                    s["stored"],
                    s["get_saga_ms"]["p50"],
                    s["get_saga_ms"]["p99"],
                    (s.get("get_saga_recent_ms") or {}).get("p99"),
                    s["list_active_first_page_ms"]["p50"],
                    s["list_active_first_page_ms"]["p99"],
                    s["list_active_next_page_ms"]["p99"],
                    (s.get("list_sagas_first_page_ms") or {}).get("p99"),
                    (s.get("list_sagas_next_page_ms") or {}).get("p99"),
                    s["coordinator_rss_mb"],
                    s["grow"]["database_mb"],
                    s["grow"]["generate_s"],
                ]
            )
        lines += table(
            rows,
            [
                "stored sagas",
                "GetSaga p50",
                "GetSaga p99",
                "recent p99",
                "ListActive p50",
                "ListActive p99",
                "next page p99",
                "ListSagas p99",
                "next page p99",
                "coord RSS MiB",
                "DB MiB",
                "generate s",
            ],
        )
        for st in stored:
            lines += _disturbed(f"reads at {st['stored']:,}", st)

    # A run saved before the rounds (bench/variants.py) has one figure per variant and
    # none of the rounds' keys: its JSON still holds them.
    if "rounds" in results.get("observability", {}):
        lines += observability.render(results["observability"])
    if "rounds" in results.get("events", {}):
        lines += variants.render(
            results["events"],
            title="Domain events' cost (closed loop; off: none, on: one event per step; CPU ="
            " coordinator + participants)",
        )

    if "rounds" in results.get("security", {}):
        lines += variants.render(
            results["security"],
            title="TLS, tokens and signing's cost (closed loop; on: gRPC over TLS with a token,"
            " every command and reply signed; CPU = coordinator + participants)",
            notes=security.notes(results["security"]),
        )

    # Before the rounds, "scaling" was one run on the throughput phase's system.
    if "rounds" in results.get("scaling", {}):
        lines += variants.render(
            results["scaling"],
            title="Replicas (closed loop; off: 1 coordinator, on: 2 on the same database, the"
            " load spread over both; CPU = coordinators + participants)",
        )

    lines += _peers(results.get("peers")) + _growth(results)

    targets = results.get("targets")
    if targets:
        lines += ["", "Targets (issues 6, 16, 17, 19, 20 and 21)"]
        lines += table(
            [
                [
                    t["target"],
                    t["measured"],
                    ("PASS" if t["met"] else "FAIL") + ("" if t["valid"] else " (disturbed run)"),
                ]
                for t in targets
            ],
            ["target", "measured", ""],
        )
    lines.append("=" * 78)
    return "\n".join(lines)


def write_json(results: dict[str, Any], path: Path) -> None:
    path.write_text(json.dumps(results, indent=2, sort_keys=False) + "\n")


def plot(results: dict[str, Any], path: Path) -> bool:
    """Latency percentiles against achieved throughput; False if matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    open_runs = list(results.get("sweep", []))
    if "latency" in results:
        open_runs.append(results["latency"])
    # In offered-load order: past saturation the achieved rate stops growing (or drops)
    # while latency explodes, which is what the curve is for.
    open_runs.sort(key=lambda r: r["rate"])
    closed = [(k, results[k]) for k in ("throughput",) if k in results]
    fig, ax = plt.subplots(figsize=(10, 5), dpi=110)
    styles = {"p50": "o-", "p95": "s-", "p99": "^-"}
    for pct, style in styles.items():
        if open_runs:
            ax.plot(
                [r["sagas_per_s"] for r in open_runs],
                [r["start_to_terminal_ms"][pct] for r in open_runs],
                style,
                label=f"open loop {pct}",
            )
    for r in open_runs:
        note = f"offered {r['rate']:g}/s" + (" (disturbed)" if r.get("disturbed") else "")
        ax.annotate(
            note,
            (r["sagas_per_s"], r["start_to_terminal_ms"]["p99"]),
            textcoords="offset points",
            xytext=(4, 6),
            fontsize=7,
            color="dimgrey",
        )
    markers = {"throughput": "*"}
    for key, r in closed:
        for pct in ("p50", "p99"):
            ax.plot(
                [r["sagas_per_s"]],
                [r["start_to_terminal_ms"][pct]],
                markers[key],
                markersize=12,
                label=f"closed loop, {r['coordinators']} coord., C={r['concurrency']} {pct}",
            )
    ax.axhline(15, color="grey", linestyle=":", linewidth=1, label="target p50 at 100/s (15 ms)")
    ax.axhline(50, color="grey", linestyle="--", linewidth=1, label="target p99 at 100/s (50 ms)")
    ax.set_xlabel("throughput (sagas/s completed)")
    ax.set_ylabel("start -> terminal latency (ms)")
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    meta = results["meta"]
    ax.set_title(f"Sagaplane standard workload ({meta['mode']}, {meta['started_at'][:16]})")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def main() -> None:
    """``python -m bench.report RESULTS.json``: print a saved run's table, redraw its plot."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m bench.report")
    parser.add_argument("json", type=Path)
    args = parser.parse_args()
    results = json.loads(args.json.read_text())
    print(render(results))
    png = args.json.with_suffix(".png")
    if plot(results, png):
        print(f"plot: {png}")


if __name__ == "__main__":
    main()
