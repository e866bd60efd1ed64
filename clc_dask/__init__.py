"""clc-dask: CORINE Land Cover maps from Sentinel-2 with U-Net, at country scale on Dask."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("clc-dask")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0"
