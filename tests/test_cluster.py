import pytest
from distributed import LocalCluster

from clc_dask import cluster
from clc_dask.errors import ClcDaskError, ConfigError


def test_local_cluster_on_cpu(monkeypatch):
    monkeypatch.delenv("DASK_SCHEDULER_ADDRESS", raising=False)
    with cluster.get_client(n_workers=1, threads_per_worker=1, dashboard_address=None) as client:
        workers = client.scheduler_info()["workers"]
        assert len(workers) == 1
        assert next(iter(workers.values()))["nthreads"] == 1
        assert not cluster.has_gpu_workers(client)
        assert client.submit(sum, [1, 2, 3]).result() == 6
        client.cluster.close()


def test_connects_to_address_from_environment(monkeypatch):
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None) as lc:
        monkeypatch.setenv("DASK_SCHEDULER_ADDRESS", lc.scheduler_address)
        with cluster.get_client() as client:
            assert client.scheduler.address == lc.scheduler_address


def test_gpu_workers_detected_by_resource():
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None,
                      resources={cluster.GPU_RESOURCE: 1}) as lc, lc.get_client() as client:
        assert cluster.has_gpu_workers(client)


def test_cuda_without_gpu_or_dask_cuda_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("DASK_SCHEDULER_ADDRESS", raising=False)
    monkeypatch.setattr(cluster, "gpu_count", lambda: 0)
    with pytest.raises(ClcDaskError, match="(dask-cuda|no CUDA device)"):
        cluster.get_client(kind="cuda")
    with pytest.raises(ConfigError, match="DASK_SCHEDULER_ADDRESS"):
        cluster.get_client(kind="address")


def test_unreachable_address_is_a_clear_error():
    with pytest.raises(ClcDaskError, match="Cannot reach the Dask scheduler"):
        cluster.get_client("tcp://127.0.0.1:9", connect_timeout="2s")
