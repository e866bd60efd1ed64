import pytest
import yaml

from clc_dask.config import dump_run_config, load_run_config, parse_run_config
from clc_dask.errors import ConfigError

VALID = {
    "name": "demo-2018",
    "aoi": {"bbox": [12.0, 42.0, 12.5, 42.3]},
    "grid": {"epsg": 32633, "resolution": 10, "tile_size": 2048, "chunk_size": 1024},
    "imagery": {"source": "earth-search", "year": 2018, "seasons": ["april", "september"]},
    "model": {"checkpoint": "model.pt"},
    "output": {"store": "out"},
}


def test_valid_config_resolves_relative_paths(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(VALID))
    config = load_run_config(path)
    assert config.model.checkpoint == str(tmp_path / "model.pt")
    assert config.output.store == str(tmp_path / "out")
    assert config.grid.chunk_size == 1024 and config.classes.level == 2
    assert yaml.safe_load(dump_run_config(config))["name"] == "demo-2018"


@pytest.mark.parametrize(
    ("patch", "field"),
    [
        ({"grid": {"epsg": 4326}}, "grid.epsg"),
        ({"grid": {"epsg": 32633, "tile_size": 2048, "chunk_size": 1000}}, "grid"),
        ({"imagery": {"seasons": ["winter"]}}, "imagery.seasons"),
        ({"aoi": {}}, "aoi"),
        ({"model": {"checkpoint": "m.pt", "window": 500}}, "model.window"),
        ({"output": {"store": "o", "formats": ["png"]}}, "output.formats"),
        ({"bogus": 1}, "bogus"),
        ({"name": "bad name!"}, "name"),
    ],
)
def test_errors_name_the_field(patch, field):
    raw = {**VALID, **patch}
    with pytest.raises(ConfigError) as err:
        parse_run_config(raw)
    assert f"{field}" in str(err.value)
    assert str(err.value).startswith("Invalid config")


def test_missing_and_non_mapping_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_run_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_run_config(bad)
    broken = tmp_path / "broken.yaml"
    broken.write_text("name: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_run_config(broken)
