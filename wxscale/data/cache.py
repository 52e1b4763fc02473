"""A local file cache of the chunks of one remote store.

Each chunk is a file under `root/<store id>/<chunk key>`, where the store id is a
hash of the store's URL, so several stores share one cache folder and several
processes on one machine share a store's entries. Writes go to a temporary
file that is renamed into place, so a reader never sees a partial chunk.

With a size limit, the least recently used chunks are deleted to make room
for a new one. Recency is this process's: entries found at start rank by
their modification time, then by this process's reads and writes.

NOTE: processes that share a cache folder each count only the entries they
found at start and their own writes, so together they can exceed the limit
by up to one limit per process. A chunk that another process deletes is read
again from the store.

NOTE: entries are never checked against the store. A store that changes while
it is cached returns stale chunks; delete the store's folder to refresh it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from collections import OrderedDict
from pathlib import Path

logger = logging.getLogger(__name__)


def store_id(url: str) -> str:
    """Return the cache folder name of a store: a readable tail of its URL and a hash of the whole URL."""
    digest = hashlib.sha256(url.encode()).hexdigest()[:16]
    tail = "".join(c if c.isalnum() or c in "-_." else "_" for c in url.rstrip("/").rsplit("/", 1)[-1])[-40:]
    return f"{tail}-{digest}"


class ChunkCache:
    """Chunks of one store as files; `limit_bytes` bounds the folder's size, evicting least recently used chunks."""

    def __init__(self, root: str | Path, url: str, limit_bytes: int | None = None):
        self.folder = Path(root).expanduser() / store_id(url)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.limit_bytes = limit_bytes
        self.hits = 0
        self.misses = 0
        self.evictions = 0
        self._lock = threading.Lock()
        self._too_large_logged = False
        # Key -> size in bytes, least recently used first.
        self._entries: OrderedDict[str, int] = OrderedDict()
        found = []
        for path in self.folder.rglob("*"):
            if path.is_file() and not path.name.endswith(".tmp"):
                stat = path.stat()
                found.append((stat.st_mtime, path.relative_to(self.folder).as_posix(), stat.st_size))
        for _, key, size in sorted(found):
            self._entries[key] = size
        self.size_bytes = sum(self._entries.values())
        logger.info("chunk cache for %s in %s: %.1f MB cached", url, self.folder, self.size_bytes / 1e6)

    def _path(self, key: str) -> Path:
        # Keys are relative, '/'-separated zarr keys; '..' would escape the folder.
        if key.startswith("/") or ".." in key.split("/"):
            raise ValueError(f"invalid chunk key {key!r}")
        return self.folder / key

    def get(self, key: str) -> bytes | None:
        """Return the cached bytes of `key`, or None when the chunk is not cached."""
        try:
            data = self._path(key).read_bytes()
        except FileNotFoundError:
            with self._lock:
                self.misses += 1
                self._forget(key)
            return None
        with self._lock:
            self.hits += 1
            if key in self._entries:
                self._entries.move_to_end(key)
        return data

    def put(self, key: str, data: bytes) -> bool:
        """Store the bytes of `key`, evicting least recently used chunks over the limit; False when it cannot fit."""
        with self._lock:
            if self.limit_bytes is not None and len(data) > self.limit_bytes:
                if not self._too_large_logged:
                    logger.warning(
                        "chunk %r (%.1f MB) is larger than the chunk cache limit of %.1f MB, so it is not cached "
                        "(logged once per cache); raise spec.data.loader.cacheLimitMB to cache chunks of this size",
                        key,
                        len(data) / 1e6,
                        self.limit_bytes / 1e6,
                    )
                    self._too_large_logged = True
                return False
            self._forget(key)
            if self.limit_bytes is not None:
                while self._entries and self.size_bytes + len(data) > self.limit_bytes:
                    self._evict_oldest()
            self._entries[key] = len(data)
            self.size_bytes += len(data)

        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        temporary.write_bytes(data)
        os.replace(temporary, path)
        return True

    def _forget(self, key: str) -> None:
        size = self._entries.pop(key, None)
        if size is not None:
            self.size_bytes -= size

    def _evict_oldest(self) -> None:
        key, size = self._entries.popitem(last=False)
        self.size_bytes -= size
        self.evictions += 1
        try:
            self._path(key).unlink()
        except FileNotFoundError:
            pass  # another process sharing the folder deleted it first
        logger.debug("chunk cache %s: evicted %r (%d bytes)", self.folder, key, size)
