"""One root error type for everything clc-dask raises on purpose.

Every message says what happened, why, and what to change, e.g.
``"The label raster is on EPSG:32633 but the mosaic is on EPSG:32632: pass `like` (the mosaic)"``.

Messages name the Python parameter to change in backticks (`` `mmu_ha` ``), never a command-line
flag: notebook users never typed one. The CLI shows the same message with each backticked
parameter replaced by its option (`` `mmu_ha` `` → ``--mmu-ha``; see :func:`clc_dask.cli.cli_message`).
"""

from __future__ import annotations


class ClcDaskError(Exception):
    """Root of all errors raised by clc-dask on bad input or failed runs."""


class ConfigError(ClcDaskError, ValueError):
    """A run configuration or option is invalid (the message names the field)."""


class InputError(ClcDaskError, ValueError):
    """An input file, catalog or array cannot be used as given."""


class GridMismatchError(InputError):
    """Two rasters that must share one grid (CRS, resolution, bounds) do not."""


class SearchError(ClcDaskError):
    """A STAC search failed or found nothing usable."""


class ReadError(ClcDaskError, OSError):
    """Reading an asset failed after retries (the asset and the reason are named)."""


class CheckpointError(ClcDaskError):
    """A model checkpoint is unsafe, corrupt, or does not match the data."""


class ServerError(ClcDaskError):
    """A local demo server could not start (e.g. its port is in use)."""


class OutputError(ClcDaskError):
    """An output location cannot be written or holds another run's results."""
