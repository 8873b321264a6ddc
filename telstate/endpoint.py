"""Network endpoints (host and port) and the strings that describe lists of them.

The string forms are those of katsdptelstate: ``host``, ``host:port``,
``[ipv6]:port`` and, in lists, ``a.b.c.d+count:port`` for a run of
consecutive IPv4 addresses. Lists may also hold ``[ipv6]+count:port``, the
runs of IPv6 addresses that :func:`endpoints_to_str` writes (as
katsdptelstate's does, although its parser rejects them).
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from collections.abc import Callable, Iterable, Iterator
from typing import Any

__all__ = ["Endpoint", "endpoint_list_parser", "endpoint_parser", "endpoints_to_str"]

_IPV4_MULTICAST = ipaddress.IPv4Network("224.0.0.0/4")
_UINT32 = struct.Struct(">I")


class Endpoint:
    """A TCP or UDP endpoint: a host and a port.

    The host is normally a str (a hostname or IP address) and the port an
    int, but any values are accepted. An endpoint unpacks as ``host, port``,
    so ``tuple(endpoint)`` can be passed to socket functions.

    Parameters
    ----------
    host
        Hostname or IP address (IPv6 without brackets).
    port
        Port number, or None if there is none.
    """

    def __init__(self, host: Any, port: Any) -> None:
        self.host = host
        self.port = port

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Endpoint):
            return NotImplemented
        return self.host == other.host and self.port == other.port

    def __hash__(self) -> int:
        return hash((self.host, self.port))

    def __str__(self) -> str:
        if isinstance(self.host, str) and ":" in self.host:
            # An IPv6 address: brackets keep its colons apart from the port's.
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"

    def __repr__(self) -> str:
        return f"Endpoint({self.host!r}, {self.port!r})"

    def __iter__(self) -> Iterator[Any]:
        return iter((self.host, self.port))

    def multicast_subscribe(self, sock: socket.socket) -> bool:
        """Join the multicast group named by the host, if it is one.

        Only IPv4 multicast addresses (224.0.0.0/4) are joined. The group is
        joined on the interface that the kernel chooses for it (the one the
        routing table gives for the group address); to receive on a
        particular interface, set ``IP_ADD_MEMBERSHIP`` on `sock` yourself.

        Parameters
        ----------
        sock
            An IPv4 UDP socket.

        Returns
        -------
        bool
            True if the host is an IPv4 multicast address (and was joined).

        Raises
        ------
        OSError
            If the kernel refuses the membership (for example if `sock` has
            joined the group already, or no interface can reach it).
        """
        if not isinstance(self.host, str):
            return False
        try:
            group = socket.inet_aton(self.host)
        except OSError:
            return False
        if ipaddress.IPv4Address(group) not in _IPV4_MULTICAST:
            return False
        request = group + socket.inet_aton("0.0.0.0")
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, request)
        return True


def _parse_port(text: str, endpoint: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"invalid port {text!r} in endpoint {endpoint!r}") from None


def endpoint_parser(default_port: Any) -> Callable[[str], Endpoint]:
    """Return a function that parses one endpoint from a string.

    The string is ``host`` or ``host:port``, where `port` is an integer. An
    IPv6 address is written in square brackets (as in RFC 2732), as in
    ``[::1]:8080``, so that its colons are not taken for the port's.

    Parameters
    ----------
    default_port
        Port of endpoints whose string has none.

    Returns
    -------
    Callable[[str], Endpoint]
        The parser. It raises :exc:`ValueError` if the port is not an
        integer or a bracketed host is not a valid IPv6 address.
    """

    def parse(text: str) -> Endpoint:
        host = text
        port = default_port
        # The port follows the last colon, except for colons inside brackets.
        search_from = 0
        if text.startswith("["):
            closing = text.find("]")
            if closing != -1:
                search_from = closing + 1
        colon = text.rfind(":", search_from)
        if colon != -1:
            host = text[:colon]
            port = _parse_port(text[colon + 1 :], text)
        if len(host) >= 2 and host[0] == "[" and host[-1] == "]":
            host = host[1:-1]
            try:
                socket.inet_pton(socket.AF_INET6, host)
            except OSError:
                raise ValueError(
                    f"{host!r} in endpoint {text!r} is not a valid IPv6 address "
                    "(only IPv6 addresses go in brackets)"
                ) from None
        return Endpoint(host, port)

    return parse


def _expand_run(host: str, port: Any, text: str) -> list[Endpoint]:
    """Expand ``address+count`` into count + 1 endpoints with consecutive addresses.

    The address is IPv4 (``a.b.c.d``) or, in brackets, IPv6 (``[::1]``).
    """
    start_text, _, count_text = host.rpartition("+")
    try:
        count = int(count_text)
    except ValueError:
        raise ValueError(f"invalid count {count_text!r} in endpoint {text!r}") from None
    if count < 0:
        raise ValueError(f"bad count {count} in endpoint {text!r}: it must not be negative")
    address_type: type[ipaddress.IPv4Address | ipaddress.IPv6Address] = ipaddress.IPv4Address
    bits = 32
    if len(start_text) >= 2 and start_text[0] == "[" and start_text[-1] == "]":
        address_type, bits, start_text = ipaddress.IPv6Address, 128, start_text[1:-1]
    try:
        # inet_aton for IPv4, as katsdptelstate: it takes short forms like 10.1.
        if bits == 32:
            (start,) = _UINT32.unpack(socket.inet_aton(start_text))
        else:
            start = int(ipaddress.IPv6Address(start_text))
    except (OSError, ValueError):
        raise ValueError(
            f"invalid address {start_text!r} in endpoint {text!r}: only an IPv4 "
            "address, or an IPv6 address in brackets, can be followed by +count"
        ) from None
    last = start + count
    if last >= 1 << bits:
        raise ValueError(f"endpoint {text!r} runs past the last address")
    return [Endpoint(str(address_type(address)), port) for address in range(start, last + 1)]


def endpoint_list_parser(
    default_port: Any, single_port: bool = False
) -> Callable[[str], list[Endpoint]]:
    """Return a function that parses a comma-separated list of endpoints.

    Each element has the form taken by :func:`endpoint_parser`, surrounding
    whitespace ignored. An IPv4 address, or an IPv6 address in brackets,
    may be followed by ``+count`` to add the `count` addresses that follow
    it: ``10.0.0.1+2:7148`` is ``10.0.0.1:7148,10.0.0.2:7148,10.0.0.3:7148``
    (katsdptelstate accepts runs of IPv4 addresses only).

    Parameters
    ----------
    default_port
        Port of endpoints whose element has none.
    single_port
        If true, the parser rejects lists whose endpoints do not all have
        the same port, so that the list determines one port.

    Returns
    -------
    Callable[[str], list[Endpoint]]
        The parser. It raises :exc:`ValueError` if an element is invalid
        (see :func:`endpoint_parser`), if ``+count`` follows something other
        than an IPv4 or bracketed IPv6 address, has a negative or non-integer
        count, or runs past the last address, or (with `single_port`) if
        the ports differ.
    """
    parse_one = endpoint_parser(default_port)

    def parse(text: str) -> list[Endpoint]:
        endpoints: list[Endpoint] = []
        for element in text.split(","):
            endpoint = parse_one(element.strip())
            if "+" in endpoint.host:
                endpoints.extend(_expand_run(endpoint.host, endpoint.port, text))
            else:
                endpoints.append(endpoint)
        if single_port and any(endpoint.port != endpoints[0].port for endpoint in endpoints):
            raise ValueError(f"all endpoints in {text!r} must use the same port")
        return endpoints

    return parse


def _sort_key(endpoint: Endpoint) -> tuple[bool, Any, Any]:
    # Endpoints without a port first; then by port, then by address.
    return (endpoint.port is not None, endpoint.port, endpoint.host)


def _with_port(host: str, port: Any) -> str:
    return host if port is None else f"{host}:{port}"


def endpoints_to_str(endpoints: Iterable[Endpoint]) -> str:
    """Write endpoints as a compact string that :func:`endpoint_list_parser` reads back.

    IPv4 addresses come first, grouped by port and sorted, with runs of
    consecutive addresses written as ``a.b.c.d+count``; then IPv6 addresses
    in the same way (in brackets: ``[::1]+count``, which katsdptelstate
    writes too but cannot parse), then other hosts in their original order. Ports that are
    None are left out. Parsing the string gives the same endpoints, possibly
    in a different order, as long as the hosts contain no ``,``, ``:`` or
    ``+`` and IP addresses are in their canonical form.

    Parameters
    ----------
    endpoints
        The endpoints. A bytes host is taken as UTF-8.

    Returns
    -------
    str
        The list, comma-separated.

    Raises
    ------
    TypeError
        If the ports of two IP endpoints cannot be compared for sorting.
    """
    ipv4: list[Endpoint] = []
    ipv6: list[Endpoint] = []
    other: list[str] = []
    for endpoint in endpoints:
        host = endpoint.host.decode() if isinstance(endpoint.host, bytes) else endpoint.host
        try:
            ipv4.append(Endpoint(ipaddress.IPv4Address(host), endpoint.port))
            continue
        except ipaddress.AddressValueError:
            pass
        try:
            ipv6.append(Endpoint(ipaddress.IPv6Address(host), endpoint.port))
        except ipaddress.AddressValueError:
            other.append(_with_port(str(host), endpoint.port))
    parts: list[str] = []
    for addresses, brackets in ((ipv4, "{}"), (ipv6, "[{}]")):
        # Runs of consecutive addresses with one port, as [first, count, port].
        runs: list[list[Any]] = []
        for endpoint in sorted(addresses, key=_sort_key):
            # Compare as ints: address arithmetic raises past the last address.
            if (
                runs
                and runs[-1][2] == endpoint.port
                and int(runs[-1][0]) + runs[-1][1] == int(endpoint.host)
            ):
                runs[-1][1] += 1
            else:
                runs.append([endpoint.host, 1, endpoint.port])
        for first, count, port in runs:
            suffix = f"+{count - 1}" if count > 1 else ""
            parts.append(_with_port(brackets.format(first.compressed) + suffix, port))
    parts.extend(other)
    return ",".join(parts)
