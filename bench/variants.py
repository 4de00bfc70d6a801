"""Variants of the system compared in one benchmark run, on a machine that cannot be
trusted to stay as quiet as it was (``--phases observability``, ``events``, ``security``).

Every variant runs once in each of ``--variant-rounds`` rounds, each run on a fresh
system, the order alternating: A B C, then C B A, then A B C, ... Why: on a shared
2-core machine two runs of the same code differ by 10-15% (bench/README.md), and a
machine that gets busier (or quieter) during a phase makes whichever variant runs last
look dearer (or cheaper). Alternated, each variant runs early as often as late, so a
steady drift weighs on all of them alike (exactly over an even number of rounds).

What is compared, per variant against the baseline (the first one, "off"):

- the median over the rounds of sagas/s and of the system's CPU per saga;
- the *paired* ratios: the variant's sagas/s over the baseline's of the SAME round (runs
  minutes apart, not the whole phase apart), and their median, on which a budget is
  judged (one disturbed round does not move a median of three);
- the ratio of the medians, printed beside for comparison;
- the CPU per saga's increase (the median of its paired ratios): CPU spent per saga
  moves less than sagas/s when someone else takes the CPU, so it is the steadier figure.

The pure parts (:func:`round_orders`, :func:`median`, :func:`compare`) are unit-tested;
:func:`run_rounds` drives the runs and :func:`render` prints the result.
"""

from __future__ import annotations

import statistics
from collections.abc import Awaitable, Callable, Collection, Iterable, Mapping, Sequence
from typing import Any

from bench import stats
from bench.tables import fmt, table

Figures = Mapping[str, Any]
"""One run's figures: at least ``sagas_per_s`` and ``cpu_ms_per_saga`` (see
``bench.cli._observed_loop``), ``not_completed`` and ``disturbed``."""

Run = Callable[[str, int], Awaitable[dict[str, Any]]]
"""Runs one variant on a fresh system: (its name, the round, from 1) -> its figures."""


def round_orders(names: Sequence[str], rounds: int) -> list[list[str]]:
    """The order of the variants in each round: as given in odd rounds (the 1st, 3rd,
    ...), reversed in even ones."""
    if rounds < 1:
        raise ValueError(f"at least one round is needed, not {rounds}")
    return [list(names) if r % 2 == 0 else list(reversed(names)) for r in range(rounds)]


def median(values: Iterable[float | None]) -> float | None:
    """The median of the values that are there (None for none): of two, their mean."""
    found = [v for v in values if v is not None]
    return float(statistics.median(found)) if found else None


def ratio(a: float | None, b: float | None) -> float | None:
    """``a / b`` unrounded (medians are taken of these), or None when either is missing
    or ``b`` is 0."""
    return stats.ratio(a, b, digits=None)


def _round(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


async def run_rounds(
    names: Sequence[str],
    run: Run,
    *,
    rounds: int,
    phase: str,
    progress: Callable[[str], None],
    labels: Mapping[str, str] | None = None,
) -> dict[str, list[dict[str, Any]]]:
    """Every variant once per round, in :func:`round_orders`' order; each variant's
    figures in round order (the dict in the order of ``names``). ``labels`` say what
    each variant is in the progress lines."""
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    for n, order in enumerate(round_orders(names, rounds), 1):
        for name in order:
            progress(f"{phase}: round {n}/{rounds}, {(labels or {}).get(name, name)}")
            runs[name].append(await run(name, n))
    return runs


def summary(runs: Sequence[Figures]) -> dict[str, Any]:
    """One variant over its rounds: the medians, every round's figures, the sagas that
    did not complete and the disturbances (each named by its round)."""
    speeds = [r.get("sagas_per_s") for r in runs]
    cpus = [r.get("cpu_ms_per_saga") for r in runs]
    return {
        "sagas_per_s": _round(median(speeds), 1),
        "cpu_ms_per_saga": _round(median(cpus), 3),
        "rounds_sagas_per_s": speeds,
        "rounds_cpu_ms_per_saga": cpus,
        "not_completed": sum(int(r.get("not_completed") or 0) for r in runs),
        "disturbed": [
            f"round {n}: {d}" for n, r in enumerate(runs, 1) for d in r.get("disturbed") or []
        ],
    }


def _against_services(runs: Sequence[Figures]) -> list[float | None]:
    # Our processes' CPU per saga over PostgreSQL's and RabbitMQ's in the same run.
    return [ratio(r.get("cpu_ms_per_saga"), r.get("services_cpu_ms_per_saga")) for r in runs]


def paired(variant: Sequence[Figures], baseline: Sequence[Figures], key: str) -> list[float | None]:
    """Per round, the variant's ``key`` over the baseline's of the same round."""
    return [ratio(v.get(key), b.get(key)) for v, b in zip(variant, baseline, strict=True)]


def compare(
    runs: Mapping[str, Sequence[Figures]],
    *,
    baseline: str,
    budgets: Mapping[str, float],
    left_out: Collection[str] = (),
) -> dict[str, Any]:
    """The rounds of every variant (``runs``, in the order the variants were given to
    :func:`run_rounds`) summed up and compared with ``baseline``'s.

    Returns ``rounds``, ``order``, ``runs`` (as given), ``variants`` (each one's
    :func:`summary`), ``comparisons`` (per variant but the baseline and ``left_out``:
    paired ratios of sagas/s and of CPU per saga, their medians, the ratio of the
    medians, and for a variant with a budget its verdict), ``ratios`` (the median paired
    sagas/s ratio of each compared variant: the judged figure), ``within_budget`` (per
    variant with a budget: that median is at least 1 - its budget) and ``budgets``."""
    base = runs[baseline]
    summaries = {name: summary(r) for name, r in runs.items()}
    found: dict[str, Any] = {
        "rounds": len(base),
        "baseline": baseline,
        "order": round_orders(list(runs), len(base)),
        "runs": {name: list(r) for name, r in runs.items()},
        "variants": summaries,
        "comparisons": {},
        "ratios": {},
        "within_budget": {},
        "budgets": dict(budgets),
    }
    for name, rounds in runs.items():
        if name == baseline or name in left_out:
            continue
        speed = paired(rounds, base, "sagas_per_s")
        cpu = paired(rounds, base, "cpu_ms_per_saga")
        steady = [
            ratio(a, b)
            for a, b in zip(_against_services(rounds), _against_services(base), strict=True)
        ]
        steady_ratio = median(steady)
        judged = _round(median(speed), 3)
        cpu_ratio = median(cpu)
        comparison: dict[str, Any] = {
            "paired_sagas_per_s": [_round(r, 3) for r in speed],
            "paired_median": judged,
            "ratio_of_medians": _round(
                ratio(summaries[name]["sagas_per_s"], summaries[baseline]["sagas_per_s"]), 3
            ),
            "paired_cpu_per_saga": [_round(r, 3) for r in cpu],
            "cpu_increase_pct": None if cpu_ratio is None else round(100 * (cpu_ratio - 1), 1),
            # The same against PostgreSQL's and RabbitMQ's own CPU per saga in each run:
            # a machine that runs slower for a while slows every process alike (seen here:
            # every process's CPU per saga up 18% in one run of four identical ones), and
            # this ratio cancels it. Not judged (the budget is on sagas/s); it tells what
            # the feature itself costs when the judged figure is lost in the machine's noise.
            "paired_cpu_against_services": [_round(r, 3) for r in steady],
            "cpu_against_services_increase_pct": None
            if steady_ratio is None
            else round(100 * (steady_ratio - 1), 1),
        }
        found["ratios"][name] = judged
        if name in budgets and judged is not None:
            # Judged on the figure as printed (3 digits): a printed 0.950 passes a 5% budget.
            floor = round(1 - budgets[name], 6)
            within = judged >= floor
            comparison |= {
                "budget": budgets[name],
                "within_budget": within,
                # How many rounds alone would have passed: rounds that disagree say the
                # machine moved more than the budget, whatever the median says.
                "rounds_within_budget": sum(
                    1 for r in comparison["paired_sagas_per_s"] if r is not None and r >= floor
                ),
            }
            found["within_budget"][name] = within
        found["comparisons"][name] = comparison
    return found


async def on_against_off(
    run: Run,
    *,
    budget: float,
    rounds: int,
    phase: str,
    progress: Callable[[str], None],
    labels: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """A feature's cost: ``off`` and ``on`` in ``rounds`` alternating rounds,
    :func:`compare`-d, with ``on``'s judged figure as ``ratio``, ``budget``, and its
    verdict as ``within_budget`` (a bool here: the keys of the phases' JSON from before
    the rounds, kept)."""
    runs = await run_rounds(
        ["off", "on"], run, rounds=rounds, phase=phase, progress=progress, labels=labels
    )
    found = compare(runs, baseline="off", budgets={"on": budget})
    return {
        **found,
        "ratio": found["ratios"].get("on"),
        "budget": budget,
        "within_budget": found["within_budget"].get("on", False),
    }


def verdict_text(found: Mapping[str, Any], name: str) -> str:
    """One line on a compared variant: its paired ratios and their median, the ratio of
    the medians, the CPU per saga's increase, and the verdict on its budget."""
    c = found["comparisons"][name]
    base = found["baseline"]
    pairs = " ".join(fmt(r, 3) for r in c["paired_sagas_per_s"])
    cpus = " ".join(
        "-" if r is None else f"{100 * (r - 1):+.1f}%" for r in c["paired_cpu_per_saga"]
    )
    increase = c["cpu_increase_pct"]
    text = (
        f"{name} / {base}: sagas/s by round {pairs}, median {fmt(c['paired_median'], 3)}"
        f" (ratio of medians {fmt(c['ratio_of_medians'], 3)}); CPU per saga by round {cpus},"
        f" median {'-' if increase is None else f'{increase:+.1f}%'}"
    )
    steady = c.get("cpu_against_services_increase_pct")
    if steady is not None:
        by_round = " ".join(
            "-" if r is None else f"{100 * (r - 1):+.1f}%"
            for r in c.get("paired_cpu_against_services", [])
        )
        text += (
            f"; against PostgreSQL's and RabbitMQ's own: by round {by_round}, median {steady:+.1f}%"
        )
    if "budget" in c:
        text += f"; may cost {100 * c['budget']:.0f}%: " + (
            "within budget" if c["within_budget"] else "OVER BUDGET"
        )
        rounds = len(c["paired_sagas_per_s"])
        if rounds > 1 and "rounds_within_budget" in c:
            text += f" ({c['rounds_within_budget']} of {rounds} rounds within)"
    return text


def render(
    found: Mapping[str, Any], *, title: str, notes: Mapping[str, Sequence[str]] | None = None
) -> list[str]:
    """The report's lines for a variant phase: every round's sagas/s and CPU per saga
    with their medians, then each compared variant's :func:`verdict_text`, ``notes``
    per variant, and the disturbances."""
    rounds = found["rounds"]
    order = " | ".join(" ".join(names) for names in found["order"])
    lines = [
        "",
        title,
        f"  {rounds} round{'s' if rounds != 1 else ''}, a fresh system for every run, the"
        f" order alternating: {order}",
    ]
    nth = [f"r{n}" for n in range(1, rounds + 1)]
    rows = []
    for name, v in found["variants"].items():
        rows.append(
            [
                name,
                *(fmt(x, 1) for x in v["rounds_sagas_per_s"]),
                fmt(v["sagas_per_s"], 1),
                *(fmt(x, 2) for x in v["rounds_cpu_ms_per_saga"]),
                fmt(v["cpu_ms_per_saga"], 2),
                v["not_completed"],
            ]
        )
    header = ["variant", f"sagas/s {nth[0]}", *nth[1:], "median"]
    header += [f"CPU ms/saga {nth[0]}", *nth[1:], "median", "not completed"]
    lines += table(rows, header)
    for name in found["comparisons"]:
        lines.append("  " + verdict_text(found, name))
    for name, extra in (notes or {}).items():
        lines += [f"  {name}: {line}" for line in extra]
    for name, v in found["variants"].items():
        lines += [f"  !! {name} DISTURBED (not valid): {d}" for d in v["disturbed"]]
    return lines
