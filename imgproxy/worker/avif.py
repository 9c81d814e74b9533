"""The parts of an AVIF file that Pillow neither reads nor writes, read from its ISO BMFF boxes.

Pure byte work: the canvas size of a still image, before decoding; how many times
an image sequence plays; and the finishing touches a sequence needs after
Pillow's libavif has written it (its play count, and no wall-clock times).
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterator

#: A play count: how many times an animation plays in all, 0 for ever.
FOREVER = 0

# ISO/IEC 14496-12 marks a track duration as unknown or indefinite with all ones.
_INDEFINITE = {4: 0xFFFFFFFF, 8: 0xFFFFFFFFFFFFFFFF}


def boxes(data: bytes, start: int, end: int) -> Iterator[tuple[bytes, int, int]]:
    """(type, body start, body end) of the ISO BMFF boxes in ``data[start:end]``."""
    position = start
    while position + 8 <= end:
        size, kind = struct.unpack(">I4s", data[position : position + 8])
        body = position + 8
        if size == 1 and body + 8 <= end:
            (size,) = struct.unpack(">Q", data[body : body + 8])
            body += 8
        elif size == 0:
            size = end - position
        if size < body - position or position + size > end:
            return
        yield kind, body, position + size
        position += size


def _children(data: bytes, start: int, end: int, kind: bytes) -> Iterator[tuple[int, int]]:
    for found, body_start, body_end in boxes(data, start, end):
        if found == kind:
            yield body_start, body_end


def _child(data: bytes, start: int, end: int, kind: bytes) -> tuple[int, int] | None:
    return next(_children(data, start, end, kind), None)


def still_size(data: bytes) -> tuple[int, int] | None:
    """The largest extent a still AVIF declares (a grid image's is the whole canvas)."""
    # meta (a full box) > iprp > ipco > ispe
    sizes = []
    for meta_start, meta_end in _children(data, 0, len(data), b"meta"):
        for iprp_start, iprp_end in _children(data, meta_start + 4, meta_end, b"iprp"):
            for ipco_start, ipco_end in _children(data, iprp_start, iprp_end, b"ipco"):
                for start, end in _children(data, ipco_start, ipco_end, b"ispe"):
                    if end - start >= 12:
                        sizes.append(struct.unpack(">II", data[start + 4 : start + 12]))
    return max(sizes, key=lambda size: size[0] * size[1], default=None)


def _uint(data: bytes | bytearray, offset: int, width: int) -> int:
    return int.from_bytes(data[offset : offset + width], "big")


def _header_fields(data: bytes | bytearray, start: int) -> tuple[int, int, int]:
    """(width of the time fields, offset of creation_time, offset of the field after
    modification_time) in an mvhd, tkhd or mdhd body at ``start``."""
    width = 8 if data[start] == 1 else 4
    return width, start + 4, start + 4 + 2 * width


def _track_duration_field(data: bytes | bytearray, tkhd_start: int) -> tuple[int, int]:
    """(offset, width) of a tkhd's duration: after the times, track_ID and a reserved word."""
    width, _, after_times = _header_fields(data, tkhd_start)
    return after_times + 8, width


def _edit_list(data: bytes | bytearray, elst_start: int) -> tuple[int, int]:
    """(flags, duration of the one edit) of an elst body."""
    flags = _uint(data, elst_start + 1, 3)
    width = 8 if data[elst_start] == 1 else 4
    return flags, _uint(data, elst_start + 8, width)


def plays(data: bytes) -> int:
    """How many times an AVIF image sequence plays in all: ``FOREVER`` (0), 1, 2, ...

    The sequence repeats when its edit list's first flag is set, as many times as
    the edit fits into the track's duration, or for ever when that duration is
    indefinite (ISO/IEC 23008-12, 9.6.1).  A sequence without an edit list gives
    no count: players loop it, so that is read as ``FOREVER`` too.
    """
    try:
        moov = _child(data, 0, len(data), b"moov")
        if moov is None:
            return FOREVER
        trak = _child(data, *moov, b"trak")
        if trak is None:
            return FOREVER
        tkhd = _child(data, *trak, b"tkhd")
        edts = _child(data, *trak, b"edts")
        elst = _child(data, *edts, b"elst") if edts is not None else None
        if tkhd is None or elst is None:
            return FOREVER
        flags, edit_duration = _edit_list(data, elst[0])
        if not flags & 1:
            return 1
        offset, width = _track_duration_field(data, tkhd[0])
        track_duration = _uint(data, offset, width)
        if track_duration == _INDEFINITE[width] or edit_duration == 0:
            return FOREVER
        return max(1, math.ceil(track_duration / edit_duration))
    except IndexError:
        return FOREVER


def finish_sequence(data: bytes, play_count: int) -> bytes:
    """An AVIF image sequence written by libavif, made to play ``play_count`` times
    (``FOREVER``, 1, 2, ...) and stamped with no creation or modification time.

    libavif writes the wall clock into every header, so the same frames would
    give different bytes, and a different ETag, each time they are encoded; and
    Pillow gives it no repetition count, so it always writes "for ever".  The
    boxes keep their sizes: only fields change.
    """
    out = bytearray(data)
    moov = _child(data, 0, len(data), b"moov")
    if moov is None:
        return data
    mvhd = _child(data, *moov, b"mvhd")
    if mvhd is not None:
        _clear_times(out, mvhd[0])
    movie_duration = None
    for trak_start, trak_end in _children(data, *moov, b"trak"):
        tkhd = _child(data, trak_start, trak_end, b"tkhd")
        edts = _child(data, trak_start, trak_end, b"edts")
        elst = _child(data, *edts, b"elst") if edts is not None else None
        mdia = _child(data, trak_start, trak_end, b"mdia")
        mdhd = _child(data, *mdia, b"mdhd") if mdia is not None else None
        if mdhd is not None:
            _clear_times(out, mdhd[0])
        if tkhd is None:
            continue
        _clear_times(out, tkhd[0])
        if elst is None or play_count == FOREVER:
            continue
        _, edit_duration = _edit_list(data, elst[0])
        # libavif's own encoding of a count: the edit repeats (flag 1) unless the
        # sequence plays once, and the track lasts as long as all the plays.
        out[elst[0] + 3] = out[elst[0] + 3] & 0xFE | (play_count > 1)
        movie_duration = edit_duration * play_count
        _write_duration(out, *_track_duration_field(data, tkhd[0]), movie_duration)
    if mvhd is not None and movie_duration is not None:
        width, _, after_times = _header_fields(data, mvhd[0])
        _write_duration(out, after_times + 4, width, movie_duration)  # after the timescale
    return bytes(out)


def _write_duration(out: bytearray, offset: int, width: int, duration: int) -> None:
    # All ones would mean "indefinite": a finite count stays just below.
    out[offset : offset + width] = min(duration, _INDEFINITE[width] - 1).to_bytes(width, "big")


def _clear_times(out: bytearray, header_start: int) -> None:
    _, times, after_times = _header_fields(out, header_start)
    out[times:after_times] = bytes(after_times - times)
