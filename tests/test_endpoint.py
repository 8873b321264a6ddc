"""Tests for telstate.endpoint, compared with katsdptelstate's parsers."""

from __future__ import annotations

import collections
import errno
import ipaddress
import re
import socket
import struct
from collections.abc import Callable
from typing import Any

import katsdptelstate.endpoint as peer
import pytest
from hypothesis import given
from hypothesis import strategies as st

from telstate.endpoint import Endpoint, endpoint_list_parser, endpoint_parser, endpoints_to_str


def as_pairs(endpoints: Any) -> Any:
    """Turn our or katsdptelstate's endpoints into comparable (host, port) pairs."""
    if isinstance(endpoints, list):
        return [(endpoint.host, endpoint.port) for endpoint in endpoints]
    return (endpoints.host, endpoints.port)


def outcome(parse: Callable[[str], Any], text: str) -> Any:
    """Parse `text`, giving (host, port) pairs or the type of the exception raised."""
    try:
        return as_pairs(parse(text))
    except Exception as exc:  # noqa: BLE001 - the type is the outcome
        return type(exc)


# ---------------------------------------------------------------------------
# Endpoint
# ---------------------------------------------------------------------------


def test_str() -> None:
    assert str(Endpoint("test.me", 80)) == "test.me:80"
    assert str(Endpoint("1080::8:800:200C:417A", 12345)) == "[1080::8:800:200C:417A]:12345"
    assert str(Endpoint("test.me", None)) == "test.me:None"
    # katsdptelstate raises TypeError for a host that is not a str.
    assert str(Endpoint(None, 1)) == "None:1"


def test_repr() -> None:
    assert repr(Endpoint("test.me", 80)) == "Endpoint('test.me', 80)"
    assert repr(Endpoint(b"host", None)) == "Endpoint(b'host', None)"


def test_iter() -> None:
    host, port = Endpoint("hello", 80)
    assert (host, port) == ("hello", 80)
    assert tuple(Endpoint("hello", 80)) == ("hello", 80)


def test_eq_and_hash() -> None:
    assert Endpoint("hello", 80) == Endpoint("hello", 80)
    assert Endpoint("hello", 80) != Endpoint("hello", 90)
    assert Endpoint("hello", 80) != Endpoint("world", 80)
    assert Endpoint("hello", 80) != ("hello", 80)
    assert Endpoint("hello", 80) != "hello:80"
    assert hash(Endpoint("hello", 80)) == hash(Endpoint("hello", 80))
    assert len({Endpoint("hello", 80), Endpoint("hello", 80), Endpoint("hello", 90)}) == 2


def test_multicast_subscribe() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for host in ["10.0.0.1", "hello", "::1", "ff02::1", None, "239.1.2.3.4"]:
            assert not Endpoint(host, 7148).multicast_subscribe(sock)
        group = Endpoint("239.255.12.34", 7148)
        try:
            assert group.multicast_subscribe(sock)
        except OSError as exc:
            pytest.skip(f"this host cannot join multicast groups: {exc}")
        # Joining the same group again fails, which shows the first join held.
        with pytest.raises(OSError) as excinfo:
            group.multicast_subscribe(sock)
        assert excinfo.value.errno == errno.EADDRINUSE


# ---------------------------------------------------------------------------
# Parsing: tables checked against katsdptelstate
# ---------------------------------------------------------------------------

SINGLE = [
    "hello",
    "hello:80",
    "192.168.0.1",
    "192.168.0.1:7148",
    "[1080::8:800:200C:417A]",
    "[1080::8:800:200C:417A]:80",
    "[::1]:80",
    "[notipv6]:1234",
    "",
    ":80",
    "host:",
    "host:abc",
    "host: 80",
    "host:+80",
    "host:-1",
    "[::1",
    "[::1]x:80",
    "[::1]:",
    "[]",
    "[]:80",
    "a:b:c",
    "::1",
    "[fe80::1%eth0]:80",
    "ho st:80",
    "[[::1]]:80",
]


@pytest.mark.parametrize("text", SINGLE)
def test_endpoint_parser_matches_peer(text: str) -> None:
    ours = outcome(endpoint_parser(1234), text)
    theirs = outcome(peer.endpoint_parser(1234), text)
    assert ours == theirs
    if isinstance(ours, type):
        assert issubclass(ours, ValueError)


def test_endpoint_parser() -> None:
    parse = endpoint_parser(1234)
    assert parse("hello") == Endpoint("hello", 1234)
    assert parse("hello:80") == Endpoint("hello", 80)
    assert parse("[1080::8:800:200C:417A]") == Endpoint("1080::8:800:200C:417A", 1234)
    assert parse("[::1]:80") == Endpoint("::1", 80)
    assert endpoint_parser(None)("hello") == Endpoint("hello", None)
    with pytest.raises(ValueError, match="IPv6"):
        parse("[notipv6]:1234")
    with pytest.raises(ValueError, match="port"):
        parse("hello:http")


LISTS = [
    "hello:80,world,[1080::8:800:200C:417A],192.168.0.255+4,10.0.255.255+3:60",
    "",
    " a , b:1 ",
    "10.0.0.1+0",
    "10.1+2",
    "1.2.3.4+-1",
    "1.2.3.4+x",
    "1.2.3.4+",
    "+3",
    "host+3",
    "[::1]:80,[::2]:80",
    "255.255.255.254+1:80",
    ",",
    "a,,b",
    "1.2.3.4+1+2",
    "1.2.3.4 +1",
]


@pytest.mark.parametrize("text", LISTS)
@pytest.mark.parametrize("single_port", [False, True])
def test_endpoint_list_parser_matches_peer(text: str, single_port: bool) -> None:
    ours = outcome(endpoint_list_parser(1234, single_port=single_port), text)
    theirs = outcome(peer.endpoint_list_parser(1234, single_port=single_port), text)
    assert ours == theirs
    if isinstance(ours, type):
        assert issubclass(ours, ValueError)


def test_endpoint_list_parser() -> None:
    parse = endpoint_list_parser(1234)
    assert parse("hello:80,world,[1080::8:800:200C:417A],192.168.0.255+4,10.0.255.255+3:60") == [
        Endpoint("hello", 80),
        Endpoint("world", 1234),
        Endpoint("1080::8:800:200C:417A", 1234),
        Endpoint("192.168.0.255", 1234),
        Endpoint("192.168.1.0", 1234),
        Endpoint("192.168.1.1", 1234),
        Endpoint("192.168.1.2", 1234),
        Endpoint("192.168.1.3", 1234),
        Endpoint("10.0.255.255", 60),
        Endpoint("10.1.0.0", 60),
        Endpoint("10.1.0.1", 60),
        Endpoint("10.1.0.2", 60),
    ]
    # An empty string is one endpoint with an empty host, as in katsdptelstate.
    assert parse("") == [Endpoint("", 1234)]
    with pytest.raises(ValueError, match="count"):
        parse("1.2.3.4+-1")
    with pytest.raises(ValueError, match="IPv4"):
        parse("host+2")


def test_ipv6_runs() -> None:
    # endpoints_to_str writes them (as katsdptelstate's does); katsdptelstate
    # cannot read them back, telstate can.
    parse = endpoint_list_parser(1234)
    assert parse("[::1]+2,[::ffff]+1:80") == [
        Endpoint("::1", 1234),
        Endpoint("::2", 1234),
        Endpoint("::3", 1234),
        Endpoint("::ffff", 80),
        Endpoint("::1:0", 80),
    ]
    with pytest.raises(ValueError):
        peer.endpoint_list_parser(1234)("[::1]+2")
    with pytest.raises(ValueError, match="last address"):
        parse("[ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff]+1")
    with pytest.raises(ValueError, match="brackets"):
        parse("[::1+1]")


def test_run_past_the_last_address() -> None:
    # katsdptelstate raises struct.error here, after building the run.
    with pytest.raises(ValueError, match="255.255.255.255"):
        endpoint_list_parser(80)("255.255.255.255+1")
    with pytest.raises(struct.error):
        peer.endpoint_list_parser(80)("255.255.255.255+1")


def test_single_port() -> None:
    parse = endpoint_list_parser(1234, single_port=True)
    assert parse("a:80,b:80") == [Endpoint("a", 80), Endpoint("b", 80)]
    assert parse("a,b") == [Endpoint("a", 1234), Endpoint("b", 1234)]
    with pytest.raises(ValueError, match="same port"):
        parse("a:80,b:81")
    with pytest.raises(ValueError, match="same port"):
        parse("a:1234,b,c:80")


# ---------------------------------------------------------------------------
# endpoints_to_str
# ---------------------------------------------------------------------------

TO_STR = [
    [],
    [Endpoint("hello", 80), Endpoint("world", None)],
    [Endpoint("10.0.0.3", 80), Endpoint("10.0.0.1", 80), Endpoint("10.0.0.2", 80)],
    [Endpoint("10.0.0.1", 80), Endpoint("10.0.0.2", 81), Endpoint("10.0.0.3", 80)],
    [Endpoint("10.0.0.1", None), Endpoint("10.0.0.2", None), Endpoint("10.0.0.2", 7)],
    [Endpoint("192.168.0.255", 1), Endpoint("192.168.1.0", 1), Endpoint("10.0.0.1", 1)],
    [Endpoint("10.0.0.1", 80), Endpoint("10.0.0.1", 80)],
    [Endpoint("::1", 80), Endpoint("fe80::1", 80), Endpoint("hello", 5)],
    [Endpoint(b"10.0.0.1", 80), Endpoint(b"10.0.0.2", 80)],
    [Endpoint("0:0::1", None), Endpoint("010.0.0.1", 3)],
]


@pytest.mark.parametrize("endpoints", TO_STR, ids=repr)
def test_endpoints_to_str_matches_peer(endpoints: list[Endpoint]) -> None:
    ours = endpoints_to_str(endpoints)
    theirs = peer.endpoints_to_str([peer.Endpoint(e.host, e.port) for e in endpoints])
    assert ours == theirs


def test_endpoints_to_str() -> None:
    endpoints = [
        Endpoint("10.0.0.2", 80),
        Endpoint("hello", None),
        Endpoint("10.0.0.1", 80),
        Endpoint("::1", 5),
        Endpoint("10.0.0.3", 80),
        Endpoint("10.0.0.9", None),
    ]
    assert endpoints_to_str(endpoints) == "10.0.0.9,10.0.0.1+2:80,[::1]:5,hello"


def test_consecutive_ipv6_addresses_make_a_run() -> None:
    # As in katsdptelstate, whose own parser cannot read the run back.
    endpoints = [Endpoint("::1", 80), Endpoint("::2", 80)]
    text = endpoints_to_str(endpoints)
    assert text == "[::1]+1:80"
    assert text == peer.endpoints_to_str([peer.Endpoint(e.host, e.port) for e in endpoints])
    assert endpoint_list_parser(None)(text) == endpoints


def test_repeated_last_address() -> None:
    # katsdptelstate overflows the address while looking for a run.
    endpoints = [Endpoint("255.255.255.255", 1)] * 2
    assert endpoints_to_str(endpoints) == "255.255.255.255:1,255.255.255.255:1"
    with pytest.raises(ipaddress.AddressValueError):
        peer.endpoints_to_str([peer.Endpoint(e.host, e.port) for e in endpoints])
    last_ipv6 = Endpoint("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", None)
    assert endpoints_to_str([last_ipv6] * 2) == f"[{last_ipv6.host}],[{last_ipv6.host}]"


def test_bytes_host_that_is_not_an_address() -> None:
    # katsdptelstate writes str(b"host"), i.e. "b'host'".
    assert endpoints_to_str([Endpoint(b"host", 80)]) == "host:80"


def test_uncomparable_ports() -> None:
    with pytest.raises(TypeError):
        endpoints_to_str([Endpoint("10.0.0.1", 80), Endpoint("10.0.0.2", "http")])


# ---------------------------------------------------------------------------
# Properties
# ---------------------------------------------------------------------------

IPV4 = st.integers(0, 2**32 - 1).map(lambda n: str(ipaddress.IPv4Address(n)))
# Clustered addresses, so that runs of consecutive ones are common.
IPV4_RUNS = st.integers(0, 20).map(lambda n: str(ipaddress.IPv4Address(0x0A0000FA + n)))
IPV6 = st.one_of(
    st.integers(0, 2**128 - 1), st.integers(0, 20), st.integers(2**128 - 20, 2**128 - 1)
).map(lambda n: ipaddress.IPv6Address(n).compressed)
HOSTNAMES = st.from_regex(r"[a-z][a-z0-9-]{0,8}(\.[a-z][a-z0-9]{0,4}){0,2}", fullmatch=True)
PORTS = st.one_of(st.none(), st.integers(0, 65535), st.sampled_from([7148, 7149]))
ENDPOINTS = st.lists(
    st.builds(Endpoint, st.one_of(IPV4, IPV4_RUNS, IPV6, HOSTNAMES), PORTS), min_size=1
)


def as_multiset(endpoints: list[Endpoint]) -> collections.Counter[tuple[Any, Any]]:
    return collections.Counter(as_pairs(endpoints))


@given(ENDPOINTS)
def test_round_trip(endpoints: list[Endpoint]) -> None:
    text = endpoints_to_str(endpoints)
    parsed = endpoint_list_parser(None)(text)
    assert as_multiset(parsed) == as_multiset(endpoints)
    if "]+" not in text:
        # katsdptelstate cannot parse runs of IPv6 addresses.
        assert as_pairs(peer.endpoint_list_parser(None)(text)) == as_pairs(parsed)
    try:
        theirs = peer.endpoints_to_str([peer.Endpoint(e.host, e.port) for e in endpoints])
    except ipaddress.AddressValueError:
        # katsdptelstate overflows on a repeated last address (see above).
        theirs = None
    if theirs is not None:
        assert text == theirs
    # Parsing our own output again gives the same string.
    assert endpoints_to_str(parsed) == text


# Short counts only: katsdptelstate expands "+count" eagerly, without a limit.
LIST_TEXT = st.text(alphabet="0123456789abcdef.:[]+, -", max_size=24).filter(
    lambda text: not re.search(r"\+[\s+-]*\d{4,}", text)
)


@given(LIST_TEXT)
def test_parsers_agree_with_peer(text: str) -> None:
    for single_port in [False, True]:
        ours = outcome(endpoint_list_parser(1234, single_port), text)
        theirs = outcome(peer.endpoint_list_parser(1234, single_port), text)
        if theirs is struct.error:
            # A run past 255.255.255.255: katsdptelstate's error is not a ValueError.
            assert ours is ValueError
        elif theirs is ValueError and "]+" in text and not isinstance(ours, type):
            # A run of IPv6 addresses, which only telstate reads.
            assert all(":" in endpoint[0] for endpoint in ours)
        else:
            assert ours == theirs
    single = text.split(",")[0]
    assert outcome(endpoint_parser(1234), single) == outcome(peer.endpoint_parser(1234), single)
