"""Trainer: metrics, checkpoints, exact resume after SIGKILL, checks before training, presets, CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from test_patches import BANDS, grid, read, synthetic_scene
from typer.testing import CliRunner

from clc_dask.classes import ClassTable
from clc_dask.errors import CheckpointError, ConfigError, GridMismatchError, OutputError
from clc_dask.evaluate import metrics_from_confusion
from clc_dask.model import Checkpoint, build_model, load_checkpoint, save_checkpoint
from clc_dask.patches import DaskPatchStream, build_patch_index, patch_loader
from clc_dask.presets import PRESETS, get_preset
from clc_dask.rasters import to_dataarray, write_geotiff
from clc_dask.train import (
    CHECKPOINT_FILE,
    TrainConfig,
    augment,
    config_for_index,
    make_train_config,
    train,
    train_from_mosaics,
)

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    root = tmp_path_factory.mktemp("train_scene")
    mosaics, labels = synthetic_scene(root, 128, ("september",), seed=1)
    return root, mosaics, labels


@pytest.fixture(scope="module")
def index(scene):
    _, mosaics, labels = scene
    idx = build_patch_index(mosaics, labels, patch_size=32, bands="nrg", split_block=1, seed=0)
    idx.save(scene[0] / "index")
    return idx


def small_config(index, **overrides) -> TrainConfig:
    values = dict(encoder="resnet18", epochs=2, batch_size=4, lr=1e-3, seed=2, device="cpu", prefetch=4)
    values.update(overrides)
    return config_for_index(index, **values)


@pytest.fixture(scope="module")
def trained(index, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    config = small_config(index, loss="ce+dice", class_weights="inverse-frequency")
    return train(config, index, out, progress=False), config


def test_training_writes_metrics_and_checkpoints(trained, index):
    result, config = trained
    assert [h["epoch"] for h in result.history] == [1, 2]
    assert all(np.isfinite(h["train_loss"]) and np.isfinite(h["val_loss"]) for h in result.history)
    assert result.history[1]["train_loss"] < result.history[0]["train_loss"]
    csv = pd.read_csv(result.metrics_csv)
    assert list(csv["epoch"]) == [1, 2]
    assert {"train_loss", "val_loss", "val_miou", "iou_11", "iou_21", "iou_31", "iou_51"} <= set(csv.columns)
    np.testing.assert_allclose(csv["val_loss"], [h["val_loss"] for h in result.history])
    doc = json.loads(result.metrics_json.read_text())
    assert doc["best_epoch"] == result.best_epoch and doc["bands"] == ["B08", "B04", "B03"]
    assert doc["config"]["loss"] == "ce+dice"
    ck = load_checkpoint(result.checkpoint)
    assert ck.epoch == 2 and ck.bands == ("B08", "B04", "B03") and ck.classes == index.classes
    assert ck.normalization == index.normalization and ck.encoder == "resnet18"
    assert ck.config["patch_index"]["fingerprint"] == index.fingerprint()
    assert ck.optimizer_state["adam"]["state"] and ck.rng_state["data_epoch"] == 2
    assert len(ck.history) == 2
    assert not [p for p in result.out_dir.iterdir() if p.name.startswith(".")], "temporary file left"


def test_recorded_val_iou_equals_recomputation_from_best_checkpoint(trained, index):
    result, config = trained
    best = load_checkpoint(result.best_checkpoint)
    assert best.epoch == result.best_epoch and best.optimizer_state is None
    model = best.build_model()
    n = len(index.classes)
    cm = np.zeros((n, n), np.int64)
    with torch.no_grad():
        for x, y in patch_loader(DaskPatchStream(index, "val"), 3):
            pred = model(x).argmax(1)
            valid = y != 255
            cm += np.bincount((y[valid].long() * n + pred[valid]).numpy(), minlength=n * n).reshape(n, n)
    expected = metrics_from_confusion(cm, index.classes.codes)
    record = result.history[result.best_epoch - 1]
    assert record["val_miou"] == pytest.approx(expected["mean_iou"], abs=1e-12)
    for code in index.classes.codes:
        assert record[f"iou_{code}"] == pytest.approx(expected["iou"][str(code)], abs=1e-12)


RUNNER = textwrap.dedent("""
    import sys
    import torch
    torch.set_num_threads(1)
    from clc_dask.patches import load_patch_index
    from clc_dask.train import config_for_index, train
    index = load_patch_index(sys.argv[1])
    config = config_for_index(index, encoder="resnet18", epochs=3, batch_size=4, lr=1e-3, seed=2,
                              device="cpu", prefetch=4, lr_schedule="cosine", patches_per_epoch=8)
    train(config, index, sys.argv[2], resume=sys.argv[3] == "resume", progress=False)
""")


def run_script(tmp_path: Path, *args: str) -> subprocess.Popen:
    script = tmp_path / "run_training.py"
    script.write_text(RUNNER)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, str(script), *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def test_resume_after_sigkill_equals_uninterrupted_training(tmp_path, index, scene):
    index_dir = str(scene[0] / "index")
    full = run_script(tmp_path, index_dir, str(tmp_path / "full"), "new")
    killed_dir = tmp_path / "killed"
    victim = run_script(tmp_path, index_dir, str(killed_dir), "new")
    deadline = time.monotonic() + 240
    while not (killed_dir / CHECKPOINT_FILE).exists():
        assert victim.poll() is None, victim.stdout.read().decode()
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.02)
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    assert victim.returncode == -signal.SIGKILL
    epoch_at_kill = load_checkpoint(killed_dir / CHECKPOINT_FILE).epoch
    assert 1 <= epoch_at_kill < 3, "the run was not interrupted mid-way"
    assert full.wait(timeout=300) == 0, full.stdout.read().decode()

    resumed = run_script(tmp_path, index_dir, str(killed_dir), "resume")
    assert resumed.wait(timeout=300) == 0, resumed.stdout.read().decode()
    a = json.loads((tmp_path / "full" / "metrics.json").read_text())["history"]
    b = json.loads((killed_dir / "metrics.json").read_text())["history"]
    assert [h["epoch"] for h in b] == [1, 2, 3] and [h["train_patches"] for h in b] == [8, 8, 8]
    assert b[0]["lr"] > b[1]["lr"] > b[2]["lr"]  # cosine decay, a function of the step only
    for ha, hb in zip(a, b, strict=True):
        for key in ("train_loss", "val_loss", "val_miou"):
            assert abs(ha[key] - hb[key]) <= 1e-6, (key, ha[key], hb[key])
    wa = load_checkpoint(tmp_path / "full" / CHECKPOINT_FILE).state_dict
    wb = load_checkpoint(killed_dir / CHECKPOINT_FILE).state_dict
    assert max(float((wa[k].float() - wb[k].float()).abs().max()) for k in wa) <= 1e-6


def test_stream_and_zarr_data_train_identically(tmp_path, index):
    one = small_config(index, epochs=1, augment=True)
    a = train(one, index, tmp_path / "stream", progress=False)
    b = train(one.model_copy(update={"data": "zarr"}), index, tmp_path / "zarr", progress=False,
              cache_store=tmp_path / "cache.zarr")
    assert a.history[0]["train_loss"] == b.history[0]["train_loss"]
    assert a.history[0]["val_loss"] == b.history[0]["val_loss"]


def test_augmentation_moves_image_and_labels_together():
    y = torch.randint(0, 5, (6, 8, 8), dtype=torch.uint8)
    x = torch.stack([y.float(), -y.float()], dim=1)
    gen = torch.Generator().manual_seed(0)
    xa, ya = augment(x, y, gen)
    assert torch.equal(xa[:, 0], ya.float()) and torch.equal(xa[:, 1], -ya.float())
    assert not torch.equal(ya, y)
    xb, yb = augment(x, y, torch.Generator().manual_seed(0))
    assert torch.equal(ya, yb) and torch.equal(xa, xb)


def random_checkpoint(path: Path, bands: tuple[str, ...], classes: ClassTable, index) -> Path:
    model = build_model("resnet18", len(bands), len(classes))
    return save_checkpoint(Checkpoint("resnet18", bands, classes, index.normalization, model.state_dict()), path)


def test_checkpoints_for_other_bands_or_classes_are_refused(tmp_path, scene, index):
    _, mosaics, labels = scene
    rgb = build_patch_index(mosaics, labels, patch_size=32, bands="rgb", split_block=1)
    nrg_ck = random_checkpoint(tmp_path / "nrg.pt", index.bands, index.classes, index)
    with pytest.raises(CheckpointError, match=r"bands \['B08', 'B04', 'B03'\].*\['B04', 'B03', 'B02'\]"):
        train(small_config(rgb), rgb, tmp_path / "ft", init_checkpoint=nrg_ck)
    fewer = ClassTable(2, [11, 21, 31])
    other_classes = random_checkpoint(tmp_path / "classes.pt", index.bands, fewer, index)
    with pytest.raises(CheckpointError, match=r"\[11, 21, 31\].*\[11, 21, 31, 51\]"):
        train(small_config(index), index, tmp_path / "ft", init_checkpoint=other_classes)
    # resuming from a run on other bands
    run = tmp_path / "resume"
    run.mkdir()
    (run / CHECKPOINT_FILE).write_bytes(nrg_ck.read_bytes())
    with pytest.raises(CheckpointError, match="bands"):
        train(small_config(rgb), rgb, run, resume=True)
    assert not (tmp_path / "ft").exists() and not (run / "metrics.csv").exists()


class Payload:
    """Any Python object: unpickling it could run code."""


def test_pickled_checkpoint_refused(tmp_path, index):
    evil = tmp_path / "run" / CHECKPOINT_FILE
    evil.parent.mkdir()
    torch.save({"format": "clc-dask-checkpoint", "state_dict": {}, "extra": Payload()}, evil)
    with pytest.raises(CheckpointError, match="pickled Python objects"):
        train(small_config(index), index, tmp_path / "run", resume=True)
    with pytest.raises(CheckpointError, match="pickled Python objects"):
        train(small_config(index), index, tmp_path / "other", init_checkpoint=evil)
    assert not (tmp_path / "run" / "metrics.csv").exists()


def test_bad_inputs_fail_before_training(tmp_path, scene, index):
    _, mosaics, labels = scene
    out = tmp_path / "out"
    # a season of the preset without a mosaic
    with pytest.raises(ConfigError, match=r"\['april'\] have no mosaic.*`mosaics`"):
        train_from_mosaics(get_preset("septapr-nrg-r101-128"), mosaics, labels, out)
    # a label raster on another grid
    other = write_geotiff(to_dataarray(read(labels)[0], grid(128, (600000.0, 4500000.0))), tmp_path / "l.tif")
    with pytest.raises(GridMismatchError, match="label"):
        train_from_mosaics(small_config(index), mosaics, other, out)
    # zero usable patches
    empty = write_geotiff(to_dataarray(np.zeros((4, 128, 128), np.uint16), grid(128), BANDS), tmp_path / "e.tif")
    with pytest.raises(ConfigError, match="`max_nodata_fraction`"):
        train_from_mosaics(small_config(index), {"september": empty}, labels, out)
    # unknown preset or encoder
    with pytest.raises(ConfigError, match="cpu-demo") as err:
        get_preset("sept-rgb-r152-256")
    assert all(name in str(err.value) for name in PRESETS)
    with pytest.raises(ConfigError, match=r"encoder.*resnet101"):
        make_train_config(small_config(index), encoder="vgg16")
    # an index made for other bands than the preset's
    with pytest.raises(ConfigError, match=r"bands \['B08', 'B04', 'B03'\].*rgb|B04"):
        train(get_preset("sept-rgb-r50-256"), index, out)
    # a finished run is not overwritten silently
    run = tmp_path / "done"
    run.mkdir()
    (run / CHECKPOINT_FILE).write_bytes(b"x")
    with pytest.raises(OutputError, match="`resume`"):
        train(small_config(index), index, run)
    assert not out.exists()


def test_presets_are_table_2():
    table2 = {
        "sept-rgb-r50-256": (("september",), ("B04", "B03", "B02"), "resnet50", 256),
        "sept-rgb-r101-256": (("september",), ("B04", "B03", "B02"), "resnet101", 256),
        "sept-nrg-r101-256": (("september",), ("B08", "B04", "B03"), "resnet101", 256),
        "septapr-nrg-r101-256": (("september", "april"), ("B08", "B04", "B03"), "resnet101", 256),
        "septapr-nrg-r101-128": (("september", "april"), ("B08", "B04", "B03"), "resnet101", 128),
    }
    for name, (seasons, bands, encoder, size) in table2.items():
        config = get_preset(name)
        assert (config.seasons, config.bands, config.encoder, config.patch_size) == (seasons, bands, encoder, size)
        assert config.epochs == 100 and config.encoder_weights == "imagenet" and config.name == name
    demo = get_preset("cpu-demo", epochs=3)
    assert demo.encoder in ("resnet18", "resnet34") and demo.encoder_weights is None and demo.epochs == 3
    assert get_preset("cpu-demo").epochs == PRESETS["cpu-demo"].epochs


def test_cli_train_resume_and_errors(tmp_path, scene, index):
    from clc_dask.cli import app

    out = tmp_path / "cli-run"
    base = ["train", "--patches", str(scene[0] / "index"), "--encoder", "resnet18", "--batch-size", "4",
            "--device", "cpu", "--seed", "2", "--out", str(out), "--no-progress"]
    result = CliRunner().invoke(app, [*base, "--epochs", "1"])
    assert result.exit_code == 0, result.output
    assert "Best validation mIoU" in result.output
    assert {"checkpoint.pt", "best.pt", "metrics.csv", "metrics.json"} <= {p.name for p in out.iterdir()}
    again = CliRunner().invoke(app, [*base, "--epochs", "1"])
    assert isinstance(again.exception, OutputError)
    resumed = CliRunner().invoke(app, [*base, "--epochs", "2", "--resume"])
    assert resumed.exit_code == 0, resumed.output
    assert list(pd.read_csv(out / "metrics.csv")["epoch"]) == [1, 2]
    other_lr = CliRunner().invoke(app, [*base, "--epochs", "3", "--resume", "--lr", "0.01"])
    assert isinstance(other_lr.exception, ConfigError) and "lr=" in str(other_lr.exception)
    wrong = CliRunner().invoke(app, ["train", "--preset", "cpu-demo", "--patches", str(scene[0] / "index"),
                                     "--out", str(tmp_path / "w")])
    assert isinstance(wrong.exception, ConfigError) and "patch size 32 px" in str(wrong.exception)
    bad = CliRunner().invoke(app, ["train", "--preset", "nope", "--patches", str(scene[0] / "index"),
                                   "--out", str(tmp_path / "w")])
    assert isinstance(bad.exception, ConfigError) and "septapr-nrg-r101-128" in str(bad.exception)
    for option, message in (("64,x", "whole numbers"), ("64,32", "5 positive integers")):
        bad_decoder = CliRunner().invoke(app, [*base[:-3], "--out", str(tmp_path / "w"), "--decoder-channels", option])
        assert isinstance(bad_decoder.exception, ConfigError) and message in str(bad_decoder.exception)
    assert not (tmp_path / "w").exists()
    light = CliRunner().invoke(app, [*base[:-3], "--out", str(tmp_path / "light"), "--epochs", "1", "--no-progress",
                                     "--decoder-channels", "32,32,16,16,8", "--amp", "off"])
    assert light.exit_code == 0, light.output
    assert load_checkpoint(tmp_path / "light" / CHECKPOINT_FILE).decoder_channels == (32, 32, 16, 16, 8)


def test_light_decoder_bf16_and_sqrtclass_weights(tmp_path, index):
    """The CPU preset's settings: a lighter decoder recorded in the checkpoint, bf16 autocast on
    CPUs that have it, and class weights ∝ 1/√pixels (mean 1 over the classes present)."""
    from clc_dask.train.device import amp_dtype, cpu_has_bf16
    from clc_dask.train.losses import class_weights

    config = small_config(index, epochs=1, decoder_channels=(64, 32, 16, 16, 8), amp="bf16",
                          class_weights="inverse-sqrt-frequency")
    result = train(config, index, tmp_path / "light", progress=False)
    ckpt = load_checkpoint(result.checkpoint)
    assert ckpt.decoder_channels == (64, 32, 16, 16, 8)
    assert ckpt.build_model().segmentation_head[0].in_channels == 8
    assert np.isfinite(result.history[0]["train_loss"])
    expected = torch.bfloat16 if cpu_has_bf16() else None
    assert amp_dtype(config, torch.device("cpu")) is expected
    assert amp_dtype(small_config(index), torch.device("cpu")) is None  # auto: CUDA only

    pixels = index.class_statistics()["train_pixels"].to_numpy(dtype=float)
    weights = class_weights(index, 0.5).numpy()
    present = pixels > 0
    assert np.allclose(weights[present].mean(), 1.0) and (weights[~present] == 0).all()
    ratio = weights[present] * np.sqrt(pixels[present])
    assert np.allclose(ratio, ratio[0], rtol=1e-5), "weights are not ∝ 1/√pixels"

    with pytest.raises(ConfigError, match="decoder_channels.*5 positive integers"):
        make_train_config(config, decoder_channels=(64, 32))
    with pytest.raises(ConfigError, match="decoder channels \\[64, 32, 16, 16, 8\\]"):
        train(small_config(index), index, tmp_path / "ft", init_checkpoint=result.checkpoint)


def test_cli_train_errors_name_its_options(tmp_path, scene, index, monkeypatch, capsys):
    """The library names `resume`, `overwrite` and `out_dir`; the command shows --resume, --overwrite, --out."""
    from test_patches import run_main

    run = tmp_path / "done"
    run.mkdir()
    (run / CHECKPOINT_FILE).write_bytes(b"x")
    code, _, err = run_main(monkeypatch, capsys, "train", "--patches", scene[0] / "index", "--out", run,
                            "--device", "cpu", "--no-progress")
    assert code == 1
    assert "pass --resume to continue it, --overwrite to replace it, or choose another --out" in err
    assert sorted(p.name for p in run.iterdir()) == [CHECKPOINT_FILE]


def test_train_from_mosaics_refuses_a_finished_run_before_computing(tmp_path, scene, index):
    _, mosaics, labels = scene
    run = tmp_path / "done"
    run.mkdir()
    (run / CHECKPOINT_FILE).write_bytes(b"x")
    with pytest.raises(OutputError, match="`resume`"):
        train_from_mosaics(small_config(index), mosaics, labels, run)
    assert not (run / "patches").exists(), "the patch index was computed and saved anyway"


def test_no_import_cycle_among_patches_train_presets_and_their_commands():
    """Module-level imports of clc_dask (any depth, including imports inside functions) form no
    cycle through the patches and training modules, and training never imports the presets."""
    import ast

    import clc_dask

    root = Path(clc_dask.__file__).parent
    modules = {".".join(("clc_dask", *p.relative_to(root).with_suffix("").parts)).removesuffix(".__init__"): p
               for p in root.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("clc_dask"):
                targets.add(node.module)
                targets.update(f"{node.module}.{a.name}" for a in node.names)
            elif isinstance(node, ast.Import):
                targets.update(a.name for a in node.names if a.name.startswith("clc_dask"))
        graph[name] = {t for t in targets if t in modules and t != name}
    ours = {m for m in modules if m.startswith(("clc_dask.patches", "clc_dask.train", "clc_dask.presets",
                                                 "clc_dask.cli.patches", "clc_dask.cli.train",
                                                 "clc_dask.demo.training"))}
    assert {"clc_dask.patches.index", "clc_dask.train.trainer", "clc_dask.presets"} <= ours

    def reaches(start: str, goal: str) -> bool:
        seen, todo = set(), [start]
        while todo:
            for nxt in graph[todo.pop()] - seen:
                if nxt == goal:
                    return True
                seen.add(nxt)
                todo.append(nxt)
        return False

    cycles = sorted(m for m in ours if reaches(m, m))
    assert not cycles, f"import cycles through {cycles}"
    train_modules = [m for m in ours if m.startswith("clc_dask.train")]
    assert not any("clc_dask.presets" in graph[m] for m in train_modules)
