"""telstate: telescope state for radio-astronomy pipelines.

A drop-in replacement for katsdptelstate (``import telstate as
katsdptelstate``) whose durable store is an event-sourced LMDB log.
"""

from .encoding import (
    ALLOWED_ENCODINGS,
    ENCODING_DEFAULT,
    ENCODING_MSGPACK,
    ENCODING_PICKLE,
    PICKLE_PROTOCOL,
    decode_value,
    encode_value,
    set_allow_pickle,
)
from .errors import (
    CancelledError,
    ConnectionError,
    DecodeError,
    EncodeError,
    ImmutableKeyError,
    InvalidKeyError,
    InvalidTimestampError,
    RdbParseError,
    TelstateError,
    TimeoutError,
)
from .telescope_state import TelescopeState
from .utils import KeyType

__version__ = "0.1.0"

__all__ = [
    "ALLOWED_ENCODINGS",
    "ENCODING_DEFAULT",
    "ENCODING_MSGPACK",
    "ENCODING_PICKLE",
    "PICKLE_PROTOCOL",
    "CancelledError",
    "ConnectionError",
    "DecodeError",
    "EncodeError",
    "ImmutableKeyError",
    "InvalidKeyError",
    "InvalidTimestampError",
    "KeyType",
    "RdbParseError",
    "TelescopeState",
    "TelstateError",
    "TimeoutError",
    "decode_value",
    "encode_value",
    "set_allow_pickle",
]
