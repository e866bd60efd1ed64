"""Training and prediction with a full disk or damaged inputs: a clear error naming the file,
nothing that looks complete, and the same result once the cause is gone.

* a file-size limit (``RLIMIT_FSIZE`` in a subprocess, as a full disk: writes fail with
  EFBIG) while the Zarr patch cache is written, and while a checkpoint is written;
* a truncated checkpoint given to ``--resume``, a damaged chunk of the Zarr patch cache, a
  truncated mosaic COG given to ``predict``.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import zarr
from typer.testing import CliRunner

from clc_dask.cli import app
from clc_dask.errors import CheckpointError, InputError
from clc_dask.patches import CACHE_STORE, ZarrPatchDataset, cache_patches, load_patch_index
from clc_dask.predict import predict_to_file
from clc_dask.stores import is_partial
from faults.runs import TRAIN_EPOCHS, TRAIN_OPTIONS, assert_same_training

LIMITED = textwrap.dedent("""
    import resource, signal, sys
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails (EFBIG), as on a full disk
    limit = int(sys.argv[1])
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    sys.argv = ["clc-dask", *sys.argv[2:]]
    from clc_dask.cli import main
    main()
""")


def _limited_cli(tmp_path: Path, limit: int, args: list[str]) -> subprocess.CompletedProcess:
    script = tmp_path / "limited.py"
    script.write_text(LIMITED)
    return subprocess.run([sys.executable, str(script), str(limit), *args], capture_output=True, text=True,
                          timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})


def _leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.rglob(".*") if is_partial(p)]


@pytest.fixture
def index_copy(train_index, tmp_path):
    """The suite's patch index in a folder of this test (its Zarr cache goes beside it)."""
    shutil.copytree(train_index, tmp_path / "index")
    return tmp_path / "index"


def test_full_disk_while_caching_patches_then_training_resumes(index_copy, whole_training, tmp_path):
    clean = cache_patches(load_patch_index(index_copy), tmp_path / "clean.zarr")
    sizes = {p.relative_to(clean).as_posix(): p.stat().st_size for p in clean.rglob("*") if p.is_file()}
    image_chunks = [size for name, size in sizes.items() if name.startswith("x/c/")]
    limit = min(image_chunks) - 1
    assert limit > max(size for name, size in sizes.items() if not name.startswith("x/c/")), sizes
    out = tmp_path / "run"
    args = ["train", "--patches", str(index_copy), *TRAIN_OPTIONS, "--data", "zarr", "--epochs", str(TRAIN_EPOCHS),
            "--out", str(out)]
    done = _limited_cli(tmp_path, limit, args)
    assert done.returncode == 1, done.stderr[-3000:]
    error = done.stderr.strip().splitlines()[-1]
    store = index_copy / CACHE_STORE
    assert error == (f"Error: Cannot write {store}: File too large. Free space on its disk (or raise the limit), "
                     "then run the command again; nothing was left in its place (a run continues with --resume).")
    assert not store.exists() and _leftovers(index_copy) == [] and not (out / "checkpoint.pt").exists()

    resumed = CliRunner().invoke(app, [*args, "--resume"])  # room again
    assert resumed.exit_code == 0, resumed.output
    for name in ("x", "y"):
        np.testing.assert_array_equal(zarr.open_array(store / name)[:], zarr.open_array(clean / name)[:])
    assert_same_training(out, whole_training)


def test_full_disk_while_writing_a_checkpoint_then_training_resumes(train_index, whole_training, tmp_path):
    out = tmp_path / "run"
    args = ["train", "--patches", str(train_index), *TRAIN_OPTIONS, "--epochs", str(TRAIN_EPOCHS), "--out", str(out)]
    limit = 1 << 20  # above the metrics files, below a checkpoint (~50 MB)
    done = _limited_cli(tmp_path, limit, args)
    assert done.returncode == 1, done.stderr[-3000:]
    error = done.stderr.strip().splitlines()[-1]
    assert re.match(rf"Error: Cannot write {out}/(best|checkpoint)\.pt: the file-size limit of this process "
                    rf"\(ulimit -f\) of {limit} bytes was reached\. Free space on its disk", error), error
    assert not (out / "best.pt").exists() and not (out / "checkpoint.pt").exists() and _leftovers(out) == []

    resumed = CliRunner().invoke(app, [*args, "--resume"])  # room again: no checkpoint yet, so from epoch 1
    assert resumed.exit_code == 0, resumed.output
    assert_same_training(out, whole_training)


def test_truncated_checkpoint_is_refused_on_resume_naming_it(train_index, whole_training, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(whole_training, out)
    checkpoint = out / "checkpoint.pt"
    data = checkpoint.read_bytes()
    checkpoint.write_bytes(data[: len(data) // 3])
    result = CliRunner().invoke(app, ["train", "--patches", str(train_index), *TRAIN_OPTIONS,
                                      "--epochs", str(TRAIN_EPOCHS + 1), "--out", str(out), "--resume"])
    assert isinstance(result.exception, CheckpointError), result.output
    assert str(result.exception).startswith(f"Cannot read checkpoint {checkpoint}: ")
    assert checkpoint.read_bytes() == data[: len(data) // 3]  # left as it was, for the user to look at


def test_damaged_patch_cache_chunk_is_an_error_naming_the_chunk(index_copy, tmp_path):
    index = load_patch_index(index_copy)
    store = cache_patches(index, tmp_path / "cache.zarr")
    rows = ZarrPatchDataset(store, "train", index=index)._rows
    row = rows[len(rows) // 2]
    chunk = store / "x" / zarr.open_array(store / "x").metadata.encode_chunk_key((row, 0, 0, 0))
    data = bytearray(chunk.read_bytes())
    data[8:40] = b"\x00" * 32  # damaged inside the compressed frame
    chunk.write_bytes(bytes(data))
    for preload in (True, False):
        dataset = ZarrPatchDataset(store, "train", index=index, preload=preload)
        with pytest.raises(InputError, match=rf"patch cache {store} is damaged: patch {row} \(chunk file {chunk} "):
            [dataset[i] for i in range(len(dataset))]


def test_truncated_mosaic_cog_given_to_predict_is_an_error_naming_it(whole_training, train_index, tmp_path):
    mosaic = Path(load_patch_index(train_index).mosaic_paths["september"])
    truncated = tmp_path / "mosaic.tif"
    data = mosaic.read_bytes()
    truncated.write_bytes(data[: len(data) * 2 // 3])
    out = tmp_path / "out" / "map.tif"
    with pytest.raises(InputError, match=rf"(Cannot read the mosaic|Cannot open raster) {truncated}"):
        predict_to_file(truncated, whole_training / "checkpoint.pt", out, halo=32, window=64, batch_size=4,
                        device="cpu", chunk_size=64)
    assert not out.exists() and _leftovers(tmp_path) == []
