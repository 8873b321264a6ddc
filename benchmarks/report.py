"""Writing a run down: the markdown table, the JSON of every raw figure, the chart of ratios."""

from __future__ import annotations

import json
import textwrap
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from .contenders import KATSDPTELSTATE, TELSTATE, Contender
from .environment import describe_machine_line
from .harness import FAILED, NOT_APPLICABLE, NOT_BUILT, OK, RowResult, best, speedup
from .targets import MISSED

#: Chart colours by contender, steady from run to run.
_COLOURS = {
    "telstate memory": "#4c72b0",
    "telstate redis": "#dd8452",
    "telstate lmdb (fsync)": "#55a868",
    "telstate lmdb (batch)": "#2f7d32",
    "telstate lmdb (none)": "#8fd19e",
}


def baseline(result: RowResult, contenders: Sequence[Contender]) -> tuple[str, float] | None:
    """The best katsdptelstate contender of a row, and its median."""
    packages = {c.name: c.package for c in contenders}
    measured = {
        name: cell.median
        for name, cell in result.cells.items()
        if packages.get(name) == KATSDPTELSTATE and cell.status == OK and cell.figures
    }
    return best(measured, result.row.unit)  # type: ignore[arg-type]


def ratios(result: RowResult, contenders: Sequence[Contender]) -> dict[str, float]:
    """Speed-up of every measured contender of a row over its best katsdptelstate contender."""
    reference = baseline(result, contenders)
    if reference is None:
        return {}
    return {
        name: speedup(cell.median, reference[1], result.row.unit)  # type: ignore[arg-type]
        for name, cell in result.cells.items()
        if cell.status == OK and cell.figures
    }


def format_value(value: float, unit: str) -> str:
    """A figure with its unit, to three significant digits."""
    if unit in ("ops/s", "events/s"):
        for factor, suffix in ((1e6, "M"), (1e3, "k")):
            if value >= factor:
                return f"{value / factor:.3g}{suffix}"
        return f"{value:.3g}"
    return f"{value:.3g} {unit}"


def _cell_text(result: RowResult, name: str, ratio: float | None) -> str:
    cell = result.cells.get(name)
    if cell is None:
        return ""
    if cell.status == NOT_BUILT:
        return "n/a (not built)"
    if cell.status == NOT_APPLICABLE:
        return "—"
    if cell.status == FAILED:
        return "failed"
    text = format_value(cell.median, result.row.unit.label)  # type: ignore[arg-type]
    if cell.spread is not None and len(cell.figures) > 1:
        text += f" ±{cell.spread:.0%}"
    if ratio is not None:
        text += f" **{ratio:.2f}x**"
    return text


def _family_table(rows: Sequence[RowResult], contenders: Sequence[Contender]) -> list[str]:
    names = [c.name for c in contenders if any(c.name in r.cells for r in rows)]
    lines = [
        "| workload | unit | " + " | ".join(names) + " |",
        "| --- | --- |" + " ---: |" * len(names),
    ]
    for result in rows:
        row_ratios = ratios(result, contenders)
        cells = [_cell_text(result, name, row_ratios.get(name)) for name in names]
        lines.append(f"| {result.row.name} | {result.row.unit.label} | " + " | ".join(cells) + " |")
    return lines


def _notes(results: Sequence[RowResult]) -> list[str]:
    """Why cells are empty: one line per contender and reason, naming the families."""
    seen: dict[str, list[str]] = {}
    for result in results:
        for name, cell in result.cells.items():
            if cell.status in (NOT_BUILT, FAILED):
                families = seen.setdefault(f"{name}: {cell.status}: {cell.note}", [])
                if result.family not in families:
                    families.append(result.family)
    return [f"- {reason} ({', '.join(families)})" for reason, families in seen.items()]


def _verdict_line(verdict: dict[str, Any]) -> str:
    measured = verdict["measured"]
    if measured is None:
        figure = f"n/a ({verdict.get('note', '')})"
    elif verdict["reference"]:
        figure = f"{measured:.2f}x"
    else:
        figure = format_value(measured, verdict["unit"])
    mark = f"**{verdict['verdict']}**" if verdict["verdict"] == MISSED else verdict["verdict"]
    return f"| {verdict['target']} | {verdict['row']} | {figure} | {mark} |"


def markdown(run: dict[str, Any], results: Sequence[RowResult], contenders: Sequence[Contender]):
    """The report for humans: method, machine, one table per family, the targets."""
    scale = run["scale"]
    lines = [
        f"# telstate benchmarks ({scale['name']} run)",
        "",
        f"Taken {run['started']} on {describe_machine_line(run['machine'])}; "
        f"working directory on that disk. Load average {run['load_average']['start']} "
        f"at the start, {run['load_average']['end']} at the end; the run took "
        f"{run['duration_s']:.0f} s.",
        "",
        "Each cell is the median of several rounds; in each round every contender runs "
        "the workload in turn, in the same process, in rotated order. ± is half the "
        "interquartile range of the rounds, relative to the median (every round is in "
        "the JSON). "
        "**Bold** is the ratio to the best katsdptelstate contender of the row "
        "(above 1: telstate is faster, whatever the unit). Redis runs without "
        "persistence on a unix socket. n/a (not built): that part of telstate does "
        "not exist yet; —: does not apply.",
        "",
    ]
    families: dict[str, list[RowResult]] = {}
    for result in results:
        families.setdefault(result.family, []).append(result)
    for family, rows in families.items():
        about = run["families"][family]
        lines += [
            f"## {family}",
            "",
            f"{about['description']} Median of {about['rounds']} rounds.",
            "",
        ]
        lines += [*_family_table(rows, contenders), ""]
    lines += [
        "## Targets",
        "",
        "| target | workload | measured | verdict |",
        "| --- | --- | --- | --- |",
    ]
    lines += [_verdict_line(verdict) for verdict in run["targets"]]
    notes = _notes(results)
    if notes:
        lines += ["", "## Not measured", "", *notes]
    return "\n".join(lines) + "\n"


def as_json(run: dict[str, Any], results: Sequence[RowResult], contenders: Sequence[Contender]):
    """Every raw figure of the run, with the machine, sizes and targets."""
    rows = []
    for result in results:
        reference = baseline(result, contenders)
        row_ratios = ratios(result, contenders)
        cells = {}
        for name, cell in result.cells.items():
            cells[name] = {
                "status": cell.status,
                "note": cell.note,
                "median": cell.median,
                "min": min(cell.values) if cell.figures else None,
                "max": max(cell.values) if cell.figures else None,
                "spread": cell.spread,
                "ratio": row_ratios.get(name),
                "rounds": [asdict(figure) for figure in cell.figures],
            }
        rows.append(
            {
                "family": result.family,
                "row": result.row.name,
                "unit": result.row.unit.label,
                "higher_is_better": result.row.unit.higher_is_better,
                "baseline": reference[0] if reference else None,
                "cells": cells,
            }
        )
    document = dict(run)
    document["contenders"] = [
        {"name": c.name, "package": c.package, "backend": c.backend, "durability": c.durability}
        for c in contenders
    ]
    document["rows"] = rows
    return json.dumps(document, indent=1, default=str) + "\n"


def chart(path: Path, run: dict[str, Any], results: Sequence[RowResult], contenders) -> bool:
    """A bar chart of each telstate contender's ratio per row; False if there is nothing to plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [c.name for c in contenders if c.package == TELSTATE]
    plotted = [(r, ratios(r, contenders)) for r in results]
    plotted = [(r, rs) for r, rs in plotted if any(n in rs for n in names)]
    if not plotted:
        return False
    names = [n for n in names if any(n in rs for _, rs in plotted)]
    height = 0.8 / len(names)
    figure, axes = plt.subplots(figsize=(10, 1.2 + 0.45 * len(plotted) * max(1, len(names) / 2.5)))
    for i, name in enumerate(names):
        positions = [row + i * height for row in range(len(plotted))]
        values = [rs.get(name, 0) for _, rs in plotted]
        axes.barh(positions, values, height, label=name, color=_COLOURS.get(name))
    axes.set_yticks([row + 0.4 - height / 2 for row in range(len(plotted))])
    axes.set_yticklabels([r.row.name for r, _ in plotted], fontsize=8)
    axes.invert_yaxis()
    axes.set_xscale("log")
    axes.axvline(1.0, color="black", linewidth=1)
    axes.set_xlabel("speed-up over the best katsdptelstate contender (log scale; >1 is faster)")
    title = f"telstate vs katsdptelstate ({run['scale']['name']} run, {run['started'][:10]})"
    machine = textwrap.fill(describe_machine_line(run["machine"]), 110)
    axes.set_title(f"{title}\n{machine}", fontsize=8)
    axes.legend(fontsize=8, loc="lower right")
    axes.grid(axis="x", which="both", alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True


def write(
    directory: Path, stem: str, run: dict[str, Any], results: Sequence[RowResult], contenders
) -> dict[str, Path]:
    """Write `<stem>.md`, `<stem>.json` and `<stem>.png` to `directory`; return their paths."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = {"markdown": directory / f"{stem}.md", "json": directory / f"{stem}.json"}
    paths["markdown"].write_text(markdown(run, results, contenders))
    paths["json"].write_text(as_json(run, results, contenders))
    png = directory / f"{stem}.png"
    if chart(png, run, results, contenders):
        paths["chart"] = png
    return paths
