"""An exception between any two lines of a write's start and end leaves the store usable.

KeyboardInterrupt (Ctrl-C in an IPython session that writes to a store a
pipeline also writes), or an exception a signal handler raises, comes
between any two lines of the main thread, and at the entry of any
function. Where it came as a write transaction began or ended, the
transaction or the write lock stayed held: every later write of the
process failed, and every writer of the store in other processes hung
until this process exited. Besides writes that commit, change nothing or
raise in their block: a write refused at its start (the store is a
follower), and one whose first try to begin finds the map grown by
another process (LMDB's MapResizedError, then a retry).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_SCRIPT = r"""
import dis, json, linecache, os, subprocess, sys, threading
import telstate
from telstate.errors import ImmutableKeyError
from telstate.lmdb import LmdbBackend, environment, writes

import lmdb
from telstate.errors import ReadOnlyError
from telstate.lmdb.layout import FOLLOWS

path, kind = sys.argv[1], sys.argv[2]
ts = telstate.TelescopeState(LmdbBackend(path, durability="none"))
ts.add("fixed", 1, immutable=True)
store = ts.backend._store
if kind == "follower":
    with store.env.begin(write=True) as txn:
        txn.put(FOLLOWS, b"redis://primary", db=store.tables.meta)
    store.primary_txnid = -1


class Resizing:
    # The store's environment, whose next write begins with MapResizedError once.

    def __init__(self, env):
        self.env = env
        self.fail = False

    def begin(self, *args, **kwargs):
        if self.fail and args == (None, None, True):
            self.fail = False
            raise lmdb.MapResizedError("mdb_txn_begin", -30785)
        return self.env.begin(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.env, name)


if kind == "resized":
    store.env = Resizing(store.env)
# Every line of these runs in a write's start or end (and their helpers).
CODES = {
    writes.WriteTxn.__enter__.__code__,
    writes.WriteTxn.__exit__.__code__,
    environment.Store.begin_write.__code__,
    environment.Store.end_write.__code__,
    environment._Transactions.enter.__code__,
    environment._Transactions.leave.__code__,
    environment.abort.__code__,
    environment.Store._unwind_write.__code__,
    environment.Store._leave_write.__code__,
    writes.WriteTxn._release.__code__,
}
NO_FALL_THROUGH = {
    "RETURN_VALUE", "RERAISE", "RAISE_VARARGS", "JUMP_FORWARD", "JUMP_BACKWARD",
    "JUMP_BACKWARD_NO_INTERRUPT",
}
OPS = {}
def reached_by_jump(code, offset):
    if code not in OPS:
        OPS[code] = [(i.offset, i.opname) for i in dis.get_instructions(code)]
    before = [name for at, name in OPS[code] if at < offset]
    here = [name for at, name in OPS[code] if at == offset]
    # A NOP (a `try:` line, a `return` that runs a `finally`) may lie outside
    # the handler its neighbours have; no signal is raised at one. Nor at the
    # start of an `except` clause (after PUSH_EXC_INFO): control comes there
    # from an exception, never from a check for signals; nor at its `pass`
    # (POP_EXCEPT), which only its matching, no call, comes before.
    return here in (["NOP"], ["POP_EXCEPT"]) or (
        bool(before) and (before[-1] in NO_FALL_THROUGH or before[-1] == "PUSH_EXC_INFO")
    )

EXIT = writes.WriteTxn.__exit__.__code__
# The offset of __exit__'s first instruction past its `try:` line (its NOP).
ENTRY = min(
    offset for offset, _, line in EXIT.co_lines() if line is not None and line > EXIT.co_firstlineno
    and linecache.getline(EXIT.co_filename, line).strip() == "try:"
)
results = []
count = 0
target = 0
seen_withs = set()
def local(frame, event, arg):
    # A line event raises before the line runs, as a signal's handler raises
    # at the next check after a call. Not at a `with` line seen before in
    # the frame: that is its exit, which a signal cannot come before (the
    # check follows the call of __exit__), but a trace can.
    global count
    if event == "line":
        if frame.f_code is EXIT and frame.f_lasti <= ENTRY:
            # The entry of __exit__, before its first `try`: a signal can come
            # there too, and no Python code can protect that one point.
            return local
        if reached_by_jump(frame.f_code, frame.f_lasti):
            # CPython looks up the handler from the instruction before the
            # line's first (here one control never falls through from, as
            # an inlined `finally` before a `return`), which a signal, raised
            # after the call or the jump just run, never does.
            return local
        if linecache.getline(frame.f_code.co_filename, frame.f_lineno).lstrip().startswith("with "):
            if (id(frame), frame.f_lineno) in seen_withs:
                return local
            seen_withs.add((id(frame), frame.f_lineno))
        count += 1
        if count == target:
            raise KeyboardInterrupt(f"at {frame.f_code.co_name}:{frame.f_lineno}")
    return local
def global_trace(frame, event, arg):
    # A function's entry too (but __exit__'s: see above): a signal's handler
    # raises at the check each function makes as it starts.
    global count
    if frame.f_code not in CODES:
        return None
    if event == "call" and frame.f_code is not EXIT:
        count += 1
        if count == target:
            raise KeyboardInterrupt(f"entering {frame.f_code.co_name}")
    return local

def write(i):
    if kind == "resized":
        if not isinstance(store.env, Resizing):
            store.env = Resizing(store.env)  # (reopened meanwhile)
        store.env.fail = True
    if kind in ("commit", "resized"):
        ts.add("sensor", float(i), ts=float(i))
    elif kind == "unchanged":
        ts.add("fixed", 1, immutable=True)  # the same value: nothing to commit
    elif kind == "follower":
        try:
            ts.add("sensor", float(i), ts=float(i))  # refused at the start
        except ReadOnlyError:
            pass
    else:
        try:
            ts.add("fixed", 2, immutable=True)  # the block raises
        except ImmutableKeyError:
            pass

def add(name, i):
    # A follower refuses every write: refused, not hung, is usable.
    try:
        ts.add(name, float(i), ts=float(i))
    except ReadOnlyError:
        if kind != "follower":
            raise

def usable(i):
    # Another thread, then this one, then another process can write.
    done = []
    thread = threading.Thread(target=lambda: done.append(add("other", i)))
    thread.daemon = True
    thread.start()
    thread.join(10)
    if thread.is_alive():
        return "another thread's write hangs"
    try:
        add("same", i)
    except Exception as error:
        return f"this thread's write fails: {error!r}"
    return None

i = 0
while True:
    i += 1
    count, target = 0, i
    seen_withs.clear()
    sys.settrace(global_trace)
    interrupted = None
    try:
        write(i)
    except KeyboardInterrupt as error:
        interrupted = str(error)
    finally:
        sys.settrace(None)
    if interrupted is None:
        break  # every line was interrupted once
    problem = usable(i)
    results.append([interrupted, problem])
    print(interrupted, problem, file=sys.stderr, flush=True)
    if problem:
        break
child = subprocess.run(
    [sys.executable, "-c",
     "import sys, telstate\n"
     "from telstate.errors import ReadOnlyError\n"
     "try:\n"
     f"    telstate.TelescopeState('lmdb://{path}').add('child', 1.0, ts=1.0)\n"
     "except ReadOnlyError:\n"
     f"    sys.exit({kind!r} != 'follower')\n"
     f"sys.exit({kind!r} == 'follower')\n"],
    timeout=30, capture_output=True, text=True,
)
results.append(["child", child.returncode, child.stderr[-300:]])
print(json.dumps(results))
"""


def _run(tmp_path, kind: str) -> list:
    script = tmp_path / "interrupt.py"
    script.write_text(_SCRIPT)
    result = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "store"), kind],
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, PYTHONPATH=REPO),
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout.splitlines()[-1])


@pytest.mark.parametrize("kind", ["commit", "unchanged", "raises", "follower", "resized"])
def test_an_interrupt_at_any_line_of_a_write_leaves_the_store_usable(tmp_path, kind):
    results = _run(tmp_path, kind)
    *points, child = results
    assert len(points) > 20  # the interrupts did land, at as many lines
    assert [point for point in points if point[1]] == []
    assert child[1] == 0, child
    # What was written stays: the store verifies.
    verify = subprocess.run(
        [sys.executable, "-m", "telstate.cli", "verify", str(tmp_path / "store")],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert verify.returncode == 0, verify.stdout + verify.stderr
