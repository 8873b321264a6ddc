"""Fencing after a promotion: the old primary may update neither the mirror nor the followers.

When a follower is promoted (``telstate promote``), its log gets a promote
event. The daemon of the promoted store records that event in the hash
:func:`promotion_key` (*db*) of the replicators' database
(:data:`telstate.redis.MIRROR_CURSOR_DB`) before it touches the mirror:

==========  ===============================================================
``store``   UUID of the store (the old primary and its followers share it)
``seq``     the promote event's seq
``chain``   the chain hash at it (hex)
``host``    host of the promoted store, and ``path`` its directory
==========  ===============================================================

From then on a daemon whose store has this UUID but does not hold that
event at that seq (the old primary come back, or a copy of another
history) is refused: the Redis sink stops in its FENCED state
(:mod:`replicator.redis_sink`) and the log stream refuses its appends
(:mod:`replicator.log_stream`). Every script that changes the mirror or
the stream, or sends replies to remote writes, names the promotion its
daemon knows (its chain, :func:`promotion_token`) and does nothing if the
hash records another, so the fence holds from the instant a promotion is
recorded (also one of another follower promoted at the same seq: the
chains differ). A store of another
UUID is not concerned.

The hash lives in Redis: it is lost with Redis's data (a restart without
persistence). The promoted store's daemon records it again when it finds
it gone; until then an old primary's daemon is not fenced (see the README).
A later promotion (a higher seq in a store that holds the recorded one)
replaces the record.

Nothing else in the package knows this layout.
"""

from __future__ import annotations

import socket
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import redis

from telstate.log import CHAIN_SIZE, Op
from telstate.redis import MIRROR_CURSOR_DB
from telstate.utils import ensure_str

from .source import EventSource


def promotion_key(db: int) -> bytes:
    """The hash recording the last promotion of a follower of mirror database `db`'s store."""
    return b"telstate-replicator:promotion:%d" % db


@dataclass(frozen=True)
class Promotion:
    """A promotion recorded for a mirror: the promoted store's promote event.

    Attributes
    ----------
    store
        UUID of the store (the same for the old primary and its followers).
    seq, chain
        The promote event and the chain hash at it (hex).
    host, path
        Where the promoted store lives.
    """

    store: str
    seq: int
    chain: str
    host: str = "?"
    path: str = "?"

    @property
    def tag(self) -> str:
        """The promotion in one string (``SEQ:CHAIN``), as a mirror's cursor names it."""
        return f"{self.seq}:{self.chain}"

    def fields(self) -> list[str | int]:
        """Field/value pairs to HSET."""
        return [
            "store",
            self.store,
            "seq",
            self.seq,
            "chain",
            self.chain,
            "host",
            self.host,
            "path",
            self.path,
        ]

    @classmethod
    def from_fields(cls, fields: dict[bytes, bytes]) -> Promotion | None:
        """Parse the hash; None if there is none (or it is damaged).

        Each field must be exactly as a daemon writes it (see
        :func:`_canonical`): the scripts compare the hash's raw values with
        the ones the daemon derives from what it parsed, so a value another
        spelling of the same one ("+5", "05", an upper-case UUID) is damage,
        not the same promotion.
        """
        try:
            text = {
                ensure_str(name): ensure_str(value, errors="strict")
                for name, value in fields.items()
            }
            promotion = cls(
                store=text["store"],
                seq=_canonical_seq(text["seq"]),
                chain=text["chain"],
                host=text.get("host", "?"),
                path=text.get("path", "?"),
            )
            if str(uuid.UUID(promotion.store)) != promotion.store or (
                len(promotion.chain) != 2 * CHAIN_SIZE
                or bytes.fromhex(promotion.chain).hex() != promotion.chain
            ):
                return None
        except (KeyError, ValueError):
            return None
        return promotion

    def refusal(self, source: EventSource) -> str | None:
        """Why `source` may no longer update this mirror or its followers; None if it may.

        A store of another UUID is not concerned; a store of this UUID must
        hold the promote event at its seq.
        """
        if self.store != str(source.uuid):
            return None
        try:
            held = source.chain_at(self.seq).hex() == self.chain
        except ValueError:
            held = False
        if held:
            return None
        return (
            f"store {self.store} was promoted at {self.host}:{self.path} (promote event"
            f" {self.seq}, chain {self.chain[:16]}), and the store at {source.path} does not"
            " hold that event: it is the old primary or of another history since. It may"
            " no longer update the mirror or the followers; make it a follower of the new"
            " primary (start it again from `telstate backup` of the new primary)"
        )


def promotion_tag(promotion: Promotion | None) -> str:
    """`promotion`'s :attr:`~Promotion.tag`; "" for none."""
    return "" if promotion is None else promotion.tag


def promotion_token(promotion: Promotion | None) -> bytes:
    """How the scripts name `promotion`: its chain (hex; b"" for none).

    Each script that checks the promotion compares the promotion hash's
    ``chain`` field (``''`` if there is none) with the token its caller
    passes. The chain alone names the promote event, its seq included: it
    covers the store's UUID and every byte of its events up to the promote
    event (:mod:`telstate.log`), so two promotions, of two followers at the
    same seq too, never share one. (One field read per check: reading the
    seq as well cost each tailing step of the mirror about 3% more Redis
    instructions.)
    """
    return b"" if promotion is None else promotion.chain.encode()


def _canonical_seq(text: str) -> int:
    """A seq as a daemon writes it (``b"%d"``: ASCII digits, no sign or leading zero, below 2**63).

    Raises
    ------
    ValueError
        Otherwise (Python's int() alone would take "+5", " 5", "05" or "1_0",
        which the scripts' raw comparison does not).
    """
    if not (text.isascii() and text.isdigit()) or str(int(text)) != text or int(text) >= 1 << 63:
        raise ValueError(f"not a seq: {text!r}")
    return int(text)


# Runs on any client: the keys live in database ARGV[1], selected here.
_READ_HASH = """
redis.call('SELECT', ARGV[1])
return redis.call('HGETALL', KEYS[1])
"""


def _pairs(flat: Sequence[Any]) -> dict[bytes, bytes]:
    it = iter(flat)
    return dict(zip(it, it))


class DamagedPromotion(ValueError):
    """The promotion hash exists but cannot be read: fence, never read it as no promotion."""


def damaged_refusal(db: int, fields: dict[bytes, bytes]) -> str:
    """Why a store is refused the mirror when its promotion hash (`fields`) cannot be read."""
    return (
        f"the promotion hash {ensure_str(promotion_key(db))!r} exists but cannot be read"
        f" (fields {sorted(ensure_str(name) for name in fields)}): it may record a promotion"
        " that this store lacks, so the store may not update the mirror or the followers;"
        " repair or delete the hash (only if no follower was promoted) and start again"
    )


def read_promotion(client: redis.Redis, db: int) -> Promotion | None:
    """The promotion recorded for mirror database `db` (on a client of any database).

    Raises
    ------
    DamagedPromotion
        If the hash exists but cannot be parsed.
    """
    fields = _pairs(client.eval(_READ_HASH, 1, promotion_key(db), MIRROR_CURSOR_DB))
    promotion = Promotion.from_fields(fields)
    if promotion is None and fields:
        raise DamagedPromotion(damaged_refusal(db, fields))
    return promotion


# KEYS[1]: the promotion hash (database ARGV[1]). ARGV[2]: the chain of the
# promotion the caller found ('' for none); ARGV[3..]: the new fields.
# Records the promotion only if it is still the one the caller found.
_RECORD_PROMOTION = """
redis.call('SELECT', ARGV[1])
if (redis.call('HGET', KEYS[1], 'chain') or '') ~= ARGV[2] then
    return 0
end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], unpack(ARGV, 3))
return 1
"""


def record_promotion(
    client: redis.Redis, db: int, promotion: Promotion, replacing: Promotion | None
) -> bool:
    """Record `promotion` for mirror database `db` if `replacing` is still the one recorded."""
    found = promotion_token(replacing).decode()
    return bool(
        client.eval(
            _RECORD_PROMOTION,
            1,
            promotion_key(db),
            MIRROR_CURSOR_DB,
            found,
            *promotion.fields(),
        )
    )


class PromotionScan:
    """Finds a store's newest promote event: reads the log once, then only its new events.

    Promote events have no key, so no index leads to them: the first call
    reads the whole log (about half a million events a second), later
    calls only the events appended since.
    """

    def __init__(self, source: EventSource) -> None:
        self.source = source
        self._scanned = 0
        self._latest: tuple[int, bytes] | None = None

    def latest(self, after: Promotion | None = None) -> Promotion | None:
        """The newest promote event of the store, if later than `after`; else None."""
        source = self.source
        last_seq = source.last_seq
        if last_seq < self._scanned:  # the store was replaced under this process
            self._scanned, self._latest = 0, None
        for event in source.events(self._scanned + 1, last_seq):
            if event.op is Op.PROMOTE:
                self._latest = (event.seq, event.chain)
        self._scanned = last_seq
        if self._latest is None:
            return None
        seq, chain = self._latest
        store = str(source.uuid)
        if after is not None and after.store == store and seq <= after.seq:
            return None
        return Promotion(store, seq, chain.hex(), socket.gethostname(), source.path)
