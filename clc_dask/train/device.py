"""Where and in which precision training runs, with deterministic kernels on the CPU."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import torch
import torch.utils.deterministic as tud

from clc_dask.errors import ConfigError
from clc_dask.train.config import TrainConfig

log = logging.getLogger(__name__)


def select_device(choice: str) -> torch.device:
    """The torch device of a config's ``device`` (``auto``: CUDA when visible, else CPU)."""
    if choice == "cuda" and not torch.cuda.is_available():
        raise ConfigError("`device` 'cuda' was asked for but no CUDA GPU is visible: set `device` to cpu or auto.")
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(choice)


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX512-BF16 or AMX); else bf16 is emulated (slow)."""
    cpu = getattr(torch, "cpu", None)
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(cpu, name, lambda: False)()) for name in checks)


def amp_dtype(config: TrainConfig, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of training on ``device`` (None = float32)."""
    if config.amp == "off":
        return None
    if device.type == "cpu":
        if config.amp == "bf16" and cpu_has_bf16():
            return torch.bfloat16
        if config.amp == "bf16":
            log.warning("amp=bf16: this CPU has no native bfloat16 (AVX512-BF16/AMX), where it would be "
                        "slower than float32: training in float32.")
        elif config.amp == "fp16":
            log.warning("amp=fp16 is for CUDA devices: training on the CPU in float32.")
        return None
    if config.amp == "fp16" or (config.amp == "auto" and not torch.cuda.is_bf16_supported()):
        return torch.float16
    return torch.bfloat16


@contextlib.contextmanager
def deterministic(device: torch.device) -> Iterator[None]:
    """Deterministic kernels on CPU for the duration of training (restored afterwards).

    Filling fresh memory (a debugging aid of deterministic mode) is switched off: it costs
    10–15 % of a CPU step and no kernel used here reads uninitialised memory.
    """
    previous = torch.are_deterministic_algorithms_enabled()
    previous_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    previous_fill = tud.fill_uninitialized_memory
    if device.type == "cpu":
        torch.use_deterministic_algorithms(True, warn_only=True)
        tud.fill_uninitialized_memory = False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous, warn_only=previous_warn)
        tud.fill_uninitialized_memory = previous_fill
