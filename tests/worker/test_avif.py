"""AVIF boxes read and written by hand: play counts, no wall clock, hostile input."""

from __future__ import annotations

import struct

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from imgproxy.worker import avif
from tests.worker import images


def sequence() -> bytes:
    frames = images.animation_frames(2, 16, 16)
    return images.encode(frames[0], "AVIF", save_all=True, append_images=frames[1:], duration=50)


class PlayCountTests(SynchronousTestCase):
    def test_libavif_writes_for_ever(self) -> None:
        self.assertEqual(avif.plays(sequence()), avif.FOREVER)

    def test_a_count_written_is_the_count_read(self) -> None:
        for count in (1, 2, 3, 1000, avif.FOREVER):
            self.assertEqual(avif.plays(avif.finish_sequence(sequence(), count)), count)

    def test_the_file_keeps_its_size_and_still_decodes(self) -> None:
        source = sequence()
        finished = avif.finish_sequence(source, 3)
        self.assertEqual(len(finished), len(source))
        self.assertEqual(images.decode(finished).n_frames, 2)

    def test_a_still_image_is_left_alone(self) -> None:
        still = images.encode(images.photo(16, 16), "AVIF")
        self.assertEqual(avif.finish_sequence(still, 3), still)

    def test_every_truncation_reads_without_error(self) -> None:
        source = avif.finish_sequence(sequence(), 3)
        for end in range(len(source)):
            self.assertIn(avif.plays(source[:end]), range(0, 4))

    @settings(max_examples=300, deadline=None)
    @given(st.binary(max_size=512))
    def test_any_bytes_in_a_moov_box_are_read_without_error(self, data: bytes) -> None:
        # The box holds all of the data, so every byte of it is walked as boxes.
        moov = struct.pack(">I", 8 + len(data)) + b"moov" + data
        self.assertGreaterEqual(avif.plays(moov), avif.FOREVER)
