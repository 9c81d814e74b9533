"""The public HTTP API's rows, against an in-memory backend through ``StubTreq``."""

from __future__ import annotations

import json
from urllib.parse import quote

from treq.testing import StubTreq
from twisted.internet.defer import Deferred, fail, inlineCallbacks, succeed
from twisted.trial.unittest import TestCase

from imgproxy.errors import ProxyError
from imgproxy.metrics import NodeMetrics
from imgproxy.params import TransformSpec, sign_query
from imgproxy.web.public import ImageResource
from imgproxy.web.site import JsonDocument, MetricsResource, NodeRoot
from imgproxy.worker.cache import CacheEntry
from tests.web.wire import exchange

SOURCE = "http://origin.example/cat.jpg"
BASE = "http://proxy.example/image?url=" + quote(SOURCE, safe="")


def entry_for(spec: TransformSpec, body: bytes = b"\xff\xd8jpeg-bytes") -> CacheEntry:
    return CacheEntry(
        key=spec.cache_key, body=body, content_type="image/jpeg", created=1.0,
        etag='"abc123"', source_url=spec.url,
    )


class MemoryBackend:
    """A backend whose cache and outcomes the test sets."""

    def __init__(self) -> None:
        self.cache: dict[str, CacheEntry] = {}
        self.served: list[TransformSpec] = []
        self.purged: list[str] = []
        self.outcome: Exception | None = None
        self.pending: Deferred | None = None

    def cached(self, spec: TransformSpec) -> CacheEntry | None:
        return self.cache.get(spec.cache_key)

    def serve(self, spec: TransformSpec):
        self.served.append(spec)
        if self.pending is not None:
            return self.pending
        if self.outcome is not None:
            return fail(self.outcome)
        entry = entry_for(spec)
        self.cache[spec.cache_key] = entry
        return succeed((entry, False))

    def purge(self, url: str):
        self.purged.append(url)
        return succeed(None)


class ImageResourceTests(TestCase):
    signing_key: bytes | None = None

    def setUp(self) -> None:
        self.backend = MemoryBackend()
        self.metrics = NodeMetrics()
        root = NodeRoot({
            b"image": ImageResource(self.backend, self.metrics, self.signing_key, 3600),
            b"health": JsonDocument(lambda: {"name": "n1", "members": []}),
            b"metrics": MetricsResource(self.metrics),
        })
        self.root = root
        self.http = StubTreq(root)

    def url(self, url: str) -> str:
        return url

    @inlineCallbacks
    def get(self, url: str, **headers: str):
        response = yield self.http.get(self.url(url), headers={k.replace("_", "-"): v
                                                     for k, v in headers.items()})
        body = yield response.content()
        return response, body

    def header(self, response, name: str) -> str | None:
        values = response.headers.getRawHeaders(name)
        return values[0] if values else None

    @inlineCallbacks
    def assertJsonError(self, url: str, status: int, method: str = "GET"):
        response = yield self.http.request(method, self.url(url))
        body = yield response.content()
        self.assertEqual(response.code, status)
        self.assertEqual(self.header(response, "content-type"), "application/json")
        self.assertEqual(self.header(response, "x-content-type-options"), "nosniff")
        payload = json.loads(body)
        self.assertEqual(payload["status"], status)
        self.assertIsInstance(payload["error"], str)
        return payload

    @inlineCallbacks
    def test_miss_then_hit_with_contract_headers(self):
        response, body = yield self.get(BASE + "&w=10")
        self.assertEqual(response.code, 200)
        self.assertEqual(body, b"\xff\xd8jpeg-bytes")
        self.assertEqual(self.header(response, "x-cache"), "MISS")
        self.assertEqual(self.header(response, "content-type"), "image/jpeg")
        self.assertEqual(response.length, len(body))
        self.assertEqual(self.header(response, "etag"), '"abc123"')
        self.assertEqual(self.header(response, "cache-control"), "public, max-age=3600")
        self.assertIsNone(self.header(response, "vary"))
        response, body = yield self.get(BASE + "&w=10")
        self.assertEqual(self.header(response, "x-cache"), "HIT")
        self.assertEqual(response.length, len(body))
        self.assertEqual(len(self.backend.served), 1)

    @inlineCallbacks
    def test_if_none_match_gives_304(self):
        yield self.get(BASE)
        for value in ['"abc123"', 'W/"abc123"', '"zzz", "abc123"', "*"]:
            response, body = yield self.get(BASE, if_none_match=value)
            self.assertEqual(response.code, 304, value)
            self.assertEqual(body, b"")
            self.assertEqual(self.header(response, "etag"), '"abc123"')
        response, _ = yield self.get(BASE, if_none_match='"other"')
        self.assertEqual(response.code, 200)

    @inlineCallbacks
    def test_a_304_carries_no_content_length_on_the_wire(self):
        # RFC 9110 8.6: a 304's Content-Length, if any, must be the 200's; none is right,
        # "0" is wrong. The client side of StubTreq hides the header, so read the wire.
        yield self.get(BASE)
        for attempt in ("miss", "hit"):
            if attempt == "miss":
                self.backend.cache.clear()
            response = exchange(
                self.root,
                b"GET " + self.url(BASE).removeprefix("http://proxy.example").encode()
                + b" HTTP/1.1\r\nHost: x\r\nIf-None-Match: \"abc123\"\r\n\r\n",
            )
            head = response.partition(b"\r\n\r\n")[0].lower()
            self.assertTrue(head.startswith(b"http/1.1 304 "), (attempt, head))
            self.assertNotIn(b"content-length", head, attempt)

    @inlineCallbacks
    def test_repeated_list_headers_are_read_as_one_list(self):
        # RFC 9110 5.3: two Accept (or If-None-Match) lines are one comma-separated list.
        yield self.get(BASE)
        target = self.url(BASE).removeprefix("http://proxy.example").encode()
        response = exchange(
            self.root,
            b"GET " + target + b" HTTP/1.1\r\nHost: x\r\n"
            b"If-None-Match: \"abc123\"\r\nIf-None-Match: \"other\"\r\n\r\n",
        )
        self.assertTrue(response.startswith(b"HTTP/1.1 304 "), response[:100])
        auto = self.url(BASE + "&format=auto").removeprefix("http://proxy.example").encode()
        exchange(
            self.root,
            b"GET " + auto + b" HTTP/1.1\r\nHost: x\r\n"
            b"Accept: image/webp\r\nAccept: text/html\r\n\r\n",
        )
        self.assertEqual(self.backend.served[-1].output_format, "webp")

    @inlineCallbacks
    def test_format_auto_varies_on_accept(self):
        response, _ = yield self.get(BASE + "&format=auto", accept="image/webp,*/*")
        self.assertEqual(self.header(response, "vary"), "Accept")
        self.assertEqual(self.backend.served[-1].output_format, "webp")

    @inlineCallbacks
    def test_remembered_queries_still_follow_each_accept(self):
        for accept, expected in [("image/webp", "webp"), ("image/avif", "avif"),
                                 ("image/png", None), ("image/webp", "webp")]:
            yield self.get(BASE + "&format=auto&w=7", accept=accept)
            self.assertEqual(self.backend.served[-1].output_format, expected, accept)
            self.backend.cache.clear()

    @inlineCallbacks
    def test_bad_parameters_are_json_400(self):
        for query in ["", "?w=1", "?url=ftp%3A%2F%2Fx", BASE[len("http://proxy.example/image"):]
                      + "&w=0", "?url=http%3A%2F%2Fx%2F&fit=zoom"]:
            yield self.assertJsonError("http://proxy.example/image" + query, 400)

    @inlineCallbacks
    def test_backend_errors_keep_their_status(self):
        for status in (403, 404, 413, 415, 502, 503, 504):
            self.backend.outcome = ProxyError(status, "because")
            payload = yield self.assertJsonError(BASE + f"&w={status}", status)
            self.assertEqual(payload["error"], "because")

    @inlineCallbacks
    def test_busy_sets_retry_after(self):
        self.backend.outcome = ProxyError(503, "busy", retry_after=1)
        response, _ = yield self.get(BASE + "&w=3")
        self.assertEqual(self.header(response, "retry-after"), "1")

    @inlineCallbacks
    def test_unexpected_backend_failure_is_a_json_502_not_a_500(self):
        self.backend.outcome = ZeroDivisionError("bug")
        yield self.assertJsonError(BASE + "&w=4", 502)
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)

    @inlineCallbacks
    def test_unknown_path_and_method_are_json(self):
        yield self.assertJsonError("http://proxy.example/nope", 404)
        yield self.assertJsonError(BASE, 405, method="PUT")

    @inlineCallbacks
    def test_head_has_length_and_no_body(self):
        yield self.get(BASE)
        response = yield self.http.head(self.url(BASE))
        body = yield response.content()
        self.assertEqual(response.code, 200)
        self.assertEqual(body, b"")
        self.assertEqual(self.header(response, "etag"), '"abc123"')

    @inlineCallbacks
    def test_purge_needs_a_signing_key(self):
        yield self.assertJsonError(BASE, 403, method="DELETE")
        self.assertEqual(self.backend.purged, [])

    @inlineCallbacks
    def test_health_and_metrics(self):
        yield self.get(BASE)
        response, body = yield self.get("http://proxy.example/health")
        self.assertEqual(json.loads(body)["name"], "n1")
        response, body = yield self.get("http://proxy.example/metrics")
        self.assertIn(b'imgproxy_image_requests_total{cache="miss"} 1.0', body)
        self.assertIn(b'imgproxy_http_requests_total{endpoint="image",status="200"} 1.0', body)


class SignedImageResourceTests(ImageResourceTests):
    """The same rows with a signing key: every request signed, and purge allowed."""

    signing_key = b"secret"

    def url(self, url: str) -> str:
        path, _, query = url.partition("?")
        if not path.endswith("/image"):
            return url
        sig = sign_query(query.encode(), self.signing_key)
        return f"{path}?{query}&sig={sig}" if query else f"{path}?sig={sig}"

    @inlineCallbacks
    def test_unsigned_request_is_403(self):
        response = yield self.http.get(BASE + "&w=9")
        self.assertEqual(response.code, 403)
        self.assertEqual(self.backend.served, [])

    @inlineCallbacks
    def test_purge_needs_a_signing_key(self):
        """With a key, a signed DELETE purges and answers 204; a bad sig is 403."""
        response = yield self.http.delete(self.url(BASE))
        self.assertEqual(response.code, 204)
        self.assertEqual(self.backend.purged, [SOURCE])
        response = yield self.http.delete(BASE + "&sig=00")
        self.assertEqual(response.code, 403)


class PurgeKeyTests(TestCase):
    """With --purge-key, a purge is signed with it: an image's signed URL purges nothing."""

    def setUp(self) -> None:
        self.backend = MemoryBackend()
        resource = ImageResource(self.backend, NodeMetrics(), b"signing", 3600, purge_key=b"purge")
        self.http = StubTreq(NodeRoot({b"image": resource}))

    def signed(self, key: bytes) -> str:
        query = BASE.partition("?")[2]
        return f"{BASE}&sig={sign_query(query.encode(), key)}"

    @inlineCallbacks
    def test_the_signing_key_serves_but_does_not_purge(self):
        response = yield self.http.get(self.signed(b"signing"))
        self.assertEqual(response.code, 200)
        yield response.content()
        response = yield self.http.delete(self.signed(b"signing"))
        self.assertEqual(response.code, 403)
        yield response.content()
        self.assertEqual(self.backend.purged, [])

    @inlineCallbacks
    def test_the_purge_key_purges(self):
        response = yield self.http.delete(self.signed(b"purge"))
        self.assertEqual(response.code, 204)
        self.assertEqual(self.backend.purged, [SOURCE])
