"""Result files of an experiment: JSON, CSV, the paper-style table and the figures.

Files are written to a temporary name and renamed into place, so a reader (or an
interrupted run) never sees a half-written file, and earlier results are replaced only
by complete new ones. results.json is strict JSON: a number that is not finite (the
loss of a diverged run) is written as null and listed under ``non_finite_values``.

Nothing reads better than it is: a count that is a censored maximum (a search that hit
its epoch limit, a retraining that never reached its target) is shown as a lower bound
with how many runs got there ("≥ 6 (0/1 converged)"), a trigger that cannot happen
(EB Train, r = 1) as "–", and the tables say which conventions their numbers use.
"""

import csv
import datetime
import io
import os
import platform
import statistics
from pathlib import Path

import matplotlib
import torch

from worm_fast import __version__, backends
from worm_fast.experiments.config import parse_restore_target
from worm_fast.experiments.variants import CENSORED
from worm_fast.files import atomic_write, atomic_write_text, json_text

matplotlib.use("Agg")  # files only: no display on servers
import matplotlib.pyplot as plt
from matplotlib.ticker import MaxNLocator

ROW_COLUMNS = (
    "variant", "seed", "phase", "epoch", "loss", "train_accuracy", "test_accuracy",
    "test_top5_accuracy", "d_max", "d_avg", "window_full", "r", "triggered", "converged",
    "seconds", "steps",
)  # fmt: skip

# Paper column → metric key (Tables I–III); RESTORE_COLUMN is named after the target.
RESTORE_COLUMN = "Restoration Epochs"
TABLE_COLUMNS = {
    "Ticket Search Epoch Count": "search_epochs",
    "Trigger Epoch": "trigger_epoch",
    "Pre-Pruned Acc.": "pre_pruned_accuracy",
    "Post-Prune Acc.": "pruned_accuracy",
    "Retrain Acc. after One Epoch": "retrain_accuracy_1",
    RESTORE_COLUMN: "restore_epochs",
    "Time to Restoration": "time_to_restore_seconds",
    "Total Time": "total_seconds",
    "Pre-Pruned Top-5": "pre_pruned_top5_accuracy",
    "Top-5 after One Epoch": "retrain_top5_accuracy_1",
}
# Per variant in summary.csv: the counts, then every mean, bound and spread.
SUMMARY_COUNTS = (
    "runs", "converged_runs", "trigger_possible_runs", "triggered_runs", "restored_runs",
)  # fmt: skip

# Paper row → metric key (Tables IV–VI: one column per variant, for one text task).
# "Time to Prune and Re-train" is the whole run, search included: the paper's 40 s for
# MRPC is about four BERT-base epochs on an H100.
TEXT_TABLE_ROWS = {
    "Pre-Pruned Accuracy": "pre_pruned_accuracy",
    "Epochs to Prune": "search_epochs",
    "Ticket Converged": "converged_runs",
    "Trigger Epoch": "trigger_epoch",
    "Pruned Accuracy": "pruned_accuracy",
    "Accuracy after 1 Epoch of Retraining": "retrain_accuracy_1",
    "Accuracy Gain after 1 Epoch": "accuracy_gain_1",
    "Time to Prune and Re-train": "total_seconds",
}


def environment() -> dict:
    """Where the results were measured."""
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor()
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "worm_fast": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": device or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "backends": {
            name: status.available if status.available else status.reason
            for name, status in backends.available().items()
        },
    }


def _format(value, key: str) -> str:
    if value is None:
        return "–"
    if key == "accuracy_gain_1":
        return f"{value:+.2f}%"
    if key.endswith("accuracy") or key.endswith("accuracy_1"):
        return f"{value:.2f}%"
    if key.endswith("seconds"):
        return f"{value:.0f}s"
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def _cell(means: dict, key: str) -> str:
    """One variant's ``key`` for a table: the mean, or, where some runs never got there,
    the lower bound and how many did (``variants.summarize``)."""
    runs = means.get("runs", 0)
    if key == "converged_runs":
        return f"{means.get(key, 0)}/{runs}"
    if key == "trigger_epoch":
        possible, triggered = means.get("trigger_possible_runs", 0), means.get("triggered_runs", 0)
        if not possible:  # EB Train, or r = 1: nothing is ever truncated
            return "–"
        shown = _format(means.get(key), key)
        return shown if triggered == possible else f"{shown} ({triggered}/{possible} triggered)"
    count_key = CENSORED.get(key)
    if count_key is None or not runs or means.get(count_key, runs) == runs:
        return _format(means.get(key), key)
    word = "converged" if count_key == "converged_runs" else "restored"
    bound = _format(means.get(f"{key}_bound"), key)
    return f"≥ {bound} ({means[count_key]}/{runs} {word})"


def restore_header(target: str) -> str:
    """The restoration column's name for a target, e.g. "90% Restoration Epochs"."""
    kind, value = parse_restore_target(target)
    percent = value * 100 if kind == "relative" else value
    return f"{percent:g}% {RESTORE_COLUMN}"


def conventions(config: dict) -> str:
    """What the table's numbers mean, for the line under it."""
    kind, value = parse_restore_target(config["restore_target"])
    goal = (f"test accuracy ≥ {value:g} × the pre-pruned accuracy" if kind == "relative"
            else f"test accuracy ≥ {value:g} % (absolute)")  # fmt: skip
    first = ("at initialization, then after every epoch (the Early-Bird code's convention)"
             if config["first_check"] == "init" else "after every trained epoch")  # fmt: skip
    return (
        f"Epochs are trained epochs; the first mask is taken {first}. Restoration: retrain "
        f"epochs until {goal} (--restore-target {config['restore_target']}). Times: the "
        "search, the pruning and the retrain epochs up to that target (Time to "
        f"Restoration) or all {config['retrain_epochs']} of them (Total Time, Time to "
        "Prune and Re-train). Means over each variant's complete runs; "
        '"≥ x (k/n …)": only k of n runs got there, x counts the others at the epochs '
        "(or time) they ran, so the true mean is at least x."
    )


def paper_table(document: dict) -> str:
    """A Markdown table of the variants' mean metrics, in the paper's layout: for CNNs a
    row per variant (Tables I–III), for a text task a column per variant (Tables IV–VI);
    then what its conventions are."""
    summary = document["summary"]
    config = document["base_config"]
    note = "\n" + conventions(config) + "\n"
    if config.get("task") is not None:
        header = [f"{config['task']} ({config['model']})", *summary]
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        rows = {**TEXT_TABLE_ROWS, restore_header(config["restore_target"]): "restore_epochs"}
        for row, key in [*rows.items(), ("Runs", "runs")]:
            cells = [_cell(means, key) for means in summary.values()]
            lines.append(f"| {row} | " + " | ".join(cells) + " |")
        return "\n".join(lines) + "\n" + note
    columns = {restore_header(config["restore_target"]) if key == "restore_epochs" else name: key
               for name, key in TABLE_COLUMNS.items()}  # fmt: skip
    header = ["Algorithm", *columns, "Runs"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for variant, means in summary.items():
        cells = [_cell(means, key) for key in columns.values()]
        lines.append(f"| {variant} | " + " | ".join(cells) + f" | {means['runs']} |")
    return "\n".join(lines) + "\n" + note


# What `paired_effects` compares between variants, seed by seed.
EFFECT_METRICS = {
    "Ticket Search Epoch Count": "search_epochs",
    "Pre-Pruned Acc.": "pre_pruned_accuracy",
    "Retrain Acc. after One Epoch": "retrain_accuracy_1",
    "Time to Restoration": "time_to_restore_seconds",
    "Total Time": "total_seconds",
}


def paired_effects(document: dict) -> str:
    """Each variant against the first, seed by seed (the variants of a seed start from the
    same weights): the mean difference, the standard deviation of the differences across
    seeds, and whether the effect is larger than that spread. Empty with fewer than two
    seeds where both runs completed."""
    variants = list(document["variants"])
    runs = {(run["variant"], run["seed"]): run["metrics"] for run in document["runs"]
            if run["status"] == "complete"}  # fmt: skip
    baseline, lines = variants[0], []
    for variant in variants[1:]:
        for label, key in EFFECT_METRICS.items():
            pairs = [(runs[variant, seed], metrics) for (name, seed), metrics in runs.items()
                     if name == baseline and (variant, seed) in runs]  # fmt: skip
            diffs = [ours[key] - theirs[key] for ours, theirs in pairs
                     if ours.get(key) is not None and theirs.get(key) is not None]  # fmt: skip
            if len(diffs) < 2:
                continue
            mean, spread = statistics.fmean(diffs), statistics.stdev(diffs)
            censored = key == "search_epochs" and not all(
                ours["converged"] and theirs["converged"] for ours, theirs in pairs
            )
            verdict = "yes" if abs(mean) > spread else "no"
            lines.append(
                f"| {variant} | {label}{' (some not converged)' if censored else ''} | "
                f"{_format(mean, key)} | {_format(spread, key)} | {len(diffs)} | {verdict} |"
            )
    if not lines:
        return ""
    header = (f"| vs {baseline}, paired by seed | metric | mean difference | SD of the "
              "differences | seeds | larger than the spread? |")  # fmt: skip
    return "\n".join([header, "|---|---|---|---|---|---|", *lines]) + "\n"


def rl_evaluation_table(rows: list[dict]) -> str:
    """WORM-RL's policy on held-out seeds (``worm_fast.rl.train.evaluate``): per seed and
    on average, the check where the policy, Early-Bird's rule and the best stop in
    hindsight stop, with the reward and ticket accuracy of each."""
    stops = {"policy": "policy", "eb_rule": "EB rule", "best": "best in hindsight"}
    header = ["seed"] + [f"{label} {what}" for label in stops.values()
                         for what in ("check", "reward", "acc.")]  # fmt: skip
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    mean = {key: sum(row[key] for row in rows) / len(rows) for key in rows[0] if key != "seed"}
    for row, seed in [*((row, str(row["seed"])) for row in rows), (mean, "mean")]:
        cells = [seed]
        for stop in stops:
            cells += [f"{row[f'{stop}_check']:.3g}", f"{row[f'{stop}_reward']:.3f}",
                      f"{row[f'{stop}_accuracy']:.2f}%"]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


PROFILE_COLUMNS = {
    "time (s)": ("duration", "{:.1f}"),
    "steps": ("steps", "{:.0f}"),
    "FLOPs": ("flops", "{:.3g}"),
    "optimizer bytes": ("optimizer_bytes", "{:.3g}"),
    "energy (J)": ("energy_joules", "{:.1f}"),
}


def profile_table(document: dict) -> str:
    """Per variant and phase, the mean over complete runs of time, FLOPs and energy."""
    header = ["Algorithm", "phase", *PROFILE_COLUMNS]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    unavailable: dict[str, str] = {}
    for variant in document["variants"]:
        profiles = [
            run["profile"] for run in document["runs"]
            if run["variant"] == variant and run["status"] == "complete"
        ]  # fmt: skip
        if not profiles:
            continue
        for index, first in enumerate([*profiles[0]["phases"], profiles[0]["total"]]):
            rows = [[*p["phases"], p["total"]][index] for p in profiles]
            cells = [variant, first["phase"]]
            for key, template in PROFILE_COLUMNS.values():
                values = [row[key] for row in rows if row[key] is not None]
                cells.append(template.format(sum(values) / len(values)) if values else "n/a")
            lines.append("| " + " | ".join(cells) + " |")
        unavailable.update(profiles[0]["energy_unavailable"])
    if unavailable:
        reasons = "; ".join(f"{name}: {why}" for name, why in unavailable.items())
        lines.append(f"\nEnergy not measured by {reasons}.")
    return "\n".join(lines) + "\n"


FULL_PROFILE_COLUMNS = {
    "time (s)": ("duration", "{:.2f}"),
    "steps": ("steps", "{:.0f}"),
    "model FLOPs": ("model_flops", "{:.3g}"),
    "optimizer FLOPs": ("optimizer_flops", "{:.3g}"),
    "optimizer bytes": ("optimizer_bytes", "{:.3g}"),
    "mask FLOPs": ("mask_flops", "{:.3g}"),
    "energy (J)": ("energy_joules", "{:.1f}"),
    "energy (kWh)": ("energy_consumed", "{:.3g}"),
    "CO2 (kg)": ("emissions", "{:.3g}"),
    "peak memory (B)": ("peak_memory_bytes", "{:.3g}"),
}


def full_profile(profile: dict) -> str:
    """One run's per-phase report (``PhaseProfiler.to_dict()``) with every measure, and
    which energy sources measured it or why they could not."""
    header = ["phase", *FULL_PROFILE_COLUMNS]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in [*profile["phases"], profile["total"]]:
        cells = [row["phase"]] + [
            "n/a" if row[key] is None else template.format(row[key])
            for key, template in FULL_PROFILE_COLUMNS.values()
        ]
        lines.append("| " + " | ".join(cells) + " |")
    sources = ", ".join(profile["energy_sources"]) or "none"
    lines.append(f"\nEnergy measured by: {sources}.")
    if profile["energy_unavailable"]:
        reasons = "; ".join(f"{n}: {why}" for n, why in profile["energy_unavailable"].items())
        lines.append(f"Not measured: {reasons}.")
    total = profile["total"]
    if total.get("memory_unavailable"):
        lines.append(f"Peak memory not measured: {total['memory_unavailable']}.")
    else:
        lines.append(f"Peak memory: {total['memory_measure']} (a phase's peak; total: the "
                     "largest).")  # fmt: skip
    return "\n".join(lines) + "\n"


def _csv_text(rows: list[dict], columns) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def write_results(out_dir: str | os.PathLike, document: dict) -> dict[str, Path]:
    """Write results.json, epochs.csv, runs.csv, summary.csv, phases.csv and table.md;
    returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = ("results.json", "epochs.csv", "runs.csv", "summary.csv", "phases.csv", "table.md")
    paths = {name: out / name for name in names}
    epoch_rows = [
        {"variant": run["variant"], "seed": run["seed"], **row}
        for run in document["runs"]
        for row in run.get("rows", [])
    ]
    run_rows = [
        {"variant": run["variant"], "seed": run["seed"], "status": run["status"],
         **run.get("metrics", {})}
        for run in document["runs"]
    ]  # fmt: skip
    metric_columns = dict.fromkeys(k for row in run_rows for k in row)
    phase_rows = [
        {"variant": run["variant"], "seed": run["seed"], **row}
        for run in document["runs"]
        if run.get("profile")
        for row in [*run["profile"]["phases"], run["profile"]["total"]]
        if row is not None
    ]
    phase_columns = dict.fromkeys(k for row in phase_rows for k in row)
    summary_rows = [{"variant": variant, **means} for variant, means in document["summary"].items()]
    summary_columns = dict.fromkeys(
        ["variant", *SUMMARY_COUNTS, *(k for row in summary_rows for k in row)]
    )
    atomic_write_text(paths["results.json"], json_text(document, indent=1, default=str))
    atomic_write_text(paths["epochs.csv"], _csv_text(epoch_rows, ROW_COLUMNS))
    atomic_write_text(paths["runs.csv"], _csv_text(run_rows, metric_columns))
    atomic_write_text(paths["summary.csv"], _csv_text(summary_rows, summary_columns))
    atomic_write_text(paths["phases.csv"], _csv_text(phase_rows, phase_columns))
    tables = [paper_table(document), paired_effects(document), profile_table(document)]
    atomic_write_text(paths["table.md"], "\n".join(table for table in tables if table))
    return paths


def full_window_series(run: dict, key: str) -> tuple[list[int], list[float]]:
    """One run's ``key`` (d_max or d_avg) per search epoch, from full windows only (before
    that there is no decision, and fewer masks make the distances incomparable)."""
    points = [
        (row["epoch"], row[key])
        for row in run.get("rows", [])
        if row["phase"] == "search" and row.get("window_full") and row.get(key) is not None
    ]
    return [epoch for epoch, _ in points], [value for _, value in points]


def shared_mean(runs: list[dict], key: str) -> tuple[list[int], list[float]]:
    """The mean of ``key`` over ``runs`` at each epoch where every run has a full window:
    late epochs that only the slower runs reach are not averaged over fewer runs."""
    by_epoch: dict[int, list[float]] = {}
    for run in runs:
        for epoch, value in zip(*full_window_series(run, key)):
            by_epoch.setdefault(epoch, []).append(value)
    shared = sorted(e for e, values in by_epoch.items() if len(values) == len(runs))
    return shared, [sum(by_epoch[e]) / len(runs) for e in shared]


def plot_mask_distances(document: dict, path: str | os.PathLike) -> Path:
    """d_max and d_avg per search epoch for each variant (the paper's Figure 1), from full
    windows only: a thin line per run, and a thick line for the mean over the epochs where
    every run of the variant is still searching (``shared_mean``); the stop distance and
    WORM's trigger line."""
    config = document["base_config"]
    figure, axis = plt.subplots(figsize=(7, 4.2))
    if not any(full_window_series(run, "d_max")[0] for run in document["runs"]):
        axis.text(0.02, 0.93, f"no search has reached a full window of {config['window']} masks",
                  ha="left", transform=axis.transAxes)  # fmt: skip
    for index, variant in enumerate(document["variants"]):
        runs = [run for run in document["runs"] if run["variant"] == variant]
        color = f"C{index}"
        for key, style in (("d_max", "-"), ("d_avg", "--")):
            for run in runs:
                axis.plot(*full_window_series(run, key), style, color=color, lw=0.7, alpha=0.35)
            axis.plot(*shared_mean(runs, key), style, color=color, lw=2, marker="o", ms=3,
                      label=f"{variant} {key} (mean of {len(runs)})")  # fmt: skip
    stop, margin = config["stop_distance"], config["trigger_margin"]
    axis.axhline(stop, color="black", lw=1, label=f"stop s = {stop:g}")
    axis.axhline(
        stop + margin, color="gray", lw=1, ls=":", label=f"trigger s + δ = {stop + margin:g}"
    )
    first = (
        "masks from initialization"
        if config.get("first_check") == "init"
        else "masks after each epoch"
    )
    axis.set_xlabel(f"trained epochs ({first}; full windows only, thin lines: single runs)")
    axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    axis.set_ylabel("normalized mask distance")
    data = config.get("task") or config["dataset"]
    axis.set_title(f"Mask distance ({config['model']}, {data}, window {config['window']})")
    axis.legend(fontsize=8)
    axis.grid(alpha=0.3)
    return _save(figure, path)


def plot_losses(document: dict, path: str | os.PathLike, *, smoothing: int = 10) -> Path:
    """Training loss per step through search and retraining of each variant's first run
    (the paper's Figure 2 shows one run: averaging runs whose tickets are pruned at
    different steps would blur the pruning jumps), smoothed over ``smoothing`` steps."""
    figure, axis = plt.subplots(figsize=(7, 4.2))
    seed = None
    for index, variant in enumerate(document["variants"]):
        run = next((r for r in document["runs"] if r["variant"] == variant), None)
        losses = [
            loss for row in (run or {}).get("rows", []) for loss in row.get("batch_losses", [])
        ]
        if not losses:
            continue
        seed = run["seed"]
        window = max(1, min(smoothing, len(losses)))
        curve = torch.tensor(losses)[None, None]
        smooth = torch.nn.functional.avg_pool1d(curve, window, stride=1)[0, 0]
        axis.plot(range(window - 1, len(losses)), smooth.tolist(), color=f"C{index}", label=variant)
        search_steps = sum(row.get("steps", 0) for row in run["rows"] if row["phase"] == "search")
        axis.axvline(search_steps, color=f"C{index}", ls=":", lw=1)
    axis.set_xlabel("training step (dotted: ticket pruned, retraining starts)")
    axis.set_ylabel(f"training loss ({smoothing}-step moving average)")
    axis.set_title("Training loss, " + " vs ".join(document["variants"]) + f" (seed {seed})")
    axis.legend()
    axis.grid(alpha=0.3)
    return _save(figure, path)


def _save(figure, path) -> Path:
    figure.tight_layout()
    try:
        return atomic_write(path, lambda file: figure.savefig(file, dpi=120, format="png"))
    finally:
        plt.close(figure)
