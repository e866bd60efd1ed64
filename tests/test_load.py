"""Loading scenes: reads that never depend on the read window, on real Sentinel-2 data.

The real 33TWM scenes (EPSG:32633, 120 m) are read onto grids in their own UTM zone, in the
neighbouring zone and in EPSG:3035. A tile loaded on its own grid, or the grid loaded in
small chunks, must equal the same pixels of the whole grid loaded at once, bit for bit —
otherwise every tile edge of a production run can show a seam.
"""

from __future__ import annotations

import numpy as np
import pytest
from odc.geo.geom import box

from clc_dask.errors import ConfigError
from clc_dask.grid import geobox_for_aoi
from clc_dask.load import exact_warp_xml, load_scenes
from clc_dask.search import search_items

TWM_CATALOG = "s2/earthsearch_v1_33TWM_2023-08/catalog.json"
READDIR = {"GDAL_DISABLE_READDIR_ON_OPEN": "NO"}  # the georeference is in .aux.xml sidecars
AOI = box(15.62, 46.25, 15.9, 46.45, "EPSG:4326")  # inside the 33TWM tile
RESOLUTION = 120.0  # metres: the catalog's files are 120 m
#: Sub-windows (rows, cols) of the grid: at the origin, unaligned, on the far edges.
WINDOWS = [
    (slice(0, 64), slice(0, 64)),
    (slice(37, 101), slice(53, 150)),
    (slice(101, None), slice(7, 77)),
    (slice(60, None), slice(130, None)),
]
CHUNK = 48  # pixels: chunk edges fall inside every window above


@pytest.fixture(scope="module")
def twm_items(shared_data):
    """Two clear dates of the real 33TWM catalog (B04 and SCL are read)."""
    items = search_items(shared_data / TWM_CATALOG, datetime="2023-08-13/2023-08-15")
    assert sorted(i.id for i in items) == ["S2A_33TWM_20230815_0_L2A", "S2B_33TWM_20230813_0_L2A"]
    return list(items)


def _load(items, geobox, **kwargs):
    return load_scenes(items, geobox, gdal=READDIR, bands=("B04",), **kwargs)


@pytest.fixture(scope="module", params=[32633, 32634, 3035], ids=["utm33", "utm34", "laea"])
def whole(request, twm_items):
    """The whole grid in one read (one chunk), as (geobox, values)."""
    gbox = geobox_for_aoi(AOI, request.param, RESOLUTION)
    values = _load(twm_items, gbox).values
    assert values.shape == (2, 2, *gbox.shape)
    assert (values > 0).mean() > 0.999  # real pixels everywhere, not fill
    return gbox, values


@pytest.mark.parametrize("window", WINDOWS, ids=["origin", "inner", "bottom", "right"])
def test_a_tile_loaded_on_its_own_grid_equals_that_window_of_the_whole(twm_items, whole, window):
    gbox, values = whole
    tile = gbox[window]
    loaded = _load(twm_items, tile)
    assert loaded.odc.geobox == tile
    np.testing.assert_array_equal(loaded.values, values[:, :, window[0], window[1]])


def test_small_unaligned_chunks_equal_the_whole_read(twm_items, whole):
    gbox, values = whole
    chunked = _load(twm_items, gbox, chunksize=CHUNK)
    assert chunked.data.numblocks[2:] == (-(-gbox.shape.y // CHUNK), -(-gbox.shape.x // CHUNK))
    np.testing.assert_array_equal(chunked.values, values)


def test_rectangular_chunks_equal_the_whole_read(twm_items, whole):
    gbox, values = whole
    chunked = _load(twm_items, gbox, chunk_size=(CHUNK, 2 * CHUNK + 5))
    assert chunked.data.chunks[2][0] == CHUNK and chunked.data.chunks[3][0] == 2 * CHUNK + 5
    np.testing.assert_array_equal(chunked.values, values)


def test_a_chunk_of_no_pixels_is_a_clear_error(twm_items, whole):
    for bad in [(CHUNK, 0), 0, (CHUNK,), "12", (CHUNK, "wide")]:
        with pytest.raises(ConfigError, match="chunk_size"):
            _load(twm_items, whole[0], chunk_size=bad)
    assert _load(twm_items, whole[0], chunk_size=np.int64(CHUNK)).data.chunks[2][0] == CHUNK


def test_the_approximate_transformer_would_leave_seams(twm_items, whole):
    """The control: GDAL's default 0.125 px approximation makes tiles differ from the whole
    grid wherever the grid is reprojected (which is why reads are exact)."""
    gbox, values = whole
    window = WINDOWS[1]
    tile = _load(twm_items, gbox[window], warp_tolerance=0.125).values
    whole_approx = _load(twm_items, gbox, warp_tolerance=0.125).values[:, :, window[0], window[1]]
    differing = int((tile != whole_approx).any(axis=1).sum())
    if gbox.crs.epsg == 32633:
        assert differing == 0  # same CRS and pixel size: the transform is affine, hence exact
    else:
        assert differing > 0


def test_exact_warp_xml_unwraps_the_approximate_transformer():
    xml = ("<VRTDataset><GDALWarpOptions><Transformer><ApproxTransformer><MaxError>0.125"
           "</MaxError><BaseTransformer><GenImgProjTransformer><SrcGeoTransform>0,1,0,0,0,-1"
           "</SrcGeoTransform></GenImgProjTransformer></BaseTransformer></ApproxTransformer>"
           "</Transformer></GDALWarpOptions></VRTDataset>")
    exact = exact_warp_xml(xml)
    assert "Approx" not in exact and "MaxError" not in exact
    assert ("<Transformer><GenImgProjTransformer><SrcGeoTransform>0,1,0,0,0,-1</SrcGeoTransform>"
            "</GenImgProjTransformer></Transformer>") in exact
    assert exact_warp_xml(exact) == exact


def test_negative_warp_tolerance_is_refused(twm_items, whole):
    gbox, _ = whole
    with pytest.raises(ConfigError, match="`warp_tolerance` must be 0 .* not -1"):
        _load(twm_items, gbox, warp_tolerance=-1)


def test_gdal_cache_is_cleared_for_remote_urls_only():
    from clc_dask.gdalenv import _vsi_path, clear_cached_url

    assert _vsi_path("https://bucket.example/B04.tif?sig=x") == "/vsicurl/https://bucket.example/B04.tif?sig=x"
    assert _vsi_path("s3://bucket/B04.tif") == "/vsis3/bucket/B04.tif"
    assert clear_cached_url("https://bucket.example/B04.tif") is True
    assert clear_cached_url("/data/B04.tif") is False  # GDAL caches nothing for local files


def test_reader_settings_survive_pickling():
    """Readers travel to Dask workers: retries and the warp tolerance go with them."""
    import pickle

    from clc_dask.load import RetryingReader

    reader = RetryingReader(url="https://bucket.example/B04.tif", spec=None, resampling=None,
                            dtype=np.dtype("uint16"), fill_value=0, scale_offset=(1, 0),
                            gdal_env=None, retries=4, retry_delay=0.5, warp_tolerance=0.125)
    copy = pickle.loads(pickle.dumps(reader))
    assert (copy.url, copy.retries, copy.retry_delay, copy.warp_tolerance) == (
        "https://bucket.example/B04.tif", 4, 0.5, 0.125)


#: Grids on the pixels of the 33TWM files (origin 499980, 5200020; 915 × 915 px of 120 m):
#: (first row, first column, rows, columns) on the file's grid, inside it and over its edges.
ALIGNED = [(40, 70, 64, 96), (-5, -9, 40, 50), (880, 890, 60, 45)]


def _file_window(path, top, left, rows, cols, factor=1):
    """The file's pixels under that window of a grid ``factor`` times finer, 0 (no data)
    outside the file: the truth."""
    import rasterio

    with rasterio.Env(**READDIR), rasterio.open(path) as src:
        values = src.read(1)
    fine = values.repeat(factor, axis=0).repeat(factor, axis=1)
    out = np.zeros((rows, cols), dtype=values.dtype)
    r0, c0 = max(top, 0), max(left, 0)
    r1, c1 = min(top + rows, fine.shape[0]), min(left + cols, fine.shape[1])
    out[r0 - top:r1 - top, c0 - left:c1 - left] = fine[r0:r1, c0:c1]
    return out


@pytest.mark.parametrize("factor", [1, 3], ids=["same-pixels", "three-times-finer"])
@pytest.mark.parametrize("window", ALIGNED, ids=["inside", "over-top-left", "over-bottom-right"])
def test_a_grid_on_the_files_pixels_is_read_without_warping(twm_items, window, factor, monkeypatch):
    """Where the grid lies on the file's pixels (CRS, edges; pixels the same or a whole
    fraction of the file's, like 20 m SCL on a 10 m grid), each output pixel is read
    directly — the file pixel under it, no data beyond the file — and equals the exact warp's."""
    from affine import Affine
    from odc.geo.geobox import GeoBox

    from clc_dask.load import RetryingReader

    top, left, rows, cols = window
    top, left, rows, cols = top * factor + (factor - 1), left * factor, rows * factor, cols * factor - 1
    size = 120 / factor
    gbox = GeoBox((rows, cols), Affine(size, 0, 499980 + size * left, 0, -size, 5200020 - size * top), "EPSG:32633")

    def no_warp(self, ds):
        raise AssertionError(f"{ds.name} was warped although the grid is on its pixels")

    with monkeypatch.context() as patched:
        patched.setattr(RetryingReader, "_warped", no_warp)
        direct = _load(twm_items, gbox, chunksize=32).values  # chunk edges inside the window too
    for t, item in enumerate(sorted(twm_items, key=lambda i: i.datetime)):
        np.testing.assert_array_equal(direct[t, 0], _file_window(item.assets["red"].href, top, left, rows, cols, factor))
    monkeypatch.setattr("clc_dask.load.pixel_alignment", lambda ds, params: None)
    np.testing.assert_array_equal(direct, _load(twm_items, gbox, chunksize=32).values)


def test_pixel_alignment_needs_the_same_crs_and_pixel_edges():
    from types import SimpleNamespace

    from affine import Affine
    from rasterio.crs import CRS

    from clc_dask.load import PixelAlignment, pixel_alignment

    src = SimpleNamespace(crs=CRS.from_epsg(32633), transform=Affine(20, 0, 399960, 0, -20, 5300040))
    grid = {"crs": 32633, "transform": Affine(20, 0, 399960 + 20 * 7, 0, -20, 5300040 - 20 * 3)}
    assert pixel_alignment(src, grid) == PixelAlignment(3, 7, 1)
    assert pixel_alignment(src, grid | {"transform": Affine(20, 0, 399940, 0, -20, 5300080)}) == PixelAlignment(-2, -1, 1)
    # a 10 m grid on the 20 m file: every 10 m edge is one (the 20 m SCL on the 10 m grid)
    assert pixel_alignment(src, grid | {"transform": Affine(10, 0, 399970, 0, -10, 5300000)}) == PixelAlignment(4, 1, 2)
    assert pixel_alignment(src, grid | {"crs": 32634}) is None
    assert pixel_alignment(src, grid | {"transform": Affine(40, 0, 399960, 0, -40, 5300040)}) is None  # coarser
    assert pixel_alignment(src, grid | {"transform": Affine(15, 0, 399960, 0, -15, 5300040)}) is None  # not a fraction
    assert pixel_alignment(src, grid | {"transform": Affine(10, 0, 399965, 0, -10, 5300040)}) is None  # half a pixel off
    assert pixel_alignment(src, grid | {"transform": Affine(20, 0.5, 399960, 0, -20, 5300040)}) is None  # rotated
    assert pixel_alignment(src, grid | {"transform": Affine(20, 0, 399960, 0, 20, 5300040)}) is None  # flipped
