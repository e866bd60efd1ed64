import dask.array as da
import numpy as np
import pytest
import rasterio

from clc_dask.classes import colormap
from clc_dask.errors import InputError, OutputError
from clc_dask.grid import snapped_geobox
from clc_dask.rasters import geobox_of, open_raster, to_dataarray, write_geotiff


@pytest.fixture
def gbox():
    return snapped_geobox((500000, 4100000, 505120, 4105120), 32633, 10)  # 512 x 512 px


def test_chunked_cog_round_trip(tmp_path):
    gbox = snapped_geobox((500000, 4100000, 510240, 4110240), 32633, 10)  # 1024 px: has overviews
    rng = np.random.default_rng(1)
    data = rng.integers(1, 10000, (3, 1024, 1024), dtype=np.uint16)
    arr = to_dataarray(da.from_array(data, chunks=(1, 200, 300)), gbox, band_names=["B08", "B04", "B03"])
    path = write_geotiff(arr, tmp_path / "m.tif")
    with rasterio.open(path) as src:
        assert src.descriptions == ("B08", "B04", "B03")
        assert src.nodata == 0 and src.dtypes[0] == "uint16"
        assert src.tags(ns="IMAGE_STRUCTURE").get("LAYOUT") == "COG"
        assert src.overviews(1), "COG has overviews"
    back = open_raster(path)
    assert list(back["band"].values) == ["B08", "B04", "B03"]
    assert geobox_of(back) == gbox
    np.testing.assert_array_equal(back.values, data)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.tif"]


def test_colour_table_embedded(tmp_path, gbox):
    codes = np.full((512, 512), 31, dtype=np.uint8)
    codes[:10] = 0
    path = write_geotiff(to_dataarray(codes, gbox), tmp_path / "c.tif", colormap=colormap(2))
    with rasterio.open(path) as src:
        assert src.colormap(1)[31] == (128, 255, 0, 255)
        assert src.read(1)[0, 0] == 0 and src.read(1)[20, 20] == 31


def test_failed_write_leaves_nothing(tmp_path, gbox):
    def boom(block):
        raise RuntimeError("read failed")

    bad = to_dataarray(da.zeros((512, 512), dtype=np.uint8, chunks=256).map_blocks(boom, dtype=np.uint8), gbox)
    with pytest.raises(RuntimeError):
        write_geotiff(bad, tmp_path / "x.tif")
    assert list(tmp_path.iterdir()) == []


def test_overwrite_refused_and_missing_input(tmp_path, gbox):
    path = tmp_path / "c.tif"
    path.write_bytes(b"old")
    with pytest.raises(OutputError, match="`overwrite`"):
        write_geotiff(to_dataarray(np.ones((512, 512), np.uint8), gbox), path, overwrite=False)
    assert path.read_bytes() == b"old"
    with pytest.raises(InputError, match="does not exist"):
        open_raster(tmp_path / "missing.tif")
