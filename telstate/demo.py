"""``make run``: an observation recorded in the durable LMDB store, then audited.

It simulates a MeerKAT-style observation (attributes, a few hundred sensors
sampled over time, indexed calibration products, a capture-block view),
then shows the audit trail of a key, replays the log to mid-observation,
exports an RDB file, loads it back and verifies the store. The store is
left in ``./demo-store`` for the ``telstate`` command to explore.

Run as ``python -m telstate.demo [DIRECTORY] [--sensors N] [--samples N] [--overwrite]``.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import time

import numpy as np

from . import cli
from .lmdb import LmdbBackend, replay
from .telescope_state import TelescopeState

OBSERVATION_START = 1_763_900_000.0  # 2025-11-23, a fixed epoch so runs are comparable
N_ANTENNAS = 64


def _heading(text: str) -> None:
    print(f"\n== {text} " + "=" * max(0, 70 - len(text)))


def simulate(ts: TelescopeState, n_sensors: int, n_samples: int) -> tuple[int, float]:
    """Record an observation; return (sensor samples written, mid-observation time)."""
    rng = np.random.default_rng(1934)
    ts["obs_target"] = "PKS 1934-638"
    ts["obs_proposal_id"] = "SCI-20251123-XX-01"
    ts["sub_band"] = "l"
    ts["sub_pool_resources"] = ",".join(f"m{a:03d}" for a in range(N_ANTENNAS))
    for a in range(N_ANTENNAS):
        ts.add(f"m{a:03d}_observer", f"m{a:03d}, -30:42:39.8, 21:26:38.0, 1035.0", immutable=True)
        ts.add(f"m{a:03d}_position_enu", rng.normal(0, 500, 3), immutable=True)

    cb = ts.view("1763900000")  # the capture block's namespace
    cb["sdp_l0_int_time"] = 7.997
    cb["sdp_l0_bandwidth"] = 856e6
    cb["sdp_l0_center_freq"] = 1284e6
    cb["sdp_l0_bls_ordering"] = np.array(
        [[f"m{a:03d}h", f"m{b:03d}v"] for a in range(4) for b in range(4)]
    )

    names = ["anc_air_temperature", "anc_wind_speed", "obs_activity"]
    names += [f"m{i % N_ANTENNAS:03d}_pos_actual_scan_azim_{i}" for i in range(n_sensors - 3)]
    written = 0
    duration = 600.0
    for step in range(n_samples):
        t = OBSERVATION_START + duration * step / n_samples
        ts.add("anc_air_temperature", 22.0 + math.sin(step / 10), ts=t)
        ts.add("anc_wind_speed", float(rng.gamma(2.0, 2.0)), ts=t)
        activity = "slew" if step < n_samples // 10 else "track"
        if step in (0, n_samples // 10):
            ts.add("obs_activity", activity, ts=t)
            written += 1
        for name in names[3:]:
            ts.add(name, float(rng.uniform(-185, 275)), ts=t + rng.uniform(0, 0.5))
        written += len(names) - 1
    for a in range(N_ANTENNAS):
        for pol in "hv":
            cb.set_indexed("cal_product_G", (f"m{a:03d}", pol), rng.normal(1, 0.01, 4))
    return written, OBSERVATION_START + duration / 2


def main(argv: list[str] | None = None) -> int:
    """Run the demo; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("directory", nargs="?", default="demo-store")
    parser.add_argument("--sensors", type=int, default=300)
    parser.add_argument("--samples", type=int, default=100, help="samples per sensor")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace DIRECTORY if it is not empty"
    )
    args = parser.parse_args(argv)
    path = os.path.abspath(args.directory)
    if os.path.isdir(path) and os.listdir(path):
        if not args.overwrite:
            parser.error(f"{path} is not empty: pass --overwrite to replace it")
        shutil.rmtree(path)

    _heading(f"Recording an observation into lmdb://{path}")
    backend = LmdbBackend(path, durability="batch", writer_name="demo-observation")
    ts = TelescopeState(backend)
    start = time.perf_counter()
    samples, middle = simulate(ts, args.sensors, args.samples)
    backend.flush()
    elapsed = time.perf_counter() - start
    print(
        f"{backend.last_seq} events ({samples} sensor samples, {len(ts.keys())} keys) "
        f"in {elapsed:.2f} s: {backend.last_seq / elapsed:,.0f} events/s, durability=batch"
    )
    print(
        f"obs_target = {ts.obs_target!r}; latest anc_air_temperature = {ts.anc_air_temperature:.3f}"
    )
    cb = ts.view("1763900000")
    print(
        f"capture block view: sdp_l0_int_time = {cb.sdp_l0_int_time}, "
        f"obs_target through the view = {cb.obs_target!r}"
    )

    _heading("Audit trail of obs_activity (who wrote what, when)")
    cli.main(["history", path, "obs_activity"])

    _heading("Replay to mid-observation")
    mid_seq = backend.last_seq // 2
    then = replay(path, until_seq=mid_seq)
    print(
        f"at seq {mid_seq}: {len(then.keys())} keys, anc_air_temperature has "
        f"{len(then.get_range('anc_air_temperature', st=0))} samples "
        f"(now {len(ts.get_range('anc_air_temperature', st=0))})"
    )
    at_time = replay(path, until_time=time.time())
    print(f"replay to now equals the live state: {at_time.keys() == ts.keys()}")
    print(
        f"obs_activity at {cli.format_time(middle)} (sensor time): "
        f"{ts.get_range('obs_activity', et=middle)[0][0]!r}"
    )

    _heading("Export to RDB and load it back")
    rdb = os.path.join(path, "..", os.path.basename(path) + ".rdb")
    rdb = os.path.normpath(rdb)
    cli.main(["export", path, rdb])
    loaded = TelescopeState()
    loaded.load_from_file(rdb)
    same = all(
        loaded.get(k, return_encoded=True) == ts.get(k, return_encoded=True) for k in ts.keys()
    )
    print(f"{len(loaded.keys())} keys loaded from {rdb}; identical to the store: {same}")

    _heading("Verify: rebuild the state from the log and compare")
    status = cli.main(["verify", path])

    _heading("Explore further")
    print(f"  .venv/bin/telstate info {args.directory}")
    print(f"  .venv/bin/telstate log {args.directory} --key 'anc_*' --limit 5")
    print(f"  .venv/bin/telstate get {args.directory} anc_wind_speed --all")
    print(f"  .venv/bin/telstate replay {args.directory} --until {mid_seq} --rdb mid.rdb")
    backend.close()
    return status


if __name__ == "__main__":
    sys.exit(main())
