"""Experiments: the search → prune → retrain pipeline and EB-vs-WORM comparisons."""

from worm_fast.experiments.config import RunConfig
from worm_fast.experiments.pipeline import RunResult, run
from worm_fast.experiments.variants import (
    compare_variants,
    run_variants,
    sweep_variants,
    value_masking_variants,
)

__all__ = [
    "RunConfig",
    "RunResult",
    "compare_variants",
    "run",
    "run_variants",
    "sweep_variants",
    "value_masking_variants",
]
