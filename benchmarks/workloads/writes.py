"""Writes: `add` of float and 8 KB array samples, `add` of attributes, `set_indexed`.

Each contender starts from an empty store; the rounds keep appending to
it (later samples, new attributes, new sub-keys), as an observation does.
The bare LMDB commits run the mutable adds only: with fsync, the floor
under `telstate lmdb (fsync)`; without sync (and, like telstate, without
writemap), the floor under `batch` and `none`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .. import data
from ..contenders import Contender, Store
from ..environment import BenchEnv
from ..harness import OPS, Case, Family, Figure, Row, throughput
from ..scale import Scale

ADD_FLOAT = Row("add mutable float", OPS)
ADD_ARRAY = Row("add mutable 8 KB ndarray", OPS)
ADD_IMMUTABLE = Row("add immutable", OPS)
SET_INDEXED = Row("set_indexed", OPS)


@dataclass
class _Fixture:
    store: Store
    env: BenchEnv
    #: Operations done so far per row, so that each round writes new samples and keys.
    done: dict[str, int] = field(default_factory=dict)


def _mutable_only(contender: Contender) -> str | None:
    return "a bare commit has no immutable or indexed keys" if contender.is_baseline else None


def _float_args(i: int, sensors: list[str]) -> tuple:
    s, k = i % len(sensors), i // len(sensors)
    return (sensors[s], data.sensor_value(s, k)), {"ts": data.sample_time(s, k)}


def _measure(row: Row, fixture: _Fixture, total: int, make_args: Callable[[int], tuple]) -> Figure:
    """Time `add` (or `set_indexed`) calls with the arguments `make_args(i)` makes (untimed)."""
    first = fixture.done.get(row.name, 0)
    ts = fixture.store.ts
    method = ts.set_indexed if row is SET_INDEXED else ts.add

    def make(start: int, count: int) -> list[tuple]:
        return [make_args(first + i) for i in range(start, start + count)]

    def run(calls: Sequence[tuple]) -> None:
        for args, kwargs in calls:
            method(*args, **kwargs)

    figure = throughput(make, run, total, fixture.env.scale.budget)
    fixture.done[row.name] = first + figure.raw["ops"]
    return figure


def _add_float(fixture: _Fixture, round_: int) -> Figure:
    sensors = data.sensor_names(fixture.env.scale.sensors)
    return _measure(
        ADD_FLOAT, fixture, fixture.env.scale.write_ops, lambda i: _float_args(i, sensors)
    )


def _add_array(fixture: _Fixture, round_: int) -> Figure:
    arrays = data.arrays()
    names = [data.ARRAY_SENSOR.format(i) for i in range(len(arrays))]

    def args(i: int) -> tuple:
        return (names[i % len(names)], arrays[i % len(arrays)]), {"ts": data.sample_time(0, i)}

    return _measure(ADD_ARRAY, fixture, fixture.env.scale.array_ops, args)


def _add_immutable(fixture: _Fixture, round_: int) -> Figure:
    def args(i: int) -> tuple:
        return (f"obs_{i:07d}_attribute", data.attribute_value(i)), {"immutable": True}

    return _measure(ADD_IMMUTABLE, fixture, fixture.env.scale.write_ops, args)


def _set_indexed(fixture: _Fixture, round_: int) -> Figure:
    keys = data.indexed_names(fixture.env.scale.indexed_keys)
    value = data.indexed_value(1)

    def args(i: int) -> tuple:
        sub_key = f"m{i // (2 * len(keys)):04d}{'hv'[i % 2]}"
        return (keys[(i // 2) % len(keys)], sub_key, value), {}

    return _measure(SET_INDEXED, fixture, fixture.env.scale.write_ops, args)


class Writes(Family):
    name = "writes"
    cases = (
        Case((ADD_FLOAT,), _add_float),
        Case((ADD_ARRAY,), _add_array),
        Case((ADD_IMMUTABLE,), _add_immutable, applies=_mutable_only),
        Case((SET_INDEXED,), _set_indexed, applies=_mutable_only),
    )

    def repeats(self, scale: Scale) -> int:
        return scale.throughput_rounds

    def describe(self, scale: Scale) -> str:
        return (
            "Each contender starts empty and keeps appending, round after round, through "
            "`add` / `set_indexed` (value encoding included): float samples over "
            f"{scale.sensors} sensors, 8 KB float64 arrays, new attributes, new indexed "
            "sub-keys. The bare LMDB commits store the same bytes in one write transaction "
            "each, without writemap: with fsync, the floor under `lmdb (fsync)`; without "
            "sync, the floor under `lmdb (batch)` and `lmdb (none)`."
        )

    def applies(self, contender: Contender) -> bool:
        return True

    def setup(self, store: Store, env: BenchEnv) -> Any:
        return _Fixture(store, env)
