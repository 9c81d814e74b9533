"""Fuzzing the real process over HTTP: 10,000 ``/image`` query strings, then hostile raw bytes.

The query fuzz sends every case on one kept-alive connection from a client
thread while the reactor serves the loopback origin the good URLs point at.
What must hold for every response: no 5xx but the contract's 502/503/504 for
origin trouble; every error the JSON body ``{"error": str, "status": int}``
with the response's status; every 200 a decodable image of the announced type.
The raw fuzz writes malformed requests on sockets: never a 500, never a traceback,
and the process keeps answering.
"""

from __future__ import annotations

import json
import os
import socket
import string
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import quote

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet.defer import Deferred
from twisted.trial.unittest import TestCase

from tests.hostile import (
    PERMISSIVE,
    PersistentClient,
    assert_json_error,
    live_reactor,
    report,
    shared_proxy,
)
from tests.hostile.origin import HTML, HostileOrigin, decode, exif_rotated_jpeg, noise_png
from tests.processes import Reply, in_thread

QUERY_CASES = int(os.environ.get("IMGPROXY_FUZZ_CASES", "10000"))
RAW_CASES = 300
ORIGIN_TROUBLE = frozenset({502, 503, 504})
CONTENT_TYPES = {"image/jpeg", "image/png", "image/webp", "image/gif", "image/avif"}

# Small alphabets: drawing from them is cheap, and they hold what breaks parsers
# (escapes, separators, NUL, non-ASCII digits and letters, surrogate-free non-BMP).
TEXT = st.text(alphabet="aZ09%&=+;/:?#@[] .-_~\x00\x7f\u00e9\u0663\uff11\U0001f600", max_size=10)
NUMBERS = st.one_of(
    st.integers(1, 64).map(str),
    st.integers(1, 64).map(str),
    st.sampled_from(
        ["0", "1", "8192", "8193", "-1", "+5", "01", "1.5", "1e3", "0x10", "99999999999",
         "\u0663", "\uff11", " 1", "1 ", "", "%31", "nan", "100", "101"]
    ),
    TEXT,
)
CHOICES = st.one_of(
    st.sampled_from(["contain", "cover", "fill", "jpeg", "png", "webp", "gif", "avif", "auto",
                     "CONTAIN", "jpg", "", "svg"]),
    TEXT,
)
ACCEPT = st.sampled_from(
    [None, "image/avif,image/webp,*/*", "image/webp", "*/*;q=0", "image/avif;q=abc", "\u00e9"]
)
BATCH = 25  # queries a Hypothesis example sends, over CONNECTIONS kept-alive connections
CONNECTIONS = 4


def _encoded(text: str, how: int) -> str:
    """Three ways to put ``text`` into a query: fully escaped, lightly escaped, broken escapes."""
    if how == 0:
        return quote(text, safe="")
    if how == 1:
        return quote(text, safe="/:?=&%+@[]!$'()*,;")
    return quote(text, safe="%") + "%" + "zZ"[len(text) % 2]


def query_strings(source_urls: list[str]) -> st.SearchStrategy[tuple[str, str | None]]:
    """``(target, Accept)`` pairs: mostly well-formed queries for the origin's URLs with
    fuzzed parameters, some with unknown or repeated names and broken escapes."""
    urls = st.one_of(
        st.sampled_from(source_urls),
        st.sampled_from(source_urls).map(lambda u: u.replace("http", "HTTP", 1)),
        TEXT.map(lambda t: "http://" + t),
        st.sampled_from(["", "ftp://127.0.0.1/a.png", "http://", "http://[::1", "//a/b",
                         "http://127.0.0.1:0/a.png", "http://127.0.0.1:99999/a.png",
                         "javascript:alert(1)", "file:///etc/passwd", "http://a b/"]),
        TEXT,
    )
    known = st.one_of(
        st.tuples(st.just("w"), NUMBERS),
        st.tuples(st.just("h"), NUMBERS),
        st.tuples(st.just("q"), NUMBERS),
        st.tuples(st.just("fit"), CHOICES),
        st.tuples(st.just("format"), CHOICES),
        st.tuples(st.just("sig"), TEXT),
    )
    # Repeated and unknown names, now and then.
    junk = st.lists(st.tuples(st.sampled_from(["url", "w", "W", "x", ""]) | TEXT, TEXT), max_size=1)

    def build(url: str | None, params: list[tuple[str, str]], more: list[tuple[str, str]],
              how: int, accept: str | None) -> tuple[str, str | None]:
        parts = [] if url is None else ["url=" + quote(url, safe="")]
        parts += [f"{_encoded(name, how % 2)}={_encoded(value, how)}" for name, value in params]
        parts += [f"{_encoded(name, how)}={_encoded(value, how)}" for name, value in more]
        return "/image?" + "&".join(parts), accept

    # Most queries name a real source, so that the origin, the transforms and the
    # cache are fuzzed too, not only the parameter checks.
    good_urls = st.sampled_from(source_urls)
    return st.builds(
        build,
        st.one_of(st.none(), urls, good_urls, good_urls, good_urls),
        st.lists(known, max_size=4, unique_by=lambda pair: pair[0]),
        junk,
        st.sampled_from([0, 0, 1, 2]),
        ACCEPT,
    )


class QueryFuzzTests(TestCase):
    """Hypothesis-made query strings for ``GET /image`` against the live process."""

    timeout = 600

    def setUp(self) -> Deferred[None]:
        self.reactor = live_reactor()
        self.proxy = shared_proxy(*PERMISSIVE)
        return HostileOrigin.start(self.reactor).addCallback(self._serve)

    def _serve(self, origin: HostileOrigin) -> None:
        self.addCleanup(origin.stop)
        origin.serve("/a.png", noise_png(32, 24, seed=4))
        origin.serve("/b.jpg", exif_rotated_jpeg(40, 20), "image/jpeg")
        origin.serve("/page.html", HTML, "text/html")
        origin.origin.status("/broken", 500)
        origin.redirect_to("/moved", origin.url("/a.png"))
        self.source_urls = [
            origin.url(path) for path in ("/a.png", "/b.jpg", "/page.html", "/broken",
                                          "/moved", "/missing.png")
        ]

    def test_no_query_gets_a_500_or_an_error_without_its_json_body(self) -> Deferred[None]:
        statuses: Counter[int] = Counter()
        local = threading.local()
        clients: list[PersistentClient] = []
        executor = ThreadPoolExecutor(CONNECTIONS, thread_name_prefix="fuzz-client")
        self.addCleanup(executor.shutdown)

        def close_clients() -> None:
            for client in clients:
                client.close()

        self.addCleanup(close_clients)

        def send(case: tuple[str, str | None]) -> tuple[str, Reply]:
            target, accept = case
            client = getattr(local, "client", None)
            if client is None:
                client = local.client = PersistentClient(self.proxy)
                clients.append(client)
            headers = {"Accept": accept.encode("utf-8").decode("latin-1")} if accept else None
            return target, client.get(target, headers)

        @settings(
            max_examples=QUERY_CASES // BATCH,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        @given(batch=st.lists(query_strings(self.source_urls), min_size=BATCH, max_size=BATCH))
        def check(batch: list[tuple[str, str | None]]) -> None:
            for target, reply in executor.map(send, batch):
                statuses[reply.status] += 1
                check_reply(target, reply)

        def check_reply(target: str, reply: Reply) -> None:
            context = f"GET {target} -> {reply.status} {reply.body[:200]!r}"
            if reply.status >= 500:
                assert reply.status in ORIGIN_TROUBLE, context
            if reply.status >= 400:
                try:
                    assert_json_error(reply)
                except (AssertionError, ValueError) as e:
                    raise AssertionError(f"{context}: {e}") from None
            elif reply.status == 200:
                assert reply.header("content-type") in CONTENT_TYPES, context
                decode(reply.body)
            else:
                raise AssertionError(f"unexpected status: {context}")

        def summarise(_: Any) -> None:
            report(f"fuzzed {sum(statuses.values())} queries: {dict(sorted(statuses.items()))}")
            self.assertGreaterEqual(sum(statuses.values()), QUERY_CASES)
            # The fuzz reached the origin and the transforms, not only the parameter checks.
            for status in (200, 400, 415):
                self.assertGreater(statuses[status], QUERY_CASES // 400, statuses)

        return in_thread(self.reactor, check).addCallback(summarise)


# --- raw HTTP ----------------------------------------------------------------------------


def raw_exchange(host: str, port: int, data: bytes, timeout: float = 5.0) -> bytes:
    """Send ``data`` on a new connection and read until the server closes (or ``timeout``)."""
    with socket.create_connection((host, port), timeout=timeout) as sock:
        try:
            sock.sendall(data)
        except OSError:
            pass  # the server may hang up mid-request (a too-large header): read what it said
        chunks = []
        try:
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                chunks.append(chunk)
        except (TimeoutError, ConnectionResetError):
            pass
        return b"".join(chunks)


def statuses_in(response: bytes) -> list[int]:
    """The status codes of every response in ``response`` (pipelined requests give several)."""
    codes = []
    for line in response.split(b"\r\n"):
        if line.startswith(b"HTTP/1.") and len(line) >= 12 and line[9:12].isdigit():
            codes.append(int(line[9:12]))
    return codes


def first_response(response: bytes) -> tuple[int, dict[bytes, bytes], bytes] | None:
    """Status, headers (lower-case names) and body of the first response, or None."""
    head, separator, rest = response.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    if not separator or not lines[0].startswith(b"HTTP/1.") or not lines[0][9:12].isdigit():
        return None
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers[name.strip().lower()] = value.strip()
    length = int(headers.get(b"content-length", b"0") or 0)
    return int(lines[0][9:12]), headers, rest[:length]


def assert_not_broken(request: bytes, response: bytes) -> None:
    """No 500 (or other unexplained 5xx), nothing that looks like a stack trace, and an
    error that has a body has the contract's JSON one."""
    context = f"{request[:120]!r} -> {response[:300]!r}"
    for code in statuses_in(response):
        assert code < 500 or code in ORIGIN_TROUBLE, context
    for marker in (b"Traceback", b'File "', b"twisted.", b"Exception"):
        assert marker not in response, context
    first = first_response(response)
    if first is not None and first[0] >= 400 and first[2]:
        status, headers, body = first
        assert headers.get(b"content-type") == b"application/json", context
        assert json.loads(body) == {"error": json.loads(body)["error"], "status": status}, context


class RawHttpTests(TestCase):
    """Malformed HTTP on raw sockets: answered or dropped, never a 500 or a traceback."""

    timeout = 120

    def setUp(self) -> None:
        self.reactor = live_reactor()
        self.proxy = shared_proxy(*PERMISSIVE)
        self.address = (self.proxy.interface, self.proxy.port)

    def exchange(self, data: bytes) -> Deferred[bytes]:
        return in_thread(self.reactor, raw_exchange, *self.address, data)

    async def assert_still_serving(self) -> None:
        reply = await self.proxy.request_async(self.reactor, "/health")
        self.assertEqual(reply.status, 200)
        self.assertTrue(self.proxy.running)

    async def test_hostile_requests_never_get_a_500_or_a_traceback(self) -> None:
        image = b"/image?url=http%3A%2F%2F127.0.0.1%3A1%2Fa.png&w=10"
        close = b"Connection: close\r\n"
        cases = {
            "huge header": b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (1 << 20)
            + b"\r\n\r\n",
            "many headers": b"GET /health HTTP/1.1\r\n" + b"".join(
                b"X-H%d: v\r\n" % i for i in range(20000)) + b"\r\n",
            "bad method": b"FROB /image HTTP/1.1\r\nHost: x\r\n" + close + b"\r\n",
            "lower-case method": b"get /health HTTP/1.1\r\nHost: x\r\n" + close + b"\r\n",
            "NUL in method": b"G\x00ET /health HTTP/1.1\r\nHost: x\r\n" + close + b"\r\n",
            "no version": b"GET /health\r\n\r\n",
            "bad version": b"GET /health HTTP/9.9\r\nHost: x\r\n" + close + b"\r\n",
            "garbage line": b"\xff\xfe\xfd\r\n\r\n",
            "only CRLFs": b"\r\n" * 100,
            "body on GET": b"GET " + image + b" HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
            + close + b"\r\nhello",
            "chunked body on GET": b"GET /health HTTP/1.1\r\nHost: x\r\n"
            b"Transfer-Encoding: chunked\r\n" + close + b"\r\n5\r\nhello\r\n0\r\n\r\n",
            "bad chunk size": b"POST /image HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
            + close + b"\r\nzz\r\nhello\r\n0\r\n\r\n",
            "length and chunked": b"GET /health HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n"
            b"Transfer-Encoding: chunked\r\n" + close + b"\r\n0\r\n\r\n",
            "negative length": b"GET /health HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n"
            + close + b"\r\n",
            "two lengths": b"GET /health HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n"
            b"Content-Length: 2\r\n" + close + b"\r\nab",
            "non-numeric length": b"GET /health HTTP/1.1\r\nContent-Length: lots\r\n" + close
            + b"\r\n",
            "absurd URI": b"GET /image?url=" + b"%41" * 200000 + b" HTTP/1.1\r\n" + close
            + b"\r\n",
            "asterisk": b"GET * HTTP/1.1\r\nHost: x\r\n" + close + b"\r\n",
            "absolute URI": b"GET http://169.254.169.254/image?url=x HTTP/1.1\r\n" + close
            + b"\r\n",
            "dot segments": b"GET /../../../etc/passwd HTTP/1.1\r\n" + close + b"\r\n",
            "double slash": b"GET //image?url=http://127.0.0.1/ HTTP/1.1\r\n" + close + b"\r\n",
            "non-UTF-8 query": b"GET /image?url=http://127.0.0.1/\xff\xfe&w=\xc3\x28 HTTP/1.1\r\n"
            + close + b"\r\n",
            "non-UTF-8 escapes": b"GET /image?url=%ff%fe&w=%c3%28 HTTP/1.1\r\n" + close + b"\r\n",
            "non-UTF-8 path": b"GET /\xff\xfe\x80 HTTP/1.1\r\n" + close + b"\r\n",
            "non-ASCII header": b"GET /health HTTP/1.1\r\nX-\xff: \xfe\r\nAccept: \xe9\r\n" + close
            + b"\r\n",
            "non-ASCII accept on image": b"GET " + image + b"&format=auto HTTP/1.1\r\n"
            b"Accept: image/\xff\xfe;q=\x80\r\n" + close + b"\r\n",
            "If-None-Match junk": b"GET " + image + b" HTTP/1.1\r\nIf-None-Match: \xff, W/,,\r\n"
            + close + b"\r\n",
            "NUL in path": b"GET /image\x00?url=x HTTP/1.1\r\n" + close + b"\r\n",
            "header without colon": b"GET /health HTTP/1.1\r\nNoColonHere\r\n" + close + b"\r\n",
            "folded header": b"GET /health HTTP/1.1\r\nX-A: a\r\n b\r\n" + close + b"\r\n",
            "pipelined": b"GET /health HTTP/1.1\r\n\r\nFROB / HTTP/1.1\r\n\r\n"
            b"GET /nope HTTP/1.1\r\n" + close + b"\r\n",
            "methods": b"".join(
                m + b" /image?url=x HTTP/1.1\r\n\r\n"
                for m in (b"PUT", b"POST", b"PATCH", b"OPTIONS", b"TRACE", b"CONNECT",
                          b"PROPFIND", b"DELETE", b"HEAD")
            ) + b"GET /health HTTP/1.1\r\n" + close + b"\r\n",
        }
        for name, data in cases.items():
            response = await self.exchange(data)
            try:
                assert_not_broken(data, response)
            except AssertionError as e:
                self.fail(f"{name}: {e}")
        await self.assert_still_serving()

    async def test_a_huge_request_body_is_not_a_500(self) -> None:
        body = b"\x00" * (16 << 20)
        head = b"POST /image?url=x HTTP/1.1\r\nContent-Length: %d\r\nConnection: close\r\n\r\n"
        response = await self.exchange(head % len(body) + body)
        assert_not_broken(head, response)
        # A length announced and never sent: the server waits or hangs up; no 500 either way.
        response = await in_thread(
            self.reactor, raw_exchange, *self.address,
            b"GET /health HTTP/1.1\r\nContent-Length: 10000000000\r\n\r\n" + b"x" * 1000, 1.0,
        )
        assert_not_broken(b"announced 10 GB", response)
        await self.assert_still_serving()

    async def test_random_request_heads_never_get_a_500(self) -> None:
        token = st.text(alphabet=string.printable + "\x00\x80\xff\u00e9", max_size=12)
        line = st.tuples(
            st.sampled_from(["GET", "HEAD", "DELETE", "POST", "get", "", "G ET"]) | token,
            st.sampled_from(["/image", "/health", "/metrics", "/", "/status.json", "*", ""])
            | token,
            token,
            st.sampled_from(["HTTP/1.1", "HTTP/1.0", "HTTP/2", "", "HTTP/1.1 extra"]) | token,
        )
        header = st.tuples(token, token)
        seen: list[int] = []

        @settings(max_examples=RAW_CASES, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(line=line, headers=st.lists(header, max_size=6))
        def check(line: tuple[str, str, str, str], headers: list[tuple[str, str]]) -> None:
            method, path, query, version = line
            head = f"{method} {path}?{query} {version}\r\n"
            head += "".join(f"{name}: {value}\r\n" for name, value in headers)
            data = head.encode("utf-8", "surrogateescape") + b"Connection: close\r\n\r\n"
            response = raw_exchange(*self.address, data, timeout=2.0)
            seen.extend(statuses_in(response))
            assert_not_broken(data, response)

        await in_thread(self.reactor, check)
        report(f"raw request heads: {RAW_CASES} cases, statuses {dict(Counter(seen))}")
        self.assertIn(400, seen)
        await self.assert_still_serving()
