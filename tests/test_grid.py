import pytest
from odc.geo.geom import box

from clc_dask.errors import ConfigError, GridMismatchError, InputError
from clc_dask.grid import TileGrid, assert_same_grid, chunk_size_for, snapped_geobox, utm_epsg


def test_snapped_geobox_aligns_to_resolution():
    gbox = snapped_geobox((500003.0, 4100004.0, 520481.0, 4120479.0), 32633, 10)
    assert gbox.affine.c % 10 == 0 and gbox.affine.f % 10 == 0
    assert gbox.resolution.x == 10 and gbox.resolution.y == -10
    left, bottom, right, top = gbox.extent.boundingbox
    assert left <= 500003 and right >= 520481 and bottom <= 4100004 and top >= 4120479
    assert str(gbox.crs) == "EPSG:32633"


def test_tiles_named_from_one_and_cover_grid():
    gbox = snapped_geobox((0, 0, 50000, 30000), 32633, 10)  # 5000 x 3000 px
    tiles = TileGrid(gbox, 2048)
    assert tiles.shape == (2, 3)
    names = [t.name for t in tiles]
    assert names == ["1_1", "1_2", "1_3", "2_1", "2_2", "2_3"]
    t = tiles.tile("2_3")
    assert t.pixel_slices == (slice(2048, 3000), slice(4096, 5000))
    assert t.geobox.shape == (952, 904)
    assert t.geobox.affine.c == 40960 and t.geobox.affine.f == 30000 - 20480
    assert sum(t.geobox.shape[0] * t.geobox.shape[1] for t in tiles) == 5000 * 3000
    with pytest.raises(InputError, match="outside this grid"):
        tiles.tile("3_1")
    with pytest.raises(InputError, match="row_col"):
        tiles.tile("a-b")


def test_intersecting_tiles():
    gbox = snapped_geobox((0, 0, 40960, 40960), 32633, 10)
    tiles = TileGrid(gbox, 2048)
    hit = tiles.intersecting(box(100, 100, 200, 200, "EPSG:32633"))
    assert [t.name for t in hit] == ["2_1"]


def test_chunks_divide_tiles():
    assert chunk_size_for(2048, 1000) == 512
    assert chunk_size_for(2048, 4096) == 2048
    assert 2048 % chunk_size_for(2048, 700) == 0


def test_bad_bounds_and_grid_mismatch():
    with pytest.raises(ConfigError, match="empty"):
        snapped_geobox((10, 0, 0, 10), 32633, 10)
    a = snapped_geobox((0, 0, 1000, 1000), 32633, 10)
    b = snapped_geobox((10, 0, 1010, 1000), 32633, 10)
    c = snapped_geobox((0, 0, 1000, 1000), 32632, 10)
    assert_same_grid(a, a)
    with pytest.raises(GridMismatchError, match="different grids"):
        assert_same_grid(a, b)
    with pytest.raises(GridMismatchError, match="EPSG:32632"):
        assert_same_grid(a, c)


def test_utm_zone():
    assert utm_epsg(12.5, 42.0) == 32633
    assert utm_epsg(26.4, 40.1) == 32635
    assert utm_epsg(-70.0, -33.0) == 32719
