"""The aged on-disk cache: round trips, ageing, LRU, restart, corruption and failing disks."""

from __future__ import annotations

import errno
import os
import re
import shutil
import signal
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager

from twisted.internet.task import Clock, Cooperator
from twisted.logger import capturedLogs
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from imgproxy.params import TransformSpec, source_key_of
from imgproxy.worker import cache as cache_module
from imgproxy.worker.cache import (
    HEADER_SIZE,
    CacheEntry,
    DiskCache,
    PurgeIncomplete,
    decode_entry,
    decode_meta,
    encode_entry,
    source_cache_key,
)

URL_A = "https://images.example/a.jpg"
URL_B = "https://images.example/b.jpg"


def variant_key(url: str, width: int) -> str:
    return TransformSpec(url, width=width).cache_key


def stepping_cooperator() -> tuple[Cooperator, Clock]:
    """A cooperator that runs one batch of the scan each time its own clock advances by 1."""
    ticks = Clock()
    cooperator = Cooperator(
        scheduler=lambda step: ticks.callLater(1, step),
        terminationPredicateFactory=lambda: lambda: True,
    )
    return cooperator, ticks


def entry_files(root: str) -> list[str]:
    return sorted(
        os.path.join(directory, name) for directory, _dirs, names in os.walk(root) for name in names
    )


def remove_temp(path: str) -> None:
    # trial's mktemp() is relative to the working directory: under pytest that is the
    # checkout, so leave nothing behind there.
    shutil.rmtree(os.path.dirname(path), ignore_errors=True)
    try:
        os.removedirs(os.path.dirname(os.path.dirname(path)))
    except OSError:
        pass


class CacheTestCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_000_000)
        self.root = self.tempdir()

    def tempdir(self) -> str:
        """A fresh directory path (not yet created), removed again after the test."""
        path = self.mktemp()
        self.addCleanup(remove_temp, path)
        return os.path.abspath(path)

    def make_cache(self, root: str | None = None, **kwargs: object) -> DiskCache:
        options: dict = {"max_bytes": 1 << 20, "ttl": 100.0, "clock": self.clock}
        options.update(kwargs)
        return DiskCache(root or self.root, **options)

    def started(self, root: str | None = None, **kwargs: object) -> DiskCache:
        """A cache whose start-up scan has run to the end."""
        cooperator, ticks = stepping_cooperator()
        cache = self.make_cache(root, cooperator=cooperator, **kwargs)
        done = cache.start()
        for _ in range(10_000):
            if done.called:
                break
            ticks.advance(1)
        self.assertIsNone(self.successResultOf(done))
        return cache

    def file_of(self, key: str, root: str | None = None) -> str:
        return os.path.join(root or self.root, key[0:2], key[2:4], key)


class RoundTripTests(CacheTestCase):
    def test_put_then_get_returns_the_same_entry(self) -> None:
        cache = self.make_cache()
        key = variant_key(URL_A, 100)
        stored = cache.put(key, b"jpeg bytes", "image/jpeg", URL_A)
        got = cache.get(key)
        self.assertEqual(got, stored)
        self.assertEqual(
            (got.key, got.body, got.content_type, got.created, got.source_url),
            (key, b"jpeg bytes", "image/jpeg", self.clock.seconds(), URL_A),
        )
        self.assertRegex(got.etag, r'^"[0-9a-f]{32}"$')
        self.assertEqual((cache.stats.hits, cache.stats.misses, cache.stats.entries), (1, 0, 1))

    def test_etag_is_a_digest_of_the_body(self) -> None:
        cache = self.make_cache()
        one = cache.put(variant_key(URL_A, 1), b"same", "image/png", URL_A)
        two = cache.put(variant_key(URL_B, 1), b"same", "image/png", URL_B)
        three = cache.put(variant_key(URL_A, 2), b"other", "image/png", URL_A)
        self.assertEqual(one.etag, two.etag)
        self.assertNotEqual(one.etag, three.etag)

    def test_entry_is_one_file_in_its_source_directory(self) -> None:
        cache = self.make_cache()
        key = variant_key(URL_A, 100)
        cache.put(key, b"x" * 50, "image/jpeg", URL_A)
        cache.put(source_cache_key(source_key_of(URL_A)), b"orig", "image/jpeg", URL_A)
        source = source_key_of(URL_A)
        directory = os.path.join(self.root, source[0:2], source[2:4], source)
        self.assertEqual(sorted(os.listdir(directory)), sorted([key.split("/")[1], "source"]))
        self.assertEqual(cache.stats.bytes, sum(map(os.path.getsize, entry_files(self.root))))

    def test_disk_hit_reads_the_file_when_not_in_memory(self) -> None:
        cache = self.make_cache(memory_bytes=0)
        key = variant_key(URL_A, 100)
        stored = cache.put(key, os.urandom(10_000), "image/webp", URL_A)
        self.assertEqual(cache.stats.memory_entries, 0)
        self.assertEqual(cache.get(key), stored)

    def test_small_hot_entry_is_served_from_memory(self) -> None:
        cache = self.make_cache()
        key = variant_key(URL_A, 100)
        stored = cache.put(key, b"small", "image/gif", URL_A)
        os.unlink(self.file_of(key))  # only the memory copy can answer now
        self.assertEqual(cache.get(key), stored)
        self.assertEqual(cache.stats.corrupt_dropped, 0)

    def test_entry_over_the_memory_entry_limit_is_not_kept_in_memory(self) -> None:
        cache = self.make_cache(memory_entry_limit=100)
        cache.put(variant_key(URL_A, 1), b"x" * 101, "image/png", URL_A)
        cache.put(variant_key(URL_A, 2), b"x" * 100, "image/png", URL_A)
        self.assertEqual((cache.stats.memory_entries, cache.stats.memory_bytes), (1, 100))

    def test_memory_copies_stay_under_their_budget(self) -> None:
        cache = self.make_cache(memory_bytes=1000)
        for width in range(1, 11):
            cache.put(variant_key(URL_A, width), b"x" * 300, "image/png", URL_A)
        self.assertEqual((cache.stats.memory_entries, cache.stats.memory_bytes), (3, 900))
        self.assertEqual(cache.stats.entries, 10)

    def test_miss_touches_no_file(self) -> None:
        cache = self.make_cache()

        def no_filesystem(*args: object, **kwargs: object) -> None:
            raise AssertionError("a miss must be answered from the index")

        self.patch(os, "open", no_filesystem)
        self.patch(os, "stat", no_filesystem)
        self.assertIsNone(cache.get(variant_key(URL_A, 100)))
        self.assertEqual(cache.stats.misses, 1)

    def test_put_replaces_the_previous_body(self) -> None:
        cache = self.make_cache(memory_bytes=0)
        key = variant_key(URL_A, 100)
        cache.put(key, b"old", "image/png", URL_A)
        cache.put(key, b"newer", "image/webp", URL_A)
        self.assertEqual(cache.get(key).body, b"newer")
        self.assertEqual(cache.stats.entries, 1)
        self.assertEqual(cache.stats.bytes, os.path.getsize(self.file_of(key)))

    def test_a_key_that_is_not_a_cache_key_is_refused(self) -> None:
        cache = self.make_cache()
        for bad in ("../../etc/passwd", "a" * 64, "A" * 64 + "/source", "a" * 64 + "/x/../y"):
            self.assertRaises(ValueError, cache.put, bad, b"x", "image/png", URL_A)
        self.assertEqual(entry_files(self.root), [])


class AgeingTests(CacheTestCase):
    def test_entry_is_stale_at_the_ttl_but_still_handed_over(self) -> None:
        cache = self.make_cache(ttl=10.0)
        key = variant_key(URL_A, 100)
        stored = cache.put(key, b"img", "image/png", URL_A)
        self.clock.advance(9.5)
        self.assertEqual(cache.get(key), stored)
        self.clock.advance(0.5)
        self.assertIsNone(cache.get(key))
        self.assertEqual(cache.stats.stale, 1)
        self.assertEqual(cache.get_stale_ok(key), stored)
        self.assertTrue(os.path.exists(self.file_of(key)))

    def test_stale_entry_from_disk_is_handed_over(self) -> None:
        cache = self.make_cache(ttl=10.0, memory_bytes=0)
        key = variant_key(URL_A, 100)
        stored = cache.put(key, b"img", "image/png", URL_A)
        self.clock.advance(3600)
        self.assertIsNone(cache.get(key))
        self.assertEqual(cache.get_stale_ok(key), stored)

    def test_putting_again_makes_a_stale_entry_fresh(self) -> None:
        cache = self.make_cache(ttl=10.0)
        key = variant_key(URL_A, 100)
        cache.put(key, b"img", "image/png", URL_A)
        self.clock.advance(20)
        again = cache.put(key, b"img", "image/png", URL_A)
        self.assertEqual(cache.get(key), again)
        self.assertEqual(again.created, self.clock.seconds())

    def test_get_stale_ok_misses_an_absent_key(self) -> None:
        cache = self.make_cache()
        self.assertIsNone(cache.get_stale_ok(variant_key(URL_A, 1)))
        self.assertEqual(cache.stats.misses, 1)


class EvictionTests(CacheTestCase):
    def entry_size(self) -> int:
        probe = self.make_cache(root=self.tempdir())
        probe.put(variant_key(URL_A, 1), b"x" * 1000, "image/png", URL_A)
        return probe.stats.bytes

    def test_least_recently_used_goes_first_and_a_touch_saves_an_entry(self) -> None:
        size = self.entry_size()
        cache = self.make_cache(max_bytes=3 * size + size // 2)
        a, b, c, d = (variant_key(URL_A, width) for width in (1, 2, 3, 4))
        for key in (a, b, c):
            cache.put(key, b"x" * 1000, "image/png", URL_A)
        cache.get(a)
        cache.put(d, b"x" * 1000, "image/png", URL_A)
        self.assertEqual(list(cache.keys()), [c, a, d])
        self.assertIsNone(cache.get(b))
        self.assertFalse(os.path.exists(self.file_of(b)))
        self.assertEqual(cache.stats.evictions, 1)
        self.assertLessEqual(cache.stats.bytes, 3 * size + size // 2)

    def test_total_bytes_stay_under_the_cap(self) -> None:
        cache = self.make_cache(max_bytes=20_000)
        for width in range(1, 60):
            cache.put(variant_key(URL_A, width), os.urandom(width * 37), "image/png", URL_A)
            self.assertLessEqual(cache.stats.bytes, 20_000)
        self.assertEqual(cache.stats.bytes, sum(map(os.path.getsize, entry_files(self.root))))
        self.assertEqual(len(entry_files(self.root)), cache.stats.entries)

    def test_entry_bigger_than_the_cap_is_served_but_not_stored(self) -> None:
        cache = self.make_cache(max_bytes=5000)
        key = variant_key(URL_A, 100)
        entry = cache.put(key, b"x" * 5000, "image/png", URL_A)
        self.assertEqual(entry.body, b"x" * 5000)
        self.assertIsNone(cache.get(key))
        self.assertEqual((cache.stats.entries, cache.stats.bytes), (0, 0))
        self.assertEqual(entry_files(self.root), [])

    def test_oversize_put_drops_the_superseded_body(self) -> None:
        cache = self.make_cache(max_bytes=5000)
        key = variant_key(URL_A, 100)
        cache.put(key, b"small", "image/png", URL_A)
        cache.put(key, b"x" * 5000, "image/png", URL_A)
        self.assertIsNone(cache.get_stale_ok(key))
        self.assertEqual(entry_files(self.root), [])


class RestartTests(CacheTestCase):
    def test_a_restarted_cache_serves_its_old_entries(self) -> None:
        first = self.make_cache()
        stored = []
        for width in (1, 2, 3):
            key = variant_key(URL_A, width)
            stored.append(first.put(key, os.urandom(2000), "image/avif", URL_A))
            self.clock.advance(5)
        second = self.started(memory_bytes=0)
        for entry in stored:
            self.assertEqual(second.get(entry.key), entry)
        self.assertEqual(second.stats.entries, 3)
        self.assertEqual(second.stats.bytes, first.stats.bytes)

    def test_ages_survive_a_restart(self) -> None:
        first = self.make_cache(ttl=10.0)
        key = variant_key(URL_A, 1)
        first.put(key, b"img", "image/png", URL_A)
        self.clock.advance(10)
        second = self.started(ttl=10.0)
        self.assertIsNone(second.get(key))
        self.assertEqual(second.get_stale_ok(key).created, self.clock.seconds() - 10)

    def test_start_with_the_default_cooperator_runs_on_the_clock(self) -> None:
        key = variant_key(URL_A, 1)
        stored = self.make_cache().put(key, b"img", "image/png", URL_A)
        second = self.make_cache()
        done = second.start()
        self.assertNoResult(done)
        self.clock.advance(0)
        self.successResultOf(done)
        self.assertEqual(second.get(key), stored)

    def test_scan_orders_the_index_by_last_access(self) -> None:
        first = self.make_cache()
        keys = [variant_key(URL_A, width) for width in (1, 2, 3, 4)]
        for key in keys:
            first.put(key, b"x" * 1000, "image/png", URL_A)
        # Access times: keys[2] oldest, then keys[0], keys[3], keys[1].
        for key, stamp in zip(keys, (2000, 4000, 1000, 3000), strict=True):
            os.utime(self.file_of(key), (stamp, stamp))
        second = self.started()
        self.assertEqual(list(second.keys()), [keys[2], keys[0], keys[3], keys[1]])

    def test_scan_evicts_the_oldest_over_a_smaller_cap(self) -> None:
        first = self.make_cache()
        keys = [variant_key(URL_A, width) for width in (1, 2, 3)]
        for stamp, key in enumerate(keys, start=1000):
            first.put(key, b"x" * 1000, "image/png", URL_A)
            os.utime(self.file_of(key), (stamp, stamp))
        size = first.stats.bytes // 3
        second = self.started(max_bytes=2 * size)
        self.assertEqual(list(second.keys()), keys[1:])
        self.assertFalse(os.path.exists(self.file_of(keys[0])))
        self.assertEqual(second.stats.evictions, 1)

    def test_puts_during_the_scan_are_not_clobbered(self) -> None:
        first = self.make_cache()
        keys = [variant_key(URL_A, width) for width in range(1, 9)]
        for key in keys:
            first.put(key, b"old", "image/png", URL_A)
        cooperator, ticks = stepping_cooperator()
        second = self.make_cache(cooperator=cooperator, scan_batch=1, memory_bytes=0)
        done = second.start()
        ticks.advance(1)
        ticks.advance(1)
        self.assertNoResult(done)
        self.clock.advance(1)
        newer = {key: second.put(key, b"new body", "image/webp", URL_A) for key in keys}
        while not done.called:
            ticks.advance(1)
        for key in keys:
            self.assertEqual(second.get(key), newer[key])
        self.assertEqual(second.stats.entries, len(keys))
        self.assertEqual(second.stats.bytes, sum(map(os.path.getsize, entry_files(self.root))))

    def test_scanned_entries_are_served_before_the_scan_ends(self) -> None:
        first = self.make_cache()
        stored = [
            first.put(variant_key(URL_A, width), b"img", "image/png", URL_A)
            for width in range(1, 9)
        ]
        cooperator, ticks = stepping_cooperator()
        second = self.make_cache(cooperator=cooperator, scan_batch=2)
        done = second.start()
        while not list(second.keys()):
            ticks.advance(1)
        self.assertNoResult(done)
        served = [second.get(key) for key in second.keys()]
        self.assertTrue(served)
        for entry in served:
            self.assertIn(entry, stored)

    def test_entries_purged_during_the_scan_stay_gone(self) -> None:
        first = self.make_cache()
        for width in range(1, 9):
            first.put(variant_key(URL_A, width), b"img", "image/png", URL_A)
        cooperator, ticks = stepping_cooperator()
        second = self.make_cache(cooperator=cooperator, scan_batch=1)
        done = second.start()
        for _ in range(9):  # the listing is complete, nothing adopted yet
            ticks.advance(1)
        second.purge_source(source_key_of(URL_A))
        while not done.called:
            ticks.advance(1)
        self.assertEqual(list(second.keys()), [])
        self.assertEqual(second.stats.corrupt_dropped, 0)

    def test_leftover_temporary_files_are_removed_at_start(self) -> None:
        key = variant_key(URL_A, 1)
        self.make_cache().put(key, b"img", "image/png", URL_A)
        directory = os.path.dirname(self.file_of(key))
        leftover = os.path.join(directory, f".{key.split('/')[1]}.4242.7.tmp")
        with open(leftover, "wb") as f:
            f.write(b"half a wri")
        second = self.started()
        self.assertFalse(os.path.exists(leftover))
        self.assertEqual(list(second.keys()), [key])

    def test_a_second_user_of_the_directory_is_warned_about(self) -> None:
        self.started()
        with capturedLogs() as events:
            second = self.started()
        warnings = [e for e in events if "another process" in e.get("log_format", "")]
        self.assertEqual(len(warnings), 1)
        # A warning, not a refusal: it caches all the same.
        entry = second.put(variant_key(URL_A, 1), b"img", "image/png", URL_A)
        self.assertEqual(second.get(entry.key), entry)

    def test_invalidate_all_makes_every_entry_so_far_stale_also_after_a_restart(self) -> None:
        cache = self.started()
        old = cache.put(variant_key(URL_A, 1), b"old", "image/png", URL_A)
        self.clock.advance(1)
        cache.invalidate_all()
        self.assertIsNone(cache.get(old.key))
        self.assertIsNone(cache.get_stale_ok(old.key))  # not handed to other workers either
        self.clock.advance(1)
        new = cache.put(variant_key(URL_B, 1), b"new", "image/png", URL_B)
        self.assertEqual(cache.get(new.key), new)
        restarted = self.started()
        self.assertIsNone(restarted.get(old.key))
        self.assertEqual(restarted.get(new.key), new)

    def test_foreign_files_are_left_alone(self) -> None:
        os.makedirs(os.path.join(self.root, "zz"))
        stray = os.path.join(self.root, "README")
        with open(stray, "w") as f:
            f.write("not ours")
        cache = self.started()
        self.assertTrue(os.path.exists(stray))
        self.assertEqual(cache.stats.entries, 0)

    def test_start_twice_is_a_bug(self) -> None:
        cache = self.make_cache(cooperator=stepping_cooperator()[0])
        cache.start()
        self.assertRaises(RuntimeError, cache.start)


@contextmanager
def hangs_fail_after(seconds: int) -> Iterator[None]:
    """Turn a hang into a test failure: SIGALRM interrupts a blocking system call."""

    def interrupt(signum: int, frame: object) -> None:
        raise AssertionError(f"blocked for more than {seconds} s")

    previous = signal.signal(signal.SIGALRM, interrupt)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


class CorruptionTests(CacheTestCase):
    def stored(self) -> tuple[DiskCache, str, str]:
        cache = self.make_cache(memory_bytes=0)
        key = variant_key(URL_A, 100)
        cache.put(key, os.urandom(4096), "image/jpeg", URL_A)
        return cache, key, self.file_of(key)

    def assertDropped(self, cache: DiskCache, key: str, path: str) -> None:
        self.assertIsNone(cache.get(key))
        self.assertFalse(os.path.exists(path))
        self.assertEqual((cache.stats.corrupt_dropped, cache.stats.entries), (1, 0))
        self.assertEqual(cache.stats.bytes, 0)
        self.assertIsNone(cache.get_stale_ok(key))

    def test_truncated_file_is_dropped_not_served(self) -> None:
        cache, key, path = self.stored()
        os.truncate(path, os.path.getsize(path) - 1)
        self.assertDropped(cache, key, path)

    def test_one_flipped_bit_in_the_body_is_dropped_not_served(self) -> None:
        cache, key, path = self.stored()
        with open(path, "r+b") as f:
            f.seek(-100, os.SEEK_END)
            byte = f.read(1)[0]
            f.seek(-100, os.SEEK_END)
            f.write(bytes([byte ^ 0x10]))
        self.assertDropped(cache, key, path)

    def test_grown_file_is_dropped_not_served(self) -> None:
        cache, key, path = self.stored()
        with open(path, "ab") as f:
            f.write(b"junk")
        self.assertDropped(cache, key, path)

    def test_unreadable_file_is_dropped(self) -> None:
        cache, key, path = self.stored()
        os.unlink(path)
        os.mkdir(path)  # reading a directory fails with EISDIR
        self.assertIsNone(cache.get(key))
        self.assertEqual(cache.stats.corrupt_dropped, 1)
        self.assertEqual(cache.stats.entries, 0)

    def test_a_fifo_in_place_of_an_entry_never_blocks(self) -> None:
        # Opening a FIFO for reading waits for a writer: the whole node would hang.
        cache, key, path = self.stored()
        os.unlink(path)
        os.mkfifo(path)
        with hangs_fail_after(5):
            self.assertDropped(cache, key, path)
            # And in the scan of a node starting on that directory.
            os.mkfifo(path)
            restarted = self.started()
        self.assertIsNone(restarted.get(key))
        self.assertFalse(os.path.exists(path))

    def test_scan_drops_a_truncated_file(self) -> None:
        _, key, path = self.stored()
        os.truncate(path, os.path.getsize(path) // 2)
        cache = self.started()
        self.assertIsNone(cache.get(key))
        self.assertFalse(os.path.exists(path))
        self.assertEqual(cache.stats.corrupt_dropped, 1)

    def test_scan_drops_a_file_with_a_bad_header(self) -> None:
        _, key, path = self.stored()
        with open(path, "r+b") as f:
            f.write(b"JUNK")
        cache = self.started()
        self.assertFalse(os.path.exists(path))
        self.assertEqual((cache.stats.corrupt_dropped, cache.stats.entries), (1, 0))

    def test_scan_drops_a_file_stored_under_another_key(self) -> None:
        _, key, path = self.stored()
        other = variant_key(URL_A, 200)
        os.rename(path, self.file_of(other))
        cache = self.started()
        self.assertEqual((cache.stats.corrupt_dropped, cache.stats.entries), (1, 0))

    def test_scan_reads_metadata_longer_than_its_first_read(self) -> None:
        long_url = "https://images.example/" + "p" * 6000
        key = variant_key(long_url, 1)
        stored = self.make_cache().put(key, b"img", "image/png", long_url)
        cache = self.started()
        self.assertEqual(cache.get(key), stored)


class CodecTests(SynchronousTestCase):
    def test_encode_then_decode_round_trips(self) -> None:
        key = variant_key(URL_A, 1)
        data, entry = encode_entry(key, b"body", "image/png", 12.5, URL_A)
        self.assertEqual(decode_entry(key, data), entry)
        meta, offset = decode_meta(data[:-4])  # the header and metadata alone suffice
        self.assertEqual((meta.body_length, meta.created, offset), (4, 12.5, len(data) - 4))

    def test_garbage_never_decodes(self) -> None:
        key = variant_key(URL_A, 1)
        data, _ = encode_entry(key, b"body", "image/png", 12.5, URL_A)
        for blob in (b"", b"IPXC", data[: HEADER_SIZE + 3], os.urandom(300), b"\x00" * 64):
            self.assertIsNone(decode_entry(key, blob))
        self.assertIsNone(decode_entry(variant_key(URL_A, 2), data))

    def test_malformed_metadata_never_raises(self) -> None:
        key = variant_key(URL_A, 1)
        for meta in (b"\x93\x01\x02\x03", b"\xc1", b"\x92\xa1a\xa1b", b"\x97" + b"\xc0" * 7):
            header = b"IPXC\x01\x00\x00\x00" + len(meta).to_bytes(4, "big")
            self.assertIsNone(decode_meta(header + meta))
            self.assertIsNone(decode_entry(key, header + meta))


class PurgeTests(CacheTestCase):
    def fill(self, cache: DiskCache, url: str) -> list[str]:
        keys = [source_cache_key(source_key_of(url)), variant_key(url, 1), variant_key(url, 2)]
        for key in keys:
            cache.put(key, b"img", "image/png", url)
        return keys

    def test_purge_removes_the_source_and_its_variants_only(self) -> None:
        cache = self.make_cache()
        purged = self.fill(cache, URL_A)
        kept = self.fill(cache, URL_B)
        self.assertEqual(cache.purge_source(source_key_of(URL_A)), 3)
        for key in purged:
            self.assertIsNone(cache.get_stale_ok(key))
            self.assertFalse(os.path.exists(self.file_of(key)))
        self.assertFalse(os.path.exists(os.path.dirname(self.file_of(purged[0]))))
        for key in kept:
            self.assertIsNotNone(cache.get(key))
        self.assertEqual(sorted(cache.keys()), sorted(kept))
        self.assertEqual(cache.stats.bytes, sum(map(os.path.getsize, entry_files(self.root))))

    def test_purge_reaches_entries_not_yet_scanned(self) -> None:
        self.fill(self.make_cache(), URL_A)
        cache = self.make_cache(cooperator=stepping_cooperator()[0])
        cache.start()
        self.assertEqual(cache.purge_source(source_key_of(URL_A)), 3)
        self.assertEqual(entry_files(self.root), [])

    def test_purging_an_absent_source_removes_nothing(self) -> None:
        cache = self.make_cache()
        kept = self.fill(cache, URL_B)
        self.assertEqual(cache.purge_source(source_key_of(URL_A)), 0)
        self.assertEqual(sorted(cache.keys()), sorted(kept))

    def test_purge_refuses_what_is_not_a_source_key(self) -> None:
        self.assertRaises(ValueError, self.make_cache().purge_source, "../..")


class FailingDiskTests(CacheTestCase):
    def mount_tmpfs(self, size: str = "64k") -> str:
        if os.geteuid() != 0:
            raise SkipTest("mounting a tmpfs needs root")
        path = self.tempdir()
        os.makedirs(path)
        mounted = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", path],
            capture_output=True,
            text=True,
        )
        if mounted.returncode != 0:
            raise SkipTest(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
        self.addCleanup(subprocess.run, ["umount", "-l", path], capture_output=True)
        return path

    def remount_read_only(self, root: str) -> None:
        """Make the tmpfs at ``root`` read-only (writable again after the test)."""
        remount = ["mount", "-o", "remount,ro", root]
        if subprocess.run(remount, capture_output=True).returncode != 0:
            raise SkipTest("cannot remount the tmpfs read-only")
        self.addCleanup(subprocess.run, ["mount", "-o", "remount,rw", root], capture_output=True)

    def remount_writable(self, root: str) -> None:
        subprocess.run(["mount", "-o", "remount,rw", root], check=True)

    def fill_disk(self, root: str) -> str:
        filler = os.path.join(root, "filler")
        with open(filler, "wb", buffering=0) as f:
            try:
                while True:
                    f.write(b"\0" * 1024)
            except OSError as e:
                self.assertEqual(e.errno, errno.ENOSPC)
        return filler

    def assertNotCached(self, cache: DiskCache, entry: CacheEntry, body: bytes) -> None:
        self.assertEqual(entry.body, body)
        self.assertIsNone(cache.get(entry.key))
        self.assertNotIn(entry.key, list(cache.keys()))

    def test_full_disk_put_serves_uncached_then_recovers(self) -> None:
        root = self.mount_tmpfs()
        cache = self.make_cache(root=root, max_bytes=10 << 20)
        filler = self.fill_disk(root)
        body = os.urandom(8000)
        with capturedLogs() as events:
            first = cache.put(variant_key(URL_A, 1), body, "image/png", URL_A)
            second = cache.put(variant_key(URL_A, 2), body, "image/png", URL_A)
        self.assertNotCached(cache, first, body)
        self.assertNotCached(cache, second, body)
        self.assertEqual(cache.stats.write_errors, 2)
        self.assertEqual((cache.stats.entries, cache.stats.bytes), (0, 0))
        warnings = [e for e in events if "failed" in e.get("log_format", "")]
        self.assertEqual(len(warnings), 1)
        self.assertEqual(warnings[0]["errno"], "ENOSPC")
        self.assertFalse([p for p in entry_files(root) if p.endswith(".tmp")])

        os.unlink(filler)
        again = cache.put(variant_key(URL_A, 1), body, "image/png", URL_A)
        self.assertEqual(cache.get(again.key), again)
        self.assertEqual(cache.stats.write_errors, 2)

    def test_a_disk_filled_by_the_cache_itself_frees_room_for_the_next_put(self) -> None:
        root = self.mount_tmpfs()
        cache = self.make_cache(root=root, max_bytes=10 << 20)  # more than the disk holds
        body = os.urandom(8000)
        keys = [variant_key(URL_A, width) for width in range(1, 40)]
        failed = next(
            index
            for index, key in enumerate(keys)
            if cache.put(key, body, "image/png", URL_A) and cache.stats.write_errors
        )
        self.assertEqual(cache.stats.write_errors, 1)
        self.assertNotIn(keys[failed], list(cache.keys()))
        self.assertEqual(cache.stats.evictions, 1)
        self.assertIsNone(cache.get(keys[0]))

        again = cache.put(keys[failed + 1], body, "image/png", URL_A)
        self.assertEqual(cache.get(again.key), again)
        self.assertEqual(cache.stats.write_errors, 1)
        self.assertEqual(cache.stats.entries, failed)

    def test_an_entry_larger_than_the_disk_evicts_nothing(self) -> None:
        # Evicting everything would not make it fit: the cache must not be wiped for it.
        root = self.mount_tmpfs(size="256k")
        cache = self.make_cache(root=root, max_bytes=10 << 20)
        small = [cache.put(variant_key(URL_A, w), os.urandom(4000), "image/png", URL_A)
                 for w in range(1, 11)]
        huge = cache.put(variant_key(URL_B, 1), os.urandom(400_000), "image/png", URL_B)
        self.assertNotCached(cache, huge, huge.body)
        self.assertEqual(cache.stats.write_errors, 1)
        self.assertEqual(cache.stats.evictions, 0)
        self.assertEqual([cache.get(entry.key) for entry in small], small)

    def test_read_only_filesystem_put_serves_uncached_then_recovers(self) -> None:
        root = self.mount_tmpfs(size="1m")
        cache = self.make_cache(root=root)
        kept = cache.put(variant_key(URL_A, 1), b"img", "image/png", URL_A)
        self.remount_read_only(root)
        lost = cache.put(variant_key(URL_B, 1), b"img", "image/png", URL_B)
        self.assertNotCached(cache, lost, b"img")
        self.assertEqual(cache.get(kept.key), kept)
        self.assertEqual(cache.stats.write_errors, 1)

        self.remount_writable(root)
        again = cache.put(variant_key(URL_B, 1), b"img", "image/png", URL_B)
        self.assertEqual(cache.get(again.key), again)

    def test_a_purge_that_cannot_remove_the_files_says_so(self) -> None:
        root = self.mount_tmpfs(size="1m")
        cache = self.make_cache(root=root)
        entry = cache.put(variant_key(URL_A, 1), b"img", "image/png", URL_A)
        self.remount_read_only(root)
        with self.assertRaises(PurgeIncomplete):
            cache.purge_source(source_key_of(URL_A))
        # Not served by this process again, but its file is still there for a restart.
        self.assertIsNone(cache.get(entry.key))
        self.remount_writable(root)
        self.assertEqual(self.started(root=root).get(entry.key), entry)

    def test_read_only_directory_put_serves_uncached(self) -> None:
        if os.geteuid() == 0:
            raise SkipTest("root ignores directory permissions; the tmpfs tests cover this")
        cache = self.make_cache()
        key = variant_key(URL_A, 1)
        cache.put(key, b"img", "image/png", URL_A)
        directory = os.path.dirname(self.file_of(key))
        os.chmod(directory, 0o555)
        self.addCleanup(os.chmod, directory, 0o755)
        lost = cache.put(variant_key(URL_A, 2), b"img", "image/png", URL_A)
        self.assertNotCached(cache, lost, b"img")
        self.assertEqual(cache.stats.write_errors, 1)

    def test_a_failing_rename_leaves_no_temporary_file_and_keeps_the_old_entry(self) -> None:
        cache = self.make_cache(memory_bytes=0)
        key = variant_key(URL_A, 1)
        old = cache.put(key, b"old", "image/png", URL_A)

        def permission_denied(source: str, destination: str) -> None:
            raise OSError(errno.EACCES, os.strerror(errno.EACCES), destination)

        self.patch(cache_module.os, "replace", permission_denied)
        cache.put(key, b"new", "image/png", URL_A)
        self.assertEqual(cache.get(key), old)
        self.assertEqual(cache.stats.write_errors, 1)
        self.assertEqual(entry_files(self.root), [self.file_of(key)])

    def test_one_warning_a_burst_of_failures(self) -> None:
        cache = self.make_cache()
        failing = [True]
        real_write = cache_module._write_file

        def write_file(*args: object) -> None:
            if failing[0]:
                raise OSError(errno.EROFS, os.strerror(errno.EROFS))
            real_write(*args)

        self.patch(cache_module, "_write_file", write_file)
        with capturedLogs() as events:
            for width in (1, 2, 3):
                cache.put(variant_key(URL_A, width), b"img", "image/png", URL_A)
            failing[0] = False
            cache.put(variant_key(URL_A, 4), b"img", "image/png", URL_A)
            failing[0] = True
            cache.put(variant_key(URL_A, 5), b"img", "image/png", URL_A)
        formats = [e["log_format"] for e in events]
        self.assertEqual(sum("failed (" in f for f in formats), 2)
        resumed = [e for e in events if "resumed" in e["log_format"]]
        self.assertEqual([e["failures"] for e in resumed], [3])
        self.assertEqual(cache.stats.write_errors, 4)
        self.assertEqual(list(cache.keys()), [variant_key(URL_A, 4)])


class KeyHelperTests(SynchronousTestCase):
    def test_source_key_sits_beside_its_variants(self) -> None:
        source = source_key_of(URL_A)
        self.assertEqual(source_cache_key(source), f"{source}/source")
        self.assertEqual(variant_key(URL_A, 5).split("/")[0], source)
        self.assertIsNotNone(re.fullmatch(r"[0-9a-f]{64}/[0-9a-f]{32}", variant_key(URL_A, 5)))
