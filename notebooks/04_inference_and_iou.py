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
# # 4 · Distributed inference and IoU
#
# The trained model maps the September mosaic on the cluster: `predict` runs the U-Net with
# `map_overlap` (each window sees `HALO` px of context, so the map does not depend on the
# chunking and has no seams), the model is loaded once per worker, and the class map is written
# as a COG with the official colours. It is then scored against the CORINE reference on the
# **held-out area** — the validation blocks of notebook 02's split, never seen in training — and
# on the training patches for comparison, as confusion matrices summed over the cluster. The
# generalized map (CORINE rules: minimum mapping unit, minimum width) is scored too.
#
# Inputs: checkpoint (03), patch index (02), mosaic and labels (01, 02), made here if missing.
# Outputs: `WORKDIR/predict/` and `WORKDIR/evaluation/` (report JSON, paper-style table, figures).

# %%
import json

import numpy as np
import pandas as pd
from demo_inputs import (
    LEVEL,
    ensure_checkpoint,
    ensure_labels,
    ensure_mosaic,
    ensure_patch_index,
    open_demo,
)
from IPython.display import Image, display

from clc_dask.classes import NODATA_CODE
from clc_dask.cluster import get_client
from clc_dask.evaluate import evaluate, write_report
from clc_dask.generalize import generalize
from clc_dask.grid import assert_same_grid
from clc_dask.model import load_checkpoint
from clc_dask.predict import predict, write_prediction
from clc_dask.rasters import geobox_of, open_raster, to_dataarray
from clc_dask.report import iou_bar_chart, map_figure, paper_table, write_table

# %% tags=["parameters"]
WORKDIR = "~/clc-dask-notebooks"  # folder shared by the five notebooks
SIZE = 512  # side of the demo region in px at 10 m (multiple of 64, >= 256)
SEED = 0  # seed of the synthetic region
CHUNK_SIZE = 256  # dask chunk edge in px (a multiple of WINDOW: each window runs once)
EPOCHS = 12  # only if no checkpoint exists yet: training epochs (see notebook 03)
WINDOW = 256  # px predicted per forward pass (multiple of 32)
HALO = 64  # px of context around each window
BATCH_SIZE = 4  # windows per forward pass
MMU_HA = 25.0  # minimum mapping unit of the generalized map, hectares (CORINE: 25)
MIN_WIDTH_M = 100.0  # minimum width of the generalized map, metres (CORINE: 100)
SCHEDULER_ADDRESS = None  # "tcp://host:8786"; None: DASK_SCHEDULER_ADDRESS, else a local cluster
N_WORKERS = None  # local cluster only (None: one per 2 cores)
THREADS_PER_WORKER = None  # local cluster only

# %%
client = get_client(address=SCHEDULER_ADDRESS, n_workers=N_WORKERS, threads_per_worker=THREADS_PER_WORKER)
display(client)

# %% [markdown]
# ## Inputs

# %%
region, paths = open_demo(WORKDIR, SIZE, SEED)
checkpoint = ensure_checkpoint(region, paths, EPOCHS, client, CHUNK_SIZE)
index = ensure_patch_index(region, paths, client, CHUNK_SIZE)
mosaic_path = ensure_mosaic(region, paths, "september", CHUNK_SIZE)
labels_path = ensure_labels(region, paths, CHUNK_SIZE)
model = load_checkpoint(checkpoint)
codes = [int(c) for c in model.classes.codes]
print(f"model: U-Net/{model.encoder}, bands {list(model.bands)}, epoch {model.epoch}, classes {codes}")

# %% [markdown]
# ## Predict on the cluster
# Nothing runs until the class map is written; watch the dashboard while it is. The class map is
# then generalized to the CORINE rules (`MMU_HA`, `MIN_WIDTH_M`) chunk by chunk.

# %%
print(f"Dask dashboard: {client.dashboard_link}")
mosaic = open_raster(mosaic_path, chunks=CHUNK_SIZE)
class_map = predict(mosaic, checkpoint, window=WINDOW, halo=HALO, batch_size=BATCH_SIZE,
                    chunk_size=CHUNK_SIZE, client=client)
print(f"{class_map.data.npartitions} inference blocks, {len(class_map.data.__dask_graph__())} tasks")
paths.predict.mkdir(parents=True, exist_ok=True)
prediction_path = write_prediction(class_map, paths.predict / "class_map_september.tif")
prediction = open_raster(prediction_path, chunks=CHUNK_SIZE).isel(band=0, drop=True)
generalized = generalize(prediction, mmu_ha=MMU_HA, min_width_m=MIN_WIDTH_M)
generalized_path = write_prediction(generalized, paths.predict / "generalized_september.tif", level=LEVEL)
generalized = open_raster(generalized_path, chunks=CHUNK_SIZE).isel(band=0, drop=True)

# %% [markdown]
# The `cpu-demo` model has only ever seen 128 px patches without surroundings. For comparison, the
# same mosaic mapped the way it was trained: windows of the patch size, no halo.

# %%
patchwise = predict(mosaic, checkpoint, window=index.patch_size, halo=0, batch_size=BATCH_SIZE,
                    chunk_size=CHUNK_SIZE, client=client)
patchwise_path = write_prediction(patchwise, paths.predict / "class_map_september_patchwise.tif")
patchwise = open_raster(patchwise_path, chunks=CHUNK_SIZE).isel(band=0, drop=True)

# %% [markdown]
# ## The held-out area
# The reference is kept only on the validation patches (elsewhere it becomes no data, which
# `evaluate` skips); a second reference keeps the training patches.

# %%
reference = open_raster(labels_path, chunks=CHUNK_SIZE).isel(band=0, drop=True)
grid = geobox_of(reference)
ref_codes = reference.values


def area_mask(split: str) -> np.ndarray:
    """True on the pixels of the usable patches of ``split``."""
    mask = np.zeros(ref_codes.shape, dtype=bool)
    for sample in index.samples(split):
        mask[sample.window] = True
    return mask


masks = {"held-out (val)": area_mask("val"), "training patches": area_mask("train")}
references = {name: to_dataarray(np.where(mask, ref_codes, NODATA_CODE).astype(ref_codes.dtype), grid,
                                 name="reference", nodata=NODATA_CODE) for name, mask in masks.items()}
print({name: f"{mask.mean():.0%} of the region" for name, mask in masks.items()})

# %% [markdown]
# ## Evaluation and the paper-style table
# IoU per class (columns, CLC codes) for each map and area (rows), and the mIoU over the classes
# present in the reference — the layout of the paper's Tables 3–5. Mapped window by window as it
# was trained, the model has no context across window edges; with a halo every pixel has some.

# %%
reports = {
    "held-out (val)": evaluate(prediction, references["held-out (val)"], level=LEVEL, codes=codes),
    "held-out, generalized": evaluate(generalized, references["held-out (val)"], level=LEVEL, codes=codes),
    "held-out, windows as trained": evaluate(patchwise, references["held-out (val)"], level=LEVEL, codes=codes),
    "training patches": evaluate(prediction, references["training patches"], level=LEVEL, codes=codes),
}
paths.evaluation.mkdir(parents=True, exist_ok=True)
write_report(reports["held-out (val)"], paths.evaluation / "report_heldout.json")
table = paper_table(reports, classes=codes, with_mean=True)
write_table(table, paths.evaluation / "table.csv")
write_table(table, paths.evaluation / "table.md")
overall = pd.DataFrame({name: {"mIoU": r["mean_iou"], "overall accuracy": r["overall_accuracy"],
                               "kappa": r["kappa"], "pixels": r["valid_pixels"]}
                        for name, r in reports.items()}).T
display(overall)
display(table)

# %% [markdown]
# ## Maps in the official colours, side by side with the reference

# %%
display(Image(filename=map_figure(prediction, reference, paths.evaluation / "maps.png", level=LEVEL,
                                  title="September 2018: CORINE reference and U-Net prediction")))
display(Image(filename=map_figure(generalized, reference, paths.evaluation / "maps_generalized.png",
                                  level=LEVEL, title=f"Generalized ({MMU_HA:g} ha, {MIN_WIDTH_M:g} m)")))
display(Image(filename=iou_bar_chart(reports["held-out (val)"], paths.evaluation / "iou_heldout.png",
                                     title="IoU on the held-out area")))

# %% [markdown]
# ## Checks
# The class map is on the mosaic's grid with the model's classes only; the reported IoU equals
# the IoU counted here pixel by pixel with NumPy; the table shows the reports' figures.

# %%
predicted = prediction.values
assert_same_grid(geobox_of(prediction), geobox_of(mosaic), "class map", "mosaic")
assert predicted.dtype == np.uint8
assert set(np.unique(predicted).tolist()) <= set(codes) | {NODATA_CODE}
assert ((predicted == NODATA_CODE) == (mosaic.values == 0).all(axis=0)).all()
heldout = reports["held-out (val)"]
valid = masks["held-out (val)"] & np.isin(ref_codes, codes)
assert heldout["valid_pixels"] == int(valid.sum())
for code in codes:
    tp = int(((predicted == code) & (ref_codes == code) & valid).sum())
    fp = int(((predicted == code) & (ref_codes != code) & valid).sum())
    fn = int(((predicted != code) & (ref_codes == code) & valid).sum())
    expected = tp / (tp + fp + fn) if tp + fp + fn else None
    got = heldout["iou"][str(code)]
    assert (got is None and expected is None) or abs(got - expected) < 1e-12, (code, got, expected)
assert 0 <= heldout["mean_iou"] <= 1
assert list(table.columns) == [*codes, "mIoU"]
assert table.loc["held-out (val)", "mIoU"] == round(heldout["mean_iou"], 2)
print(f"held-out mIoU {heldout['mean_iou']:.3f} over {heldout['valid_pixels']} pixels")

# %%
cluster = client.cluster  # None when attached to a running scheduler
client.close()
if cluster is not None:
    cluster.close()
summary = {
    "class_map": str(prediction_path),
    "model_classes": codes,
    "heldout_miou": heldout["mean_iou"],
    "heldout_pixels": heldout["valid_pixels"],
    "heldout_area_pixels": int(masks["held-out (val)"].sum()),
    "val_patches": len(index.samples("val")),
    "patch_size": index.patch_size,
    "generalized_miou": reports["held-out, generalized"]["mean_iou"],
    "training_miou": reports["training patches"]["mean_iou"],
    "windows_as_trained_miou": reports["held-out, windows as trained"]["mean_iou"],
}
print(json.dumps(summary, indent=1))
