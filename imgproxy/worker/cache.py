"""The aged on-disk cache of a worker: one checksummed file an entry, an LRU index in memory.

Layout: every entry of one source lives in one directory, so a purge is one removal::

    root/<sk[0:2]>/<sk[2:4]>/<sk>/<variant digest or "source">

Each file is a fixed header, msgpack metadata and the body (see ``encode_entry``). Files are
written to a temporary name in the same directory and renamed over the final one, so a reader
sees the old file or the new one, never half of either. No ``fsync`` by default: it made a
10 KB put 2-5x slower on ext4 here (0.6 ms -> 1.2-2.8 ms), and a file torn by a power loss is
caught by the size check at start-up or the checksum on read and dropped, never served; the
price is only that the entry may be lost. ``fsync=True`` buys durability back.

A put that fails (disk full, read-only, quota, permissions) is counted and logged once a
burst; the caller serves the body uncached. When the disk is full, the least recently used
entries make room, since our own files may be what fills it.

The index (key -> size, created) lives in memory and is the only thing a miss touches. It is
rebuilt from the headers at start-up by a cooperative scan, newest files first, so the hot
entries come back first while the reactor keeps serving.

One process owns one cache directory.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import re
import stat
import struct
from collections import OrderedDict
from collections.abc import Iterable, Iterator

import attrs
import msgpack
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import Cooperator
from twisted.logger import Logger

# magic, format version, flags (unused), reserved, metadata length
_HEADER = struct.Struct(">4sBBHI")
_MAGIC = b"IPXC"
_VERSION = 1
HEADER_SIZE = _HEADER.size

_SOURCE_KEY = re.compile(r"[0-9a-f]{64}\Z")
_VARIANT_NAME = re.compile(r"(?:[0-9a-f]{32}|source)\Z")
_ENTRY_KEY = re.compile(r"[0-9a-f]{64}/(?:[0-9a-f]{32}|source)\Z")
_SHARD = re.compile(r"[0-9a-f]{2}\Z")
_TEMP_SUFFIX = ".tmp"
#: Held (flock) by the process that uses the directory.
LOCK_FILE = ".lock"
#: Holds the time before which every entry is stale (``invalidate_all``).
NOT_BEFORE_FILE = "not-before"
# O_NONBLOCK: opening a FIFO (or a device) put in the cache directory must not
# block the reactor; a regular file ignores the flag. What it reads is then
# refused as corrupt, and the path removed.
_READ_FLAGS = os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK

# Metadata is small (the URL is at most 8 KiB); the scan reads this much in one call.
_HEAD_READ = 4096


def read_small_file(path: str, limit: int) -> bytes:
    """The first ``limit`` bytes of a regular file in the cache directory (the node's own
    bookkeeping); ``OSError`` for anything else there, which is never waited on."""
    fd = os.open(path, _READ_FLAGS)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(f"{path} is not a regular file")
        return os.read(fd, limit)
    finally:
        os.close(fd)


def write_small_file(path: str, data: bytes) -> None:
    """Replace ``path`` with ``data`` atomically (a reader sees the old or the new)."""
    temporary = f"{path}.{os.getpid()}.tmp"
    with open(temporary, "wb") as out:
        out.write(data)
    os.replace(temporary, path)


class PurgeIncomplete(Exception):
    """Some of a purged source's files are still on disk (a read-only or failing disk)."""


def source_cache_key(source_key: str) -> str:
    """The cache key of a source's original bytes, in the same directory as its variants."""
    return f"{source_key}/source"


def etag_of(digest: bytes) -> str:
    """The quoted strong ETag of a body, from its SHA-256."""
    return '"' + digest[:16].hex() + '"'


@attrs.frozen
class CacheEntry:
    """One cached body and what the HTTP layer needs to serve it."""

    key: str
    body: bytes
    content_type: str
    created: float
    etag: str
    source_url: str


@attrs.frozen
class CacheStats:
    """Counters since start; ``entries`` and ``bytes`` are the current index."""

    entries: int = 0
    bytes: int = 0
    hits: int = 0
    misses: int = 0  # every lookup that returned None: absent, stale or corrupt
    evictions: int = 0
    stale: int = 0
    corrupt_dropped: int = 0
    write_errors: int = 0
    memory_entries: int = 0
    memory_bytes: int = 0


@attrs.frozen
class EntryMeta:
    """The metadata block of an entry file."""

    key: str
    content_type: str
    created: float
    etag: str
    source_url: str
    body_length: int
    checksum: bytes


def encode_entry(
    key: str, body: bytes, content_type: str, created: float, source_url: str
) -> tuple[bytes, CacheEntry]:
    """The file image of an entry (header, metadata, body) and the entry it stores."""
    digest = hashlib.sha256(body).digest()
    etag = etag_of(digest)
    meta = msgpack.packb(
        [key, content_type, created, etag, source_url, len(body), digest], use_bin_type=True
    )
    data = b"".join((_HEADER.pack(_MAGIC, _VERSION, 0, 0, len(meta)), meta, body))
    return data, CacheEntry(key, body, content_type, created, etag, source_url)


def decode_meta(head: bytes) -> tuple[EntryMeta, int] | None:
    """The metadata at the start of an entry file and the body's offset, or None if malformed.

    ``head`` must hold at least the header and the metadata; the body may be absent.
    """
    if len(head) < HEADER_SIZE:
        return None
    magic, version, _flags, _reserved, meta_length = _HEADER.unpack_from(head)
    offset = HEADER_SIZE + meta_length
    if magic != _MAGIC or version != _VERSION or len(head) < offset:
        return None
    try:
        fields = msgpack.unpackb(memoryview(head)[HEADER_SIZE:offset], raw=False)
        meta = EntryMeta(*fields)
    except Exception:
        # Whatever the bytes on disk are, a bad file is a miss, not a crash.
        return None
    if not (
        isinstance(meta.key, str)
        and isinstance(meta.content_type, str)
        and isinstance(meta.created, float | int)
        and isinstance(meta.etag, str)
        and isinstance(meta.source_url, str)
        and isinstance(meta.body_length, int)
        and isinstance(meta.checksum, bytes)
    ):
        return None
    return meta, offset


def decode_entry(key: str, data: bytes) -> CacheEntry | None:
    """The entry in a whole file image, or None unless key, length and checksum all agree."""
    decoded = decode_meta(data)
    if decoded is None:
        return None
    meta, offset = decoded
    if meta.key != key or len(data) - offset != meta.body_length:
        return None
    body = data[offset:]
    if hashlib.sha256(body).digest() != meta.checksum:
        return None
    return CacheEntry(key, body, meta.content_type, float(meta.created), meta.etag, meta.source_url)


def _write_file(directory: str, temp_name: str, path: str, data: bytes, fsync: bool) -> None:
    """Write ``data`` to ``path`` atomically through a temporary file in the same directory.

    Raises ``OSError``; the temporary file never survives a failure.
    """
    temp = f"{directory}/{temp_name}"
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
    try:
        fd = os.open(temp, flags, 0o644)
    except FileNotFoundError:
        os.makedirs(directory, exist_ok=True)
        fd = os.open(temp, flags, 0o644)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            if fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temp, path)
    except BaseException:
        try:
            os.unlink(temp)
        except OSError:
            pass
        raise


class DiskCache:
    """An LRU-capped, TTL-aged cache of bodies on disk, small hot ones also in memory.

    ``get`` never raises and never serves a body whose length or checksum is wrong; ``put``
    never raises for an I/O failure (the disk full, read-only, ...), it counts it and the
    caller serves uncached.

    ``max_bytes`` caps the files (headers and bodies); ``ttl`` is the age in ``clock``
    seconds at which ``get`` stops returning an entry (``get_stale_ok`` still does);
    ``cooperator`` runs the start-up scan (default: one on ``clock``), ``scan_batch`` files
    a step; bodies up to ``memory_entry_limit`` are also kept in memory, ``memory_bytes`` in
    all; ``fsync`` makes every put durable at a price.
    """

    _log = Logger()

    def __init__(
        self,
        root: str,
        max_bytes: int,
        ttl: float,
        clock: IReactorTime,
        cooperator: Cooperator | None = None,
        memory_bytes: int = 64 << 20,
        memory_entry_limit: int = 512 << 10,
        *,
        scan_batch: int = 64,
        fsync: bool = False,
    ) -> None:
        self._root = os.path.abspath(root)
        self._max_bytes = max_bytes
        self._ttl = ttl
        self._clock = clock
        self._cooperator = cooperator
        self._memory_limit = memory_bytes
        self._memory_entry_limit = memory_entry_limit
        self._scan_batch = max(1, scan_batch)
        self._fsync = fsync
        # key -> (file size, created); order is least recently used first
        self._index: OrderedDict[str, tuple[int, float]] = OrderedDict()
        self._bytes = 0
        self._memory: OrderedDict[str, CacheEntry] = OrderedDict()
        self._memory_used = 0
        self._hits = 0
        self._misses = 0
        self._evictions = 0
        self._stale = 0
        self._corrupt = 0
        self._write_errors = 0
        self._failing_writes = 0  # failures since the last successful write
        self._temp_counter = 0
        self._started = False
        self._lock_fd: int | None = None
        # Entries created before this are stale whatever their age (``invalidate_all``).
        self._not_before = 0.0

    # -- lookups: the hot path -------------------------------------------------------------

    def get(self, key: str) -> CacheEntry | None:
        """The fresh entry for ``key``, or None (absent, stale or corrupt)."""
        slot = self._index.get(key)
        if slot is None:
            self._misses += 1
            return None
        if self._clock.seconds() - slot[1] >= self._ttl or slot[1] < self._not_before:
            self._stale += 1
            self._misses += 1
            return None
        return self._serve(key, slot[0])

    def get_stale_ok(self, key: str) -> CacheEntry | None:
        """The entry for ``key`` however old, or None: for handing entries between workers."""
        slot = self._index.get(key)
        if slot is None or slot[1] < self._not_before:
            self._misses += 1
            return None
        return self._serve(key, slot[0])

    def _serve(self, key: str, size: int) -> CacheEntry | None:
        self._index.move_to_end(key)
        entry = self._memory.get(key)
        if entry is not None:
            self._memory.move_to_end(key)
            self._hits += 1
            return entry
        entry = self._read(key, size)
        if entry is None:
            self._misses += 1
            return None
        self._hits += 1
        self._remember(entry)
        return entry

    def _read(self, key: str, size: int) -> CacheEntry | None:
        path = self._path(key)
        try:
            fd = os.open(path, _READ_FLAGS)
            try:
                # One byte more than expected tells a grown file from a whole one.
                data = os.read(fd, size + 1)
            finally:
                os.close(fd)
        except OSError as e:
            self._drop_corrupt(key, path, f"unreadable: {e.strerror}")
            return None
        entry = decode_entry(key, data) if len(data) == size else None
        if entry is None:
            self._drop_corrupt(key, path, "length or checksum mismatch")
        return entry

    def _drop_corrupt(self, key: str, path: str, why: str) -> None:
        self._corrupt += 1
        self._forget(key)
        self._unlink(path)
        self._log.warn("dropped corrupt cache entry {key} ({why})", key=key, why=why)

    # -- stores ----------------------------------------------------------------------------

    def put(
        self,
        key: str,
        body: bytes,
        content_type: str,
        source_url: str,
        created: float | None = None,
        *,
        store: bool = True,
    ) -> CacheEntry:
        """Store ``body`` under ``key`` and return its entry.

        ``created`` (default: now) is when its content was fetched: a variant
        rendered from a cached source is as old as that source, and goes stale
        with it. The entry is returned even when it could not be stored (too big,
        or the disk failed): the caller serves it all the same. With ``store``
        false, only the entry is made (for content a purge overtook).
        """
        if not _ENTRY_KEY.match(key):
            raise ValueError(f"not a cache key: {key!r}")
        when = self._clock.seconds() if created is None else created
        data, entry = encode_entry(key, body, content_type, when, source_url)
        if not store:
            return entry
        size = len(data)
        if size > self._max_bytes:
            # The old body is superseded and the new one cannot be kept.
            self._discard(key)
            return entry
        path = self._path(key)
        directory, _, name = path.rpartition("/")
        self._temp_counter += 1
        temp_name = f".{name}.{os.getpid()}.{self._temp_counter}{_TEMP_SUFFIX}"
        try:
            _write_file(directory, temp_name, path, data, self._fsync)
        except OSError as e:
            self._write_failed(key, e)
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                self._make_room(directory, size)
            return entry
        if self._failing_writes:
            self._log.info(
                "cache writes resumed after {failures} failed", failures=self._failing_writes
            )
            self._failing_writes = 0
        self._forget(key)
        self._index[key] = (size, entry.created)
        self._bytes += size
        self._remember(entry)
        self._evict_to(self._max_bytes)
        return entry

    def _make_room(self, directory: str, size: int) -> None:
        """After a full disk refused ``size`` bytes: when our own files fill it (a cap
        larger than the volume), nothing else frees space, so give up the least
        recently used, as few as make the entry fit. If even all of them would not
        (an entry larger than what the disk holds for us), give up none."""
        try:
            stats = os.statvfs(directory)
            free, block = stats.f_bavail * stats.f_frsize, stats.f_frsize
        except OSError:
            free = block = 0
        # Plus a block: the file system's own rounding of the new file.
        missing = size - free + block
        if missing > self._bytes:
            return
        self._evict_to(max(0, self._bytes - missing))

    def _write_failed(self, key: str, error: OSError) -> None:
        self._write_errors += 1
        self._failing_writes += 1
        if self._failing_writes == 1:
            # One line a burst: a full disk fails every put until space returns.
            self._log.warn(
                "cache write of {key} failed ({errno}: {reason}); serving uncached until "
                "writes succeed again",
                key=key,
                errno=errno.errorcode.get(error.errno or 0, str(error.errno)),
                reason=error.strerror,
            )

    def _remember(self, entry: CacheEntry) -> None:
        length = len(entry.body)
        if length > self._memory_entry_limit or length > self._memory_limit:
            return
        old = self._memory.pop(entry.key, None)
        if old is not None:
            self._memory_used -= len(old.body)
        self._memory[entry.key] = entry
        self._memory_used += length
        while self._memory_used > self._memory_limit:
            _, dropped = self._memory.popitem(last=False)
            self._memory_used -= len(dropped.body)

    # -- removal ---------------------------------------------------------------------------

    def _forget(self, key: str) -> bool:
        """Remove ``key`` from the index and memory (not from disk)."""
        slot = self._index.pop(key, None)
        if slot is not None:
            self._bytes -= slot[0]
        entry = self._memory.pop(key, None)
        if entry is not None:
            self._memory_used -= len(entry.body)
        return slot is not None

    def _discard(self, key: str) -> None:
        self._forget(key)
        self._unlink(self._path(key))

    def _evict_to(self, limit: int) -> None:
        while self._bytes > limit and self._index:
            key, (size, _created) = self._index.popitem(last=False)
            self._bytes -= size
            entry = self._memory.pop(key, None)
            if entry is not None:
                self._memory_used -= len(entry.body)
            self._evictions += 1
            path = self._path(key)
            self._unlink(path)
            try:
                # Keeps the tree from filling with empty source directories.
                os.rmdir(path.rpartition("/")[0])
            except OSError:
                pass

    def _unlink(self, path: str) -> bool:
        """Remove ``path``; False (and a warning) if it is still there."""
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError as e:
            self._log.warn("could not remove {path}: {reason}", path=path, reason=e.strerror)
            return False
        return True

    def purge_source(self, source_key: str) -> int:
        """Remove a source and all its variants, from disk and index; how many entries went."""
        if not _SOURCE_KEY.match(source_key):
            raise ValueError(f"not a source key: {source_key!r}")
        directory = self._source_dir(source_key)
        failure: str | None = None
        try:
            names = os.listdir(directory)
        except FileNotFoundError:
            names = []
        except OSError as e:
            self._log.warn("could not list {path}: {reason}", path=directory, reason=e.strerror)
            names = []
            failure = f"its directory cannot be read ({e.strerror})"
        keys = {f"{source_key}/{name}" for name in names if _VARIANT_NAME.match(name)}
        # The source's own key may be indexed even if its file vanished behind our back.
        keys.update(k for k in (source_cache_key(source_key),) if k in self._index)
        if failure is not None:
            # Unlisted, its indexed entries go all the same (a walk of the index, on this
            # rare path): this process never serves them again, though a restart would
            # find their files, hence PurgeIncomplete.
            keys.update(key for key in self._index if key.startswith(source_key + "/"))
        for key in keys:
            self._forget(key)
        # The directory is flat (entries and temporary files), so no recursive removal.
        # An entry left behind would be served again after a restart; a temporary is not.
        stuck = 0
        for name in names:
            if not self._unlink(f"{directory}/{name}") and _VARIANT_NAME.match(name):
                stuck += 1
        if stuck:
            failure = f"{stuck} of its files cannot be removed"
        if failure is not None:
            raise PurgeIncomplete(failure)
        parent = directory
        for _level in range(3):
            try:
                os.rmdir(parent)
            except FileNotFoundError:
                pass
            except OSError:
                break  # not empty: other sources share the shard
            parent = os.path.dirname(parent)
        return len(keys)

    # -- inspection ------------------------------------------------------------------------

    def keys(self) -> Iterable[str]:
        """Every indexed key, stale ones included, least recently used first."""
        return list(self._index)

    @property
    def stats(self) -> CacheStats:
        """A snapshot of the counters."""
        return CacheStats(
            entries=len(self._index),
            bytes=self._bytes,
            hits=self._hits,
            misses=self._misses,
            evictions=self._evictions,
            stale=self._stale,
            corrupt_dropped=self._corrupt,
            write_errors=self._write_errors,
            memory_entries=len(self._memory),
            memory_bytes=self._memory_used,
        )

    # -- paths -----------------------------------------------------------------------------

    def _source_dir(self, source_key: str) -> str:
        return f"{self._root}/{source_key[0:2]}/{source_key[2:4]}/{source_key}"

    def _path(self, key: str) -> str:
        # The key's own "/" separates the source directory from the variant file.
        return f"{self._root}/{key[0:2]}/{key[2:4]}/{key}"

    # -- the start-up scan -----------------------------------------------------------------

    def start(self) -> Deferred[None]:
        """Rebuild the index from the files on disk, in batches; fires when done.

        ``get`` and ``put`` work meanwhile: entries not yet scanned are misses, and the scan
        never replaces what a ``put`` stored meanwhile.
        """
        if self._started:
            raise RuntimeError("DiskCache.start() called twice")
        self._started = True
        cooperator = self._cooperator
        if cooperator is None:
            clock = self._clock
            cooperator = Cooperator(scheduler=lambda step: clock.callLater(0.0, step))
        task = cooperator.cooperate(self._scan())
        done: Deferred[None] = task.whenDone().addCallback(lambda _: None)
        return done

    def _scan(self) -> Iterator[None]:
        began = self._clock.seconds()
        try:
            os.makedirs(self._root, exist_ok=True)
        except OSError as e:
            self._log.error(
                "cache directory {root} is unusable ({reason}); caching will fail until it is",
                root=self._root,
                reason=e.strerror,
            )
            return
        self._lock_root()
        self._not_before = max(self._not_before, self._read_not_before())
        found: list[tuple[float, str]] = []
        temps = 0
        work = 0
        for first in self._list(self._root):
            if not (first.is_dir(follow_symlinks=False) and _SHARD.match(first.name)):
                continue
            for second in self._list(first.path):
                if not (second.is_dir(follow_symlinks=False) and _SHARD.match(second.name)):
                    continue
                for source in self._list(second.path):
                    if not (
                        source.is_dir(follow_symlinks=False)
                        and _SOURCE_KEY.match(source.name)
                        and source.name.startswith(first.name + second.name)
                    ):
                        continue
                    for item in self._list(source.path):
                        work += 1
                        name = item.name
                        if name.startswith(".") and name.endswith(_TEMP_SUFFIX):
                            # A write that a crash interrupted; never visible, just garbage.
                            self._unlink(item.path)
                            temps += 1
                        elif _VARIANT_NAME.match(name):
                            try:
                                st = item.stat(follow_symlinks=False)
                            except OSError:
                                continue
                            found.append((max(st.st_atime, st.st_mtime), f"{source.name}/{name}"))
                        if work >= self._scan_batch:
                            work = 0
                            yield None
        # Newest first, each put at the cold end: hot entries are served soonest, and when
        # the scan ends the index is in last-access order behind whatever was used meanwhile.
        found.sort(reverse=True)
        adopted = 0
        for _stamp, key in found:
            if key not in self._index and self._adopt(key):
                adopted += 1
            work += 1
            if work >= self._scan_batch:
                work = 0
                yield None
        before = self._evictions
        self._evict_to(self._max_bytes)
        self._log.info(
            "cache scan of {root}: {adopted} entries, {bytes} bytes, {temps} temporary files "
            "removed, {evicted} evicted over the cap, in {seconds:.2f}s",
            root=self._root,
            adopted=adopted,
            bytes=self._bytes,
            temps=temps,
            evicted=self._evictions - before,
            seconds=self._clock.seconds() - began,
        )

    def invalidate_all(self) -> None:
        """Make every entry stored so far stale, now and after a restart: for a node
        that cannot know what was purged while it was away. Each is fetched again."""
        self._not_before = self._clock.seconds()
        path = os.path.join(self._root, NOT_BEFORE_FILE)
        try:
            write_small_file(path, repr(self._not_before).encode("ascii"))
        except OSError as e:
            self._log.warn("cannot save {path}: {reason}", path=path, reason=e)

    def _read_not_before(self) -> float:
        try:
            saved = read_small_file(os.path.join(self._root, NOT_BEFORE_FILE), 64)
            return float(saved.strip() or b"0")
        except (OSError, ValueError):
            return 0.0

    def _lock_root(self) -> None:
        """Say so when another process already uses this directory (by accident, as a
        default ./imgproxy-cache in one working directory): neither would see the
        other's purges or evictions. The lock goes with the process."""
        path = os.path.join(self._root, LOCK_FILE)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NONBLOCK, 0o644)
        except OSError:
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            self._log.warn(
                "another process uses the cache directory {root}: it will not see this "
                "node's purges, nor this node its own; give each node a directory of its own",
                root=self._root,
            )
            return
        self._lock_fd = fd

    def _list(self, directory: str) -> list[os.DirEntry[str]]:
        # A whole listing at once: the tree may change between two batches of the scan.
        try:
            with os.scandir(directory) as entries:
                return list(entries)
        except OSError:
            return []

    def _adopt(self, key: str) -> bool:
        """Index the file of ``key`` from its header alone; drop it if the header is bad."""
        path = self._path(key)
        try:
            fd = os.open(path, _READ_FLAGS)
            try:
                size = os.fstat(fd).st_size
                head = os.read(fd, _HEAD_READ)
                if len(head) >= HEADER_SIZE:
                    # Only a long URL makes the metadata outgrow the first read.
                    needed = HEADER_SIZE + _HEADER.unpack_from(head)[4]
                    if len(head) < needed <= size:
                        head += os.read(fd, needed - len(head))
            finally:
                os.close(fd)
        except FileNotFoundError:
            return False  # evicted or purged since it was listed
        except OSError as e:
            self._drop_corrupt(key, path, f"unreadable: {e.strerror}")
            return False
        decoded = decode_meta(head)
        if decoded is None:
            self._drop_corrupt(key, path, "bad header")
            return False
        meta, offset = decoded
        if meta.key != key or offset + meta.body_length != size:
            self._drop_corrupt(key, path, "truncated or misplaced")
            return False
        self._index[key] = (size, float(meta.created))
        self._index.move_to_end(key, last=False)
        self._bytes += size
        return True
