"""Experiments: a grid of training configurations, trained across the cluster and compared.

``clc-dask experiment --config experiment.yaml`` (or :func:`run_experiment`) splits a region
into train, validation and test blocks with guard bands (:mod:`.split`), trains each
configuration as one task on the cluster, resumably (:mod:`.runner`), predicts and scores the
test blocks (:mod:`.scoring`), and reports per-class IoU, mIoU, overall accuracy and kappa with
spatial block-bootstrap intervals and paired comparisons (:mod:`.stats`, :mod:`.report`).
The experiment file is described in :mod:`.config`.
"""

from clc_dask.experiment.config import (
    PAPER_GRID,
    Configuration,
    ExperimentConfig,
    load_experiment_config,
    parse_experiment_config,
    resolve_configurations,
)
from clc_dask.experiment.runner import ExperimentResult, check_experiment, run_experiment
from clc_dask.experiment.split import Split
from clc_dask.experiment.stats import BlockCounts, block_bootstrap, paired_comparison

__all__ = [
    "PAPER_GRID",
    "BlockCounts",
    "Configuration",
    "ExperimentConfig",
    "ExperimentResult",
    "Split",
    "block_bootstrap",
    "check_experiment",
    "load_experiment_config",
    "paired_comparison",
    "parse_experiment_config",
    "resolve_configurations",
    "run_experiment",
]
