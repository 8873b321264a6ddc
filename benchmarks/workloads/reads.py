"""Reads from a store filled like an observation: latest values, ranges, indexed keys, keys().

Every contender's store is filled with the same bytes (through its fastest
bulk path, untimed) and checked before anything is timed.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from .. import data
from ..contenders import Store
from ..environment import BenchEnv
from ..harness import OPS, Case, Family, Figure, Row, throughput
from ..scale import Scale

GET_LATEST = Row("get latest (mutable)", OPS)
GET_ATTRIBUTE = Row("get immutable", OPS)
GET_INDEXED = Row("get_indexed", OPS)
RANGE_WINDOW = Row("get_range 10 s window, include_previous", OPS)
RANGE_HISTORY = Row("get_range full history", OPS)
KEYS = Row("keys with a pattern", OPS)


@dataclass
class _Fixture:
    store: Store
    env: BenchEnv
    observation: data.Observation


def _measure(
    fixture: _Fixture,
    round_: int,
    make_call: Callable[[Any, random.Random], Callable],
    ops: int,
    chunk: int = 100,
) -> Figure:
    """Time up to `ops` calls, each made (untimed) by `make_call(ts, rng)` as a callable.

    Slow calls (whole histories, key scans) go in chunks of one, so that
    the time budget is kept.
    """
    rng = random.Random(round_)
    ts = fixture.store.ts

    def make(start: int, count: int) -> list[Callable]:
        return [make_call(ts, rng) for _ in range(count)]

    def run(calls: Sequence[Callable]) -> None:
        for call in calls:
            call()

    return throughput(make, run, ops, fixture.env.scale.budget, chunk)


def _bind(method: Callable, *args: Any, **kwargs: Any) -> Callable:
    return lambda: method(*args, **kwargs)


def _get_latest(fixture: _Fixture, round_: int) -> Figure:
    sensors = fixture.observation.sensors
    return _measure(
        fixture,
        round_,
        lambda ts, rng: _bind(ts.get, rng.choice(sensors)),
        fixture.env.scale.read_ops,
    )


def _get_attribute(fixture: _Fixture, round_: int) -> Figure:
    names = fixture.observation.attributes
    return _measure(
        fixture,
        round_,
        lambda ts, rng: _bind(ts.get, rng.choice(names)),
        fixture.env.scale.read_ops,
    )


def _get_indexed(fixture: _Fixture, round_: int) -> Figure:
    keys, subs = fixture.observation.indexed, fixture.observation.sub_keys

    def call(ts: Any, rng: random.Random) -> Callable:
        return _bind(ts.get_indexed, rng.choice(keys), rng.choice(subs))

    return _measure(fixture, round_, call, fixture.env.scale.read_ops)


def _range_window(fixture: _Fixture, round_: int) -> Figure:
    observation = fixture.observation
    window = 10 * data.PERIOD

    def call(ts: Any, rng: random.Random) -> Callable:
        sensor = rng.randrange(len(observation.sensors))
        start = data.sample_time(sensor, rng.randrange(observation.samples)) - data.PERIOD / 2
        name = observation.sensors[sensor]
        return _bind(ts.get_range, name, st=start, et=start + window, include_previous=True)

    return _measure(fixture, round_, call, fixture.env.scale.read_ops)


def _range_history(fixture: _Fixture, round_: int) -> Figure:
    ops = max(1, fixture.env.scale.read_ops // 100)
    return _measure(
        fixture, round_, lambda ts, rng: _bind(ts.get_range, data.HISTORY_SENSOR, st=0), ops, 1
    )


def _keys(fixture: _Fixture, round_: int) -> Figure:
    ops = max(1, fixture.env.scale.read_ops // 100)
    return _measure(fixture, round_, lambda ts, rng: _bind(ts.keys, data.KEYS_PATTERN), ops, 1)


class Reads(Family):
    name = "reads"
    cases = (
        Case((GET_LATEST,), _get_latest),
        Case((GET_ATTRIBUTE,), _get_attribute),
        Case((GET_INDEXED,), _get_indexed),
        Case((RANGE_WINDOW,), _range_window),
        Case((RANGE_HISTORY,), _range_history),
        Case((KEYS,), _keys),
    )

    def repeats(self, scale: Scale) -> int:
        return scale.throughput_rounds

    def describe(self, scale: Scale) -> str:
        return (
            f"One store per contender, filled (untimed, with the same bytes) with "
            f"{scale.sensors} sensors × {scale.samples} float samples, one sensor of "
            f"{scale.history_samples} samples (the full history), {scale.attributes} "
            f"attributes and {scale.indexed_keys} indexed keys × {scale.sub_keys} sub-keys; "
            "each call picks a random key. The window returns about 10 samples and the one "
            f"before; `keys` matches `{data.KEYS_PATTERN}` (the sensors of ten antennas)."
        )

    def prepare(self, env: BenchEnv) -> None:
        self.observation = data.Observation.sized(env.scale)
        self.records = self.observation.records()

    def setup(self, store: Store, env: BenchEnv) -> Any:
        store.populate(self.records)
        _check(store.ts, self.observation, len(self.records))
        return _Fixture(store, env, self.observation)

    def finish(self) -> None:
        self.records = []


def _check(ts: Any, observation: data.Observation, keys: int) -> None:
    """Refuse to time a store that does not hold what the others hold."""
    found = len(ts.keys())
    history = len(ts.get_range(data.HISTORY_SENSOR, st=0))
    sensor = ts.get_range(observation.sensors[-1], st=0)
    expected = data.sample_time(len(observation.sensors) - 1, observation.samples - 1)
    if (found, history, sensor[-1][1]) != (keys, observation.history_samples, expected):
        raise RuntimeError(
            f"store filled wrongly: {found} keys (expected {keys}), {history} history samples "
            f"(expected {observation.history_samples}), last sample at {sensor[-1][1]}"
        )
