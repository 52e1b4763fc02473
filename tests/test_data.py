"""Tests of the data layer: sources, coordinates, grid, windows, statistics, datasets and synthetic data."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import xarray as xr

from wxscale.data import build_datasets, grid_info, open_source, synthetic
from wxscale.data.grid import coarsen
from wxscale.data.windows import WindowLayout, subsample, windows_in_range
from wxscale.errors import DataError
from wxscale.spec import DataSpec, SyntheticSpec

# Splits of the tiny files below (6-hourly from 2020-01-01, 68 steps): steps 0..39, 40..51, 52..63.
TINY_PERIODS = {
    "train": {"start": "2020-01-01", "end": "2020-01-10T18:00"},
    "validation": {"start": "2020-01-11", "end": "2020-01-13T18:00"},
    "test": {"start": "2020-01-14", "end": "2020-01-16T18:00"},
}
NCEP_PERIODS = {
    "train": {"start": "2013-01-01", "end": "2013-12-31T18:00"},
    "validation": {"start": "2014-01-01", "end": "2014-06-30T18:00"},
    "test": {"start": "2014-07-01", "end": "2014-12-31T18:00"},
}
SMALL_SYNTHETIC = {"lat": 16, "lon": 32, "steps": 240, "variables": ["a", "b"]}
SYNTHETIC_PERIODS = {
    "train": {"start": "2000-01-01", "end": "2000-02-14T18:00"},
    "validation": {"start": "2000-02-15", "end": "2000-02-22T18:00"},
    "test": {"start": "2000-02-23", "end": "2000-03-01T18:00"},
}


def make_spec(source: str | Path, periods: dict = TINY_PERIODS, **fields) -> DataSpec:
    return DataSpec(source=str(source), **periods, **fields)


def tiny_dataset(
    time_name: str = "time",
    lat_name: str = "lat",
    lon_name: str = "lon",
    latitudes: np.ndarray | None = None,
    longitudes: np.ndarray | None = None,
    steps: int = 68,
    variables: tuple[str, ...] = ("temp",),
    lat_attrs: dict | None = None,
    lon_attrs: dict | None = None,
) -> xr.Dataset:
    """A small 6-hourly dataset from 2020-01-01 whose value encodes (variable, step, row, column)."""
    latitudes = np.array([-30.0, 0.0, 30.0, 60.0]) if latitudes is None else latitudes
    longitudes = np.array([0.0, 90.0, 180.0, 270.0]) if longitudes is None else longitudes
    times = pd.date_range("2020-01-01", periods=steps, freq="6h")
    step, row, column = np.meshgrid(
        np.arange(steps), np.arange(len(latitudes)), np.arange(len(longitudes)), indexing="ij"
    )
    data_vars = {
        name: (
            (time_name, lat_name, lon_name),
            (1000.0 * index + step + 0.01 * row + 0.0001 * column).astype(np.float32),
            {"units": "K"},
        )
        for index, name in enumerate(variables)
    }
    return xr.Dataset(
        data_vars,
        coords={
            time_name: times,
            lat_name: (lat_name, latitudes, lat_attrs or {}),
            lon_name: (lon_name, longitudes, lon_attrs or {}),
        },
    )


# Real files ------------------------------------------------------------------


@pytest.fixture(scope="session")
def shared_file(shared_data: Path):
    def find(name: str) -> Path:
        path = shared_data / name
        if not path.exists():
            pytest.skip(f"{path} is absent")
        return path

    return find


def test_ncep_coordinates(ncep_air: Path):
    dataset = open_source(make_spec(ncep_air, NCEP_PERIODS))

    assert list(dataset.data_vars) == ["air"]
    assert dataset["air"].dims == ("time", "lat", "lon")
    assert dataset.sizes["time"] == 2920
    assert dataset["lat"].values[0] == 75.0
    assert dataset["lat"].values[-1] == 15.0
    assert dataset["lon"].values[0] == 200.0
    assert dataset["lon"].values[-1] == 330.0
    assert pd.Timestamp(dataset["time"].values[1]) - pd.Timestamp(dataset["time"].values[0]) == pd.Timedelta("6h")


def test_uk_file_keeps_columns_contiguous(shared_file):
    path = shared_file("era5_t2m_uk_hourly_2019-03.nc")
    dataset = open_source(make_spec(path))
    longitudes = dataset["lon"].values

    assert dataset["t2m"].dims == ("time", "lat", "lon")
    assert longitudes[0] == -10.0
    assert longitudes[-1] == 2.0
    assert np.allclose(np.diff(longitudes), 0.25)
    assert np.all(np.diff(dataset["lat"].values) < 0)


def test_navy_nonstandard_names(shared_file):
    path = shared_file("navy_surface_winds_monthly_1982-1992.nc")
    dataset = open_source(make_spec(path))
    raw = xr.open_dataset(path)

    assert sorted(dataset.data_vars) == ["UWND", "VWND"]
    assert dataset["UWND"].dims == ("time", "lat", "lon")
    assert dataset.sizes["lon"] == 144
    assert dataset["lon"].values[0] == 0.0
    assert dataset["lon"].values[-1] == 357.5
    assert np.all(np.diff(dataset["lon"].values) > 0)
    assert dataset["lat"].values[0] == 90.0
    assert dataset["lat"].values[-1] == -90.0

    # The column stored at 377.5 E is now at 17.5 E; the row stored first (-90) is now last.
    expected = raw["UWND"].isel(TIME=3).sel(FNOCX=377.5).values[::-1]
    actual = dataset["UWND"].isel(time=3).sel(lon=17.5).values
    np.testing.assert_array_equal(actual, expected)


def test_era5_zarr_time_index(shared_file):
    path = shared_file("era5_global_1deg_2026-03.zarr")
    dataset = open_source(make_spec(path))

    assert sorted(dataset.data_vars) == ["msl", "t2m", "tp", "u10", "v10"]
    assert dataset["time"].dtype == np.dtype("datetime64[ns]")
    assert pd.Timestamp(dataset["time"].values[0]) == pd.Timestamp("2026-03-25")
    assert pd.Timestamp(dataset["time"].values[-1]).date() == pd.Timestamp("2026-03-31").date()
    assert dataset.sizes["lat"] == 181
    assert dataset["lat"].values[0] == 90.0
    assert dataset["lon"].values[-1] == 359.0


def test_era5_zarr_irregular_step(shared_file):
    path = shared_file("era5_global_1deg_2026-03.zarr")
    with pytest.raises(DataError, match="leadTime") as error:
        grid_info(make_spec(path))
    assert "irregular" in str(error.value)
    assert "7 h" in str(error.value)


def test_ncep_end_to_end(ncep_air: Path):
    bundle = build_datasets(make_spec(ncep_air, NCEP_PERIODS, history=2, coarsen=2), seed=0)
    x, y, mask = bundle.train[0]

    assert bundle.grid == (12, 26)
    assert x.shape == (2, 12, 26)
    assert y.shape == (1, 12, 26)
    assert mask.shape == (1, 12, 26)
    assert bundle.units == {"air": "degK"}
    assert bundle.step_hours == 6.0
    assert bundle.lead_steps == 1

    # Over a year the seasonal cycle makes persistence beat climatology at 6 h, and both are imperfect.
    arrays = bundle.test_arrays()
    persistence = float(np.sqrt(np.mean((arrays.forecast_inputs_last - arrays.targets) ** 2)))
    climatology = float(np.sqrt(np.mean((arrays.climatology - arrays.targets) ** 2)))
    assert 0.5 < persistence < climatology < 10.0


# Tiny files with unusual layouts ---------------------------------------------------


@pytest.mark.parametrize(
    "names, lat_attrs, lon_attrs",
    [
        (("time", "latitude", "longitude"), {}, {}),
        (("TIME", "FNOCY", "FNOCX"), {}, {}),
        (("valid_time", "y_axis", "x_axis"), {"units": "degrees_north"}, {"units": "degrees_east"}),
        (("t", "rows", "columns"), {"standard_name": "latitude"}, {"standard_name": "longitude"}),
    ],
)
def test_axis_detection_by_name_and_attrs(tmp_path: Path, names, lat_attrs, lon_attrs):
    path = tmp_path / "odd.nc"
    tiny_dataset(*names, lat_attrs=lat_attrs, lon_attrs=lon_attrs).to_netcdf(path)

    dataset = open_source(make_spec(path))

    assert dataset["temp"].dims == ("time", "lat", "lon")
    np.testing.assert_array_equal(dataset["lat"].values, [60.0, 30.0, 0.0, -30.0])
    np.testing.assert_array_equal(dataset["lon"].values, [0.0, 90.0, 180.0, 270.0])
    # Row 3 (60 N) of the file is now row 0.
    assert dataset["temp"].values[5, 0, 1] == pytest.approx(5 + 0.03 + 0.0001)


def test_longitudes_from_minus_180(tmp_path: Path):
    path = tmp_path / "west.nc"
    tiny_dataset(longitudes=np.array([-180.0, -90.0, 0.0, 90.0])).to_netcdf(path)

    dataset = open_source(make_spec(path))

    np.testing.assert_array_equal(dataset["lon"].values, [0.0, 90.0, 180.0, 270.0])
    # The column stored at -90 (column 1) is now at 270 (column 3).
    assert dataset["temp"].values[0, 0, 3] == pytest.approx(0.03 + 0.0001)


def test_longitudes_beyond_360_drop_duplicates(tmp_path: Path):
    path = tmp_path / "wrapped.nc"
    tiny_dataset(longitudes=np.array([90.0, 180.0, 270.0, 360.0, 450.0])).to_netcdf(path)

    dataset = open_source(make_spec(path))

    # 360 wraps to 0; 450 repeats 90 and the first column at 90 (column 0) is kept.
    np.testing.assert_array_equal(dataset["lon"].values, [0.0, 90.0, 180.0, 270.0])
    assert dataset["temp"].values[0, 0, 0] == pytest.approx(0.03 + 0.0003)
    assert dataset["temp"].values[0, 0, 1] == pytest.approx(0.03)


def test_missing_axis_names_the_hint(tmp_path: Path):
    path = tmp_path / "noaxis.nc"
    tiny_dataset("time", "rows", "columns").to_netcdf(path)

    with pytest.raises(DataError, match="no lat coordinate") as error:
        open_source(make_spec(path))
    assert str(path) in str(error.value)
    assert "degrees_north" in str(error.value)


@pytest.mark.filterwarnings("ignore:Consolidated metadata is currently not part")
@pytest.mark.parametrize("zarr_format, consolidated", [(2, True), (2, False), (3, False), (3, True)])
def test_zarr_stores(tmp_path: Path, zarr_format: int, consolidated: bool):
    store = tmp_path / f"v{zarr_format}.zarr"
    tiny_dataset("time", "latitude", "longitude").to_zarr(store, zarr_format=zarr_format, consolidated=consolidated)

    dataset = open_source(make_spec(store))

    assert dataset["temp"].dims == ("time", "lat", "lon")
    assert dataset.sizes["time"] == 68
    assert dataset["lat"].values[0] == 60.0


def test_zarr_numeric_time_with_dataset_units(tmp_path: Path):
    # Like the ERA5 store: an integer `time_index` axis whose units are a dataset attribute.
    source = tiny_dataset()
    hours = (source["time"].values - np.datetime64("1940-01-01")) // np.timedelta64(1, "h")
    source = source.rename({"time": "time_index"}).assign_coords(time_index=hours.astype(np.int64))
    source.attrs["time_units"] = "hours since 1940-01-01 00:00 (proleptic_gregorian)"
    store = tmp_path / "index.zarr"
    source.to_zarr(store, zarr_format=3, consolidated=False)

    dataset = open_source(make_spec(store))

    assert pd.Timestamp(dataset["time"].values[0]) == pd.Timestamp("2020-01-01")
    assert pd.Timestamp(dataset["time"].values[1]) == pd.Timestamp("2020-01-01T06:00")


def test_noleap_calendar_converted(tmp_path: Path):
    hours = np.arange(68) * 6
    time = ("time", hours, {"units": "hours since 2020-01-01", "calendar": "noleap"})
    path = tmp_path / "noleap.nc"
    tiny_dataset().assign_coords(time=time).to_netcdf(path)

    dataset = open_source(make_spec(path))

    assert dataset["time"].dtype == np.dtype("datetime64[ns]")
    assert pd.Timestamp(dataset["time"].values[-1]) == pd.Timestamp("2020-01-17T18:00")


def test_missing_variable_lists_available(tmp_path: Path):
    path = tmp_path / "vars.nc"
    tiny_dataset(variables=("temp", "wind")).to_netcdf(path)

    with pytest.raises(DataError, match="'pressure' not found") as error:
        open_source(make_spec(path, variables=["pressure"]))
    assert "spec.data.variables" in str(error.value)
    assert "temp" in str(error.value)
    assert "wind" in str(error.value)


def test_missing_file_names_path(tmp_path: Path):
    path = tmp_path / "absent.nc"
    with pytest.raises(DataError, match="not found") as error:
        open_source(make_spec(path))
    assert str(path) in str(error.value)
    assert "spec.data.source" in str(error.value)


def test_file_url(tmp_path: Path):
    path = tmp_path / "url.nc"
    tiny_dataset().to_netcdf(path)
    dataset = open_source(make_spec(f"file://{path}"))
    assert dataset.sizes["time"] == 68


# S3 through a local moto server ------------------------------------------------------


@pytest.fixture
def s3_bucket(moto_endpoint: str, tmp_path: Path, monkeypatch):
    s3fs = pytest.importorskip("s3fs")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    fs = s3fs.S3FileSystem(key="testing", secret="testing", client_kwargs={"endpoint_url": moto_endpoint})
    bucket = f"wx-{tmp_path.name.lower().replace('_', '-')}"[:60]
    fs.mkdir(bucket)

    tiny_dataset("time", "latitude", "longitude").to_netcdf(tmp_path / "four.nc", engine="h5netcdf")
    tiny_dataset("TIME", "FNOCY", "FNOCX").to_netcdf(tmp_path / "three.nc", engine="scipy")
    tiny_dataset().to_zarr(tmp_path / "store.zarr", zarr_format=2, consolidated=True)
    fs.put(str(tmp_path / "four.nc"), f"{bucket}/four.nc")
    fs.put(str(tmp_path / "three.nc"), f"{bucket}/three.nc")
    fs.put(str(tmp_path / "store.zarr"), f"{bucket}/store.zarr", recursive=True)
    fs.invalidate_cache()
    return bucket


@pytest.mark.parametrize("key", ["four.nc", "three.nc", "store.zarr"])
def test_s3_sources(moto_endpoint: str, s3_bucket: str, key: str):
    spec = make_spec(f"s3://{s3_bucket}/{key}", storage={"endpointUrl": moto_endpoint})

    dataset = open_source(spec)

    assert dataset["temp"].dims == ("time", "lat", "lon")
    assert dataset["lat"].values[0] == 60.0
    values = dataset["temp"].values
    assert values[5, 0, 1] == pytest.approx(5 + 0.03 + 0.0001)


def test_s3_endpoint_from_environment(moto_endpoint: str, s3_bucket: str, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_endpoint)
    bundle = build_datasets(make_spec(f"s3://{s3_bucket}/store.zarr"), seed=0)
    assert len(bundle.train) > 0


def test_s3_missing_key(moto_endpoint: str, s3_bucket: str):
    source = f"s3://{s3_bucket}/absent.nc"
    with pytest.raises(DataError, match="not found") as error:
        open_source(make_spec(source, storage={"endpointUrl": moto_endpoint}))
    assert source in str(error.value)


# Windows and splits ------------------------------------------------------------------


@pytest.fixture
def tiny_file(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.nc"
    tiny_dataset(steps=68, variables=("temp", "wind")).to_netcdf(path)
    return path


@pytest.mark.parametrize("history, interval, lead", [(1, 1, "6h"), (3, 2, "12h"), (2, 4, "1d")])
def test_windows_stay_inside_splits(tiny_file: Path, history: int, interval: int, lead: str):
    spec = make_spec(tiny_file, history=history, history_interval=interval, lead_time=lead)
    bundle = build_datasets(spec, seed=0)

    for split in ("train", "validation", "test"):
        dataset = bundle.split(split)
        start = pd.Timestamp(TINY_PERIODS[split]["start"])
        end = pd.Timestamp(TINY_PERIODS[split]["end"])
        inputs = pd.DatetimeIndex(bundle.times.values[dataset.layout.input_indices(dataset.last_indices).ravel()])
        targets = dataset.valid_times
        assert len(dataset) > 0
        assert inputs.min() >= start
        assert targets.max() <= end

    # Validation has 12 steps, and each window spans (history - 1) * interval + lead steps + 1.
    span = (history - 1) * interval + bundle.lead_steps + 1
    assert len(bundle.validation) == 12 - span + 1


def test_windows_in_range_edges():
    times = pd.date_range("2020-01-01", periods=20, freq="6h")
    layout = WindowLayout(history=2, history_interval=1, lead_steps=2)
    last = windows_in_range(times, layout, times[4], times[10])
    # First input at index 4 -> last input 5; target at index 10 -> last input 8.
    np.testing.assert_array_equal(last, [5, 6, 7, 8])


def test_window_sample_contents(tiny_file: Path):
    bundle = build_datasets(make_spec(tiny_file, history=2, history_interval=2, lead_time="12h"), seed=0)
    x, y, mask = bundle.train[0]
    mean, std = bundle.mean, bundle.std

    # The first window ends at step 2: inputs at steps 0 and 2, target at step 4; channels oldest first.
    # Cell (0, 0) is file row 3 (60 N), so its values are step + 0.03.
    assert x.shape == (4, 4, 4)
    assert x[0, 0, 0].item() * std[0] + mean[0] == pytest.approx(0.03, abs=1e-3)
    assert x[2, 0, 0].item() * std[0] + mean[0] == pytest.approx(2.03, abs=1e-3)
    assert x[3, 0, 0].item() * std[1] + mean[1] == pytest.approx(1002.03, abs=1e-2)
    assert y[0, 0, 0].item() * std[0] + mean[0] == pytest.approx(4.03, abs=1e-3)
    assert float(mask.min()) == 1.0


def test_irregular_step_names_lead_time(tmp_path: Path):
    source = tiny_dataset()
    times = source["time"].values.copy()
    times[30:] += np.timedelta64(1, "h")
    path = tmp_path / "gap.nc"
    source.assign_coords(time=times).to_netcdf(path)

    with pytest.raises(DataError, match="spec.data.leadTime") as error:
        build_datasets(make_spec(path), seed=0)
    assert "irregular" in str(error.value)
    assert "6 h" in str(error.value)


def test_lead_time_not_multiple_of_step(tiny_file: Path):
    with pytest.raises(DataError, match="spec.data.leadTime") as error:
        build_datasets(make_spec(tiny_file, lead_time="9h"), seed=0)
    assert "'9h'" in str(error.value)
    assert "6 h" in str(error.value)


def test_empty_split_names_split_and_span(tiny_file: Path):
    periods = dict(TINY_PERIODS, test={"start": "2021-01-01", "end": "2021-02-01"})
    with pytest.raises(DataError, match="test split has no samples") as error:
        build_datasets(make_spec(tiny_file, periods), seed=0)
    assert "spec.data.test" in str(error.value)
    assert "2021-01-01 00:00..2021-02-01 00:00" in str(error.value)
    assert "2020-01-01 00:00..2020-01-17 18:00" in str(error.value)


def test_dataset_fraction_seeded(ncep_air: Path):
    full = build_datasets(make_spec(ncep_air, NCEP_PERIODS), seed=0)
    half_a = build_datasets(make_spec(ncep_air, NCEP_PERIODS, dataset_fraction=0.5), seed=3)
    half_b = build_datasets(make_spec(ncep_air, NCEP_PERIODS, dataset_fraction=0.5), seed=3)
    half_c = build_datasets(make_spec(ncep_air, NCEP_PERIODS, dataset_fraction=0.5), seed=4)
    tenth = build_datasets(make_spec(ncep_air, NCEP_PERIODS, dataset_fraction=0.1), seed=3)

    assert len(half_a.train) == round(0.5 * len(full.train))
    np.testing.assert_array_equal(half_a.train.last_indices, half_b.train.last_indices)
    assert not np.array_equal(half_a.train.last_indices, half_c.train.last_indices)
    # The subsets are random, not a leading block, and a smaller fraction nests in a larger one.
    assert half_a.train.valid_times.max() > pd.Timestamp("2013-12-01")
    assert set(tenth.train.last_indices) <= set(half_a.train.last_indices)
    # Validation and test are never subsampled.
    assert len(half_a.validation) == len(full.validation)
    assert len(half_a.test) == len(full.test)


def test_subsample_keeps_one_window():
    subset = subsample(np.arange(5), 0.01, seed=0)
    assert len(subset) == 1


def test_temporal_coverage(ncep_air: Path):
    full = build_datasets(make_spec(ncep_air, NCEP_PERIODS), seed=0)
    covered = build_datasets(make_spec(ncep_air, NCEP_PERIODS, temporal_coverage="3mo"), seed=0)

    assert covered.train.valid_times.max() < pd.Timestamp("2013-04-01")
    assert covered.train.valid_times.max() == pd.Timestamp("2013-03-31T18:00")
    assert covered.train.init_times.min() == pd.Timestamp("2013-01-01")
    assert len(covered.train) == 90 * 4 - 1
    assert len(covered.train) < len(full.train)
    assert len(covered.test) == len(full.test)


def test_coverage_then_fraction(ncep_air: Path):
    spec = make_spec(ncep_air, NCEP_PERIODS, temporal_coverage="3mo", dataset_fraction=0.5)
    bundle = build_datasets(spec, seed=0)
    assert len(bundle.train) == round(0.5 * (90 * 4 - 1))
    assert bundle.train.valid_times.max() < pd.Timestamp("2013-04-01")


# NaN policy, statistics and climatology ----------------------------------------------


@pytest.fixture
def nan_file(tmp_path: Path) -> Path:
    source = tiny_dataset(variables=("temp", "wind"))
    values = source["wind"].values
    values[3, 1, 2] = np.nan
    values[50, 0, :] = np.nan
    path = tmp_path / "holes.nc"
    source.to_netcdf(path)
    return path


def test_nan_cells_are_masked(nan_file: Path, caplog):
    with caplog.at_level(logging.WARNING, logger="wxscale.data.dataset"):
        bundle = build_datasets(make_spec(nan_file), seed=0)

    assert bundle.nan_cells == {"temp": 0, "wind": 5}
    assert "5 of" in caplog.text
    assert "wind" in caplog.text

    # Step 3 is the target of the window ending at step 2 and the input of the next window.
    # File row 1 (0 N) is row 2 once latitudes run north to south.
    x, y, mask = bundle.train[2]
    assert float(mask[1, 2, 2]) == 0.0
    assert float(mask.sum()) == 2 * 16 - 1
    assert float(y[1, 2, 2]) == 0.0
    x_next, _, _ = bundle.train[3]
    assert bool(np.isfinite(x_next.numpy()).all())
    assert float(x_next[1, 2, 2]) == 0.0


def test_batched_reads_match_samples(nan_file: Path):
    from torch.utils.data import DataLoader

    bundle = build_datasets(make_spec(nan_file), seed=0)
    indices = [3, 0, 2, 7, 2]  # unsorted and repeated, with the masked cells of windows 2 and 3

    x, y, mask = bundle.train.batch(indices)
    for row, index in enumerate(indices):
        expected = bundle.train[index]
        assert torch.equal(x[row], expected[0]), index
        assert torch.equal(y[row], expected[1]), index
        assert torch.equal(mask[row], expected[2]), index

    # DataLoader fetches a batch through __getitems__ and collates it to the same tensors.
    (loaded,) = list(DataLoader(bundle.train, batch_size=len(indices), sampler=indices))
    assert torch.equal(loaded[0], x)
    assert torch.equal(loaded[1], y)
    assert torch.equal(loaded[2], mask)


def test_nan_policy_error_names_variable(nan_file: Path):
    with pytest.raises(DataError, match="'wind' has 5 NaN cells") as error:
        build_datasets(make_spec(nan_file, nan_policy="error"), seed=0)
    assert "nanPolicy" in str(error.value)


def test_normalisation_stats_from_train_only(tiny_file: Path):
    bundle = build_datasets(make_spec(tiny_file), seed=0)

    # Value = step + small offsets: train covers steps 0..39, so the mean is about 19.5, not 31.5.
    train_steps = np.arange(40)
    values = xr.open_dataset(tiny_file)["temp"].values[train_steps]
    assert bundle.mean[0] == pytest.approx(float(values.mean()), rel=1e-5)
    assert bundle.std[0] == pytest.approx(float(values.std()), rel=1e-4)
    assert bundle.mean[1] == pytest.approx(1000.0 + float(values.mean()), rel=1e-5)


def test_normalised_targets_centred(ncep_air: Path):
    bundle = build_datasets(make_spec(ncep_air, NCEP_PERIODS, coarsen=4), seed=0)
    targets = np.stack([bundle.train[i][1].numpy() for i in range(0, len(bundle.train), 7)])
    assert abs(float(targets.mean())) < 0.05
    assert float(targets.std()) == pytest.approx(1.0, abs=0.05)


def test_climatology_shape_and_train_only(tiny_file: Path):
    bundle = build_datasets(make_spec(tiny_file), seed=0)
    arrays = bundle.test_arrays()
    n_test = len(bundle.test)

    assert arrays.climatology.shape == (n_test, 2, 4, 4)
    assert arrays.targets.shape == (n_test, 2, 4, 4)
    assert arrays.forecast_inputs_last.shape == (n_test, 2, 4, 4)
    assert arrays.persistence is arrays.forecast_inputs_last
    assert len(arrays.valid_times) == n_test
    # All test days lie within 15 days of the training days, so each hour's climatology is
    # the mean of the training steps at that hour (train steps 0..39, value = step + offsets).
    hour = arrays.valid_times[0].hour
    train_steps = np.arange(40)
    same_hour = train_steps[train_steps % 4 == hour // 6]
    north_west = xr.open_dataset(tiny_file)["temp"].values[:, -1, 0]  # file row 3 is 60 N, now row 0
    assert arrays.climatology[0, 0, 0, 0] == pytest.approx(float(north_west[same_hour].mean()), rel=1e-6)
    # The persistence input is the step before the target.
    np.testing.assert_allclose(arrays.targets[:, 0, 0, 0] - arrays.forecast_inputs_last[:, 0, 0, 0], 1.0, atol=1e-3)


def test_climatology_fills_sparse_days(ncep_air: Path):
    bundle = build_datasets(make_spec(ncep_air, NCEP_PERIODS, temporal_coverage="2mo"), seed=0)
    fields = bundle.climatology.fields(pd.DatetimeIndex(["2014-03-10T06:00", "2014-07-01T12:00"]))

    assert fields.shape == (2, 1, 25, 53)
    # 10 March is within 15 days of the two training months; 1 July is not, so it falls back to all data.
    assert bool(np.isfinite(fields).all())


# Grid operations --------------------------------------------------------------------


def test_coarsen_trims_and_averages():
    source = tiny_dataset(latitudes=np.array([60.0, 30.0, 0.0, -30.0, -60.0]))
    coarse = coarsen(source, 2)

    assert coarse.sizes["lat"] == 2
    assert coarse.sizes["lon"] == 2
    np.testing.assert_allclose(coarse["lat"].values, [45.0, -15.0])
    expected = source["temp"].values[:, 0:2, 0:2].mean(axis=(1, 2))
    np.testing.assert_allclose(coarse["temp"].values[:, 0, 0], expected, rtol=1e-6)


def test_region_crop_either_convention(ncep_air: Path):
    regions = [
        {"latMin": 30, "latMax": 50, "lonMin": 240, "lonMax": 280},
        {"latMin": 30, "latMax": 50, "lonMin": -120, "lonMax": -80},
    ]
    infos = [grid_info(make_spec(ncep_air, NCEP_PERIODS, region=region)) for region in regions]
    assert infos[0] == infos[1]
    assert (infos[0].n_lat, infos[0].n_lon) == (9, 17)


def test_region_crossing_zero_meridian():
    spec = make_spec("synthetic", SYNTHETIC_PERIODS, synthetic=SMALL_SYNTHETIC)
    spec.region = {"latMin": -30, "latMax": 30, "lonMin": -40, "lonMax": 40}
    bundle = build_datasets(spec, seed=0)

    longitudes = bundle.longitudes
    assert longitudes[0] < 0 < longitudes[-1]
    assert np.allclose(np.diff(longitudes), 11.25)
    assert longitudes[0] >= -40
    assert longitudes[-1] <= 40
    assert np.all((bundle.latitudes >= -30) & (bundle.latitudes <= 30))


def test_region_outside_data(ncep_air: Path):
    region = {"latMin": -50, "latMax": -20, "lonMin": 0, "lonMax": 30}
    with pytest.raises(DataError, match="spec.data.region") as error:
        grid_info(make_spec(ncep_air, NCEP_PERIODS, region=region))
    assert "lat 15..75" in str(error.value)


def test_grid_info_matches_bundle(ncep_air: Path):
    region = {"latMin": 20, "latMax": 60, "lonMin": 220, "lonMax": 300}
    spec = make_spec(ncep_air, NCEP_PERIODS, coarsen=3, region=region)
    info = grid_info(spec)
    bundle = build_datasets(spec, seed=0)

    assert (info.n_lat, info.n_lon) == bundle.grid
    assert list(info.variables) == bundle.variables
    assert info.step_hours == bundle.step_hours


def test_grid_info_synthetic_does_not_generate():
    spec = make_spec("synthetic", SYNTHETIC_PERIODS, synthetic={"lat": 24, "lon": 48, "steps": 100}, coarsen=2)
    before = synthetic._generate_cached.cache_info()
    info = grid_info(spec)
    after = synthetic._generate_cached.cache_info()

    assert (info.n_lat, info.n_lon) == (12, 24)
    assert info.variables == ("tracer",)
    assert info.step_hours == 6.0
    assert after.misses == before.misses
    assert after.hits == before.hits


# Synthetic data --------------------------------------------------------------------


def test_synthetic_deterministic_per_seed():
    spec = SyntheticSpec(lat=8, lon=16, steps=40, variables=["a", "b"])
    synthetic._generate_cached.cache_clear()
    first = synthetic.generate(spec, seed=1)
    synthetic._generate_cached.cache_clear()
    again = synthetic.generate(spec, seed=1)
    other = synthetic.generate(spec, seed=2)

    np.testing.assert_array_equal(first["a"].values, again["a"].values)
    assert not np.allclose(first["a"].values, other["a"].values)
    assert not np.allclose(first["a"].values, first["b"].values)


def test_synthetic_metadata():
    spec = SyntheticSpec(lat=8, lon=16, steps=12, step_hours=3.0)
    dataset = synthetic.generate(spec, seed=0)

    assert dataset.attrs["synthetic"] == 1
    assert "synthetic" in dataset.attrs["title"]
    assert dataset["tracer"].attrs["units"] == "K"
    assert dataset["tracer"].dtype == np.float32
    assert pd.Timestamp(dataset["time"].values[1]) == pd.Timestamp("2000-01-01T03:00")
    assert dataset["lat"].values[0] == pytest.approx(90 - 180 / 16)
    assert np.all(np.diff(dataset["lat"].values) < 0)
    assert dataset["lon"].values[0] == 0.0


def test_synthetic_cache_returns_same_values():
    spec = SyntheticSpec(lat=8, lon=16, steps=20)
    before = synthetic._generate_cached.cache_info().hits
    synthetic.generate(spec, seed=5)
    synthetic.generate(spec, seed=5)
    assert synthetic._generate_cached.cache_info().hits == before + 1


def test_synthetic_not_solved_by_persistence():
    dataset = synthetic.generate(SyntheticSpec(lat=16, lon=32, steps=240), seed=0)
    values = dataset["tracer"].values.astype(np.float64)
    anomalies = values - values.mean(axis=0)

    persistence_rmse = float(np.sqrt(np.mean((values[1:] - values[:-1]) ** 2)))
    covariance = (anomalies[1:] * anomalies[:-1]).sum()
    lag1 = float(covariance / np.sqrt((anomalies[1:] ** 2).sum() * (anomalies[:-1] ** 2).sum()))

    assert bool(np.isfinite(values).all())
    assert persistence_rmse > 0.1 * float(values.std())
    assert persistence_rmse > 0.5  # kelvin, at a 6 h lead
    assert lag1 > 0.8


def test_synthetic_bundle(tmp_path: Path):
    spec = make_spec("synthetic", SYNTHETIC_PERIODS, synthetic=SMALL_SYNTHETIC, history=2)
    bundle = build_datasets(spec, seed=0)
    x, y, mask = bundle.train[0]

    assert "synthetic" in bundle.source_description
    assert bundle.variables == ["a", "b"]
    assert bundle.units == {"a": "K", "b": "K"}
    assert x.shape == (4, 16, 32)
    assert y.shape == (2, 16, 32)
    assert bundle.lead_time_hours == 6.0
    target = bundle.values[bundle.train.last_indices[0] + 1]
    np.testing.assert_allclose(bundle.denormalise(y.numpy()), target, rtol=1e-5)


def test_synthetic_unknown_variable():
    spec = make_spec("synthetic", SYNTHETIC_PERIODS, synthetic=SMALL_SYNTHETIC, variables=["c"])
    with pytest.raises(DataError, match="'c' not found"):
        grid_info(spec)


# Unreachable or silent S3 endpoints: bounded time, one clear error ---------------------------------------------


@pytest.fixture()
def silent_endpoint():
    """Yield the URL of a TCP server on 127.0.0.1 that accepts connections and never sends a response."""
    import socket
    import threading

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    server.settimeout(0.2)
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                accepted.append(server.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}"
    stop.set()
    thread.join(timeout=5)
    for connection in accepted:
        connection.close()
    server.close()


def _s3_source(endpoint: str, **loader) -> DataSpec:
    return DataSpec.model_validate({
        "source": "s3://bucket/store.zarr", "storage": {"endpointUrl": endpoint},
        "loader": {"timeoutSeconds": 1, "retries": 1, **loader},
        "train": {"start": "2000-01-01", "end": "2000-06-30"},
        "validation": {"start": "2000-07-01", "end": "2000-08-31"},
        "test": {"start": "2000-09-01", "end": "2000-12-31"},
    })


def test_s3_silent_endpoint_times_out(silent_endpoint: str, monkeypatch):
    import time

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    began = time.monotonic()

    with pytest.raises(DataError) as caught:
        grid_info(_s3_source(silent_endpoint))

    # Two attempts of one second each, for connecting and reading; without the bound botocore waits minutes.
    assert time.monotonic() - began < 30
    message = str(caught.value)
    assert message.startswith(f"spec.data.source: S3 endpoint {silent_endpoint} sent no response within 1 s")
    assert "in 2 attempt(s)" in message
    assert "spec.data.loader.timeoutSeconds" in message


def test_s3_refused_endpoint_names_it(monkeypatch):
    import socket

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    with socket.socket() as probe:  # a port that was free a moment ago, so nothing listens on it
        probe.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{probe.getsockname()[1]}"

    with pytest.raises(DataError) as caught:
        grid_info(_s3_source(endpoint))

    assert str(caught.value).startswith(f"spec.data.source: cannot connect to S3 endpoint {endpoint}")
    assert "spec.data.storage.endpointUrl" in str(caught.value)


def test_s3_missing_credentials_hint(silent_endpoint: str, monkeypatch, tmp_path: Path):
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    # No credential files and no instance-metadata lookup, so botocore finds no credentials without a request.
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "absent"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "absent"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")

    with pytest.raises(DataError) as caught:
        grid_info(_s3_source(silent_endpoint))

    assert str(caught.value).startswith("spec.data.source: no S3 credentials found to read s3://bucket/store.zarr")
    assert "AWS_ACCESS_KEY_ID" in str(caught.value)
