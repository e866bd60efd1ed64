"""Run configs in deploy/configs parse with the project's config model; the paper's test regions."""

from __future__ import annotations

from pathlib import Path

import pytest
from deploy_support import (
    CONFIGS,
    HPC,
    ROOT,
    _rel,
)

from clc_dask.config import load_run_config
from clc_dask.errors import ConfigError
from clc_dask.grid import TileGrid, geobox_for_aoi, lonlat_box


@pytest.mark.parametrize("path", sorted(p for p in CONFIGS.glob("*.yaml") if not p.name.startswith("experiment-")),
                         ids=_rel)
def test_run_configs_parse(path, monkeypatch):
    monkeypatch.setenv("DASK_SCHEDULER_ADDRESS", "tcp://127.0.0.1:8786")
    config = load_run_config(path)
    assert config.grid.tile_size % config.grid.chunk_size == 0
    # relative paths resolve against the config's folder
    assert Path(config.output.store).is_relative_to(path.parent.resolve()) or path.stem == "demo"
    if path.stem == "demo":  # the demo's working folder of the README: clc-dask demo --workdir demo-run
        for p in (config.output.store, config.model.checkpoint, config.imagery.source):
            assert Path(p).is_relative_to(ROOT / "demo-run"), p


@pytest.mark.parametrize("name,epsg,bbox_centre", [
    ("italy", 32632, (11.6, 43.07)),       # southern Tuscany
    ("turkiye", 32635, (26.6, 40.0)),      # Çanakkale
])
def test_paper_regions(name, epsg, bbox_centre, monkeypatch):
    """The paper's test areas: 20 tiles of 2048 px (1_1 … 4_5, with 4_3 and 3_2), 10 m,
    April + September 2018, NRG, CLC Level 2, generalized to 25 ha / 100 m."""
    monkeypatch.setenv("DASK_SCHEDULER_ADDRESS", "tcp://127.0.0.1:8786")
    config = load_run_config(CONFIGS / f"{name}.yaml")
    assert config.grid.epsg == epsg and config.grid.resolution == 10.0 and config.grid.tile_size == 2048
    west, south, east, north = config.aoi.bbox
    assert west < bbox_centre[0] < east and south < bbox_centre[1] < north
    grid = TileGrid(geobox_for_aoi(lonlat_box(config.aoi.bbox), epsg, config.grid.resolution), config.grid.tile_size)
    assert grid.shape == (4, 5) and len(grid) == 20
    assert [t.name for t in grid.select(["4_3", "3_2"])] == ["4_3", "3_2"]  # the paper's Tables 4 and 5
    assert grid.tile("3_2").geobox.shape == (2048, 2048)
    assert config.imagery.year == 2018 and config.imagery.seasons == ["april", "september"]
    assert config.imagery.source == "earth-search" and config.imagery.composite == "nrg"
    assert config.classes.level == 2
    assert (config.generalize.mmu_ha, config.generalize.min_width_m) == (25, 100)


def test_address_configs_need_a_scheduler(monkeypatch):
    """turkiye.yaml connects to DASK_SCHEDULER_ADDRESS, which run_slurm.sh exports."""
    monkeypatch.delenv("DASK_SCHEDULER_ADDRESS", raising=False)
    with pytest.raises(ConfigError, match="cluster"):
        load_run_config(CONFIGS / "turkiye.yaml")
    assert "export DASK_SCHEDULER_ADDRESS" in (HPC / "run_slurm.sh").read_text("utf-8")
