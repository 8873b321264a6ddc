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
mirror's waiters; ``@admin`` so that a client cannot change the rules.

The rules apply to the whole server (ACLs have no notion of databases):
clients of that user can write no database of it.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

import redis

from telstate.utils import ensure_str

#: ACL rules for the user that clients of the mirror connect as (the
#: user's passwords and on/off flag are left as they are).
CLIENT_RULES: tuple[str, ...] = (
    "resetkeys",
    "~*",
    "resetchannels",
    "&*",
    "+@all",
    "-@write",
    "-@admin",
    "-publish",
    "-spublish",
)

# What a client must be refused (writes katsdptelstate makes, plus the
# pub/sub messages that wake waiters) and what it must be allowed (the
# commands of katsdptelstate's and telstate's reads and wait_key).
_MUST_FAIL = (
    ("set", "k", "v"),
    ("zadd", "k", "0", "m"),
    ("hset", "k", "f", "v"),
    ("del", "k"),
    ("flushdb",),
    ("publish", "update/k", "m"),
)
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


def setup_client_rules(client: redis.Redis, client_user: str) -> None:
    """Give `client_user` :data:`CLIENT_RULES` (needs a replicator user with ``@admin`` rights).

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
        client.execute_command("ACL", "SETUSER", client_user, *CLIENT_RULES)
    except redis.exceptions.NoPermissionError as error:
        raise AclError(
            f"Redis user {me!r} may not change ACLs ({error}): run the replicator as a user"
            " with @admin rights, or have an administrator run"
            f" `ACL SETUSER {client_user} {' '.join(CLIENT_RULES)}` and start the"
            " replicator without --acl-setup"
        ) from error


def check_protection(client: redis.Redis, client_user: str) -> Protection:
    """Find out whether `client_user` can read the mirror and not write it.

    With ``@admin`` rights the replicator asks Redis (ACL DRYRUN) about
    every command that matters. Without them it can still test the
    ``default`` user: it connects without credentials, as a client would,
    and tries a write that changes nothing (DEL of a key that does not
    exist).

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
        return Protection(
            False,
            f"the replicator connects as {me!r}, the user that clients use, so clients"
            " may write too",
        )
    try:
        refused = [
            command[0]
            for command in _MUST_WORK
            if _dry_run(client, client_user, command) is not None
        ]
        allowed = [
            command[0] for command in _MUST_FAIL if _dry_run(client, client_user, command) is None
        ]
    except redis.exceptions.NoPermissionError:
        return _probe_without_admin(client, client_user, me)
    except redis.ResponseError as error:
        return Protection(False, f"cannot check user {client_user!r}: {error}")
    if allowed:
        return Protection(
            False,
            f"clients (user {client_user!r}) may write: {', '.join(allowed)} are allowed",
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


def _probe_without_admin(client: redis.Redis, client_user: str, me: str) -> Protection:
    if client_user != "default":
        return Protection(
            None,
            f"cannot tell: user {me!r} may not run ACL DRYRUN (needs @admin) and only the"
            " default user can be tried without its password",
        )
    pool = client.connection_pool
    kwargs = dict(pool.connection_kwargs)
    for credential in ("username", "password", "credential_provider"):
        kwargs.pop(credential, None)
    probe = redis.Redis(
        connection_pool=redis.ConnectionPool(connection_class=pool.connection_class, **kwargs)
    )
    try:
        probe.delete(f"telstate-replicator:probe:{secrets.token_hex(8)}")
    except redis.exceptions.NoPermissionError:
        return Protection(True, "clients (user 'default') cannot write (tried without admin)")
    except redis.exceptions.AuthenticationError as error:
        return Protection(None, f"cannot tell: connecting as a client failed ({error})")
    finally:
        probe.close()
    return Protection(False, "clients (user 'default') may write")
