"""Connecting to the mirror's Redis server, and naming it without its credentials.

A mirror URL may carry a password (``redis://user:secret@host/0``, or a
``password=`` query parameter); better, the password comes from a file or
the environment (:func:`read_password`), where ``ps`` does not show it.
Everything the replicator prints, logs or raises names the server by
:func:`redact_url`, never by the URL itself.

:func:`redact_url` never edits the URL's text: it rebuilds the URL from
the fields redis-py itself parses (host, port, database, user, and the
query parameters of :data:`_SHOWN_PARAMETERS`), so a password that redis-py
reads is never among them. A URL whose reading is ambiguous (an unencoded
``/``, ``?``, ``#`` or ``@`` in the password makes the rest of the password
look like a path, query or fragment) is refused by :func:`connect` and
shown as the scheme alone.
"""

from __future__ import annotations

import os
import urllib.parse
from typing import Any

import redis

from telstate.redis import MIRROR_CURSOR_DB, client_db

#: Environment variable that may hold the replicator's Redis password.
PASSWORD_VARIABLE = "TELSTATE_REDIS_PASSWORD"

#: Query parameters whose values are shown: known not to be secrets. Any
#: other parameter (``password``, ``ssl_password``, one redis-py adds
#: tomorrow) is shown as ``***``.
_SHOWN_PARAMETERS = frozenset(
    {
        "db",
        "socket_timeout",
        "socket_connect_timeout",
        "socket_keepalive",
        "retry_on_timeout",
        "max_connections",
        "health_check_interval",
        "ssl_cert_reqs",
        "ssl_check_hostname",
        "protocol",
    }
)

_URL_FORMS = (
    "redis://[USER[:PASSWORD]@]HOST[:PORT]/DB, rediss://... or"
    " unix://[USER[:PASSWORD]@]PATH?db=DB, with /, ?, # and @ in the password"
    " percent-encoded (%2F, %3F, %23, %40); or leave the password out of the URL and"
    f" give --redis-password-file or {PASSWORD_VARIABLE}"
)


def _ambiguity(url: str) -> str | None:
    """Why `url` cannot be read with certainty (a password may spill elsewhere), or None."""
    _, _, rest = url.partition("://")
    if "#" in rest:
        return "it has a '#'"
    end = min((i for i in (rest.find("/"), rest.find("?")) if i >= 0), default=len(rest))
    if "@" in rest[end:]:
        return "it has an '@' after the host"
    return None


def redact_url(url: str) -> str:
    """`url` rebuilt from the fields redis-py reads in it, every secret replaced by ``***``."""
    scheme = url.partition("://")[0] if "://" in url else ""
    if scheme not in ("redis", "rediss", "unix"):
        return f"{scheme}://<not shown>" if scheme.isalnum() else "<URL not shown>"
    if _ambiguity(url) is not None:
        return f"{scheme}://<ambiguous URL not shown>"
    try:
        fields = redis.connection.parse_url(url)
        password = urllib.parse.urlsplit(url).password
        query = urllib.parse.parse_qsl(urllib.parse.urlsplit(url).query, keep_blank_values=True)
    except ValueError:
        return f"{scheme}://<unparsable URL not shown>"
    userinfo = ""
    if "username" in fields or password:
        user = urllib.parse.quote(fields.get("username", ""), safe="")
        userinfo = f"{user}{':***' if password else ''}@"
    shown: list[str] = []
    for name, value in query:
        if name not in _SHOWN_PARAMETERS:
            # A secret (password, ssl_password, or a parameter redis-py only
            # passes on): an unencoded '&' in it would make its tail look like
            # further parameters, names included, so nothing after it shows.
            shown.append(f"{urllib.parse.quote(name, safe='')}=***")
            if len(shown) < len(query):
                shown.append("***")
            break
        shown.append(f"{urllib.parse.quote(name, safe='')}={urllib.parse.quote(value, safe='')}")
    shown_query = "&".join(shown)
    if scheme == "unix":
        location = urllib.parse.quote(fields.get("path", ""), safe="/")
    else:
        host = fields.get("host", "")
        host = f"[{host}]" if ":" in host else urllib.parse.quote(host, safe=".-_")
        port = f":{fields['port']}" if "port" in fields else ""
        path_db = "" if any(name == "db" for name, _ in query) else fields.get("db")
        location = f"{host}{port}{'' if path_db in ('', None) else f'/{path_db}'}"
    return f"{scheme}://{userinfo}{location}{'?' if shown_query else ''}{shown_query}"


def read_password(password_file: str | None) -> str | None:
    """The replicator's Redis password from `password_file`, else :data:`PASSWORD_VARIABLE`.

    The file's first line is the password (a trailing newline is not part
    of it). None if neither is given.

    Raises
    ------
    OSError
        If the file cannot be read.
    """
    if password_file is not None:
        with open(password_file, encoding="utf-8") as file:
            return file.readline().rstrip("\r\n")
    return os.environ.get(PASSWORD_VARIABLE) or None


def connect(url: str, password: str | None = None, **kwargs: Any) -> tuple[redis.Redis, int]:
    """A client of the mirror at `url`, and the mirror's database number.

    Nothing is sent to the server yet.

    Parameters
    ----------
    url
        The mirror's URL.
    password
        The Redis user's password, if the URL does not carry one.
    **kwargs
        For :meth:`redis.Redis.from_url`.

    Raises
    ------
    ValueError
        If the URL is not a Redis URL, is ambiguous, names the database
        that holds the cursors, or carries a password as well as
        `password` (the message shows the URL without its password).
    """
    shown = redact_url(url)
    reason = _ambiguity(url)
    if reason is not None:
        raise ValueError(f"the Redis URL is ambiguous ({reason}): give {_URL_FORMS}")
    not_a_url = ValueError(f"{shown} is not a Redis URL: give {_URL_FORMS}")
    try:
        fields = redis.connection.parse_url(url)
    except ValueError:
        # redis-py's messages may quote the URL: say what is wrong without it.
        raise not_a_url from None
    if password is not None:
        if "password" in fields:
            raise ValueError(
                f"{shown} carries a password and another is given (file or"
                f" {PASSWORD_VARIABLE}): give it once"
            )
        kwargs["password"] = password
    try:
        client = redis.Redis.from_url(url, **kwargs)
        db = client_db(client)
    except ValueError:
        raise not_a_url from None
    if db == MIRROR_CURSOR_DB:
        client.close()
        raise ValueError(
            f"{shown}: database {MIRROR_CURSOR_DB} holds the replicators' cursors;"
            " choose another database for the mirror"
        )
    return client, db
