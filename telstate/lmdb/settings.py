"""Every tunable of the LMDB store, in one place.

Modules read these as ``settings.NAME`` when they run, so a test may
patch one (``monkeypatch.setattr(settings, "TAIL_MAX", 4)``). Constants
that define the on-disk format (the inline limits, the record layouts)
are not tunable: they live in :mod:`telstate.lmdb.layout`.

=========================  =========  ==============================================
Name                       Default    Meaning
=========================  =========  ==============================================
``MAP_SIZE``               1 TiB      memory map (address space only): the most a store holds
``MAX_READERS``            1024       LMDB reader slots (concurrent read transactions)
``READER_CHECK_INTERVAL``  10 s       every process clears stale reader slots this often
``READER_CHECK_WRITES``    32         and each process after this many write transactions
``READERS_FULL_WAIT``      15 s       an open finding every reader slot taken retries this long
``POLL_INTERVAL``          0.05 s     waiters check the last transaction id this often
``HEARTBEAT``              5 s        how long a waiter's announcement in ``notify`` lasts
``LOG_CHUNK``              4096       most events read per read transaction
``LOG_CHUNK_BYTES``        1 MiB      a chunk of events ends once its records hold this much
``LOAD_CHUNK``             100000     most values an import commits per transaction
``LOAD_CHUNK_BYTES``       8 MiB      about the most bytes an import commits per transaction
``BULK_EVENT_SAMPLES``     4096       most samples of an import's add_mutable_many event
``BULK_EVENT_BYTES``       256 KiB    about the most bytes of samples in one such event
``MONITOR_MAX_SCAN``       10000      more new events than this: monitors get a bare update
``MONITOR_MAX_BYTES``      16 MiB     so do new events holding more bytes than this
``CACHE_MAX_ENTRIES``      4096       entries of the per-process read cache
``CACHE_MAX_VALUE``        64 KiB     largest result kept in the read cache
``CACHE_MAX_BYTES``        16 MiB     bytes of results in the read cache (per store, process)
``TAIL_MAX``               128        tail samples of a mutable key before sealing a block
``BLOCK_MAX``              512        samples of a block before a late sample splits it
``RECORD_LIST_MAX``        65536      a snapshot gives mutable keys with more members lazily
``MEMBER_CHUNK``           4096       most tail members read at once by a lazy record
``VERIFY_CHUNK``           1024       events that verify (and export --until) read and check at once
=========================  =========  ==============================================
"""

MAP_SIZE = 1 << 40
MAX_READERS = 1024
READER_CHECK_INTERVAL = 10.0
READER_CHECK_WRITES = 32
# Longer than READER_CHECK_INTERVAL: any live process clears dead slots meanwhile.
READERS_FULL_WAIT = 15.0
POLL_INTERVAL = 0.05
HEARTBEAT = 5.0
LOG_CHUNK = 4096
LOG_CHUNK_BYTES = 1 << 20
LOAD_CHUNK = 100_000
LOAD_CHUNK_BYTES = 8 << 20
BULK_EVENT_SAMPLES = 4096
BULK_EVENT_BYTES = 256 << 10
MONITOR_MAX_SCAN = 10000
MONITOR_MAX_BYTES = 16 << 20
CACHE_MAX_ENTRIES = 4096
CACHE_MAX_VALUE = 65536
CACHE_MAX_BYTES = 16 << 20
TAIL_MAX = 128
BLOCK_MAX = 512
RECORD_LIST_MAX = 65536
MEMBER_CHUNK = 4096
VERIFY_CHUNK = 1024
