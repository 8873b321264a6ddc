"""The measuring machinery: rows, figures, cells, families and the interleaved run loop.

A *family* is one group of workloads that share a prepared store (all the
reads share one populated store, for instance). It has *cases*; a case is
one timed thing done to one contender's store, and reports one or more
*rows* of the results table (a latency case reports its p50 and p99, say).

The run loop is the honesty rule made code: every case runs on every
contender in the same process, in rounds; each round visits the
contenders in a rotated order, so that no contender always runs first
(cold) or last (after the others have filled the page cache and the heap);
the median and the spread over the rounds are what is reported.
"""

from __future__ import annotations

import gc
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .contenders import Contender, Store
    from .environment import BenchEnv
    from .scale import Scale


@dataclass(frozen=True)
class Unit:
    """How a figure reads, and which way is better."""

    label: str
    higher_is_better: bool


OPS = Unit("ops/s", True)
EVENTS = Unit("events/s", True)
SECONDS = Unit("s", False)
MILLISECONDS = Unit("ms", False)
MEGABYTES = Unit("MB", False)


@dataclass(frozen=True)
class Row:
    """One line of the results table."""

    name: str
    unit: Unit


@dataclass
class Figure:
    """One measured value of one row, from one round, with the raw numbers behind it."""

    value: float
    raw: dict[str, Any] = field(default_factory=dict)


#: Status of a cell: measured, not run (with the reason), or failed (with the error).
OK = "ok"
NOT_BUILT = "not built"
NOT_APPLICABLE = "not applicable"
FAILED = "failed"


@dataclass
class Cell:
    """Every figure of one row on one contender, or why there is none."""

    status: str = OK
    note: str = ""
    figures: list[Figure] = field(default_factory=list)

    @property
    def values(self) -> list[float]:
        return [figure.value for figure in self.figures]

    @property
    def median(self) -> float | None:
        return statistics.median(self.values) if self.figures else None

    @property
    def spread(self) -> float | None:
        """Half the interquartile range of the rounds, relative to the median (0.05: ±5%)."""
        median = self.median
        if not median or len(self.figures) < 2:
            return None
        low, _, high = statistics.quantiles(self.values, n=4, method="inclusive")
        return (high - low) / 2 / median


@dataclass
class RowResult:
    """One row of the table: its cells, by contender name."""

    family: str
    row: Row
    cells: dict[str, Cell] = field(default_factory=dict)


def throughput(
    make: Callable[[int, int], Sequence[Any]],
    run: Callable[[Sequence[Any]], None],
    total: int,
    budget: float,
    chunk: int = 100,
) -> Figure:
    """Rate of `run` over up to `total` operations, stopping once `budget` seconds were timed.

    Operations are made in chunks of up to `chunk` by ``make(start, count)``
    (untimed: the arguments of the calls) and done by ``run(chunk)``
    (timed). The budget keeps slow contenders (an fsync per write) from
    stretching the run; the rate is what counts, so stopping early is fair.
    """
    done = 0
    seconds = 0.0
    while done < total and seconds < budget:
        # Chunks grow from one operation, so that a slow contender (an fsync
        # per write on a busy disk) overshoots the budget by little.
        operations = make(done, min(chunk, max(1, done), total - done))
        start = time.perf_counter()
        run(operations)
        seconds += time.perf_counter() - start
        done += len(operations)
    return Figure(done / seconds, {"ops": done, "seconds": seconds})


def timed(run: Callable[[], Any]) -> tuple[float, Any]:
    """Seconds `run()` took, and what it returned."""
    start = time.perf_counter()
    result = run()
    return time.perf_counter() - start, result


def percentile(values: Sequence[float], fraction: float) -> float:
    """The `fraction` quantile of `values` (nearest rank; values need not be sorted)."""
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(fraction * (len(ordered) - 1))))
    return ordered[index]


def latency_figures(latencies: Sequence[float], rows: Sequence[Row], **raw: Any) -> dict:
    """p50 and p99 figures (in ms) of latencies in seconds, for a case's two rows."""
    p50, p99 = (percentile(latencies, q) * 1000 for q in (0.5, 0.99))
    summary = {
        "count": len(latencies),
        "p50_ms": p50,
        "p90_ms": percentile(latencies, 0.9) * 1000,
        "p99_ms": p99,
        "max_ms": max(latencies) * 1000,
        **raw,
    }
    return {rows[0].name: Figure(p50, summary), rows[1].name: Figure(p99, summary)}


@dataclass
class Case:
    """One timed workload of a family.

    Parameters
    ----------
    rows
        The table rows it reports (usually one).
    measure
        ``measure(fixture, round)`` runs the workload once on one
        contender's fixture and returns a figure per row (a bare Figure
        for a single row).
    applies
        ``applies(contender)`` returns None if the case runs on that
        contender, else the reason it does not (e.g. "in-process store").
    needs
        Modules a telstate contender must have for this case (a missing
        one makes the cell "not built").
    """

    rows: tuple[Row, ...]
    measure: Callable[[Any, int], Figure | dict[str, Figure]]
    applies: Callable[[Contender], str | None] = lambda contender: None
    needs: tuple[str, ...] = ()


class Family:
    """A group of cases sharing one prepared store per contender.

    Subclasses set `name`, `cases` and `needs`, and implement `setup`;
    `prepare` and `finish` bracket the family (shared input files, say).
    """

    name = ""
    #: Modules a telstate contender must have for any case of this family.
    needs: tuple[str, ...] = ()
    cases: Sequence[Case] = ()

    def describe(self, scale: Scale) -> str:
        """What the family measures and how, with its sizes, for the report."""
        return ""

    def repeats(self, scale: Scale) -> int:
        """How many rounds to run (families of long single-shot cases run fewer)."""
        return scale.repeats

    def applies(self, contender: Contender) -> bool:
        """Whether the family has a column for `contender` at all."""
        return not contender.is_baseline

    def prepare(self, env: BenchEnv) -> None:
        """Make what every contender's fixture shares (called once, untimed)."""

    def setup(self, store: Store, env: BenchEnv) -> Any:
        """Make the fixture the cases measure on, from a freshly opened store (untimed)."""
        return store

    def teardown(self, fixture: Any) -> None:
        """Release a fixture made by `setup` (its store is closed by the caller)."""

    def finish(self) -> None:
        """Release what `prepare` made."""


_STARTED = time.monotonic()


def _progress(message: str) -> None:
    print(f"{time.monotonic() - _STARTED:6.1f}s {message}", file=sys.stderr, flush=True)


def _error_note(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}".splitlines()[0][:200]


def run_family(family: Family, contenders: Sequence[Contender], env: BenchEnv) -> list[RowResult]:
    """Run every case of `family` on every contender, interleaved, in rounds."""
    columns = [c for c in contenders if family.applies(c)]
    results = {row.name: RowResult(family.name, row) for case in family.cases for row in case.rows}
    plan: list[tuple[Case, list[Contender]]] = []
    for case in family.cases:
        runners = []
        for contender in columns:
            cell = _planned_cell(family, case, contender)
            for row in case.rows:
                results[row.name].cells[contender.name] = Cell(cell.status, cell.note)
            if cell.status == OK:
                runners.append(contender)
        plan.append((case, runners))

    needed = {c.name: c for _, runners in plan for c in runners}
    if not needed:
        return list(results.values())
    _progress(f"[{family.name}] preparing")
    fixtures: dict[str, Any] = {}
    stores: dict[str, Store] = {}
    try:
        try:
            family.prepare(env)
        except Exception as error:  # noqa: BLE001 - reported in the table, not fatal
            for name in needed:
                _fail_everywhere(results, family, name, error)
            return list(results.values())
        for name, contender in needed.items():
            try:
                stores[name] = contender.open(env)
                fixtures[name] = family.setup(stores[name], env)
            except Exception as error:  # noqa: BLE001 - reported in the table, not fatal
                _fail_everywhere(results, family, name, error)
        # What the set-up made is left out of every later collection: each
        # measurement starts from a collected heap, and no contender's
        # collections have to walk the other contenders' stores.
        gc.collect()
        gc.freeze()
        repeats = family.repeats(env.scale)
        for round_ in range(repeats):
            for case, runners in plan:
                order = [c for c in runners if c.name in fixtures]
                if not order:
                    continue
                shift = round_ % len(order)
                for contender in order[shift:] + order[:shift]:
                    cells = [results[row.name].cells[contender.name] for row in case.rows]
                    if cells[0].status != OK:
                        continue  # failed in an earlier round
                    _progress(
                        f"[{family.name}] round {round_ + 1}/{repeats} "
                        f"{case.rows[0].name} · {contender.name}"
                    )
                    gc.collect()
                    try:
                        measured = case.measure(fixtures[contender.name], round_)
                    except Exception as error:  # noqa: BLE001
                        traceback.print_exc(file=sys.stderr)
                        for cell in cells:
                            cell.status, cell.note, cell.figures = FAILED, _error_note(error), []
                        continue
                    if isinstance(measured, Figure):
                        measured = {case.rows[0].name: measured}
                    for row, cell in zip(case.rows, cells):
                        cell.figures.append(measured[row.name])
    finally:
        gc.unfreeze()
        for name, store in stores.items():
            if name in fixtures:
                _quietly(family.teardown, fixtures[name])
            _quietly(store.close)
        _quietly(family.finish)
    return list(results.values())


def _quietly(release: Callable[..., Any], *args: Any) -> None:
    """Call `release`, reporting an error instead of raising it, so the rest is released too."""
    try:
        release(*args)
    except Exception:  # noqa: BLE001
        traceback.print_exc(file=sys.stderr)


def _planned_cell(family: Family, case: Case, contender: Contender) -> Cell:
    """An empty cell to be measured, or one that says why it will not be."""
    missing = contender.unavailable(family.needs + case.needs)
    if missing is not None:
        return Cell(*missing)
    reason = case.applies(contender)
    if reason is not None:
        return Cell(NOT_APPLICABLE, reason)
    return Cell()


def _fail_everywhere(
    results: dict[str, RowResult], family: Family, contender: str, error: BaseException
) -> None:
    traceback.print_exc(file=sys.stderr)
    for case in family.cases:
        for row in case.rows:
            cell = results[row.name].cells[contender]
            if cell.status == OK:
                cell.status, cell.note = FAILED, f"setup: {_error_note(error)}"


def speedup(value: float, reference: float, unit: Unit) -> float:
    """How many times better `value` is than `reference` (above 1: better, whatever the unit)."""
    return value / reference if unit.higher_is_better else reference / value


def best(values: dict[str, float], unit: Unit) -> tuple[str, float] | None:
    """The best (name, value) of `values` for `unit`, or None if there are none."""
    if not values:
        return None
    pick = max if unit.higher_is_better else min
    name = pick(values, key=values.__getitem__)
    return name, values[name]
