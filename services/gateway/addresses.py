"""Which addresses a remote image fetch may connect to: public ones only, with IPv4 addresses carried
inside IPv6 forms unwrapped and held to the IPv4 rules (a NAT64 gateway, a 6to4 or Teredo relay, or the
kernel for mapped addresses would deliver the connection to the IPv4 address inside)."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv6Address, IPv6Network, ip_address

NAT64 = IPv6Network("64:ff9b::/96")  # RFC 6052 well-known prefix: the IPv4 address is the last 32 bits
LOCAL_NAT64 = IPv6Network("64:ff9b:1::/48")  # RFC 8215 local-use prefix: never globally reachable
TRANSLATED = IPv6Network("::ffff:0:0:0/96")  # RFC 2765 IPv4-translated (SIIT)
COMPATIBLE = IPv6Network("::/96")  # RFC 4291 IPv4-compatible (deprecated)
ISATAP_IID = 0x00005EFE  # RFC 5214 interface id ::0:5efe:a.b.c.d (the first octet's u/g bits may be set)
NOT_PUBLIC_V6 = (LOCAL_NAT64, IPv6Network("fec0::/10"))  # local-use NAT64; site-local (deprecated)


def embedded_ipv4(ip: IPv6Address) -> list[tuple[str, IPv4Address]]:
    """The IPv4 addresses `ip` carries, each with the form that carries it."""
    low = IPv4Address(int(ip) & 0xFFFFFFFF)
    found = []
    if ip.ipv4_mapped is not None:
        found.append(("IPv4-mapped", ip.ipv4_mapped))
    if ip in TRANSLATED:
        found.append(("IPv4-translated", low))
    if ip in NAT64 or ip in LOCAL_NAT64:
        found.append(("NAT64", low))
    if ip.sixtofour is not None:
        found.append(("6to4", ip.sixtofour))
    if ip.teredo is not None:
        server, client = ip.teredo
        found += [("Teredo client", client), ("Teredo server", server)]
    if ip in COMPATIBLE and int(ip) > 1:  # not :: or ::1
        found.append(("IPv4-compatible", low))
    if (int(ip) >> 32) & 0xFCFFFFFF == ISATAP_IID:
        found.append(("ISATAP", low))
    return found


def refusal(address: str) -> str | None:
    """Why a fetch may not connect to `address` ("64:ff9b::7f00:1, which embeds 127.0.0.1 (NAT64; not a
    public address)"), or None when it may."""
    ip = ip_address(address.split("%")[0])
    if isinstance(ip, IPv6Address):
        for form, inner in embedded_ipv4(ip):
            if not _public(inner):
                return f"{ip}, which embeds {inner} ({form}; not a public address)"
        if ip.ipv4_mapped is not None:
            return None  # an IPv4 socket address in IPv6 notation: its IPv4 address decides
    if not _public(ip):
        return f"{ip}, which is not a public address"
    return None


def _public(ip: IPv4Address | IPv6Address) -> bool:
    if isinstance(ip, IPv6Address) and any(ip in net for net in NOT_PUBLIC_V6):
        return False
    return ip.is_global and not ip.is_multicast
