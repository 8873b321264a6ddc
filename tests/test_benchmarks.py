"""The benchmark suite runs end to end in its tiny mode: structure is checked, not figures."""

from __future__ import annotations

import json

import pytest

from benchmarks.__main__ import main
from benchmarks.contenders import BASELINE, CONTENDERS, KATSDPTELSTATE
from benchmarks.harness import FAILED, NOT_APPLICABLE, NOT_BUILT, OK
from benchmarks.workloads import FAMILIES

# Families that run on katsdptelstate as well as on telstate.
SHARED_FAMILIES = {"writes", "reads", "wait_key", "rdb", "archive"}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    output = tmp_path_factory.mktemp("results")
    paths = main(["--scale", "tiny", "--output", str(output), "--workdir", str(output)])
    return paths, json.loads(paths["json"].read_text())


def test_writes_every_output(run):
    paths, _ = run
    assert paths["markdown"].name == "tiny.md"
    assert paths["chart"].read_bytes().startswith(b"\x89PNG")
    text = paths["markdown"].read_text()
    for family in FAMILIES:
        assert f"## {family.name}" in text
    assert "## Targets" in text


def test_json_describes_the_run(run):
    _, document = run
    assert document["scale"]["name"] == "tiny"
    assert {"cpu", "cores", "disk", "memory_gb", "packages"} <= set(document["machine"])
    assert {c["name"] for c in document["contenders"]} == {c.name for c in CONTENDERS}
    assert {row["family"] for row in document["rows"]} == {f.name for f in FAMILIES}
    assert document["targets"]
    assert all(t["verdict"] in ("met", "MISSED", "n/a", "reported") for t in document["targets"])


def test_batch_adds_are_compared_with_the_bare_commit_without_sync(run):
    _, document = run
    floor = [
        t
        for t in document["targets"]
        if t["reference"] == "bare LMDB commit (no sync)" and t["row"].startswith("add ")
    ]
    assert {t["row"] for t in floor} == {"add mutable float", "add mutable 8 KB ndarray"}
    for verdict in floor:
        assert verdict["verdict"] == "reported" and verdict["threshold"] is None
        assert verdict["measured"] > 0


def test_remote_writes_are_compared_with_their_floor(run):
    # The bare consumer's columns: measured, and the ratios to them reported, not judged.
    _, document = run
    remote = [row for row in document["rows"] if row["family"] == "remote writes"]
    assert remote
    for row in remote:
        for name in ("bare LMDB commit (fsync)", "bare LMDB commit (no sync)"):
            cell = row["cells"][name]
            assert cell["status"] == OK and cell["median"] > 0, (row["row"], name, cell)
    floor = {
        (t["row"], t["reference"]): t
        for t in document["targets"]
        if t["reference"] is not None and t["reference"].startswith("bare LMDB commit")
    }
    for key in (
        ("remote add throughput, 8 writer processes", "bare LMDB commit (no sync)"),
        ("remote add, 8 writers over 1 (group commit)", "bare LMDB commit (fsync)"),
    ):
        verdict = floor[key]
        assert verdict["verdict"] == "reported" and verdict["threshold"] is None
        assert verdict["measured"] > 0


def test_every_cell_is_measured_or_says_why_not(run):
    _, document = run
    packages = {c.name: c.package for c in CONTENDERS}
    for row in document["rows"]:
        for name, cell in row["cells"].items():
            assert cell["status"] in (OK, NOT_BUILT, NOT_APPLICABLE, FAILED)
            if cell["status"] == OK:
                assert len(cell["rounds"]) >= 1
                assert cell["min"] <= cell["median"] <= cell["max"]
            else:
                assert cell["note"] and not cell["rounds"]
            # katsdptelstate and the bare commit depend on no part of telstate.
            if packages[name] in (KATSDPTELSTATE, BASELINE):
                assert cell["status"] in (OK, NOT_APPLICABLE), (row["row"], name, cell)


def test_ratios_are_against_the_best_katsdptelstate_contender(run):
    _, document = run
    for row in document["rows"]:
        if row["family"] not in SHARED_FAMILIES:
            continue
        assert row["baseline"] is not None and row["baseline"].startswith("katsdptelstate")
        assert row["cells"][row["baseline"]]["ratio"] == pytest.approx(1.0)
