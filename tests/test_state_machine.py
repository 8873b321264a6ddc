"""Random operation sequences on every backend at once, checked against a plain model.

Each step runs on a TelescopeState per backend and on the model; every
result (value or exception class) must agree.
"""

from __future__ import annotations

import bisect
import math

import hypothesis.strategies as st
import numpy as np
import pytest
from hypothesis import settings
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from telstate import ImmutableKeyError, KeyType, TelescopeState
from telstate.encoding import encode_sub_key, encode_value, equal_encoded_values
from telstate.utils import compile_pattern, pack_timestamp, split_timestamp

from .backends import BACKENDS

KEYS = st.sampled_from(["a", "b", "c", "cb_a", "cb_b", "x_c"])
PREFIXES = st.sampled_from(["", "cb", "x"])
TIMESTAMPS = st.sampled_from([0.0, 1.0, 1.5, 2.0, 1e9, 1.7e9 + 0.25])
VALUES = st.one_of(
    st.integers(-3, 3),
    st.sampled_from(["s", "", "t", b"s", b"\xff"]),
    st.floats(allow_nan=False, width=64),
    st.tuples(st.integers(0, 2), st.text(max_size=2)),
    st.lists(st.integers(0, 2), max_size=3),
    st.builds(np.arange, st.integers(0, 4)),
)
SUB_KEYS = st.one_of(st.integers(0, 3), st.sampled_from(["p", "q", ("t", 1)]))
RANGE_TIMES = st.one_of(st.none(), TIMESTAMPS, st.sampled_from([-1.0, 0.5, math.inf]))
PATTERNS = st.sampled_from(["*", "a", "cb_*", "?", "*_?", "[ab]", "[^a]*", "x\\_c"])


class Model:
    """What telstate should hold, as plain Python: encoded bytes throughout."""

    def __init__(self) -> None:
        self.data: dict[bytes, bytes | list[bytes] | dict[bytes, bytes]] = {}

    def _type(self, key: bytes) -> KeyType | None:
        value = self.data.get(key)
        if value is None:
            return None
        return {bytes: KeyType.IMMUTABLE, list: KeyType.MUTABLE, dict: KeyType.INDEXED}[type(value)]

    def add_immutable(self, key: bytes, value: bytes) -> None:
        old = self.data.get(key)
        if old is None:
            self.data[key] = value
        elif not isinstance(old, bytes) or not equal_encoded_values(value, old):
            raise ImmutableKeyError

    def add_mutable(self, key: bytes, value: bytes, stamp: float) -> None:
        members = self.data.setdefault(key, [])
        if not isinstance(members, list):
            raise ImmutableKeyError
        member = pack_timestamp(stamp) + value
        if member not in members:
            bisect.insort(members, member)

    def set_indexed(self, key: bytes, sub_key: bytes, value: bytes) -> None:
        sub_keys = self.data.setdefault(key, {})
        if not isinstance(sub_keys, dict):
            raise ImmutableKeyError
        old = sub_keys.setdefault(sub_key, value)
        if not equal_encoded_values(old, value):
            raise ImmutableKeyError

    def get(self, keys: list[bytes]):
        for key in keys:
            value = self.data.get(key)
            if isinstance(value, list):
                return split_timestamp(value[-1])[0]
            if value is not None:
                return value
        return None

    def get_range(self, keys: list[bytes], start, end, include_previous, include_end):
        for key in keys:
            members = self.data.get(key)
            if members is None:
                continue
            if not isinstance(members, list):
                raise ImmutableKeyError
            samples = [split_timestamp(m) for m in members]
            if include_previous is None:
                include_previous = start is None
            end = math.inf if end is None else end
            start = end if start is None else start
            inside = [
                i
                for i, (_, t) in enumerate(samples)
                if t >= start and (t <= end if include_end else t < end)
            ]
            if include_previous:
                before = [i for i, (_, t) in enumerate(samples) if t < start]
                if before:
                    inside = sorted({before[-1], *inside})
            return [samples[i] for i in inside]
        raise KeyError


class TelstateMachine(RuleBasedStateMachine):
    """Drives every backend and the model with the same operations."""

    factories: dict = {}

    @initialize()
    def setup(self) -> None:
        self.model = Model()
        self.states = {name: TelescopeState(make()) for name, make in self.factories.items()}
        self.prefix = ""

    def _views(self):
        for name, state in self.states.items():
            yield name, (state.view(self.prefix) if self.prefix else state)

    def _model_keys(self, key: str) -> list[bytes]:
        prefixes = [self.prefix + "_", ""] if self.prefix else [""]
        return [(p + key).encode() for p in prefixes]

    def _all(self, operation, model_operation):
        """Run on every backend and the model; results and exception classes must agree."""
        try:
            expected = ("ok", model_operation())
        except (ImmutableKeyError, KeyError) as error:
            expected = ("error", type(error))
        for name, view in self._views():
            try:
                got = ("ok", operation(view))
            except (ImmutableKeyError, KeyError) as error:
                got = ("error", type(error))
            assert got == expected, f"{name}: {got!r} != model {expected!r}"

    @rule(prefix=PREFIXES)
    def change_view(self, prefix):
        self.prefix = prefix

    @rule(key=KEYS, value=VALUES)
    def add_immutable(self, key, value):
        encoded = encode_value(value)
        self._all(
            lambda view: view.add(key, value, immutable=True),
            lambda: self.model.add_immutable(self._model_keys(key)[0], encoded),
        )

    @rule(key=KEYS, value=VALUES, stamp=TIMESTAMPS)
    def add_mutable(self, key, value, stamp):
        encoded = encode_value(value)
        self._all(
            lambda view: view.add(key, value, ts=stamp),
            lambda: self.model.add_mutable(self._model_keys(key)[0], encoded, stamp),
        )

    @rule(key=KEYS, sub_key=SUB_KEYS, value=VALUES)
    def set_indexed(self, key, sub_key, value):
        self._all(
            lambda view: view.set_indexed(key, sub_key, value),
            lambda: self.model.set_indexed(
                self._model_keys(key)[0], encode_sub_key(sub_key), encode_value(value)
            ),
        )

    @rule(key=KEYS)
    def delete(self, key):
        def model_delete():
            for full_key in self._model_keys(key):
                self.model.data.pop(full_key, None)

        self._all(lambda view: view.delete(key), model_delete)

    @rule()
    def clear(self):
        self._all(lambda view: view.clear(), self.model.data.clear)

    @rule(key=KEYS)
    def get(self, key):
        self._all(
            lambda view: view.get(key, return_encoded=True),
            lambda: self.model.get(self._model_keys(key)),
        )

    @rule(key=KEYS, sub_key=SUB_KEYS)
    def get_indexed(self, key, sub_key):
        def model_get_indexed():
            for full_key in self._model_keys(key):
                value = self.model.data.get(full_key)
                if value is None:
                    continue
                if not isinstance(value, dict):
                    raise ImmutableKeyError
                return value.get(encode_sub_key(sub_key))
            return None

        self._all(
            lambda view: view.get_indexed(key, sub_key, return_encoded=True), model_get_indexed
        )

    @rule(
        key=KEYS,
        start=RANGE_TIMES,
        end=RANGE_TIMES,
        include_previous=st.sampled_from([None, False, True]),
        include_end=st.booleans(),
    )
    def get_range(self, key, start, end, include_previous, include_end):
        self._all(
            lambda view: view.get_range(
                key, start, end, include_previous, include_end, return_encoded=True
            ),
            lambda: self.model.get_range(
                self._model_keys(key), start, end, include_previous, include_end
            ),
        )

    @rule(key=KEYS)
    def key_type(self, key):
        def model_key_type():
            for full_key in self._model_keys(key):
                found = self.model._type(full_key)
                if found is not None:
                    return found
            return None

        def model_type_and_presence():
            found = model_key_type()
            return found, found is not None

        self._all(lambda view: (view.key_type(key), key in view), model_type_and_presence)

    @rule(pattern=PATTERNS)
    def keys(self, pattern):
        regex = compile_pattern(pattern.encode())
        self._all(
            lambda view: view.keys(pattern),
            lambda: sorted(k.decode() for k in self.model.data if regex.fullmatch(k)),
        )

    @invariant()
    def same_keys(self):
        if not hasattr(self, "model"):
            return
        expected = sorted(k.decode() for k in self.model.data)
        for name, state in self.states.items():
            assert state.keys() == expected, name


@pytest.mark.timeout(600)
def test_backends_agree_with_model(request):
    factories = {name: (lambda make=make: make(request)) for name, make in BACKENDS.items()}
    TelstateMachine.factories = factories
    machine = TelstateMachine.TestCase
    machine.settings = settings(max_examples=40, stateful_step_count=40, deadline=None)
    machine("runTest").runTest()
