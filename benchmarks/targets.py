"""The targets of the benchmark issue, checked against the figures of one run.

A relative target compares two contenders measured side by side in the
same run (speed-up of `contender` over `reference`, whatever the unit); an
absolute one compares a median with a fixed figure.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .harness import OK, Row, RowResult, speedup
from .workloads import archive, followers, log, rdb, reads, remote, replication, writes

LMDB_BATCH = "telstate lmdb (batch)"
LMDB_FSYNC = "telstate lmdb (fsync)"
KATSDP_MEMORY = "katsdptelstate memory"
KATSDP_REDIS = "katsdptelstate redis"
BARE = "bare LMDB commit (fsync)"
BARE_NO_SYNC = "bare LMDB commit (no sync)"

#: REPORTED: a ratio worth seeing beside the targets, with no threshold to judge it by.
MET, MISSED, NOT_MEASURED, REPORTED = "met", "MISSED", "n/a", "reported"


@dataclass(frozen=True)
class Target:
    """One line of the issue's target table.

    Parameters
    ----------
    text
        The target as the issue states it.
    rows
        Rows it applies to; empty for every row both contenders have.
    contender
        Whose figure is judged.
    reference
        The contender it is compared with, or None for an absolute target.
    threshold
        Least speed-up over `reference`; for an absolute target, the figure
        to beat in the row's unit (at least it, or for a time, below it).
        None: the ratio is reported, not judged (a reference point, not a
        target of the issue).
    """

    text: str
    rows: tuple[Row, ...]
    contender: str
    reference: str | None
    threshold: float | None


_ADDS = (writes.ADD_FLOAT, writes.ADD_ARRAY, writes.ADD_IMMUTABLE)

TARGETS: tuple[Target, ...] = (
    Target("lmdb `batch` add ≥ 0.5x katsdptelstate memory", _ADDS, LMDB_BATCH, KATSDP_MEMORY, 0.5),
    Target("lmdb `batch` add ≥ 10x katsdptelstate redis", _ADDS, LMDB_BATCH, KATSDP_REDIS, 10.0),
    Target(
        "lmdb get / get_indexed ≥ 1.0x katsdptelstate memory",
        (reads.GET_LATEST, reads.GET_ATTRIBUTE, reads.GET_INDEXED),
        LMDB_BATCH,
        KATSDP_MEMORY,
        1.0,
    ),
    Target(
        "lmdb get_range, full history ≥ 1.5x katsdptelstate memory",
        (reads.RANGE_HISTORY,),
        LMDB_BATCH,
        KATSDP_MEMORY,
        1.5,
    ),
    Target(
        "lmdb `fsync` add ≤ 1.5x a bare LMDB commit with fsync (speed ≥ 0.67x)",
        (writes.ADD_FLOAT, writes.ADD_ARRAY),
        LMDB_FSYNC,
        BARE,
        1 / 1.5,
    ),
    Target(
        "lmdb `batch` add against a bare LMDB commit without sync (the floor without writemap)",
        (writes.ADD_FLOAT, writes.ADD_ARRAY),
        LMDB_BATCH,
        BARE_NO_SYNC,
        None,
    ),
    Target(
        "telstate redis, every op ≥ 1.0x katsdptelstate redis",
        (),
        "telstate redis",
        KATSDP_REDIS,
        1.0,
    ),
    Target(
        "RDB load 100 MB ≥ 3x katsdptelstate + rdbtools",
        (rdb.LOAD,),
        "telstate memory",
        KATSDP_MEMORY,
        3.0,
    ),
    Target("RDB write ≥ 1.0x katsdptelstate", (rdb.WRITE,), "telstate memory", KATSDP_MEMORY, 1.0),
    Target(
        "archived full dump, in-memory load ≥ 5x katsdptelstate",
        (archive.LOAD,),
        "telstate memory",
        KATSDP_MEMORY,
        5.0,
    ),
    Target("replay / verify ≥ 300k events/s", (log.REPLAY, log.VERIFY), LMDB_BATCH, None, 300_000),
    Target(
        "replicator catch-up ≥ 50k events/s",
        (replication.CATCH_UP,),
        LMDB_BATCH,
        None,
        50_000,
    ),
    Target(
        "replicator steady lag p99 < 20 ms at 5k events/s",
        (replication.LAG_P99,),
        LMDB_BATCH,
        None,
        20.0,
    ),
    Target(
        "follower lag p99 < 50 ms at 5k events/s",
        (followers.LAG_P99,),
        LMDB_BATCH,
        None,
        50.0,
    ),
    Target(
        "follower catch-up from a 1M-event backlog ≥ 50k events/s",
        (followers.CATCH_UP,),
        LMDB_BATCH,
        None,
        50_000,
    ),
    Target(
        "remote add p50 within 3x katsdptelstate's direct write (`batch`)",
        (remote.LATENCY_P50,),
        LMDB_BATCH,
        KATSDP_REDIS,
        1 / 3,
    ),
    Target(
        "8 remote writers ≥ 0.5x katsdptelstate direct (`batch`)",
        (remote.THROUGHPUT,),
        LMDB_BATCH,
        KATSDP_REDIS,
        0.5,
    ),
    Target(
        "8 remote writers ≥ 5x one writer alone (`fsync`, group commit)",
        (remote.GAIN,),
        LMDB_FSYNC,
        None,
        5.0,
    ),
    Target(
        "8 remote writers against the floor: a bare consumer, one bare LMDB commit a batch"
        " (no sync)",
        (remote.THROUGHPUT,),
        LMDB_BATCH,
        BARE_NO_SYNC,
        None,
    ),
    Target(
        "remote group-commit gain against the floor's (`fsync`)",
        (remote.GAIN,),
        LMDB_FSYNC,
        BARE,
        None,
    ),
)


def _measured(result: RowResult, name: str) -> float | None:
    cell = result.cells.get(name)
    return cell.median if cell is not None and cell.status == OK and cell.figures else None


def _why_not(result: RowResult, names: Sequence[str]) -> str:
    for name in names:
        cell = result.cells.get(name)
        if cell is None:
            return f"{name}: not run"
        if cell.status != OK:
            return f"{name}: {cell.status}"
    return "not measured"


def evaluate(results: Sequence[RowResult]) -> list[dict[str, Any]]:
    """Every target on every row it covers: the figure and whether the target was met."""
    by_row = {result.row.name: result for result in results}
    verdicts = []
    for target in TARGETS:
        names = [target.contender] + ([target.reference] if target.reference else [])
        if target.rows:
            covered = [by_row[row.name] for row in target.rows if row.name in by_row]
            if not covered:
                continue  # its workloads were not run (--only)
        else:
            covered = [r for r in results if all(_measured(r, n) is not None for n in names)]
        if not covered:
            verdicts.append(
                {
                    "target": target.text,
                    "row": "every op",
                    "contender": target.contender,
                    "reference": target.reference,
                    "threshold": target.threshold,
                    "measured": None,
                    "verdict": NOT_MEASURED,
                    "note": "no workload measured on both",
                }
            )
        for result in covered:
            unit = result.row.unit
            value = _measured(result, target.contender)
            reference = _measured(result, target.reference) if target.reference else None
            verdict: dict[str, Any] = {
                "target": target.text,
                "row": result.row.name,
                "contender": target.contender,
                "reference": target.reference,
                "threshold": target.threshold,
            }
            if value is None or (target.reference and reference is None):
                verdict.update(measured=None, verdict=NOT_MEASURED, note=_why_not(result, names))
            elif target.reference:
                ratio = speedup(value, reference, unit)  # type: ignore[arg-type]
                if target.threshold is None:
                    verdict.update(measured=ratio, verdict=REPORTED)
                else:
                    met = ratio >= target.threshold
                    verdict.update(measured=ratio, verdict=MET if met else MISSED)
            else:
                assert target.threshold is not None, "an absolute figure needs a threshold"
                met = (
                    value >= target.threshold if unit.higher_is_better else value < target.threshold
                )
                verdict.update(measured=value, unit=unit.label, verdict=MET if met else MISSED)
            verdicts.append(verdict)
    return verdicts
