"""Generalization of a class map to CORINE rules, chunk by chunk, exactly as in memory.

A predicted class map is noisy at the pixel scale; CORINE maps have a minimum mapping unit
(MMU, 25 ha) and a minimum width (100 m). This package turns a (y, x) code raster into a map
that follows both rules. :func:`generalize_array` runs on a NumPy array in memory;
:func:`generalize` runs on a dask-backed DataArray chunk by chunk and returns exactly the
same array for any chunking: the in-memory path *is* the chunked path with one chunk.

Definition
----------
Input: a (y, x) array of non-negative integer codes, ``0`` = no data; pixels of
``py × px`` metres (from the grid). No-data pixels are never changed and never merged into:
every step only rewrites valid pixels, so the no-data mask and the valid-pixel count are
conserved. The map goes through three steps:

1. MMU merge (rule A) — removes specks, which would otherwise make every window impure;
2. minimum width (rule B) — removes the narrow parts of the remaining patches;
3. MMU merge again (rule A) — merges the fragments step 2 may cut off.

Steps 2–3 are skipped when the width rule is off (``min_width_m`` under 1.5 pixels); rule A
is a no-op when ``mmu_px ≤ 1``. The final map has no patch under the MMU (exceptions
below). The width rule is applied once: where a step-3 merge itself creates a narrow part,
it stays (rare; merges only add whole small patches to a neighbour).

**Rule A — minimum mapping unit (merge small patches, smallest first).**

* ``mmu_px = ceil(mmu_ha · 10 000 / (py · px))`` (25 ha at 10 m → 2 500 px). A *patch* is a
  connected set of valid pixels of one code: 4-connected by default (as CLC polygons and
  ``rasterio.features.shapes`` see a raster), 8-connected on request. A patch is *small* if
  it has fewer than ``mmu_px`` pixels.
* Two patches are *neighbours* if some of their pixels are adjacent under the chosen
  connectivity. Their *shared border* is the number of 4-adjacent pixel pairs between them
  (pixel edges; a diagonal contact counts 0 but still makes neighbours under 8-connectivity).
* Repeat while a small patch with a neighbour exists: take the small patch ``P`` with the
  fewest pixels (ties: the patch whose first pixel in row-major order comes first — a key
  that does not depend on chunking). For each class among ``P``'s neighbours, total the
  shared border with ``P`` and the pixels of those neighbouring patches. ``P`` takes the
  class with the longest total border; ties go to the class whose neighbouring patches are
  larger in total, then to the smaller code. ``P`` and its neighbours of that class become
  one patch, which is queued again if still small.
* Exceptions, left as they are: a small patch with no neighbour at all (enclosed by no data
  and/or the raster edge — e.g. an islet, or a raster holding a single patch).

**Rule B — minimum width (a per-class opening by a disk, then a fill).**

* ``w = (wy, wx)`` with ``wy = floor(min_width_m / py + 0.5)`` (likewise ``wx``): the width in
  pixels rounded half up, 100 m at 10 m → 10. The structuring element is the digital disk of
  :func:`footprint`: the pixels of a ``wy × wx`` box whose centres lie in the inscribed ellipse
  (a circle for square pixels; 80 of the 100 pixels at 10 × 10). A disk measures width in
  every direction alike (a square would demand √2·w across a diagonal river). The opening of
  a region is the union of the disk's placements that fit inside it; that needs no centre
  pixel, so even widths are exact.
* A valid pixel is *wide* if at least one placement of the disk on the pixel grid contains it
  and contains no valid pixel of another class; no-data pixels and the area beyond the raster
  edge are wildcards (only borders with other classes make a part narrow). Per class ``c``
  this is the opening of ``{code == c} ∪ no data ∪ outside``, restricted to ``code == c``.
  Every other valid pixel is *thin*: narrow parts, and the tips of sharp corners.
* Thin pixels are refilled by region growing from the wide pixels in ``R = max(wy, wx)``
  synchronous rounds: each not-yet-filled thin pixel with at least one filled 4-neighbour
  takes the class held by most of its filled 4-neighbours; on a tie it keeps its own class if
  that is among the tied ones, else it takes the smallest tied code. All pixels of a round
  decide from the previous round's state. Thin pixels still unfilled after ``R`` rounds (no
  class is ``w`` wide anywhere near them) keep their class, and step 3 handles them. The tie
  rule gives most corner pixels back to their own class; the outermost pixel of a right-angle
  corner, whose filled neighbours are both foreign, goes to its neighbour.
* An output pixel depends only on input pixels within ``wy - 1 + R`` rows and ``wx - 1 + R``
  columns, so ``map_overlap`` with that halo and a constant no-data boundary gives the
  in-memory result exactly (the in-memory path pads with the same halo of no data).

Chunked execution
-----------------
A merge decision needs only the patch adjacency graph (class, pixel count, first pixel,
shared borders), not the pixels. Each MMU step labels every block's patches, joins labels
across block faces (pairs of facing edge pixels of one code are one patch; components via
``scipy.sparse.csgraph``), sums areas and borders into the graph, decides all merges in
memory on that table, and relabels each block with a lookup table. No task holds more than
one block plus its halo; the table holds a few numbers per patch. ``dask_image``'s
``ndmeasure.label`` is not used: it labels foreground against background rather than regions
of equal code (one pass per class), and the border table needs the block pass anyway.

Properties (tested): chunked == in memory for any chunking; no patch under the MMU remains
except the exceptions above; no-data pixels and the valid-pixel count are unchanged; every
output patch contains at least one input pixel of its own class (classes only spread from
neighbours); a patch that is at least the MMU and a union of disk placements (wide
everywhere) keeps all its pixels; ties are broken as stated.

:func:`compare_to_sieve` reports how far a result is from GDAL's sieve filter
(``rasterio.features.sieve``), which merges small patches into their largest neighbour and
has no width rule.

Modules
-------
- :mod:`~clc_dask.generalize.rules`: the rules in pixels, rule B (minimum width) on a block;
- :mod:`~clc_dask.generalize.patchgraph`: patches per block, the patch graph, rule A;
- :mod:`~clc_dask.generalize.core`: :func:`generalize`, :func:`generalize_array`, :func:`generalize_dask`;
- :mod:`~clc_dask.generalize.merge`: the global MMU decision of a map stored as tiles;
- :mod:`~clc_dask.generalize.tiles`: a map stored as tiles, generalized globally tile by
  tile, resumable (what a production run does);
- :mod:`~clc_dask.generalize.styles`: QML/SLD styles of the polygon layers;
- :mod:`~clc_dask.generalize.vector`: polygons of a class map;
- :mod:`~clc_dask.generalize.layer`: one layer for a map stored as tiles, polygons dissolved
  across tile edges;
- :mod:`~clc_dask.generalize.files`: GeoTIFF to COG (+ GeoPackage), the sieve comparison.
"""

from clc_dask.generalize.core import as_class_map, generalize, generalize_array, generalize_dask
from clc_dask.generalize.files import compare_to_sieve, count_patches, generalize_file, infer_level
from clc_dask.generalize.layer import vectorize_tiled
from clc_dask.generalize.patchgraph import (
    BlockPatches,
    PatchGraph,
    assemble,
    block_patches,
    label_equal,
    merge_small,
)
from clc_dask.generalize.rules import NODATA, Rules, footprint, rules_for, width_step
from clc_dask.generalize.styles import CODE_FIELD, fixed_gpkg_date, qml_style, sld_style
from clc_dask.generalize.tiles import TiledGeneralization, generalize_tiled
from clc_dask.generalize.vector import vectorize

__all__ = [
    "CODE_FIELD",
    "NODATA",
    "BlockPatches",
    "PatchGraph",
    "Rules",
    "TiledGeneralization",
    "as_class_map",
    "assemble",
    "block_patches",
    "compare_to_sieve",
    "count_patches",
    "fixed_gpkg_date",
    "footprint",
    "generalize",
    "generalize_array",
    "generalize_dask",
    "generalize_file",
    "generalize_tiled",
    "infer_level",
    "label_equal",
    "merge_small",
    "qml_style",
    "rules_for",
    "sld_style",
    "vectorize",
    "vectorize_tiled",
    "width_step",
]
