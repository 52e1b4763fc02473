"""A local file cache of the chunks of one remote store.

Each chunk is a file under `root/<store id>/<chunk key>`, where the store id is a
hash of the store's URL, so several stores share one cache folder and several
processes on one machine share a store's entries. Writes go to a temporary
file that is renamed into place, so a reader never sees a partial chunk.

NOTE: entries are never checked against the store. A store that changes while
it is cached returns stale chunks; delete the store's folder to refresh it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from pathlib import Path

logger = logging.getLogger(__name__)


def store_id(url: str) -> str:
    """Return the cache folder name of a store: a readable tail of its URL and a hash of the whole URL."""
    digest = hashlib.sha256(url.encode()).hexdigest()[:16]
    tail = "".join(c if c.isalnum() or c in "-_." else "_" for c in url.rstrip("/").rsplit("/", 1)[-1])[-40:]
    return f"{tail}-{digest}"


class ChunkCache:
    """Chunks of one store as files; `limit_bytes` caps the size this process lets the folder grow to."""

    def __init__(self, root: str | Path, url: str, limit_bytes: int | None = None):
        self.folder = Path(root).expanduser() / store_id(url)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.limit_bytes = limit_bytes
        self.hits = 0
        self.misses = 0
        self._lock = threading.Lock()
        self._full_logged = False
        # Only the size at start and this process's own writes count towards the limit.
        self.size_bytes = sum(path.stat().st_size for path in self.folder.rglob("*") if path.is_file())
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
            return None
        with self._lock:
            self.hits += 1
        return data

    def put(self, key: str, data: bytes) -> bool:
        """Store the bytes of `key`; return False when the size limit leaves no room."""
        with self._lock:
            if self.limit_bytes is not None and self.size_bytes + len(data) > self.limit_bytes:
                if not self._full_logged:
                    logger.warning(
                        "chunk cache %s reached its limit of %.1f MB; further chunks are read from the store each time",
                        self.folder,
                        self.limit_bytes / 1e6,
                    )
                    self._full_logged = True
                return False
            self.size_bytes += len(data)

        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        temporary.write_bytes(data)
        os.replace(temporary, path)
        return True
