"""The workload families, in the order they run; each is one module.

To add a family, write a module with a :class:`~benchmarks.harness.Family`
subclass and add it to `FAMILIES`.
"""

from __future__ import annotations

from ..harness import Family
from .archive import Archive
from .followers import Followers
from .log import Log
from .rdb import Rdb
from .reads import Reads
from .remote import RemoteWrites
from .replication import Replication
from .waits import Waits
from .writes import Writes

FAMILIES: tuple[Family, ...] = (
    Writes(),
    Reads(),
    Waits(),
    Rdb(),
    Archive(),
    Log(),
    Replication(),
    RemoteWrites(),
    Followers(),
)
