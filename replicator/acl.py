"""Protecting the mirror: Redis ACL rules that let clients read it but never write it.

A mirror is exact only if nobody but the replicator writes it; a client's
write would be accepted and then lost at the next rebuild. Redis 7 ACLs
make the server refuse such writes at once: the user that clients of the
mirror connect as (``default`` for a client that gives no credentials, as
katsdptelstate's ``TelescopeState('redis://host')`` does) gets
:data:`CLIENT_RULES`, and the replicator connects as a user of its own with
every right.

Why commands and not keys: read-only key permissions (``%R~*``) break
katsdptelstate's reads, because its read scripts declare their keys and
Redis checks a script's declared keys as read-write. Command rules work: a
script runs with its caller's rights, so katsdptelstate's read scripts run,
and a write inside any script (katsdptelstate's ``add``) or outside one
(``delete``) fails at once with a ``NOPERM`` error. ``PUBLISH`` is refused
too, so that nobody can send a fake ``update/<key>`` message to the
mirror's waiters; ``@admin`` so that a client cannot change the rules;
``SCRIPT FLUSH`` so that it cannot drop the scripts everyone shares.

The rules apply to the whole server (ACLs have no notion of databases):
clients of that user can write no database of it. ``clearselectors`` comes
first among them: a selector left from earlier rules (``(~* +@write)``)
would otherwise keep its rights beside them.

What "protected" means (:func:`check_protection`): the client user may
read, and Redis refuses it every command that writes keys (the ``@write``
category, as the server lists it), every ``@admin`` command and
``PUBLISH``/``SPUBLISH``, on a key name no store uses and on a sample of
the mirror's own keys. Rights granted on a narrow key pattern that no
mirror key matches leave the mirror protected: a selector such as
``(~telstate-requests:* +xadd)`` (or ``%W~telstate-requests:*``), added to
the rules after ``clearselectors``, lets clients append to a request
stream and the mirror stays protected, as long as no key of the store
matches the pattern. A pattern that does match a sampled mirror key
(``~sensor* +@write``), or any broader write right, makes it unprotected.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from dataclasses import dataclass

import redis

from telstate.remote import Wire, checked
from telstate.utils import ensure_str

#: ACL rules for the user that clients of the mirror connect as (the
#: user's passwords and on/off flag are left as they are).
CLIENT_RULES: tuple[str, ...] = (
    "clearselectors",
    "resetkeys",
    "~*",
    "resetchannels",
    "&*",
    "+@all",
    "-@write",
    "-@admin",
    "-publish",
    "-spublish",
    "-script|flush",
)

#: Rules added for clients of a mirror whose replicator accepts writes: a
#: Redis 7 selector that allows XADD on the request streams and nothing
#: else, so a client can ask the replicator to write but can write no
#: mirror key, cursor or reply (see :mod:`telstate.remote`).
WRITER_RULES: tuple[str, ...] = ("clearselectors", "(~telstate-replicator:requests:* +xadd)")

#: ACL rules for the Redis user of followers (``telstate-replicator follow``):
#: read the log stream, its meta hash and its writers (``%R~``: read-only
#: keys), report positions in the followers hash, and nothing else: no key
#: of any mirror, no other command. Every key is in the replicators'
#: database (see :mod:`replicator.log_stream`); the user's passwords and
#: on/off flag are left as they are.
FOLLOWER_RULES: tuple[str, ...] = (
    "clearselectors",
    "resetkeys",
    "%R~telstate-replicator:log:*",
    "%R~telstate-replicator:log-meta:*",
    "%R~telstate-replicator:log-writers:*",
    "~telstate-replicator:followers:*",
    "resetchannels",
    "-@all",
    "+select",
    "+ping",
    "+client|setname",
    "+xread",
    "+xrange",
    "+hgetall",
    "+hmget",
    "+hset",
)

# What a client must be allowed: the commands of katsdptelstate's and
# telstate's reads and wait_key. (What it must be refused comes from the
# server's own command table, see _forbidden_commands.)
_MUST_WORK = (
    ("get", "k"),
    ("zrangebylex", "k", "-", "+"),
    ("hgetall", "k"),
    ("type", "k"),
    ("keys", "*"),
    ("evalsha", "0" * 40, "1", "k"),
    ("subscribe", "update/k"),
    ("select", "15"),
)


class AclError(Exception):
    """The rules cannot be set up as asked: the message says why and what to do."""


@dataclass(frozen=True)
class Protection:
    """Whether clients of a mirror can write it.

    Attributes
    ----------
    protected
        True if the client user's writes are refused and its reads allowed,
        False if it may write (or cannot read), None if it cannot be told.
    detail
        Why, in a sentence.
    """

    protected: bool | None
    detail: str


def whoami(client: redis.Redis) -> str:
    """The Redis user the client is connected as."""
    return ensure_str(client.execute_command("ACL", "WHOAMI"))


def setup_client_rules(client: redis.Redis, client_user: str, writers: bool = False) -> None:
    """Give `client_user` :data:`CLIENT_RULES` (needs a replicator user with ``@admin`` rights).

    With `writers`, :data:`WRITER_RULES` too (the replicator accepts writes).

    Raises
    ------
    AclError
        If the replicator connects as `client_user` itself (it would take
        its own rights away), the user does not exist, or the replicator's
        user may not change ACLs.
    redis.ConnectionError
        If the server cannot be reached.
    """
    me = whoami(client)
    if me == client_user:
        raise AclError(
            f"the replicator connects as Redis user {me!r}, the user that clients use: making"
            " it read-only would stop the replicator too. Create a user for the replicator"
            " (ACL SETUSER telstate-replicator on >PASSWORD ~* &* +@all) and put it in the"
            " URL (redis://telstate-replicator:PASSWORD@HOST/DB)"
        )
    try:
        if client.execute_command("ACL", "GETUSER", client_user) is None:
            raise AclError(
                f"there is no Redis user {client_user!r}: create it (ACL SETUSER"
                f" {client_user} on >PASSWORD) or give another --client-user"
            )
        rules = CLIENT_RULES + WRITER_RULES if writers else CLIENT_RULES
        client.execute_command("ACL", "SETUSER", client_user, *rules)
    except redis.exceptions.NoPermissionError as error:
        raise AclError(
            f"Redis user {me!r} may not change ACLs ({error}): run the replicator as a user"
            " with @admin rights, or have an administrator run"
            f" `ACL SETUSER {client_user} {' '.join(CLIENT_RULES)}` and start the"
            " replicator without --acl-setup"
        ) from error
    except redis.ResponseError as error:  # e.g. Redis 6: no selectors
        raise AclError(
            f"Redis refused the rules for user {client_user!r} ({error}): a read-only mirror"
            " needs Redis 7 ACLs"
        ) from error


def setup_follower_rules(client: redis.Redis, follower_user: str) -> None:
    """Give `follower_user` :data:`FOLLOWER_RULES` (needs a replicator user with ``@admin``).

    Raises
    ------
    AclError
        If the user does not exist, is the replicator's own, or the
        replicator's user may not change ACLs.
    redis.ConnectionError
        If the server cannot be reached.
    """
    me = whoami(client)
    if me == follower_user:
        raise AclError(
            f"the replicator connects as Redis user {me!r}: give followers a user of their own"
        )
    try:
        if client.execute_command("ACL", "GETUSER", follower_user) is None:
            raise AclError(
                f"there is no Redis user {follower_user!r}: create it (ACL SETUSER"
                f" {follower_user} on >PASSWORD) or give another --follower-user"
            )
        client.execute_command("ACL", "SETUSER", follower_user, *FOLLOWER_RULES)
    except redis.exceptions.NoPermissionError as error:
        raise AclError(
            f"Redis user {me!r} may not change ACLs ({error}): run the replicator as a user"
            " with @admin rights, or have an administrator run"
            f" `ACL SETUSER {follower_user} {' '.join(FOLLOWER_RULES)}`"
        ) from error


def check_protection(client: redis.Redis, client_user: str) -> Protection:
    """Find out whether `client_user` can read the mirror and write none of its keys.

    With ``@admin`` rights the replicator asks Redis (ACL DRYRUN) about
    every command that writes, administers or publishes (see the module
    docstring). Without them, or when it connects as `client_user` itself
    (``status`` run without credentials), or on a server without ACL
    DRYRUN, it tries writes that change nothing (a DEL of a key that does
    not exist, a ``SET ... XX``, ...) as a client would: on its own
    connection, or for the ``default`` user on a connection without
    credentials.

    Raises
    ------
    redis.ConnectionError
        If the server cannot be reached.
    """
    try:
        me = whoami(client)
    except redis.ResponseError as error:  # a server without ACLs (before Redis 6)
        return Protection(None, f"cannot tell: {error}")
    if me == client_user:
        return _probe_writes(client, client_user, "tried as that user")
    try:
        refused = [
            command[0]
            for command in _MUST_WORK
            if _dry_run(client, client_user, command) is not None
        ]
        allowed = _allowed_writes(client, client_user)
    except redis.exceptions.NoPermissionError:
        return _probe_without_admin(client, client_user, me)
    except redis.ResponseError as error:
        if "unknown subcommand" in str(error).lower():  # before Redis 7: no DRYRUN
            return _probe_without_admin(client, client_user, me)
        return Protection(None, f"cannot check user {client_user!r}: {error}")
    if allowed:
        return Protection(
            False,
            f"clients (user {client_user!r}) may write: {', '.join(allowed[:8])}"
            f"{', ...' if len(allowed) > 8 else ''} allowed",
        )
    if refused:
        return Protection(
            False,
            f"clients (user {client_user!r}) cannot read: {', '.join(refused)} are refused",
        )
    return Protection(True, f"clients (user {client_user!r}) can read and cannot write")


def _dry_run(client: redis.Redis, user: str, command: tuple[str, ...]) -> str | None:
    """None if `user` may run `command`, else Redis's reason."""
    reply = ensure_str(client.execute_command("ACL", "DRYRUN", user, *command))
    return None if reply == "OK" else reply


def _forbidden_commands(client: redis.Redis) -> Iterator[tuple[str, list[str], bool]]:
    """Each command a client must be refused: name, words ("" for each argument), whether a write.

    From the server's own table: every command (or subcommand, such as
    ``xgroup|create``) in the ``@write`` or ``@admin`` category, and
    ``publish`` and ``spublish``.
    """
    # The raw reply: how redis-py parses COMMAND varies between its versions
    # (the RESP2 parse of 5.3 and 6.x drops the ACL categories).
    wire = Wire(client.connection_pool)
    try:
        (table,) = wire.call((b"COMMAND",))
    finally:
        wire.close()
    for command in checked(table):
        # Each entry: name, arity, flags, key positions (3), ACL categories, ..., subcommands.
        subcommands = command[9] if len(command) > 9 else None
        entries = [
            (ensure_str(entry[0]), entry[1], [ensure_str(category) for category in entry[6]])
            for entry in (subcommands or [command])
        ]
        for full_name, arity, categories in entries:
            if "@write" in categories or "@admin" in categories or full_name in _PUBLISH:
                words = full_name.split("|")
                arguments = [""] * max(abs(int(arity)) - len(words), 0)
                yield full_name, words + arguments, "@write" in categories


_PUBLISH = frozenset({"publish", "spublish"})


def _allowed_writes(client: redis.Redis, client_user: str) -> list[str]:
    """The forbidden commands that ACL DRYRUN allows `client_user` on some probed key name.

    Writes come first in the list: they are what the mirror is kept from.

    Every argument of a command is the key name probed, so that whichever
    of them the command takes as keys, ACLs judge that name (a command that
    takes no keys is judged by its name alone). The names: one that no
    store uses, and a few of the mirror's own keys.
    """
    names = [f"telstate-replicator:probe:{secrets.token_hex(8)}"]
    names += [ensure_str(key) for key in client.scan(0, count=20)[1][:3]]
    commands = list(_forbidden_commands(client))
    with client.pipeline(transaction=False) as pipe:
        for name in names:
            for _, words, _ in commands:
                arguments = [word or name for word in words]
                pipe.execute_command("ACL", "DRYRUN", client_user, *arguments)
        replies = pipe.execute()
    allowed = {
        (not write, full_name)
        for (full_name, _, write), reply in zip(commands * len(names), replies)
        if ensure_str(reply) == "OK"
    }
    return [full_name for _, full_name in sorted(allowed)]  # writes first


# Writes that change nothing even when allowed: what a client without admin
# rights can try. The key and channel names are random (filled in below).
_HARMLESS_WRITES = (
    ("del", "KEY"),
    ("unlink", "KEY"),
    ("hdel", "KEY", "f"),
    ("zrem", "KEY", "m"),
    ("expire", "KEY", "1"),
    ("set", "KEY", "v", "XX"),
    ("zadd", "KEY", "XX", "0", "m"),
    ("publish", "KEY", ""),
)


def _probe_writes(client: redis.Redis, client_user: str, how: str) -> Protection:
    """Try :data:`_HARMLESS_WRITES` on `client`, connected as `client_user`."""
    key = f"telstate-replicator:probe:{secrets.token_hex(8)}"
    allowed = []
    for command in _HARMLESS_WRITES:
        try:
            client.execute_command(*(key if word == "KEY" else word for word in command))
        except redis.exceptions.NoPermissionError:
            continue
        allowed.append(command[0])
    if allowed:
        return Protection(
            False, f"clients (user {client_user!r}) may write: {', '.join(allowed)} allowed ({how})"
        )
    return Protection(
        True,
        f"clients (user {client_user!r}) cannot write ({how}: {len(_HARMLESS_WRITES)} writes"
        " that change nothing were refused; ACL DRYRUN, with @admin rights, checks every"
        " write)",
    )


def _probe_without_admin(client: redis.Redis, client_user: str, me: str) -> Protection:
    if client_user != "default":
        return Protection(
            None,
            f"cannot tell: user {me!r} may not run ACL DRYRUN (needs @admin, Redis 7) and only"
            " the default user can be tried without its password",
        )
    pool = client.connection_pool
    kwargs = dict(pool.connection_kwargs)
    for credential in ("username", "password", "credential_provider"):
        kwargs.pop(credential, None)
    probe = redis.Redis(
        connection_pool=redis.ConnectionPool(connection_class=pool.connection_class, **kwargs)
    )
    try:
        return _probe_writes(probe, client_user, "tried without admin rights")
    except redis.exceptions.AuthenticationError as error:
        return Protection(None, f"cannot tell: connecting as a client failed ({error})")
    finally:
        probe.close()
