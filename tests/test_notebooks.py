"""The demo notebooks: executed in order on a small demo region, checked against their files.

The notebooks are read from their jupytext ``.py`` files, their ``parameters`` cell is given
small values (a 512 px region, 1 epoch, 1 worker with 1 thread), and they run with nbclient
on the ``python3`` kernel in one shared work folder, as a user would run them one after the
other. Notebook 01 starts its own local cluster; 02 and 03 attach to the test's cluster by the
``SCHEDULER_ADDRESS`` parameter, 04 and 05 by ``DASK_SCHEDULER_ADDRESS``.

Each notebook asserts on what it shows; here the tests check that it showed it (figures,
tables) and compare its printed summary with the files it wrote.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import nbformat
import numpy as np
import pandas as pd
import pytest
import rasterio

jupytext = pytest.importorskip("jupytext")
nbclient = pytest.importorskip("nbclient")

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
NAMES = [
    "01_search_and_mosaics",
    "02_labels_and_patches",
    "03_training",
    "04_inference_and_iou",
    "05_production_run",
    "06_experiments",
]
EPOCHS = 1
SMALL = {"SIZE": 512, "SEED": 0, "CHUNK_SIZE": 256}
CELL_TIMEOUT = 600  # seconds per cell: a guard against a hang, not a speed check


# ----------------------------------------------------------------------------- helpers


def read_py(name: str) -> nbformat.NotebookNode:
    return jupytext.read(NOTEBOOKS / f"{name}.py")


def parameters_cell(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
    cells = [c for c in nb.cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(cells) == 1, "a notebook needs exactly one cell tagged 'parameters'"
    return cells[0]


def with_parameters(nb: nbformat.NotebookNode, **values: Any) -> nbformat.NotebookNode:
    """Set parameters by rewriting their lines in the ``parameters`` cell (each must exist)."""
    cell = parameters_cell(nb)
    lines = cell.source.splitlines()
    for name, value in values.items():
        pattern = re.compile(rf"^{name}\s*=")
        hits = [i for i, line in enumerate(lines) if pattern.match(line)]
        assert hits, f"parameter {name} is not in the parameters cell"
        lines[hits[0]] = f"{name} = {value!r}"
    cell.source = "\n".join(lines)
    return nb


def execute(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
    client = nbclient.NotebookClient(nb, timeout=CELL_TIMEOUT, kernel_name="python3",
                                     resources={"metadata": {"path": str(NOTEBOOKS)}})
    client.execute()
    return nb


def code_cells(nb: nbformat.NotebookNode) -> list[nbformat.NotebookNode]:
    return [c for c in nb.cells if c.cell_type == "code"]


def images(nb: nbformat.NotebookNode) -> int:
    """Number of PNG images the notebook displayed."""
    return sum("image/png" in out.get("data", {}) for c in code_cells(nb) for out in c.outputs)


def html_tables(nb: nbformat.NotebookNode) -> list[str]:
    return [out["data"]["text/html"] for c in code_cells(nb) for out in c.outputs
            if "<table" in out.get("data", {}).get("text/html", "")]


def text_of(cell: nbformat.NotebookNode) -> str:
    parts = []
    for out in cell.outputs:
        if out.output_type == "stream":
            parts.append(out.text)
        elif "data" in out:
            parts.append(out["data"].get("text/plain", "") + out["data"].get("text/html", ""))
    return "".join(parts)


def summary(nb: nbformat.NotebookNode) -> dict[str, Any]:
    """The JSON summary the last cell prints."""
    text = "".join(o.text for o in code_cells(nb)[-1].outputs if o.output_type == "stream")
    return json.loads(text[text.index("{"):])


def cluster_cell(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
    cells = [c for c in code_cells(nb) if "get_client(" in c.source]
    assert len(cells) == 1, "a notebook attaches to the cluster in exactly one cell"
    return cells[0]


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def kernel() -> str:
    from jupyter_client.kernelspec import KernelSpecManager

    specs = KernelSpecManager().find_kernel_specs()
    assert "python3" in specs, (
        f"no 'python3' Jupyter kernel (found {sorted(specs)}): pip install ipykernel "
        "(the dev extra has it), or python -m ipykernel install --user"
    )
    return "python3"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("notebooks")


@pytest.fixture(scope="module")
def scheduler():
    """A one-worker, one-thread cluster the notebooks 02–05 attach to."""
    from distributed import LocalCluster

    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster:
        yield cluster.scheduler_address


@pytest.fixture(scope="module")
def run(kernel, workdir):
    """Execute a notebook with the small parameters (and any others) in the shared folder."""

    def _run(name: str, **params: Any) -> nbformat.NotebookNode:
        nb = with_parameters(read_py(name), WORKDIR=str(workdir), **SMALL, **params)
        return execute(nb)

    return _run


def read_band(path: Path) -> np.ndarray:
    with rasterio.open(path) as src:
        return src.read(1)


# ----------------------------------------------------------------------------- pairing


@pytest.mark.parametrize("name", NAMES)
def test_ipynb_is_the_py_without_outputs(name):
    """The committed .ipynb is `jupytext --to ipynb` of the .py: same cells, tags, no outputs."""
    py = read_py(name)
    ipynb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    nbformat.validate(ipynb)
    assert [(c.cell_type, c.source) for c in ipynb.cells] == [(c.cell_type, c.source) for c in py.cells], (
        f"{name}.ipynb is out of date: run jupytext --to ipynb notebooks/{name}.py"
    )
    assert [c.metadata.get("tags", []) for c in ipynb.cells] == [c.metadata.get("tags", []) for c in py.cells]
    for cell in code_cells(ipynb):
        assert cell.outputs == [] and cell.execution_count is None, f"{name}.ipynb has outputs"
    assert ipynb.metadata["kernelspec"]["name"] == "python3"


@pytest.mark.parametrize("name", NAMES)
def test_notebook_structure(name):
    """One parameters cell (work folder, cluster address, small defaults), one cluster cell."""
    nb = read_py(name)
    params = parameters_cell(nb).source
    for key in ("WORKDIR", "SIZE", "SEED", "SCHEDULER_ADDRESS"):
        assert re.search(rf"^{key}\s*=", params, re.M), f"{name}: parameter {key} missing"
    assert re.search(r"^SCHEDULER_ADDRESS\s*=\s*None", params, re.M)
    assert int(re.search(r"^SIZE\s*=\s*(\d+)", params, re.M).group(1)) <= 1024  # small default
    assert "address=SCHEDULER_ADDRESS" in cluster_cell(nb).source
    assert code_cells(nb).index(cluster_cell(nb)) == code_cells(nb).index(parameters_cell(nb)) + 1


# ----------------------------------------------------------------------------- executed in order


def test_01_search_and_mosaics(run, workdir):
    nb = run("01_search_and_mosaics", N_WORKERS=1, THREADS_PER_WORKER=1)
    out = summary(nb)
    assert images(nb) >= 1
    assert "LocalCluster" in text_of(cluster_cell(nb))
    tables = html_tables(nb)
    assert any("cloud cover %" in t and "baseline" in t for t in tables)
    assert out["items"] == 12  # 4 dates in each of 3 seasons
    items = json.loads((workdir / "items.json").read_text())
    assert len(items["features"]) == out["items"]
    for season, info in out["seasons"].items():
        path = Path(info["mosaic"])
        assert path.parent == workdir / "mosaics"
        with rasterio.open(path) as src:
            assert src.count == 3 and src.dtypes[0] == "uint16" and src.descriptions == ("B08", "B04", "B03")
            assert (src.width, src.height) == (512, 512) and src.crs.to_epsg() == 32633
            data = src.read()
        count = read_band(path.with_name(f"mosaic_{season}_clear_count.tif"))
        assert int(count.max()) == info["clear_count_max"] <= info["scenes"]
        assert ((data > 0).all(axis=0) == (count > 0)).all()
        checks = out["cloud_checks"][season]
        assert checks["mosaic_b03_max"] == int(data[2][count > 0].max()) < checks["cloud_b03_p05"]


def test_02_labels_and_patches(run, workdir, scheduler):
    nb = run("02_labels_and_patches", SCHEDULER_ADDRESS=scheduler)
    out = summary(nb)
    assert scheduler in text_of(cluster_cell(nb))
    assert images(nb) >= 2  # the label map and the split
    assert any("rare" in t for t in html_tables(nb))
    with rasterio.open(workdir / "labels" / "clc_level2.tif") as src, \
            rasterio.open(workdir / "mosaics" / "mosaic_september.tif") as mosaic:
        assert (src.crs, src.transform, src.shape) == (mosaic.crs, mosaic.transform, mosaic.shape)
        assert src.colormap(1)[21][:3] == (255, 255, 168)  # official colour of arable land
        labels = src.read(1)
    codes = sorted(int(c) for c in np.unique(labels) if c)
    assert codes == out["label_codes"]
    index = json.loads((workdir / "patches" / "patch_index.json").read_text())
    assert index["counts"]["train"]["total"] == out["train_patches"] > 0
    assert index["counts"]["val"]["total"] == out["val_patches"] > 0
    stats = pd.read_csv(workdir / "patches" / "class_stats.csv")
    assert sorted(stats.loc[stats["rare"], "code"].tolist()) == out["rare_classes"]
    assert stats["train_pixels"].sum() + stats["val_pixels"].sum() == out["labelled_patch_pixels"]


def test_03_training(run, workdir, scheduler):
    nb = run("03_training", SCHEDULER_ADDRESS=scheduler, EPOCHS=EPOCHS)
    out = summary(nb)
    assert scheduler in text_of(cluster_cell(nb))
    assert images(nb) >= 1  # loss and IoU curves
    metrics = pd.read_csv(workdir / "train" / "metrics.csv")
    assert len(metrics) == EPOCHS == out["epochs"]
    assert metrics["epoch"].tolist() == list(range(1, EPOCHS + 1))
    assert out["final_train_loss"] == pytest.approx(metrics["train_loss"].iloc[-1])
    assert 0 <= out["best_val_miou"] <= 1
    assert (workdir / "train" / "best.pt").exists()


def test_04_inference_and_iou(run, workdir, scheduler, monkeypatch):
    monkeypatch.setenv("DASK_SCHEDULER_ADDRESS", scheduler)
    nb = run("04_inference_and_iou")
    out = summary(nb)
    assert scheduler in text_of(cluster_cell(nb))
    assert images(nb) >= 2  # the maps side by side and the IoU bars
    report = json.loads((workdir / "evaluation" / "report_heldout.json").read_text())
    assert report["mean_iou"] == pytest.approx(out["heldout_miou"]) and 0 <= report["mean_iou"] <= 1
    assert report["valid_pixels"] == out["heldout_pixels"] == sum(report["reference_pixels"].values())
    index = json.loads((workdir / "patches" / "patch_index.json").read_text())
    assert out["val_patches"] == index["counts"]["val"]["total"] and out["patch_size"] == index["patch_size"]
    assert out["heldout_pixels"] <= out["heldout_area_pixels"] == out["val_patches"] * out["patch_size"] ** 2
    table = pd.read_csv(workdir / "evaluation" / "table.csv", index_col=0)
    assert list(table.index) == ["held-out (val)", "held-out, generalized", "held-out, windows as trained",
                                 "training patches"]
    assert [int(c) for c in table.columns[:-1]] == out["model_classes"] and table.columns[-1] == "mIoU"
    for code in out["model_classes"]:
        value, expected = table.loc["held-out (val)", str(code)], report["iou"][str(code)]
        assert (np.isnan(value) and expected is None) or value == pytest.approx(round(expected, 2))
    assert table.loc["held-out (val)", "mIoU"] == pytest.approx(round(report["mean_iou"], 2))
    with rasterio.open(workdir / "predict" / "class_map_september.tif") as src, \
            rasterio.open(workdir / "labels" / "clc_level2.tif") as ref:
        assert (src.crs, src.transform, src.shape) == (ref.crs, ref.transform, ref.shape)
        predicted = {int(c) for c in np.unique(src.read(1))} - {0}
    assert predicted <= set(out["model_classes"])
    assert (workdir / "evaluation" / "maps.png").stat().st_size > 10_000


def test_05_production_run(run, workdir, scheduler, monkeypatch):
    monkeypatch.setenv("DASK_SCHEDULER_ADDRESS", scheduler)
    nb = run("05_production_run", TILE_SIZE=256, FIRST_TILES=2)
    out = summary(nb)
    assert scheduler in text_of(cluster_cell(nb))
    assert images(nb) >= 2  # progress on the tile grid, a published tile
    assert out["dry_run"]["tiles_to_process"] == 4 and out["dry_run"]["tiles_already_done"] == 0
    assert out["first_pass"] == 2 and sorted(out["resumed_skipped"]) == sorted(out["first_pass_tiles"])
    store = Path(out["store"])
    manifest = json.loads((store / "manifest.json").read_text())
    assert manifest["complete"] is True and sorted(manifest["tiles"]) == ["1_1", "1_2", "2_1", "2_2"]
    collection = json.loads((store / "stac" / "collection.json").read_text())
    items = [link for link in collection["links"] if link["rel"] == "item"]
    assert len(items) == len(manifest["tiles"]) == out["stac_items"]
    for link in items:
        item = json.loads((store / "stac" / link["href"]).resolve().read_text())
        tile = item["properties"]["clc_dask:tile"]
        asset = (store / "stac" / link["href"]).resolve().parent / item["assets"]["generalized"]["href"]
        assert asset.resolve() == (store / "tiles" / tile / "generalized.tif").resolve()
        sha = manifest["generalized"][tile]["files"][f"tiles/{tile}/generalized.tif"]["sha256"]
        assert item["assets"]["generalized"]["file:checksum"] == "1220" + sha
    assert out["opened_item_shape"] == [256, 256]


def test_06_experiments(run, workdir, scheduler):
    nb = run("06_experiments", SCHEDULER_ADDRESS=scheduler, EPOCHS=EPOCHS, REPLICATES=200)
    out = summary(nb)
    assert scheduler in text_of(cluster_cell(nb))
    assert images(nb) >= 4  # the split, training curves, IoU with intervals, best/worst maps
    assert len(html_tables(nb)) >= 4  # configurations, training, table, comparisons
    root = Path(out["experiment"])
    assert root == workdir / "experiment"
    assert out["configurations"] == ["sept-nrg", "sept-rgb", "septapr-nrg"]
    table = pd.read_csv(out["table"], index_col=0)
    assert list(table.index) == out["configurations"] and list(table.columns[-3:]) == ["mIoU", "OA", "kappa"]
    for name in out["configurations"]:
        report = json.loads((root / "configurations" / name / out["area"] / "report.json").read_text())
        assert report["mean_iou"] == pytest.approx(out["miou"][name])
        assert table.loc[name, "mIoU"] == pytest.approx(round(report["mean_iou"], 4))
        assert report["intervals"]["mean_iou"] == pytest.approx(out["miou_interval"][name])
        assert len(report["tiles"]) == out["test_blocks"] > 0
        metrics = pd.read_csv(root / "configurations" / name / "train" / "metrics.csv")
        assert metrics["epoch"].tolist() == list(range(1, EPOCHS + 1))
    with rasterio.open(root / "regions" / "demo" / "mosaic_april.tif") as src:
        assert src.descriptions == ("B02", "B03", "B04", "B08") and src.dtypes[0] == "uint16"
    for figure in ("split.png", "training_curves.png", f"{out['area']}/iou_intervals.png", f"{out['area']}/maps.png"):
        assert (root / "results" / figure).stat().st_size > 5000


@pytest.mark.slow
def test_05_runs_alone_in_a_fresh_folder(kernel, tmp_path):
    """Run alone, notebook 05 makes every input itself: region, mosaic, labels, patches, model."""
    nb = with_parameters(read_py("05_production_run"), WORKDIR=str(tmp_path), **SMALL, EPOCHS=EPOCHS,
                         N_WORKERS=1, THREADS_PER_WORKER=1)
    out = summary(execute(nb))
    assert out["complete"] and out["stac_items"] == 4
    assert (tmp_path / "mosaics" / "mosaic_september.tif").exists()
    assert (tmp_path / "patches" / "patch_index.json").exists()
    assert len(pd.read_csv(tmp_path / "train" / "metrics.csv")) == EPOCHS
