"""The data the workloads write and read: an observation's worth of telescope state.

Sensor names follow MeerKAT's (`m012_pos_actual_scan_azim`), sampled about
once a second; attributes are a mix of floats, strings and small arrays;
indexed keys are calibration products keyed by input name; the array
sensor carries 8 KB float64 arrays. Values are encoded once, here, with
katsdptelstate's encoder (telstate encodes identically, by contract), so
that every contender is filled with the same bytes.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from katsdptelstate.encoding import encode_value
from katsdptelstate.rdb_utility import dump_hash, dump_string, dump_zset
from katsdptelstate.rdb_writer_base import RDBWriterBase
from katsdptelstate.utils import pack_timestamp

_TIMESTAMP = struct.Struct(">d")

IMMUTABLE, MUTABLE, INDEXED = "immutable", "mutable", "indexed"
#: (key, kind, value): value is the encoded bytes (immutable), the sorted
#: packed members (mutable) or a dict of encoded sub-key to value (indexed).
Record = tuple[bytes, str, Any]

#: Start of the observation (sensor timestamps), and the sampling period.
T0 = 1_700_000_000.0
PERIOD = 1.0

_SENSOR_KINDS = (
    "pos_actual_scan_azim",
    "pos_actual_scan_elev",
    "pos_request_scan_azim",
    "pos_request_scan_elev",
    "ap_indexer_position",
    "rsc_rxl_lna_h_power_enabled",
    "dig_l_band_adc_hpol_rf_power_in",
    "windstow_active",
)
HISTORY_SENSOR = "anc_weather_wind_speed"
ARRAY_SENSOR = "cbf_bandpass_{:02d}"
#: Pattern for `keys`: the sensors of antennas m010 to m019.
KEYS_PATTERN = "m01?_*"
#: 8 KB: 1024 float64.
ARRAY_ELEMENTS = 1024


def sensor_names(count: int) -> list[str]:
    """`count` sensor names, antenna by antenna."""
    kinds = len(_SENSOR_KINDS)
    return [f"m{i // kinds:03d}_{_SENSOR_KINDS[i % kinds]}" for i in range(count)]


def attribute_names(count: int) -> list[str]:
    """`count` attribute (immutable key) names."""
    return [f"sdp_l0_{i:05d}_config" for i in range(count)]


def indexed_names(count: int) -> list[str]:
    """`count` indexed key names."""
    return [f"cal_{i:03d}_product_G" for i in range(count)]


def sub_key_names(count: int) -> list[str]:
    """`count` sub-keys (input names: antenna and polarisation)."""
    return [f"m{i // 2:03d}{'hv'[i % 2]}" for i in range(count)]


def sample_time(sensor: int, sample: int) -> float:
    """Timestamp of a sensor's sample: once a period, sensors a millisecond apart."""
    return T0 + sample * PERIOD + sensor * 1e-3


def sensor_value(sensor: int, sample: int) -> float:
    """A smooth, sensor-specific float."""
    return 45.0 + 40.0 * math.sin(0.001 * sample + sensor)


def attribute_value(index: int) -> Any:
    """Attributes as pipelines store them: floats, strings, short lists, small arrays."""
    choice = index % 4
    if choice == 0:
        return 0.5 + index
    if choice == 1:
        return f"m{index % 64:03d},m{(index + 1) % 64:03d} l-band {index}"
    if choice == 2:
        return [index, index + 1, "wide"]
    return np.arange(3, dtype=np.float64) + index


def indexed_value(index: int) -> np.ndarray:
    """A calibration solution: four complex gains."""
    return (np.arange(4) + 1j * index).astype(np.complex64)


def arrays(count: int = 8) -> list[np.ndarray]:
    """A few different 8 KB arrays to cycle through."""
    rng = np.random.default_rng(7)
    return [rng.standard_normal(ARRAY_ELEMENTS) for _ in range(count)]


def encode_float(value: float) -> bytes:
    """`encode_value` of a float, without its general dispatch (millions are needed)."""
    return _MSGPACK_FLOAT + _DOUBLE.pack(value)


_MSGPACK_FLOAT = b"\xff\xcb"  # msgpack encoding marker, then msgpack's float 64
_DOUBLE = struct.Struct(">d")
if encode_value(1.25) != encode_float(1.25):
    raise ImportError("katsdptelstate encodes floats differently from benchmarks.data.encode_float")


def packed_samples(sensor: int, samples: range) -> list[bytes]:
    """Samples of a float sensor as stored: packed timestamp followed by encoded value."""
    return [
        pack_timestamp(sample_time(sensor, i)) + encode_float(sensor_value(sensor, i))
        for i in samples
    ]


def sensor_blocks(count: int, events: int, block: int = 100) -> Iterator[list[Record]]:
    """About `events` samples of `count` sensors, in blocks of `block` samples of every sensor.

    Loaded block after block, they make a log in which the keys are
    interleaved, as in an observation, instead of one key after another.
    """
    sensors = sensor_names(count)
    per_sensor = max(1, events // count)
    for first in range(0, per_sensor, block):
        samples = range(first, min(per_sensor, first + block))
        yield [
            (name.encode(), MUTABLE, packed_samples(s, samples)) for s, name in enumerate(sensors)
        ]


def _sensor_records(sensors: Sequence[str], samples: int, offset: int = 0) -> list[Record]:
    return [
        (name.encode(), MUTABLE, packed_samples(s, range(samples)))
        for s, name in enumerate(sensors, start=offset)
    ]


def _attribute_records(count: int) -> list[Record]:
    return [
        (name.encode(), IMMUTABLE, encode_value(attribute_value(i)))
        for i, name in enumerate(attribute_names(count))
    ]


def _indexed_records(keys: int, sub_keys: int) -> list[Record]:
    subs = [encode_value(sub) for sub in sub_key_names(sub_keys)]
    return [
        (name.encode(), INDEXED, {sub: encode_value(indexed_value(i)) for sub in subs})
        for i, name in enumerate(indexed_names(keys))
    ]


def _array_records(samples: int) -> list[Record]:
    values = [encode_value(array) for array in arrays()]
    members = [pack_timestamp(sample_time(0, i)) + values[i % len(values)] for i in range(samples)]
    return [(ARRAY_SENSOR.format(0).encode(), MUTABLE, members)]


@dataclass(frozen=True)
class Observation:
    """The populated store the read workloads query."""

    sensors: list[str]
    samples: int
    history_samples: int
    attributes: list[str]
    indexed: list[str]
    sub_keys: list[str]

    @classmethod
    def sized(cls, scale: Any) -> Observation:
        return cls(
            sensor_names(scale.sensors),
            scale.samples,
            scale.history_samples,
            attribute_names(scale.attributes),
            indexed_names(scale.indexed_keys),
            sub_key_names(scale.sub_keys),
        )

    def records(self) -> list[Record]:
        return (
            _sensor_records(self.sensors, self.samples)
            + _sensor_records([HISTORY_SENSOR], self.history_samples, offset=len(self.sensors))
            + _attribute_records(len(self.attributes))
            + _indexed_records(len(self.indexed), len(self.sub_keys))
        )


def metadata_records(scale: Any) -> list[Record]:
    """The attributes and indexed keys of an observation."""
    return _attribute_records(scale.attributes) + _indexed_records(
        scale.indexed_keys, scale.sub_keys
    )


def rdb_records(scale: Any) -> list[Record]:
    """What the RDB file holds: float sensors, an array sensor, attributes, indexed keys."""
    return (
        _sensor_records(sensor_names(scale.rdb_sensors), scale.rdb_samples)
        + _array_records(scale.rdb_arrays)
        + metadata_records(scale)
    )


#: A capture block's full dump: per antenna, the 2 s pointing and receiver
#: sensors that make up most of its samples.
_ARCHIVE_SENSORS = (
    "pos_actual_scan_azim",
    "pos_actual_scan_elev",
    "pos_request_scan_azim",
    "pos_request_scan_elev",
    "pos_actual_pointm_azim",
    "pos_actual_pointm_elev",
    "pos_adjust_pointm_azim",
    "pos_adjust_pointm_elev",
    "ap_indexer_position_raw",
    "dig_l_band_adc_hpol_rf_power_in",
    "dig_l_band_adc_vpol_rf_power_in",
    "rsc_rxl_lna_h_temperature",
    "rsc_rxl_lna_v_temperature",
    "ap_actual_azim_velocity",
)
_ACTIVITIES = ("slew", "track", "scan_ready", "scan", "scan_complete", "stop")
ARCHIVE_PERIOD = 2.0
#: Capture block id: the namespace its own keys live in (`<cbid>_obs_params`, ...).
ARCHIVE_CAPTURE_BLOCK = "1700000000"
#: Bandpass solutions: complex64 channels × 2 polarisations × antennas.
ARCHIVE_CHANNELS = 4096


def archive_records(scale: Any) -> Iterator[Record]:
    """A capture block's full dump, key by key, as a metadata writer archives it.

    Per antenna: `scale.archive_sensors` float sensors sampled every
    :data:`ARCHIVE_PERIOD` seconds for `scale.archive_samples` samples
    (the bulk of the file), an activity and a target sensor that change a
    few times an hour, and an observer attribute. Then the capture block's
    namespace (`<cbid>_obs_*`, its calibration products: gains every two
    minutes and a bandpass solution of :data:`ARCHIVE_CHANNELS` channels
    every 20 minutes), and the stream attributes. Generated
    key by key, so a dump of any size is written in bounded memory;
    deterministic, so every run writes the same file.
    """
    antennas = [f"m{i:03d}" for i in range(scale.archive_antennas)]
    samples = scale.archive_samples
    changes = max(2, samples // 300)
    sensor = 0
    for antenna in antennas:
        for kind in _ARCHIVE_SENSORS[: scale.archive_sensors]:
            members = [
                pack_timestamp(T0 + i * ARCHIVE_PERIOD + sensor * 1e-4)
                + encode_float(sensor_value(sensor, i))
                for i in range(samples)
            ]
            yield f"{antenna}_{kind}".encode(), MUTABLE, members
            sensor += 1
        step = samples * ARCHIVE_PERIOD / changes
        yield (
            f"{antenna}_activity".encode(),
            MUTABLE,
            [
                pack_timestamp(T0 + i * step) + encode_value(_ACTIVITIES[i % len(_ACTIVITIES)])
                for i in range(changes)
            ],
        )
        yield (
            f"{antenna}_target".encode(),
            MUTABLE,
            [
                pack_timestamp(T0 + i * step)
                + encode_value(f"J{i:04d}-3000 | src{i}, radec, {i % 24}:00:00.0, -30:00:00.0")
                for i in range(0, changes, 2)
            ],
        )
        yield (
            f"{antenna}_observer".encode(),
            IMMUTABLE,
            encode_value(f"{antenna}, -30:42:39.8, 21:26:38.0, 1035.0, 13.5, {sensor}.0 0 0"),
        )
    cbid = ARCHIVE_CAPTURE_BLOCK
    yield from _capture_block_records(cbid, antennas, samples)
    for i, name in enumerate(attribute_names(scale.attributes)):
        yield f"sdp_l0_{name}".encode(), IMMUTABLE, encode_value(attribute_value(i))


def _capture_block_records(cbid: str, antennas: list[str], samples: int) -> Iterator[Record]:
    duration = samples * ARCHIVE_PERIOD
    inputs = len(antennas) * 2
    rng = np.random.default_rng(15)
    yield (
        f"{cbid}_obs_params".encode(),
        IMMUTABLE,
        encode_value(
            {"description": "archive benchmark", "proposal_id": "BENCH-15", "sb_id_code": cbid}
        ),
    )
    yield (
        f"{cbid}_obs_activity".encode(),
        MUTABLE,
        [
            pack_timestamp(T0 + i * 60.0) + encode_value(_ACTIVITIES[i % len(_ACTIVITIES)])
            for i in range(max(1, int(duration // 60)))
        ],
    )
    gains = max(1, int(duration // 120))
    yield (
        f"{cbid}_cal_product_G".encode(),
        MUTABLE,
        [
            pack_timestamp(T0 + i * 120.0)
            + encode_value(rng.standard_normal((2, inputs // 2)).astype(np.complex64))
            for i in range(gains)
        ],
    )
    bandpasses = max(1, int(duration // 1200))
    yield (
        f"{cbid}_cal_product_B0".encode(),
        MUTABLE,
        [
            pack_timestamp(T0 + i * 1200.0)
            + encode_value(
                (rng.standard_normal((ARCHIVE_CHANNELS, 2, len(antennas))) * (1 + 1j)).astype(
                    np.complex64
                )
            )
            for i in range(bandpasses)
        ],
    )
    yield f"{cbid}_cal_antlist".encode(), IMMUTABLE, encode_value(antennas)


def write_katsdp_rdb(path: str | Path, records: Iterable[Record]) -> None:
    """Write `records` to an RDB file with katsdptelstate's own writer primitives."""
    with RDBWriterBase(str(path)) as writer:
        for key, kind, value in records:
            if kind == IMMUTABLE:
                writer.write_key(key, dump_string(value))
            elif kind == MUTABLE:
                writer.write_key(key, dump_zset(value))
            else:
                writer.write_key(key, dump_hash(value))


def write_sample_events(backend: Any, blocks: Iterable[list[Record]]) -> None:
    """Write mutable `blocks` into an LMDB store as `add` would: one event per sample.

    For the workloads that measure the log in events (replay, verify,
    the replicator's and a follower's catch-up). An import
    (``load_records``) would record a key's samples as a few
    ``add_mutable_many`` events instead. One write transaction per block.
    """
    for block in blocks:
        with backend.write() as wtxn:
            for key, kind, members in block:
                assert kind == MUTABLE
                for member in members:
                    wtxn.add_mutable(key, member[8:], _TIMESTAMP.unpack_from(member)[0])
