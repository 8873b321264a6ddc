"""The ``telstate`` command on a real store, in-process and as an installed entry point."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from telstate import TelescopeState, cli
from telstate.lmdb import LmdbBackend, replay

T0 = 1_700_000_000.0


@pytest.fixture
def store(tmp_path):
    path = str(tmp_path / "store")
    backend = LmdbBackend(path, durability="none", writer_name="cli-test")
    ts = TelescopeState(backend)
    ts.add("attr", "value", immutable=True)
    for i in range(10):
        ts.add("sensor", float(i), ts=T0 + i)
    ts.add("other", np.arange(3), ts=T0)
    ts.set_indexed("idx", "a", 1)
    ts.delete("other")
    ts.add("other", "back", immutable=True)
    backend.close()
    return path


def run(*argv):
    out = io.StringIO()
    status = cli.main(list(argv), out=out)
    return status, out.getvalue()


def test_info(store):
    status, text = run("info", store)
    assert status == 0
    assert "events     15" in text
    status, text = run("--json", "info", store)
    info = json.loads(text)
    assert info["last_seq"] == 15
    assert info["keys"] == 4
    assert info["key_types"] == {"immutable": 2, "mutable": 1, "indexed": 1}


def test_keys_and_get(store):
    assert run("keys", store)[1].split() == ["attr", "idx", "other", "sensor"]
    assert run("keys", store, "s*")[1].split() == ["sensor"]
    assert run("get", store, "attr") == (0, "'value'\n")
    status, text = run("get", store, "sensor", "--json")
    assert json.loads(text)["value"] == [9.0, T0 + 9]
    status, text = run("get", store, "sensor", "--all", "--json")
    assert len(json.loads(text)["value"]) == 10
    status, text = run("get", store, "sensor", "--range", f"@{T0 + 2}", f"@{T0 + 4}")
    assert len(text.splitlines()) == 2
    assert json.loads(run("get", store, "idx", "--json")[1])["value"] == {"a": 1}


def test_history_includes_deletes(store):
    status, text = run("--json", "history", store, "other")
    events = [json.loads(line) for line in text.splitlines()]
    assert [e["op"] for e in events] == ["add_mutable", "delete", "set_immutable"]
    assert events[0]["value"] == [0, 1, 2]
    assert events[0]["writer"]["name"] == "cli-test"
    assert events[0]["writer"]["pid"] == os.getpid()


def test_log_filters(store):
    lines = run("--json", "log", store, "--key", "sens*", "--limit", "3")[1].splitlines()
    assert [json.loads(line)["key"] for line in lines] == ["sensor"] * 3
    lines = run("--json", "log", store, "--from-seq", "5", "--to-seq", "7")[1].splitlines()
    assert [json.loads(line)["seq"] for line in lines] == [5, 6, 7]
    assert run("log", store, "--since", "@0")[1].count("\n") == 15
    assert run("log", store, "--until", "@0")[1] == ""
    assert "set_immutable" in run("log", store)[1]


@pytest.mark.parametrize(
    ("option", "text", "message"),
    [
        ("--limit", "0", "--limit: must be at least 1, not 0"),
        ("--limit", "-1", "--limit: must be at least 1, not -1"),
        ("--from-seq", "-5", "--from-seq: must be at least 1, not -5"),
        ("--to-seq", "0", "--to-seq: must be at least 1, not 0"),
        ("--limit", "x", "--limit: 'x' is not a whole number"),
    ],
)
def test_log_options_are_validated(store, option, text, message):
    result = subprocess.run(
        [sys.executable, "-m", "telstate.cli", "log", store, option, text],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert message in result.stderr
    assert result.stdout == ""


def test_replay_export_import_verify(store, tmp_path):
    mid = str(tmp_path / "mid.rdb")
    assert run("replay", store, "--until", "6", "--rdb", mid)[0] == 0
    state = TelescopeState()
    state.load_from_file(mid)
    assert state.keys() == ["attr", "sensor"]
    assert len(state.get_range("sensor", st=0)) == 5

    full = str(tmp_path / "full.rdb")
    status, text = run("export", store, full)
    assert status == 0 and "4 keys" in text
    copy = str(tmp_path / "copy")
    status, text = run("--json", "import", copy, full)
    assert json.loads(text)["keys"] == 4
    imported = TelescopeState(LmdbBackend(copy, readonly=True))
    original = TelescopeState(LmdbBackend(store, readonly=True))
    for key in original.keys():
        assert imported.get(key, return_encoded=True) == original.get(key, return_encoded=True)
    assert run("verify", copy)[0] == 0
    chain = LmdbBackend(store, readonly=True).chain_at(15).hex()
    assert run("verify", store) == (
        0,
        "verify OK: the chain holds and the state matches the replayed log "
        f"(15 events, chain {chain[:16]})\n",
    )


def test_bad_paths_and_keys(store, tmp_path, capsys):
    assert run("info", str(tmp_path / "nowhere"))[0] == cli.EXIT_USAGE
    assert "no telstate store" in capsys.readouterr().err
    assert run("get", store, "missing")[0] == cli.EXIT_NO
    assert "'missing' not found" in capsys.readouterr().err
    assert run("history", store, "missing")[0] == cli.EXIT_NO
    assert run("replay", store, "--until", "yesterday", "--rdb", "x.rdb")[0] == cli.EXIT_USAGE
    assert "--until 'yesterday'" in capsys.readouterr().err
    assert run("import", store, str(tmp_path / "none.rdb"))[0] == cli.EXIT_USAGE
    bogus = tmp_path / "bogus.rdb"
    bogus.write_bytes(b"not an rdb file at all")
    assert run("import", store, str(bogus))[0] == cli.EXIT_DAMAGED
    assert "Invalid RDB file" in capsys.readouterr().err


def test_not_a_store(tmp_path, capsys):
    (tmp_path / "data.mdb").write_bytes(b"\x00" * 100)
    assert run("info", str(tmp_path))[0] == cli.EXIT_DAMAGED
    assert str(tmp_path) in capsys.readouterr().err


def test_parse_until():
    assert cli.parse_until("42") == (42, None)
    assert cli.parse_until("@1.5") == (None, 1.5)
    assert cli.parse_until("1970-01-01T00:00:10Z") == (None, 10.0)
    assert cli.parse_until("@1e9") == (None, 1e9)
    assert cli.parse_until("@.5") == (None, 0.5)
    refused = ("@soon", "\u00b2", "4\u00b2", "@nan", "@inf", "@-inf", "@1e400", "@-5")
    for text in (*refused, "@\u0661\u0662", "@1_000", "@ 5 ", "@+5", "@0x10"):
        with pytest.raises(cli.CliError):
            cli.parse_until(text)


def _cli(*argv, **kwargs):
    """The ``telstate`` command as a process of its own (its stdin and stdout real files)."""
    return subprocess.run(
        [sys.executable, "-m", "telstate.cli", *argv],
        capture_output=True,
        timeout=120,
        cwd=os.path.dirname(os.path.dirname(__file__)),
        **kwargs,
    )


def test_import_reads_a_pipe_once(store, tmp_path):
    """``... | telstate import STORE /dev/stdin``, and a named FIFO, import the whole file.

    Both passes (the check, then the import) read one descriptor: a path was
    opened twice, and the second open of a pipe found it empty (refused as a
    truncated file), or of a FIFO, waited for a writer for ever.
    """
    full = tmp_path / "full.rdb"
    assert run("export", store, str(full))[0] == 0
    data = full.read_bytes()
    copy = tmp_path / "from-stdin"
    result = _cli("import", str(copy), "/dev/stdin", input=data)
    assert result.returncode == 0, result.stderr
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    feeder = subprocess.Popen(
        [sys.executable, "-c", f"open({str(fifo)!r}, 'wb').write(open({str(full)!r}, 'rb').read())"]
    )
    try:
        result = _cli("import", str(tmp_path / "from-fifo"), str(fifo))
    finally:
        feeder.kill()
        feeder.wait()
    assert result.returncode == 0, result.stderr
    for path in (copy, tmp_path / "from-fifo"):
        assert run("verify", str(path))[0] == 0
        imported = TelescopeState(LmdbBackend(str(path), readonly=True))
        assert imported.keys() == ["attr", "idx", "other", "sensor"]
        assert len(imported.get_range("sensor", st=0)) == 10
        assert imported.backend.unfinished_imports() == []
        imported.backend.close()


@pytest.mark.parametrize("where", ["new", "empty directory", "a creation cut short"])
def test_a_refused_import_leaves_no_store_behind(store, tmp_path, where):
    """Found by review: a file refused on its check left an empty store at a new path."""
    full = tmp_path / "full.rdb"
    assert run("export", store, str(full))[0] == 0
    data = full.read_bytes()
    truncated = tmp_path / "truncated.rdb"
    truncated.write_bytes(data[: len(data) // 2])
    garbage = tmp_path / "garbage.rdb"
    garbage.write_bytes(b"REDIS0011" + b"\xfe" * 100)
    from telstate.lmdb.environment import holds_no_store

    target = tmp_path / "new-store"
    if where != "new":
        target.mkdir()
    if where == "a creation cut short":
        import lmdb

        lmdb.open(str(target), max_dbs=16).close()  # before its first commit
    for bad in (truncated, garbage):
        status = run("import", str(target), str(bad))[0]
        assert status == cli.EXIT_DAMAGED
        assert holds_no_store(target)
        if where == "new":
            assert not target.exists()
        elif where == "empty directory":
            assert list(target.iterdir()) == []
    assert run("import", str(target), str(full))[0] == 0
    assert run("verify", str(target))[0] == 0


@pytest.mark.parametrize("where", ["below a file", "deep below a file", "read-only"])
def test_an_import_that_cannot_make_its_store_says_so_before_checking_the_file(
    store, tmp_path, monkeypatch, capsys, where
):
    """Found by review: a store that could not be made was reported only after
    the check pass over the whole file (minutes, for a large one)."""
    import telstate.lmdb.backend as backend

    full = tmp_path / "full.rdb"
    assert run("export", store, str(full))[0] == 0
    capsys.readouterr()
    (tmp_path / "a-file").write_bytes(b"")
    target = {
        "below a file": tmp_path / "a-file" / "store",
        "deep below a file": tmp_path / "a-file" / "x" / "store",
        "read-only": tmp_path / "ro" / "store",
    }[where]
    if where == "read-only":
        (tmp_path / "ro").mkdir()
        real_access = os.access

        def access(path, mode, **kwargs):  # as a read-only file system answers (root included)
            if os.fsdecode(path) == str(tmp_path / "ro") and mode & os.W_OK:
                return False
            return real_access(path, mode, **kwargs)

        monkeypatch.setattr(os, "access", access)
    checked = []
    real_check = backend.check_file
    monkeypatch.setattr(
        backend,
        "check_file",
        lambda *args, **kwargs: checked.append(1) or real_check(*args, **kwargs),
    )
    status = run("import", str(target), str(full))[0]
    assert status == cli.EXIT_USAGE
    assert "cannot create a telstate store" in capsys.readouterr().err
    assert checked == []
    assert not target.exists()


def test_an_import_into_a_store_made_meanwhile_is_checked_against_it(tmp_path, monkeypatch):
    """Found by review: a new store's file was checked alone, and then only written:
    keys another process wrote into the store meanwhile were met by the write pass
    only, after the chunks before the conflict had been committed."""
    import telstate.lmdb.bulk as bulk
    from telstate.lmdb import settings

    source = LmdbBackend(str(tmp_path / "source"), durability="none")
    ts = TelescopeState(source)
    for i in range(50):
        ts.add(f"a{i:03d}", i, immutable=True)
    ts.add("zz", "the file's", immutable=True)
    source.close()
    rdb = tmp_path / "file.rdb"
    assert run("export", str(tmp_path / "source"), str(rdb))[0] == 0
    monkeypatch.setattr(settings, "LOAD_CHUNK", 10)  # many chunks, 'zz' in the last
    target = tmp_path / "new-store"
    other = (
        "from telstate import TelescopeState\n"
        "from telstate.lmdb import LmdbBackend\n"
        f"with LmdbBackend({str(target)!r}, durability='fsync') as backend:\n"
        "    TelescopeState(backend).add('zz', 'another process', immutable=True)\n"
    )
    check_and_add = bulk._FileKeys.check_and_add
    made: list[bool] = []

    def making_the_store_meanwhile(self, piece):
        if not made:
            made.append(True)
            subprocess.run([sys.executable, "-c", other], check=True, timeout=60)
        return check_and_add(self, piece)

    monkeypatch.setattr(bulk._FileKeys, "check_and_add", making_the_store_meanwhile)
    assert run("import", str(target), str(rdb))[0] != 0
    with LmdbBackend(str(target), readonly=True) as backend:
        assert backend.keys(b"*") == [b"zz"]  # nothing of the file
        assert backend.unfinished_imports() == []


def test_export_to_a_piped_stdout(store, tmp_path):
    """`export STORE /dev/stdout | ...`: the file goes to the pipe, the summary to stderr."""
    for command in (["export", store, "/dev/stdout"], ["replay", store, "--until", "6"]):
        if command[0] == "replay":
            command += ["--rdb", "/dev/stdout"]
        result = _cli(*command)
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith(b"REDIS")
        assert b" keys" in result.stderr
        piped = tmp_path / f"{command[0]}.rdb"
        piped.write_bytes(result.stdout)
        state = TelescopeState()
        state.load_from_file(str(piped))
        assert "attr" in state.keys()


def test_jsonable():
    value = {"a": (1, b"\xff", b"ok", 1 + 2j, np.float32(1.5), float("nan")), (1, 2): None}
    assert json.loads(json.dumps(cli.jsonable(value))) == {
        "a": [1, {"base64": "/w=="}, "ok", {"real": 1.0, "imag": 2.0}, 1.5, "nan"],
        "[1, 2]": None,
    }


def test_entry_point(store):
    exe = os.path.join(os.path.dirname(sys.executable), "telstate")
    result = subprocess.run([exe, "keys", store], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["attr", "idx", "other", "sensor"]


def test_demo_runs_small(tmp_path):
    """`make run` is this demo at full size; a small one proves it end to end."""
    target = str(tmp_path / "demo")
    result = subprocess.run(
        [sys.executable, "-m", "telstate.demo", target, "--sensors", "20", "--samples", "10"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "verify OK" in result.stdout
    assert "identical to the store: True" in result.stdout
    assert "replay to now equals the live state: True" in result.stdout


def test_damaged_log_record_is_a_store_error(store, capsys):
    """A log record cut short: events() raises StoreError, the CLI exits 3."""
    import lmdb

    from telstate import log
    from telstate.errors import StoreError

    env = lmdb.open(store, max_dbs=16, subdir=True)
    with env.begin(write=True) as txn:
        table = env.open_db(b"log", txn=txn, create=False)
        txn.put(log.pack_seq(2), b"\x01\x02", db=table)
    env.close()
    backend = LmdbBackend(store, readonly=True)
    with pytest.raises(StoreError, match="event 2"):
        list(backend.events())
    backend.close()
    assert run("log", store)[0] == cli.EXIT_DAMAGED
    assert "event 2" in capsys.readouterr().err
    # Replays as of a time or a seq beyond it too (they gave tracebacks).
    with pytest.raises(StoreError, match="damaged at event 2"):
        replay(store, until_seq=3)
    output = str(Path(store).parent / "out.rdb")
    for until in (f"@{time.time() + 100:.0f}", "3"):
        assert run("replay", store, "--until", until, "--rdb", output)[0] == cli.EXIT_DAMAGED
        assert "damaged at event 2" in capsys.readouterr().err
        assert run("export", store, output, "--until", until)[0] == cli.EXIT_DAMAGED
        assert "damaged at event 2" in capsys.readouterr().err


def test_directory_without_a_store_and_unwritable_output(store, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert run("info", str(empty))[0] == cli.EXIT_USAGE
    assert "no data.mdb" in capsys.readouterr().err
    assert run("export", store, str(tmp_path / "no" / "such" / "dir.rdb"))[0] == cli.EXIT_USAGE
    assert "no such directory" in capsys.readouterr().err


def test_demo_refuses_to_overwrite_a_directory(tmp_path):
    (tmp_path / "precious").write_text("keep me")
    result = subprocess.run(
        [sys.executable, "-m", "telstate.demo", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "--overwrite" in result.stderr
    assert (tmp_path / "precious").read_text() == "keep me"


def test_exporting_an_empty_state_writes_an_empty_file_over_an_older_export(tmp_path):
    path = str(tmp_path / "store")
    ts = TelescopeState(LmdbBackend(path, durability="none"))
    ts.add("k", 1, immutable=True)
    target = tmp_path / "export.rdb"
    assert run("export", path, str(target))[0] == 0
    assert TelescopeState().load_from_file(target) == 1
    ts.backend.clear()
    ts.backend.close()
    status, text = run("--json", "export", path, str(target))
    assert status == 0 and json.loads(text)["keys"] == 0
    assert TelescopeState().load_from_file(target) == 0
    assert sorted(os.listdir(tmp_path)) == ["export.rdb", "store"]


def test_export_killed_at_random_points_leaves_the_old_or_the_new_file(tmp_path):
    """SIGKILL at any instant of an export: the path holds the old or the complete new export."""
    import random
    import time

    from telstate.errors import RdbParseError
    from telstate.rdb_reader import read_records
    from telstate.utils import KeyType

    path = str(tmp_path / "store")
    backend = LmdbBackend(path, durability="none")
    payload = bytes(range(256)) * 400
    backend.load_records([(b"old", KeyType.IMMUTABLE, b"\xff\x01")])
    out = tmp_path / "out"
    out.mkdir()
    target = out / "export.rdb"
    assert run("export", path, str(target))[0] == 0
    old = target.read_bytes()
    backend.load_records((b"big%d" % i, KeyType.IMMUTABLE, payload + b"%d" % i) for i in range(300))
    backend.close()
    command = [sys.executable, "-m", "telstate.cli", "export", path, str(target)]
    started = time.monotonic()
    subprocess.run(command, check=True, capture_output=True, timeout=120)
    duration = time.monotonic() - started
    new = target.read_bytes()
    assert len(new) > 30_000_000 and new != old
    rng = random.Random(12)
    outcomes = []
    for _ in range(12):
        target.write_bytes(old)
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.0, duration * 1.1))
        process.kill()
        process.wait()
        found = target.read_bytes()
        assert found in (old, new)
        outcomes.append("new" if found == new else "old")
        for name in os.listdir(out):
            if name == "export.rdb":
                continue
            assert name.startswith(".export.rdb.") and name.endswith(".tmp")
            leftover = (out / name).read_bytes()
            if leftover != new:  # complete but not yet renamed is the one valid leftover
                with pytest.raises(RdbParseError):
                    list(read_records(out / name))
    assert "old" in outcomes  # the kills did land during exports
    # The next export removes what the killed ones left behind.
    assert run("export", path, str(target))[0] == 0
    assert target.read_bytes() == new and os.listdir(out) == ["export.rdb"]


@pytest.mark.parametrize("where", ["dangling symlink above", "symlink then .."])
def test_an_import_into_a_store_that_can_be_made_through_a_symlink_is_not_refused(
    store, tmp_path, capsys, where
):
    """Found by review (revK): creation_refused took the path lexically (abspath)
    while the store is made at its realpath, and refused paths it could make."""
    full = tmp_path / "full.rdb"
    assert run("export", store, str(full))[0] == 0
    if where == "dangling symlink above":
        (tmp_path / "dangling").symlink_to(tmp_path / "missing")
        target, made = tmp_path / "dangling" / "store", tmp_path / "missing" / "store"
    else:
        (tmp_path / "A").mkdir()
        (tmp_path / "A" / "B").write_bytes(b"")  # lexically A/link/../B is below a file
        (tmp_path / "C" / "sub").mkdir(parents=True)
        (tmp_path / "A" / "link").symlink_to(tmp_path / "C" / "sub")
        target, made = (
            tmp_path / "A" / "link" / ".." / "B" / "store",
            tmp_path / "C" / "B" / "store",
        )
    capsys.readouterr()
    status = run("import", str(target), str(full))[0]
    assert status == 0, capsys.readouterr().err
    assert run("verify", str(made))[0] == 0
