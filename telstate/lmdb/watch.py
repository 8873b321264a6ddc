"""Filesystem watches that wake a process's waiters when another process commits.

A committing process writes a byte into its store's ``notify`` file while
some process has announced there that it waits (see
:meth:`~telstate.lmdb.environment.Store.committed`). This module watches
that file and calls :meth:`~telstate.lmdb.environment.Store.wake`. The
watch is a latency aid only: waiters also poll LMDB's last transaction id
every ``settings.POLL_INTERVAL``, so every failure here (no inotify, out of
watches or instances) is logged at debug level and leaves the store to
polling; nothing raises into a caller.

On Linux one inotify instance and one daemon thread serve every store of
the process. The thread blocks in ``read`` with the GIL released, and
watches the notify *file* (its inode), not the store's directory: LMDB's
writes of data pages to ``data.mdb`` never wake it, and a commit costs
it one short read and one :meth:`wake`. Until a store's notify file exists
(a store opened read-only before any writer made it) the directory is
watched for its creation only; a notify file deleted or replaced goes
back to that. Either way the store maps the new file
(:meth:`~telstate.lmdb.environment.Store.reopen_notify`), so that its
announcements reach the committers that use it. Elsewhere ``watchdog``
watches the file.

A child process after ``fork`` has neither the thread nor any watch: it
starts its own on its first wait.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import struct
import sys
import threading
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .environment import Store

logger = logging.getLogger(__name__)

NOTIFY_FILE = "notify"
_NOTIFY_NAME = os.fsencode(NOTIFY_FILE)

# inotify(7) event bits.
_IN_MODIFY = 0x2
_IN_ATTRIB = 0x4
_IN_MOVED_TO = 0x80
_IN_CREATE = 0x100
_IN_DELETE_SELF = 0x400
_IN_MOVE_SELF = 0x800
_IN_Q_OVERFLOW = 0x4000
_IN_IGNORED = 0x8000
_IN_ONLYDIR = 0x01000000
# Committers write with pwrite (IN_MODIFY). Not IN_CLOSE_WRITE: every
# process that closes a store would wake every waiter. IN_ATTRIB is how a
# deletion shows while the file is still open (each store keeps its notify
# file mapped): the link count changed.
_FILE_MASK = _IN_MODIFY | _IN_ATTRIB | _IN_DELETE_SELF | _IN_MOVE_SELF
_DIRECTORY_MASK = _IN_CREATE | _IN_MOVED_TO | _IN_DELETE_SELF | _IN_MOVE_SELF | _IN_ONLYDIR
# Events after which the watch may be on the wrong inode (IN_IGNORED: the
# kernel dropped the watch). Checking costs a call of inotify_add_watch,
# which returns the same watch descriptor for the same inode.
_CHANGED = _IN_ATTRIB | _IN_DELETE_SELF | _IN_MOVE_SELF | _IN_IGNORED
# struct inotify_event: wd, mask, cookie, len, then len bytes of name.
_EVENT = struct.Struct("iIII")
_READ_SIZE = 64 * 1024


class _Inotify:
    """One inotify instance and the thread that reads it, for every store of a process.

    Raises
    ------
    OSError
        If the C library has no inotify or the process may make no more
        inotify instances.
    """

    def __init__(self) -> None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            init = libc.inotify_init1
            self._add = libc.inotify_add_watch
            self._remove = libc.inotify_rm_watch
        except (OSError, AttributeError) as error:
            raise OSError(errno.ENOSYS, f"no inotify in the C library: {error}") from error
        init.argtypes = [ctypes.c_int]
        self._add.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
        self._remove.argtypes = [ctypes.c_int, ctypes.c_int]
        fd = init(os.O_CLOEXEC)
        if fd < 0:
            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code))
        self.fd = fd
        # Watch descriptor -> store, and which of them watch a directory.
        self.stores: dict[int, Store] = {}
        self.directories: set[int] = set()
        self.thread = threading.Thread(
            target=self._read_events, name="telstate-inotify", daemon=True
        )
        try:
            self.thread.start()
        except RuntimeError as error:  # no thread to be had: waiters poll
            os.close(fd)
            raise OSError(errno.EAGAIN, f"cannot start the inotify thread: {error}") from error

    def add_watch(self, path: str, mask: int) -> int:
        wd: int = self._add(self.fd, os.fsencode(path), mask)
        if wd < 0:
            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code), path)
        return wd

    def watch(self, store: Store) -> None:
        """Watch `store`'s notify file, or its directory until the file exists (under _LOCK).

        Raises
        ------
        OSError
            If neither can be watched (e.g. ENOSPC: out of watches).
        """
        old = store.watch
        notify_path = os.path.join(store.path, NOTIFY_FILE)
        try:
            wd = self.add_watch(notify_path, _FILE_MASK)
            directory = False
        except FileNotFoundError:
            wd = self.add_watch(store.path, _DIRECTORY_MASK)
            directory = True
            # Made between the two calls: its creation was not seen.
            if os.path.exists(notify_path):
                self._forget(wd)
                wd = self.add_watch(notify_path, _FILE_MASK)
                directory = False
        if old and old != wd:
            self._forget(old)
        self.stores[wd] = store
        if directory:
            self.directories.add(wd)
        store.watch = wd

    def unwatch(self, store: Store) -> None:
        """Remove `store`'s watch (under _LOCK)."""
        wd = store.watch
        store.watch = None
        if wd and self.stores.get(wd) is store:
            self._forget(wd)

    def _forget(self, wd: int) -> None:
        self.stores.pop(wd, None)
        self.directories.discard(wd)
        self._remove(self.fd, wd)  # fails harmlessly if the kernel dropped it

    def _read_events(self) -> None:
        while True:
            try:
                data = os.read(self.fd, _READ_SIZE)
            except OSError as error:  # pragma: no cover - the fd is never closed under us
                logger.debug("reading inotify events failed (%s); waiters poll", error)
                return
            self._dispatch(data)

    def _dispatch(self, data: bytes) -> None:
        """Act on the events of one read: each store once, after all its events."""
        stores = self.stores
        woken: set[Store] = set()
        changed: set[Store] = set()
        offset = 0
        while offset < len(data):
            wd, mask, _, length = _EVENT.unpack_from(data, offset)
            name = data[offset + 16 : offset + 16 + length]
            offset += 16 + length
            store = stores.get(wd)
            if store is None:
                if mask & _IN_Q_OVERFLOW:
                    # Events were lost, a notify file's move or deletion maybe
                    # among them: check every watch, and wake everybody.
                    with _LOCK:
                        changed.update(list(stores.values()))
            elif wd in self.directories:
                if not mask & (_IN_CREATE | _IN_MOVED_TO) or name.rstrip(b"\0") == _NOTIFY_NAME:
                    changed.add(store)
            elif mask & _CHANGED or store.notify is None:
                changed.add(store)
            else:
                woken.add(store)
        try:
            for store in changed:
                self._rewatch(store)
            for store in woken | changed:
                store.wake()
        except Exception:  # pragma: no cover - a bug; the other stores still need waking
            logger.exception("waking waiters on commits failed")

    def _rewatch(self, store: Store) -> None:
        """Follow `store`'s notify file after it appeared, moved or was deleted."""
        with _LOCK:
            old = store.watch
            if not old or self.stores.get(old) is not store:
                return  # unwatched meanwhile
            try:
                self.watch(store)
            except OSError as error:
                logger.debug("cannot watch %s (%s); polling for commits", store.path, error)
                self._forget(old)
                store.watch = False
                return
            moved = store.watch != old and store.watch not in self.directories
        if moved or store.notify is None:
            store.reopen_notify()


#: inotify where there is one; watchdog (also inotify-based on Linux) elsewhere.
_USE_INOTIFY = sys.platform.startswith("linux")
_LOCK = threading.Lock()
_INOTIFY: _Inotify | None = None
_OBSERVER: Any = None  # watchdog's, where there is no inotify


def watch(store: Store) -> None:
    """Wake `store`'s waiters when another process commits (best effort, see module doc)."""
    global _INOTIFY
    with _LOCK:
        if store.watch is not None:
            return
        try:
            if not _USE_INOTIFY:
                _watch_with_watchdog(store)
                return
            if _INOTIFY is None:
                _INOTIFY = _Inotify()
            _INOTIFY.watch(store)
        except OSError as error:
            logger.debug("cannot watch %s (%s); polling for commits", store.path, error)
            store.watch = False
            return
        # A store opened before its notify file existed, which exists now.
        missed = store.notify is None and store.watch not in _INOTIFY.directories
    if missed:
        store.reopen_notify()


def unwatch(store: Store) -> None:
    """Stop watching `store` (it is being closed)."""
    with _LOCK:
        token = store.watch
        if isinstance(token, int) and token and _INOTIFY is not None:
            _INOTIFY.unwatch(store)
        elif token and _OBSERVER is not None:
            try:
                _OBSERVER.unschedule(token)
            except (KeyError, OSError):
                pass
        store.watch = None


def _watch_with_watchdog(store: Store) -> None:
    """Watch `store`'s notify file with watchdog (under _LOCK)."""
    global _OBSERVER
    from watchdog.events import FileSystemEventHandler
    from watchdog.observers import Observer

    notify_path = os.path.join(store.path, NOTIFY_FILE)

    class CommitHandler(FileSystemEventHandler):
        def on_any_event(self, event: Any) -> None:
            if os.fsdecode(event.src_path) == notify_path:
                store.wake()

    watched = notify_path if os.path.exists(notify_path) else store.path
    if _OBSERVER is None:
        _OBSERVER = Observer()
        _OBSERVER.daemon = True
        _OBSERVER.start()
    store.watch = _OBSERVER.schedule(CommitHandler(), watched, recursive=False)


def _after_fork_child() -> None:
    global _LOCK, _INOTIFY, _OBSERVER
    _LOCK = threading.Lock()
    if _INOTIFY is not None:
        os.close(_INOTIFY.fd)  # its thread is the parent's; the child starts its own
    _INOTIFY = None
    _OBSERVER = None


os.register_at_fork(after_in_child=_after_fork_child)
