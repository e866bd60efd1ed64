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
# # 2 · CORINE labels and training patches
#
# The CORINE Land Cover polygons of the region (`CODE_18`, Level 3) are rasterized chunk by chunk
# onto the grid of the September mosaic and reduced to Level 2 — the classes the model learns.
# The grid is then cut into patches: patches that are mostly no data, cloud or unlabelled are
# rejected, and a strip of whole patch rows along the southern side goes to validation, behind a
# guard band as wide as the network's receptive field where the region has room for one (from
# 2048 px), so that no validation pixel is within reach of a training patch. The class
# statistics show which classes are rare.
#
# Inputs: the mosaics of notebook 01 in `WORKDIR` (made here if missing). Outputs:
# `WORKDIR/labels/clc_level2.tif` and the patch index in `WORKDIR/patches/`.

# %%
import json

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from demo_inputs import LEVEL, PRESET, clc_legend, clc_rgba, ensure_mosaic, extent_km, open_demo
from IPython.display import display
from matplotlib.patches import Patch, Rectangle

from clc_dask.classes import label_of, official_codes
from clc_dask.cluster import get_client
from clc_dask.demo.training import demo_guard
from clc_dask.grid import assert_same_grid
from clc_dask.labels import make_labels, write_labels
from clc_dask.patches import load_patch_index
from clc_dask.presets import DESCRIPTIONS, get_preset
from clc_dask.rasters import geobox_of, open_raster
from clc_dask.train import index_for_config

# %% tags=["parameters"]
WORKDIR = "~/clc-dask-notebooks"  # folder shared by the five notebooks
SIZE = 512  # side of the demo region in px at 10 m (multiple of 64, >= 256)
SEED = 0  # seed of the synthetic region
CHUNK_SIZE = 256  # dask chunk edge in px
SCHEDULER_ADDRESS = None  # "tcp://host:8786"; None: DASK_SCHEDULER_ADDRESS, else a local cluster
N_WORKERS = None  # local cluster only (None: one per 2 cores)
THREADS_PER_WORKER = None  # local cluster only

# %%
client = get_client(address=SCHEDULER_ADDRESS, n_workers=N_WORKERS, threads_per_worker=THREADS_PER_WORKER)
display(client)

# %% [markdown]
# ## Inputs
# The patches follow the `cpu-demo` training preset (the one notebook 03 trains): its seasons,
# bands, patch size and split.

# %%
region, paths = open_demo(WORKDIR, SIZE, SEED)
config = get_preset(PRESET, guard=demo_guard(SIZE))
mosaics = {season: ensure_mosaic(region, paths, season, CHUNK_SIZE) for season in config.seasons}
print(f"{PRESET}: {DESCRIPTIONS[PRESET]}")
print(f"seasons {list(config.seasons)}, bands {list(config.bands)}, patches of {config.patch_size} px, "
      f"validation: a strip along the {config.val_side} side holding {config.val_fraction:.0%} of the patches, "
      f"behind a guard band of {config.guard_patches} patch(es)")

# %% [markdown]
# ## CLC labels on the mosaic grid
# `make_labels` reads only the polygons over the grid and rasterizes them per dask chunk;
# the written COG carries the official CLC colour table.

# %%
mosaic_path = mosaics["september"]
labels = make_labels(region.clc_path, like=mosaic_path, level=LEVEL, chunk_size=CHUNK_SIZE)
paths.labels.parent.mkdir(parents=True, exist_ok=True)
write_labels(labels, paths.labels)
codes = open_raster(paths.labels).values[0]
present, pixels = np.unique(codes[codes > 0], return_counts=True)
areas = pd.DataFrame({"code": present, "label": [label_of(int(c)) for c in present],
                      "area (ha)": pixels * region.resolution**2 / 1e4,
                      "share %": np.round(100 * pixels / codes.size, 2)})

fig, ax = plt.subplots(figsize=(10, 6.5), layout="constrained")
ax.imshow(clc_rgba(codes), extent=extent_km(region), interpolation="nearest")
clc_legend(ax, codes)
ax.set(title=f"CLC 2018, Level {LEVEL}, on the mosaic grid", xlabel="x (km)", ylabel="y (km)")
plt.show()
display(areas)

# %% [markdown]
# ## Patches and the train / validation split
# One graph of per-chunk statistics on the cluster (valid, cloudy and labelled pixels, class
# counts, band sums per patch) and one reduction. Table 1 of the paper counts patches like this.

# %%
clear_counts = {s: paths.clear_count(s) for s in config.seasons}
index = index_for_config(config, mosaics, paths.labels, clear_counts=clear_counts, client=client)
index.save(paths.patches)
display(pd.DataFrame(index.counts()))

# %%
split_colour = {"train": "tab:blue", "val": "tab:orange", "guard": "tab:purple"}
size_km = index.patch_size * region.resolution / 1000
left, _, _, top = (v / 1000 for v in region.bounds)
first = index.table[index.table["season"] == index.seasons[0]]
fig, ax = plt.subplots(figsize=(10, 6.5), layout="constrained")
ax.imshow(clc_rgba(codes), extent=extent_km(region), interpolation="nearest", alpha=0.45)
for row in first.itertuples():
    x0, y1 = left + row.col * size_km, top - row.row * size_km
    if row.usable:
        ax.add_patch(Rectangle((x0, y1 - size_km), size_km, size_km, facecolor=split_colour[row.split],
                               alpha=0.35, edgecolor=split_colour[row.split], linewidth=1))
    else:
        ax.add_patch(Rectangle((x0, y1 - size_km), size_km, size_km, facecolor="none", hatch="xx",
                               edgecolor="0.3", linewidth=0.5))
handles = [Patch(facecolor=c, alpha=0.5, label=s) for s, c in split_colour.items() if (first["split"] == s).any()]
handles.append(Patch(facecolor="none", hatch="xx", edgecolor="0.3", label="rejected"))
ax.legend(handles=handles, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
ax.set(title=f"{index.patch_size} px patches: validation along the {config.val_side}, guard {config.guard_patches}",
       xlabel="x (km)", ylabel="y (km)")
plt.show()

# %% [markdown]
# ## Class statistics
# Pixels and patches per class and split. A class is *rare* when it holds under 1 % of the
# training pixels, sits in fewer than 5 training patches, or is missing from a split: its IoU
# will be noisy or undefined.

# %%
stats = index.class_statistics()
display(stats.style.format({"train_share": "{:.1%}", "val_share": "{:.1%}"}).apply(
    lambda row: ["background-color: #fde0c5" if row["rare"] else "" for _ in row], axis=1))

# %% [markdown]
# ## Checks

# %%
mosaic = open_raster(mosaic_path)
assert_same_grid(geobox_of(open_raster(paths.labels)), geobox_of(mosaic), "labels", "mosaic")
assert codes.dtype == np.uint8 and set(present.tolist()) <= set(official_codes(LEVEL))
assert (codes > 0).mean() > 0.95, "the CLC polygons should cover the region"
counts = index.counts()
assert counts["train"]["total"] > 0 and counts["val"]["total"] > 0
val_share = counts["val"]["total"] / (counts["train"]["total"] + counts["val"]["total"])
assert 0.1 <= val_share <= 0.5, val_share
usable = index.table[index.table["usable"]]
assert (usable["nodata_fraction"] <= config.max_nodata_fraction).all()
assert (usable["cloud_fraction"] <= config.max_cloud_fraction).all()
rows = {split: usable.loc[usable["split"] == split, "row"] for split in ("train", "val")}
assert rows["val"].min() - rows["train"].max() > config.guard_patches, "validation lies south of the guard band"
assert len(stats) == len(index.classes) and (stats["rare"] == (stats["note"] != "")).all()
reloaded = load_patch_index(paths.patches)
assert reloaded.fingerprint() == index.fingerprint()
print(f"validation share {val_share:.0%}; rare classes: {stats.loc[stats['rare'], 'code'].tolist()}")

# %%
cluster = client.cluster  # None when attached to a running scheduler
client.close()
if cluster is not None:
    cluster.close()
summary = {
    "labels": str(paths.labels),
    "label_codes": [int(c) for c in present],
    "train_patches": counts["train"]["total"],
    "val_patches": counts["val"]["total"],
    "rejected_patches": counts["rejected"]["total"],
    "rare_classes": sorted(int(c) for c in stats.loc[stats["rare"], "code"]),
    "labelled_patch_pixels": int(stats["train_pixels"].sum() + stats["val_pixels"].sum()),
}
print(json.dumps(summary, indent=1))
