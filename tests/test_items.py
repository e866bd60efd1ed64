"""Normalised items: canonical asset keys, absolute hrefs, and the baseline-04.00 offset,
checked on real items of every catalog we support (and on real 33TWM pixels)."""

from __future__ import annotations

import json
import logging

import numpy as np
import pystac
import pytest
import rasterio
import yaml

from clc_dask.errors import InputError
from clc_dask.items import (
    CANONICAL_BANDS,
    OFFSET_PROPERTY,
    boa_offset,
    find_asset_key,
    normalize_items,
    processing_baseline,
)

ES_V1 = "stac/item_collections/earth_search_v1_sentinel-2-l2a_6items_2025-07-31.json"
ES_V1_ONE = "stac/item_collections/earth_search_v1_sentinel-2-l2a_1item_S2A_13TDE_20231008.json"
ES_C1 = "stac/item_collections/earth_search_v1_sentinel-2-c1-l2a_items_2025-07-31.json"
PC = "stac/item_collections/planetary_computer_sentinel-2-l2a_33items_2019-01-01.json"
ES_V0_CASSETTE = "stac/recorded_api_responses/EarthSearchV0_sentinel-s2-l2a-cogs_non_conformant.yaml"
TWM = "s2/earthsearch_v1_33TWM_2023-08/sentinel-2-l2a"


def _items(shared_data, rel):
    return list(pystac.ItemCollection.from_file(str(shared_data / rel)))


def _es_v0_item(shared_data):
    cassette = yaml.safe_load((shared_data / ES_V0_CASSETTE).read_text())
    page = json.loads(cassette["interactions"][1]["response"]["body"]["string"])
    return pystac.Item.from_dict(page["features"][0])


def _with(item, **props):
    new = item.clone()
    new.properties.update(props)
    return new


@pytest.mark.parametrize(
    ("rel", "keys"),
    [
        (ES_V1, {"B02": "blue", "B03": "green", "B04": "red", "B08": "nir", "SCL": "scl"}),
        (ES_C1, {"B02": "blue", "B03": "green", "B04": "red", "B08": "nir", "SCL": "scl"}),
        (PC, {b: b for b in CANONICAL_BANDS}),
    ],
)
def test_both_key_schemes_map_to_canonical_bands(shared_data, rel, keys):
    items = _items(shared_data, rel)
    for item in items:
        assert {band: find_asset_key(item, band) for band in CANONICAL_BANDS} == keys
    normalized = normalize_items(items)
    for original, new in zip(items, normalized, strict=True):
        assert list(new.assets) == list(CANONICAL_BANDS)
        for band, key in keys.items():
            assert new.assets[band].href == original.assets[key].href
        # copies: the input keeps its own keys
        assert set(keys.values()) <= set(original.assets)


def test_earth_search_v0_item_keys_and_offset(shared_data):
    item = _es_v0_item(shared_data)
    [new] = normalize_items([item])
    assert new.assets["B04"].href.endswith("/B04.tif")
    assert new.assets["SCL"].href.endswith("/SCL.tif")
    # sentinel:boa_offset_applied true, baseline 05.11: harmonised COGs
    assert processing_baseline(item) == (5, 11)
    assert boa_offset(item) == 0
    assert boa_offset(_with(item, **{"sentinel:boa_offset_applied": False})) == 1000


def test_offsets_for_each_catalog(shared_data):
    # Earth Search v1 sentinel-2-l2a: boa_offset_applied true wins over raster:bands -0.1
    es = _items(shared_data, ES_V1) + _items(shared_data, ES_V1_ONE)
    assert all(i.properties["earthsearch:boa_offset_applied"] for i in es)
    assert all(i.assets["red"].extra_fields["raster:bands"][0]["offset"] == -0.1 for i in es)
    assert [boa_offset(i) for i in es] == [0] * len(es)
    # the same item whose offset was not applied yet (baseline 05.11) → subtract 1000
    assert boa_offset(_with(es[0], **{"earthsearch:boa_offset_applied": False})) == 1000
    # ... and an old baseline without offset stays 0
    old = _with(es[0], **{"earthsearch:boa_offset_applied": False, "s2:processing_baseline": "03.01"})
    assert boa_offset(old) == 0
    # Earth Search c1: no flag, raster:bands offset -0.1 / scale 1e-4 → DN carry +1000
    c1 = _items(shared_data, ES_C1)
    assert all("earthsearch:boa_offset_applied" not in i.properties for i in c1)
    assert [boa_offset(i) for i in c1] == [1000] * len(c1)
    # Planetary Computer: s2:processing_baseline decides
    pc = _items(shared_data, PC)
    assert {i.properties["s2:processing_baseline"] for i in pc} == {"02.12"}
    assert [boa_offset(i) for i in pc] == [0] * len(pc)
    assert boa_offset(_with(pc[0], **{"s2:processing_baseline": "04.00"})) == 1000
    assert boa_offset(_with(pc[0], **{"s2:processing_baseline": "05.10"})) == 1000
    assert boa_offset(_with(pc[0], **{"s2:processing_baseline": "03.01"})) == 0


def test_baseline_from_product_id_and_date_fallback(shared_data, caplog):
    pc = _items(shared_data, PC)[0]
    bare = pc.clone()
    del bare.properties["s2:processing_baseline"]
    # still in the product URI: ..._N0212_...
    assert processing_baseline(bare) == (2, 12)
    assert boa_offset(bare) == 0
    for key in ("s2:product_uri", "s2:datatake_id"):
        bare.properties.pop(key, None)
    bare.id = "scene-without-baseline"
    assert processing_baseline(bare) is None
    with caplog.at_level(logging.WARNING, logger="clc_dask.items"):
        assert boa_offset(bare) == 0  # 2019: before baseline 04.00
        bare.datetime = bare.datetime.replace(year=2023)
        assert boa_offset(bare) == 1000
    assert "no processing baseline" in caplog.text


def test_normalized_items_carry_offset_and_are_idempotent(shared_data):
    c1 = _items(shared_data, ES_C1)
    once = normalize_items(c1)
    assert [i.properties[OFFSET_PROPERTY] for i in once] == [1000] * len(c1)
    twice = normalize_items(once)
    assert [i.properties[OFFSET_PROPERTY] for i in twice] == [1000] * len(c1)
    assert [i.to_dict(transform_hrefs=False) for i in twice] == \
        [i.to_dict(transform_hrefs=False) for i in once]
    assert once[0].links == []
    assert OFFSET_PROPERTY not in c1[0].properties  # input untouched


def test_offset_rule_matches_real_33TWM_pixels(shared_data):
    """boa_offset_applied=true with raster:bands offset -0.1: the pixels decide who is right.
    Clear vegetation (SCL 4) red reflectance is a few percent: DN well below 1000 means the
    +1000 offset is *not* in the data, as boa_offset() says (0)."""
    folder = shared_data / TWM / "S2A_33TWM_20230815_0_L2A"
    item = pystac.Item.from_file(str(folder / "S2A_33TWM_20230815_0_L2A.json"))
    assert item.properties["earthsearch:boa_offset_applied"] is True
    assert item.assets["red"].extra_fields["raster:bands"][0]["offset"] == -0.1
    assert boa_offset(item) == 0
    with rasterio.Env(GDAL_DISABLE_READDIR_ON_OPEN="NO"):
        with rasterio.open(folder / "B04.tif") as red, rasterio.open(folder / "SCL.tif") as scl:
            r, s = red.read(1), scl.read(1)
    vegetation = r[s == 4]
    assert vegetation.size > 100_000
    assert np.median(vegetation) < 600  # ~0.03 reflectance; with the offset it would be > 1000
    assert (vegetation < 1000).mean() > 0.9


def test_relative_hrefs_become_absolute(shared_data):
    folder = shared_data / TWM / "S2B_33TWM_20230813_0_L2A"
    item = pystac.Item.from_file(str(folder / "S2B_33TWM_20230813_0_L2A.json"))
    assert item.assets["red"].href == "B04.tif" or not item.assets["red"].href.startswith("/")
    [new] = normalize_items([item])
    assert new.assets["B04"].href == str(folder / "B04.tif")
    assert new.assets["SCL"].href == str(folder / "SCL.tif")
    # without a location a relative href cannot be resolved
    loose = pystac.Item.from_dict(json.loads((folder / "S2B_33TWM_20230813_0_L2A.json").read_text()))
    loose.set_self_href(None)
    with pytest.raises(InputError, match=r"S2B_33TWM_20230813_0_L2A asset B0\d .*relative href"):
        normalize_items([loose])


def test_missing_band_or_scl_names_item_and_asset(shared_data):
    items = _items(shared_data, ES_V1)
    no_scl = items[2].clone()
    del no_scl.assets["scl"]
    del no_scl.assets["scl-jp2"]
    with pytest.raises(InputError, match=rf"Item {no_scl.id} has no SCL asset"):
        normalize_items([items[0], no_scl])
    no_nir = items[1].clone()
    del no_nir.assets["nir"]
    del no_nir.assets["nir-jp2"]
    with pytest.raises(InputError, match=rf"Item {no_nir.id} has no B08 asset"):
        normalize_items([no_nir])
    # a composite that does not need B08 accepts it (SCL is still required)
    [rgb] = normalize_items([no_nir], bands=("B04", "B03", "B02"))
    assert list(rgb.assets) == ["B04", "B03", "B02", "SCL"]


def test_eo_bands_fallback_prefers_geotiff(shared_data):
    item = _items(shared_data, ES_V1)[0].clone()
    item.assets["renamed-red"] = item.assets.pop("red")
    # the jp2 copy also says B04 in eo:bands; the COG must win
    assert find_asset_key(item, "B04") == "renamed-red"
    assert item.assets["red-jp2"].extra_fields["eo:bands"][0]["name"] == "B04"


def test_proj_code_becomes_proj_epsg(shared_data):
    # pystac migrates the items' proj:epsg (projection v1.1) to proj:code on reading
    item = _items(shared_data, ES_V1)[0]
    assert "proj:epsg" not in item.properties and item.properties["proj:code"] == "EPSG:32720"
    [new] = normalize_items([item])
    assert new.properties["proj:epsg"] == 32720


# --------------------------------------------------------------------------- offset flag × baseline × date
def _scene(baseline=None, when="2023-06-01", **props):
    """A bare L2A item: no raster:bands, a baseline only where given, acquired on ``when``."""
    from datetime import UTC, datetime

    item = pystac.Item("S2B_33TWM_scene", {"type": "Point", "coordinates": [15.9, 46.4]},
                       [15.9, 46.4, 15.9, 46.4], datetime.fromisoformat(when).replace(tzinfo=UTC),
                       {"eo:cloud_cover": 1.0, **props})
    if baseline is not None:
        item.properties["s2:processing_baseline"] = baseline
    for band in CANONICAL_BANDS:
        item.add_asset(band, pystac.Asset(f"https://example.test/{band}.tif"))
    return item


FLAG_PROPERTIES = ["earthsearch:boa_offset_applied", "sentinel:boa_offset_applied"]
#: flag value as found in an item → what it means (None: missing / null)
FLAG_VALUES = {"true": True, "false": False, "'true'": "true", "'false'": "false", "'True'": "True",
               "'FALSE'": "FALSE", "' false '": " false ", "missing": None}
BASELINES = {"03.01": (3, 1), "04.00": (4, 0), "05.11": (5, 11), "unknown": None}
DATES = ["2018-09-10", "2022-01-24", "2022-01-25", "2023-06-01"]


def _says_applied(flag_value):
    return flag_value is True or (isinstance(flag_value, str) and flag_value.strip().lower() == "true")


def _expected_offset(flag_value, baseline, when):
    if _says_applied(flag_value):
        return 0  # the COGs were harmonised: nothing to subtract
    if baseline is not None:
        return 1000 if baseline >= (4, 0) else 0
    return 1000 if when >= "2022-01-25" else 0


@pytest.mark.parametrize("flag", FLAG_PROPERTIES)
@pytest.mark.parametrize("value", list(FLAG_VALUES), ids=str)
@pytest.mark.parametrize("baseline", list(BASELINES))
@pytest.mark.parametrize("when", DATES)
def test_offset_for_every_flag_baseline_and_date(flag, value, baseline, when, caplog):
    """A false flag means "pixels as ESA made them": the baseline decides, else the date —
    a 2018 scene never loses 1000 DN, and the string "false" is false."""
    flag_value = FLAG_VALUES[value]
    props = {} if flag_value is None else {flag: flag_value}
    item = _scene(None if baseline == "unknown" else baseline, when, **props)
    assert processing_baseline(item) == BASELINES[baseline]
    with caplog.at_level(logging.WARNING, logger="clc_dask.items"):
        offset = boa_offset(item)
    assert offset == _expected_offset(flag_value, BASELINES[baseline], when)
    [normalized] = normalize_items([item])
    assert normalized.properties[OFFSET_PROPERTY] == offset
    # a guess from the date alone is announced
    guessed = baseline == "unknown" and not _says_applied(flag_value)
    assert ("from its date" in caplog.text) == guessed


def test_null_flag_counts_as_missing():
    item = _scene("05.11", "2018-09-10", **{"earthsearch:boa_offset_applied": None})
    assert boa_offset(item) == 1000  # the baseline decides


@pytest.mark.parametrize("flag", FLAG_PROPERTIES)
@pytest.mark.parametrize("value", ["yes", "", "0", 1, 0, 1.0, ["false"], {"applied": True}])
def test_unreadable_flag_is_an_error_naming_item_and_property(flag, value):
    item = _scene("05.11", **{flag: value})
    with pytest.raises(InputError) as err:
        normalize_items([item])
    message = str(err.value)
    assert "S2B_33TWM_scene" in message and flag in message and repr(value) in message
    assert OFFSET_PROPERTY in message  # the way out: state the offset explicitly
    # ... which is then obeyed
    item.properties[OFFSET_PROPERTY] = 1000
    assert boa_offset(item) == 1000


def test_string_flags_on_real_earth_search_items(shared_data):
    """Real Earth Search v1 item (baseline 05.11, raster:bands offset -0.1): the string
    flags mean what they say, and a false flag on an old baseline is not overruled by the
    -0.1 that Earth Search writes on every item."""
    es = _items(shared_data, ES_V1)[0]
    assert processing_baseline(es) == (5, 11)
    assert boa_offset(_with(es, **{"earthsearch:boa_offset_applied": "false"})) == 1000
    assert boa_offset(_with(es, **{"earthsearch:boa_offset_applied": "TRUE"})) == 0
    old = _with(es, **{"earthsearch:boa_offset_applied": "False", "s2:processing_baseline": "03.01"})
    assert boa_offset(old) == 0
    v0 = _es_v0_item(shared_data)
    assert boa_offset(_with(v0, **{"sentinel:boa_offset_applied": "false"})) == 1000
    assert boa_offset(_with(v0, **{"sentinel:boa_offset_applied": "true"})) == 0
