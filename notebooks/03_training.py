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
# # 3 · Train the U-Net
#
# The `cpu-demo` preset — a U-Net with a ResNet18 encoder and a light decoder on 128 px NRG
# patches of the September mosaic — sized for two CPU cores (the paper's presets use ResNet50/101
# on 128/256 px patches, see `clc_dask.presets`). The Dask cluster cuts the patches and caches them
# to Zarr once, and the training loop reads them from there (`data="stream"` instead streams them
# from the cluster every epoch: the same batches, for data too large to cache).
# After every epoch the trainer validates on the held-out blocks and writes `metrics.csv`,
# `best.pt` (best validation mIoU) and `checkpoint.pt` (to resume).
#
# Inputs: the patch index of notebook 02 (made here if missing). Output: `WORKDIR/train/`.

# %%
import json
import logging
import math

import matplotlib.pyplot as plt
import pandas as pd
from demo_inputs import PRESET, ensure_patch_index, open_demo
from IPython.display import display

from clc_dask.classes import rgb_of
from clc_dask.cluster import get_client
from clc_dask.demo.training import demo_guard
from clc_dask.model import load_checkpoint
from clc_dask.presets import get_preset
from clc_dask.train import METRICS_CSV, train

# %% tags=["parameters"]
WORKDIR = "~/clc-dask-notebooks"  # folder shared by the five notebooks
SIZE = 512  # side of the demo region in px at 10 m (multiple of 64, >= 256)
SEED = 0  # seed of the synthetic region
CHUNK_SIZE = 256  # dask chunk edge in px
EPOCHS = 12  # training epochs (the preset has 20; on this small region they take seconds each)
RESUME = False  # True: continue the run in WORKDIR/train up to EPOCHS; False: train afresh
SCHEDULER_ADDRESS = None  # "tcp://host:8786"; None: DASK_SCHEDULER_ADDRESS, else a local cluster
N_WORKERS = None  # local cluster only (None: one per 2 cores)
THREADS_PER_WORKER = None  # local cluster only

# %%
client = get_client(address=SCHEDULER_ADDRESS, n_workers=N_WORKERS, threads_per_worker=THREADS_PER_WORKER)
display(client)

# %% [markdown]
# ## The patch index and the configuration

# %%
region, paths = open_demo(WORKDIR, SIZE, SEED)
index = ensure_patch_index(region, paths, client, CHUNK_SIZE)
config = get_preset(PRESET, epochs=EPOCHS, guard=demo_guard(SIZE))
display(pd.Series(config.model_dump(), name=PRESET).to_frame())

# %% [markdown]
# ## Training
# One log line per epoch. With `RESUME = True` an interrupted run continues where it stopped,
# with the same results as an uninterrupted one.

# %%
train_log = logging.getLogger("clc_dask.train")
if not train_log.handlers:
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    train_log.addHandler(handler)
train_log.setLevel(logging.INFO)
epochs_before = len(pd.read_csv(paths.train / METRICS_CSV)) if RESUME and (paths.train / METRICS_CSV).exists() else 0
result = train(config, index, paths.train, client=client, resume=RESUME, overwrite=not RESUME, progress=False)
print(f"{result.epochs_run} epoch(s) in {result.seconds:.0f} s; best validation mIoU "
      f"{result.best_val_miou:.3f} at epoch {result.best_epoch}")

# %% [markdown]
# ## Loss and IoU curves, from `metrics.csv`
# Per-class IoU in the official CLC colours; the thick line is the validation mIoU (mean over the
# classes present in the validation patches).

# %%
metrics = pd.read_csv(paths.train / METRICS_CSV)
iou_columns = [c for c in metrics.columns if c.startswith("iou_")]
fig, (ax_loss, ax_iou) = plt.subplots(1, 2, figsize=(13, 4.5), layout="constrained")
ax_loss.plot(metrics["epoch"], metrics["train_loss"], "o-", label="training")
ax_loss.plot(metrics["epoch"], metrics["val_loss"], "s--", label="validation")
ax_loss.set(xlabel="epoch", ylabel="cross-entropy per pixel", yscale="log", title="Loss")
ax_loss.legend()
for column in iou_columns:
    code = int(column.removeprefix("iou_"))
    ax_iou.plot(metrics["epoch"], metrics[column], ".-", linewidth=1, label=str(code),
                color=[v / 255 for v in rgb_of(code)])
ax_iou.plot(metrics["epoch"], metrics["val_miou"], "k-", linewidth=3, marker="o", label="mIoU")
ax_iou.set(xlabel="epoch", ylabel="IoU (validation)", ylim=(0, 1), title="IoU per class")
ax_iou.legend(ncol=2, fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
for ax in (ax_loss, ax_iou):
    ax.set_xticks(metrics["epoch"])
plt.show()
display(metrics[["epoch", "train_loss", "val_loss", "val_miou", "val_overall_accuracy", "seconds"]])

# %% [markdown]
# ## Checks
# One row per epoch; losses positive and finite; IoU in [0, 1]; the best checkpoint is the epoch
# with the highest validation mIoU and carries the index's bands and classes.

# %%
expected_epochs = max(EPOCHS, epochs_before)
assert len(metrics) == expected_epochs, (len(metrics), expected_epochs)
assert metrics["epoch"].tolist() == list(range(1, expected_epochs + 1))
assert all(math.isfinite(v) and v > 0 for v in metrics["train_loss"])
assert metrics["val_miou"].between(0, 1).all()
assert metrics[iou_columns].stack().between(0, 1).all()
best = load_checkpoint(paths.train / "best.pt")
assert best.bands == tuple(index.bands) == ("B08", "B04", "B03")
assert list(best.classes.codes) == list(index.classes.codes)
assert best.epoch == int(metrics.loc[metrics["val_miou"].idxmax(), "epoch"]) == result.best_epoch
assert paths.checkpoint == paths.train / "best.pt"

# %%
cluster = client.cluster  # None when attached to a running scheduler
client.close()
if cluster is not None:
    cluster.close()
summary = {
    "epochs": len(metrics),
    "final_train_loss": float(metrics["train_loss"].iloc[-1]),
    "best_val_miou": float(result.best_val_miou),
    "best_epoch": int(result.best_epoch),
    "classes": [int(c) for c in best.classes.codes],
    "checkpoint": str(paths.checkpoint),
}
print(json.dumps(summary, indent=1))
