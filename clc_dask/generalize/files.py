"""File to file: generalize a class-map GeoTIFF, and compare a result with GDAL's sieve.

:func:`generalize_file` is what ``clc-dask generalize`` calls: it checks everything before
writing, generalizes chunk by chunk and writes a COG (and optionally styled polygons).
:func:`compare_to_sieve` reports how far a result is from ``rasterio.features.sieve``, which
merges small patches into their largest neighbour and has no width rule.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np
import rasterio.features
import xarray as xr

from clc_dask.classes import colormap, validate_codes
from clc_dask.errors import ConfigError, InputError, OutputError
from clc_dask.generalize.core import generalize
from clc_dask.generalize.patchgraph import label_equal
from clc_dask.generalize.rules import NODATA, check_codes_dtype, rules_for
from clc_dask.generalize.vector import vectorize
from clc_dask.rasters import check_writable, geobox_of, open_raster, write_geotiff

log = logging.getLogger(__name__)


# --------------------------------------------------------------- comparison with GDAL


def count_patches(codes: np.ndarray, connectivity: int = 4, below: int | None = None) -> int:
    """Number of patches (connected regions of one non-zero code); only those < ``below`` px if given."""
    labels, n = label_equal(np.asarray(codes), connectivity)
    if below is None:
        return n
    return int((np.bincount(labels.ravel(), minlength=n + 1)[1:] < below).sum())


def compare_to_sieve(
    codes: np.ndarray,
    generalized: np.ndarray,
    mmu_px: int,
    connectivity: int = 4,
) -> dict[str, float | int]:
    """How far a generalized map is from GDAL's sieve of the same input (in memory).

    GDAL's sieve (``rasterio.features.sieve``, no data masked out) merges every patch under
    ``mmu_px`` pixels into its largest neighbour and has no width rule.

    Args:
        codes: the input class map (y, x), 0 = no data.
        generalized: our result for ``codes``.
        mmu_px: the MMU in pixels (``rules_for(...).mmu_px``).
        connectivity: 4 or 8, used for the sieve and for counting patches.

    Returns:
        ``valid_pixels``; fractions of valid pixels ``changed_by_generalize``,
        ``changed_by_sieve`` and ``differ_from_sieve``; patch counts ``patches_input``,
        ``patches_generalized``, ``patches_sieve`` and those still under the MMU
        (``small_patches_generalized``, ``small_patches_sieve``).
    """
    codes = np.asarray(codes)
    generalized = np.asarray(generalized)
    if codes.shape != generalized.shape:
        raise InputError(f"Cannot compare maps of shapes {codes.shape} and {generalized.shape}: use the same grid.")
    valid = codes != NODATA
    sieve_dtype = np.int32 if codes.dtype.itemsize > 2 or codes.dtype.kind == "i" else codes.dtype
    sieved = rasterio.features.sieve(codes.astype(sieve_dtype), size=max(int(mmu_px), 1),
                                     mask=valid, connectivity=connectivity).astype(codes.dtype)
    n = int(valid.sum())

    def frac(a: np.ndarray, b: np.ndarray) -> float:
        return float(((a != b) & valid).sum() / n) if n else 0.0

    return {
        "mmu_px": int(mmu_px),
        "connectivity": int(connectivity),
        "valid_pixels": n,
        "changed_by_generalize": frac(codes, generalized),
        "changed_by_sieve": frac(codes, sieved),
        "differ_from_sieve": frac(generalized, sieved),
        "patches_input": count_patches(codes, connectivity),
        "patches_generalized": count_patches(generalized, connectivity),
        "patches_sieve": count_patches(sieved, connectivity),
        "small_patches_generalized": count_patches(generalized, connectivity, below=mmu_px),
        "small_patches_sieve": count_patches(sieved, connectivity, below=mmu_px),
    }


# ------------------------------------------------------------------------ file to file


def infer_level(codes: np.ndarray) -> int:
    """The CLC level of the codes present (1: 1–9, 2: 10–99, 3: 100–999); 0 is ignored."""
    valid = np.asarray(codes)[np.asarray(codes) != NODATA]
    if valid.size == 0:
        raise InputError("The class map holds no data at all (every pixel is 0): nothing to generalize.")
    levels = {1 if c < 10 else 2 if c < 100 else 3 for c in np.unique(valid).tolist()}
    if len(levels) != 1 or max(levels) > 3 or valid.min() < 0 or valid.max() > 999:
        raise InputError(
            f"The class map mixes codes of different CLC levels ({sorted(np.unique(valid).tolist())[:12]}): "
            "reduce it to one level first (clc_dask.classes.to_level) or pass `level`."
        )
    return levels.pop()


def generalize_file(
    input_path: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    mmu_ha: float = 25.0,
    min_width_m: float = 100.0,
    connectivity: int = 4,
    vector: str | os.PathLike[str] | None = None,
    level: int | None = None,
    chunk_size: int = 2048,
    compare_sieve: bool = False,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Generalize a class-map GeoTIFF into a COG (and optionally GeoPackage polygons).

    Everything is checked (options, output paths, input band count, dtype and codes)
    before any output is written; outputs are written atomically.

    Args:
        input_path: single-band class map (CLC codes, 0 = no data).
        out: generalized COG to write (official colour table embedded).
        mmu_ha: minimum mapping unit in hectares.
        min_width_m: minimum width in metres.
        connectivity: 4 or 8 (patches for the MMU rule).
        vector: also write polygons to this ``.gpkg`` (with ``.qml``/``.sld`` beside it).
        level: CLC level of the codes (default: inferred from the codes present).
        chunk_size: dask chunk edge in pixels (memory per task grows with its square).
        compare_sieve: also compare with GDAL's sieve (loads both maps into memory).
        overwrite: replace existing outputs.

    Returns:
        A summary: paths, rules in pixels, level, and the sieve comparison if asked for.
    """
    rules = rules_for(1.0, mmu_ha, min_width_m, connectivity)  # validate options first
    if chunk_size <= 0:
        raise ConfigError(f"`chunk_size` must be a positive number of pixels, not {chunk_size}.")
    input_path, out = Path(input_path), Path(out)
    if input_path.exists() and out.exists() and out.resolve() == input_path.resolve():
        raise ConfigError(f"`out` {out} is the input itself: write the generalized map to another file.")
    check_writable(out, overwrite)
    if vector is not None:
        vector = Path(vector)
        if vector.suffix.lower() != ".gpkg":
            raise OutputError(f"`vector` {vector}: vector output must be a GeoPackage named *.gpkg.")
        for path in (vector, vector.with_suffix(".qml"), vector.with_suffix(".sld")):
            check_writable(path, overwrite)
    arr = open_raster(input_path, chunks=chunk_size)
    if arr.sizes["band"] != 1:
        raise InputError(f"`input_path` {input_path} has {arr.sizes['band']} bands: a class map has one band of CLC codes.")
    arr = arr.isel(band=0, drop=True)
    check_codes_dtype(arr.dtype)
    nodata = arr.rio.nodata
    if nodata is not None and nodata != NODATA:
        log.warning("%s marks no data with %s; clc-dask class maps use 0, so those pixels become 0", input_path, nodata)
        arr = xr.where(arr == nodata, NODATA, arr).astype(arr.dtype)
    present = da.unique(arr.data).compute() if isinstance(arr.data, da.Array) else np.unique(arr.values)
    level = level or infer_level(present)
    validate_codes(present, level)
    result = generalize(arr, mmu_ha=mmu_ha, min_width_m=min_width_m, connectivity=connectivity)
    res = geobox_of(result).resolution
    rules = rules_for((res.y, res.x), mmu_ha, min_width_m, connectivity)
    tags = {"GENERALIZE_MMU_HA": mmu_ha, "GENERALIZE_MIN_WIDTH_M": min_width_m,
            "GENERALIZE_CONNECTIVITY": connectivity, "CLC_LEVEL": level}
    write_geotiff(result, out, nodata=NODATA, colormap=colormap(level), tags=tags, overwrite=overwrite)
    summary: dict[str, Any] = {
        "input": str(input_path), "out": str(out), "level": level, "mmu_px": rules.mmu_px,
        "min_width_px": list(rules.width_px), "connectivity": connectivity,
    }
    if vector is not None:
        written = open_raster(out, chunks=chunk_size).isel(band=0, drop=True)
        summary["vector"] = str(vectorize(written, vector, level=level, overwrite=overwrite))
    if compare_sieve:
        generalized = open_raster(out, chunks=None).isel(band=0).values
        summary["sieve"] = compare_to_sieve(arr.values, generalized, rules.mmu_px, connectivity)
    return summary
