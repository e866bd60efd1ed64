import numpy as np
import pytest
import torch

from clc_dask.classes import ClassTable
from clc_dask.errors import CheckpointError, ConfigError
from clc_dask.model import (
    Checkpoint,
    Normalization,
    band_statistics,
    build_model,
    load_checkpoint,
    save_checkpoint,
)
from clc_dask.stores import file_sha256


@pytest.fixture
def checkpoint(tmp_path):
    torch.manual_seed(0)
    table = ClassTable(2, [11, 21, 31, 51])
    model = build_model("resnet18", 3, len(table), encoder_weights=None)
    ck = Checkpoint("resnet18", ("B08", "B04", "B03"), table,
                    Normalization((0.2, 0.1, 0.1), (0.1, 0.05, 0.05)), model.state_dict(), epoch=3)
    return save_checkpoint(ck, tmp_path / "model.pt"), model


def test_round_trip_gives_same_predictions(checkpoint):
    path, model = checkpoint
    loaded = load_checkpoint(path)
    assert loaded.bands == ("B08", "B04", "B03") and loaded.epoch == 3
    assert loaded.classes.codes == (11, 21, 31, 51)
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), loaded.build_model()(x))
    assert len(file_sha256(path)) == 64
    assert not list(path.parent.glob(".model.pt.*")), "temporary file left behind"


class Payload:
    """An arbitrary Python object: unpickling it could run code."""


def test_pickled_payload_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"format": "clc-dask-checkpoint", "obj": Payload()}, path)
    with pytest.raises(CheckpointError, match="pickled Python objects"):
        load_checkpoint(path)


def test_mismatch_named(checkpoint):
    ck = load_checkpoint(checkpoint[0])
    with pytest.raises(CheckpointError, match=r"bands \['B08', 'B04', 'B03'\].*\['B04', 'B03', 'B02'\]"):
        ck.check_compatible(bands=("B04", "B03", "B02"))
    with pytest.raises(CheckpointError, match=r"\[11, 21, 31, 51\].*\[11, 21\]"):
        ck.check_compatible(classes=ClassTable(2, [11, 21]))


def test_not_a_checkpoint(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(2)}, path)
    with pytest.raises(CheckpointError, match="not a clc-dask checkpoint"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")


def test_unknown_encoder():
    with pytest.raises(ConfigError, match="resnet50"):
        build_model("vgg16", 3, 5)


def test_normalization_keeps_nodata_zero():
    norm = Normalization((0.1, 0.1), (0.05, 0.05))
    dn = torch.tensor([[[[0, 1000]], [[0, 1500]]]], dtype=torch.int32)
    out = norm.apply(dn)
    assert out[0, :, 0, 0].tolist() == [0.0, 0.0]
    assert out[0, 0, 0, 1].item() == pytest.approx(0.0, abs=1e-6)
    assert out[0, 1, 0, 1].item() == pytest.approx(1.0)
    stats = band_statistics(np.array([[[0, 1000, 3000]], [[0, 2000, 2000]]], dtype=np.uint16))
    assert stats.mean == pytest.approx((0.2, 0.2)) and stats.std == pytest.approx((0.1, 0.0), abs=1e-6)


def test_decoder_channels_are_part_of_the_checkpoint(tmp_path):
    torch.manual_seed(0)
    table = ClassTable(2, [11, 21, 31])
    light = (128, 64, 32, 16, 8)
    model = build_model("resnet18", 3, len(table), decoder_channels=light)
    assert model.decoder.blocks[0].conv1[0].out_channels == 128
    assert model.segmentation_head[0].in_channels == 8
    ck = Checkpoint("resnet18", ("B08", "B04", "B03"), table, Normalization((0.2,) * 3, (0.1,) * 3),
                    model.state_dict(), decoder_channels=light)
    loaded = load_checkpoint(save_checkpoint(ck, tmp_path / "light.pt"))
    assert loaded.decoder_channels == light
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), loaded.build_model()(x))


def test_checkpoints_without_decoder_channels_use_the_default(checkpoint):
    path, model = checkpoint
    payload = torch.load(path, weights_only=True)
    del payload["model"]["decoder_channels"]  # as written before the field existed
    torch.save(payload, path)
    loaded = load_checkpoint(path)
    assert loaded.decoder_channels == (256, 128, 64, 32, 16)
    assert loaded.build_model().decoder.blocks[0].conv1[0].out_channels == 256


@pytest.mark.parametrize("channels", [(128, 64, 32), (128, 64, 32, 16, 0), (128, 64, 32, 16, 8.5)])
def test_bad_decoder_channels(channels):
    with pytest.raises(ConfigError, match="decoder_channels.*5 positive integers"):
        build_model("resnet18", 3, 5, decoder_channels=channels)
