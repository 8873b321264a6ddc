"""Every public name of katsdptelstate 1.0.0's modules exists in telstate's module of the same name.

katsdptelstate's API reference documents, module by module, the classes and
functions defined there, its loggers and constants, and a few names that a
module imports and so exposes (e.g. ``katsdptelstate.memory.rdb_reader``).
Code written for katsdptelstate may use any of them after ``import telstate
as katsdptelstate``. The installed katsdptelstate is the reference: it is
imported here only to list its names.
"""

from __future__ import annotations

import importlib
import inspect
import logging

import pytest

MODULES = [
    "backend",
    "encoding",
    "endpoint",
    "errors",
    "memory",
    "rdb_reader",
    "rdb_utility",
    "rdb_writer",
    "redis",
    "telescope_state",
    "telescope_state_base",
    "utils",
    "aio.backend",
    "aio.memory",
    "aio.rdb_writer",
    "aio.redis",
    "aio.telescope_state",
]

#: Names that katsdptelstate's API reference documents although the module
#: imports them rather than defining them, and its documented constants.
DOCUMENTED = {
    "memory": ["rdb_reader", "BackendCallback"],
    "redis": ["rdb_reader", "BackendCallback"],
    "telescope_state": ["ensure_binary", "ensure_str"],
    "rdb_utility": ["DUMP_POSTFIX"],
    "rdb_writer": ["RDB_HEADER", "RDB_TERMINATOR", "RDB_CHECKSUM"],
}


def defined_names(module_name: str) -> list[str]:
    """Public classes, functions and loggers that the peer's module defines itself."""
    module = importlib.import_module(f"katsdptelstate.{module_name}")
    names = []
    for name, obj in vars(module).items():
        if name.startswith("_"):
            continue
        if inspect.isclass(obj) or inspect.isfunction(obj):
            if obj.__module__ == module.__name__:
                names.append(name)
        elif isinstance(obj, logging.Logger) and obj.name == module.__name__:
            names.append(name)
    return names + DOCUMENTED.get(module_name, [])


@pytest.mark.parametrize("module_name", MODULES)
def test_public_names_exist(module_name: str) -> None:
    ours = importlib.import_module(f"telstate.{module_name}")
    missing = [name for name in defined_names(module_name) if not hasattr(ours, name)]
    assert missing == []


def test_top_level_names() -> None:
    import katsdptelstate

    import telstate

    public = [name for name in dir(katsdptelstate) if not name.startswith("_")]
    submodules = {name for name in public if inspect.ismodule(getattr(katsdptelstate, name))}
    missing = [name for name in public if name not in submodules and not hasattr(telstate, name)]
    assert missing == []


def test_documented_constants_and_encode_item_match() -> None:
    # katsdptelstate 1.0.0 defines these in rdb_writer_base; its reference
    # documents them in rdb_writer, where telstate has them.
    from katsdptelstate import rdb_utility as peer_utility
    from katsdptelstate import rdb_writer_base as peer_writer

    from telstate import rdb_utility, rdb_writer

    assert rdb_utility.DUMP_POSTFIX == peer_utility.DUMP_POSTFIX
    assert rdb_writer.RDB_CHECKSUM == peer_writer.RDB_CHECKSUM
    assert rdb_writer.RDB_TERMINATOR == peer_writer.RDB_TERMINATOR
    payloads = [
        rdb_utility.dump_string(b"value"),
        rdb_utility.dump_zset([b"a", b"b"]),
        rdb_utility.dump_hash({b"f": b"v" * 100}),
    ]
    for key in [b"k", b"x" * 70]:
        for payload in payloads:
            assert rdb_writer.encode_item(key, payload) == peer_writer.encode_item(key, payload)
