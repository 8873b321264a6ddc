"""A mirror only the replicator writes (Redis ACLs), credentials kept out of every message,
and the replicator's options checked.

Each test that changes ACLs has a redis-server of its own: ACLs are server-wide.
"""

from __future__ import annotations

import importlib
import json
import os
import string
import subprocess
import sys
import threading
import time
import urllib.parse

import pytest
import redis
from hypothesis import assume, given
from hypothesis import strategies as st

from replicator.acl import CLIENT_RULES, check_protection, setup_client_rules
from replicator.connection import PASSWORD_VARIABLE, connect, redact_url
from telstate import TelescopeState
from telstate.errors import ReadOnlyError
from telstate.lmdb import LmdbBackend
from tests.servers import RedisServer
from tests.test_replicator_e2e import REPO, Writer, daemons, settle, store, wait_for_cursor

__all__ = ["daemons", "store"]  # fixtures used here

PASSWORD = "s3cr3t-pw-for-tests"


@pytest.fixture
def server(tmp_path):
    with RedisServer(directory=tmp_path) as server:
        admin = server.client()
        admin.execute_command("ACL", "SETUSER", "admin", "on", f">{PASSWORD}", "~*", "&*", "+@all")
        admin.execute_command(
            "ACL", "SETUSER", "replicator", "on", f">{PASSWORD}", "~*", "&*", "+@all", "-@admin"
        )
        admin.close()
        yield server


def url(server: RedisServer, user: str | None = None) -> str:
    """The mirror's URL (database 0), as `user` (with the password) or with no credentials."""
    if user is None:
        return f"unix://{server.socket}?db=0"
    return f"unix://{user}:{PASSWORD}@{server.socket}?db=0"


def as_admin(server: RedisServer) -> redis.Redis:
    return server.client(username="admin", password=PASSWORD)


def status(store, mirror_url: str, *extra: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "replicator", "status", "--log", str(store)]
    return subprocess.run(
        [*command, "--redis", mirror_url, *extra], cwd=REPO, capture_output=True, text=True
    )


def test_protected_mirror_refuses_katsdptelstate_writes_at_once(store, server, daemons):
    katsdptelstate = importlib.import_module("katsdptelstate")
    Writer(store, count=300, rate=5000, seed=11).join()
    daemon = daemons(store, url(server, "admin"), "--acl-setup")
    client = as_admin(server)
    settle(store, client, daemon)
    theirs = katsdptelstate.TelescopeState(url(server))  # no credentials: user default
    ours = TelescopeState(LmdbBackend(store, readonly=True))
    assert sorted(theirs.keys()) == sorted(ours.keys())
    sensor = next(key for key in ours.keys() if key.startswith("sensor"))
    assert theirs.get_range(sensor, st=0) == ours.get_range(sensor, st=0)
    writes = {
        "add": lambda: theirs.add("foreign", 1.0),
        "add immutable": lambda: theirs.add("foreign", 1.0, immutable=True),
        "set_indexed": lambda: theirs.set_indexed("foreign", "sub", 1),
        "delete": lambda: theirs.delete(sensor),
    }
    for name, write in writes.items():
        started = time.monotonic()
        with pytest.raises(redis.ResponseError, match="(?i)permission|can't run"):
            write()
        assert time.monotonic() - started < 1.0, name

    # telstate's own client of the mirror reads it too, and refuses writes itself.
    remote = TelescopeState(url(server))
    assert sorted(remote.keys()) == sorted(ours.keys())
    assert remote.get_range(sensor, st=0) == ours.get_range(sensor, st=0)
    with pytest.raises(ReadOnlyError):
        remote.add("foreign", 1.0)

    # wait_key on the protected mirror wakes on a write made to the store.
    woke: list = []
    waiter = threading.Thread(
        target=lambda: woke.append(theirs.wait_key("late", lambda v, t: v == 42, timeout=10))
    )
    waiter.start()
    time.sleep(0.3)
    writer = TelescopeState(LmdbBackend(store, durability="none"))
    writer.add("late", 42, ts=1.0)
    writer.backend.close()
    waiter.join(15)
    assert woke == [None]
    settle(store, client, daemon)  # nothing the replicator wrote is lost
    ours.backend.close()

    report = status(store, url(server, "admin"), "--json")
    assert report.returncode == 0, report.stderr
    mirror = json.loads(report.stdout)["mirror"]
    assert mirror["protected"] is True, mirror
    text = status(store, url(server, "admin")).stdout
    assert "protected: clients (user 'default') can read and cannot write" in text
    daemon.stop()
    assert "is protected" in daemon.log_text()
    assert PASSWORD not in daemon.log_text() + report.stdout + text


def test_rules_set_by_an_administrator_and_a_replicator_without_admin_rights(
    store, server, daemons
):
    Writer(store, count=100, rate=5000, seed=12).join()
    # Unprotected at first: status says so.
    report = json.loads(status(store, url(server, "replicator"), "--json").stdout)
    assert report["mirror"]["protected"] is False
    assert "may write" in report["mirror"]["protection"]
    # The replicator may not change ACLs: --acl-setup stops it at once, saying why.
    run = subprocess.run(
        [sys.executable, "-m", "replicator", "--log", str(store)]
        + ["--redis", url(server, "replicator"), "--acl-setup", "--once"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 2
    assert "may not change ACLs" in run.stderr and "ACL SETUSER default" in run.stderr
    assert PASSWORD not in run.stderr
    # The administrator sets the rules; the replicator checks them without admin rights.
    as_admin(server).execute_command("ACL", "SETUSER", "default", *CLIENT_RULES)
    daemon = daemons(store, url(server, "replicator"))
    client = as_admin(server)
    settle(store, client, daemon)
    with pytest.raises(redis.exceptions.NoPermissionError):
        server.client().set(b"foreign", b"x")
    report = json.loads(status(store, url(server, "replicator"), "--json").stdout)
    assert report["mirror"]["protected"] is True, report
    daemon.stop()
    assert "is protected" in daemon.log_text()


def test_replicator_that_is_the_client_user_or_lacks_rights(store, server, daemons):
    base = [sys.executable, "-m", "replicator", "--log", str(store), "--once"]
    run = subprocess.run(
        [*base, "--redis", url(server), "--acl-setup"], cwd=REPO, capture_output=True, text=True
    )
    assert run.returncode == 2
    assert "the user that clients use" in run.stderr
    # Without --acl-setup it replicates, warning that clients may write.
    run = subprocess.run([*base, "--redis", url(server)], cwd=REPO, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "is not protected" in run.stderr
    # A replicator user that may not write is told what it needs.
    as_admin(server).execute_command(
        "ACL", "SETUSER", "weak", "on", f">{PASSWORD}", "~*", "&*", "+@all", "-@write"
    )
    run = subprocess.run(
        [*base, "--redis", url(server, "weak")], cwd=REPO, capture_output=True, text=True
    )
    assert run.returncode == 2
    assert "needs" in run.stderr and "+@all" in run.stderr
    assert PASSWORD not in run.stderr


def test_credentials_appear_in_no_log_status_or_error(store, server, daemons, tmp_path):
    secret_url = url(server, "admin")
    daemon = daemons(store, secret_url, "--rdb-dir", str(tmp_path / "rdb"))
    client = as_admin(server)
    wait_for_cursor(client, daemon)
    server.stop()  # failures are logged, with the server's address
    deadline = time.monotonic() + 20
    while "failed" not in daemon.log_text():
        assert time.monotonic() < deadline, daemon.log_text()
        time.sleep(0.05)
    down = status(store, secret_url)
    down_json = status(store, secret_url, "--json")
    assert "cannot read the mirror" in down.stdout
    server.start()  # empty, and without the users: the replicator's login now fails
    deadline = time.monotonic() + 20
    while "invalid username-password" not in daemon.log_text():
        assert time.monotonic() < deadline, daemon.log_text()
        time.sleep(0.05)
    daemon.stop()
    bad = subprocess.run(
        [sys.executable, "-m", "replicator", "--log", str(store)]
        + ["--redis", secret_url.replace("db=0", "db=15")],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "cursors" in bad.stderr
    shown = redact_url(secret_url)
    assert "admin:***@" in shown
    everything = daemon.log_text() + down.stdout + down.stderr + down_json.stdout + bad.stderr
    assert shown in everything
    assert PASSWORD not in everything


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--batch", "0"], "--batch: must be at least 1, not 0"),
        (["--batch", "-1"], "--batch: must be at least 1, not -1"),
        (["--batch", "many"], "--batch: 'many' is not a whole number"),
        (["--keep", "0"], "--keep: must be at least 1"),
        (["--snapshot-interval", "0"], "--snapshot-interval: must be a positive number"),
        (["--snapshot-interval", "nan"], "--snapshot-interval: must be a positive number"),
        (["--spare-db", "-2"], "--spare-db: must be at least 0, not -2"),
        (["--spare-db", "0"], "spare database for rebuilds must be another"),
        (["--spare-db", "15"], "spare database for rebuilds must be another"),
        (["--client-user", ""], "--client-user: '' is not a Redis user name"),
        (["--redis", "http://x"], "--redis: http://<not shown> is not a Redis URL: give"),
    ],
)
def test_bad_options_exit_2_with_a_message(store, options, message):
    command = [sys.executable, "-m", "replicator", "--log", str(store), "--once"]
    if "--redis" not in options:
        command += ["--redis", "unix:///nonexistent.sock?db=0"]
    run = subprocess.run([*command, *options], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert run.returncode == 2, run.stderr
    assert message in run.stderr


def test_acl_setup_needs_a_mirror(store, tmp_path):
    run = subprocess.run(
        [sys.executable, "-m", "replicator", "--log", str(store)]
        + ["--rdb-dir", str(tmp_path), "--acl-setup"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert run.returncode == 2 and "give --redis too" in run.stderr


def test_a_server_with_fewer_databases_than_the_spare(store, tmp_path):
    from tests.servers import system_redis_server

    socket = str(tmp_path / "small.sock")
    server = subprocess.Popen(
        [system_redis_server(), "--port", "0", "--unixsocket", socket, "--save", ""]
        + ["--databases", "4", "--dir", str(tmp_path), "--loglevel", "warning"],
        stdout=subprocess.DEVNULL,
    )
    try:
        client = redis.Redis(unix_socket_path=socket)
        deadline = time.monotonic() + 20
        while True:
            try:
                client.ping()
                break
            except (redis.ConnectionError, FileNotFoundError):
                assert time.monotonic() < deadline and server.poll() is None
                time.sleep(0.02)
        run = subprocess.run(
            [sys.executable, "-m", "replicator", "--log", str(store), "--once"]
            + ["--redis", f"unix://{socket}?db=0"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert run.returncode == 2
        assert "--spare-db (14)" in run.stderr and "out of range" in run.stderr
        assert "usage:" not in run.stderr  # not a usage error: the server refuses
    finally:
        server.terminate()
        server.wait(10)


_NAME = st.text(alphabet=string.ascii_letters + string.digits + "-_.", min_size=1, max_size=12)
_SECRET = st.text(alphabet=string.printable.strip() + " ", min_size=6)


@given(
    scheme=st.sampled_from(["redis", "rediss", "unix"]),
    user=st.none() | _NAME,
    password=_SECRET,
    host=_NAME,
    db=st.integers(0, 14),
    in_query=st.booleans(),
    encoded=st.booleans(),
)
def test_redacted_urls_never_show_the_password(scheme, user, password, host, db, in_query, encoded):
    """Encoded or not (a '/', '?', '#' or '@' in it makes the URL ambiguous), the password
    never shows; a URL that can be read keeps its host, port, database and user."""
    secret = urllib.parse.quote(password, safe="") if encoded else password
    location = f"/tmp/{host}.sock" if scheme == "unix" else f"{host}:6379/{db}"
    query = f"?db={db}" if scheme == "unix" else ""
    if in_query:
        query += f"{'&' if query else '?'}password=\0"
        template = f"{scheme}://{user + '@' if user else ''}{location}{query}"
    else:
        template = f"{scheme}://{user or ''}:\0@{location}{query}"
    url = template.replace("\0", secret)
    public = template.replace("\0", "") + "***<>"
    assume(password not in public and secret not in public)
    shown = redact_url(url)
    assert password not in shown and secret not in shown
    try:
        connect(url)[0].close()
    except ValueError as error:
        assert password not in str(error) and secret not in str(error)
        return
    if not encoded:
        return  # read as redis-py reads it, which may not be what was meant
    original = redis.connection.parse_url(url)
    redacted = redis.connection.parse_url(shown)
    for field in ("host", "port", "db", "username", "path"):
        assert redacted.get(field) == original.get(field), field


@pytest.mark.parametrize(
    "url",
    [
        "redis://admin:left-part/right-part@host/0",
        "redis://admin:left-part?right-part@host/0",
        "redis://admin:left-part#right-part@host/0",
        "unix://admin:left-part/right-part@/tmp/x.sock",
        "rediss://admin@host/0?ssl_password=left-part-right-part",
        "redis://admin@host/0?password=left-part&unknown=right-part",
        "redis://host:6379/0?password=left-part&right-part",  # found by hypothesis
        "unix:///tmp/x.sock?db=0&password=left-part&db=1right-part",
        "rediss://host/0?ssl_password=left-part&right-part",  # found by review
        "rediss://host/?ssl_password=left-part&db=3right-part",
    ],
)
def test_passwords_with_special_characters_are_never_shown(url):
    shown = redact_url(url)
    assert "left-part" not in shown and "right-part" not in shown, shown
    try:
        connect(url)[0].close()
    except ValueError as error:
        assert "left-part" not in str(error) and "right-part" not in str(error)
        assert "percent-encode" in str(error) or "not a Redis URL" in str(error)


def test_leftover_selectors_are_cleared_and_every_write_is_checked(server):
    admin = as_admin(server)
    client = server.client()  # user default, as katsdptelstate connects
    admin.execute_command(
        "ACL", "SETUSER", "default", "reset", "on", "nopass", "~*", "&*", "+@all", "(~* +@write)"
    )
    setup_client_rules(admin, "default")
    with pytest.raises(redis.exceptions.NoPermissionError):
        client.set(b"foreign", b"x")
    assert check_protection(admin, "default").protected is True
    # Rules that refuse only katsdptelstate's own writes are not enough.
    admin.execute_command("ACL", "SETUSER", "default", "reset", "on", "nopass", "~*", "&*", "+@all")
    for command in ("set", "zadd", "hset", "del", "flushdb", "publish"):
        admin.execute_command("ACL", "SETUSER", "default", f"-{command}")
    assert check_protection(admin, "default").protected is False
    admin.execute_command("ACL", "SETUSER", "default", *CLIENT_RULES, "+unlink", "+swapdb")
    protection = check_protection(admin, "default")
    assert protection.protected is False
    assert "may write: swapdb, unlink allowed" in protection.detail
    # A client user (status without credentials) tries writes that change nothing.
    assert check_protection(client, "default").protected is False
    admin.execute_command("ACL", "SETUSER", "default", *CLIENT_RULES)
    protection = check_protection(client, "default")
    assert protection.protected is True, protection
    for command in (
        ("unlink", "k"),
        ("flushall",),
        ("swapdb", "0", "1"),
        ("spublish", "update/k", "m"),
        ("restore", "k", "0", "payload"),
        ("function", "load", "code"),
        ("script", "flush"),
    ):
        assert admin.execute_command("ACL", "DRYRUN", "default", *command) != b"OK", command


def test_a_request_stream_granted_on_its_own_keys_leaves_the_mirror_protected(server):
    """What the remote-writes rules may add: writes to keys that no store key matches."""
    admin = as_admin(server)
    admin.set(b"sensor-temperature", b"a mirror key")
    client = server.client()
    admin.execute_command(
        "ACL", "SETUSER", "default", *CLIENT_RULES, "(~telstate-requests:* +xadd)"
    )
    # The stream is not in the mirror's database (whose keys are all the store's).
    assert server.client(db=2).xadd(b"telstate-requests:1", {b"op": b"set"})
    with pytest.raises(redis.exceptions.NoPermissionError):
        client.xadd(b"sensor-temperature-requests", {b"op": b"set"})
    assert check_protection(admin, "default").protected is True
    # A grant whose pattern matches a key of the mirror makes it unprotected.
    admin.execute_command("ACL", "SETUSER", "default", *CLIENT_RULES, "(~sensor* +@write)")
    protection = check_protection(admin, "default")
    assert protection.protected is False and "may write: append" in protection.detail


def test_the_password_from_a_file_or_the_environment(store, server, tmp_path):
    Writer(store, count=50, rate=5000, seed=13).join()
    secret_file = tmp_path / "password"
    secret_file.write_text(PASSWORD + "\n")
    mirror_url = f"unix://admin@{server.socket}?db=0"
    run = subprocess.run(
        [sys.executable, "-m", "replicator", "--log", str(store), "--once"]
        + ["--redis", mirror_url, "--redis-password-file", str(secret_file), "--acl-setup"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr
    environment = {**os.environ, PASSWORD_VARIABLE: PASSWORD}
    report = subprocess.run(
        [sys.executable, "-m", "replicator", "status", "--log", str(store)]
        + ["--redis", mirror_url, "--json"],
        cwd=REPO,
        capture_output=True,
        text=True,
        env=environment,
    )
    assert report.returncode == 0, report.stdout + report.stderr
    assert json.loads(report.stdout)["mirror"]["protected"] is True
    twice = subprocess.run(
        [sys.executable, "-m", "replicator", "status", "--log", str(store)]
        + ["--redis", url(server, "admin")],
        cwd=REPO,
        capture_output=True,
        text=True,
        env=environment,
    )
    assert twice.returncode == 2 and "give it once" in twice.stderr
    assert PASSWORD not in run.stderr + report.stdout + twice.stderr
