"""The internal worker API, through the real client: the contract's table, signed."""

from __future__ import annotations

import json

from treq.testing import StubTreq
from twisted.internet.defer import inlineCallbacks, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from imgproxy.auth import RequestSigner
from imgproxy.errors import ProxyError
from imgproxy.gateway.client import WorkerBusy, WorkerClient, WorkerUnavailable
from imgproxy.metrics import NodeMetrics
from imgproxy.params import TransformSpec
from imgproxy.placement import WorkerRef
from imgproxy.worker.cache import DiskCache, PurgeIncomplete
from imgproxy.worker.fetch import FetchedSource
from imgproxy.worker.images import ImageService
from imgproxy.worker.internal import AUTH_REFUSED_HEADER, internal_api
from imgproxy.worker.transform import TransformLimits
from tests.worker.test_images import InlinePool, jpeg

URL = "http://origin.test/photo.jpg"
SECRET = b"s" * 32
WORKER = WorkerRef("w1", "worker.test", 80)


class OneImageOrigin:
    def __init__(self) -> None:
        self.calls = 0

    def fetch(self, url: str):
        self.calls += 1
        return succeed(FetchedSource(url, jpeg(), "image/jpeg"))


class InternalApiTests(TestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_000_000)
        self.origin = OneImageOrigin()
        self.cache = DiskCache(self.mktemp(), 10 << 20, 3600, self.clock)
        self.images = ImageService(
            self.cache, self.origin, InlinePool(), TransformLimits(), NodeMetrics()
        )
        signer = RequestSigner.from_secret(SECRET)
        resource = internal_api(self.images, signer, self.clock, NodeMetrics())
        from twisted.web.resource import Resource

        root = Resource()
        root.putChild(b"v1", resource)
        self.http = StubTreq(root)
        self.client = WorkerClient(self.clock, signer, http=self.http)

    @inlineCallbacks
    def test_lookup_misses_then_produce_then_lookup_hits(self):
        spec = TransformSpec(URL, width=20)
        missing = yield self.client.lookup(WORKER, spec)
        self.assertIsNone(missing)
        produced, hit = yield self.client.produce(WORKER, spec)
        self.assertFalse(hit)
        self.assertEqual(produced.content_type, "image/jpeg")
        found = yield self.client.lookup(WORKER, spec)
        self.assertEqual(found.body, produced.body)
        self.assertEqual(found.etag, produced.etag)
        self.assertEqual(self.origin.calls, 1)

    @inlineCallbacks
    def test_produce_tells_the_worker_which_peers_not_to_copy_from(self):
        class RecordingPeers:
            avoided: list[str] = []

            def avoid(self, names):
                self.avoided.extend(names)

            def find(self, spec, url):
                return succeed(None)

        self.images.peers = peers = RecordingPeers()
        # Any member name survives the trip: commas, spaces and non-ASCII included.
        names = ["w2", "rack 3,w7", "wörker-ß"]
        yield self.client.produce(WORKER, TransformSpec(URL, width=20), held_out=names)
        self.assertEqual(peers.avoided, names)
        yield self.client.produce(WORKER, TransformSpec(URL, width=21))
        self.assertEqual(peers.avoided, names)

    @inlineCallbacks
    def test_only_the_contracts_paths_exist(self):
        for path in ("/v1/image/extra", "/v1/cache/", "/v1/nothing", "/v1"):
            response = yield self.http.get("http://worker.test" + path)
            self.assertEqual(response.code, 404, path)
            yield response.content()

    @inlineCallbacks
    def test_source_lookup_serves_the_original_for_handoff(self):
        yield self.client.produce(WORKER, TransformSpec(URL, width=20))
        source = yield self.client.lookup_source(WORKER, URL)
        self.assertEqual(source.body, jpeg())
        missing = yield self.client.lookup_source(WORKER, "http://origin.test/other.jpg")
        self.assertIsNone(missing)

    @inlineCallbacks
    def test_stale_entries_only_with_stale_ok(self):
        spec = TransformSpec(URL, width=20)
        yield self.client.produce(WORKER, spec)
        self.clock.advance(3601)
        fresh_only = yield self.client.lookup(WORKER, spec)
        self.assertIsNone(fresh_only)
        stale = yield self.client.lookup(WORKER, spec, stale_ok=True)
        self.assertIsNotNone(stale)

    @inlineCallbacks
    def test_purge_removes_the_source_and_its_variants(self):
        spec = TransformSpec(URL, width=20)
        yield self.client.produce(WORKER, spec)
        yield self.client.purge(WORKER, URL)
        gone = yield self.client.lookup(WORKER, spec)
        self.assertIsNone(gone)

    @inlineCallbacks
    def test_a_purge_that_leaves_files_behind_is_a_503_to_retry(self):
        def read_only_disk(source_key: str) -> int:
            raise PurgeIncomplete("1 of its files cannot be removed")

        self.patch(self.cache, "purge_source", read_only_disk)
        # A 503: the gateway keeps the purge pending for this worker and replays it.
        yield self.assertFailure(self.client.purge(WORKER, URL), WorkerBusy)

    @inlineCallbacks
    def test_unsigned_or_badly_signed_requests_are_403(self):
        response = yield self.http.get("http://worker.test/v1/image?url=" + URL)
        self.assertEqual(response.code, 403)
        self.assertIn("not signed", json.loads((yield response.content()))["error"])
        self.assertTrue(response.headers.hasHeader(AUTH_REFUSED_HEADER))
        # A gateway with another secret fails over: the client is not to blame.
        other = WorkerClient(self.clock, RequestSigner.from_secret(b"x" * 32), http=self.http)
        with self.assertRaises(WorkerUnavailable) as caught:
            yield other.lookup(WORKER, TransformSpec(URL))
        self.assertIn("authentication", caught.exception.why)

    @inlineCallbacks
    def test_a_purge_of_something_that_is_not_a_url_is_a_400(self):
        with self.assertRaises(ProxyError) as caught:
            yield self.client.purge(WORKER, "notaurl")
        self.assertEqual(caught.exception.status, 400)

    @inlineCallbacks
    def test_replayed_request_is_403(self):
        signer = RequestSigner.from_secret(SECRET)
        headers = signer.sign(b"DELETE", b"/v1/cache", b"url=x", b"", self.clock.seconds())
        self.clock.advance(signer.window + 1)
        response = yield self.http.delete("http://worker.test/v1/cache?url=x",
                                          headers={k: [v] for k, v in headers.items()})
        self.assertEqual(response.code, 403)

    @inlineCallbacks
    def test_bad_produce_bodies_are_400(self):
        signer = RequestSigner.from_secret(SECRET)
        for body in (b"not json", b"[1]", b'{"url": "http://x/", "w": 0}',
                     b'{"url": "http://x/", "zoom": 2}', b'{"url": "http://x/", "w": [1]}'):
            headers = signer.sign(b"POST", b"/v1/cache", b"", body, self.clock.seconds())
            response = yield self.http.post("http://worker.test/v1/cache", data=body,
                                             headers={k: [v] for k, v in headers.items()})
            self.assertEqual(response.code, 400, body)
            payload = json.loads((yield response.content()))
            self.assertEqual(payload["status"], 400)
