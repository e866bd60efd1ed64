"""Make or connect the Dask cluster: one function for notebooks, the CLI and runs.

Order: an explicit address (or ``DASK_SCHEDULER_ADDRESS``) → a ``LocalCUDACluster`` with one
worker per GPU where GPUs and dask-cuda exist → a CPU ``LocalCluster``. Every worker of the
client's cluster redacts its log records (:class:`LogRedactionPlugin`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from collections.abc import Iterator
from typing import Any, Literal

import dask
from distributed import Client, LocalCluster
from distributed.diagnostics.plugin import WorkerPlugin

from clc_dask.config import ClusterConfig
from clc_dask.errors import ClcDaskError, ConfigError
from clc_dask.redact import install_log_redaction

log = logging.getLogger(__name__)

ClusterKind = Literal["auto", "local", "address", "cuda"]
#: What :func:`connect` does without a scheduler address: compute with dask's threads in
#: this process (``threads``), or start a cluster (``auto``/``local``/``cuda``).
ConnectKind = Literal["threads", "auto", "local", "cuda"]
#: Resource name carried by inference tasks and advertised by GPU workers.
GPU_RESOURCE = "GPU"
#: Resource advertised by CPU workers that keep threads for reading and compositing beside
#: their inference: a worker with ``{"inference": 1}`` runs one inference task at a time, and
#: its other threads fetch, composite and write the next tiles meanwhile (as a GPU worker's do).
INFERENCE_RESOURCE = "inference"


class LogRedactionPlugin(WorkerPlugin):
    """Redact every log record of a worker's process (:func:`clc_dask.redact.install_log_redaction`):
    signed URLs logged there, by clc-dask or by GDAL, rasterio and stackstac, lose their
    query strings. Added to every worker by :func:`get_client`, also to workers that join later."""

    name = "clc-dask-log-redaction"
    idempotent = True  # registering it again (another client) changes nothing

    def setup(self, worker: object) -> None:  # noqa: ARG002 - WorkerPlugin's signature
        """Install the redaction in the worker's process."""
        install_log_redaction()


def gpu_count() -> int:
    """Number of CUDA devices visible to this process (0 without torch/CUDA)."""
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        return 0
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def get_client(
    address: str | None = None,
    kind: ClusterKind = "auto",
    n_workers: int | None = None,
    threads_per_worker: int | None = None,
    memory_limit: str | None = None,
    dashboard_address: str | None = ":0",
    connect_timeout: str = "30s",
    local_directory: str | os.PathLike[str] | None = None,
    inference_slots: int | None = None,
) -> Client:
    """Connect to a scheduler or start a local (CUDA) cluster, and return its client.

    Args:
        address: scheduler address (``tcp://host:8786``); default ``DASK_SCHEDULER_ADDRESS``.
        kind: ``auto`` picks address → CUDA → CPU; force one with ``local``/``cuda``/``address``.
        n_workers: local workers (CPU default: one per 2 cores; CUDA: one per GPU).
        threads_per_worker: threads per local worker (CUDA default 1: more threads read and
            composite the next tiles while the GPU runs one inference task at a time).
        memory_limit: per local worker, e.g. ``"4GiB"``.
        dashboard_address: where the dashboard listens (``":0"`` = a free port; None = off).
        connect_timeout: how long to wait for a remote scheduler.
        local_directory: scratch folder of local workers (default: dask's, in the temp folder).
        inference_slots: inference tasks a local CPU worker runs at once (it advertises
            :data:`INFERENCE_RESOURCE`); its other threads read, composite and write meanwhile.
            None: no limit (every thread may run inference). GPU workers run one per GPU.
    """
    if inference_slots is not None and (not isinstance(inference_slots, int) or inference_slots < 1):
        raise ConfigError(f"inference_slots={inference_slots!r} must be a whole number ≥ 1 (inference tasks "
                          "a worker runs at once), or None for no limit.")
    client = _start_or_connect(address, kind, n_workers, threads_per_worker, memory_limit,
                               dashboard_address, connect_timeout, local_directory, inference_slots)
    client.register_plugin(LogRedactionPlugin())
    return client


def _start_or_connect(
    address: str | None,
    kind: ClusterKind,
    n_workers: int | None,
    threads_per_worker: int | None,
    memory_limit: str | None,
    dashboard_address: str | None,
    connect_timeout: str,
    local_directory: str | os.PathLike[str] | None,
    inference_slots: int | None = None,
) -> Client:
    address = address or os.environ.get("DASK_SCHEDULER_ADDRESS")
    if kind == "address" and not address:
        raise ConfigError("cluster kind 'address' needs an address or DASK_SCHEDULER_ADDRESS.")
    if address and kind in ("auto", "address"):
        log.info("connecting to scheduler at %s", address)
        try:
            return Client(address, timeout=connect_timeout)
        except OSError as exc:
            raise ClcDaskError(
                f"Cannot reach the Dask scheduler at {address}: {exc}. Check the address "
                "(or unset DASK_SCHEDULER_ADDRESS to start a local cluster)."
            ) from exc
    gpus = gpu_count()
    if kind == "cuda" or (kind == "auto" and gpus > 0):
        return _client_of(_local_cuda_cluster(gpus, memory_limit, dashboard_address, local_directory,
                                              threads_per_worker or 1))
    cores = os.cpu_count() or 1
    if n_workers is None:
        n_workers = max(1, cores // 2) if threads_per_worker is None else max(1, cores // threads_per_worker)
    if threads_per_worker is None:
        threads_per_worker = max(1, cores // n_workers)
    cluster = LocalCluster(
        n_workers=n_workers,
        threads_per_worker=threads_per_worker,
        memory_limit=memory_limit or "auto",
        dashboard_address=dashboard_address,
        processes=True,
        local_directory=local_directory,
        resources={INFERENCE_RESOURCE: inference_slots} if inference_slots else None,
    )
    log.info("started LocalCluster: %d worker(s) × %d thread(s)%s; dashboard %s", n_workers, threads_per_worker,
             f", {inference_slots} inference slot(s) each" if inference_slots else "", cluster.dashboard_link)
    return _client_of(cluster)


def _client_of(cluster: LocalCluster) -> Client:
    """A client of a cluster just started; the cluster is closed if the client cannot be made
    (an error, or a stop signal arriving in between)."""
    try:
        return Client(cluster)
    except BaseException:
        cluster.close()
        raise


def _local_cuda_cluster(gpus: int, memory_limit: str | None, dashboard_address: str | None,
                        local_directory: str | os.PathLike[str] | None = None,
                        threads_per_worker: int = 1) -> LocalCluster:
    """A dask-cuda cluster, one worker per GPU advertising the GPU resource (inference tasks
    need one, so each GPU runs one at a time; further threads read and composite meanwhile)."""
    try:
        from dask_cuda import LocalCUDACluster
    except ImportError as exc:
        raise ClcDaskError(
            "A CUDA cluster needs dask-cuda: install clc-dask with the gpu extra "
            "(pip install 'clc-dask[gpu]'), or use kind='local'."
        ) from exc
    if gpus == 0:
        raise ClcDaskError("kind='cuda' but no CUDA device is visible: check CUDA_VISIBLE_DEVICES and drivers.")
    cluster = LocalCUDACluster(
        threads_per_worker=threads_per_worker,
        memory_limit=memory_limit or "auto",
        dashboard_address=dashboard_address,
        resources={GPU_RESOURCE: 1},
        local_directory=local_directory,
    )
    log.info("started LocalCUDACluster with %d GPU worker(s); dashboard %s", gpus, cluster.dashboard_link)
    return cluster


def has_gpu_workers(client: Client) -> bool:
    """True if any worker of ``client`` advertises the ``GPU`` resource."""
    return GPU_RESOURCE in _advertised_resources(client)


def inference_resource(client: Any) -> str | None:
    """The resource inference tasks on ``client``'s cluster need: ``GPU`` where workers have GPUs,
    :data:`INFERENCE_RESOURCE` where CPU workers limit their inference slots, else None."""
    if client is None:
        return None
    advertised = _advertised_resources(client)
    for name in (GPU_RESOURCE, INFERENCE_RESOURCE):
        if name in advertised:
            return name
    return None


def _advertised_resources(client: Client) -> set[str]:
    info = client.scheduler_info()
    return {name for w in info.get("workers", {}).values() for name in w.get("resources", {})}


@contextlib.contextmanager
def connect(
    scheduler: str | None = None,
    *,
    kind: ConnectKind = "threads",
    n_workers: int | None = None,
    threads_per_worker: int | None = None,
    memory_limit: str | None = None,
    dashboard_address: str | None = ":0",
    connect_timeout: str = "30s",
    inference_slots: int | None = None,
) -> Iterator[Client | None]:
    """The Dask client a command computes with; everything it started is closed on exit.

    With a scheduler address (``scheduler``; for ``threads`` and ``auto`` also
    ``DASK_SCHEDULER_ADDRESS``) it connects and, on exit, closes only its own connection: the
    remote scheduler and workers keep running. Without one it follows ``kind``: ``threads``
    yields None (dask's threaded scheduler in this process: fine for one machine and small
    areas), ``auto``/``local``/``cuda`` start a cluster with :func:`get_client` and close it on
    exit (also on errors, and on signals turned into exceptions), then remove its scratch
    folder (a fresh temporary folder for its scheduler and workers).

    Args:
        scheduler: scheduler address, e.g. ``tcp://scheduler:8786``.
        kind: what to do without an address (see above).
        n_workers: workers of a started cluster (default: one per 2 cores, or per GPU).
        threads_per_worker: threads per started worker.
        memory_limit: memory per started worker, e.g. ``"4GiB"``.
        dashboard_address: dashboard of a started cluster (``":0"`` = a free port).
        connect_timeout: how long to wait for a remote scheduler.
        inference_slots: inference tasks each started CPU worker runs at once (see :func:`get_client`).
    """
    address = scheduler or (os.environ.get("DASK_SCHEDULER_ADDRESS") if kind in ("threads", "auto") else None)
    if not address and kind == "threads":
        yield None
        return
    with contextlib.ExitStack() as stack:
        scratch = None
        if not address:  # the scheduler's and workers' scratch folder, removed once they are gone
            scratch = stack.enter_context(
                tempfile.TemporaryDirectory(prefix="clc-dask-cluster-", ignore_cleanup_errors=True))
        with dask.config.set({"temporary-directory": scratch} if scratch else {}):
            client = get_client(address=address, kind="address" if address else kind, n_workers=n_workers,
                                threads_per_worker=threads_per_worker, memory_limit=memory_limit,
                                dashboard_address=dashboard_address, connect_timeout=connect_timeout,
                                local_directory=scratch, inference_slots=inference_slots)
        stack.callback(close_quietly, client, None if address else client.cluster)
        yield client


def close_quietly(client: Client, cluster: Any = None) -> None:
    """Close a client, then the cluster it started (also if closing the client failed or was
    interrupted). A slow shutdown (workers that take long to stop on a loaded machine) is
    logged, not raised: the work is done by then."""
    try:
        _close_logged(client)
    finally:
        if cluster is not None:
            _close_logged(cluster)


def _close_logged(closing: Any) -> None:
    try:
        closing.close()
    except (TimeoutError, OSError, RuntimeError) as exc:
        log.warning("closing %s took too long or failed (%s: %s); its processes are being stopped",
                    type(closing).__name__, type(exc).__name__, exc)


def connect_for_run(settings: ClusterConfig, scheduler: str | None = None) -> contextlib.AbstractContextManager[Client | None]:
    """:func:`connect` as a run's ``cluster`` section says: ``threads`` (no cluster, unless a
    ``scheduler`` is given), ``local``/``cuda`` (start one), ``address`` (connect to
    ``cluster.address`` or ``DASK_SCHEDULER_ADDRESS``). An explicit ``scheduler`` wins."""
    if scheduler is None and settings.kind == "threads":
        return contextlib.nullcontext(None)
    kind: ConnectKind = "auto" if settings.kind in ("address", "threads") else settings.kind
    return connect(scheduler or settings.address, kind=kind, n_workers=settings.n_workers,
                   threads_per_worker=settings.threads_per_worker, memory_limit=settings.memory_limit,
                   inference_slots=settings.inference_slots)
