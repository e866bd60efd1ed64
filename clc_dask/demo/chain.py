"""The demo's processing chain: every stage of clc-dask run against the served region.

After ``region``, ``serve`` and ``search`` (see :mod:`clc_dask.demo`), the demo:

1. ``mosaics``  — searches the loopback STAC API per season (April, July, September) and
   writes SCL-masked median mosaics (all four 10 m bands) with their clear-observation count;
2. ``labels``   — rasterizes the CLC GeoPackage to Level-2 codes on the mosaics' grid;
3. ``train``    — trains the ``cpu-demo`` preset on the region *minus* a held-out strip
   (the southern quarter, :data:`HELD_OUT_FRACTION`), which training never sees;
4. ``predict``  — maps the September mosaic with the trained model on the local cluster;
5. ``evaluate`` — scores the held-out strip against the CLC reference (JSON report, a
   paper-style table and figures);
6. ``generalize`` — applies the CORINE rules (25 ha, 100 m) and writes styled polygons;
7. ``run``      — a production run over the region (tiles, manifest, STAC outputs) that reads
   the scenes through the STAC API and the COGs over HTTP, as a country run would.

Outputs go under the demo workdir (``mosaics/``, ``labels/``, ``model/``, ``maps/``,
``evaluation/``, ``run/``); each step reuses nothing half-written (every file is written
atomically) and overwrites its own outputs when the demo runs again.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import geopandas as gpd
import numpy as np
import yaml

from clc_dask.cluster import connect
from clc_dask.config import parse_run_config
from clc_dask.demo.training import demo_guard, train_demo
from clc_dask.evaluate import evaluate, write_report
from clc_dask.generalize import fixed_gpkg_date, generalize_file
from clc_dask.labels import make_labels, write_labels
from clc_dask.mosaic import make_mosaic, write_mosaic
from clc_dask.predict import predict_to_file
from clc_dask.rasters import open_raster, to_dataarray
from clc_dask.report import iou_bar_chart, map_figure, paper_table, write_table
from clc_dask.run import execute_run
from clc_dask.seasons import SEASONS
from clc_dask.stores import atomic_path

if TYPE_CHECKING:
    from odc.geo.geobox import GeoBox

    from clc_dask.demo import DemoContext

log = logging.getLogger(__name__)

#: Seasons mosaicked by the demo (the paper's three).
DEMO_SEASONS = SEASONS
#: Season the demo model is trained on and applied to.
DEMO_SEASON = "september"
#: Scenes above this cloud cover (%) are left out of the mosaics; SCL masks the rest.
DEMO_MOSAIC_MAX_CLOUD = 90.0
#: Southern fraction of the region kept out of training and used to score the model.
HELD_OUT_FRACTION = 0.25
#: Level-2 classes of the demo.
DEMO_LEVEL = 2


def _folders(ctx: DemoContext) -> dict[str, Path]:
    w = ctx.workdir
    return {
        "mosaics": w / "mosaics", "labels": w / "labels", "model": w / "model", "maps": w / "maps",
        "evaluation": w / "evaluation", "run": w / "run",
    }


def held_out_rows(size: int) -> slice:
    """Rows (pixels) of the held-out strip of a ``size`` px region."""
    return slice(size - int(round(size * HELD_OUT_FRACTION)), size)


def step_mosaics(ctx: DemoContext) -> dict[str, Any]:
    """Search each season through the loopback STAC API and write its mosaic."""
    region, servers = ctx.require_region(), ctx.require_servers()
    out = _folders(ctx)["mosaics"]
    written: dict[str, str] = {}
    dates: dict[str, int] = {}
    for season in DEMO_SEASONS:
        mosaic = make_mosaic(servers.stac_url, grid=region.geobox, season=season, years=[region.year],
                             max_cloud=DEMO_MOSAIC_MAX_CLOUD, collection=region.collection_id,
                             composite="all", chunk_size=1024)
        paths = write_mosaic(mosaic, out / f"{season}.tif", format="cog", clear_count=True, overwrite=True)
        written[season] = str(paths[0])
        dates[season] = len(mosaic.attrs["items"])
    ctx.outputs["mosaics"] = written
    return {"seasons": ",".join(DEMO_SEASONS), "dates": dates, "folder": str(out)}


def step_labels(ctx: DemoContext) -> dict[str, Any]:
    """Level-2 CLC codes on the mosaics' grid, and the training copy without the held-out strip."""
    region = ctx.require_region()
    out = _folders(ctx)["labels"]
    mosaic = open_raster(ctx.outputs["mosaics"][DEMO_SEASON])
    labels = make_labels(region.clc_path, like=mosaic, level=DEMO_LEVEL, field=region.clc_field)
    reference = write_labels(labels, out / "clc_level2.tif", level=DEMO_LEVEL, overwrite=True)
    codes = open_raster(reference).values[0]
    training = codes.copy()
    training[held_out_rows(codes.shape[0]), :] = 0
    train_path = write_labels(to_dataarray(training, mosaic.odc.geobox), out / "clc_level2_train.tif",
                              level=DEMO_LEVEL, overwrite=True)
    present = sorted(int(c) for c in np.unique(codes) if c)
    ctx.outputs.update(reference=str(reference), train_labels=str(train_path))
    return {"classes": present, "reference": str(reference)}


def step_train(ctx: DemoContext) -> dict[str, Any]:
    """Train the CPU demo preset on the region outside the held-out strip.

    Validation is the strip just north of the held-out one, behind a guard band of the
    network's receptive field (:func:`~clc_dask.demo.training.demo_guard`)."""
    paths = ctx.outputs
    mosaics = {DEMO_SEASON: paths["mosaics"][DEMO_SEASON]}
    result = train_demo(mosaics, paths["train_labels"], _folders(ctx)["model"], client=_client(ctx),
                        progress=False, epochs=ctx.epochs, guard=demo_guard(ctx.size))
    checkpoint = result.best_checkpoint or result.checkpoint
    paths["checkpoint"] = str(checkpoint)
    return {"epochs": result.epochs_run, "best_val_miou": round(float(result.best_val_miou or 0), 3),
            "checkpoint": str(checkpoint), "train_minutes": round(result.seconds / 60, 1)}


def step_predict(ctx: DemoContext) -> dict[str, Any]:
    """Map the September mosaic with the trained model on the local cluster."""
    paths = ctx.outputs
    out = predict_to_file(paths["mosaics"][DEMO_SEASON], paths["checkpoint"], _folders(ctx)["maps"] / "classes.tif",
                          client=_client(ctx), overwrite=True)
    paths["prediction"] = str(out)
    return {"prediction": str(out)}


def step_evaluate(ctx: DemoContext) -> dict[str, Any]:
    """Score the held-out strip (and the whole region) against the CLC reference."""
    paths = ctx.outputs
    out = _folders(ctx)["evaluation"]
    prediction = open_raster(paths["prediction"]).isel(band=0, drop=True)
    reference = open_raster(paths["reference"]).isel(band=0, drop=True)
    rows = held_out_rows(prediction.sizes["y"])
    held_out = evaluate(prediction.isel(y=rows), reference.isel(y=rows), level=DEMO_LEVEL)
    whole = evaluate(prediction, reference, level=DEMO_LEVEL)
    write_report(held_out, out / "report_held_out.json")
    write_report(whole, out / "report_region.json")
    table = paper_table({"held-out (Sept NRG, cpu-demo)": held_out, "whole region": whole}, with_mean=True)
    write_table(table, out / "iou_table.md")
    write_table(table, out / "iou_table.csv")
    iou_bar_chart(held_out, out / "iou_held_out.png")
    map_figure(prediction.isel(y=rows), reference.isel(y=rows), out / "map_held_out.png", level=DEMO_LEVEL)
    paths["report"] = str(out / "report_held_out.json")
    return {"held_out_miou": round(float(held_out["mean_iou"]), 3),
            "held_out_overall_accuracy": round(float(held_out["overall_accuracy"]), 3),
            "held_out_kappa": round(float(held_out["kappa"]), 3), "report": str(out / "report_held_out.json")}


def step_generalize(ctx: DemoContext) -> dict[str, Any]:
    """CORINE rules (25 ha, 100 m) on the class map, with polygons and the GDAL-sieve comparison."""
    paths = ctx.outputs
    maps = _folders(ctx)["maps"]
    with fixed_gpkg_date(ctx.require_region().year):  # a reproducible GeoPackage
        summary = generalize_file(paths["prediction"], maps / "generalized.tif", vector=maps / "generalized.gpkg",
                                  level=DEMO_LEVEL, chunk_size=1024, compare_sieve=True, overwrite=True)
    paths["generalized"] = str(maps / "generalized.tif")
    keep = {k: v for k, v in summary.items() if isinstance(v, int | float | str)}
    return {"generalized": str(maps / "generalized.tif"), "polygons": str(maps / "generalized.gpkg"), **keep}


def demo_run_config(ctx: DemoContext) -> dict[str, Any]:
    """The production-run config of the demo: the region's footprint, read through the STAC API."""
    region, servers = ctx.require_region(), ctx.require_servers()
    paths = ctx.outputs
    aoi = write_aoi(region.geobox, ctx.workdir / "aoi.gpkg")
    tile = max(256, region.size // 2)
    return {
        "name": "demo",
        "aoi": {"path": str(aoi)},
        "grid": {"epsg": int(region.epsg), "resolution": float(region.resolution), "tile_size": tile,
                 "chunk_size": min(tile, 1024)},
        "imagery": {"source": servers.stac_url, "collection": region.collection_id, "year": int(region.year),
                    "seasons": [DEMO_SEASON], "max_cloud": DEMO_MOSAIC_MAX_CLOUD, "composite": "nrg"},
        "model": {"checkpoint": paths["checkpoint"], "batch_size": 4, "window": 256, "halo": 64, "device": "cpu"},
        "classes": {"level": DEMO_LEVEL},
        "generalize": {"enabled": True, "mmu_ha": 25, "min_width_m": 100},
        "output": {"store": str(_folders(ctx)["run"]), "formats": ["cog"], "vectorize": True},
        "cluster": {"kind": "local", "n_workers": 2, "threads_per_worker": 1, "tiles_in_flight": 4},
    }


def write_aoi(geobox: GeoBox, path: Path) -> Path:
    """The region's footprint as a GeoPackage in the region's own CRS (so the run's grid
    is exactly the region's, with no reprojection rounding)."""
    frame = gpd.GeoDataFrame({"name": ["demo region"]}, geometry=[geobox.extent.geom], crs=geobox.crs.to_wkt())
    with atomic_path(path, suffix=".gpkg") as tmp:
        tmp.unlink()
        frame.to_file(tmp, driver="GPKG", layer="aoi")
    return path


def step_run(ctx: DemoContext) -> dict[str, Any]:
    """A production run over the region: tiles, manifest and STAC outputs."""
    raw = demo_run_config(ctx)
    config_path = ctx.workdir / "run.yaml"
    config_path.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    config = parse_run_config(raw, source=str(config_path))
    result = execute_run(config, overwrite=True, client=_client(ctx))
    return {"config": str(config_path), "tiles": len(result.computed), "store": str(result.store),
            "collection": str(result.collection)}


def _client(ctx: DemoContext) -> Any:
    """The demo's local Dask cluster, started once and closed when the demo ends."""
    if ctx.client is None:
        ctx.client = ctx.stack.enter_context(connect(kind="local", n_workers=2, threads_per_worker=1))
        log.info("demo cluster dashboard: %s", ctx.client.dashboard_link)
    return ctx.client


#: The chain's steps, appended to clc_dask.demo.DEMO_STEPS.
CHAIN_STEPS = [
    ("mosaics", step_mosaics),
    ("labels", step_labels),
    ("train", step_train),
    ("predict", step_predict),
    ("evaluate", step_evaluate),
    ("generalize", step_generalize),
    ("run", step_run),
]
