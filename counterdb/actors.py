"""
The actors list: parsing its entries and finding this node's own entry.

Pure functions; name resolution and the "is this address mine?" test are
passed in, so the rules can be tested without a network.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Callable, Iterable
from typing import Any

import attrs

WILDCARDS = frozenset({"", "0.0.0.0", "::"})
#: Most hosts in one actors list: each is polled every interval by every
#: other, so the sync traffic grows with the square of the list.
MAX_ACTORS = 64

_PORT = re.compile(r"[0-9]{1,5}")  # ASCII only: str.isdigit() also takes "²" and "٨"
# What the C library reads as an IPv4 address: 1 to 4 numbers, decimal,
# octal (leading 0) or hex (0x), joined by dots ("2130706434", "127.1").
_NUMERIC_IPV4 = re.compile(r"(?:0[xX][0-9a-fA-F]*|[0-9]+)(?:\.(?:0[xX][0-9a-fA-F]*|[0-9]+)){0,3}")
_HOSTNAME = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9_]([A-Za-z0-9_-]{0,62})(\.[A-Za-z0-9_][A-Za-z0-9_-]{0,62})*\.?$")


class ConfigError(ValueError):
    """The actors list is unusable; the message says why."""


class NotAMember(ConfigError):
    """This node is not in the actors list."""


@attrs.frozen
class Actor:
    """One entry of the actors list: ``HOST`` or ``HOST:PORT``."""

    host: str  # an IP literal (no brackets) or a DNS name
    port: int | None  # None: "the same port this node listens on"
    entry: str  # the text as the user wrote it

    def address(self, default_port: int) -> tuple[str, int]:
        return self.host, self.port if self.port is not None else default_port

    def base_url(self, default_port: int, scheme: str = "http") -> str:
        host, port = self.address(default_port)
        if ":" in host:
            host = f"[{host}]"
        return f"{scheme}://{host}:{port}"


def parse_actor(entry: Any) -> Actor:
    """Parse ``HOST``, ``HOST:PORT``, ``[IPv6]`` or ``[IPv6]:PORT``."""
    if not isinstance(entry, str):
        raise ConfigError(f"actor entries must be strings, got {entry!r}")
    text = entry.strip()
    host, port_text = _split_host_port(text)
    port = None
    if port_text is not None:
        if not _PORT.fullmatch(port_text) or not 1 <= int(port_text) <= 65535:
            raise ConfigError(f"actor {entry!r}: port must be a number from 1 to 65535")
        port = int(port_text)
    if not _is_ip(host) and not _HOSTNAME.match(host):
        raise ConfigError(f"actor {entry!r}: {host!r} is neither an IP address nor a DNS name")
    return Actor(host=_normalise_host(host), port=port, entry=entry)


def parse_actors(actors: Any, default_port: int) -> list[Actor]:
    """Validate a whole actors list; reject empty lists and duplicates."""
    if not isinstance(actors, list):
        raise ConfigError('"actors" must be a list of "HOST" or "HOST:PORT" strings')
    if not actors:
        raise ConfigError('"actors" must not be empty')
    if len(actors) > MAX_ACTORS:
        raise ConfigError(f'"actors" may list at most {MAX_ACTORS} hosts, got {len(actors)}')
    parsed = [parse_actor(entry) for entry in actors]
    seen: dict[tuple[str, int], str] = {}
    for actor in parsed:
        address = actor.address(default_port)
        if address in seen:
            raise ConfigError(f"duplicate actor: {actor.entry!r} and {seen[address]!r} are the same host and port")
        seen[address] = actor.entry
    return parsed


def identify_self(
    actors: list[Actor],
    listen_port: int,
    interface: str | None,
    advertise: Actor | None,
    resolve: Callable[[str], set[str]],
    is_local: Callable[[str], bool],
) -> int:
    """Return the index of this node's own entry in ``actors``.

    In order: the ``--advertise`` entry if given; else, when bound to one
    interface, the entry naming that address and the listen port; else the
    entry naming the listen port and an address of this machine.
    """
    if advertise is not None:
        wanted = advertise.address(listen_port)
        matches = [i for i, a in enumerate(actors) if a.address(listen_port) == wanted]
        return _exactly_one(matches, actors, f"the --advertise address {advertise.entry!r}")
    on_port = [i for i, a in enumerate(actors) if a.address(listen_port)[1] == listen_port]
    if interface is not None and _normalise_host(interface) not in WILDCARDS:
        bound = _normalise_host(interface)
        matches = [i for i in on_port if bound in resolve(actors[i].host)]
        return _exactly_one(matches, actors, f"the bound address {bound}:{listen_port}")
    matches = [i for i in on_port if any(is_local(ip) for ip in resolve(actors[i].host))]
    return _exactly_one(matches, actors, f"this machine's addresses on port {listen_port}")


def resolve_host(host: str) -> set[str]:
    """Every IP address ``host`` stands for (blocking: call from a thread)."""
    if _is_ip(host):
        return {host}
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except OSError:
        return set()
    return {_normalise_host(str(info[4][0])) for info in infos}


def is_local_address(ip: str) -> bool:
    """True if this machine owns ``ip``: binding to it succeeds only then."""
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        try:
            probe.bind((ip, 0))
        except OSError:
            return False
    return True


def _exactly_one(matches: list[int], actors: Iterable[Actor], compared: str) -> int:
    if len(matches) == 1:
        return matches[0]
    entries = [a.entry for a in actors]
    if not matches:
        raise NotAMember(f"this node is not in the actors list: compared {entries} with {compared}")
    found = [entries[i] for i in matches]
    raise ConfigError(
        f"several actors match this node ({found}, compared with {compared}); "
        "start it with --advertise or --interface to say which one it is"
    )


def _split_host_port(text: str) -> tuple[str, str | None]:
    if text.startswith("["):
        close = text.find("]")
        if close < 0:
            raise ConfigError(f"actor {text!r}: missing ']' after an IPv6 address")
        host, rest = text[1:close], text[close + 1 :]
        if not _is_ip(host) or ":" not in host:
            raise ConfigError(f"actor {text!r}: {host!r} in brackets must be an IPv6 address")
        if rest and not rest.startswith(":"):
            raise ConfigError(f"actor {text!r}: expected ':PORT' after ']'")
        return host, rest[1:] if rest else None
    if _is_ip(text):  # a bare IPv6 address contains colons but has no port
        return text, None
    host, sep, port = text.rpartition(":")
    if not sep:
        return text, None
    if ":" in host:
        raise ConfigError(f"actor {text!r}: write IPv6 addresses with a port as [ADDRESS]:PORT")
    return host, port


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _normalise_host(host: str) -> str:
    """The canonical form of ``host``: an IP address as the resolver reads
    it (``2130706434`` and ``127.000.000.002`` are 127.0.0.2 to connect(),
    so they must be to duplicate detection too), a name in lower case."""
    if _is_ip(host):
        return str(ipaddress.ip_address(host))
    if _NUMERIC_IPV4.fullmatch(host):
        try:
            return socket.inet_ntoa(socket.inet_aton(host))
        except OSError:
            pass
    return host.lower().rstrip(".") or host
