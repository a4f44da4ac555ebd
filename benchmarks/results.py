"""Result rows, machine information, and the JSON / CSV / table outputs."""

import csv
import dataclasses
import datetime
import json
import os
import platform
from pathlib import Path

import torch

# A CSV row is replaced by a new one with the same key; thread count is part of it, as a
# `--threads 1` run measures something else than a run on every core.
KEY = ("benchmark", "provider", "param_set", "device", "threads")


@dataclasses.dataclass
class Row:
    # stream | sgd_step | adamw_step | compile_step | hamming_window | penalty | threshold | check
    benchmark: str
    provider: str
    param_set: str
    device: str
    numel: int
    median_ms: float
    p20_ms: float
    p80_ms: float
    reps: int
    bytes: int  # the least traffic the operation needs (see README)
    gbps: float
    roofline_fraction: float | None = None
    # Speedups: the named baseline's median time / this row's (> 1 is faster).
    vs_fused: float | None = None  # torch's fused step of the same optimizer, no truncation
    vs_mask_mul: float | None = None
    vs_bool_ne_sum: float | None = None
    fraction_of_step: float | None = None  # this row's time / the training step's
    vs_kthvalue: float | None = None  # the threshold, or check, with torch.cat + kthvalue
    vs_eager: float | None = None  # a torch.compile'd step: the same step run eagerly
    note: str = ""
    cpu: str = ""
    threads: int = 0
    torch: str = ""
    date: str = ""


def machine() -> dict:
    """What the numbers were measured on."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:  # not Linux
        pass
    info = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        # Other processes share the cores; a high load makes every number noisier.
        "load_average_1min": os.getloadavg()[0],
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def write(rows: list[Row], info: dict, targets: list[dict], out: Path) -> tuple[Path, Path]:
    """This run's JSON (replaced), and the CSV of all runs (rows upserted by KEY)."""
    out.mkdir(parents=True, exist_ok=True)
    json_path, csv_path = out / "results.json", out / "results.csv"
    records = [dataclasses.asdict(row) for row in rows]
    payload = {"machine": info, "targets": targets, "rows": records}
    json_path.write_text(json.dumps(payload, indent=2) + "\n")

    fields = [f.name for f in dataclasses.fields(Row)]
    merged: dict[tuple, dict] = {}
    if csv_path.exists():
        with csv_path.open(newline="") as file:
            for old in csv.DictReader(file):
                merged[tuple(old.get(k, "") for k in KEY)] = old
    for record in records:
        merged[tuple(str(record[k]) for k in KEY)] = record
    # Write aside and rename, so an interrupted run never leaves a truncated CSV.
    partial = csv_path.with_suffix(".csv.partial")
    with partial.open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(merged.values())
    partial.replace(csv_path)
    return json_path, csv_path


def _fmt(value: float | None, spec: str) -> str:
    return "" if value is None else format(value, spec)


def table(rows: list[Row]) -> str:
    """A fixed-width table, one block per benchmark and parameter set."""
    header = (
        f"{'provider':<36}{'median ms':>11}{'p20-p80 ms':>17}{'GB/s':>8}{'roofline':>10}"
        f"{'vs fused':>10}{'vs mask*':>10}{'vs bool':>9}{'vs kth':>9}{'vs eager':>10}"
    )
    lines = []
    block = None
    for row in rows:
        if (row.benchmark, row.param_set) != block:
            block = (row.benchmark, row.param_set)
            lines += ["", f"== {row.benchmark} · {row.param_set} · {row.device}", header]
        spread = f"{row.p20_ms:.3g}-{row.p80_ms:.3g}"
        lines.append(
            f"{row.provider:<36}{row.median_ms:>11.3f}{spread:>17}{row.gbps:>8.1f}"
            f"{_fmt(row.roofline_fraction, '.0%'):>10}{_fmt(row.vs_fused, '.2f'):>10}"
            f"{_fmt(row.vs_mask_mul, '.2f'):>10}{_fmt(row.vs_bool_ne_sum, '.0f'):>9}"
            f"{_fmt(row.vs_kthvalue, '.1f'):>9}{_fmt(row.vs_eager, '.2f'):>10}"
        )
    return "\n".join(lines)
