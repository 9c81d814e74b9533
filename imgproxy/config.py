"""Options and environment into one frozen ``Config``; parsers for sizes, durations, CIDRs.

Pure: ``tap.Options`` collects strings, this module turns them into values or
raises ``ConfigError`` with a message fit for a usage error.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import os
import re
import socket

import attrs

ROLES = ("standalone", "gateway", "worker")
MEMBERSHIP_PROFILES = ("lan", "local")


class ConfigError(ValueError):
    """An option value that cannot be used; its message is shown to the user."""


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?\s*$", re.IGNORECASE)
_SIZE_FACTORS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$", re.IGNORECASE)
_DURATION_FACTORS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "": 1}


def parse_size(text: str, name: str = "size") -> int:
    """``512``, ``64K``, ``32M``, ``1G`` (binary multiples) into bytes."""
    match = _SIZE.match(str(text))
    if not match:
        raise ConfigError(f"{name}: {text!r} is not a size like 512K, 32M or 1G")
    number, unit = match.groups()
    value = int(float(number) * _SIZE_FACTORS[unit.lower()])
    if value <= 0:
        raise ConfigError(f"{name}: must be more than zero")
    return value


def parse_duration(text: str, name: str = "duration") -> float:
    """``30s``, ``10m``, ``2h``, ``7d``, ``250ms`` or bare seconds into seconds."""
    match = _DURATION.match(str(text))
    if not match:
        raise ConfigError(f"{name}: {text!r} is not a duration like 10s, 5m, 2h or 7d")
    number, unit = match.groups()
    value = float(number) * _DURATION_FACTORS[(unit or "").lower()]
    if value <= 0:
        raise ConfigError(f"{name}: must be more than zero")
    return value


def parse_positive_int(text: str, name: str) -> int:
    try:
        value = int(str(text).strip())
    except ValueError:
        raise ConfigError(f"{name}: {text!r} is not a whole number") from None
    if value <= 0:
        raise ConfigError(f"{name}: must be more than zero")
    return value


def parse_networks(text: str | None) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    """Comma-separated CIDRs (``127.0.0.5/32,fd00::/8``)."""
    if not text:
        return ()
    networks = []
    for part in str(text).split(","):
        part = part.strip()
        if not part:
            continue
        try:
            networks.append(ipaddress.ip_network(part, strict=False))
        except ValueError:
            raise ConfigError(f"--allow-networks: {part!r} is not a CIDR network") from None
    return tuple(networks)


def parse_secret(text: str | None, name: str) -> bytes | None:
    """Base64 of a 16, 24 or 32 byte AES key (memberlist's ``SecretKey``)."""
    if not text:
        return None
    try:
        key = base64.b64decode(str(text).strip(), validate=True)
    except (binascii.Error, ValueError):
        raise ConfigError(f"{name}: not valid base64") from None
    if len(key) not in (16, 24, 32):
        raise ConfigError(f"{name}: must decode to 16, 24 or 32 bytes, not {len(key)}")
    return key


def parse_seeds(text: str | None, default_port: int) -> tuple[tuple[str, int], ...]:
    """``host[:port]`` seeds, comma-separated; ``[v6]:port`` for IPv6 literals."""
    if not text:
        return ()
    seeds = []
    for part in str(text).split(","):
        part = part.strip()
        if not part:
            continue
        host, port = part, default_port
        if part.startswith("["):
            host, _, rest = part[1:].partition("]")
            if rest.startswith(":"):
                port = _parse_port(rest[1:], part)
        elif part.count(":") == 1:
            host, _, port_text = part.partition(":")
            port = _parse_port(port_text, part)
        if not host:
            raise ConfigError(f"--join: {part!r} has no host")
        seeds.append((host, port))
    return tuple(seeds)


def _parse_port(text: str, whole: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise ConfigError(f"{whole!r}: port must be from 1 to 65535")
    return int(text)


def http_endpoint(text: str) -> str:
    """A bare port (the seed's ``HTTP_PORT``) becomes ``tcp:PORT``."""
    text = str(text).strip()
    if text.isdigit():
        return f"tcp:{text}"
    return text


def http_port_of(endpoint: str) -> int:
    """The port number inside a ``tcp:PORT[:...]`` strports description (0 if none)."""
    for part in endpoint.split(":")[1:]:
        if part.isdigit():
            return int(part)
        if part.startswith("port=") and part[5:].isdigit():
            return int(part[5:])
    return 0


def parse_address(text: str, name: str, *, unspecified: bool) -> str:
    """An IP address given as such or as a host name (its first address).

    ``unspecified`` says whether 0.0.0.0 and :: (every interface) are allowed:
    they are for a listener, not for an address other members dial.
    """
    value = text.strip()
    try:
        address = ipaddress.ip_address(value)
    except ValueError:
        try:
            infos = socket.getaddrinfo(value, None, type=socket.SOCK_DGRAM)
        except (OSError, UnicodeError):
            raise ConfigError(
                f"{name}: {text!r} is neither an IP address nor a host name that resolves"
            ) from None
        address = ipaddress.ip_address(infos[0][4][0])
    if address.is_unspecified and not unspecified:
        raise ConfigError(f"{name}: {text!r} is no address other members can reach")
    return str(address)


def default_advertise_address(bind: str) -> str:
    """The first non-loopback address of this host, else the bind address."""
    if bind not in ("0.0.0.0", "::", ""):
        return bind
    try:
        infos = socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET)
    except OSError:
        infos = []
    for info in infos:
        address = info[4][0]
        if not ipaddress.ip_address(address).is_loopback:
            return address
    # A UDP "connect" picks the outgoing interface without sending a packet.
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        probe.connect(("192.0.2.1", 9))
        address = probe.getsockname()[0]
        if not ipaddress.ip_address(address).is_loopback:
            return address
    except OSError:
        pass
    finally:
        probe.close()
    return "127.0.0.1" if bind in ("0.0.0.0", "") else "::1"


@attrs.frozen
class Config:
    """Every setting of one node, validated."""

    role: str = "standalone"
    http: str = "tcp:8080"
    bind: str = "0.0.0.0"
    advertise: str | None = None
    gossip_port: int = 7946
    gossip_port_given: bool = False
    node_name: str = attrs.field(factory=socket.gethostname)
    join: tuple[tuple[str, int], ...] = ()
    cluster_secret: bytes | None = None
    cache_dir: str = "./imgproxy-cache"
    cache_max_bytes: int = 1 << 30
    cache_ttl: float = 7 * 86400.0
    signing_key: bytes | None = None
    #: Signs DELETE /image instead of the signing key when set (see ImageResource).
    purge_key: bytes | None = None
    allow_private_sources: bool = False
    allow_networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    max_source_bytes: int = 32 << 20
    max_source_pixels: int = 50_000_000
    fetch_timeout: float = 10.0
    fetch_concurrency: int = 16
    fetch_queue: int = 256
    transform_threads: int = attrs.field(factory=lambda: os.cpu_count() or 2)
    transform_queue: int = 64
    max_frames: int = 500
    membership_profile: str = "lan"
    load_epsilon: float = 0.25

    @property
    def http_port(self) -> int:
        return http_port_of(self.http)

    @property
    def runs_membership(self) -> bool:
        """Gateways and workers always gossip; standalone only when asked to."""
        return self.role != "standalone" or bool(self.join) or self.gossip_port_given


def configuration_warnings(config: Config) -> list[str]:
    """What an operator should hear at start-up about a risky but valid configuration."""
    warnings = []
    if config.runs_membership and config.cluster_secret is None:
        warnings.append(
            "no --cluster-secret: gossip is not encrypted, and anyone who can reach a "
            "worker's HTTP port may use its internal API (fetch, render and purge images, "
            "whatever --signing-key says)"
        )
    return warnings
