"""Where a webhook may be sent (SSRF rules, issue 13).

Deployed, a url must be `https` and its host must resolve only to global unicast addresses: loopback,
private (10/8, 172.16/12, 192.168/16, fc00::/7), link-local (169.254/16 with the cloud metadata address
169.254.169.254, fe80::/10), shared (100.64/10), multicast, reserved, unspecified and the other special-purpose
ranges (192.0.0.0/24, 6to4 relay, benchmarking, documentation, Teredo, site-local) are refused. An IPv6 address
that wraps an IPv4 one (IPv4-mapped or -compatible ::a.b.c.d, NAT64 64:ff9b::/96, 6to4 2002::/16) is judged by
the IPv4 address it reaches, so ::ffff:10.0.0.1 or 64:ff9b::a9fe:a9fe is refused like 10.0.0.1.
The rule is checked twice: at registration (`check_url`, the host resolved once) and at every connection
(`GuardedResolver`, in the delivery worker's aiohttp connector, so a name that resolves elsewhere later, or
a DNS answer changed between check and use, is refused too; an IP literal in the url is checked by
`check_url` before every attempt, aiohttp does not resolve those).

The local stack sets TXROUTE_WEBHOOK_ALLOW_LOOPBACK (a setting, never set deployed: infra tests check it), so a
developer can receive on http://127.0.0.1: then `http` is accepted and loopback addresses too, nothing else.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from dataclasses import dataclass
from urllib.parse import urlsplit

from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import ThreadedResolver

from app import limits


class UrlRefused(ValueError):
    """The url may not receive webhooks; the message says why (safe to show the client)."""


# Special-purpose ranges (IANA's registries) refused even where `is_global` says otherwise, whatever the Python
# version's table: IETF protocol assignments (192.0.0.0/24, 2001::/23 with Teredo), the 6to4 relay anycast,
# benchmarking, shared address space, multicast and reserved, NAT64 local-use, documentation, the deprecated
# site-local fec0::/10, discard-only 100::/64.
_SPECIAL = tuple(ipaddress.ip_network(n) for n in (
    "0.0.0.0/8", "100.64.0.0/10", "192.0.0.0/24", "192.0.2.0/24", "192.88.99.0/24", "198.18.0.0/15",
    "198.51.100.0/24", "203.0.113.0/24", "224.0.0.0/4", "240.0.0.0/4",
    "64:ff9b:1::/48", "100::/64", "2001::/23", "2001:db8::/32", "fc00::/7", "fe80::/10", "fec0::/10", "ff00::/8",
))
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_IPV4_COMPATIBLE = ipaddress.ip_network("::/96")


def embedded_ipv4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address reaches through: IPv4-mapped ::ffff:a.b.c.d, IPv4-compatible ::a.b.c.d,
    the NAT64 well-known prefix 64:ff9b::/96, 6to4 2002::/16. None for any other address."""
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address in _NAT64 or (address in _IPV4_COMPATIBLE and int(address) > 1):  # not :: nor ::1
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return address.sixtofour


@dataclass(frozen=True, slots=True)
class UrlPolicy:
    allow_loopback: bool = False

    def address_allowed(self, text: str) -> bool:
        address: ipaddress.IPv4Address | ipaddress.IPv6Address = ipaddress.ip_address(text.split("%", 1)[0])
        if isinstance(address, ipaddress.IPv6Address):
            inner = embedded_ipv4(address)
            if inner is not None:  # judged by the IPv4 address it reaches
                address = inner
        if address.is_loopback:
            return self.allow_loopback
        if any(address in network for network in _SPECIAL if network.version == address.version):
            return False
        return address.is_global and not address.is_multicast


def _host(url: str, policy: UrlPolicy) -> tuple[str, int]:
    if len(url) > limits.WEBHOOK_URL_CHARS_MAX:
        raise UrlRefused(f"the url may hold at most {limits.WEBHOOK_URL_CHARS_MAX} characters")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise UrlRefused("the url is not a valid absolute url") from None
    schemes = ("https", "http") if policy.allow_loopback else ("https",)
    if parts.scheme not in schemes:
        raise UrlRefused("the url must use https")
    if not parts.hostname or parts.username is not None or parts.password is not None:
        raise UrlRefused("the url must name a host, without credentials")
    return parts.hostname, port or (443 if parts.scheme == "https" else 80)


def _literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    return True


async def check_url(url: str, policy: UrlPolicy, *, resolve: bool = True) -> None:
    """Refuse a url that breaks the rules; with `resolve`, every address its host resolves to is checked."""
    host, port = _host(url, policy)
    if _literal(host):
        if not policy.address_allowed(host):
            raise UrlRefused("the url's address is not a public address")
        return
    if not resolve:
        return
    try:
        async with asyncio.timeout(limits.WEBHOOK_DNS_TIMEOUT_S):
            infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, TimeoutError):
        raise UrlRefused("the url's host does not resolve") from None
    if not infos or not all(policy.address_allowed(str(info[4][0])) for info in infos):
        raise UrlRefused("the url's host resolves to an address that is not public")


class AddressRefused(OSError):
    """A name resolved, at connection, to an address the policy refuses (aiohttp sees an unresolvable name)."""


def refused_at_connection(exc: BaseException) -> bool:
    """Whether a failed connection was the resolver's refusal (aiohttp wraps it: os_error, or the cause)."""
    return any(isinstance(e, AddressRefused) for e in (exc, getattr(exc, "os_error", None), exc.__cause__))


class GuardedResolver(AbstractResolver):
    """aiohttp's resolver, refusing (OSError, as an unresolvable name) any answer with a forbidden address."""

    def __init__(self, policy: UrlPolicy) -> None:
        self._policy = policy
        self._inner = ThreadedResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        results = await self._inner.resolve(host, port, family)
        refused = [r["host"] for r in results if not self._policy.address_allowed(r["host"])]
        if refused:
            raise AddressRefused(f"{host} resolves to an address that is not public")
        return results

    async def close(self) -> None:
        await self._inner.close()
