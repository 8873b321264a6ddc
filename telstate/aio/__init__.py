"""Asynchronous (asyncio) interface to telescope state.

``telstate.aio`` stands in for ``katsdptelstate.aio``:
:class:`TelescopeState` with the backends
:class:`telstate.aio.memory.MemoryBackend`,
:class:`telstate.aio.redis.RedisBackend` and
:class:`telstate.aio.lmdb.LmdbBackend`.
"""

from .telescope_state import TelescopeState

__all__ = ["TelescopeState"]
