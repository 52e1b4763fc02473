"""Reliable reads from a zarr store: retries with backoff, timeouts, missing-chunk errors and a chunk cache.

`ReliableStore` wraps the zarr store of a source (local or S3) and sits
between zarr and the storage, so every read of xarray or zarr goes through it:

- a request that fails with a transient error (connection reset, timeout, HTTP
  5xx) is retried `retries` times, after `backoff * 2**attempt` seconds (capped
  at 30 s). Each retry is logged with the key and the error;
- each request times out after `timeout_seconds`, and a timeout counts as
  transient;
- a chunk key the store does not have raises MissingChunkError naming the key.
  zarr itself would return the fill value in silence. `missing_chunks="fill"`
  restores zarr's behaviour for stores written without their empty chunks;
- with a `ChunkCache`, whole chunks are kept on local disk and read from there
  on later requests.

S3 requests get no retries below this layer (botocore's `total_max_attempts`
is 1 and s3fs's own retries are off), so that one policy, with its log lines,
decides.

A chunk whose bytes do not decode fails inside zarr's codecs, where the key is
not known. `find_corrupt_chunk` reads the chunks of a failed range one by one
to name it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import weakref
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Literal, Sequence

import zarr
from zarr.abc.store import ByteRequest
from zarr.core.buffer import Buffer, BufferPrototype, default_buffer_prototype
from zarr.core.sync import sync
from zarr.storage import FsspecStore, LocalStore, WrapperStore

from wxscale.data.cache import ChunkCache
from wxscale.errors import DataError

logger = logging.getLogger(__name__)

# Keys that hold metadata; a store without one of them is normal (zarr probes for v2 and v3 files).
METADATA_NAMES = frozenset({"zarr.json", ".zarray", ".zattrs", ".zgroup", ".zmetadata"})

MAX_BACKOFF_SECONDS = 30.0

# Errors that a repeated request cannot fix.
_PERMANENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, FileExistsError)

# Errors zarr's codecs raise on bytes that do not decode (zstd, blosc, a wrong length for the shape).
DECODE_ERRORS = (RuntimeError, ValueError, TypeError)


class ChunkReadError(DataError):
    """A chunk that could not be read; `key` is its key in the store."""

    def __init__(self, message: str, key: str):
        super().__init__(message)
        self.key = key


class MissingChunkError(ChunkReadError):
    """A chunk key that the store does not contain."""


class CorruptChunkError(ChunkReadError):
    """A chunk whose bytes do not decode."""


@dataclass(frozen=True)
class ReadPolicy:
    """Retries, backoff, timeout and missing-chunk handling of storage requests."""

    retries: int = 4
    backoff_seconds: float = 0.5
    timeout_seconds: float = 120.0
    missing_chunks: Literal["error", "fill"] = "error"

    @classmethod
    def from_loader(cls, loader: Any) -> ReadPolicy:
        """Return the policy of a `LoaderSpec`."""
        return cls(
            retries=loader.retries,
            backoff_seconds=loader.retry_backoff_seconds,
            timeout_seconds=loader.timeout_seconds,
            missing_chunks=loader.missing_chunks,
        )

    def delay(self, attempt: int) -> float:
        """Return the wait in seconds before retry `attempt` (0 for the first retry)."""
        return min(self.backoff_seconds * 2**attempt, MAX_BACKOFF_SECONDS)


@dataclass
class ReadCounters:
    """Requests, bytes and retries of one store, shared by the store and its copies."""

    requests: int = 0
    bytes_read: int = 0
    retries: int = 0
    cache_hits: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, requests: int = 0, bytes_read: int = 0, retries: int = 0, cache_hits: int = 0) -> None:
        with self._lock:
            self.requests += requests
            self.bytes_read += bytes_read
            self.retries += retries
            self.cache_hits += cache_hits


def is_chunk_key(key: str) -> bool:
    """Return True for a key of array data (e.g. 't2m/c/0/0/0' or 't2m/0.0.0'), False for metadata."""
    return key.rsplit("/", 1)[-1] not in METADATA_NAMES


def is_transient(error: BaseException) -> bool:
    """Return True for errors that a later attempt may not meet: timeouts, connection and HTTP 5xx errors.

    s3fs turns S3 error codes into OSError subclasses (AccessDenied becomes
    PermissionError, NoSuchKey FileNotFoundError) and unknown codes, such as
    SlowDown or InternalError, into a plain OSError.
    """
    if isinstance(error, _PERMANENT):
        return False
    if isinstance(error, (TimeoutError, OSError)):
        return True
    module = type(error).__module__
    return module.startswith(("aiohttp", "botocore", "aiobotocore", "urllib3", "http.client"))


class _Staging:
    """Chunk bytes fetched ahead by `ReliableStore.staged`, with the number of reads that still need each."""

    def __init__(self) -> None:
        self.buffers: dict[str, tuple[Buffer, int]] = {}
        self.lock = threading.Lock()


class ReliableStore(WrapperStore):
    """A zarr store that retries transient failures, times requests out, rejects missing chunks and caches chunks."""

    def __init__(
        self,
        store: Any,
        policy: ReadPolicy | None = None,
        label: str = "",
        cache: ChunkCache | None = None,
        counters: ReadCounters | None = None,
        staging: _Staging | None = None,
    ):
        super().__init__(store)
        self.policy = policy or ReadPolicy()
        self.label = label or str(store)
        self.cache = cache
        self.counters = counters or ReadCounters()
        self._staging = staging or _Staging()

    def _with_store(self, store: Any) -> ReliableStore:
        return type(self)(store, self.policy, self.label, self.cache, self.counters, self._staging)

    def __repr__(self) -> str:
        return f"ReliableStore({self.label!r})"

    @contextlib.contextmanager
    def staged(self, keys: Sequence[str]) -> Iterator[None]:
        """Fetch the whole chunks `keys` concurrently, and serve zarr's reads of them from memory inside the block.

        zarr fetches the chunks of one array concurrently but reads the arrays of
        a dataset one after the other. Staging the chunks of all arrays of a block
        first makes the block's requests run together, as a batched `cat` would.
        """
        if not keys:
            yield
            return
        prototype = default_buffer_prototype()

        async def fetch_all() -> list[Buffer | None]:
            return list(await asyncio.gather(*(self.get(key, prototype) for key in keys)))

        fetched = sync(fetch_all())
        staging = self._staging
        with staging.lock:
            for key, buffer in zip(keys, fetched):
                if buffer is not None:
                    previous = staging.buffers.get(key)
                    staging.buffers[key] = (buffer, (previous[1] if previous else 0) + 1)
        try:
            yield
        finally:
            with staging.lock:
                for key in keys:
                    entry = staging.buffers.get(key)
                    if entry is None:
                        continue
                    if entry[1] <= 1:
                        del staging.buffers[key]
                    else:
                        staging.buffers[key] = (entry[0], entry[1] - 1)

    async def get(
        self, key: str, prototype: BufferPrototype, byte_range: ByteRequest | None = None
    ) -> Buffer | None:
        if byte_range is None:
            with self._staging.lock:
                entry = self._staging.buffers.get(key)
            if entry is not None:
                return entry[0]

        chunk = is_chunk_key(key)
        cacheable = self.cache is not None and chunk and byte_range is None
        if cacheable:
            cached = await asyncio.to_thread(self.cache.get, key)
            if cached is not None:
                self.counters.add(cache_hits=1)
                return prototype.buffer.from_bytes(cached)

        value = await self._get_with_retries(key, prototype, byte_range)

        if value is None:
            if chunk and self.policy.missing_chunks == "error":
                raise MissingChunkError(
                    f"chunk {key!r} is missing from {self.label}: the store is incomplete. Rewrite it (for example "
                    "with `wxscale data convert`), or set spec.data.loader.missingChunks: fill if the store leaves "
                    "out chunks that contain only the fill value",
                    key,
                )
            return None

        if cacheable:
            await asyncio.to_thread(self.cache.put, key, value.to_bytes())
        return value

    async def get_partial_values(
        self, prototype: BufferPrototype, key_ranges: Iterable[tuple[str, ByteRequest | None]]
    ) -> list[Buffer | None]:
        return list(await asyncio.gather(*(self.get(key, prototype, byte_range) for key, byte_range in key_ranges)))

    async def _get_with_retries(
        self, key: str, prototype: BufferPrototype, byte_range: ByteRequest | None
    ) -> Buffer | None:
        policy = self.policy
        for attempt in range(policy.retries + 1):
            try:
                value = await asyncio.wait_for(self._store.get(key, prototype, byte_range), policy.timeout_seconds)
            except Exception as error:
                if isinstance(error, TimeoutError):
                    error = TimeoutError(f"no response within {policy.timeout_seconds:g} s")
                if not is_transient(error):
                    raise ChunkReadError(
                        f"reading {key!r} from {self.label} failed: {type(error).__name__}: {error}", key
                    ) from error
                if attempt == policy.retries:
                    raise ChunkReadError(
                        f"reading {key!r} from {self.label} failed after {attempt + 1} attempts: "
                        f"{type(error).__name__}: {error}; check the storage endpoint and the network, or raise "
                        "spec.data.loader.retries or spec.data.loader.timeoutSeconds",
                        key,
                    ) from error
                delay = policy.delay(attempt)
                logger.warning(
                    "reading %r from %s failed (%s: %s); retry %d of %d in %.2f s",
                    key,
                    self.label,
                    type(error).__name__,
                    error,
                    attempt + 1,
                    policy.retries,
                    delay,
                )
                self.counters.add(retries=1)
                await asyncio.sleep(delay)
                continue

            self.counters.add(requests=1, bytes_read=len(value) if value is not None else 0)
            return value
        raise AssertionError("unreachable: the loop returns or raises")


def s3_filesystem(options: dict[str, Any], policy: ReadPolicy) -> Any:
    """Return an asynchronous s3fs filesystem for zarr, with timeouts and without retries of its own."""
    import s3fs

    config = dict(options.get("config_kwargs") or {})
    config.update(
        connect_timeout=policy.timeout_seconds,
        read_timeout=policy.timeout_seconds,
        retries={"total_max_attempts": 1, "mode": "standard"},
    )
    fs = s3fs.S3FileSystem(
        asynchronous=True, skip_instance_cache=True, **{**options, "config_kwargs": config}
    )
    fs.retries = 1  # s3fs's own retry loop: one attempt, so ReliableStore decides
    return fs


def open_zarr_store(
    protocol: str,
    path: str,
    options: dict[str, Any],
    policy: ReadPolicy,
    cache_dir: str | None = None,
    cache_limit_mb: float | None = None,
) -> ReliableStore:
    """Return a read-only ReliableStore of a local (`file`) or S3 (`s3`) zarr store at `path`.

    The chunk cache applies to S3 stores only; local chunks are read in place.
    """
    fs = None
    if protocol == "s3":
        url = f"s3://{path}"
        fs = s3_filesystem(options, policy)
        inner: Any = FsspecStore(fs, path=path.rstrip("/"), read_only=True)
    else:
        url = path
        inner = LocalStore(path, read_only=True)

    cache = None
    if cache_dir and protocol == "s3":
        limit = int(cache_limit_mb * 1e6) if cache_limit_mb else None
        cache = ChunkCache(cache_dir, url, limit)
    elif cache_dir:
        logger.debug("%s is local; the chunk cache is not used", url)
    store = ReliableStore(inner, policy, label=url, cache=cache)
    if fs is not None:
        # Close the S3 client when the store goes away or the process exits, not at garbage collection,
        # where aiohttp would report an unclosed session.
        weakref.finalize(store, _close_s3_client, fs)
    return store


def _close_s3_client(fs: Any) -> None:
    """Close the aiobotocore client of an asynchronous s3fs filesystem on zarr's event loop, if it was opened."""
    client = getattr(fs, "_s3", None)
    if client is None:
        return
    fs._s3 = None
    try:
        # Garbage collection can run this on zarr's loop thread itself, where only a task can close the client.
        asyncio.get_running_loop().create_task(client.__aexit__(None, None, None))
        return
    except RuntimeError:
        pass  # no loop runs in this thread
    try:
        sync(client.__aexit__(None, None, None))
    except (RuntimeError, OSError) as error:  # zarr's loop may be gone at interpreter exit
        logger.debug("closing the S3 client failed: %s", error)


def time_chunk_keys(array: zarr.Array, time_axis: int, start: int, stop: int) -> list[str]:
    """Return the keys of the chunks of `array` that hold time steps [start, stop), when they are whole time steps.

    Returns [] for arrays chunked along another axis too, or sharded, whose reads
    touch parts of stored objects; those are read by zarr as usual.
    """
    if array.shards is not None:
        return []
    if any(size < extent for axis, (size, extent) in enumerate(zip(array.chunks, array.shape)) if axis != time_axis):
        return []
    size = array.chunks[time_axis]
    keys = []
    for index in range(start // size, (max(stop, start + 1) - 1) // size + 1):
        coords = [0] * array.ndim
        coords[time_axis] = index
        keys.append(f"{array.path}/{array.metadata.encode_chunk_key(tuple(coords))}")
    return keys


def _chunk_slices(array: zarr.Array, coords: tuple[int, ...]) -> tuple[slice, ...]:
    grid = array.shards or array.chunks
    return tuple(slice(c * size, min((c + 1) * size, extent)) for c, size, extent in zip(coords, grid, array.shape))


def find_corrupt_chunk(store: ReliableStore, variable: str, time_axis: int, start: int, stop: int) -> str | None:
    """Return the key of the first chunk of `variable` in time steps [start, stop) that fails to decode, or None.

    Reads each stored object (chunk, or shard when the array is sharded) of the
    range on its own. `time_axis` is the position of time among the array's dimensions.
    """
    array = zarr.open_array(store, path=variable, mode="r")
    grid = array.shards or array.chunks
    ranges = []
    for axis, (size, extent) in enumerate(zip(grid, array.shape)):
        if axis == time_axis:
            ranges.append(range(start // size, (max(stop, start + 1) - 1) // size + 1))
        else:
            ranges.append(range(-(-extent // size)))

    coords: list[tuple[int, ...]] = [()]
    for axis_range in ranges:
        coords = [prefix + (index,) for prefix in coords for index in axis_range]
    for chunk in coords:
        try:
            array[_chunk_slices(array, chunk)]
        except DECODE_ERRORS:
            return f"{array.path}/{array.metadata.encode_chunk_key(chunk)}"
    return None
