"""ImageService: the cache first, one fetch per source, one transform per variant."""

from __future__ import annotations

import io

from PIL import Image
from twisted.internet.defer import Deferred, fail, maybeDeferred, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from imgproxy.errors import ProxyError
from imgproxy.metrics import NodeMetrics
from imgproxy.params import TransformSpec
from imgproxy.worker.cache import DiskCache, PurgeIncomplete, source_cache_key
from imgproxy.worker.coalesce import Coalescer
from imgproxy.worker.fetch import FetchedSource
from imgproxy.worker.images import REMEMBERED_PURGES, ImageService
from imgproxy.worker.transform import TransformLimits

URL = "http://origin.test/photo.jpg"


def jpeg(width: int = 64, height: int = 48) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), (10, 120, 200)).save(out, "JPEG")
    return out.getvalue()


class ControlledFetcher:
    """Each fetch returns a Deferred the test fires."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.pending: list[Deferred] = []

    def fetch(self, url: str) -> Deferred:
        self.calls.append(url)
        d: Deferred = Deferred()
        self.pending.append(d)
        return d


class InlinePool:
    """Runs the blocking call at once, counting calls by function name."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def run(self, function, *args):
        self.calls.append(function.__name__)
        return maybeDeferred(function, *args)


class PeerWithCopy:
    def __init__(self, entry=None) -> None:
        self.entry = entry
        self.asked: list[tuple[object, str]] = []

    def find(self, spec, url):
        self.asked.append((spec, url))
        return succeed(self.entry)


class ImageServiceTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.cache = DiskCache(self.mktemp(), 10 << 20, 3600, self.clock)
        self.fetcher = ControlledFetcher()
        self.pool = InlinePool()
        self.service = ImageService(
            self.cache, self.fetcher, self.pool, TransformLimits(), NodeMetrics()
        )

    def results(self, d: Deferred) -> list:
        out: list = []
        d.addBoth(out.append)
        return out

    def test_miss_fetches_transforms_and_caches(self) -> None:
        spec = TransformSpec(URL, width=32)
        result = self.results(self.service.render(spec))
        self.fetcher.pending[0].callback(FetchedSource(URL, jpeg(), "image/jpeg"))
        entry = result[0]
        self.assertEqual(Image.open(io.BytesIO(entry.body)).size, (32, 24))
        self.assertEqual(self.service.cached(spec), entry)
        self.assertIsNotNone(self.cache.get(source_cache_key(spec.source_key)))

    def test_a_variant_rendered_from_a_cached_source_goes_stale_with_it(self) -> None:
        first = TransformSpec(URL, width=32)
        self.results(self.service.render(first))
        self.fetcher.pending[0].callback(FetchedSource(URL, jpeg(), "image/jpeg"))
        self.clock.advance(3000)  # of the 3600 s TTL
        late = TransformSpec(URL, width=16)
        rendered = self.results(self.service.render(late))
        self.assertEqual(len(self.fetcher.calls), 1)  # from the cached source
        self.assertEqual(rendered[0].created, 0.0)
        self.clock.advance(600)
        self.assertIsNone(self.service.cached(late))
        self.assertIsNone(self.service.cached(first))

    def test_a_purge_while_the_source_downloads_keeps_the_result_out_of_the_cache(self) -> None:
        # Those who asked before the purge get what was on its way; nobody after.
        spec = TransformSpec(URL, width=32)
        result = self.results(self.service.render(spec))
        self.service.purge_source(URL)
        self.fetcher.pending[0].callback(FetchedSource(URL, jpeg(), "image/jpeg"))
        self.assertEqual(Image.open(io.BytesIO(result[0].body)).size, (32, 24))
        self.assertIsNone(self.service.cached(spec))
        self.assertIsNone(self.cache.get(source_cache_key(spec.source_key)))
        # The next request fetches again, and that result is kept.
        self.results(self.service.render(spec))
        self.fetcher.pending[1].callback(FetchedSource(URL, jpeg(), "image/jpeg"))
        self.assertIsNotNone(self.service.cached(spec))

    def test_a_request_after_a_purge_is_not_joined_to_a_download_from_before(self) -> None:
        # Another variant asked for after the purge: its own download, its bytes kept.
        before, after = TransformSpec(URL, width=32), TransformSpec(URL, width=16)
        old = self.results(self.service.render(before))
        self.service.purge_source(URL)
        new = self.results(self.service.render(after))
        again = self.results(self.service.render(before))
        self.assertEqual(len(self.fetcher.calls), 2)
        self.fetcher.pending[0].callback(FetchedSource(URL, jpeg(64, 48), "image/jpeg"))
        self.fetcher.pending[1].callback(FetchedSource(URL, jpeg(40, 30), "image/jpeg"))
        self.assertEqual(Image.open(io.BytesIO(old[0].body)).size, (32, 24))
        # Rendered from the new source (40x30), not the purged one (64x48).
        self.assertEqual(Image.open(io.BytesIO(new[0].body)).size, (16, 12))
        self.assertEqual(Image.open(io.BytesIO(again[0].body)).size, (32, 24))
        self.assertEqual(self.service.cached(after), new[0])
        self.assertEqual(self.service.cached(before), again[0])
        source = self.cache.get(source_cache_key(before.source_key))
        self.assertEqual(Image.open(io.BytesIO(source.body)).size, (40, 30))

    def test_a_purge_that_leaves_files_on_disk_is_a_503_to_retry(self) -> None:
        def read_only_disk(source_key: str) -> int:
            raise PurgeIncomplete("1 of its files cannot be removed")

        self.patch(self.cache, "purge_source", read_only_disk)
        failure = self.failureResultOf(self.service.purge(URL), ProxyError)
        self.assertEqual((failure.value.status, failure.value.retry_after), (503, 5))

    def test_a_purge_forgotten_among_many_still_keeps_the_result_out(self) -> None:
        spec = TransformSpec(URL, width=32)
        self.results(self.service.render(spec))
        self.service.purge_source(URL)
        for n in range(REMEMBERED_PURGES):
            self.service.purge_source(f"http://origin.test/{n}.jpg")
        self.fetcher.pending[0].callback(FetchedSource(URL, jpeg(), "image/jpeg"))
        self.assertIsNone(self.service.cached(spec))

    def test_a_purge_of_another_source_changes_nothing(self) -> None:
        spec = TransformSpec(URL, width=32)
        self.results(self.service.render(spec))
        self.service.purge_source("http://origin.test/other.jpg")
        self.fetcher.pending[0].callback(FetchedSource(URL, jpeg(), "image/jpeg"))
        self.assertIsNotNone(self.service.cached(spec))

    def test_identical_concurrent_requests_cost_one_fetch_and_one_transform(self) -> None:
        spec = TransformSpec(URL, width=16)
        outcomes = [self.results(self.service.render(spec)) for _ in range(10)]
        self.assertEqual(len(self.fetcher.calls), 1)
        self.fetcher.pending[0].callback(FetchedSource(URL, jpeg(), "image/jpeg"))
        self.assertEqual(self.pool.calls.count("transform_image"), 1)
        self.assertEqual({o[0].etag for o in outcomes}, {outcomes[0][0].etag})

    def test_concurrent_variants_of_one_source_cost_one_fetch(self) -> None:
        outcomes = [
            self.results(self.service.render(TransformSpec(URL, width=w))) for w in (8, 16, 24)
        ]
        self.assertEqual(len(self.fetcher.calls), 1)
        self.fetcher.pending[0].callback(FetchedSource(URL, jpeg(), "image/jpeg"))
        self.assertEqual(self.pool.calls.count("transform_image"), 3)
        self.assertEqual(
            sorted(Image.open(io.BytesIO(o[0].body)).width for o in outcomes), [8, 16, 24]
        )

    def test_new_variant_of_a_cached_source_does_not_refetch(self) -> None:
        self.results(self.service.render(TransformSpec(URL, width=8)))
        self.fetcher.pending[0].callback(FetchedSource(URL, jpeg(), "image/jpeg"))
        result = self.results(self.service.render(TransformSpec(URL, width=20)))
        self.assertEqual(len(self.fetcher.calls), 1)
        self.assertEqual(Image.open(io.BytesIO(result[0].body)).width, 20)

    def test_non_image_is_refused_and_not_cached(self) -> None:
        spec = TransformSpec(URL, width=8)
        result = self.results(self.service.render(spec))
        self.fetcher.pending[0].callback(FetchedSource(URL, b"<html>hi</html>", "image/jpeg"))
        self.assertEqual(result[0].value.status, 415)
        self.assertIsNone(self.cache.get(source_cache_key(spec.source_key)))
        self.assertEqual(list(self.cache.keys()), [])

    def test_fetch_error_reaches_every_waiter_and_is_not_remembered(self) -> None:
        spec = TransformSpec(URL, width=8)
        outcomes = [self.results(self.service.render(spec)) for _ in range(3)]
        self.fetcher.pending[0].errback(ProxyError(504, "slow origin"))
        self.assertEqual([o[0].value.status for o in outcomes], [504, 504, 504])
        self.results(self.service.render(spec))
        self.assertEqual(len(self.fetcher.calls), 2)

    def test_purge_removes_source_and_variants(self) -> None:
        self.results(self.service.render(TransformSpec(URL, width=8)))
        self.fetcher.pending[0].callback(FetchedSource(URL, jpeg(), "image/jpeg"))
        self.assertEqual(self.service.purge_source(URL), 2)
        self.assertIsNone(self.service.cached(TransformSpec(URL, width=8)))

    def test_handoff_copy_is_used_before_the_origin(self) -> None:
        spec = TransformSpec(URL, width=8)
        donor = DiskCache(self.mktemp(), 1 << 20, 3600, self.clock)
        peer = PeerWithCopy(donor.put(spec.cache_key, b"variant", "image/jpeg", URL))
        self.service.peers = peer
        result = self.results(self.service.render(spec))
        self.assertEqual(result[0].body, b"variant")
        self.assertEqual(self.fetcher.calls, [])
        self.assertEqual(self.service.cached(spec).body, b"variant")

    def test_handoff_miss_falls_back_to_the_origin(self) -> None:
        self.service.peers = PeerWithCopy(None)
        result = self.results(self.service.render(TransformSpec(URL, width=8)))
        self.assertEqual(len(self.fetcher.calls), 1)
        self.fetcher.pending[0].callback(FetchedSource(URL, jpeg(), "image/jpeg"))
        self.assertEqual(Image.open(io.BytesIO(result[0].body)).width, 8)


class CoalescerTests(SynchronousTestCase):
    def test_one_run_per_key_at_a_time(self) -> None:
        coalescer: Coalescer[int] = Coalescer()
        runs: list[Deferred] = []

        def work() -> Deferred:
            d: Deferred = Deferred()
            runs.append(d)
            return d

        first, second = coalescer.run("k", work), coalescer.run("k", work)
        other = coalescer.run("j", work)
        self.assertEqual(len(runs), 2)
        runs[0].callback(7)
        self.assertEqual((self.successResultOf(first), self.successResultOf(second)), (7, 7))
        self.assertNoResult(other)
        self.assertFalse(coalescer.in_flight("k"))

    def test_cancelling_one_waiter_leaves_the_others(self) -> None:
        coalescer: Coalescer[int] = Coalescer()
        work: Deferred = Deferred()
        first, second = coalescer.run("k", lambda: work), coalescer.run("k", lambda: work)
        first.cancel()
        self.failureResultOf(first)
        work.callback(3)
        self.assertEqual(self.successResultOf(second), 3)

    def test_detached_work_goes_on_for_its_callers_and_later_ones_start_afresh(self) -> None:
        coalescer: Coalescer[str] = Coalescer()
        runs: list[Deferred] = []

        def work() -> Deferred:
            runs.append(Deferred())
            return runs[-1]

        before = coalescer.run("src/a", work)
        untouched = coalescer.run("other/a", work)
        self.assertEqual(coalescer.detach("src/"), 1)
        after = coalescer.run("src/a", work)
        self.assertEqual(len(runs), 3)
        runs[0].callback("old")
        # The old work ending leaves the new one in place, and in flight.
        self.assertTrue(coalescer.in_flight("src/a"))
        self.assertEqual(self.successResultOf(before), "old")
        self.assertNoResult(after)
        runs[2].callback("new")
        self.assertEqual(self.successResultOf(after), "new")
        self.assertNoResult(untouched)

    def test_synchronous_failure_reaches_the_caller(self) -> None:
        coalescer: Coalescer[int] = Coalescer()
        d = coalescer.run("k", lambda: fail(ProxyError(502, "x")))
        self.assertEqual(self.failureResultOf(d).value.status, 502)
        self.assertEqual(len(coalescer), 0)
