"""Connecting to the mirror's Redis server, and naming it without its credentials.

A mirror URL may carry a password (``redis://user:secret@host/0``, or a
``password=`` query parameter). Everything the replicator prints, logs or
raises names the server by :func:`redact_url`, never by the URL itself.
"""

from __future__ import annotations

import urllib.parse
from typing import Any

import redis

from telstate.redis import MIRROR_CURSOR_DB, client_db

#: Query parameters of a Redis URL whose values are secrets.
_SECRET_PARAMETERS = frozenset({"password"})


def redact_url(url: str) -> str:
    """`url` with its password (user info or query parameter) replaced by ``***``."""
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:
        return "<unparsable Redis URL>"
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, _, hostport = netloc.rpartition("@")
        user, colon, _ = userinfo.partition(":")
        netloc = f"{user}{':***' if colon else ''}@{hostport}"
    query = parts.query
    if query:
        pairs = urllib.parse.parse_qsl(query, keep_blank_values=True)
        query = "&".join(
            f"{name}={'***' if name.lower() in _SECRET_PARAMETERS else value}"
            for name, value in pairs
        )
    # Built by hand: urlunsplit would turn unix:///path into unix:/path.
    return f"{parts.scheme}://{netloc}{parts.path}{'?' if query else ''}{query}"


def connect(url: str, **kwargs: Any) -> tuple[redis.Redis, int]:
    """A client of the mirror at `url`, and the mirror's database number.

    Nothing is sent to the server yet.

    Raises
    ------
    ValueError
        If the URL is not a Redis URL or names the database that holds the
        cursors (the message shows the URL without its password).
    """
    shown = redact_url(url)
    try:
        client = redis.Redis.from_url(url, **kwargs)
        db = client_db(client)
    except ValueError as error:
        # redis-py's messages may quote the URL: say what is wrong without it.
        raise ValueError(
            f"{shown} is not a Redis URL: give redis://[USER[:PASSWORD]@]HOST[:PORT]/DB,"
            " rediss://... or unix://PATH?db=DB"
        ) from error
    if db == MIRROR_CURSOR_DB:
        client.close()
        raise ValueError(
            f"{shown}: database {MIRROR_CURSOR_DB} holds the replicators' cursors;"
            " choose another database for the mirror"
        )
    return client, db
