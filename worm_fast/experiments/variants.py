"""Several variants of a run (EB vs WORM, a truncation sweep) from identical starts.

For every seed, each variant starts from the same initial weights and sees the same
data order, as the paper's Tables I–III do; metrics are averaged over seeds. The
results document is handed to ``on_update`` after every epoch, and a run cut short by
KeyboardInterrupt is marked ``interrupted`` before the interrupt propagates, so what
was written covers exactly the finished epochs.
"""

from collections.abc import Callable
from dataclasses import asdict, replace

import torch

from worm_fast.data import load_dataset
from worm_fast.experiments.pipeline import RunConfig, RunResult, run
from worm_fast.models import build_model

# Truncation factors of the paper's Table I.
TABLE_I_TRUNCATIONS = (1.0, 0.5, 0.1, 0.05, 0.01)


def compare_variants(*, with_truncate: bool = False) -> dict[str, dict]:
    """EB Train vs WORM (Tables II/III), optionally truncation from the start too."""
    variants = {"EB Train": {"mode": "eb"}, "WORM": {"mode": "worm"}}
    if with_truncate:
        variants["Truncate"] = {"mode": "truncate"}
    return variants


def sweep_variants(truncations=TABLE_I_TRUNCATIONS) -> dict[str, dict]:
    """Truncation over the whole search at each factor (Table I)."""
    return {f"r = {r:g}": {"mode": "truncate", "truncation": float(r)} for r in truncations}


def initial_state(config: RunConfig) -> dict[str, torch.Tensor]:
    """The initial weights of ``config.model`` for ``config.seed``."""
    _, _, info = load_dataset(
        config.dataset, data_dir=config.data_dir, train_subset=config.train_subset,
        test_subset=config.test_subset, seed=config.seed,
    )  # fmt: skip
    torch.manual_seed(config.seed)
    model = build_model(
        config.model, num_classes=info.num_classes, in_channels=info.in_channels,
        width=config.width,
    )  # fmt: skip
    return {name: tensor.clone() for name, tensor in model.state_dict().items()}


def summarize(runs: list[dict]) -> dict[str, dict]:
    """Per variant: the mean of every numeric metric over its complete runs."""
    summary: dict[str, dict] = {}
    for variant in dict.fromkeys(entry["variant"] for entry in runs):
        complete = [e for e in runs if e["variant"] == variant and e["status"] == "complete"]
        means: dict = {"runs": len(complete)}
        for key in complete[0]["metrics"] if complete else ():
            values = [e["metrics"][key] for e in complete if e["metrics"][key] is not None]
            means[key] = sum(float(v) for v in values) / len(values) if values else None
        summary[variant] = means
    return summary


def run_variants(
    base: RunConfig,
    variants: dict[str, dict],
    *,
    runs: int = 1,
    command: str = "compare",
    progress: bool = False,
    on_update: Callable[[dict], None] | None = None,
) -> dict:
    """Run every variant for ``runs`` seeds (``base.seed``, +1, …); the results document."""
    if runs < 1:
        raise ValueError(f"runs must be at least 1, got {runs}")
    configs = {label: replace(base, **overrides) for label, overrides in variants.items()}
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
        document["summary"] = summarize(document["runs"])
        notify(document)

    for index in range(runs):
        seed = base.seed + index
        start = initial_state(replace(base, seed=seed))
        for label, config in configs.items():
            config = replace(config, seed=seed)
            entry = {"variant": label, "seed": seed, "config": asdict(config), "status": "running"}
            document["runs"].append(entry)
            result = RunResult(config=asdict(config))
            try:
                result = run(
                    config, initial_state=start, progress=progress,
                    on_row=lambda partial, entry=entry: publish(entry, partial),
                )  # fmt: skip
            except KeyboardInterrupt:
                entry["status"] = "interrupted"
                document["summary"] = summarize(document["runs"])
                notify(document)
                raise
            publish(entry, result)
    return document
