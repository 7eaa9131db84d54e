"""Which addresses a URL fetch may connect to (``phicapd.fetch`` asks on every hop).

Public unicast addresses only, plus the networks ``[fetch] allow_networks`` names. Refused:
loopback, private, link-local, CGNAT (100.64/10), multicast, reserved, unspecified and other
non-global ranges. IPv4-mapped and NAT64 (64:ff9b::/96) addresses are judged by the IPv4 address
inside; 6to4, Teredo, IPv4-compatible and local-use NAT64 addresses are refused. A host spelled
as a number (``2130706433``, ``0x7f000001``, ``0177.1``) is read as inet_aton reads it, without DNS.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from phicapd.config import FetchSettings
from phicapd.errors import ConfigError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

_NUMERIC_LABEL = re.compile(r"^(0x[0-9a-f]*|[0-9]+)$", re.IGNORECASE)
_NAT64_WELL_KNOWN = ipaddress.ip_network("64:ff9b::/96")
_NAT64_LOCAL = ipaddress.ip_network("64:ff9b:1::/48")
_IPV4_COMPATIBLE = ipaddress.ip_network("::/96")
_CGNAT = ipaddress.ip_network("100.64.0.0/10")


def parse_legacy_ipv4(host: str) -> ipaddress.IPv4Address | None:
    """inet_aton's spellings: 1-4 parts, each decimal, 0x-hex or 0-octal; the last fills the rest.

    Returns None when ``host`` is not all-numeric (a name); raises ValueError when it is
    numeric but not a valid address.
    """
    labels = host.removesuffix(".").split(".")
    if not all(_NUMERIC_LABEL.match(label) for label in labels):
        return None
    if len(labels) > 4:
        raise ValueError("more than four parts")
    values = []
    for label in labels:
        if label.lower().startswith("0x"):
            values.append(int(label[2:] or "0", 16))
        elif len(label) > 1 and label.startswith("0"):
            values.append(int(label, 8))
        else:
            values.append(int(label))
    *head, last = values
    if any(v > 255 for v in head) or last >= 256 ** (4 - len(head)):
        raise ValueError("a part is out of range")
    number = last
    for i, v in enumerate(head):
        number += v << (8 * (3 - i))
    return ipaddress.IPv4Address(number)


def _unwrap(ip: IPAddress) -> tuple[str | None, IPAddress | None]:
    """Name the IPv6 transition wrapper ``ip`` uses, if any, and the IPv4 address inside."""
    if not isinstance(ip, ipaddress.IPv6Address):
        return None, None
    if ip.ipv4_mapped is not None:
        return "IPv4-mapped", ip.ipv4_mapped
    if ip in _NAT64_WELL_KNOWN:
        return "NAT64", ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    if ip in _NAT64_LOCAL:
        return "local-use NAT64", None
    if ip.sixtofour is not None:
        return "6to4", ip.sixtofour
    if ip.teredo is not None:
        return "Teredo", ip.teredo[1]
    if ip in _IPV4_COMPATIBLE and int(ip) > 1:
        return "IPv4-compatible", ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None, None


def _non_public_reason(ip: IPAddress) -> str | None:
    """Why ``ip`` is not a public unicast address, or None if it is one."""
    checks = (
        (ip.is_unspecified, "unspecified"),
        (ip.is_loopback, "loopback"),
        (ip.is_link_local, "link-local"),
        (ip.is_multicast, "multicast"),
        (isinstance(ip, ipaddress.IPv4Address) and ip in _CGNAT, "carrier-grade NAT"),
        (ip.is_private, "private"),
        (ip.is_reserved, "reserved"),
        (isinstance(ip, ipaddress.IPv6Address) and ip.is_site_local, "site-local"),
        (not ip.is_global, "not globally routable"),
    )
    return next((reason for hit, reason in checks if hit), None)


@dataclass(frozen=True)
class AddressPolicy:
    """Which addresses a fetch may connect to: public unicast ones plus ``allowed`` networks."""

    allowed: tuple[IPNetwork, ...] = ()

    @classmethod
    def from_settings(cls, settings: FetchSettings) -> AddressPolicy:
        try:
            nets = tuple(ipaddress.ip_network(n, strict=False) for n in settings.allow_networks)
        except ValueError as e:
            raise ConfigError(f"fetch.allow_networks: {e}") from None
        return cls(nets)

    def _is_allowed(self, ip: IPAddress) -> bool:
        return any(ip.version == net.version and ip in net for net in self.allowed)

    def refusal(self, ip: IPAddress) -> str | None:
        """Why connecting to ``ip`` is refused, or None if it is permitted."""
        if self._is_allowed(ip):
            return None
        wrapper, inner = _unwrap(ip)
        if wrapper in ("IPv4-mapped", "NAT64") and inner is not None:
            if self._is_allowed(inner):
                return None
            reason = _non_public_reason(inner)
            return f"{wrapper} address of {inner}, {reason}" if reason else None
        if wrapper is not None:
            inside = f" of {inner}" if inner is not None else ""
            return f"{wrapper} address{inside}, tunnelled addresses are refused"
        return _non_public_reason(ip)
