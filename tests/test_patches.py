"""Patch index (split, rejection, class statistics), the Dask stream and the Zarr cache."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from odc.geo.geobox import GeoBox
from typer.testing import CliRunner

from clc_dask.classes import ClassTable, colormap
from clc_dask.errors import ConfigError, GridMismatchError, InputError, OutputError
from clc_dask.model import band_statistics
from clc_dask.patches import (
    DaskPatchStream,
    ZarrPatchDataset,
    build_patch_index,
    cache_patches,
    epoch_order,
    find_clear_count,
    load_patch_index,
    patch_loader,
)
from clc_dask.rasters import to_dataarray, write_geotiff

torch.set_num_threads(1)

#: Class spectra (DN: B02, B03, B04, B08) distinct enough for a small model to learn.
SPECTRA = {11: (1300, 1200, 1100, 1700), 21: (700, 900, 800, 3200), 31: (350, 550, 300, 3800),
           51: (500, 400, 250, 150), 41: (400, 650, 500, 2000)}
BANDS = ["B02", "B03", "B04", "B08"]
ORIGIN = (500000.0, 4500000.0)


def grid(size: int, origin: tuple[float, float] = ORIGIN) -> GeoBox:
    return GeoBox.from_bbox((origin[0], origin[1] - size * 10, origin[0] + size * 10, origin[1]),
                            crs="EPSG:32633", resolution=10)


def synthetic_scene(directory: Path, size: int = 256, seasons: tuple[str, ...] = ("september",),
                    seed: int = 0, cell: int = 16, nodata_box: tuple[slice, slice] | None = None,
                    rare_box: tuple[slice, slice] | None = None,
                    unlabelled_box: tuple[slice, slice] | None = None) -> tuple[dict[str, Path], Path]:
    """Seeded label raster of 16 px class cells (11/21/31/51) and per-season mosaics whose
    spectra depend on the class (+ noise); optional no-data, rare-class (41) and unlabelled boxes."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    codes = np.array([11, 21, 31, 51], dtype=np.uint8)
    coarse = rng.integers(0, len(codes), size=(-(-size // cell), -(-size // cell)))
    labels = codes[np.repeat(np.repeat(coarse, cell, 0), cell, 1)[:size, :size]]
    if rare_box is not None:
        labels[rare_box] = 41
    gbox = grid(size)
    spectra = np.zeros((256, 4))
    for code, values in SPECTRA.items():
        spectra[code] = values
    mosaics = {}
    for i, season in enumerate(seasons):
        img = spectra[labels].transpose(2, 0, 1) * (1 + 0.2 * i) + rng.normal(0, 120, (4, size, size))
        img = np.clip(img, 1, 10000).astype(np.uint16)
        if nodata_box is not None:
            img[(slice(None), *nodata_box)] = 0
        mosaics[season] = write_geotiff(to_dataarray(img, gbox, BANDS), directory / f"mosaic_{season}.tif")
    if unlabelled_box is not None:
        labels[unlabelled_box] = 0
    label_path = write_geotiff(to_dataarray(labels, gbox), directory / "labels.tif", colormap=colormap(2))
    return mosaics, label_path


def read(path: Path) -> np.ndarray:
    with rasterio.open(path) as src:
        return src.read()


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    root = tmp_path_factory.mktemp("scene")
    mosaics, labels = synthetic_scene(root, 256, ("september", "april"),
                                      nodata_box=(slice(0, 32), slice(0, 24)),
                                      rare_box=(slice(200, 208), slice(8, 16)))
    return root, mosaics, labels


@pytest.fixture(scope="module")
def index(scene):
    _, mosaics, labels = scene
    return build_patch_index(mosaics, labels, patch_size=32, bands="nrg", split_block=2, seed=3)


def test_index_table_counts_and_split_share(index):
    t = index.table
    assert index.seasons == ("september", "april") and index.bands == ("B08", "B04", "B03")
    assert len(t) == 2 * 8 * 8
    # the no-data box covers 32×24 of the first patch (75 % > 50 %): rejected in both seasons
    first = t[(t.row == 0) & (t.col == 0)]
    assert list(first.reason) == ["nodata", "nodata"] and not first.usable.any()
    assert first.nodata_fraction.tolist() == [0.75, 0.75]
    assert t.usable.sum() == 2 * 63
    counts = index.counts()
    assert counts["train"]["total"] + counts["val"]["total"] == 126
    assert counts["train"]["september"] == counts["train"]["april"]
    share = counts["val"]["total"] / 126
    assert 0.2 <= share <= 0.3, share
    # both seasons of a location are in the same split
    per_location = t.groupby(["row", "col"])["split"].nunique()
    assert (per_location == 1).all()
    assert index.classes.codes == (11, 21, 31, 41, 51)


def test_no_patch_crosses_the_train_val_boundary(scene):
    _, mosaics, labels = scene
    for guard in (0, 1):
        idx = build_patch_index(mosaics, labels, patch_size=32, split_block=2, guard=guard, seed=3)
        size = idx.patch_size
        owner = np.full(idx.geobox.shape, "", dtype=object)
        for split in ("train", "val"):
            for s in idx.samples(split):
                window = owner[s.window]
                assert window.shape == (size, size)
                assert set(np.unique(window)) <= {"", split}, "a pixel belongs to train and val"
                owner[s.window] = split
        t = idx.table
        # whole split blocks: every location of a block has the same split
        blocks = t.groupby(["block_row", "block_col"])["split"].agg(lambda v: set(v) - {"guard"})
        assert all(len(v) <= 1 for v in blocks)
        val_pixels = np.argwhere(owner == "val")
        train_pixels = np.argwhere(owner == "train")
        gap = np.abs(train_pixels[:, None, :] - val_pixels[None, ::97, :]).max(axis=2).min()
        if guard:
            # a full patch of guard band separates training from validation pixels
            assert gap > size
            assert (t.split == "guard").any()
        else:
            assert gap >= 1


def test_split_is_deterministic_and_depends_on_seed(scene, index):
    _, mosaics, labels = scene
    again = build_patch_index(mosaics, labels, patch_size=32, bands="nrg", split_block=2, seed=3)
    assert again.fingerprint() == index.fingerprint()
    other = build_patch_index(mosaics, labels, patch_size=32, bands="nrg", split_block=2, seed=4)
    assert other.samples("val") != index.samples("val")


def test_statistics_equal_numpy(scene, index):
    _, mosaics, labels = scene
    codes = read(labels)[0]
    t = index.table
    for _, rec in t[t.season == "april"].iterrows():
        ys = slice(rec.y0, rec.y0 + 32)
        xs = slice(rec.x0, rec.x0 + 32)
        window = codes[ys, xs]
        for code in (11, 21, 31, 41, 51):
            assert rec[f"px_{code}"] == int((window == code).sum())
    # normalisation = band statistics of the usable training windows (reflectance)
    stacks = []
    for s in index.samples("train"):
        data = read(mosaics[s.season])[[3, 2, 1]]
        stacks.append(data[(slice(None), *s.window)])
    expected = band_statistics(np.stack(stacks))
    np.testing.assert_allclose(index.normalization.mean, expected.mean, rtol=1e-9)
    np.testing.assert_allclose(index.normalization.std, expected.std, rtol=1e-6)


def test_class_statistics_flag_rare_classes(index):
    stats = index.class_statistics().set_index("code")
    t = index.table[index.table.usable]
    for code in (11, 21, 31, 41, 51):
        for split in ("train", "val"):
            rows = t[t.split == split]
            assert stats.loc[code, f"{split}_pixels"] == rows[f"px_{code}"].sum()
            assert stats.loc[code, f"{split}_patches"] == (rows[f"px_{code}"] > 0).sum()
    assert stats.loc[41, "rare"] and "training pixels" in stats.loc[41, "note"]
    assert not stats.loc[11, "rare"]


def test_cloud_and_unlabelled_rejection(tmp_path):
    mosaics, labels = synthetic_scene(tmp_path, 128, unlabelled_box=(slice(96, 128), slice(96, 128)))
    clear = np.full((128, 128), 3, np.uint8)
    clear[0:20, 32:64] = 0  # 62.5 % of patch (0, 1) never clear
    clear_path = write_geotiff(to_dataarray(clear, grid(128)), tmp_path / "mosaic_september_clear_count.tif",
                               nodata=None)
    assert find_clear_count(mosaics["september"]) == clear_path
    idx = build_patch_index(mosaics, labels, patch_size=32, split_block=1,
                            clear_counts={"september": clear_path})
    t = idx.table.set_index(["row", "col"])
    assert t.loc[(0, 1), "reason"] == "cloud" and t.loc[(0, 1), "cloud_fraction"] == 0.625
    assert t.loc[(3, 3), "reason"] == "unlabelled" and t.loc[(3, 3), "unlabelled_fraction"] == 1.0
    assert t["usable"].sum() == 14
    relaxed = build_patch_index(mosaics, labels, patch_size=32, split_block=1, max_cloud_fraction=0.7,
                                clear_counts={"september": clear_path})
    assert relaxed.table["usable"].sum() == 15


def test_bad_inputs_raise_clear_errors(tmp_path, scene):
    _, mosaics, labels = scene
    # zero usable patches: the message names the threshold to relax
    empty = write_geotiff(to_dataarray(np.zeros((4, 256, 256), np.uint16), grid(256), BANDS),
                          tmp_path / "empty.tif")
    with pytest.raises(ConfigError, match=r"Zero usable patches.*`max_nodata_fraction`"):
        build_patch_index({"september": empty}, labels, patch_size=32)
    # label raster on another grid
    shifted = write_geotiff(to_dataarray(read(labels)[0], grid(256, (500100.0, 4500000.0))),
                            tmp_path / "shifted.tif")
    with pytest.raises(GridMismatchError, match="label"):
        build_patch_index(mosaics, shifted, patch_size=32)
    with pytest.raises(InputError, match=r"bands .*B01"):
        build_patch_index(mosaics, labels, patch_size=32, bands=["B01", "B02"])
    with pytest.raises(ConfigError, match="multiple of 32"):
        build_patch_index(mosaics, labels, patch_size=48)
    with pytest.raises(InputError, match="does not exist"):
        build_patch_index({"september": tmp_path / "missing.tif"}, labels)
    with pytest.raises(ConfigError, match="has no mosaic"):
        build_patch_index({"september": mosaics["september"]}, labels,
                          clear_counts={"april": mosaics["april"]})
    with pytest.raises(ConfigError, match="`split_block`"):
        build_patch_index(mosaics, labels, patch_size=128, split_block=2)


def test_save_load_round_trip(tmp_path, index):
    index.save(tmp_path / "idx")
    loaded = load_patch_index(tmp_path / "idx")
    assert loaded.fingerprint() == index.fingerprint()
    assert loaded.samples("val") == index.samples("val")
    assert loaded.normalization == index.normalization and loaded.classes == index.classes
    assert loaded.geobox == index.geobox
    stats = json.loads((tmp_path / "idx" / "class_stats.json").read_text())
    assert stats["rare"] == [41]
    assert stats["counts"]["val"]["total"] == index.counts()["val"]["total"]
    (tmp_path / "idx" / "patches.csv").write_text((tmp_path / "idx" / "patches.csv").read_text()
                                                 .replace(",val,", ",train,", 1))
    with pytest.raises(InputError, match="does not match"):
        load_patch_index(tmp_path / "idx")
    with pytest.raises(InputError, match="no patch index"):
        load_patch_index(tmp_path)


def test_epoch_order_depends_only_on_seed_and_epoch():
    a = epoch_order(50, 7, 3)
    assert np.array_equal(a, epoch_order(50, 7, 3)) and sorted(a) == list(range(50))
    assert not np.array_equal(a, epoch_order(50, 7, 4))
    assert not np.array_equal(a, epoch_order(50, 8, 3))
    assert np.array_equal(epoch_order(5, 7, 3, shuffle=False), np.arange(5))


def test_stream_yields_normalised_windows(scene, index):
    _, mosaics, labels = scene
    stream = DaskPatchStream(index, "val", seed=1, prefetch=3)
    codes = read(labels)[0]
    items = list(stream)
    assert len(items) == len(stream) == index.counts()["val"]["total"]
    for sample, (x, y) in zip(stream.order(), items, strict=True):
        dn = read(mosaics[sample.season])[[3, 2, 1]][(slice(None), *sample.window)]
        expected = index.normalization.apply(torch.from_numpy(dn.astype(np.int32))[None])[0]
        assert x.dtype == torch.float32 and torch.equal(x, expected)
        assert y.dtype == torch.uint8
        assert torch.equal(y, torch.from_numpy(index.classes.to_index(codes[sample.window])))


def test_stream_and_zarr_cache_give_identical_batches(tmp_path, index):
    store = cache_patches(index, tmp_path / "patches.zarr", prefetch=4)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary store left"
    stream = DaskPatchStream(index, "train", seed=5, prefetch=4)
    cached = ZarrPatchDataset(store, "train", index=index, seed=5)
    preloaded = ZarrPatchDataset(store, "train", index=index, seed=5, preload=True)
    assert cached.samples == stream.samples == preloaded.samples
    assert preloaded.nbytes == len(stream) * (3 * 2 + 1) * index.patch_size**2  # uint16 DN, uint8 codes
    firsts = []
    for epoch in (0, 1):
        a = list(patch_loader(stream, 8, epoch))
        b = list(patch_loader(cached, 8, epoch, num_workers=0))
        c = list(patch_loader(preloaded, 8, epoch))
        assert len(a) == len(b) == len(c) == -(-len(stream) // 8)
        for (xa, ya), (xb, yb), (xc, yc) in zip(a, b, c, strict=True):
            assert xa.numpy().tobytes() == xb.numpy().tobytes() == xc.numpy().tobytes()
            assert ya.numpy().tobytes() == yb.numpy().tobytes() == yc.numpy().tobytes()
        firsts.append(a[0][0])
    assert isinstance(preloaded._arrays[0], np.ndarray), "the preloaded split is held in memory"
    assert not torch.equal(firsts[0], firsts[1]), "epochs should be shuffled differently"
    # a per-epoch cap takes the same seeded subset on both paths, another one each epoch
    capped = DaskPatchStream(index, "train", seed=5, limit=10)
    capped_cache = ZarrPatchDataset(store, "train", index=index, seed=5, limit=10)
    assert len(capped) == len(capped_cache.sampler()) == 10 and capped.order(0) != capped.order(1)
    assert set(capped.order(0)) <= set(stream.samples)
    for (xa, ya), (xb, yb) in zip(patch_loader(capped, 4, 1), patch_loader(capped_cache, 4, 1), strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    # a complete store of the same index is reused; a store of another index is refused
    mtime = (store / "zarr.json").stat().st_mtime_ns
    cache_patches(index, store)
    assert (store / "zarr.json").stat().st_mtime_ns == mtime


def test_zarr_cache_of_another_index_refused(tmp_path, scene, index):
    _, mosaics, labels = scene
    store = cache_patches(index, tmp_path / "p.zarr")
    other = build_patch_index(mosaics, labels, patch_size=32, bands="nrg", split_block=2, seed=9)
    with pytest.raises(InputError, match="another patch index"):
        ZarrPatchDataset(store, "train", index=other)
    with pytest.raises(InputError, match="does not exist"):
        ZarrPatchDataset(tmp_path / "nothing.zarr")
    import zarr

    partial = zarr.open_group(str(tmp_path / "partial.zarr"), mode="w")
    partial.attrs.update({"format": "clc-dask-patch-cache"})  # as if killed before completion
    with pytest.raises(InputError, match="not a complete"):
        ZarrPatchDataset(tmp_path / "partial.zarr")
    rewritten = cache_patches(index, tmp_path / "partial.zarr")
    assert len(ZarrPatchDataset(rewritten, "val", index=index)) == index.counts()["val"]["total"]


def test_stream_from_distributed_client_equals_local(index):
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=1, threads_per_worker=2, processes=False, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        stream = DaskPatchStream(index, "train", client=client, prefetch=8)
        for epoch in (0, 1):  # abandoned mid-epoch: its futures must not disturb the next requests
            for i, _ in enumerate(patch_loader(stream, 4, epoch)):
                if i == 2:
                    break
        remote = [list(patch_loader(stream, 4, epoch)) for epoch in (0, 1)]
    local = DaskPatchStream(index, "train", prefetch=4)
    for epoch in (0, 1):
        expected = list(patch_loader(local, 4, epoch))
        assert len(remote[epoch]) == len(expected)
        for (xa, ya), (xb, yb) in zip(remote[epoch], expected, strict=True):
            assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_cli_patches(tmp_path, scene):
    from clc_dask.cli import app

    _, mosaics, labels = scene
    out = tmp_path / "idx"
    args = ["patches", "--mosaic", f"september={mosaics['september']}", "--mosaic",
            f"april={mosaics['april']}", "--labels", str(labels), "--patch-size", "32",
            "--split-block", "2", "--val-side", "blocks", "--guard", "0", "--composite", "nrg",
            "--out", str(out), "--cache-zarr"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "RARE" in result.output and "september" in result.output
    idx = load_patch_index(out)
    assert idx.counts()["train"]["total"] + idx.counts()["val"]["total"] == 126
    assert len(ZarrPatchDataset(out / "patches.zarr", "val", index=idx)) == idx.counts()["val"]["total"]
    again = CliRunner().invoke(app, args)
    assert isinstance(again.exception, OutputError)
    bad = CliRunner().invoke(app, ["patches", "--mosaic", f"sept={mosaics['september']}",
                                   "--labels", str(labels), "--out", str(tmp_path / "x")])
    assert isinstance(bad.exception, ConfigError) and "september" in str(bad.exception)


def test_class_table_of_index_uses_given_codes(scene):
    _, mosaics, labels = scene
    idx = build_patch_index(mosaics, labels, patch_size=32, split_block=2, codes=[11, 21, 31, 51],
                            max_unlabelled_fraction=0.9)
    assert idx.classes == ClassTable(2, [11, 21, 31, 51])
    t = idx.table.set_index(["season", "row", "col"])
    assert t.loc[("september", 6, 0), "unlabelled_fraction"] == pytest.approx(64 / 1024)


def test_index_from_a_demo_region_mosaic(tmp_path, demo_region):
    """The mosaic stage's output (COG + clear-count sidecar) and the demo's Level-3 codes feed the index."""
    from clc_dask.items import composite_bands, normalize_items
    from clc_dask.load import load_scenes
    from clc_dask.mosaic import seasonal_mosaic, write_mosaic

    bands = composite_bands("nrg")
    items = [it for it, sc in zip(demo_region.items(), demo_region.scenes, strict=True) if sc.season == "september"]
    scenes = load_scenes(normalize_items(items, bands), demo_region.geobox, bands=bands, chunk_size=256)
    mosaic = write_mosaic(seasonal_mosaic(scenes, composite="nrg"), tmp_path / "mosaic_september.tif")[0]
    clear = find_clear_count(mosaic)
    assert clear is not None
    idx = build_patch_index({"september": mosaic}, demo_region.codes_path, patch_size=64, split_block=2,
                            clear_counts={"september": clear})
    assert idx.bands == bands and idx.classes.level == 2
    level2 = {c // 10 for c in np.unique(demo_region.read_codes()) if c}
    assert set(idx.classes.codes) <= level2 and len(idx.classes) >= 5
    counts = idx.counts()
    assert counts["train"]["total"] + counts["val"]["total"] + counts["rejected"]["total"] == 64
    assert 0.15 <= counts["val"]["total"] / (counts["train"]["total"] + counts["val"]["total"]) <= 0.35


def run_main(monkeypatch, capsys, *args) -> tuple[int, str, str]:
    """``clc-dask ARGS`` as from a shell: exit code, stdout, stderr."""
    import sys

    from clc_dask.cli import main

    monkeypatch.setattr(sys, "argv", ["clc-dask", *map(str, args)])
    code = 0
    try:
        main()
    except SystemExit as exc:
        code = exc.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_errors_name_the_options_of_library_parameters(tmp_path, scene, monkeypatch, capsys):
    """The library names `split_block`; the command line shows --split-block, before writing anything."""
    _, mosaics, labels = scene
    with pytest.raises(ConfigError, match=r"lower `split_block` or `patch_size`"):
        build_patch_index(mosaics, labels, patch_size=128, split_block=2)
    code, _, err = run_main(monkeypatch, capsys, "patches", "--mosaic", f"september={mosaics['september']}",
                            "--labels", labels, "--patch-size", "128", "--split-block", "2",
                            "--val-side", "blocks", "--guard", "0", "--out", tmp_path / "idx")
    assert code == 1
    assert "lower --split-block or --patch-size" in err and "`" not in err
    assert not (tmp_path / "idx").exists()


def test_cli_patches_on_a_scheduler_by_its_address_alias(tmp_path, scene, monkeypatch, capsys):
    """--address (kept for scripts) and --scheduler compute on a running cluster and leave it running;
    the index equals the one computed with threads in this process."""
    from distributed import Client, LocalCluster

    _, mosaics, labels = scene
    local = build_patch_index({"september": mosaics["september"]}, labels, patch_size=32, split_block=2)
    common = ["patches", "--mosaic", f"september={mosaics['september']}", "--labels", labels,
              "--patch-size", "32", "--split-block", "2", "--val-side", "blocks", "--guard", "0"]
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None) as cluster:
        for option in ("--address", "--scheduler"):
            out = tmp_path / option.strip("-")
            code, stdout, err = run_main(monkeypatch, capsys, *common, option, cluster.scheduler_address,
                                         "--out", out)
            assert code == 0, err
            assert load_patch_index(out).fingerprint() == local.fingerprint()
        with Client(cluster.scheduler_address) as client:  # the command closed only its own client
            assert len(client.scheduler_info()["workers"]) == 1


# --------------------------------------------------------------------------- guard bands


def _patch_gap(a: tuple[int, int], b: tuple[int, int], size: int) -> int:
    """Pixels between two patches (0 = touching): the larger of the row and column gaps."""
    return max(abs(a[0] - b[0]) * size - size, abs(a[1] - b[1]) * size - size, 0)


def test_training_splits_keep_the_receptive_field_between_validation_and_training(tmp_path):
    """A training config's default split: validation is the southern strip, and the guard band
    is the encoder's receptive field, so no training patch lies within reach of a validation pixel."""
    from clc_dask.model import receptive_field
    from clc_dask.train import index_for_config, make_train_config

    mosaics, labels = synthetic_scene(tmp_path / "wide", 1536)
    config = make_train_config(encoder="resnet18", patch_size=64, seasons=("september",), composite="nrg")
    assert config.guard == "auto" and config.val_side == "south"
    reach = receptive_field("resnet18")
    assert reach == 576 and config.guard_patches == reach // 64
    index = index_for_config(config, mosaics, labels)
    assert index.settings["guard"] == 9 and index.settings["val_side"] == "south"
    cells = {split: [(s.row, s.col) for s in index.samples(split)] for split in ("train", "val")}
    assert cells["train"] and cells["val"]
    # validation is a strip of whole rows at the southern edge, training north of the guard band
    assert min(r for r, _ in cells["val"]) > max(r for r, _ in cells["train"])
    gaps = [_patch_gap(t, v, 64) for t in set(cells["train"]) for v in set(cells["val"])]
    assert min(gaps) >= reach
    share = len(cells["val"]) / (len(cells["train"]) + len(cells["val"]))
    assert 0.2 <= share <= 0.45, share
    # a config made from this index keeps its split
    from clc_dask.train import config_for_index

    again = config_for_index(index)
    assert again.guard == 9 and again.val_side == "south" and again.guard_patches == 9


@pytest.mark.parametrize("side", ["north", "south", "east", "west"])
def test_validation_strip_lies_along_its_side_behind_the_guard(scene, side):
    _, mosaics, labels = scene
    idx = build_patch_index(mosaics, labels, patch_size=32, guard=2, val_side=side, val_fraction=0.2)
    lines = {split: [(s.row, s.col) for s in idx.samples(split)] for split in ("train", "val")}
    axis = 0 if side in ("north", "south") else 1
    val_lines = {cell[axis] for cell in lines["val"]}
    train_lines = {cell[axis] for cell in lines["train"]}
    edge = 0 if side in ("north", "west") else 7
    assert edge in val_lines and len(val_lines) >= 1
    assert min(abs(t - v) for t in train_lines for v in val_lines) > 2  # two lines of guard between
    assert idx.settings["val_side"] == side


def test_guard_band_that_leaves_no_training_area_is_a_clear_error(tmp_path, scene, monkeypatch, capsys):
    """`clc-dask patches` defaults to the receptive field of --encoder: on an area too small for it
    the error says so and names the option, before anything is written."""
    _, mosaics, labels = scene
    with pytest.raises(ConfigError, match=r"guard band of 9 patch\(es\) \(288 px\).*narrower `guard`"):
        build_patch_index(mosaics, labels, patch_size=32, guard=9, val_side="south")
    code, _, err = run_main(monkeypatch, capsys, "patches", "--mosaic", f"september={mosaics['september']}",
                            "--labels", labels, "--patch-size", "32", "--out", tmp_path / "idx")
    assert code == 1
    assert "guard band of 33 patch(es) (1056 px)" in err and "narrower --guard" in err
    assert not (tmp_path / "idx").exists()
    code, _, err = run_main(monkeypatch, capsys, "patches", "--mosaic", f"september={mosaics['september']}",
                            "--labels", labels, "--patch-size", "32", "--val-side", "up", "--out", tmp_path / "idx")
    assert code == 1 and "--val-side must be one of north, south, east, west" in err
    code, _, err = run_main(monkeypatch, capsys, "patches", "--mosaic", f"september={mosaics['september']}",
                            "--labels", labels, "--guard", "wide", "--out", tmp_path / "idx")
    assert code == 1 and "--guard 'wide' is not a number of patches or auto" in err
    assert not (tmp_path / "idx").exists()


def test_unguarded_block_split_is_warned_about_a_given_split_is_not(scene, index, caplog):
    """Training on a block split narrower than the receptive field warns that validation is
    optimistic; a given split (an experiment's, with its own guard bands) is not second-guessed."""
    from clc_dask.train import check_index, config_for_index

    _, mosaics, labels = scene
    config = config_for_index(index, encoder="resnet18")
    with caplog.at_level("WARNING", logger="clc_dask.train.config"):
        check_index(config, index)
    assert "guard band (0 px) is narrower than the receptive field of resnet18 (576 px)" in caplog.text
    split_map = np.where(np.arange(8)[:, None] < 6, "train", "val").repeat(8, axis=1)
    given = build_patch_index(mosaics, labels, patch_size=32, bands="nrg", split_map=split_map)
    assert given.settings["split"] == "given"
    caplog.clear()
    with caplog.at_level("WARNING", logger="clc_dask.train.config"):
        check_index(config_for_index(given, encoder="resnet18"), given)
    assert "narrower than the receptive field" not in caplog.text
