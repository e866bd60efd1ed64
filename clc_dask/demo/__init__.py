"""The offline demo: a synthetic region served like the real thing, and the demo run.

- :func:`build_region` (``region.py``) writes a CLC-like GeoPackage and Sentinel-2 L2A
  scenes (COGs + Earth Search v1 style STAC items) for a region in central Italy — in one
  UTM zone, or across the zone border at 12° E with granules in both zones (``zones.py``);
- :func:`serve_region` (``servers.py``) serves it on loopback: ``rustac serve`` as the STAC
  API and an HTTP file server with range requests for the COGs;
- :func:`run_demo` runs the demo's steps (:data:`DEMO_STEPS`) in order with the servers up.

Later stages join the demo by appending a ``(name, step)`` pair to :data:`DEMO_STEPS`; a
step takes the :class:`DemoContext` (region, servers, workdir, results of earlier steps)
and returns a small dict summarising what it did (shown by ``clc-dask demo``).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clc_dask.demo.region import (
    DEFAULT_DATES_PER_SEASON,
    DEFAULT_SIZE,
    DEFAULT_YEAR,
    DemoRegion,
    DemoScene,
    build_region,
    existing_region,
    prepare_workdir,
    validate_parameters,
)
from clc_dask.demo.servers import (
    DEFAULT_HOST,
    DemoServers,
    check_loopback,
    check_port,
    ensure_port_free,
    serve_region,
)
from clc_dask.errors import ConfigError, SearchError

__all__ = [
    "DEMO_STEPS",
    "DemoContext",
    "DemoRegion",
    "DemoScene",
    "DemoServers",
    "DemoStep",
    "build_region",
    "run_demo",
    "serve_region",
]

log = logging.getLogger(__name__)

#: Cloud cover (percent) under which the demo's search check counts a scene as usable.
DEMO_MAX_CLOUD = 20.0


@dataclass
class DemoContext:
    """What the demo steps share: options, the region, the running servers, results so far."""

    workdir: Path
    size: int
    seed: int
    host: str = DEFAULT_HOST
    stac_port: int = 0
    data_port: int = 0
    region: DemoRegion | None = None
    servers: DemoServers | None = None
    #: Summary of each finished step, by step name (in order).
    results: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: Resources that live until the demo ends (the servers); closed by :func:`run_demo`.
    stack: ExitStack = field(default_factory=ExitStack)
    #: Files made by the steps, by name (mosaics, labels, checkpoint, …), for later steps.
    outputs: dict[str, Any] = field(default_factory=dict)
    #: The demo's Dask client, started by the first step that needs a cluster.
    client: Any = None
    #: Training epochs (None: the cpu-demo preset's).
    epochs: int | None = None
    #: Build the region across UTM zones 32/33 (EPSG:3035 grid, granules in both zones).
    two_zone: bool = False

    def require_region(self) -> DemoRegion:
        """The region (a step that needs it must run after ``region``)."""
        if self.region is None:
            raise RuntimeError("the 'region' step must run before this step")
        return self.region

    def require_servers(self) -> DemoServers:
        """The running servers (a step that needs them must run after ``serve``)."""
        if self.servers is None:
            raise RuntimeError("the 'serve' step must run before this step")
        return self.servers


DemoStep = Callable[[DemoContext], "dict[str, Any] | None"]


def step_region(ctx: DemoContext) -> dict[str, Any]:
    """Build the region in the workdir, or reuse the complete one already there."""
    reused = existing_region(ctx.workdir)
    ctx.region = build_region(ctx.workdir, ctx.size, ctx.seed, two_zone=ctx.two_zone)
    reused_flag = reused is not None and reused.matches(ctx.size, ctx.seed, two_zone=ctx.two_zone)
    summary = {"workdir": str(ctx.region.workdir), "size": ctx.region.size, "seed": ctx.region.seed,
               "scenes": len(ctx.region.scenes), "reused": reused_flag}
    if ctx.region.two_zone:
        summary["crs"] = ctx.region.crs
        summary["granule_crs"] = sorted({f"EPSG:{s.epsg}" for s in ctx.region.scenes})
    return summary


def step_serve(ctx: DemoContext) -> dict[str, Any]:
    """Start the STAC API and the data server; they stay up until the demo ends."""
    region = ctx.require_region()
    ctx.servers = ctx.stack.enter_context(
        serve_region(region, host=ctx.host, stac_port=ctx.stac_port, data_port=ctx.data_port))
    return {"stac_url": ctx.servers.stac_url, "data_url": ctx.servers.data_url}


def step_search(ctx: DemoContext) -> dict[str, Any]:
    """Search the STAC API like a user would (bbox + datetime), filter cloud cover on the
    client (rustac's memory backend has no query/filter extension) and check the counts."""
    from pystac_client import Client

    region, servers = ctx.require_region(), ctx.require_servers()
    client = Client.open(servers.stac_url)
    search = client.search(collections=[region.collection_id], bbox=list(region.bbox_lonlat),
                           datetime=f"{region.year}-01-01/{region.year}-12-31")
    items = list(search.items())
    if len(items) != len(region.scenes):
        raise SearchError(
            f"The demo STAC API at {servers.stac_url} returned {len(items)} items for the region, "
            f"expected {len(region.scenes)}: the served catalog is incomplete; rebuild the region "
            "in a new `workdir`."
        )
    clear = [i for i in items if float(i.properties.get("eo:cloud_cover", 100)) < DEMO_MAX_CLOUD]
    return {"items": len(items), "clear_items": len(clear), "max_cloud": DEMO_MAX_CLOUD}


#: The demo, in order. Later stages append ``(name, step)`` here.
DEMO_STEPS: list[tuple[str, DemoStep]] = [
    ("region", step_region),
    ("serve", step_serve),
    ("search", step_search),
]

from clc_dask.demo.chain import CHAIN_STEPS  # noqa: E402  (the chain needs DemoContext above)

DEMO_STEPS.extend(CHAIN_STEPS)


def step_names() -> list[str]:
    """Names of the demo's steps, in order."""
    return [name for name, _ in DEMO_STEPS]


def _wait_until_interrupted() -> None:
    """Block until Ctrl-C (KeyboardInterrupt)."""
    while True:
        time.sleep(1)


def run_demo(
    workdir: str | os.PathLike[str],
    size: int = DEFAULT_SIZE,
    seed: int = 0,
    *,
    stac_port: int = 0,
    data_port: int = 0,
    host: str = DEFAULT_HOST,
    keep_serving: bool = False,
    steps: Sequence[tuple[str, DemoStep]] | None = None,
    on_step: Callable[[str, dict[str, Any]], None] | None = None,
    until: str | None = None,
    epochs: int | None = None,
    two_zone: bool = False,
) -> DemoContext:
    """Run the demo: build (or reuse) the region, serve it, and run every step of
    :data:`DEMO_STEPS` (or ``steps``); the servers stop at the end.

    Args:
        workdir: folder of the demo (created if missing).
        size: region side in pixels at 10 m (multiple of 64, ≥ 256).
        seed: seed of the region.
        stac_port: STAC API port (0: a free port).
        data_port: data server port (0: a free port).
        host: loopback address to listen on.
        keep_serving: after the steps, keep the servers up until Ctrl-C.
        steps: the steps to run (default :data:`DEMO_STEPS`).
        on_step: called with (step name, summary) after each step, e.g. to print progress.
        until: stop after this step (e.g. ``"search"`` to only build and serve the region).
        epochs: training epochs (default: the ``cpu-demo`` preset's).
        two_zone: build the region across the UTM zone border at 12° E (EPSG:3035 grid,
            every pass as two overlapping granules in EPSG:32632 and EPSG:32633).

    Bad options fail before anything is written: :class:`ConfigError` (size, seed, ports,
    host), :class:`ServerError` (a port in use), :class:`OutputError` (workdir not writable).
    """
    steps = list(DEMO_STEPS if steps is None else steps)
    if until is not None:
        names = [name for name, _ in steps]
        if until not in names:
            raise ConfigError(f"Unknown demo step {until!r}: choose one of {', '.join(names)}.")
        steps = steps[: names.index(until) + 1]
    validate_parameters(size, seed, DEFAULT_YEAR, DEFAULT_DATES_PER_SEASON)
    check_loopback(host)
    check_port(stac_port, "`stac_port`")
    check_port(data_port, "`data_port`")
    if stac_port and stac_port == data_port:
        raise ConfigError(f"`stac_port` and `data_port` are both {stac_port}: give them different ports.")
    ensure_port_free(host, data_port, "data server", "`data_port`")
    ensure_port_free(host, stac_port, "STAC API", "`stac_port`")
    workdir = prepare_workdir(workdir)
    if not isinstance(two_zone, bool):
        raise ConfigError(f"two_zone must be True or False, not {two_zone!r}.")
    ctx = DemoContext(workdir=workdir, size=size, seed=seed, host=host, stac_port=stac_port,
                      data_port=data_port, epochs=epochs, two_zone=two_zone)
    with ctx.stack:
        for name, step in steps:
            started = time.perf_counter()
            log.info("demo step %r", name)
            result = dict(step(ctx) or {})
            result["seconds"] = round(time.perf_counter() - started, 2)
            ctx.results[name] = result
            if on_step is not None:
                on_step(name, result)
        if keep_serving and ctx.servers is not None:
            if on_step is not None:
                on_step("keep_serving", {"stac_url": ctx.servers.stac_url,
                                         "data_url": ctx.servers.data_url})
            try:
                _wait_until_interrupted()
            except KeyboardInterrupt:
                log.info("interrupted: stopping the demo servers")
    return ctx
