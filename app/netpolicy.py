"""Which addresses outgoing webhooks may reach: public ones only, unless a deployment allows
private ones (``CORELOOP_WEBHOOK_ALLOW_PRIVATE=1``).

A webhook URL is checked twice: when it is subscribed (:func:`check_webhook_url`: the host as
written, without a DNS lookup) and when the worker connects (:func:`check_resolved`, on every
address the name resolves to, and :class:`GuardedBackend`, which connects only to an address
it has checked, so a name that changes its answer between the two cannot slip through).

Refused: loopback, private (10/8, 172.16/12, 192.168/16, fc00::/7), link-local (169.254/16,
with the cloud metadata service 169.254.169.254; fe80::/10), shared (100.64/10), multicast,
reserved and unspecified addresses, in any spelling (``2130706433``, ``0x7f.1``, ``127.1``,
``::ffff:127.0.0.1``), and the names ``localhost``, ``*.localhost``, ``*.internal``
(``metadata.google.internal``) and ``metadata``.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable
from typing import Any
from urllib.parse import SplitResult, urlsplit

import httpcore

from app.errors import InvalidInput

ALLOW_ENV = "CORELOOP_WEBHOOK_ALLOW_PRIVATE"
_BLOCKED_NAMES = frozenset({"localhost", "metadata", "metadata.google.internal"})
_BLOCKED_SUFFIXES = (".localhost", ".internal")

IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class AddressRefused(InvalidInput):
    code = "WebhookAddressRefused"


def _refused(host: str, why: str) -> AddressRefused:
    return AddressRefused(
        f"Webhook host {host!r} {why}; webhooks go to public addresses only (set "
        f"{ALLOW_ENV}=1 to allow private ones on a trusted network)."
    )


def parse_ip(host: str) -> IpAddress | None:
    """``host`` as an IP address in any spelling a resolver accepts (``127.1``, ``2130706433``,
    ``0x7f000001``, ``[::1]``), or None for a name."""
    host = host.strip().strip("[]")
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        pass
    if host and all(c in "0123456789abcdefxABCDEFX." for c in host) and host[0].isdigit():
        try:  # the forms inet_aton (and so getaddrinfo) reads as IPv4: decimal, hex, octal
            return ipaddress.IPv4Address(socket.inet_aton(host))
        except OSError:
            return None
    return None


def why_not_public(address: IpAddress) -> str | None:
    """Why ``address`` is no public address (None when it is one)."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    checks = (
        ("is_loopback", "loopback"),
        ("is_link_local", "link-local (cloud metadata)"),
        ("is_private", "private"),
        ("is_multicast", "multicast"),
        ("is_unspecified", "unspecified"),
        ("is_reserved", "reserved"),
    )
    for attribute, name in checks:
        if getattr(address, attribute):
            return f"is a {name} address ({address})"
    if not address.is_global:
        return f"is not a public address ({address})"
    return None


def _split(url: str) -> SplitResult:
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 (raises for a bad port)
    except ValueError as exc:
        raise InvalidInput(f"Webhook URL {url!r} cannot be read: {exc}.") from exc
    return parts


def check_host(host: str, allow_private: bool) -> None:
    """Refuse a host that names a non-public address, or a local name, as written."""
    if allow_private:
        return
    name = host.strip().strip("[]").rstrip(".").lower()
    if not name:
        raise _refused(host, "is empty")
    address = parse_ip(name)
    if address is not None:
        why = why_not_public(address)
        if why is not None:
            raise _refused(host, why)
        return
    if name in _BLOCKED_NAMES or name.endswith(_BLOCKED_SUFFIXES):
        raise _refused(host, "is a local or metadata name")


def check_webhook_url(url: str, allow_private: bool) -> None:
    """The subscription-time check: the URL's host as written (no DNS lookup)."""
    check_host(_split(url).hostname or "", allow_private)


def check_resolved(addresses: Iterable[str], host: str) -> None:
    """Refuse when any address ``host`` resolved to is not public."""
    for text in addresses:
        address = parse_ip(text.split("%", 1)[0])
        why = "cannot be read" if address is None else why_not_public(address)
        if why is not None:
            raise _refused(host, f"resolves to an address that {why}")


def resolve(host: str, port: int) -> list[str]:
    """Every address ``host`` resolves to (``OSError`` when it does not resolve)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def check_destination(url: str, allow_private: bool) -> None:
    """The delivery-time check: the host as written, then every address it resolves to."""
    if allow_private:
        return
    parts = _split(url)
    host = parts.hostname or ""
    check_host(host, allow_private)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    check_resolved(resolve(host, port), host)


class GuardedBackend(httpcore.SyncBackend):
    """httpcore's network backend that connects only to public addresses: it resolves the
    host itself, checks every address, and connects to a checked one (no second lookup)."""

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Any = None,
    ) -> httpcore.NetworkStream:
        check_host(host, allow_private=False)
        try:
            addresses = resolve(host, port)
        except OSError as exc:
            raise httpcore.ConnectError(f"{host!r} does not resolve: {exc}") from exc
        try:
            check_resolved(addresses, host)
        except AddressRefused as exc:
            raise httpcore.ConnectError(exc.detail) from exc
        return super().connect_tcp(
            addresses[0], port, timeout, local_address=local_address, socket_options=socket_options
        )


def redact_url(url: str) -> str:
    """``url`` with the password of its userinfo (``user:pass@``) replaced by ``***``."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    userinfo, _, hostport = parts.netloc.rpartition("@")
    user, has_password, _ = userinfo.partition(":")
    netloc = f"{user}:***@{hostport}" if has_password else f"***@{hostport}"
    return parts._replace(netloc=netloc).geturl()
