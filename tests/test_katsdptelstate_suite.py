"""katsdptelstate 1.0.0's own test suites, run against telstate.

telstate promises that code written for katsdptelstate runs unchanged, and
the strictest check of that promise is the peer's own tests. The wheel of
``katsdptelstate==1.0.0`` (in the test extra) ships them as
``katsdptelstate/test/*.py`` and ``katsdptelstate/aio/test/*.py``. This
module builds, in a temporary directory, a package named ``katsdptelstate``
whose modules are copies of telstate's (``telstate/`` copied as it is; its
imports are relative, so every module is telstate's code), copies the peer's
test modules into it, and runs them with pytest in a subprocess. Nothing is
fetched at run time, and no redis-server is needed: the peer's Redis tests
use fakeredis (patching redis-py's constructors where they test ``from_url``).

A ``conftest.py`` beside the shim guards the run: a meta-path finder refuses
to import any ``katsdptelstate`` module from anywhere but the shim, and at
the end every loaded ``katsdptelstate`` module must come from the shim, so
the real katsdptelstate cannot stand in for telstate by mistake.

The only peer tests allowed to fail are those in :data:`ALLOWED_FAILURES`,
each of which inspects katsdptelstate's private implementation, and the
only ones allowed to skip are in :data:`PEER_SKIPS` (skipped by the peer's
own test code). Any other outcome fails this module, and so does a listed
test that starts passing or stops skipping (so the lists stay true).
"""

from __future__ import annotations

import collections
import importlib.util
import os
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

import telstate

#: Peer tests that may fail, with the reason: each looks at katsdptelstate's
#: private implementation rather than at its public behaviour.
ALLOWED_FAILURES: dict[str, str] = {
    "katsdptelstate/aio/test/test_telescope_state.py::"
    "TestTelescopeStateRedis::test_wait_key_concurrent": (
        "inspects the private pub/sub object `backend._pubsub.channels` and "
        "katsdptelstate's placeholder subscription `_DUMMY_CHANNEL`; telstate's "
        "monitors share a listener task that holds no placeholder channel"
    ),
    "katsdptelstate/aio/test/test_telescope_state.py::"
    "TestTelescopeStateRedis::test_wait_key_concurrent_same": (
        "inspects `backend._pubsub.channels` (see test_wait_key_concurrent)"
    ),
    "katsdptelstate/aio/test/test_telescope_state.py::"
    "TestTelescopeStateRedisFromUrl::test_wait_key_concurrent": (
        "inspects `backend._pubsub.channels` (see test_wait_key_concurrent)"
    ),
    "katsdptelstate/aio/test/test_telescope_state.py::"
    "TestTelescopeStateRedisFromUrl::test_wait_key_concurrent_same": (
        "inspects `backend._pubsub.channels` (see test_wait_key_concurrent)"
    ),
}

#: Peer tests that katsdptelstate itself skips, whatever the implementation.
PEER_SKIPS: dict[str, str] = {
    "katsdptelstate/test/test_encoding.py::TestEncodingPickle::test_fuzz": (
        "skipped by the test itself: fuzzing pickles could exhaust memory or crash"
    ),
}

#: The three suites: which peer test files belong to each.
SUITES: dict[str, tuple[str, ...]] = {
    "sync": (
        "katsdptelstate/test/test_encoding.py",
        "katsdptelstate/test/test_endpoint.py",
        "katsdptelstate/test/test_telescope_state.py",
    ),
    "rdb": (
        "katsdptelstate/test/test_rdb_handling.py",
        "katsdptelstate/aio/test/test_rdb_writer.py",
    ),
    "aio": ("katsdptelstate/aio/test/test_telescope_state.py",),
}

#: Longest any one peer test may take (they take milliseconds).
PER_TEST_TIMEOUT = 30
#: Longest the whole peer run may take.
RUN_TIMEOUT = 300

_GUARD = '''\
"""Guard: every katsdptelstate module must be the shim's copy of telstate's."""

import importlib.abc
import importlib.machinery
import os
import sys

SHIM = os.path.dirname(os.path.abspath(__file__))
PACKAGE = os.path.join(SHIM, "katsdptelstate")


def _from_shim(path):
    return path is not None and os.path.abspath(path).startswith(PACKAGE + os.sep)


class _ShimOnly(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "katsdptelstate" and not name.startswith("katsdptelstate."):
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or not _from_shim(spec.origin):
            raise ImportError(
                f"{name} would not come from the telstate shim: "
                f"{getattr(spec, 'origin', None)}"
            )
        return spec


_loaded = sorted(name for name in sys.modules if name.split(".")[0] == "katsdptelstate")
if _loaded:
    raise RuntimeError(f"katsdptelstate was imported before the guard: {_loaded}")
sys.meta_path.insert(0, _ShimOnly())


def pytest_sessionfinish(session, exitstatus):
    foreign = sorted(
        f"{name} from {getattr(module, '__file__', None)}"
        for name, module in list(sys.modules.items())
        if name.split(".")[0] == "katsdptelstate"
        and not _from_shim(getattr(module, "__file__", None))
    )
    loaded = [name for name in sys.modules if name.split(".")[0] == "katsdptelstate"]
    with open(os.path.join(SHIM, "guard-report.txt"), "w") as report:
        report.write(f"loaded {len(loaded)}\\n")
        for line in foreign:
            report.write(f"FOREIGN {line}\\n")
'''

_PYTEST_INI = f"""\
[pytest]
asyncio_mode = auto
asyncio_default_fixture_loop_scope = function
timeout = {PER_TEST_TIMEOUT}
"""


def _peer_package() -> Path:
    """Where the installed katsdptelstate lives, found without importing it."""
    spec = importlib.util.find_spec("katsdptelstate")
    assert spec is not None and spec.origin is not None, "katsdptelstate 1.0.0 is not installed"
    return Path(spec.origin).parent


def build_shim(root: Path) -> Path:
    """Build the shim package under `root`; return `root`."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    package = root / "katsdptelstate"
    shutil.copytree(Path(telstate.__file__).parent, package, ignore=ignore)
    peer = _peer_package()
    shutil.copytree(peer / "test", package / "test", ignore=ignore)
    shutil.copytree(peer / "aio" / "test", package / "aio" / "test", ignore=ignore)
    (root / "conftest.py").write_text(_GUARD)
    (root / "pytest.ini").write_text(_PYTEST_INI)
    return root


def _outcomes(junit: Path) -> dict[str, str]:
    """Map each test's node id to 'passed', 'failed' or 'skipped'."""
    outcomes = {}
    for case in ET.parse(junit).getroot().iter("testcase"):
        # classname is e.g. katsdptelstate.aio.test.test_rdb_writer.TestRdbWriter;
        # a module that fails to import has no classname, and its name as name.
        classname, name = case.get("classname", ""), case.get("name", "")
        if not classname:
            classname, name = name, "<collection>"
        parts = classname.split(".")
        module_end = 1 + max(i for i, part in enumerate(parts) if part.startswith("test_"))
        path = "/".join(parts[:module_end]) + ".py"
        node = "::".join([path, *parts[module_end:], name])
        if case.find("failure") is not None or case.find("error") is not None:
            outcomes[node] = "failed"
        elif case.find("skipped") is not None:
            outcomes[node] = "skipped"
        else:
            outcomes[node] = "passed"
    return outcomes


@pytest.fixture(scope="module")
def peer_run(tmp_path_factory) -> tuple[dict[str, str], str, Path]:
    """Run all of the peer's tests once against the shim; outcomes, output and shim root."""
    root = build_shim(tmp_path_factory.mktemp("katsdptelstate-shim"))
    junit = root / "results.xml"
    env = dict(os.environ, PYTHONPATH=str(root), PYTHONDONTWRITEBYTECODE="1")
    env.pop("PYTEST_ADDOPTS", None)
    files = [name for suite in SUITES.values() for name in suite]
    command = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-rfE"]
    # A peer module that fails to import counts as a failure; the rest still run.
    command += ["--continue-on-collection-errors", "-c", str(root / "pytest.ini")]
    command += ["--rootdir", str(root), f"--junitxml={junit}", *files]
    result = subprocess.run(
        command,
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
    )
    output = result.stdout + result.stderr
    assert junit.exists(), f"the peer run produced no results:\n{output}"
    return _outcomes(junit), output, root


def test_guard_kept_the_real_katsdptelstate_out(peer_run) -> None:
    outcomes, output, root = peer_run
    report = (root / "guard-report.txt").read_text().splitlines()
    assert report[0] != "loaded 0", "no katsdptelstate module was loaded"
    assert [line for line in report if line.startswith("FOREIGN")] == []


def test_guard_refuses_the_real_katsdptelstate(tmp_path) -> None:
    """With the real package first on the path, importing katsdptelstate fails."""
    root = build_shim(tmp_path)
    probe = (
        "import sys; sys.path.insert(0, sys.argv[1]); import conftest; "
        "sys.path.insert(0, sys.argv[2])\n"
        "try:\n    import katsdptelstate\nexcept ImportError as e:\n    print('refused', e)\n"
        "else:\n    print('imported', katsdptelstate.__file__)"
    )
    site = str(_peer_package().parent)
    result = subprocess.run(
        [sys.executable, "-c", probe, str(root), site],
        capture_output=True,
        text=True,
        timeout=60,
        env=dict(os.environ, PYTHONDONTWRITEBYTECODE="1"),
    )
    assert result.stdout.startswith("refused"), result.stdout + result.stderr


def _expected(node: str) -> str:
    if node in ALLOWED_FAILURES:
        return "failed"
    if node in PEER_SKIPS:
        return "skipped"
    return "passed"


@pytest.mark.parametrize("suite", sorted(SUITES))
def test_peer_suite(peer_run, suite: str) -> None:
    outcomes, output, root = peer_run
    mine = {node: outcome for node, outcome in outcomes.items() if node.startswith(SUITES[suite])}
    assert mine, f"no {suite} tests ran:\n{output}"
    listed = [node for node in [*ALLOWED_FAILURES, *PEER_SKIPS] if node.startswith(SUITES[suite])]
    gone = [node for node in listed if node not in mine]
    assert gone == [], f"listed peer tests that did not run: {gone}"
    wrong = {
        node: f"expected {_expected(node)}, got {outcome}"
        for node, outcome in sorted(mine.items())
        if outcome != _expected(node)
    }
    counts = collections.Counter(mine.values())
    assert wrong == {}, (
        f"{suite}: {counts['passed']} passed, {counts['failed']} failed, "
        f"{counts['skipped']} skipped; unexpected outcomes:\n"
        + "\n".join(f"  {node}: {why}" for node, why in wrong.items())
        + f"\n\npeer run output:\n{output}"
    )
