"""Several variants of a run (EB vs WORM vs the proposal's WORM-gradient and WORM-RL, a
dense baseline, a truncation sweep, Q/K vs Q/K/V representative layers) from identical
starts.

For every seed, each variant starts from the same initial weights and sees the same
data order, as the paper's Tables I–III do; metrics are averaged over seeds, and the
summary says how many runs converged, triggered and restored, so that a mean over
censored runs (a search that hit its epoch limit) is never mistaken for a measured one. The
results document is handed to ``on_update`` after every epoch, and a run cut short by
KeyboardInterrupt is marked ``interrupted`` (one whose training diverged, ``failed``,
with its ``error``) before the exception propagates, so what was written covers exactly
the finished epochs. Every variant's settings are checked against the model before
the first epoch of any (:func:`~worm_fast.experiments.pipeline.check_setup`).
"""

import statistics
from collections.abc import Callable
from dataclasses import asdict, replace

from worm_fast.experiments.parallel import SINGLE_PROCESS, DataParallel
from worm_fast.experiments.pipeline import RunConfig, RunResult, SetupError, check_setup, run
from worm_fast.experiments.workloads import initial_model
from worm_fast.rl.policy import check_held_out, load_policy

# Truncation factors of the paper's Table I.
TABLE_I_TRUNCATIONS = (1.0, 0.5, 0.1, 0.05, 0.01)

# How each search mode is labelled in tables and figures.
MODE_LABELS = {
    "eb": "EB Train",
    "worm": "WORM",
    "truncate": "Truncate",
    "gradient": "WORM-gradient",
    "rl": "WORM-RL",
}
# Table IV's baseline: EB Train's search sets the budget, its ticket is not applied, and
# the same retraining follows, so the one difference from EB Train is the pruning.
DENSE_LABEL = "Dense (no pruning)"
DENSE_VARIANT = {"mode": "eb", "prune": "none"}

# A metric whose runs may not reach it (censored), and the count of runs that did.
CENSORED = {
    "search_epochs": "converged_runs",
    "restore_epochs": "restored_runs",
    "time_to_restore_seconds": "restored_runs",
}


def compare_variants(
    *,
    with_truncate: bool = False,
    with_dense: bool = False,
    modes: tuple[str, ...] = ("eb", "worm"),
) -> dict[str, dict]:
    """One variant per search mode, by default EB Train vs WORM (Tables II/III);
    ``with_truncate`` adds truncation from the start, ``with_dense`` the dense baseline
    (Table IV)."""
    modes = (*modes, "truncate") if with_truncate and "truncate" not in modes else modes
    unknown = [mode for mode in modes if mode not in MODE_LABELS]
    if unknown or not modes:
        raise ValueError(f"modes must be some of {', '.join(MODE_LABELS)}; got {list(modes)}")
    variants = {MODE_LABELS[mode]: {"mode": mode} for mode in dict.fromkeys(modes)}
    if with_dense:
        variants[DENSE_LABEL] = dict(DENSE_VARIANT)
    return variants


def sweep_variants(truncations=TABLE_I_TRUNCATIONS) -> dict[str, dict]:
    """Truncation over the whole search at each factor (Table I)."""
    return {f"r = {r:g}": {"mode": "truncate", "truncation": float(r)} for r in truncations}


def value_masking_variants(mode: str = "eb") -> dict[str, dict]:
    """Query and key as representative layers vs query, key and value (Table V)."""
    label = MODE_LABELS[mode]
    return {
        f"{label} (Q, K)": {"mode": mode, "representative": "attention"},
        f"{label} (Q, K, V)": {"mode": mode, "representative": "attention_qkv"},
    }


def summarize(runs: list[dict]) -> dict[str, dict]:
    """Per variant, over its complete runs: ``runs``; how many converged, triggered (of
    those that could) and restored; the mean of every numeric metric over the runs that
    have it (a metric a run never reached, like a restoration beyond its retrain epochs,
    is left out of the mean, and the count says so); ``<metric>_std``, the seed-to-seed
    standard deviation; and for each censored metric (``CENSORED``) ``<metric>_bound``,
    the mean with every run that did not get there counted at what it ran (its search
    or retrain epochs, its total time): a lower bound on the mean, the "≥" of a table."""
    summary: dict[str, dict] = {}
    for variant in dict.fromkeys(entry["variant"] for entry in runs):
        complete = [e for e in runs if e["variant"] == variant and e["status"] == "complete"]
        metrics = [e["metrics"] for e in complete]
        means: dict = {"runs": len(complete)}
        means["converged_runs"] = sum(bool(m["converged"]) for m in metrics)
        means["trigger_possible_runs"] = sum(bool(m.get("trigger_possible")) for m in metrics)
        means["triggered_runs"] = sum(m.get("trigger_epoch") is not None for m in metrics)
        means["restored_runs"] = sum(m.get("restore_epochs") is not None for m in metrics)
        for key in metrics[0] if metrics else ():
            values = [float(m[key]) for m in metrics if isinstance(m[key], int | float)]
            means[key] = statistics.fmean(values) if values else None
            if len(values) > 1:
                means[f"{key}_std"] = statistics.stdev(values)
        for key in CENSORED:
            if metrics and key in metrics[0]:
                means[f"{key}_bound"] = statistics.fmean(
                    _reached_or_limit(entry, key) for entry in complete
                )
        summary[variant] = means
    return summary


def _reached_or_limit(entry: dict, key: str) -> float:
    """The run's ``key``, or, when it never got there, how far it went."""
    value = entry["metrics"][key]
    if key == "search_epochs" or value is not None:
        return float(value)  # a search that did not converge ran all its epochs
    if key == "restore_epochs":
        return float(entry["config"]["retrain_epochs"])
    return float(entry["metrics"]["total_seconds"])


def _checked_model(base: RunConfig, configs: dict[str, RunConfig]):
    """``base``'s initial model, once every variant's settings are checked against it."""
    try:
        model = initial_model(base)
    except ValueError as error:  # e.g. a subset larger than the dataset
        raise SetupError(str(error)) from error
    for label, config in configs.items():
        try:
            check_setup(replace(config, seed=base.seed), model)
        except SetupError as error:
            raise SetupError(f"variant {label!r}: {error}") from error
    return model


def check_variants(base: RunConfig, variants: dict[str, dict], *, runs: int) -> dict:
    """Every variant's configuration (``base`` with its overrides), checked before anything
    runs: its settings, and that a policy never sees the seeds it was trained on."""
    configs = {label: replace(base, **overrides) for label, overrides in variants.items()}
    seeds = range(base.seed, base.seed + runs)
    for config in configs.values():
        if config.mode == "rl":
            check_held_out(load_policy(config.policy), seeds)
    return configs


def run_variants(
    base: RunConfig,
    variants: dict[str, dict],
    *,
    runs: int = 1,
    command: str = "compare",
    progress: bool = False,
    on_update: Callable[[dict], None] | None = None,
    parallel: DataParallel = SINGLE_PROCESS,
) -> dict:
    """Run every variant for ``runs`` seeds (``base.seed``, +1, …); the results document.
    Under torchrun (``parallel``) every rank runs them all, each on its part of the data."""
    if runs < 1:
        raise ValueError(f"runs must be at least 1, got {runs}")
    configs = check_variants(base, variants, runs=runs)
    document = {
        "command": command,
        "base_config": asdict(base),
        "variants": variants,
        "runs": [],
        "summary": {},
    }
    notify = on_update or (lambda _: None)

    def publish(entry: dict, result: RunResult) -> None:
        entry.update(
            status=result.status, rows=result.rows, metrics=result.metrics, profile=result.profile
        )
        if result.error is not None:
            entry["error"] = result.error
        document["summary"] = summarize(document["runs"])
        notify(document)

    for index in range(runs):
        seed = base.seed + index
        seeded = replace(base, seed=seed)
        model = _checked_model(seeded, configs) if index == 0 else initial_model(seeded)
        start = {name: tensor.clone() for name, tensor in model.state_dict().items()}
        for label, config in configs.items():
            config = replace(config, seed=seed)
            entry = {"variant": label, "seed": seed, "config": asdict(config), "status": "running"}
            document["runs"].append(entry)
            result = RunResult(config=asdict(config))
            try:
                result = run(
                    config, initial_state=start, progress=progress, parallel=parallel,
                    on_row=lambda partial, entry=entry: publish(entry, partial),
                )  # fmt: skip
            except KeyboardInterrupt:
                entry["status"] = "interrupted"
                document["summary"] = summarize(document["runs"])
                notify(document)
                raise
            publish(entry, result)
    return document
