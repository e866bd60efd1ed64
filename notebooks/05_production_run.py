# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 5 · A production run, and what it leaves behind
#
# `clc-dask run` maps an area tile by tile from one YAML config: scenes → mosaic → U-Net →
# generalized CLC map, as COGs, GeoPackage polygons and a STAC catalog. This notebook runs it on
# the demo region cut into small tiles (the paper uses 2048 px):
#
# 1. writes the run config and checks it with a `--dry-run` (tiles, scenes, bytes, tasks),
# 2. runs the first tiles on the cluster, then **resumes** the run for the rest, as after an
#    interruption — finished tiles are skipped,
# 3. inspects the manifest (the record of finished tiles), the progress, and the STAC outputs,
#    opening a tile's map through its STAC Item.
#
# Inputs: the demo region and the checkpoint of notebook 03 (trained here if missing).
# Outputs: `WORKDIR/run/` (config, AOI) and the run's store `WORKDIR/run/store/`.

# %%
import json
import shutil
import subprocess
import sys
from pathlib import Path

import geopandas as gpd
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pystac
import yaml
from demo_inputs import LEVEL, clc_legend, clc_rgba, ensure_checkpoint, extent_km, open_demo
from IPython.display import display
from matplotlib.patches import Rectangle
from shapely.geometry import box

from clc_dask.cluster import get_client
from clc_dask.config import load_run_config
from clc_dask.model import load_checkpoint
from clc_dask.rasters import geobox_of, open_raster
from clc_dask.run import Manifest, execute_run, resolve_run
from clc_dask.stores import file_sha256

# %% tags=["parameters"]
WORKDIR = "~/clc-dask-notebooks"  # folder shared by the five notebooks
SIZE = 512  # side of the demo region in px at 10 m (multiple of 64, >= 256)
SEED = 0  # seed of the synthetic region
CHUNK_SIZE = 256  # dask chunk edge in px (must divide TILE_SIZE)
EPOCHS = 12  # only if no checkpoint exists yet: training epochs (see notebook 03)
RUN_NAME = "demo-run"  # run id, used in the STAC ids
TILE_SIZE = 256  # tile edge in px (paper: 2048); the demo region holds (SIZE / TILE_SIZE)^2 tiles
WINDOW = 128  # px predicted per forward pass (multiple of 32)
HALO = 64  # px of context around each window
FIRST_TILES = 2  # tiles of the first pass; the rest come with --resume
MMU_HA = 25.0  # minimum mapping unit, hectares (CORINE: 25)
MIN_WIDTH_M = 100.0  # minimum width, metres (CORINE: 100)
FRESH_RUN = True  # remove the store of an earlier execution of this notebook first
SCHEDULER_ADDRESS = None  # "tcp://host:8786"; None: DASK_SCHEDULER_ADDRESS, else a local cluster
N_WORKERS = None  # local cluster only (None: one per 2 cores)
THREADS_PER_WORKER = None  # local cluster only

# %%
client = get_client(address=SCHEDULER_ADDRESS, n_workers=N_WORKERS, threads_per_worker=THREADS_PER_WORKER)
display(client)

# %% [markdown]
# ## The run config
# The AOI is the demo region (as a GeoPackage in its UTM zone), the scenes come from its STAC
# catalog (a production run names `earth-search` or a STAC API URL), the model is notebook 03's.
# Relative paths resolve against the config's folder. The `cluster` section is what the command
# line uses; here the run uses the cluster this notebook is attached to.

# %%
region, paths = open_demo(WORKDIR, SIZE, SEED)
checkpoint = ensure_checkpoint(region, paths, EPOCHS, client, CHUNK_SIZE)
paths.run.mkdir(parents=True, exist_ok=True)
store = paths.run / "store"
if FRESH_RUN and store.exists():
    shutil.rmtree(store)
left, bottom, right, top = region.bounds
aoi = gpd.GeoDataFrame({"name": [RUN_NAME]}, geometry=[box(left + 1, bottom + 1, right - 1, top - 1)],
                       crs=region.crs)
aoi.to_file(paths.run / "aoi.gpkg", driver="GPKG")
raw = {
    "name": RUN_NAME,
    "aoi": {"path": "aoi.gpkg"},
    "grid": {"epsg": region.epsg, "resolution": region.resolution, "tile_size": TILE_SIZE,
             "chunk_size": CHUNK_SIZE},
    "imagery": {"source": str(region.catalog_path), "year": region.year, "seasons": ["september"],
                "max_cloud": 50, "composite": "nrg"},
    "model": {"checkpoint": str(checkpoint), "batch_size": 4, "window": WINDOW, "halo": HALO, "device": "auto"},
    "classes": {"level": LEVEL},
    "generalize": {"mmu_ha": MMU_HA, "min_width_m": MIN_WIDTH_M},
    "output": {"store": "store", "formats": ["cog"], "vectorize": True},
    "cluster": {"kind": "local", "tiles_in_flight": 2},
}
config_path = paths.run / "run.yaml"
config_path.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
config = load_run_config(config_path)  # validated: every error names its field
print(config_path.read_text())

# %% [markdown]
# ## Dry run
# What an operator types first: every check of a real run, then the plan — without reading a
# pixel or writing a file.

# %%
cli = shutil.which("clc-dask", path=str(Path(sys.executable).parent)) or shutil.which("clc-dask")
command = [cli, "run", "--config", str(config_path), "--dry-run", "--json"]
print("$", " ".join(["clc-dask", *command[1:]]))
done = subprocess.run(command, capture_output=True, text=True, check=False)
assert done.returncode == 0, done.stderr
plan = json.loads(done.stdout[done.stdout.index("{"):])
assert not store.exists(), "a dry run writes nothing"
display(pd.Series({k: v for k, v in plan.items() if not isinstance(v, (dict, list))}, name="plan").to_frame())

# %% [markdown]
# ## Run the first tiles
# The same as `clc-dask run --config run.yaml --tiles …` (add `--scheduler ADDRESS` to use a
# running cluster). Each finished tile is written once and recorded in the manifest.

# %%
context = resolve_run(config, scenes="none")  # AOI, grid, tiles, checkpoint: checked, nothing written
grid = context.grid
all_tiles = [t.name for t in context.tiles]
first = all_tiles[:FIRST_TILES]
print(f"Dask dashboard: {client.dashboard_link}")
first_result = execute_run(config, tile_names=first, client=client,
                           progress=lambda name: print(f"tile {name} finished"))


def show_progress(manifest: Manifest, title: str) -> None:
    """The tile grid over the region: finished tiles green, the others grey."""
    fig, ax = plt.subplots(figsize=(5.5, 5.5), layout="constrained")
    for tile in grid:
        x0, y0, x1, y1 = (v / 1000 for v in tile.geobox.boundingbox)
        finished = manifest.is_done(tile.name)
        ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, facecolor="tab:green" if finished else "0.85",
                               edgecolor="k"))
        ax.text((x0 + x1) / 2, (y0 + y1) / 2, tile.name + ("\nfinished" if finished else "\nto do"),
                ha="center", va="center")
    ax.set(xlim=extent_km(region)[:2], ylim=extent_km(region)[2:], xlabel="x (km)", ylabel="y (km)",
           title=title, aspect="equal")
    plt.show()


manifest = Manifest.read(store)
print(f"progress: {len(manifest.tiles)} of {len(all_tiles)} tiles finished; complete: {manifest.complete}")
show_progress(manifest, f"After the first pass: {len(manifest.tiles)}/{len(all_tiles)} tiles")
after_first = sorted(manifest.tiles)

# %% [markdown]
# ## Resume
# `clc-dask run --config run.yaml --resume`: recorded tiles whose files still match their
# SHA-256 are skipped; the rest are computed; the STAC catalog is rewritten last.

# %%
resumed = execute_run(config, resume=True, client=client,
                      progress=lambda name: print(f"tile {name} finished or skipped"))
print(f"computed {resumed.computed}, skipped {resumed.skipped}")
manifest = Manifest.read(store)
show_progress(manifest, f"After --resume: {len(manifest.tiles)}/{len(all_tiles)} tiles")

# %% [markdown]
# ## The manifest
# The completion record: per tile its files with size and SHA-256, when it finished and from
# which scenes. It also pins the run's settings and checkpoint, so a store is never mixed with
# another run's tiles.

# %%
print(json.dumps({k: (v[:16] + "…" if isinstance(v, str) and len(v) > 40 else v)
                  for k, v in json.loads(manifest.path.read_text()).items() if k not in ("tiles", "generalized")}, indent=1))
display(pd.DataFrame([{
    "tile": name, "finished": entry["finished"], "files": len(entry["files"]),
    "MB": round(sum(f["bytes"] for f in entry["files"].values()) / 1e6, 3),
    "classes sha256": entry["files"][entry["assets"]["classes"]]["sha256"][:12] + "…",
    "generalized sha256": next(iter(manifest.generalized[name]["files"].values()))["sha256"][:12] + "…",
    "scenes": len(entry.get("clc_dask:input_items", [])),
} for name, entry in sorted(manifest.tiles.items())]))

# %% [markdown]
# ## The STAC outputs
# One Collection, one Item per finished tile with its assets (class map, generalized map,
# polygons), projection, classification (codes, labels, official colours) and file checksums.

# %%
collection = pystac.Collection.from_file(str(store / "stac" / "collection.json"))
items = sorted(collection.get_items(), key=lambda i: i.id)
display(pd.DataFrame([{
    "id": item.id, "tile": item.properties["clc_dask:tile"],
    "season": f"{item.properties['start_datetime'][:10]} … {item.properties['end_datetime'][:10]}",
    "assets": ", ".join(item.assets), "proj:code": item.properties.get("proj:code"),
} for item in items]))

# %% [markdown]
# Open one Item's generalized map by its asset href, check it against its checksum, and show
# every Item's map placed by its own georeferencing.

# %%
item = items[0]
asset = item.assets["generalized"]
href = asset.get_absolute_href()
opened = open_raster(href).isel(band=0, drop=True)
tile = grid.tile(item.properties["clc_dask:tile"])
fig, axes = plt.subplots(1, 2, figsize=(13, 5.5), layout="constrained")
axes[0].imshow(clc_rgba(opened.values), extent=extent_km(tile.geobox.boundingbox), interpolation="nearest")
axes[0].set(title=f"{item.id}: generalized", xlabel="x (km)", ylabel="y (km)")
shown = []
for other in items:
    arr = open_raster(other.assets["generalized"].get_absolute_href()).isel(band=0, drop=True)
    x0, x1, y0, y1 = extent_km(geobox_of(arr).boundingbox)
    axes[1].imshow(clc_rgba(arr.values), extent=(x0, x1, y0, y1), interpolation="nearest")
    axes[1].add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor="k", linewidth=1))
    shown.append(arr.values.ravel())
axes[1].set(xlim=extent_km(region)[:2], ylim=extent_km(region)[2:], title=f"All {len(items)} Items",
            xlabel="x (km)")
clc_legend(axes[1], np.concatenate(shown))
plt.show()

# %% [markdown]
# ## Checks

# %%
model_codes = {int(c) for c in load_checkpoint(checkpoint).classes.codes}
assert plan["tiles_to_process"] == len(all_tiles) == len(grid) and plan["tiles_already_done"] == 0
assert after_first == sorted(first) and sorted(first_result.computed) == sorted(first)
assert sorted(resumed.skipped) == sorted(first) and sorted(resumed.computed) == sorted(set(all_tiles) - set(first))
assert manifest.complete and sorted(manifest.tiles) == sorted(all_tiles)
assert len(items) == len(manifest.tiles), "one STAC Item per finished tile"
for it in items:
    name = it.properties["clc_dask:tile"]
    for key, rel in manifest.tiles[name]["assets"].items():
        path = Path(it.assets[key].get_absolute_href())
        assert path.resolve() == (store / rel).resolve() and path.exists()
        assert it.assets[key].extra_fields["file:checksum"] == "1220" + file_sha256(path)
assert geobox_of(opened) == tile.geobox
assert set(np.unique(opened.values).tolist()) <= model_codes | {0}

# %%
cluster = client.cluster  # None when attached to a running scheduler
client.close()
if cluster is not None:
    cluster.close()
summary = {
    "store": str(store),
    "dry_run": {k: plan[k] for k in ("tiles_to_process", "tiles_already_done", "batches", "scenes_total",
                                     "tasks_total", "bytes_to_read")},
    "first_pass": len(first_result.computed),
    "first_pass_tiles": sorted(first_result.computed),
    "resumed_computed": sorted(resumed.computed),
    "resumed_skipped": sorted(resumed.skipped),
    "complete": manifest.complete,
    "stac_items": len(items),
    "opened_item": item.id,
    "opened_item_shape": list(opened.shape),
}
print(json.dumps(summary, indent=1))
