"""Open the data source of a study: the synthetic generator, or a netCDF file or zarr store over fsspec.

`open_source` returns a lazily loaded dataset with dimensions `time`, `lat`,
`lon` (see `wxscale.data.coords` for the layout) holding only the variables the
study trains on. Nothing but coordinates is read here; `wxscale.data.dataset`
loads the values.

Locations: a local path, a `file://` URL or an `s3://` URL. S3 credentials come
from the environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN,
AWS_PROFILE), the endpoint from `spec.data.storage.endpointUrl` or AWS_ENDPOINT_URL.
"""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fsspec
import xarray as xr

from wxscale.data import synthetic
from wxscale.data.coords import select_variables, standardise_coordinates
from wxscale.data.store import ReadPolicy, ReliableStore, open_zarr_store
from wxscale.errors import DataError
from wxscale.spec import DataSpec, LoaderSpec, StorageSpec

logger = logging.getLogger(__name__)

# The synthetic field does not depend on the trial seed, so that trials that differ
# only in their seed train on the same data.
SYNTHETIC_DATA_SEED = 0

_ZARR_MARKERS = ("zarr.json", ".zgroup", ".zmetadata")
GRIB_SUFFIXES = (".grib", ".grib2", ".grb", ".grb2")

# Errors from a zarr store opened with consolidated=True that has no consolidated metadata.
_NOT_CONSOLIDATED = (KeyError, ValueError, OSError)


def storage_options(data: DataSpec) -> dict[str, Any]:
    """Return the s3fs options for `data.source`: endpoint from the spec or the environment, anonymous flag.

    Keys and secrets are not copied here: botocore reads them from the environment itself.
    """
    return storage_options_for(data.storage)


def storage_options_for(storage: StorageSpec) -> dict[str, Any]:
    """Return the s3fs options of object-storage settings, as `storage_options` does for a DataSpec."""
    options: dict[str, Any] = {}
    endpoint = storage.endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        options["client_kwargs"] = {"endpoint_url": endpoint}
    if storage.anonymous:
        options["anon"] = True
    return options


def split_location(source: str, field: str = "spec.data.source") -> tuple[str, str]:
    """Return (protocol, path): ('file', '/abs/path') or ('s3', 'bucket/key')."""
    if source.startswith("s3://"):
        return "s3", source.removeprefix("s3://")
    if source.startswith("file://"):
        return "file", source.removeprefix("file://")
    if "://" in source:
        scheme = source.split("://", 1)[0]
        raise DataError(
            f"{field}: unsupported URL scheme {scheme!r} in {source!r}; "
            "use a local path, a file:// URL, an s3:// URL or 'synthetic'"
        )
    return "file", str(Path(source).expanduser())


def _is_zarr(fs: fsspec.AbstractFileSystem, path: str) -> bool:
    if path.rstrip("/").endswith(".zarr"):
        return True
    if not fs.isdir(path):
        return False
    return any(fs.exists(f"{path.rstrip('/')}/{marker}") for marker in _ZARR_MARKERS)


def _open_zarr(store: ReliableStore) -> xr.Dataset:
    """Open a zarr v2 or v3 store, with consolidated metadata when the store has it."""
    kwargs: dict[str, Any] = {"engine": "zarr", "chunks": None}
    with warnings.catch_warnings():
        # Extra files in a store (e.g. a sample_info.json beside the arrays) only warn.
        warnings.filterwarnings("ignore", message=".*not recognized as a component of a Zarr hierarchy.*")
        try:
            return xr.open_dataset(store, consolidated=True, **kwargs)
        except _NOT_CONSOLIDATED as error:
            logger.debug("%s has no consolidated metadata (%s); reading it unconsolidated", store.label, error)
            return xr.open_dataset(store, consolidated=False, **kwargs)


def _open_netcdf(fs: fsspec.AbstractFileSystem, protocol: str, path: str) -> xr.Dataset:
    """Open a netCDF file: by path when local, through an fsspec file object otherwise."""
    if protocol == "file":
        return xr.open_dataset(path)

    # netCDF-4 (HDF5) files open with h5netcdf, netCDF-3 files with scipy; both accept file objects.
    # h5netcdf needs h5py, hence ImportError among the errors that move on to the next engine.
    errors = []
    for engine in ("h5netcdf", "scipy"):
        handle = fs.open(path, "rb")
        try:
            return xr.open_dataset(handle, engine=engine)
        except (OSError, ValueError, TypeError, ImportError) as error:
            handle.close()
            errors.append(f"{engine}: {error}")
    raise DataError(f"spec.data.source: cannot read s3://{path} as netCDF ({'; '.join(errors)})")


@dataclass
class RawSource:
    """A source opened lazily as it is stored: the dataset, its format and, for zarr, the store it reads through."""

    dataset: xr.Dataset
    format: str  # 'zarr', 'netcdf' or 'synthetic'
    store: ReliableStore | None = None


def open_raw(data: DataSpec) -> xr.Dataset:
    """Open `data.source` as it is stored, without standardising coordinates or choosing variables."""
    return open_raw_source(data).dataset


def open_raw_source(data: DataSpec) -> RawSource:
    """Open `data.source` lazily as it is stored; zarr stores read through a `ReliableStore`.

    Raises DataError when the source is missing, inaccessible or not netCDF or zarr.
    """
    if data.is_synthetic:
        return RawSource(synthetic.generate(data.synthetic, SYNTHETIC_DATA_SEED), "synthetic")
    return open_location(data.source, data.storage, data.loader)


def open_location(
    source: str, storage: StorageSpec, loader: LoaderSpec, field: str = "spec.data.source"
) -> RawSource:
    """Open a netCDF file, GRIB file or zarr store (local path, file:// or s3:// URL) lazily as it is stored.

    `loader` gives the retries, timeouts and chunk cache of zarr reads. `field`
    names the setting in error messages. Raises DataError when the location is
    missing, inaccessible or in no readable format.
    """
    protocol, path = split_location(source, field)
    if protocol != "s3":
        return _open_location(fs=fsspec.filesystem(protocol), protocol=protocol, path=path, options={},
                              source=source, loader=loader, field=field)

    import botocore.exceptions

    options = storage_options_for(storage)
    try:
        return _open_location(fs=_s3_metadata_filesystem(options, loader), protocol=protocol, path=path,
                              options=options, source=source, loader=loader, field=field)
    except botocore.exceptions.BotoCoreError as error:
        raise _s3_error(error, source, storage, loader, field) from error


def _s3_metadata_filesystem(options: dict[str, Any], loader: LoaderSpec) -> fsspec.AbstractFileSystem:
    """Return the synchronous s3fs filesystem that lists and opens a source, bounded by the loader's timeout.

    Each request gets `loader.retries + 1` attempts of at most `loader.timeoutSeconds`
    each for connecting and for reading, so that an endpoint that never responds fails
    in bounded time. s3fs's own retry loop is reduced to one attempt, because it
    would multiply botocore's attempts.
    """
    config = dict(options.get("config_kwargs") or {})
    config.update(connect_timeout=loader.timeout_seconds, read_timeout=loader.timeout_seconds,
                  retries={"total_max_attempts": loader.retries + 1, "mode": "standard"})
    fs = fsspec.filesystem("s3", **{**options, "config_kwargs": config})
    fs.retries = 1
    return fs


def _s3_error(error: Exception, source: str, storage: StorageSpec, loader: LoaderSpec, field: str) -> DataError:
    """Convert a botocore error from opening `source` into a DataError that names what to check."""
    import botocore.exceptions

    url = storage_options_for(storage).get("client_kwargs", {}).get("endpoint_url")
    endpoint = f"S3 endpoint {url}" if url else "the default AWS S3 endpoint"
    if field.startswith("spec."):
        where = "spec.data.storage.endpointUrl in the study, or AWS_ENDPOINT_URL"
        timeout = "spec.data.loader.timeoutSeconds"
    else:
        where = "--s3-endpoint or AWS_ENDPOINT_URL"
        timeout = "--timeout"
    if isinstance(error, botocore.exceptions.NoCredentialsError):
        anonymous = "spec.data.storage.anonymous: true" if field.startswith("spec.") else "--anonymous"
        return DataError(f"{field}: no S3 credentials found to read {source}; set AWS_ACCESS_KEY_ID and "
                         f"AWS_SECRET_ACCESS_KEY, or {anonymous} for a public bucket")
    if isinstance(error, (botocore.exceptions.ConnectTimeoutError, botocore.exceptions.ReadTimeoutError)):
        return DataError(
            f"{field}: {endpoint} sent no response within {loader.timeout_seconds:g} s in "
            f"{loader.retries + 1} attempt(s) while opening {source}; check the endpoint ({where}), or raise "
            f"{timeout} for a slow link")
    if isinstance(error, botocore.exceptions.EndpointConnectionError):
        return DataError(f"{field}: cannot connect to {endpoint} to open {source} ({error}); check the endpoint "
                         f"({where}) and that the server is running")
    return DataError(f"{field}: opening {source} from {endpoint} failed ({type(error).__name__}: {error}); check "
                     f"the endpoint ({where}) and the credentials")


def _open_location(fs: fsspec.AbstractFileSystem, protocol: str, path: str, options: dict[str, Any], source: str,
                   loader: LoaderSpec, field: str) -> RawSource:
    try:
        exists = fs.exists(path)
    except PermissionError as error:
        raise DataError(
            f"{field}: access denied to {source} ({error}); set AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY, or spec.data.storage.anonymous: true for a public bucket"
        ) from error
    if not exists:
        hint = (
            "check the bucket and key, and spec.data.storage.endpointUrl or AWS_ENDPOINT_URL"
            if protocol == "s3"
            else f"relative paths are resolved against the current directory ({os.getcwd()}); give an existing "
            "netCDF file or zarr store or an s3:// URL"
            + (", 'synthetic', or `--data PATH` on the command line of validate, plan and run"
               if field.startswith("spec.") else "")
        )
        raise DataError(f"{field}: {source} not found; {hint}")

    try:
        if _is_zarr(fs, path):
            policy = ReadPolicy.from_loader(loader)
            store = open_zarr_store(protocol, path, options, policy, loader.cache_dir, loader.cache_limit_mb)
            return RawSource(_open_zarr(store), "zarr", store)
        if path.lower().endswith(GRIB_SUFFIXES):
            return RawSource(_open_grib(fs, protocol, path, field), "grib")
        return RawSource(_open_netcdf(fs, protocol, path), "netcdf")
    except PermissionError as error:
        raise DataError(f"{field}: access denied to {source} ({error}); check the S3 credentials") from error
    except (OSError, ValueError) as error:
        raise DataError(
            f"{field}: cannot open {source} as netCDF or zarr ({type(error).__name__}: {error})"
        ) from error


def _open_grib(fs: fsspec.AbstractFileSystem, protocol: str, path: str, field: str) -> xr.Dataset:
    """Open a GRIB file with the cfgrib engine, from a local copy when it is remote."""
    try:
        import cfgrib  # noqa: F401  (the engine xarray uses for GRIB)
    except ImportError as error:
        raise DataError(
            f"{field}: {path} is a GRIB file, and reading GRIB needs the cfgrib package and the ecCodes library; "
            "install them (pip install cfgrib eccodes), or convert the file to netCDF first"
        ) from error
    if protocol != "file":
        # NOTE: ecCodes reads only local files, so a remote GRIB file is copied to a temporary file first.
        import tempfile

        local = Path(tempfile.mkdtemp(prefix="wxscale-grib-")) / Path(path).name
        fs.get(path, str(local))
        path = str(local)
    return xr.open_dataset(path, engine="cfgrib")


def describe_source(data: DataSpec) -> str:
    """Return a one-line description of the source for logs and reports."""
    if data.is_synthetic:
        spec = data.synthetic
        return (
            f"synthetic advection-diffusion tracers ({spec.lat}x{spec.lon} grid, {spec.steps} steps "
            f"of {spec.step_hours:g} h from {spec.start:%Y-%m-%d}, data seed {SYNTHETIC_DATA_SEED})"
        )
    return data.source


def open_source(data: DataSpec) -> xr.Dataset:
    """Open `data.source` lazily as a dataset of (time, lat, lon) variables in the standard layout.

    Raises DataError when the source is missing or unreadable, when an axis cannot
    be identified, or when a requested variable is absent (the message lists the
    available ones).
    """
    return open_source_and_raw(data)[0]


def open_source_and_raw(data: DataSpec) -> tuple[xr.Dataset, RawSource]:
    """Return `open_source(data)` and the RawSource it was made from (for chunking and the store)."""
    raw = open_raw_source(data)
    label = "synthetic source" if data.is_synthetic else data.source
    dataset = standardise_coordinates(raw.dataset, label)
    dataset = select_variables(dataset, data.variables, label)
    logger.info(
        "opened %s: variables %s, %d steps, %d x %d grid",
        label,
        list(dataset.data_vars),
        dataset.sizes["time"],
        dataset.sizes["lat"],
        dataset.sizes["lon"],
    )
    return dataset, raw
