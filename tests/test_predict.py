"""Inference: seams, model residency, GPU annotation, bad input and the written outputs."""

from __future__ import annotations

import contextlib
import logging
import warnings

import cloudpickle
import dask
import numpy as np
import pytest
import rasterio
import torch
import xarray as xr
from distributed import LocalCluster, Scheduler, SpecCluster, Worker
from typer.testing import CliRunner

from clc_dask import predict as P
from clc_dask.classes import ClassTable, colormap
from clc_dask.errors import CheckpointError, ConfigError, InputError, OutputError
from clc_dask.grid import snapped_geobox
from clc_dask.model import Checkpoint, Normalization, build_model, save_checkpoint
from clc_dask.rasters import open_raster, to_dataarray, write_geotiff
from clc_dask.stores import file_sha256

BANDS = ("B04", "B03", "B02")
CODES = [11, 12, 21, 23, 31, 32, 51]
H, W = 256, 320  # px
OPTS = dict(window=128, halo=64)  # network input 256 px


def _checkpoint(path, level=2, codes=CODES, bands=BANDS, seed=0):
    torch.manual_seed(seed)
    table = ClassTable(level, codes)
    model = build_model("resnet18", len(bands), len(table), None)
    norm = Normalization((0.08,) * len(bands), (0.04,) * len(bands))
    return save_checkpoint(Checkpoint("resnet18", tuple(bands), table, norm, model.state_dict()), path)


def _mosaic_array(bands=BANDS, shape=(H, W), seed=1):
    """Smooth fields (so the random U-Net predicts several classes) with a no-data corner."""
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(200, 4000, (len(bands), shape[0] // 32 + 1, shape[1] // 32 + 1))
    arr = np.kron(coarse, np.ones((32, 32)))[:, : shape[0], : shape[1]]
    arr = (arr + rng.normal(0, 150, arr.shape)).clip(1, 10000).astype(np.uint16)
    arr[:, :40, :56] = 0  # no data (all bands 0)
    arr[0, 100:104, 100:104] = 0  # one band 0 only: still valid
    gbox = snapped_geobox((600000, 4400000, 600000 + shape[1] * 10, 4400000 + shape[0] * 10), 32633, 10)
    return to_dataarray(arr, gbox, band_names=list(bands))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("predict")
    mosaic = _mosaic_array()
    write_geotiff(mosaic, root / "mosaic.tif")
    return {"root": root, "mosaic": root / "mosaic.tif", "array": mosaic,
            "ckpt": _checkpoint(root / "model.pt")}


@pytest.fixture(scope="module")
def reference(files):
    """The whole mosaic predicted in memory without Dask: same window grid, one array."""
    grid = P.WindowGrid.from_options(**OPTS)
    loaded = P.load_model(str(files["ckpt"].resolve()), file_sha256(files["ckpt"]), "cpu")
    arr = files["array"].values
    pad_y = -(-H // grid.window) * grid.window + grid.after - H
    pad_x = -(-W // grid.window) * grid.window + grid.after - W
    padded = np.pad(arr, ((0, 0), (grid.before, pad_y), (grid.before, pad_x)))
    return P.infer_region(padded, (-grid.before, -grid.before), (0, H, 0, W), loaded, grid, batch_size=3)[0]


# ----------------------------------------------------------------------------- window grid


def test_window_grid_rounds_input_to_32_and_plans_depth():
    grid = P.WindowGrid.from_options(512, 64)
    assert (grid.before, grid.after, grid.input_size) == (64, 64, 640)
    odd = P.WindowGrid.from_options(512, 50)  # 612 → 640: 14 px more context on each side
    assert (odd.before, odd.after, odd.input_size) == (64, 64, 640)
    assert grid.depth([2048, 2048, 1024]) == 64  # chunk edges on the window grid: depth = halo
    assert grid.recompute_factor([2048, 2048]) == 1.0
    assert grid.depth([1000, 1000]) == 64 + 1000 % 512  # misaligned: reach back to the window start
    assert grid.recompute_factor([1000, 1000]) == 5 / 4
    plan = P._plan_axis(grid, [2048, 2048, 100])  # the last window padded with no data
    assert plan.pad == 412 and plan.chunks == (2048, 2048, 512) and plan.depth == 64
    merged = P._plan_axis(P.WindowGrid.from_options(32, 64), [128, 128, 20])  # 20 + 12 px < depth 64
    assert merged.pad == 12 and merged.chunks == (128, 160) and merged.depth == 64
    tiny = P._plan_axis(P.WindowGrid.from_options(32, 64), [20])
    assert tiny.chunks == (64,) and tiny.depth == 64 and tiny.pad == 44


def test_window_and_halo_checked():
    with pytest.raises(ConfigError, match="multiple of 32"):
        P.WindowGrid.from_options(100, 64)
    with pytest.raises(ConfigError, match="halo=-1"):
        P.WindowGrid.from_options(512, -1)


def test_device_choice_and_autocast(monkeypatch):
    assert P.resolve_device("cpu") == "cpu" and P.resolve_device("cuda:1") == "cuda:1"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert P.resolve_device("auto") == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert P.resolve_device("auto") == "cuda"
    with pytest.raises(ConfigError, match="device='tpu'"):
        P.resolve_device("tpu")
    monkeypatch.undo()
    assert isinstance(P.autocast_context("cpu"), contextlib.nullcontext)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "CUDA is not available" on this machine
        ctx = P.autocast_context("cuda:0")
    assert isinstance(ctx, torch.autocast) and ctx.fast_dtype == torch.bfloat16 and ctx.device == "cuda"


# ----------------------------------------------------------------------------- seams


def test_class_map_identical_for_any_chunking(files, reference):
    mosaic = open_raster(files["mosaic"], chunks=128)
    regular = P.predict(mosaic, files["ckpt"], chunk_size=128, **OPTS)
    assert regular.dtype == np.uint8 and regular.data.chunks == ((128, 128), (128, 128, 64))
    irregular = P.predict(mosaic.chunk({"y": (100, 90, 66), "x": (150, 170)}), files["ckpt"],
                          chunk_size=None, **OPTS)  # chunk edges off the window grid
    single = P.predict(mosaic, files["ckpt"], chunk_size=1024, **OPTS)
    a, b, c = dask.compute(regular.data, irregular.data, single.data)
    assert irregular.data.chunks == ((100, 90, 66), (150, 170))
    np.testing.assert_array_equal(a, reference)  # everywhere, the outer edge included
    np.testing.assert_array_equal(b, reference)
    np.testing.assert_array_equal(c, reference)
    assert len(np.unique(reference[reference > 0])) >= 2, "a one-class map would hide seams"


def test_codes_and_nodata(files, reference):
    assert set(np.unique(reference)) <= {0, *CODES}
    nodata = (files["array"].values == 0).all(axis=0)
    np.testing.assert_array_equal(reference == 0, nodata)
    assert reference[100:104, 100:104].all(), "a pixel with one band 0 is still valid"


# ----------------------------------------------------------------------------- one region, one task


@pytest.mark.parametrize("region", [(0, H, 0, W), (0, 128, 128, 256), (37, 201, 5, 319), (128, 256, 256, 320)])
def test_a_region_predicted_in_one_task_equals_the_whole_map(files, reference, region):
    data = open_raster(files["mosaic"], chunks=96).data  # any chunking: merged into one block
    codes = P.predict_region(data, files["ckpt"], origin=(0, 0), region=region, **OPTS, batch_size=2)
    assert codes.numblocks == (1, 1) and len([k for k in dict(codes.dask) if P.INFERENCE_LAYER in str(k)]) == 1
    r0, r1, c0, c1 = region
    np.testing.assert_array_equal(codes.compute(scheduler="sync"), reference[r0:r1, c0:c1])


def test_a_region_of_a_piece_equals_the_whole_map_of_the_piece_on_no_data(files):
    """``data`` at an offset: outside it is no data, as in a map of the piece alone on the grid."""
    arr = files["array"].values
    piece = arr[:, 40:200, 70:300]
    alone = np.zeros_like(arr)
    alone[:, 40:200, 70:300] = piece
    whole = P.predict(to_dataarray(alone, files["array"].odc.geobox, band_names=list(BANDS), name="mosaic"),
                      files["ckpt"], chunk_size=None, client=None, **OPTS).values
    codes = P.predict_region(dask.array.from_array(piece), files["ckpt"], origin=(40, 70),
                             region=(100, 190, 128, 290), client=None, **OPTS).compute(scheduler="sync")
    np.testing.assert_array_equal(codes, whole[100:190, 128:290])
    with pytest.raises(InputError, match="bands"):
        P.predict_region(dask.array.from_array(piece[:2]), files["ckpt"], origin=(0, 0), region=(0, 8, 0, 8), **OPTS)
    with pytest.raises(InputError, match="empty"):
        P.predict_region(dask.array.from_array(piece), files["ckpt"], origin=(0, 0), region=(8, 8, 0, 8), **OPTS)


# ----------------------------------------------------------------------------- model residency


def test_model_loaded_once_per_worker_and_never_in_the_graph(files):
    mosaic = open_raster(files["mosaic"], chunks=128)
    class_map = P.predict(mosaic, files["ckpt"], chunk_size=128, **OPTS)
    graph = dict(class_map.data.__dask_graph__())
    assert len(cloudpickle.dumps(graph)) < files["ckpt"].stat().st_size / 500  # ≪ 26 MB of weights
    assert not any(isinstance(v, torch.nn.Module | torch.Tensor) for v in graph.values())
    with LocalCluster(n_workers=1, threads_per_worker=2, processes=False, dashboard_address=":0") as lc, \
            lc.get_client() as client:
        P.clear_model_cache()
        first = class_map.data.compute()
        again = P.predict(mosaic, files["ckpt"], chunk_size=64, **OPTS).data.compute()  # 20 blocks
        assert P.load_count(file_sha256(files["ckpt"])) == 1
        np.testing.assert_array_equal(first, again)
        assert client.run(P.load_count) == {w: 1 for w in client.scheduler_info()["workers"]}


def test_changed_checkpoint_refused_on_the_worker(files, tmp_path):
    ckpt = _checkpoint(tmp_path / "m.pt", seed=5)
    class_map = P.predict(open_raster(files["mosaic"], chunks=128), ckpt, chunk_size=128, **OPTS)
    _checkpoint(tmp_path / "m.pt", seed=6)  # replaced after planning
    with pytest.raises(CheckpointError, match="changed after the prediction was planned"):
        class_map.compute(scheduler="sync")


# ----------------------------------------------------------------------------- GPU annotation


def _inference_layers(arr):
    return {k: v for k, v in arr.__dask_graph__().layers.items() if k.startswith(P.INFERENCE_LAYER)}


@pytest.mark.parametrize("advertised", [None, "GPU", "inference"])
def test_inference_tasks_need_the_resource_workers_advertise(files, monkeypatch, advertised):
    mosaic = open_raster(files["mosaic"], chunks=128)
    monkeypatch.setattr(P, "inference_resource", lambda client: advertised)
    whole = P.predict(mosaic, files["ckpt"], chunk_size=128, client=object(), **OPTS)
    one = P.predict_region(mosaic.data, files["ckpt"], origin=(0, 0), region=(0, 64, 0, 64), client=object(), **OPTS)
    expected = [None] if advertised is None else [{"resources": {advertised: 1}}]
    for arr in (whole.data, one):
        assert [layer.annotations for layer in _inference_layers(arr).values()] == expected


def test_inference_tasks_run_only_on_workers_advertising_gpu(files, reference, tmp_path, caplog):
    """Resource names are labels: a CPU worker advertising GPU gets every inference task."""
    spec = {"cpu": {"cls": Worker, "options": {"nthreads": 1}},
            "gpu": {"cls": Worker, "options": {"nthreads": 1, "resources": {"GPU": 1}}}}
    caplog.set_level(logging.DEBUG, logger="clc_dask.predict")
    with SpecCluster(workers=spec, scheduler={"cls": Scheduler, "options": {"dashboard_address": ":0"}}) as sc, \
            sc.get_client() as client:
        gpu_worker = next(a for a, w in client.scheduler_info()["workers"].items() if w["resources"])
        class_map = P.predict(open_raster(files["mosaic"], chunks=128), files["ckpt"], chunk_size=128,
                              client=client, device="auto", **OPTS)
        out = P.write_prediction(class_map, tmp_path / "map.tif")
    ran = [r.getMessage().rsplit(" on ", 1)[1] for r in caplog.records if r.getMessage().startswith("predicted block")]
    assert len(ran) == 6 and set(ran) == {gpu_worker}  # 2 × 3 blocks, all on the GPU worker
    with rasterio.open(out) as src:
        np.testing.assert_array_equal(src.read(1), reference)


def test_cuda_refused_without_gpu(files, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="no CUDA device"):
        P.predict(open_raster(files["mosaic"]), files["ckpt"], device="cuda", client=None)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_bf16_agrees_with_cpu(files, reference):
    class_map = P.predict(open_raster(files["mosaic"], chunks=128), files["ckpt"], chunk_size=128,
                          device="cuda", **OPTS).compute(scheduler="threads")
    valid = reference > 0
    assert (class_map.values[~valid] == 0).all()
    assert (class_map.values[valid] == reference[valid]).mean() > 0.97  # bf16 flips near-ties only


# ----------------------------------------------------------------------------- bad input


def test_bad_input_is_refused_before_anything_is_written(files, tmp_path):
    out = tmp_path / "out" / "map.tif"
    nrg = _mosaic_array(bands=("B08", "B04", "B03"))
    write_geotiff(nrg, tmp_path / "nrg.tif")
    cases = [
        (dict(mosaic_path=tmp_path / "nrg.tif"), CheckpointError, r"trained on bands \['B04', 'B03', 'B02'\]"),
        (dict(tiles=["9_9"]), InputError, "outside this grid"),
        (dict(tiles=["4-3"]), InputError, "not 'row_col'"),
        (dict(tiles=[]), InputError, "No tile selected"),
        (dict(halo=-1), ConfigError, "halo"),
        (dict(window=500), ConfigError, "multiple of 32"),
        (dict(batch_size=0), ConfigError, "batch_size"),
        (dict(mosaic_path=tmp_path / "missing.tif"), InputError, "does not exist"),
    ]
    for change, error, message in cases:
        kw = dict(mosaic_path=files["mosaic"], checkpoint_path=files["ckpt"], out_path=out,
                  probabilities_path=tmp_path / "out" / "p.zarr", tile_size=128, **OPTS) | change
        with pytest.raises(error, match=message):
            P.predict_to_file(**kw)
    assert not out.parent.exists() or not any(out.parent.iterdir())


def test_bad_mosaic_arrays_refused(files):
    arr = files["array"]
    with pytest.raises(InputError, match="uint16"):
        P.predict(arr.astype("float32"), files["ckpt"])
    with pytest.raises(InputError, match=r"\(band, y, x\)"):
        P.predict(arr.isel(band=0), files["ckpt"])
    with pytest.raises(InputError, match="empty"):
        P.predict(arr.isel(y=slice(0, 0)), files["ckpt"])


def test_bands_picked_by_name(files, reference):
    arr = files["array"]
    extra = xr.concat([arr.isel(band=[2, 1, 0]), arr.isel(band=[0]).assign_coords(band=["B08"])], "band")
    class_map = P.predict(extra, files["ckpt"], chunk_size=128, **OPTS)  # B02,B03,B04,B08 → B04,B03,B02
    np.testing.assert_array_equal(class_map.values, reference)


def test_existing_output_kept_without_overwrite(files, tmp_path):
    out = tmp_path / "map.tif"
    out.write_bytes(b"keep")
    with pytest.raises(OutputError, match="`overwrite`"):
        P.predict_to_file(files["mosaic"], files["ckpt"], out, overwrite=False, **OPTS)
    assert out.read_bytes() == b"keep"


# ----------------------------------------------------------------------------- outputs


def test_cog_and_probabilities(files, reference, tmp_path):
    out = P.predict_to_file(files["mosaic"], files["ckpt"], tmp_path / "map.tif", chunk_size=128,
                            probabilities_path=tmp_path / "probs.zarr", **OPTS)
    with rasterio.open(out) as src, rasterio.open(files["mosaic"]) as ref:
        codes = src.read(1)
        assert src.crs == ref.crs and src.transform == ref.transform and src.nodata == 0
        assert src.dtypes == ("uint8",) and src.count == 1
        cmap = src.colormap(1)
        assert src.tags()["class_codes"] == str(CODES)
    np.testing.assert_array_equal(codes, reference)
    for code in (0, *CODES):
        assert cmap[code] == colormap(2)[code]

    store = xr.open_zarr(tmp_path / "probs.zarr", mask_and_scale=False)
    probs = store["probability"]
    assert probs.dtype == np.uint8 and probs.shape == (len(CODES), H, W)
    assert store["probability"].encoding["chunks"] == (len(CODES), 128, 128)
    assert list(store["class"].values) == CODES
    np.testing.assert_array_equal(store["class_map"].values, reference)
    p = probs.values.astype(int)
    valid = reference > 0
    assert (p[:, ~valid] == 0).all()
    assert np.abs(p.sum(axis=0)[valid] - 255).max() <= len(CODES)  # rounding only
    from_probs = np.asarray(CODES)[p.argmax(axis=0)]
    assert (from_probs[valid] == reference[valid]).mean() > 0.99  # uint8 rounding may split near-ties
    assert not list(tmp_path.glob(".*")), "temporary files left behind"


def test_tiles_predicted_with_their_surroundings(files, reference, tmp_path):
    mosaic = open_raster(files["mosaic"], chunks=128)
    tile = P.predict(mosaic, files["ckpt"], tiles=["2_3"], tile_size=128, chunk_size=128, **OPTS)
    assert tile.shape == (128, 64)  # the last column of tiles is 320 - 256 px wide
    np.testing.assert_array_equal(tile.values, reference[128:256, 256:320])
    assert tile.odc.geobox == mosaic.odc.geobox[128:256, 256:320]
    span = P.predict(mosaic, files["ckpt"], tiles=["1_2", "2_1"], tile_size=128, chunk_size=128, **OPTS)
    assert span.shape == (256, 256)  # the window spanning both tiles
    written = P.predict_tiles_to_files(files["mosaic"], files["ckpt"], tmp_path / "out.tif", ["1_2", "2_3"],
                                       tile_size=128, chunk_size=128, **OPTS)
    assert written == {"1_2": tmp_path / "out_1_2.tif", "2_3": tmp_path / "out_2_3.tif"}
    with rasterio.open(written["1_2"]) as src:
        np.testing.assert_array_equal(src.read(1), reference[0:128, 128:256])
        assert src.transform == mosaic.odc.geobox[0:128, 128:256].affine


def test_level3_codes_are_uint16(tmp_path):
    ckpt = _checkpoint(tmp_path / "l3.pt", level=3, codes=[111, 211, 311, 512])
    arr = _mosaic_array(shape=(64, 64))
    class_map = P.predict(arr, ckpt, window=64, halo=64, chunk_size=64)
    values = class_map.compute(scheduler="sync").values
    assert class_map.dtype == np.uint16 and set(np.unique(values)) <= {0, 111, 211, 311, 512}
    assert class_map.attrs["clc_level"] == 3


# ----------------------------------------------------------------------------- CLI


def test_cli_predict_tiles(files, reference, tmp_path):
    from clc_dask.cli import app

    with LocalCluster(n_workers=1, threads_per_worker=2, processes=False, dashboard_address=":0") as lc:
        args = ["predict", "--mosaic", str(files["mosaic"]), "--checkpoint", str(files["ckpt"]),
                "--out", str(tmp_path / "map.tif"), "--tiles", "2_1, 1_2", "--tile-size", "128",
                "--window", "128", "--halo", "64", "--chunk-size", "128", "--batch-size", "2",
                "--probabilities", str(tmp_path / "p.zarr"), "--scheduler", lc.scheduler_address]
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 0, result.output
        assert (tmp_path / "map_1_2.tif").exists() and (tmp_path / "p_2_1.zarr").is_dir()
        with rasterio.open(tmp_path / "map_2_1.tif") as src:
            np.testing.assert_array_equal(src.read(1), reference[128:256, 0:128])
        again = CliRunner().invoke(app, args)  # outputs exist, no --overwrite
        assert isinstance(again.exception, OutputError)
        bad = CliRunner().invoke(app, [*args[:8], "7_7", *args[9:], "--overwrite"])
        assert isinstance(bad.exception, InputError) and "7_7" in str(bad.exception)
        assert lc.scheduler_info["workers"], "the CLI must not close a cluster it did not start"


def test_cli_checks_options_before_starting_a_cluster(files, tmp_path, monkeypatch):
    from clc_dask import cluster
    from clc_dask.cli import app

    def no_cluster(*args, **kwargs):
        raise AssertionError("a cluster was started for a bad option")

    monkeypatch.setattr(cluster, "get_client", no_cluster)
    base = ["predict", "--mosaic", str(files["mosaic"]), "--checkpoint", str(files["ckpt"]), "--out", str(tmp_path / "m.tif")]
    for option, message in ((["--window", "100"], "multiple of 32"), (["--batch-size", "0"], "batch_size"),
                            (["--device", "gpu"], "device='gpu'"), (["--tiles", " , "], "--tiles is empty")):
        result = CliRunner().invoke(app, base + option)
        assert isinstance(result.exception, ConfigError) and message in str(result.exception), option
    assert not any(tmp_path.iterdir())
