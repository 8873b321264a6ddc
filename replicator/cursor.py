"""The mirror's cursor: which store's log a Redis mirror reflects, and up to which event.

The cursor of mirror database *n* is the hash
:func:`telstate.redis.mirror_cursor_key` (*n*) in database
:data:`telstate.redis.MIRROR_CURSOR_DB`. It lives in another database than
the mirror so that no client of the mirror ever lists it among the keys,
yet one Lua script can still check it, change the mirror and move it in a
single atomic step (scripts may SELECT another database; the change of
database ends with the script). Fields:

==============  ==============================================================
``owner``       the replicator process that writes the mirror (host, pid, token)
``store``       UUID of the store whose log the mirror reflects
``host``        host of the store, and ``path`` its directory (for messages)
``seq``         the last event of the log that the mirror includes
``chain``       the store's chain hash at ``seq`` (hex; see :mod:`telstate.log`)
``state``       ``ready``, or ``rebuilding`` while the new mirror is built
``keys``        the number of keys in the mirror database once the step is done
``spare``       while rebuilding: the database the new mirror is built in
``spare_keys``  the number of keys in that database once the step is done
``promotion``   the promotion recorded for the mirror that its writer knows
                (``SEQ:CHAIN``, see :mod:`replicator.promotion`; empty for none)
==============  ==============================================================

``keys`` (and ``spare_keys`` during a rebuild) is how a flushed or
foreign-written mirror is noticed: every step compares it with DBSIZE
before changing anything. (``store``, ``seq``, ``chain``) is how a store
restored from an older copy, rolled back by a power cut or otherwise of
another history is noticed: before resuming, the replicator compares
``chain`` with the store's chain at ``seq``. ``promotion`` is how a
replicator displaced from the mirror tells the old primary's daemon
(which knew no promotion, or an older one: it is taken over) from one of a
copy of its own store's promoted history (a follower or backup of it,
which it leaves alone); a cursor written before it lacks the field.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import redis

from telstate.redis import MIRROR_CURSOR_DB, client_db, mirror_cursor_key
from telstate.utils import ensure_str


class MirrorState(enum.Enum):
    """Whether the mirror is complete at its cursor's seq."""

    READY = "ready"
    REBUILDING = "rebuilding"


@dataclass(frozen=True)
class Cursor:
    """One mirror's cursor, as stored in Redis.

    Attributes
    ----------
    owner
        The replicator that writes the mirror (host, pid and a random token).
    store
        UUID of the store whose log the mirror reflects.
    seq
        The last event that the mirror includes.
    chain
        The store's chain hash at `seq`, in hex ("" in a cursor written
        before chains existed).
    state
        Whether the mirror is complete at `seq`.
    keys
        Number of keys in the mirror database.
    host, path
        Where the store lives.
    spare
        While rebuilding, the database the new mirror is built in.
    spare_keys
        Number of keys in that database.
    promotion
        The promotion its writer knew (:func:`replicator.promotion.promotion_tag`),
        None in a cursor written before the field existed.
    """

    owner: str
    store: str
    seq: int
    chain: str
    state: MirrorState
    keys: int
    host: str
    path: str
    spare: int | None = None
    spare_keys: int = 0
    promotion: str | None = None

    def fields(self) -> list[bytes | str | int]:
        """Field/value pairs to HSET, except the key counts (the script sets those)."""
        return [
            "owner",
            self.owner,
            "store",
            self.store,
            "seq",
            self.seq,
            "chain",
            self.chain,
            "state",
            self.state.value,
            "host",
            self.host,
            "path",
            self.path,
            "spare",
            "" if self.spare is None else self.spare,
            "promotion",
            self.promotion or "",
        ]

    def moved(self, seq: int, chain: str, keys: int, promotion: str | None) -> Cursor:
        """This cursor moved on to `seq` and `chain`, with `keys` keys (and no spare's).

        What :func:`dataclasses.replace` gives, made faster: a tailing
        mirror moves its cursor at every step.
        """
        return Cursor(
            self.owner,
            self.store,
            seq,
            chain,
            self.state,
            keys,
            self.host,
            self.path,
            self.spare,
            0,
            promotion,
        )

    @classmethod
    def from_fields(cls, fields: dict[bytes, bytes]) -> Cursor | None:
        """Parse the cursor hash; None if it is missing or damaged (both mean: rebuild)."""
        text = {ensure_str(name): ensure_str(value) for name, value in fields.items()}
        try:
            return cls(
                owner=text["owner"],
                store=text["store"],
                seq=int(text["seq"]),
                chain=text.get("chain", ""),
                state=MirrorState(text["state"]),
                keys=int(text["keys"]),
                host=text.get("host", "?"),
                path=text.get("path", "?"),
                spare=int(text["spare"]) if text.get("spare") else None,
                spare_keys=int(text.get("spare_keys") or 0),
                promotion=text.get("promotion"),
            )
        except (KeyError, ValueError):
            return None


# Returns {DBSIZE of the caller's database, the cursor hash as a flat list}.
_READ_CURSOR = """
local size = redis.call('DBSIZE')
redis.call('SELECT', ARGV[1])
return {size, redis.call('HGETALL', KEYS[1])}
"""


def read_cursor(client: redis.Redis) -> tuple[int, Cursor | None]:
    """Read the cursor of the client's database and, at the same instant, its key count.

    Returns
    -------
    The number of keys in the mirror database, and its cursor (None if it
    has none).

    Raises
    ------
    redis.RedisError
        If the server cannot be reached or refuses the script.
    """
    key = mirror_cursor_key(client_db(client))
    size, flat = client.eval(_READ_CURSOR, 1, key, MIRROR_CURSOR_DB)
    it = iter(flat)
    return int(size), Cursor.from_fields(dict(zip(it, it)))
