"""The ``/image`` query string: parsed into a frozen ``TransformSpec``, keyed, signed.

Pure: no I/O, no Twisted. Every violation raises ``ProxyError`` with a reason a
user can act on.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import ipaddress
import re
from collections.abc import Iterable, Iterator
from urllib.parse import quote, unquote_to_bytes, urlsplit, urlunsplit

import attrs
import idna

from imgproxy.errors import ProxyError

FITS = ("contain", "cover", "fill")
OUTPUT_FORMATS = ("jpeg", "png", "webp", "gif", "avif")
REQUEST_FORMATS = (*OUTPUT_FORMATS, "auto")
# Spellings users of thumbor and darthsim's imgproxy type, read as the contract's names.
FORMAT_ALIASES = {"jpg": "jpeg"}
LOSSLESS_FORMATS = frozenset({"png", "gif"})
MAX_DIMENSION = 8192
DEFAULT_QUALITY = 80
DEFAULT_FIT = "contain"
MAX_URL_LENGTH = 8192
KNOWN_PARAMETERS = frozenset({"url", "w", "h", "fit", "format", "q", "sig"})

CONTENT_TYPES = {
    "jpeg": "image/jpeg",
    "png": "image/png",
    "webp": "image/webp",
    "gif": "image/gif",
    "avif": "image/avif",
}


def source_key_of(url: str) -> str:
    """The cache key of a source's original bytes; every variant shares its prefix."""
    return hashlib.sha256(url.encode("utf-8")).hexdigest()


@attrs.frozen
class TransformSpec:
    """One variant of one source image, with every default made explicit.

    ``output_format`` is ``None`` for "the source's own format"; ``auto`` is
    resolved against the request's ``Accept`` before a spec is made, so equal
    outputs always have equal specs and equal cache keys.
    """

    url: str
    width: int | None = None
    height: int | None = None
    fit: str = DEFAULT_FIT
    output_format: str | None = None
    quality: int = DEFAULT_QUALITY

    @property
    def source_key(self) -> str:
        return source_key_of(self.url)

    @property
    def variant_token(self) -> str:
        """A canonical text for the transform alone (not the URL)."""
        quality = "-" if self.output_format in LOSSLESS_FORMATS else str(self.quality)
        return (
            f"w={self.width or '-'};h={self.height or '-'};fit={self.fit};"
            f"fmt={self.output_format or 'source'};q={quality}"
        )

    @property
    def cache_key(self) -> str:
        """``<source key>/<variant digest>``: parameter order and defaults never split it."""
        digest = hashlib.sha256(self.variant_token.encode("ascii")).hexdigest()[:32]
        return f"{self.source_key}/{digest}"

    def to_json(self) -> dict[str, object]:
        """The internal API's body for ``POST /v1/cache``."""
        return {
            "url": self.url,
            "w": self.width,
            "h": self.height,
            "fit": self.fit,
            "format": self.output_format,
            "q": self.quality,
        }

    def to_query(self) -> list[tuple[str, str]]:
        """The internal API's query for ``GET /v1/image``, defaults omitted."""
        pairs = [("url", self.url)]
        if self.width is not None:
            pairs.append(("w", str(self.width)))
        if self.height is not None:
            pairs.append(("h", str(self.height)))
        if self.fit != DEFAULT_FIT:
            pairs.append(("fit", self.fit))
        if self.output_format is not None:
            pairs.append(("format", self.output_format))
        if self.quality != DEFAULT_QUALITY:
            pairs.append(("q", str(self.quality)))
        return pairs


@attrs.frozen
class ImageRequest:
    """A parsed public ``GET /image``: the spec, and whether it varies on ``Accept``."""

    spec: TransformSpec
    varies_on_accept: bool


def split_query(raw_query: bytes) -> list[tuple[bytes, bytes]]:
    """Split a raw query into (raw name, raw value) pairs, in the order sent."""
    pairs = []
    for part in raw_query.split(b"&"):
        if not part:
            continue
        name, _, value = part.partition(b"=")
        pairs.append((name, value))
    return pairs


def _decode(raw: bytes, what: str) -> str:
    try:
        return unquote_to_bytes(raw.replace(b"+", b" ")).decode("utf-8")
    except UnicodeDecodeError:
        raise ProxyError(400, f"{what} is not valid UTF-8") from None


def decode_query(
    raw_query: bytes, known: frozenset[str] = KNOWN_PARAMETERS
) -> dict[str, str]:
    """Decode a raw query into a dict, refusing repeats and names not in ``known``."""
    values: dict[str, str] = {}
    for raw_name, raw_value in split_query(raw_query):
        name = _decode(raw_name, "a parameter name")
        if name not in known:
            # repr() escapes what is not printable; the name is cut to keep errors short.
            shown = repr(name[:40]) + ("..." if len(name) > 40 else "")
            raise ProxyError(400, f"unknown parameter {shown}")
        if name in values:
            raise ProxyError(400, f"parameter {name!r} is given more than once")
        values[name] = _decode(raw_value, f"parameter {name!r}")
    return values


_SPACE_OR_CONTROL = re.compile("[\x00-\x20\x7f]")
#: URLs whose check is remembered (at most MAX_URL_LENGTH characters each, twice).
CHECKED_URLS = 1024


# Pure, and run on every request, cache hits included, where canonicalising a URL
# cost ~3.5 us of ~8.5: the URLs asked for again are answered from memory.
@functools.lru_cache(maxsize=CHECKED_URLS)
def check_source_url(url: str) -> str:
    """Accept only an absolute http(s) URL with a host; return its canonical spelling."""
    if not url:
        raise ProxyError(400, "parameter 'url' is empty")
    if len(url) > MAX_URL_LENGTH:
        raise ProxyError(400, f"parameter 'url' is longer than {MAX_URL_LENGTH} characters")
    if _SPACE_OR_CONTROL.search(url):
        raise ProxyError(400, "parameter 'url' contains spaces or control characters")
    if not url.isascii():
        try:
            url.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate, e.g. from a JSON "\ud800"
            raise ProxyError(400, "parameter 'url' is not valid Unicode text") from None
    try:
        parts = urlsplit(url)
    except ValueError as e:
        raise ProxyError(400, f"parameter 'url' is malformed: {e}") from None
    if parts.scheme.lower() not in ("http", "https"):
        raise ProxyError(400, "parameter 'url' must be an absolute http or https URL")
    if "\\" in parts.netloc:
        # Browsers read a backslash as "/" (the host of "http://a\@b/" is a), Python's
        # parser as text (host b): a URL the two read differently is refused.
        raise ProxyError(400, "parameter 'url' has a backslash before its path")
    try:
        port = parts.port
    except ValueError as e:
        raise ProxyError(400, f"parameter 'url' is malformed: {e}") from None
    if not parts.hostname:
        raise ProxyError(400, "parameter 'url' has no host")
    if port == 0:
        raise ProxyError(400, "parameter 'url' has port 0")
    return canonical_source_url(url)


_DEFAULT_PORTS = {"http": 80, "https": 443}
# What a path or query keeps as it is: RFC 3986's reserved and unreserved
# characters, and "%" (an escape already made is not made again).
PATH_SAFE = "/%:@!$&'()*+,;=-._~"
QUERY_SAFE = PATH_SAFE + "?"
_ESCAPE = re.compile(r"%[0-9a-fA-F]{2}")


def canonical_source_url(url: str) -> str:
    """The one spelling of a source URL that its cache key, and every purge, is made of.

    Spellings that reach the same resource from the origin are one source
    (RFC 3986 6.2.2 and 6.2.3): scheme and host in lower case, an international
    host in IDNA, no default port, no user info or fragment (neither is sent),
    no empty query, no dot segments, a path of at least "/", and every character
    that is not ASCII as an upper-case percent-escape; an escape of an unreserved
    character ("%61", "%2E") is that character.
    ``url`` must have passed ``check_source_url``'s checks.
    """
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    host = parts.hostname or ""
    if ":" in host:
        try:
            host = f"[{ipaddress.ip_address(host).compressed}]"
        except ValueError:
            # A zone index ("[fe80::1%25eth0]"): kept as written, escape included.
            bracketed = parts.netloc.rpartition("@")[2]
            host = bracketed[: bracketed.find("]") + 1].lower()
    elif not host.isascii():
        try:
            host = idna_host(host)
        except (UnicodeError, idna.IDNAError):
            pass  # the fetch refuses it with its own error
    port = parts.port
    netloc = host if port is None or port == _DEFAULT_PORTS[scheme] else f"{host}:{port}"
    path = quote(_remove_dot_segments(_normal_escapes(parts.path)) or "/", safe=PATH_SAFE)
    query = quote(_normal_escapes(parts.query), safe=QUERY_SAFE)
    return urlunsplit((scheme, netloc, path, query, ""))


_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")


def idna_host(host: str) -> str:
    """An international host name in ASCII: IDNA 2008 with UTS 46 mapping, as browsers
    and curl do (Python's "idna" codec, IDNA 2003, turns "faß.de" into "fass.de",
    another domain). Raises ``UnicodeError`` or ``idna.IDNAError``."""
    return idna.encode(host, uts46=True).decode("ascii")


def _normal_escapes(text: str) -> str:
    """Escapes of unreserved characters decoded ("%61" is "a", "%2E" is "."), the rest
    in upper case (RFC 3986 6.2.2.1 and 6.2.2.2)."""
    if "%" not in text:
        return text

    def normal(match: re.Match[str]) -> str:
        char = chr(int(match.group(0)[1:], 16))
        return char if char in _UNRESERVED else match.group(0).upper()

    return _ESCAPE.sub(normal, text)


def _remove_dot_segments(path: str) -> str:
    """RFC 3986 5.2.4 on an absolute path: "/a/./b/../c" is "/a/c"."""
    if "." not in path:
        return path
    segments = path.split("/")
    last = len(segments) - 1
    kept: list[str] = []
    for index, segment in enumerate(segments):
        if segment in (".", ".."):
            if segment == ".." and len(kept) > 1:
                kept.pop()
            if index == last:
                kept.append("")  # "/a/b/.." is the directory "/a/"
            continue
        kept.append(segment)
    return "/".join(kept)


def _parse_int(values: dict[str, str], name: str, low: int, high: int) -> int | None:
    text = values.get(name)
    if text is None:
        return None
    if not (text.isascii() and text.isdigit()) or len(text) > 6:
        raise ProxyError(400, f"parameter {name!r} must be an integer from {low} to {high}")
    number = int(text)
    if not low <= number <= high:
        raise ProxyError(400, f"parameter {name!r} must be from {low} to {high}, not {number}")
    return number


def _parse_choice(
    values: dict[str, str],
    name: str,
    choices: Iterable[str],
    aliases: dict[str, str] | None = None,
) -> str | None:
    """One of ``choices``, in any letter case or by an alias; ``None`` when absent."""
    text = values.get(name)
    if text is None:
        return None
    chosen = text.lower()
    if aliases:
        chosen = aliases.get(chosen, chosen)
    if chosen not in choices:
        raise ProxyError(400, f"parameter {name!r} must be one of {', '.join(choices)}")
    return chosen


def negotiate_format(accept: str | bytes | None) -> str | None:
    """``format=auto``: avif, then webp, then ``None`` (the source's format)."""
    if not accept:
        return None
    if isinstance(accept, bytes):
        accept = accept.decode("latin-1")
    offered = set()
    for item in accept.split(","):
        media, _, rest = item.strip().partition(";")
        q = 1.0
        for param in rest.split(";"):
            key, _, value = param.strip().partition("=")
            if key == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        if q > 0:
            offered.add(media.strip().lower())
    for fmt in ("avif", "webp"):
        if f"image/{fmt}" in offered:
            return fmt
    return None


def spec_from_values(values: dict[str, str | int | None]) -> TransformSpec:
    """Validate already-decoded fields (the internal API's JSON) into a spec."""
    text_values = {k: str(v) for k, v in values.items() if v is not None}
    url = check_source_url(text_values.get("url", ""))
    fmt = _parse_choice(text_values, "format", OUTPUT_FORMATS, FORMAT_ALIASES)
    return TransformSpec(
        url=url,
        width=_parse_int(text_values, "w", 1, MAX_DIMENSION),
        height=_parse_int(text_values, "h", 1, MAX_DIMENSION),
        fit=_parse_choice(text_values, "fit", FITS) or DEFAULT_FIT,
        output_format=fmt,
        quality=_parse_int(text_values, "q", 1, 100) or DEFAULT_QUALITY,
    )


def signed_payload(raw_query: bytes) -> bytes:
    """The query string without ``sig``, parameters in the order sent."""
    return b"&".join(
        part for part in raw_query.split(b"&") if part and part.partition(b"=")[0] != b"sig"
    )


def sign_query(raw_query: bytes, key: bytes) -> str:
    """The ``sig`` a client appends: hex HMAC-SHA256 of the query without ``sig``."""
    return hmac.new(key, signed_payload(raw_query), hashlib.sha256).hexdigest()


def check_signature(raw_query: bytes, key: bytes | None) -> None:
    """Raise 403 unless ``sig`` is valid; a no-op when no signing key is set.

    Read from the raw query, before anything else in it is decoded or checked:
    an unauthenticated caller learns nothing from which of its parameters are
    wrong, and gets a 403 whatever else it sent.
    """
    if key is None:
        return
    signatures = [value for name, value in split_query(raw_query) if name == b"sig"]
    if not signatures or not signatures[0]:
        raise ProxyError(403, "a signature ('sig') is required")
    if len(signatures) > 1:
        raise ProxyError(403, "the signature ('sig') is given more than once")
    given = unquote_to_bytes(signatures[0]).decode("ascii", "replace").lower().encode(
        "ascii", "replace"
    )
    for payload in _payloads_as_sent(raw_query):
        expected = hmac.new(key, payload, hashlib.sha256).hexdigest().encode()
        if hmac.compare_digest(given, expected):
            return
    raise ProxyError(403, "the signature ('sig') is not valid")


def _payloads_as_sent(raw_query: bytes) -> Iterator[bytes]:
    """The spellings of "the query without ``sig``" a client may have signed.

    First the canonical one (``signed_payload``: empty parts dropped); then, for a
    query with empty parts or a ``&`` before ``sig``, the query as sent with only
    the ``sig`` part taken out, and with only its ``sig=...`` text taken out (a
    client that signed ``a=1&`` and then appended ``sig=...``). Each names the same
    parameters in the same order: none lets a signature cover anything else.
    """
    canonical = signed_payload(raw_query)
    yield canonical
    parts = raw_query.split(b"&")
    without_part = b"&".join(part for part in parts if part.partition(b"=")[0] != b"sig")
    without_text = b"&".join(b"" if part.partition(b"=")[0] == b"sig" else part for part in parts)
    if without_part != canonical:
        yield without_part
    if without_text not in (canonical, without_part):
        yield without_text


def parse_image_query(
    raw_query: bytes, accept: str | bytes | None, signing_key: bytes | None
) -> ImageRequest:
    """Parse the public ``GET /image`` query into an ``ImageRequest``."""
    check_signature(raw_query, signing_key)
    values = decode_query(raw_query)
    if "url" not in values:
        raise ProxyError(400, "parameter 'url' is required")
    spec_fields: dict[str, str | int | None] = {k: v for k, v in values.items() if k != "sig"}
    requested_format = _parse_choice(values, "format", REQUEST_FORMATS, FORMAT_ALIASES)
    varies = requested_format == "auto"
    if varies:
        spec_fields["format"] = negotiate_format(accept)
    spec = spec_from_values(spec_fields)
    return ImageRequest(spec=spec, varies_on_accept=varies)


def parse_purge_query(raw_query: bytes, signing_key: bytes | None) -> str:
    """Parse ``DELETE /image?url=...&sig=...``: the source URL, or 403/400."""
    if signing_key is None:
        raise ProxyError(403, "purging requires a signing key to be configured")
    check_signature(raw_query, signing_key)
    values = decode_query(raw_query)
    extra = set(values) - {"url", "sig"}
    if extra:
        raise ProxyError(400, f"purge takes only 'url' and 'sig', not {sorted(extra)[0]!r}")
    if "url" not in values:
        raise ProxyError(400, "parameter 'url' is required")
    return check_source_url(values["url"])
