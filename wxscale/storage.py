"""Result locations: a local folder or an s3:// prefix, written atomically.

Local files are written to a temporary name in the same folder and renamed,
so a reader sees the old file or the new one, never half of one. An S3 PUT is
atomic by itself: an object appears whole or not at all.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import fsspec

logger = logging.getLogger(__name__)


def storage_options(url: str, endpoint_url: str | None = None, anonymous: bool = False) -> dict[str, Any]:
    """Return fsspec options for a URL; S3 credentials come from the standard AWS variables."""
    if not url.startswith("s3://"):
        return {}
    options: dict[str, Any] = {"anon": anonymous}
    endpoint = endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        options["client_kwargs"] = {"endpoint_url": endpoint}
    return options


def finite_json(value: Any) -> Any:
    """Return a copy of a JSON-like value with NaN and infinite floats replaced by None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: finite_json(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_json(item) for item in value]
    return value


class Location:
    """A folder-like place for results: `Location("runs/x")` or `Location("s3://bucket/prefix")`."""

    def __init__(self, url: str | os.PathLike, endpoint_url: str | None = None):
        self.url = str(url).rstrip("/")
        self.is_local = "://" not in self.url or self.url.startswith("file://")
        if self.is_local:
            self.url = str(Path(self.url.removeprefix("file://")).resolve())
            self.fs = fsspec.filesystem("file")
        else:
            protocol = self.url.split("://", 1)[0]
            self.fs = fsspec.filesystem(protocol, **storage_options(self.url, endpoint_url))

    def __str__(self) -> str:
        return self.url

    def path(self, *parts: str) -> str:
        return "/".join([self.url, *parts])

    def child(self, *parts: str) -> Location:
        child = Location.__new__(Location)
        child.url, child.is_local, child.fs = self.path(*parts), self.is_local, self.fs
        return child

    def exists(self, *parts: str) -> bool:
        return self.fs.exists(self.path(*parts))

    def remove(self, relative: str) -> None:
        """Delete a file if it exists."""
        target = self.path(relative)
        if self.fs.exists(target):
            self.fs.rm_file(target)

    def write_bytes(self, relative: str, payload: bytes) -> str:
        """Write one file atomically and return its full path."""
        target = self.path(relative)
        if self.is_local:
            folder = os.path.dirname(target)
            os.makedirs(folder, exist_ok=True)
            handle, temporary = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.basename(target))
            try:
                with os.fdopen(handle, "wb") as stream:
                    stream.write(payload)
                    stream.flush()
                    os.fsync(stream.fileno())
                os.replace(temporary, target)
            except BaseException:
                if os.path.exists(temporary):
                    os.unlink(temporary)
                raise
        else:
            self.fs.pipe_file(target, payload)
        return target

    def write_json(self, relative: str, document: Any) -> str:
        """Write a JSON document atomically; NaN and infinities become null, which strict JSON parsers accept."""
        text = json.dumps(finite_json(document), indent=2, allow_nan=False)
        return self.write_bytes(relative, (text + "\n").encode())

    def read_json(self, relative: str) -> Any:
        with self.fs.open(self.path(relative), "rb") as stream:
            return json.loads(stream.read())

    def list_json(self, pattern: str) -> list[str]:
        """Return the relative paths of files under the location matching a glob pattern."""
        prefix = self.url.removeprefix("s3://") if not self.is_local else self.url
        found = self.fs.glob(self.path(pattern))
        return sorted(path.removeprefix(prefix).lstrip("/") for path in found)
