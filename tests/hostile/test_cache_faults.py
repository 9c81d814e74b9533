"""Cache faults against the real process: corrupted files on disk and a disk that fills up.

A corrupted entry (truncated, or one byte flipped) must never be served: the
next request gets a correct image and the origin is asked again. A full cache
volume (a 256 KiB tmpfs this test mounts) must cost caching only: responses are
still served, the failure is logged and counted in ``/metrics``, and caching
resumes when space returns.
"""

from __future__ import annotations

import errno
import os
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred
from twisted.trial.unittest import SkipTest, TestCase

from imgproxy.params import source_key_of
from tests.hostile import PERMISSIVE, image_path, live_reactor, metric, shared_proxy
from tests.hostile.origin import HostileOrigin, decode, noise_png
from tests.processes import ImgproxyProcess, Reply, spawn_imgproxy

# Over the cache's 512 KiB in-memory limit, so every hit reads the file; under PERMISSIVE's 1 MiB.
BIG_SIDE = 450


def entry_files(cache_dir: Path, url: str) -> list[Path]:
    """The cache files of ``url``'s source and variants."""
    key = source_key_of(url)
    directory = cache_dir / key[0:2] / key[2:4] / key
    return sorted(path for path in directory.iterdir() if not path.name.startswith("."))


def flip_byte(path: Path) -> None:
    """Invert one byte in the middle of ``path``, keeping its size."""
    with open(path, "r+b") as file:
        size = file.seek(0, os.SEEK_END)
        file.seek(size // 2)
        byte = file.read(1)
        file.seek(size // 2)
        file.write(bytes([byte[0] ^ 0xFF]))


def truncate(path: Path) -> None:
    """Cut ``path`` to half its size."""
    os.truncate(path, path.stat().st_size // 2)


class CacheFaultTestCase(TestCase):
    timeout = 120

    def setUp(self) -> Deferred[None]:
        self.reactor = live_reactor()
        return HostileOrigin.start(self.reactor).addCallback(self._started)

    def _started(self, origin: HostileOrigin) -> None:
        self.origin = origin
        self.addCleanup(origin.stop)

    def get(self, proxy: ImgproxyProcess, url: str) -> Deferred[Reply]:
        return proxy.request_async(self.reactor, image_path(url, format="png"))

    async def metrics(self, proxy: ImgproxyProcess) -> str:
        reply = await proxy.request_async(self.reactor, "/metrics")
        self.assertEqual(reply.status, 200)
        return reply.body.decode("utf-8")

    async def assert_served(
        self, proxy: ImgproxyProcess, url: str, source: bytes, cache: str
    ) -> Reply:
        """A 200 with X-Cache ``cache`` whose pixels are exactly the source's."""
        reply = await self.get(proxy, url)
        self.assertEqual(reply.status, 200, reply.body[:200])
        self.assertEqual(reply.header("x-cache"), cache, url)
        self.assertEqual(decode(reply.body).tobytes(), decode(source).convert("RGB").tobytes())
        return reply


class CorruptEntryTests(CacheFaultTestCase):
    """A damaged file on disk is detected, dropped and refetched, never served."""

    async def damage_while_running(self, damage: Any) -> None:
        proxy = shared_proxy(*PERMISSIVE)
        source = noise_png(BIG_SIDE, BIG_SIDE, seed=len(self.id()))
        path = self.origin.serve("/big.png", source)
        url = self.origin.url(path)
        await self.assert_served(proxy, url, source, "MISS")
        await self.assert_served(proxy, url, source, "HIT")  # read back from the file
        dropped_before = metric(await self.metrics(proxy), "imgproxy_cache_corrupt_dropped_total")
        files = entry_files(proxy.cache_dir, url)
        self.assertEqual([f.name for f in files][-1], "source")
        self.assertEqual(len(files), 2)
        for file in files:
            damage(file)
        await self.assert_served(proxy, url, source, "MISS")
        self.assertEqual(self.origin.hits(path), 2)  # the source was fetched again
        await self.assert_served(proxy, url, source, "HIT")  # and cached again, whole
        dropped_after = metric(await self.metrics(proxy), "imgproxy_cache_corrupt_dropped_total")
        self.assertGreaterEqual(dropped_after - dropped_before, 2)

    def test_bit_flipped_entry_is_refetched_not_served(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self.damage_while_running(flip_byte))

    def test_truncated_entry_is_refetched_not_served(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self.damage_while_running(truncate))

    async def test_damage_done_while_stopped_is_found_after_a_restart(self) -> None:
        proxy = spawn_imgproxy(self, "--allow-private-sources")
        images = {name: noise_png(40, 30, seed=seed) for seed, name in enumerate(
            ("intact", "flipped", "truncated", "emptied"))}
        urls = {name: self.origin.url(self.origin.serve(f"/{name}.png", body))
                for name, body in images.items()}
        for name, url in urls.items():
            await self.assert_served(proxy, url, images[name], "MISS")
        proxy.stop()
        for file in entry_files(proxy.cache_dir, urls["flipped"]):
            flip_byte(file)
        for file in entry_files(proxy.cache_dir, urls["truncated"]):
            truncate(file)
        for file in entry_files(proxy.cache_dir, urls["emptied"]):
            os.truncate(file, 0)
        proxy.start()
        await self.assert_served(proxy, urls["intact"], images["intact"], "HIT")
        for name in ("flipped", "truncated", "emptied"):
            await self.assert_served(proxy, urls[name], images[name], "MISS")
            self.assertEqual(self.origin.hits(f"/{name}.png"), 2, name)
        self.assertEqual(self.origin.hits("/intact.png"), 1)


class FullDiskTests(CacheFaultTestCase):
    """The cache directory on a 256 KiB tmpfs that fills up."""

    def mount_tmpfs(self, size: str) -> Path:
        directory = Path(tempfile.mkdtemp(prefix="imgproxy-tmpfs-"))
        self.addCleanup(directory.rmdir)
        mounted = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(directory)],
            capture_output=True,
            text=True,
        )
        if mounted.returncode != 0:
            raise SkipTest(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
        self.addCleanup(subprocess.run, ["umount", "-l", str(directory)], check=True)
        return directory

    async def test_a_full_disk_serves_uncached_counts_and_recovers(self) -> None:
        volume = self.mount_tmpfs("256k")
        cache_dir = volume / "cache"
        proxy = spawn_imgproxy(self, "--allow-private-sources", cache_dir=cache_dir)
        # 1. Someone else's file fills the volume: nothing can be cached.
        fill_up(volume / "ballast")
        first = noise_png(40, 40, seed=100)
        path = self.origin.serve("/while-full.png", first)
        url = self.origin.url(path)
        await self.assert_served(proxy, url, first, "MISS")
        await self.assert_served(proxy, url, first, "MISS")  # not cached...
        self.assertEqual(self.origin.hits(path), 2)  # ...so fetched again
        errors = metric(await self.metrics(proxy), "imgproxy_cache_write_errors_total")
        self.assertGreaterEqual(errors, 2)
        self.assertIn("cache write of", proxy.log_text())
        self.assertIn("ENOSPC", proxy.log_text())
        # 2. The space returns: caching resumes by itself.
        (volume / "ballast").unlink()
        second = noise_png(40, 40, seed=101)
        url = self.origin.url(self.origin.serve("/after-space.png", second))
        await self.assert_served(proxy, url, second, "MISS")
        await self.assert_served(proxy, url, second, "HIT")
        # 3. Our own entries fill it (the cap is 1 GB): the oldest give way, all is served.
        bodies = [noise_png(110, 110, seed=200 + i) for i in range(8)]  # ~36 KB each, x2 files
        for i, body in enumerate(bodies):
            await self.assert_served(proxy, self.origin.url(
                self.origin.serve(f"/own-{i}.png", body)), body, "MISS")
        text = await self.metrics(proxy)
        self.assertGreater(metric(text, "imgproxy_cache_write_errors_total"), errors)
        last = self.origin.url("/own-7.png")
        await self.assert_served(proxy, last, bodies[-1], "HIT")
        # 4. The volume grows: caching goes on, without new write errors.
        subprocess.run(["mount", "-o", "remount,size=4m", str(volume)], check=True)
        errors = metric(await self.metrics(proxy), "imgproxy_cache_write_errors_total")
        for i, body in enumerate(bodies):
            url = self.origin.url(self.origin.serve(f"/grown-{i}.png", body))
            await self.assert_served(proxy, url, body, "MISS")
            await self.assert_served(proxy, url, body, "HIT")
        text = await self.metrics(proxy)
        self.assertEqual(metric(text, "imgproxy_cache_write_errors_total"), errors)
        self.assertTrue(proxy.running)


def fill_up(path: Path) -> None:
    """Write ``path`` until the volume has no space left."""
    with open(path, "wb", buffering=0) as file:
        try:
            while True:
                file.write(b"\x00" * 4096)
        except OSError as e:
            if e.errno != errno.ENOSPC:
                raise
