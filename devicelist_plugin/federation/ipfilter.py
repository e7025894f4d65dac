"""IP-range blocklist and allowlist for outbound federation connections.

Federation makes this server open connections to addresses chosen by remote
parties (server names, ``.well-known`` delegation, SRV records, DNS answers).
Without a filter anyone could make it probe its own network: loopback, RFC 1918
ranges, the cloud metadata service on link-local addresses.  Every address the
outbound agent is about to connect to is checked here first, *after* DNS
resolution, so a name that resolves to an internal address is refused too.

Semantics are Synapse's (``ip_range_blacklist`` / ``ip_range_whitelist``): an
address is refused when it is in the blocklist and not in the allowlist (the
allowlist wins).  As in Synapse, every IPv4 range in either list also covers the
IPv6 addresses that embed it (IPv4-mapped ``::ffff:a.b.c.d``, IPv4-compatible
``::a.b.c.d``, 6to4 ``2002:AABB:CCDD::/48``); we add the NAT64 well-known prefix
``64:ff9b::a.b.c.d`` as well.  ``0.0.0.0/8`` and ``::`` are always blocked, even
with a custom blocklist (Synapse always blocks ``0.0.0.0`` and ``::``).

Only the standard library is used; this module has no I/O.
"""

from __future__ import annotations

import ipaddress
from typing import Iterable, Sequence, Union

IPNetwork = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]
IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]

#: Private, loopback, link-local, multicast, documentation and reserved ranges
#: (Synapse's ``DEFAULT_IP_RANGE_BLOCKLIST`` plus ``0.0.0.0/8``, the IPv4
#: reserved ``240.0.0.0/4`` (which includes the broadcast address) and ``::``).
DEFAULT_IP_RANGE_BLOCKLIST: tuple[str, ...] = (
    # "This network"; 0.0.0.0 reaches the local host on Linux.
    "0.0.0.0/8",
    # Loopback.
    "127.0.0.0/8",
    # Private networks (RFC 1918).
    "10.0.0.0/8",
    "172.16.0.0/12",
    "192.168.0.0/16",
    # Carrier-grade NAT (RFC 6598).
    "100.64.0.0/10",
    # IETF protocol assignments.
    "192.0.0.0/24",
    # Link-local (includes the 169.254.169.254 cloud metadata service).
    "169.254.0.0/16",
    # Formerly the 6to4 relay anycast.
    "192.88.99.0/24",
    # Benchmarking (RFC 2544).
    "198.18.0.0/15",
    # Documentation (TEST-NET-1, -2, -3).
    "192.0.2.0/24",
    "198.51.100.0/24",
    "203.0.113.0/24",
    # Multicast.
    "224.0.0.0/4",
    # Reserved for future use, and the limited broadcast address.
    "240.0.0.0/4",
    # IPv6 unspecified and loopback.
    "::/128",
    "::1/128",
    # IPv6 link-local.
    "fe80::/10",
    # IPv6 unique local addresses.
    "fc00::/7",
    # IPv6 documentation.
    "2001:db8::/32",
    # IPv6 multicast.
    "ff00::/8",
    # IPv6 site-local (deprecated).
    "fec0::/10",
)

#: Ranges blocked whatever the configured blocklist says (the allowlist can
#: still let an address through, as in Synapse).
ALWAYS_BLOCKED: tuple[str, ...] = ("0.0.0.0/8", "::/128")

# IPv6 prefixes under which an IPv4 address is embedded in the low 32 bits.
_MAPPED_PREFIX = int(ipaddress.IPv6Address("::ffff:0:0"))
_COMPATIBLE_PREFIX = 0
_NAT64_PREFIX = int(ipaddress.IPv6Address("64:ff9b::"))
# 6to4 (RFC 3056): 2002:V4ADDR::/48, the IPv4 address in bits 16..48.
_SIX_TO_FOUR_PREFIX = int(ipaddress.IPv6Address("2002::"))


class IPRangeConfigError(ValueError):
    """A configured IP range is malformed.

    ``option`` names the configuration key, ``entry`` the bad value and
    ``index`` its position in the list (``None`` if the option itself is not a
    list).
    """

    def __init__(self, option: str, entry: object, index: int | None, reason: str) -> None:
        where = option if index is None else f"{option}[{index}]"
        super().__init__(f"{where}: {reason}")
        self.option = option
        self.entry = entry
        self.index = index
        self.reason = reason


class BlockedAddressError(Exception):
    """A connection to ``address`` was refused by the IP-range filter.

    Raised by the outbound agent (before any connection attempt) and by server
    discovery for IP-literal server names.  ``host`` is the name that led to the
    address, when there was one.
    """

    def __init__(self, address: str, host: str | None = None) -> None:
        if host is not None and host != address:
            message = f"{host} resolves to {address}, which is in a blocked IP range"
        else:
            message = f"{address} is in a blocked IP range"
        super().__init__(message)
        self.address = address
        self.host = host


def parse_ip_ranges(entries: object, option: str) -> tuple[IPNetwork, ...]:
    """Parse a configuration list of IP addresses and CIDR ranges.

    ``entries`` is the raw configuration value (a list of strings); ``option``
    is the configuration key, used in the error.  A bare address is a /32 or
    /128 range; host bits set below the prefix are accepted and cleared
    (``10.1.2.3/8`` is ``10.0.0.0/8``), as Synapse's netaddr parsing does.

    :raises IPRangeConfigError: naming the first bad entry.
    """
    if isinstance(entries, (str, bytes)) or not isinstance(entries, (list, tuple)):
        raise IPRangeConfigError(
            option, entries, None, f"must be a list of IP ranges, not {type(entries).__name__}"
        )
    networks = []
    for index, entry in enumerate(entries):
        if not isinstance(entry, str):
            raise IPRangeConfigError(
                option, entry, index, f"{entry!r} is not a string IP range such as '10.0.0.0/8'"
            )
        try:
            networks.append(ipaddress.ip_network(entry.strip(), strict=False))
        except ValueError as e:
            raise IPRangeConfigError(
                option, entry, index, f"invalid IP range {entry!r}: {e}"
            ) from None
    return tuple(networks)


def _embedding_networks(network: ipaddress.IPv4Network) -> list[ipaddress.IPv6Network]:
    """The IPv6 ranges whose addresses embed an address of ``network``."""
    v4 = int(network.network_address)
    prefix = network.prefixlen
    return [
        ipaddress.IPv6Network((_MAPPED_PREFIX | v4, 96 + prefix)),
        ipaddress.IPv6Network((_COMPATIBLE_PREFIX | v4, 96 + prefix)),
        ipaddress.IPv6Network((_NAT64_PREFIX | v4, 96 + prefix)),
        ipaddress.IPv6Network((_SIX_TO_FOUR_PREFIX | (v4 << 80), 16 + prefix)),
    ]


def _expand(networks: Iterable[IPNetwork]) -> tuple[IPNetwork, ...]:
    expanded: list[IPNetwork] = []
    for network in networks:
        expanded.append(network)
        if isinstance(network, ipaddress.IPv4Network):
            expanded.extend(_embedding_networks(network))
    return tuple(dict.fromkeys(expanded))


def _coerce(ranges: Iterable[str | IPNetwork], option: str) -> tuple[IPNetwork, ...]:
    return tuple(
        parse_ip_ranges([r], option)[0] if isinstance(r, str) else r for r in ranges
    )


def parse_address(ip: str) -> IPAddress:
    """Parse an IP address as a resolver or a server name gives it: IPv6 may
    be bracketed (``[::1]``) and carry a zone (``fe80::1%eth0``).

    :raises ValueError: if ``ip`` is not an IP address.
    """
    text = ip.strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    return ipaddress.ip_address(text)


def is_ip_literal(host: str) -> bool:
    """Whether ``host`` (possibly bracketed) is an IPv4 or IPv6 address."""
    try:
        parse_address(host)
    except ValueError:
        return False
    return True


class IPRangeFilter:
    """Decides whether an outbound connection to an IP address is allowed.

    :param blocklist: ranges to refuse (strings or ``ipaddress`` networks);
        ``None`` means :data:`DEFAULT_IP_RANGE_BLOCKLIST`.  :data:`ALWAYS_BLOCKED`
        is added in every case.
    :param allowlist: ranges let through even when blocked.
    """

    def __init__(
        self,
        blocklist: Iterable[str | IPNetwork] | None = None,
        allowlist: Iterable[str | IPNetwork] = (),
    ) -> None:
        if blocklist is None:
            blocklist = DEFAULT_IP_RANGE_BLOCKLIST
        block = _coerce(blocklist, "blocklist") + _coerce(ALWAYS_BLOCKED, "blocklist")
        allow = _coerce(allowlist, "allowlist")
        self._blocklist = _expand(block)
        self._allowlist = _expand(allow)

    @classmethod
    def from_config(
        cls,
        blocklist: object = None,
        allowlist: object = None,
        *,
        blocklist_option: str = "ip_range_blocklist",
        allowlist_option: str = "ip_range_allowlist",
    ) -> IPRangeFilter:
        """Build a filter from raw configuration values (``None`` = default
        blocklist / empty allowlist).

        :raises IPRangeConfigError: naming the option and the bad entry.
        """
        block = None if blocklist is None else parse_ip_ranges(blocklist, blocklist_option)
        allow = () if allowlist is None else parse_ip_ranges(allowlist, allowlist_option)
        return cls(block, allow)

    @property
    def blocklist(self) -> Sequence[IPNetwork]:
        """The effective blocklist, IPv6 embeddings of IPv4 ranges included."""
        return self._blocklist

    @property
    def allowlist(self) -> Sequence[IPNetwork]:
        """The effective allowlist, IPv6 embeddings of IPv4 ranges included."""
        return self._allowlist

    def is_blocked(self, ip: str) -> bool:
        """Whether a connection to ``ip`` must be refused.

        Something that is not an IP address is blocked (fail closed): callers
        pass resolved addresses, never host names.
        """
        try:
            address = parse_address(ip)
        except ValueError:
            return True
        if isinstance(address, ipaddress.IPv6Address) and address.scope_id is not None:
            address = ipaddress.IPv6Address(address.compressed.split("%", 1)[0])
        if not _contains(self._blocklist, address):
            return False
        return not _contains(self._allowlist, address)


def _contains(networks: Sequence[IPNetwork], address: IPAddress) -> bool:
    return any(
        address.version == network.version and address in network for network in networks
    )
