"""Trimming freed memory is safe at any time."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from imgproxy.memory import _LIBC, release_free_memory


class TrimTests(SynchronousTestCase):
    def test_glibc_trim_is_found_on_linux(self) -> None:
        import sys

        if sys.platform.startswith("linux"):
            self.assertIsNotNone(_LIBC)

    def test_trim_is_safe_to_call_any_time(self) -> None:
        blocks = [bytearray(4 << 20) for _ in range(4)]
        del blocks
        release_free_memory()
