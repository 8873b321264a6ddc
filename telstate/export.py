"""Which keys an export holds: light files, one capture block's namespace, or everything.

A metadata writer archives two RDB files per capture block: a *full* one
(every key) and a *light* one (the keys matching a fixed list of patterns,
such as ``*_obs_*``, ``m???_observer``, ``m???_target``). A
:class:`KeySelection` says which keys to keep; :func:`select_records`
streams the selected records of a store, a snapshot or a replayed state,
one key at a time, so an export of any size needs memory for one key
only. ``telstate export`` is built on these; an export of a past state
(``--until``, or ``telstate replay``) selects with the same
:meth:`KeySelection.matcher`, before each key is replayed
(:meth:`telstate.lmdb.Snapshot.state_at`).

Selected keys keep their full names. A ``view`` selects one capture
block's namespace, the keys that :meth:`TelescopeState.view` of that name
finds in its own namespace (names starting with ``<view>_``), and the
exported file holds them under the same full names: a reader such as
katdal opens it as it opens the full file, and its ``ts.view(cbid)``
finds the same keys in both.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from .backend import Record
from .utils import PathType, compile_pattern, ensure_binary

#: What separates a namespace from a key name (as in TelescopeState views).
SEPARATOR = b"_"

#: The RDB AUX field with the selection of an export that is not of every key,
#: as :meth:`KeySelection.to_json` writes it (read back by ``telstate verify --rdb``).
AUX_SELECTION = b"telstate-selection-json"
#: The AUX field with :meth:`KeySelection.describe` (for people; before
#: :data:`AUX_SELECTION` existed, the only record of the selection).
AUX_SELECTION_DESCRIPTION = b"telstate-selection"


@runtime_checkable
class RecordSource(Protocol):
    """Anything with a ``records()`` method: a backend, an LMDB snapshot."""

    def records(self) -> Iterator[Record]: ...


@dataclass(frozen=True)
class KeySelection:
    """The keys an export holds.

    Parameters
    ----------
    patterns
        Redis glob patterns (as ``KEYS`` takes), matched against whole key
        names; a key is selected if it matches any of them. Empty: no
        pattern filter.
    view
        A namespace, such as a capture block id: only keys whose names start
        with it and the separator (``<view>_``) are selected, names unchanged.
        A trailing separator in `view` is not doubled. None: no namespace
        filter.

    With both, a key must be in the view and match a pattern; with neither,
    every key is selected.
    """

    patterns: tuple[bytes, ...] = ()
    view: bytes | None = None

    @classmethod
    def of(
        cls, patterns: Iterable[str | bytes] = (), view: str | bytes | None = None
    ) -> KeySelection:
        """A selection from patterns and a view given as str or bytes."""
        return cls(
            tuple(ensure_binary(pattern) for pattern in patterns),
            None if view is None else ensure_binary(view),
        )

    @property
    def prefix(self) -> bytes | None:
        """The prefix a key needs to be in the view, or None without a view."""
        if self.view is None:
            return None
        if not self.view or self.view.endswith(SEPARATOR):
            return self.view
        return self.view + SEPARATOR

    @property
    def everything(self) -> bool:
        """Whether every key is selected."""
        return not self.patterns and not self.prefix

    def matcher(self) -> Callable[[bytes], bool]:
        """A function telling whether a key name is selected."""
        prefix = self.prefix
        matches = [compile_pattern(pattern).fullmatch for pattern in self.patterns]

        def selected(key: bytes) -> bool:
            if prefix and not key.startswith(prefix):
                return False
            return not matches or any(match(key) for match in matches)

        return selected

    def to_json(self) -> bytes:
        """The selection as JSON that :meth:`from_json` reads back exactly.

        An object with ``patterns`` (a list of strings) and ``view`` (a
        string or null); bytes that are not UTF-8 are kept as the
        surrogates of Python's ``surrogateescape``.
        """
        return json.dumps(
            {"patterns": [_text(pattern) for pattern in self.patterns], "view": _view(self.view)}
        ).encode()

    @classmethod
    def from_json(cls, data: bytes) -> KeySelection:
        """The selection that :meth:`to_json` wrote as `data`.

        Raises
        ------
        ValueError
            If `data` is not such JSON.
        """
        try:
            fields = json.loads(data)
            patterns, view = fields["patterns"], fields["view"]
            if not (
                isinstance(patterns, list)
                and all(isinstance(pattern, str) for pattern in patterns)
                and (view is None or isinstance(view, str))
            ):
                raise ValueError("patterns must be a list of strings, view a string or null")
            return cls(
                tuple(pattern.encode("utf-8", "surrogateescape") for pattern in patterns),
                None if view is None else view.encode("utf-8", "surrogateescape"),
            )
        except (TypeError, KeyError, UnicodeError, ValueError) as error:
            raise ValueError(f"not a key selection: {error}") from None

    def describe(self) -> bytes:
        """A one-line description, for an exported file's AUX field (``*`` for everything)."""
        parts = []
        if self.view is not None:
            parts.append(b"view=" + self.view)
        if self.patterns:
            parts.append(b"keys=" + b",".join(self.patterns))
        return b" ".join(parts) or b"*"


def _text(data: bytes) -> str:
    return data.decode("utf-8", "surrogateescape")


def _view(view: bytes | None) -> str | None:
    return None if view is None else _text(view)


def select_records(
    source: RecordSource | Iterable[Record], selection: KeySelection = KeySelection()
) -> Iterator[Record]:
    """The records of `source` whose keys `selection` holds, streamed in the source's order.

    Parameters
    ----------
    source
        A backend or an LMDB snapshot (anything with ``records()``), or
        records themselves.
    selection
        Which keys to keep.

    Records are read one key at a time (keys that are not selected are read
    too: ``records()`` is the only bulk read every backend has).
    """
    records = source.records() if isinstance(source, RecordSource) else iter(source)
    if selection.everything:
        yield from records
        return
    selected = selection.matcher()
    for record in records:
        if selected(record[0]):
            yield record


def read_key_patterns(path: PathType) -> list[str]:
    """The patterns of a pattern-list file: one per line, surrounding space stripped.

    Blank lines and lines whose first non-blank character is ``#`` are
    ignored (a pattern cannot start with ``#``; write ``[#]`` for that).

    Raises
    ------
    OSError
        If the file cannot be read.
    UnicodeDecodeError
        If it is not UTF-8.
    """
    with open(path, encoding="utf-8") as file:
        lines = (line.strip() for line in file)
        return [line for line in lines if line and not line.startswith("#")]
