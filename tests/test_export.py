"""Light and full exports: key selection by patterns and views, and exports of past states.

Exported files are read back by katsdptelstate 1.0.0, whose own key
matching (``TelescopeState.keys(pattern)``) and views are the reference for
which keys a light file and a view export must hold.
"""

from __future__ import annotations

import io
import itertools
import json

import katsdptelstate
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from telstate import TelescopeState, cli
from telstate.backend import Record
from telstate.export import KeySelection, read_key_patterns, select_records
from telstate.lmdb import LmdbBackend, replay
from telstate.memory import MemoryBackend
from telstate.utils import KeyType

T0 = 1_700_000_000.0
CBID = "1700000000"
# Starts like CBID: a prefix test that forgets the separator takes its keys too.
OTHER_CBID = "17000000001"

LIGHT_PATTERNS = """\
# the light file of a capture block

*_obs_*
m???_observer
   m???_target
[#]literal
"""


@pytest.fixture
def store(tmp_path):
    """A store shaped like a capture block's telescope state, written over many events."""
    path = str(tmp_path / "store")
    backend = LmdbBackend(path, durability="none", writer_name="export-test")
    ts = TelescopeState(backend)
    for ant in ("m000", "m001", "m063"):
        ts.add(f"{ant}_observer", f"{ant}, -30:42:39.8, 21:26:38.0", immutable=True)
        for i in range(40):
            ts.add(f"{ant}_pos_actual_scan_azim", 10.0 + i / 4, ts=T0 + 2 * i)
            if i % 10 == 0:
                ts.add(f"{ant}_target", f"src{i}, radec, 0:00:00, -30:00:00", ts=T0 + 2 * i)
                ts.add(f"{ant}_activity", ("slew", "track")[i % 20 // 10], ts=T0 + 2 * i)
    for cbid in (CBID, OTHER_CBID):
        cb = ts.view(cbid)
        cb.add("obs_params", {"sb_id_code": cbid, "proposal_id": "TEST"}, immutable=True)
        for i in range(5):
            cb.add("obs_activity", "track", ts=T0 + 60 * i)
            cb.set_indexed("cal_product_G", f"m00{i}h", np.arange(4) + 1j * i)
    ts.add("sdp_l0_int_time", 7.99, immutable=True)
    ts.add("#literal", 1, immutable=True)
    ts.delete("m063_activity")
    backend.close()
    return path


def run(*argv: str) -> tuple[int, str]:
    out = io.StringIO()
    status = cli.main(list(argv), out=out)
    return status, out.getvalue()


def katsdp_load(path) -> katsdptelstate.TelescopeState:
    ts = katsdptelstate.TelescopeState()
    ts.load_from_file(str(path))
    return ts


def katsdp_state(ts: katsdptelstate.TelescopeState, keys) -> dict:
    """Every key's encoded contents, through katsdptelstate's API."""
    state = {}
    for key in keys:
        key_type = ts.key_type(key)
        if key_type == katsdptelstate.KeyType.MUTABLE:
            state[key] = ts.get_range(key, st=0, return_encoded=True)
        else:
            state[key] = ts.get(key, return_encoded=True)
    return state


def records_of(path) -> list[Record]:
    backend = MemoryBackend()
    backend.load_from_file(str(path))
    return list(backend.records())


def test_light_export_equals_katsdptelstate_filtered_by_the_same_patterns(store, tmp_path):
    patterns_file = tmp_path / "light.txt"
    patterns_file.write_text(LIGHT_PATTERNS)
    full, light = tmp_path / "full.rdb", tmp_path / "light.rdb"
    assert run("export", store, str(full))[0] == 0
    status, text = run(
        "export", store, str(light), "--keys-from", str(patterns_file), "--keys", "sdp_l0_*"
    )
    assert status == 0, text
    patterns = read_key_patterns(patterns_file) + ["sdp_l0_*"]
    assert patterns == ["*_obs_*", "m???_observer", "m???_target", "[#]literal", "sdp_l0_*"]

    everything = katsdp_load(full)
    expected = sorted(set(itertools.chain.from_iterable(everything.keys(p) for p in patterns)))
    # The patterns select some keys of every type, and not all keys.
    assert f"{CBID}_obs_activity" in expected and "m000_target" in expected
    assert "#literal" in expected and "m000_pos_actual_scan_azim" not in expected
    loaded = katsdp_load(light)
    assert sorted(loaded.keys()) == expected
    assert katsdp_state(loaded, expected) == katsdp_state(everything, expected)
    assert f"{len(expected)} keys" in text


def test_view_export_holds_only_that_namespace(store, tmp_path):
    target = tmp_path / "cb.rdb"
    status, text = run("--json", "export", store, str(target), "--view", CBID)
    assert status == 0
    assert json.loads(text)["keys"] == 3
    loaded = katsdp_load(target)
    assert sorted(loaded.keys()) == [
        f"{CBID}_cal_product_G",
        f"{CBID}_obs_activity",
        f"{CBID}_obs_params",
    ]
    # Names are kept whole: a katsdptelstate view of the capture block reads them.
    view = loaded.view(CBID)
    assert view["obs_params"]["sb_id_code"] == CBID
    assert view.get_indexed("cal_product_G", "m001h")[1] == 1 + 1j
    assert len(view.get_range("obs_activity", st=0)) == 5

    # A view and patterns together: keys in the view that match a pattern.
    both = tmp_path / "both.rdb"
    assert run("export", store, str(both), "--view", f"{CBID}_", "--keys", "*_obs_*")[0] == 0
    assert sorted(katsdp_load(both).keys()) == [f"{CBID}_obs_activity", f"{CBID}_obs_params"]


def test_export_until_equals_replay(store, tmp_path):
    backend = LmdbBackend(store, readonly=True)
    last = backend.last_seq
    backend.close()
    for seq in (1, 50, 200, last - 1, last):
        target = tmp_path / f"until-{seq}.rdb"
        assert run("export", store, str(target), "--until", str(seq))[0] == 0
        expected = list(replay(store, until_seq=seq).backend.records())
        assert records_of(target) == expected
        # `replay --rdb` is the same export.
        alias = tmp_path / f"replay-{seq}.rdb"
        assert run("replay", store, "--until", str(seq), "--rdb", str(alias))[0] == 0
        assert records_of(alias) == expected
    # The last seq's state is the current state, as a plain export writes it.
    now = tmp_path / "now.rdb"
    assert run("export", store, str(now))[0] == 0
    assert records_of(now) == records_of(tmp_path / f"until-{last}.rdb")
    # Selection applies to past states too.
    light = tmp_path / "light-200.rdb"
    status, text = run("--json", "export", store, str(light), "--until", "200", "--keys", "m00?_*")
    assert status == 0 and json.loads(text)["until"] == "200"
    selected = KeySelection.of(["m00?_*"])
    expected = list(select_records(replay(store, until_seq=200).backend, selected))
    assert expected and records_of(light) == expected


def test_select_records_from_python(store):
    selection = KeySelection.of(["m00[0-1]_*", "*_obs_params", "*_cal_*"], view=None)
    memory = replay(store).backend
    backend = LmdbBackend(store, readonly=True)
    try:
        with backend.snapshot() as snap:
            from_snapshot = list(select_records(snap, selection))
        from_backend = list(select_records(backend, selection))
    finally:
        backend.close()
    from_memory = list(select_records(memory, selection))
    assert from_snapshot == from_backend == from_memory
    assert [key for key, _, _ in from_memory] == sorted(
        key for key in memory.keys(b"*") if selection.matcher()(key)
    )
    assert {key_type for _, key_type, _ in from_memory} == set(KeyType)
    assert list(select_records(memory.records(), KeySelection())) == list(memory.records())


def test_selection_streams_one_key_at_a_time():
    produced = []

    def records():
        for i in itertools.count():
            produced.append(i)
            yield (b"key%d" % i, KeyType.IMMUTABLE, b"v")

    selected = select_records(records(), KeySelection.of(["key1*"]))
    assert next(selected)[0] == b"key1"
    assert next(selected)[0] == b"key10"
    assert len(produced) == 11


@pytest.mark.parametrize(
    ("patterns", "view", "key", "expected"),
    [
        ((), None, b"anything", True),
        (("m???_*",), None, b"m000_target", True),
        (("m???_*",), None, b"m0000_target", False),
        ((r"a\*",), None, b"a*", True),
        ((r"a\*",), None, b"ab", False),
        ((), "cb", b"cb_x", True),
        ((), "cb", b"cbx", False),
        ((), "cb_", b"cb_x", True),
        ((), "", b"x", True),
        (("*x",), "cb", b"cb_x", True),
        (("*x",), "cb", b"cb_y", False),
        (("*x",), "cb", b"other_x", False),
    ],
)
def test_key_selection(patterns, view, key, expected):
    assert KeySelection.of(patterns, view).matcher()(key) is expected


def test_bad_pattern_lists(store, tmp_path, capsys):
    out = str(tmp_path / "out.rdb")
    assert run("export", store, out, "--keys-from", str(tmp_path / "missing.txt"))[0] == 2
    assert "cannot read the pattern list" in capsys.readouterr().err
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n\n")
    assert run("export", store, out, "--keys-from", str(empty))[0] == 2
    assert "no patterns" in capsys.readouterr().err
    assert run("export", store, out, "--until", "yesterday")[0] == 2


@given(st.lists(st.binary(max_size=12), max_size=4), st.none() | st.binary(max_size=12))
def test_a_selection_reads_back_from_its_json_exactly(patterns, view):
    """Any bytes, commas, spaces and non-UTF-8 included (the description cannot do that)."""
    selection = KeySelection(tuple(patterns), view)
    assert KeySelection.from_json(selection.to_json()) == selection


@pytest.mark.parametrize(
    "data", [b"", b"keys=a*", b"[]", b'{"patterns": "a*", "view": null}', b'{"patterns": []}']
)
def test_a_selection_that_is_not_its_json_raises_value_error(data):
    with pytest.raises(ValueError, match="not a key selection"):
        KeySelection.from_json(data)
