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
# # 6 · Experiments: a grid of configurations, compared with confidence intervals
#
# The paper compares five trained models by their IoU on one test image (its Tables 2–5), with
# differences of a few hundredths and no measure of spread. Here one experiment does that end to
# end on the demo region: September RGB vs September NRG vs September + April NRG (the `cpu-demo`
# preset with overrides), each trained as **one task on the cluster**, tested on the same
# **test blocks**, kept away from every training and validation patch by a **guard band**, and
# scored with **95 % confidence intervals** from a spatial block bootstrap and **paired
# comparisons** (is A better than B?).
#
# The region is given as an area (a bbox, the demo's static STAC catalog and its CLC polygons):
# the experiment builds its mosaics (all four bands, so RGB and NRG configurations read the same
# files) and labels itself. Running the notebook again resumes the experiment where it stopped.
#
# Inputs: the demo region (made here if missing). Outputs: `WORKDIR/experiment/`.

# %%
import json

import numpy as np
import pandas as pd
from demo_inputs import open_demo
from IPython.display import Image, Markdown, display
from scipy import ndimage

from clc_dask.cluster import get_client
from clc_dask.experiment import check_experiment, parse_experiment_config, run_experiment
from clc_dask.experiment.config import dump_experiment_config
from clc_dask.model import receptive_field
from clc_dask.patches import load_patch_index

# %% tags=["parameters"]
WORKDIR = "~/clc-dask-notebooks"  # folder shared by the notebooks
SIZE = 512  # side of the demo region in px at 10 m (multiple of 64, >= 256)
SEED = 0  # seed of the synthetic region
CHUNK_SIZE = 256  # inference window and dask chunk edge in px (multiple of BLOCK_SIZE)
EPOCHS = 8  # training epochs of every configuration
PATCH_SIZE = 64  # training patch edge in px (multiple of 32)
BLOCK_SIZE = 64  # split block edge in px: test blocks are the bootstrap's units
GUARD_PX = 64  # px between test, validation and training areas; None: the networks' receptive field
REPLICATES = 1000  # bootstrap replicates
SCHEDULER_ADDRESS = None  # "tcp://host:8786"; None: DASK_SCHEDULER_ADDRESS, else a local cluster
N_WORKERS = None  # local cluster only (None: one per 2 cores); one configuration trains per worker
THREADS_PER_WORKER = None  # local cluster only

# %%
client = get_client(address=SCHEDULER_ADDRESS, n_workers=N_WORKERS, threads_per_worker=THREADS_PER_WORKER)
display(client)

# %% [markdown]
# ## The experiment file
# One mapping (or YAML file, for `clc-dask experiment --config`): the region, the split, the
# configurations (a preset and overrides each; `grid: paper` would add the paper's Table 2), the
# evaluation and the bootstrap. The guard band defaults to the receptive field of the largest
# network — 576 px for a ResNet18 U-Net, more than this small region can spare around its test
# strip: with `GUARD_PX = None`, use `SIZE = 2048` or more.

# %%
region, paths = open_demo(WORKDIR, SIZE, SEED)
folder = paths.root / "experiment"
common = {"epochs": EPOCHS, "patch_size": PATCH_SIZE, "val_every": 1}
raw = {
    "name": "demo-bands-and-seasons",
    "output": str(folder),
    "regions": {"demo": {
        "aoi": {"bbox": list(region.bbox_lonlat)},
        "grid": {"epsg": region.epsg, "resolution": region.resolution},
        "imagery": {"source": str(region.catalog_path), "collection": region.collection_id, "year": region.year,
                    "seasons": ["september", "april"], "max_cloud": 50, "composite": "all"},
        "clc": {"source": str(region.clc_path), "field": region.clc_field},
    }},
    "split": {"block_size": BLOCK_SIZE, "guard_px": "auto" if GUARD_PX is None else GUARD_PX,
              "test_side": "south", "test_fraction": 0.25, "val_fraction": 0.15},
    "overrides": common,
    "configurations": [
        {"name": "sept-nrg", "preset": "cpu-demo"},
        {"name": "sept-rgb", "preset": "cpu-demo", "overrides": {"composite": "rgb"}},
        {"name": "septapr-nrg", "preset": "cpu-demo", "overrides": {"seasons": ["september", "april"]}},
    ],
    "evaluation": {"seasons": ["september"], "window": CHUNK_SIZE, "halo": 64},
    "statistics": {"replicates": REPLICATES, "confidence": 0.95, "seed": 0},
}
config = parse_experiment_config(raw, source="notebook")
print(dump_experiment_config(config))

# %% [markdown]
# Every check that reads no pixel runs first: presets and overrides, that each configuration
# finds its bands and seasons, the split areas, the guard band.

# %%
checked = check_experiment(config)
display(pd.DataFrame([{"configuration": c.name, "seasons": ", ".join(c.train.seasons),
                       "bands": ", ".join(c.train.bands), "encoder": c.train.encoder,
                       "patch px": c.train.patch_size, "epochs": c.train.epochs,
                       "receptive field px": receptive_field(c.train.encoder)}
                      for c in checked.configurations]).set_index("configuration"))
print(f"guard band: {checked.guard_px} px")

# %% [markdown]
# ## Run it on the cluster
# The mosaics and labels are built, the region is split, each configuration's patch index is
# made with the split's map, then each configuration trains as one task (one per worker on a
# CPU cluster, one per GPU on a GPU cluster) and is scored on the test blocks as soon as it is
# trained. Watch the dashboard while it runs.

# %%
print(f"Dask dashboard: {client.dashboard_link}")
result = run_experiment(config, client=client)
print(f"{len(result.configurations)} configurations in {result.seconds / 60:.1f} min; folder {result.root}")
display(pd.DataFrame(result.training).T[["resumed_from_epoch", "epochs_run", "best_epoch", "best_val_miou"]])

# %% [markdown]
# ## The split
# Test blocks in the south (outlined: the units the bootstrap resamples), validation blocks
# farthest from them in the north, training in between; grey guard bands are used by nobody.

# %%
split = result.split
display(Image(filename=result.results["split_figure"]))
display(pd.DataFrame({role: {"blocks": v.get("blocks"), "labelled pixels": v.get("labelled_pixels"),
                             "pixels outside the guard bands": v["area_pixels"]}
                      for role, v in split.summary().items()}).T)

# %% [markdown]
# ## Training curves

# %%
display(Image(filename=result.results["training_curves"]))

# %% [markdown]
# ## The table, with intervals
# Per-class IoU, mIoU, overall accuracy and kappa on the test blocks, as in the paper's
# Table 3; each figure with its 95 % block-bootstrap interval.

# %%
area = next(iter(result.results["areas"]))
files = result.results["areas"][area]["files"]
table = pd.read_csv(files["table"], index_col=0)
display(table)
display(Markdown(open(files["table_markdown"], encoding="utf-8").read()))
display(Image(filename=files["iou_intervals"]))

# %% [markdown]
# ## Paired comparisons
# Each pair is scored on the same resampled blocks; A is better than B at 95 % when the interval
# of A − B lies above 0. With a few epochs on a small region, most differences are not
# significant — which is the point of measuring them.

# %%
comparisons = pd.read_csv(files["comparisons"])
display(comparisons)

# %% [markdown]
# ## Best and worst configuration against the reference

# %%
display(Image(filename=files["maps"]))

# %% [markdown]
# ## Checks
# The table shows the reports' figures; each point estimate lies in its interval; a comparison
# names a winner exactly when its interval excludes 0; no training or validation patch of any
# configuration lies within the guard band of a test pixel.

# %%
reports = {name: json.loads(result.reports[name][area].read_text()) for name in result.configurations}
for name, report in reports.items():
    assert table.loc[name, "mIoU"] == round(report["mean_iou"], 4)
    for key in ("mean_iou", "overall_accuracy", "kappa"):
        low, high = report["intervals"][key]
        assert low <= report[key] <= high
for row in comparisons.itertuples():
    assert isinstance(row.better, str) == (row.lower > 0 or row.upper < 0)
height, width = split.geobox.shape.y, split.geobox.shape.x
test = np.repeat(np.repeat(split.roles == "test", split.block_size, 0), split.block_size, 1)[:height, :width]
distance = ndimage.distance_transform_cdt(~test, metric="chessboard")
for name in result.configurations:
    index = load_patch_index(result.root / "configurations" / name / "patches")
    nearest = min(int(distance[s.window].min()) for part in ("train", "val") for s in index.samples(part))
    assert nearest > split.guard_px, (name, nearest)
print(f"nearest training/validation pixel to a test pixel: > {split.guard_px} px for every configuration")

# %%
cluster = client.cluster  # None when attached to a running scheduler
client.close()
if cluster is not None:
    cluster.close()
summary = {
    "experiment": str(result.root),
    "configurations": result.configurations,
    "area": area,
    "test_blocks": len(split.test_blocks()),
    "guard_px": split.guard_px,
    "miou": {n: r["mean_iou"] for n, r in reports.items()},
    "miou_interval": {n: r["intervals"]["mean_iou"] for n, r in reports.items()},
    "best": result.results["areas"][area]["best"],
    "significant": [f"{r.better} ({r.metric})" for r in comparisons.itertuples() if isinstance(r.better, str)],
    "table": files["table"],
}
print(json.dumps(summary, indent=1))
