"""Named training configurations: the paper's Table 2, and a CPU-sized demo.

Table 2 of the paper (Demir & Musaoglu) fixes the dataset (September, or September + April as
separate samples), the bands (RGB = B04,B03,B02; NRG = B08,B04,B03), the encoder (ResNet50 or
ResNet101, ImageNet transfer learning), the optimizer (Adam), 100 epochs and the patch size
(256 or 128 px). It does not give the batch size or learning rate; the presets use Adam's usual
fine-tuning rate 1e-4 and batches that fit a 16 GB GPU (16 × 256² or 32 × 128² px).
"""

from __future__ import annotations

from typing import Any

from clc_dask.errors import ConfigError
from clc_dask.train.config import TrainConfig, make_train_config

_PAPER = {"encoder_weights": "imagenet", "epochs": 100, "lr": 1e-4, "val_fraction": 0.25}

PRESETS: dict[str, TrainConfig] = {
    "sept-rgb-r50-256": TrainConfig(name="sept-rgb-r50-256", seasons=("september",), composite="rgb",
                                    encoder="resnet50", patch_size=256, batch_size=16, **_PAPER),
    "sept-rgb-r101-256": TrainConfig(name="sept-rgb-r101-256", seasons=("september",), composite="rgb",
                                     encoder="resnet101", patch_size=256, batch_size=16, **_PAPER),
    "sept-nrg-r101-256": TrainConfig(name="sept-nrg-r101-256", seasons=("september",), composite="nrg",
                                     encoder="resnet101", patch_size=256, batch_size=16, **_PAPER),
    "septapr-nrg-r101-256": TrainConfig(name="septapr-nrg-r101-256", seasons=("september", "april"),
                                        composite="nrg", encoder="resnet101", patch_size=256,
                                        batch_size=16, **_PAPER),
    "septapr-nrg-r101-128": TrainConfig(name="septapr-nrg-r101-128", seasons=("september", "april"),
                                        composite="nrg", encoder="resnet101", patch_size=128,
                                        batch_size=32, split_block=8, **_PAPER),
    # Sized for 2 CPU cores and the demo region (4096² px): resnet18 from scratch with a decoder of
    # half the usual width (128…8 channels), 128 px patches (as in Table 2's last row) on a
    # one-patch split block, bf16 autocast on CPUs that have it, batches of 8 (more steps per
    # pixel), cosine-decayed Adam, CE weighted by 1/√pixels + Dice (rare classes such as 13
    # quarries and 41 marshes are learnt without drowning the common ones), patches cached to
    # Zarr once (training never competes with the cluster for the cores), validation every 2nd
    # epoch. Measured on the 4096 px demo region: val mIoU ≥ 0.8 over its 11 Level-2 classes in
    # about 6 min, held-out mIoU ≥ 0.75 (tests/test_demo_accuracy.py).
    "cpu-demo": TrainConfig(name="cpu-demo", seasons=("september",), composite="nrg", encoder="resnet18",
                            decoder_channels=(128, 64, 32, 16, 8), encoder_weights=None, patch_size=128,
                            val_fraction=0.15, epochs=20, batch_size=8, lr=3e-3, lr_schedule="cosine",
                            loss="ce+dice", class_weights="inverse-sqrt-frequency", augment=True,
                            device="cpu", amp="bf16", data="zarr", prefetch=64, val_every=2),
}

#: Short descriptions, as in the paper's Table 2 (dataset, bands, encoder, patch size).
DESCRIPTIONS = {
    "sept-rgb-r50-256": "Table 2 row 1: Sept, RGB, U-Net/ResNet50, Adam, 100 epochs, 256 px",
    "sept-rgb-r101-256": "Table 2 row 2: Sept, RGB, U-Net/ResNet101, Adam, 100 epochs, 256 px",
    "sept-nrg-r101-256": "Table 2 row 3: Sept, NRG, U-Net/ResNet101, Adam, 100 epochs, 256 px",
    "septapr-nrg-r101-256": "Table 2 row 4: Sept & Apr, NRG, U-Net/ResNet101, Adam, 100 epochs, 256 px",
    "septapr-nrg-r101-128": "Table 2 row 5: Sept & Apr, NRG, U-Net/ResNet101, Adam, 100 epochs, 128 px",
    "cpu-demo": "CPU demo: Sept, NRG, U-Net/ResNet18 (light decoder, no pretrained weights), 128 px, "
                "< 10 min on 2 cores",
}


def preset_names() -> list[str]:
    """All preset names, paper presets first."""
    return list(PRESETS)


def get_preset(name: str, **overrides: Any) -> TrainConfig:
    """The named configuration, with ``overrides`` (None values are ignored) applied and validated.

    Raises:
        ConfigError: unknown name (the message lists the valid ones) or invalid override.
    """
    if name not in PRESETS:
        raise ConfigError(f"Unknown preset {name!r}: choose one of {', '.join(PRESETS)}.")
    return make_train_config(PRESETS[name], **overrides)
