"""Hot backups: a consistent copy of a store, taken while writers keep writing.

:func:`backup` copies the store with LMDB's own environment copy
(``mdb_env_copy``), which copies the pages of one read transaction, so
the copy is exactly the store as of that transaction's last commit,
whatever writers do meanwhile. The copy goes into a temporary directory
beside the destination, is opened once as a store (to check it and read
its head), flushed to disk (file, then directory), and only then renamed
to the destination and the rename flushed: the destination is either
absent or a complete store, never a partial one. The rename refuses a
destination that appeared meanwhile (a plain rename would replace an
empty directory): see :func:`_rename_new`.

A backup killed midway (SIGKILL, power cut) leaves its temporary
directory, named ``.DEST.backup-HOST-PID-XXXXXXXX``: the next backup into
the same directory on the same host removes those whose process is gone.

The copy is not compacted: LMDB's compacting copy (``MDB_CP_COMPACT``)
crashes the process (SIGSEGV, in LMDB 0.9 as bundled with py-lmdb) on a
table of sorted fixed-size duplicates with more than a page of them for
one key, which every store's ``history`` table has. So the copy is as
large as the store's file up to its last used page, free pages included.

The copy keeps the store's identity (UUID) and its whole log, so it
verifies and can become a follower of the store
(:func:`telstate.lmdb.follower.make_follower`). It is a primary until
then: do not write to both it and the original (their logs would be two
histories of one store).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import re
import shutil
import socket
import stat
import tempfile
import threading
from collections.abc import Callable, Iterator

import lmdb

from ..errors import StoreError
from ..utils import PathType

#: Called from a background thread while the copy runs, with the bytes copied
#: so far and the bytes the source uses (what the copy will hold, about).
Progress = Callable[[int, int], None]

#: Seconds between two progress calls.
PROGRESS_INTERVAL = 0.2

_DATA_FILE = "data.mdb"
_HOST = socket.gethostname()
#: Temporary directories of backups (and follower creations) on this host,
#: ``.NAME.KIND-HOST-PID-XXXXXXXX``: the kind is group 1, the pid group 2
#: (mkdtemp adds 8 characters of [a-z0-9_]).
_TEMP_NAME = re.compile(rf"\..+\.([a-z]+)-{re.escape(_HOST)}-(\d+)-[a-z0-9_]{{8}}")
# renameat2 (Linux): AT_FDCWD, and the flag that makes it refuse an existing target.
_AT_FDCWD = -100
_RENAME_NOREPLACE = 1


def backup(source: PathType, dest: PathType, progress: Progress | None = None) -> tuple[int, bytes]:
    """Copy the store at `source` to the new directory `dest`, consistently, while it is in use.

    Parameters
    ----------
    source
        The store to copy (opened read-only; writers may go on writing).
    dest
        Where the copy goes: must not exist; its parent directory must.
    progress
        Called every ``PROGRESS_INTERVAL`` seconds during the copy (see :data:`Progress`).

    Returns
    -------
    (seq, chain) of the last event in the copy.

    Raises
    ------
    FileExistsError
        If `dest` exists.
    FileNotFoundError
        If the parent directory of `dest` does not exist.
    StoreError
        If `source` is not a store, or the copy failed (disk full, damaged store).
    """
    from .backend import LmdbBackend

    dest = os.path.abspath(os.fsdecode(dest))
    parent = os.path.dirname(dest)
    _check_free(dest)
    if not os.path.isdir(parent):
        raise FileNotFoundError(errno.ENOENT, "no such directory for the backup", parent)
    if not os.path.exists(os.path.join(os.fsdecode(source), _DATA_FILE)):
        raise StoreError(f"no telstate store at {os.fsdecode(source)!r}: it has no data.mdb")
    _remove_stale(parent)
    work = tempfile.mkdtemp(
        prefix=f".{os.path.basename(dest)}.backup-{_HOST}-{os.getpid()}-", dir=parent
    )
    try:
        with LmdbBackend(source, readonly=True) as backend:
            store = backend._get_store()
            # Registered like any read, so that nothing remaps the environment under the copy.
            token = object()
            try:
                store.txns.enter(threading.get_ident(), token)
                env = store.ensure_open()
                used = (env.info()["last_pgno"] + 1) * env.stat()["psize"]
                with _reporting(progress, os.path.join(work, _DATA_FILE), used):
                    env.copy(work)
            except lmdb.Error as error:
                raise StoreError(f"backing up {store.path!r} failed: {error}") from error
            finally:
                try:
                    store.txns.leave(token)
                finally:
                    store.txns.leave(token)  # again, if an exception cut the first short
        os.chmod(work, stat.S_IMODE(os.stat(source).st_mode))  # mkdtemp made it private
        with LmdbBackend(work, readonly=True) as copy:
            head = copy.head
        _fsync(os.path.join(work, _DATA_FILE))
        _fsync(work)
        _rename_new(work, dest)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    _fsync(parent)
    return head


def _check_free(dest: str) -> None:
    if os.path.lexists(dest):
        raise _exists(dest)


def _exists(dest: str) -> FileExistsError:
    return FileExistsError(errno.EEXIST, "the backup destination exists already", dest)


def _remove_stale(parent: str, kind: str = "backup") -> None:
    """Remove the temporary directories in `parent` of `kind` (backup, or follower for
    :func:`telstate.lmdb.follower.create_follower`) on this host whose process died."""
    for name in os.listdir(parent):
        match = _TEMP_NAME.fullmatch(name)
        if match is None or match[1] != kind or _alive(int(match[2])):
            continue
        path = os.path.join(parent, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)


def _alive(pid: int) -> bool:
    """Whether process `pid` exists (on this host)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's
    return True


def _rename_new(work: str, dest: str) -> None:
    """Rename the copy's directory `work` to `dest`; FileExistsError if `dest` exists.

    ``os.rename`` would silently replace an empty directory made at `dest`
    after it was checked. Linux's ``renameat2(RENAME_NOREPLACE)`` refuses
    it atomically; where that is missing, `dest` is made with ``mkdir``
    (which refuses an existing path) and the copy's data file renamed into it.
    """
    if _rename_noreplace(work, dest):
        return
    try:
        os.mkdir(dest)
    except FileExistsError:
        raise _exists(dest) from None
    os.chmod(dest, stat.S_IMODE(os.stat(work).st_mode))
    os.rename(os.path.join(work, _DATA_FILE), os.path.join(dest, _DATA_FILE))
    shutil.rmtree(work, ignore_errors=True)
    _fsync(dest)


def _rename_noreplace(old: str, new: str) -> bool:
    """``renameat2(old, new, RENAME_NOREPLACE)``: True if done, False if unsupported here.

    Raises FileExistsError if `new` exists.
    """
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    int_, path = ctypes.c_int, ctypes.c_char_p
    renameat2.argtypes = [int_, path, int_, path, ctypes.c_uint]
    done = renameat2(_AT_FDCWD, os.fsencode(old), _AT_FDCWD, os.fsencode(new), _RENAME_NOREPLACE)
    if done == 0:
        return True
    error = ctypes.get_errno()
    if error in (errno.ENOSYS, errno.EINVAL):
        return False  # the kernel or the file system lacks it
    if error == errno.EEXIST:
        raise _exists(new)
    raise OSError(error, os.strerror(error), new)


@contextlib.contextmanager
def _reporting(progress: Progress | None, data_file: str, used: int) -> Iterator[None]:
    """Call `progress` with the size of `data_file` from a thread while the block runs."""
    if progress is None:
        yield
        return
    done = threading.Event()

    def report() -> None:
        while not done.wait(PROGRESS_INTERVAL):
            try:
                copied = os.path.getsize(data_file)
            except OSError:
                copied = 0
            progress(copied, used)

    thread = threading.Thread(target=report, name="telstate-backup-progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


def _fsync(path: str) -> None:
    """Flush a file or directory to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
