"""Production runs: a country cut into tiles, resumable, published last.

The parts read in the order data flows:

1. :mod:`~clc_dask.run.context` — the run resolved once from its config
   (:func:`resolve_run`): AOI, grid and tiles, checkpoint, season, the store's state, the
   scenes. Every check happens here; nothing is written.
2. :mod:`~clc_dask.run.plan` — tiles to compute and skip, batches under the scheduler's task
   limit, and what the run will cost (:func:`plan_run`; :func:`dry_run` is ``--dry-run``).
3. :mod:`~clc_dask.run.tiles` — the per-tile graph (scenes → mosaic → class map →
   generalized map) and the tile's files; :mod:`~clc_dask.run.layout` says where a tile's
   arrays lie, :mod:`~clc_dask.run.scenes` which scenes it reads.
4. :mod:`~clc_dask.run.execute` — :func:`execute_run`: the tiles batch by batch, each
   finished tile recorded in the :mod:`~clc_dask.run.manifest`.
5. :mod:`~clc_dask.run.publish` — the STAC Collection and Items, for verified tiles, last.

:mod:`~clc_dask.run.store` holds the store's layout, its lock and the run-wide files.
"""

from clc_dask.run.context import CheckpointInfo, RunContext, check_checkpoint, resolve_run, run_grid
from clc_dask.run.execute import RunResult, execute, execute_run
from clc_dask.run.manifest import Manifest
from clc_dask.run.plan import MAX_TASKS_PER_GRAPH, RunPlan, dry_run, plan_run
from clc_dask.run.publish import publish_run

#: The former name of :func:`resolve_run` (scripts use it).
prepare_run = resolve_run

__all__ = [
    "MAX_TASKS_PER_GRAPH",
    "CheckpointInfo",
    "Manifest",
    "RunContext",
    "RunPlan",
    "RunResult",
    "check_checkpoint",
    "dry_run",
    "execute",
    "execute_run",
    "plan_run",
    "prepare_run",
    "publish_run",
    "resolve_run",
    "run_grid",
]
