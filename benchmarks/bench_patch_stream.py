"""Patches/s delivered by the Dask patch stream vs patches/s consumed by the model step.

The stream must not be the bottleneck of training: the patches it delivers per second (computed
on a LocalCluster, prefetched) should exceed what the cpu-demo model step (forward + backward +
Adam, with the preset's decoder, channels-last layout and autocast) consumes per second on the
same machine. Four figures are printed:

1. stream alone: patches/s the stream delivers when nobody trains;
2. model alone: patches/s of the model step on patches already in memory;
3. both together: patches/s of the training loop fed by the stream, against the model alone
   (on a small machine both compete for the same cores; ~1.0 means the GPU/CPU never waits);
4. Zarr cache: patches/s read back from the cache the cluster wrote once (what ``cpu-demo``
   trains from, so that on 2 cores the model step has the cores to itself).

The three are measured in alternating rounds and the medians reported, because on a shared
machine the load drifts.

Usage::

    python benchmarks/bench_patch_stream.py                      # synthetic 2048² px mosaic
    python benchmarks/bench_patch_stream.py --mosaic september=M.tif --labels L.tif
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from odc.geo.geobox import GeoBox

from clc_dask.classes import colormap
from clc_dask.cluster import get_client
from clc_dask.model import build_model
from clc_dask.patches import (
    DaskPatchStream,
    ZarrPatchDataset,
    build_patch_index,
    cache_patches,
    patch_loader,
)
from clc_dask.presets import get_preset
from clc_dask.rasters import to_dataarray, write_geotiff
from clc_dask.train.device import amp_dtype

SPECTRA = {11: (1300, 1200, 1100, 1700), 21: (700, 900, 800, 3200), 31: (350, 550, 300, 3800),
           51: (500, 400, 250, 150)}


def synthetic(directory: Path, size: int) -> tuple[dict[str, Path], Path]:
    rng = np.random.default_rng(0)
    codes = np.array(sorted(SPECTRA), np.uint8)
    coarse = rng.integers(0, len(codes), (size // 32, size // 32))
    labels = codes[np.repeat(np.repeat(coarse, 32, 0), 32, 1)]
    gbox = GeoBox.from_bbox((500000, 4500000 - size * 10, 500000 + size * 10, 4500000), "EPSG:32633", resolution=10)
    lut = np.zeros((256, 4))
    for c, v in SPECTRA.items():
        lut[c] = v
    img = np.clip(lut[labels].transpose(2, 0, 1) + rng.normal(0, 100, (4, size, size)), 1, 10000).astype(np.uint16)
    mosaic = write_geotiff(to_dataarray(img, gbox, ["B02", "B03", "B04", "B08"]), directory / "mosaic.tif")
    label_path = write_geotiff(to_dataarray(labels, gbox), directory / "labels.tif", colormap=colormap(2))
    return {"september": mosaic}, label_path


def delivery_rate(dataset: DaskPatchStream | ZarrPatchDataset, n: int, batch_size: int) -> float:
    """Patches/s the dataset delivers in batches (nothing consumes them), over ``n`` patches."""
    start, seen = time.perf_counter(), 0
    for xb, _ in patch_loader(dataset, batch_size, epoch=0):
        seen += xb.shape[0]
        if seen >= n:
            break
    return seen / (time.perf_counter() - start)


def model_step(model: torch.nn.Module, opt: torch.optim.Optimizer, xb: torch.Tensor, yb: torch.Tensor,
               amp: torch.dtype | None = None) -> None:
    """One training step as the trainer runs it: channels-last input, the preset's autocast."""
    opt.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=amp, enabled=amp is not None):
        logits = model(xb.contiguous(memory_format=torch.channels_last))
    loss = torch.nn.functional.cross_entropy(logits.float(), yb.long(), ignore_index=255)
    loss.backward()
    opt.step()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mosaic", action="append", help="SEASON=PATH (default: a synthetic mosaic)")
    parser.add_argument("--labels", type=Path)
    parser.add_argument("--size", type=int, default=2048, help="synthetic mosaic edge in px")
    parser.add_argument("--preset", default="cpu-demo")
    parser.add_argument("--patches", type=int, default=384, help="patches per measurement")
    parser.add_argument("--workers", type=int, default=1, help="LocalCluster workers")
    parser.add_argument("--threads", type=int, default=1, help="threads per worker")
    parser.add_argument("--torch-threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--rounds", type=int, default=3, help="alternating measurement rounds")
    parser.add_argument("--no-cluster", action="store_true",
                        help="stream with dask's local threaded scheduler instead of a LocalCluster")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.torch_threads)
    config = get_preset(args.preset)

    with tempfile.TemporaryDirectory() as tmp:
        if args.mosaic:
            mosaics = {m.split("=", 1)[0]: Path(m.split("=", 1)[1]) for m in args.mosaic}
            labels = args.labels
        else:
            mosaics, labels = synthetic(Path(tmp), args.size)
        index = build_patch_index({s: mosaics[s] for s in config.seasons if s in mosaics} or mosaics, labels,
                                  patch_size=config.patch_size, bands=config.bands, split_block=config.split_block)
        n = min(args.patches, len(index.samples("train")))
        client = None if args.no_cluster else get_client(
            kind="local", n_workers=args.workers, threads_per_worker=args.threads, dashboard_address=None)
        load_before = os.getloadavg()[0]
        try:
            stream = DaskPatchStream(index, "train", seed=0, client=client, prefetch=config.prefetch)
            delivery_rate(stream, 2 * config.batch_size, config.batch_size)  # warm up workers
            torch.manual_seed(0)
            model = build_model(config.encoder, len(index.bands), len(index.classes), None,
                                decoder_channels=config.decoder_channels).to(memory_format=torch.channels_last)
            amp = amp_dtype(config, torch.device("cpu"))
            opt = torch.optim.Adam(model.parameters(), lr=config.lr)
            batches = [b for b, _ in zip(patch_loader(stream, config.batch_size), range(4), strict=False)]
            model_step(model, opt, *batches[0], amp=amp)
            store = cache_patches(index, Path(tmp) / "cache.zarr", client=client, prefetch=config.prefetch)
            steps = max(2, n // config.batch_size // 4)
            delivered, consumed, together, cached = [], [], [], []
            # alternate the measurements: on a shared machine the load drifts between them
            for round_ in range(args.rounds):
                stream.set_epoch(10 + round_)
                delivered.append(delivery_rate(stream, n, config.batch_size))
                cached.append(delivery_rate(ZarrPatchDataset(store, "train", index=index, seed=0), n,
                                            config.batch_size))
                start = time.perf_counter()
                for i in range(steps):
                    model_step(model, opt, *batches[i % len(batches)], amp=amp)
                consumed.append(steps * config.batch_size / (time.perf_counter() - start))
                start, seen = time.perf_counter(), 0
                for xb, yb in patch_loader(stream, config.batch_size, epoch=20 + round_):
                    model_step(model, opt, xb, yb, amp=amp)
                    seen += xb.shape[0]
                    if seen >= steps * config.batch_size:
                        break
                together.append(seen / (time.perf_counter() - start))
        finally:
            if client is not None:
                client.close()
    delivered_m, consumed_m, together_m, cached_m = (statistics.median(v) for v in
                                                     (delivered, consumed, together, cached))

    print(f"machine: {os.cpu_count()} cores, load average {load_before:.1f} → {os.getloadavg()[0]:.1f}; "
          f"preset {config.name}: {config.encoder}, {config.patch_size} px patches, batch {config.batch_size}, "
          f"autocast {amp}; "
          + ("local threaded scheduler" if args.no_cluster else f"LocalCluster {args.workers}×{args.threads} thread(s)")
          + f"; torch threads {args.torch_threads}; "
          f"median of {args.rounds} rounds")
    print(f"stream delivers        {delivered_m:8.1f} patches/s   {[round(v, 1) for v in delivered]}")
    print(f"model step consumes    {consumed_m:8.1f} patches/s   {[round(v, 1) for v in consumed]}")
    print(f"ratio stream / model   {delivered_m / consumed_m:8.2f}  (> 1: the stream is not the bottleneck)")
    print(f"training fed by stream {together_m:8.1f} patches/s = {together_m / consumed_m:.2f} × the model alone")
    print(f"Zarr cache delivers    {cached_m:8.1f} patches/s   {[round(v, 1) for v in cached]}  "
          f"(ratio to the model {cached_m / consumed_m:.2f})")


if __name__ == "__main__":
    main()
