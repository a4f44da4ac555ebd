"""Experiments: the search → prune → retrain pipeline and EB-vs-WORM comparisons."""

from worm_fast.experiments.pipeline import RunConfig, RunResult, run
from worm_fast.experiments.variants import compare_variants, run_variants, sweep_variants

__all__ = ["RunConfig", "RunResult", "compare_variants", "run", "run_variants", "sweep_variants"]
