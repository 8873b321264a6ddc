"""What a run needs around the contenders: a scratch directory, a redis-server, the machine."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any

from tests.servers import RedisServer, system_redis_server

from .scale import Scale

#: Databases handed to Redis stores, each open store its own. Database 15 is
#: left alone: it is where replicator cursors live (telstate.redis.MIRROR_CURSOR_DB).
REDIS_DATABASES = 15


class BenchEnv:
    """Scratch space and servers for one run; `close` removes them.

    Parameters
    ----------
    scale
        Workload sizes.
    workdir
        Parent of the scratch directory. It decides which disk the LMDB
        stores and RDB files are on, so fsync figures are that disk's.
    """

    def __init__(self, scale: Scale, workdir: str | os.PathLike | None = None) -> None:
        self.scale = scale
        self.root = Path(tempfile.mkdtemp(prefix="telstate-bench-", dir=workdir))
        self._counter = 0
        self._redis: RedisServer | None = None
        self._free_dbs = list(range(REDIS_DATABASES))

    def scratch(self, name: str) -> Path:
        """A new, empty directory under the scratch root."""
        self._counter += 1
        path = self.root / f"{self._counter:04d}-{name}"
        path.mkdir()
        return path

    @property
    def redis(self) -> RedisServer:
        """The run's redis-server (no persistence, unix socket), started on first use."""
        if self._redis is None:
            self._redis = RedisServer(directory=self.scratch("redis")).start()
        return self._redis

    def acquire_db(self) -> int:
        """A Redis database number no open store uses, flushed."""
        if not self._free_dbs:
            raise RuntimeError(f"more than {REDIS_DATABASES} Redis stores open at once")
        db = self._free_dbs.pop(0)
        with self.redis.client(db=db) as client:
            client.flushdb()
        return db

    def release_db(self, db: int) -> None:
        """Flush database `db` and make it available again."""
        with self.redis.client(db=db) as client:
            client.flushdb()
        self._free_dbs.append(db)

    def redis_url(self, db: int) -> str:
        """URL of database `db` of the run's server."""
        return f"unix://{self.redis.socket}?db={db}"

    def close(self) -> None:
        """Stop the server and remove the scratch directory."""
        if self._redis is not None:
            self._redis.stop()
        shutil.rmtree(self.root, ignore_errors=True)


def _cpu_model() -> str:
    """The CPU's model name, with family and model numbers when the name is vague."""
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                name, _, value = line.partition(":")
                fields.setdefault(name.strip(), value.strip())
    except OSError:
        return platform.processor() or platform.machine()
    model = fields.get("model name", platform.machine())
    if "cpu family" in fields and "model" in fields:
        model += f" (family {fields['cpu family']}, model {fields['model']})"
    return model


def _virtualised() -> bool:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            return any(line.startswith("flags") and " hypervisor" in line for line in cpuinfo)
    except OSError:
        return False


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _disk(path: Path) -> dict[str, Any]:
    """The block device and filesystem that hold `path`."""
    device = os.stat(path).st_dev
    info: dict[str, Any] = {"path": str(path)}
    sys_dev = Path(f"/sys/dev/block/{os.major(device)}:{os.minor(device)}")
    if sys_dev.exists():
        block = sys_dev.resolve()
        if (block / "partition").exists():
            block = block.parent
        info["device"] = block.name
        info["rotational"] = _read(block / "queue" / "rotational") == "1"
        model = _read(block / "device" / "model")
        vendor = _read(block / "device" / "vendor")
        info["model"] = model or ("virtio" if vendor == "0x1af4" else vendor)
    best = ""
    try:
        with open("/proc/mounts") as mounts:
            for line in mounts:
                source, target, fstype = line.split()[:3]
                if str(path).startswith(target) and len(target) >= len(best):
                    best = target
                    info["filesystem"] = fstype
                    info["mount"] = target
                    info["source"] = source
    except OSError:
        pass
    return info


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _redis_server_version() -> str | None:
    try:
        output = subprocess.run(
            [system_redis_server(), "--version"], capture_output=True, text=True, check=True
        ).stdout
    except (OSError, RuntimeError, subprocess.CalledProcessError):
        return None
    return output.split()[2].removeprefix("v=") if len(output.split()) > 2 else output.strip()


def describe_machine(workdir: Path) -> dict[str, Any]:
    """CPU, cores, memory, disk, OS and package versions, for the report."""
    try:
        memory_kb = int(_read(Path("/proc/meminfo")).split()[1])  # type: ignore[union-attr]
    except (AttributeError, IndexError, ValueError):
        memory_kb = 0
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "virtualised": _virtualised(),
        "memory_gb": round(memory_kb / 1024**2, 1),
        "disk": _disk(workdir),
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "redis_server": _redis_server_version(),
        "packages": {
            name: _version(name)
            for name in ("telstate", "katsdptelstate", "rdbtools", "redis", "hiredis", "lmdb")
            + ("msgpack", "numpy")
        },
    }


def describe_machine_line(machine: dict[str, Any]) -> str:
    """One line for humans: CPU, cores, memory, disk, OS."""
    disk = machine["disk"]
    disk_text = " ".join(
        str(part)
        for part in (
            disk.get("device"),
            f"({disk['model']})" if disk.get("model") else None,
            disk.get("filesystem"),
        )
        if part
    )
    return (
        f"{machine['cpu']}, {machine['cores']} cores"
        f"{' (virtual machine)' if machine['virtualised'] else ''}, "
        f"{machine['memory_gb']} GB RAM, disk {disk_text or 'unknown'}, {machine['os']}, "
        f"Python {machine['python']}, redis-server {machine['redis_server']}"
    )
