"""``clc-dask mosaic`` and a production run reading through the fault proxy: the same bytes.

Under 5 % 429 (Retry-After), 5 % 503 and 2 % bodies cut short on both servers (the STAC API
and the COG server), the mosaic COGs equal a fault-free ``clc-dask mosaic``'s byte for byte,
and every output of a run equals the fault-free reference run's; the proxy's counters show
that each kind of fault happened. The soak (marked ``slow``) adds resets and answers slower
than the timeout, at higher rates, on a run over a local cluster.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_run import manifest_without_times, store_files, write_config
from typer.testing import CliRunner

from clc_dask import run as R
from clc_dask.cli import app
from clc_dask.config import load_run_config

#: GDAL options that make faults cheap (1 s timeouts, 10 ms between GDAL's own retries).
FAST_GDAL = {"GDAL_HTTP_TIMEOUT": "1", "GDAL_HTTP_CONNECTTIMEOUT": "1", "GDAL_HTTP_RETRY_DELAY": "0.01",
             "GDAL_HTTP_MAX_RETRY": "3"}
RATES = {"429": 0.05, "503": 0.05, "short": 0.02}


def _mosaic_cli(source: str, region, collection: str, out: Path) -> list[Path]:
    west, south, east, north = region.bbox_lonlat
    args = ["mosaic", "--source", source, "--collection", collection, "--bbox", f"{west},{south},{east},{north}",
            "--season", "july", "--year", str(region.year), "--epsg", str(region.epsg), "--composite", "nrg",
            "--chunk-size", "256", "--out", str(out)]
    for key, value in FAST_GDAL.items():
        args += ["--gdal", f"{key}={value}"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    return sorted(p for p in out.parent.iterdir() if p.suffix == ".tif")


def test_mosaic_cli_under_faults_writes_the_clean_bytes(faulty_demo, demo_servers, demo_region, tmp_path):
    clean = _mosaic_cli(demo_servers.stac_url, demo_region, demo_servers.collection_id, tmp_path / "clean" / "m.tif")
    with faulty_demo(RATES, seed=7) as demo:
        faulted = _mosaic_cli(demo.stac_url, demo_region, demo.collection_id, tmp_path / "faulted" / "m.tif")
        counts = demo.proxy.counts()
    assert counts["429"] > 0 and counts["503"] > 0 and counts["short"] > 0, counts
    assert [p.name for p in faulted] == [p.name for p in clean] == ["m.tif", "m_clear_count.tif"]
    for a, b in zip(faulted, clean, strict=True):
        assert a.read_bytes() == b.read_bytes(), a.name


def assert_same_outputs_but_source(store: Path, reference: Path) -> None:
    """Every output equals the reference's byte for byte, except where the run records its
    scene source (its URLs and GDAL options): ``items.json``, and the config in STAC and the
    manifest's config fingerprint, which are compared without it."""
    files, expected = store_files(store), store_files(reference)
    assert sorted(files) == sorted(expected)
    plain = [k for k in files if k != "items.json" and not k.startswith("stac/")]
    assert [k for k in plain if files[k] != expected[k]] == []
    for key in (k for k in files if k.startswith("stac/")):
        a, b = json.loads(files[key]), json.loads(expected[key])
        for doc in (a, b, a.get("properties", {}), b.get("properties", {})):
            if "clc_dask:config" in doc:
                doc["clc_dask:config"].pop("imagery")
        assert a == b, key
    ids = [[f["id"] for f in json.loads(files["items.json"])["features"]],
           [f["id"] for f in json.loads(expected["items.json"])["features"]]]
    assert ids[0] == ids[1]
    a, b = manifest_without_times(store), manifest_without_times(reference)
    assert a.pop("config_sha256") != b.pop("config_sha256")
    assert a == b


def test_run_under_faults_equals_the_clean_run(faulty_demo, run_root, demo_region, reference_run):
    with faulty_demo(RATES, seed=2) as demo:
        path = write_config(run_root, demo_region, "http-faults",
                            imagery={"source": demo.stac_url, "gdal": FAST_GDAL})
        result = R.execute_run(load_run_config(path))
        counts = demo.proxy.counts()
    assert counts["429"] > 0 and counts["503"] > 0 and counts["short"] > 0, counts
    assert sorted(result.computed) == ["1_1", "1_2", "2_1", "2_2"]
    assert_same_outputs_but_source(result.store, reference_run.store)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [11, 12, 13])
def test_soak_run_on_a_cluster_under_every_fault(faulty_demo, run_root, demo_region, reference_run, seed):
    """10 % each of 429, 500, 503, resets and short bodies, 3 % slow answers, on a local cluster
    of 2 workers (the workers read through the proxy)."""
    from distributed import Client, LocalCluster

    rates = {"429": 0.1, "500": 0.1, "503": 0.1, "reset": 0.1, "short": 0.1, "slow": 0.03}
    with faulty_demo(rates, seed=seed, slow_seconds=1.5) as demo, \
            LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=":0") as cluster, \
            Client(cluster) as client:
        path = write_config(run_root, demo_region, f"soak-{seed}", imagery={"source": demo.stac_url, "gdal": FAST_GDAL},
                            cluster={"tiles_per_batch": 2})
        result = R.execute_run(load_run_config(path), client=client)
        counts = demo.proxy.counts()
    assert all(counts[kind] > 0 for kind in rates), counts
    assert sorted(result.computed) == ["1_1", "1_2", "2_1", "2_2"]
    assert_same_outputs_but_source(result.store, reference_run.store)
