"""The allocator settings take on this machine's glibc."""

from __future__ import annotations

import sys

from twisted.trial.unittest import SkipTest, SynchronousTestCase

from imgproxy.memory import release_free_memory, tune_allocator


class AllocatorTests(SynchronousTestCase):
    def test_settings_take_on_glibc(self) -> None:
        if not sys.platform.startswith("linux"):
            raise SkipTest("glibc's mallopt is Linux-only")
        self.assertTrue(tune_allocator())

    def test_trim_is_safe_to_call_any_time(self) -> None:
        blocks = [bytearray(4 << 20) for _ in range(4)]
        del blocks
        release_free_memory()
