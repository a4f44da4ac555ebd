"""Run every benchmark: ``python -m benchmarks.run [--quick] [--out DIR] [--threads N]
[--skip-compile]``.

Measures, in one process: the STREAM roofline (CPU kernels, or torch's copy, triad and
dot on a GPU), one SGD and one AdamW step on each parameter set for worm_fast's
optimizers and torch's (``step_harness`` with the providers of ``bench_sgd`` and
``bench_adamw``), the SGD steps under ``torch.compile`` against eager (``bench_compile``;
``--skip-compile`` leaves out its minutes of compiling), mask distances, the threshold
and a whole search check, and WORM-gradient's penalty per training step. Prints a
table and the issue's targets (reported, never asserted: benchmarks are not tests) and
writes ``results.json`` and ``results.csv`` to ``--out``.
"""

import argparse
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch

from benchmarks import (
    bench_adamw,
    bench_compile,
    bench_hamming,
    bench_penalty,
    bench_sgd,
    bench_threshold,
    param_sets,
    results,
    roofline,
    step_harness,
)
from benchmarks.timing import Timing, cache_flusher, last_level_cache_bytes
from worm_fast import backends

# Masks, as in the Early-Bird search: window of 5, one bit per element of a 16M model.
HAMMING_WINDOW = 5


@dataclass(frozen=True)
class Settings:
    stream_numel: int
    hamming_bits: int
    warmup: int
    reps: int
    reference_reps: int
    budget_s: float | None  # per group of interleaved providers (see timing.measure)
    flush_bytes: int | None  # read before every timed call (None: twice the cache)


def stream_numel(device: torch.device) -> int:
    """Floats per STREAM array: at least 64M, and twice the last-level cache, so that
    no array (let alone the three) fits in any cache."""
    if device.type == "cuda":
        cache = torch.cuda.get_device_properties(device).L2_cache_size
    else:
        cache = last_level_cache_bytes()
    return max(64 << 20, 2 * cache // 4)


def settings(quick: bool, device: torch.device) -> Settings:
    if quick:
        return Settings(
            1 << 20, 1 << 16, warmup=1, reps=3, reference_reps=1, budget_s=None, flush_bytes=1 << 20
        )
    return Settings(
        stream_numel(device),
        1 << 24,
        warmup=2,
        reps=15,
        reference_reps=3,
        budget_s=30,
        flush_bytes=None,
    )


class Recorder:
    """Builds result rows with the run's device and machine information."""

    def __init__(self, device: torch.device, info: dict) -> None:
        self.rows: list[results.Row] = []
        # The roofline (GB/s) of the STREAM run, and the one measured alongside each
        # parameter set's providers, by parameter set.
        self.roofline_gbps: float | None = None
        self.read_roofline_gbps: float | None = None  # the read-only STREAM kernel's
        self.rooflines: dict[str, float] = {}
        self.common = dict(
            device=str(device),
            cpu=info["cpu"],
            threads=info["threads"],
            torch=info["torch"],
            date=info["date"],
        )

    def add(
        self,
        benchmark: str,
        provider: str,
        param_set: str,
        timing: Timing,
        *,
        numel: int,
        nbytes: int,
        roofline_gbps: float | None,
        **extra,
    ) -> results.Row:
        gbps = nbytes / timing.median / 1e9
        row = results.Row(
            benchmark=benchmark,
            provider=provider,
            param_set=param_set,
            numel=numel,
            median_ms=timing.median * 1e3,
            p20_ms=timing.p20 * 1e3,
            p80_ms=timing.p80 * 1e3,
            reps=timing.reps,
            bytes=nbytes,
            gbps=gbps,
            roofline_fraction=None if roofline_gbps is None else gbps / roofline_gbps,
            **extra,
            **self.common,
        )
        self.rows.append(row)
        return row


def bench_stream(
    rec: Recorder, stream: roofline.Stream | roofline.DeviceStream, config: Settings
) -> list[str]:
    """Measure every STREAM kernel: the fastest one that writes is the roofline of the
    optimizer steps, the read-only one that of the mask distances. Returns the fastest
    writing kernel of each thread count."""
    timings = stream.measure(warmup=config.warmup, reps=config.reps, budget_s=config.budget_s)
    gbps = {name: stream.bytes(name) / t.median / 1e9 for name, t in timings.items()}
    reads = {name for name in gbps if name.split("@")[0] == roofline.READ_ONLY}
    rec.roofline_gbps = max(v for name, v in gbps.items() if name not in reads)
    rec.read_roofline_gbps = max(gbps[name] for name in reads)
    label = f"3 x {stream.numel / (1 << 20):.0f}M floats"
    for name, timing in timings.items():
        rec.add(
            "stream",
            name,
            label,
            timing,
            numel=stream.numel,
            nbytes=stream.bytes(name),
            roofline_gbps=rec.read_roofline_gbps if name in reads else rec.roofline_gbps,
        )
    best: dict[str, str] = {}  # thread count -> its fastest writing kernel
    for name, value in gbps.items():
        team = name.split("@")[1]
        if name not in reads and (team not in best or value > gbps[best[team]]):
            best[team] = name
    return list(best.values())


def bench_step(
    rec: Recorder,
    bench: ModuleType,
    name: str,
    shapes: param_sets.Shapes,
    device: torch.device,
    config: Settings,
    stream: roofline.Stream | roofline.DeviceStream,
    kernels: list[str],
    flush: Callable[[], object],
) -> None:
    """One optimizer step on ``shapes``: ``bench`` is ``bench_sgd``, ``bench_adamw`` or
    ``bench_compile``."""
    # The best roofline kernels run in the same rounds as the optimizers, so that the
    # bandwidth or cores other processes take lower both alike; which thread count does
    # best depends on that load, hence one kernel of each.
    alongside = {f"roofline:{k}": stream.kernels[k] for k in kernels}
    case, found, timings = step_harness.run(
        bench,
        shapes,
        device,
        warmup=config.warmup,
        reps=config.reps,
        reference_reps=config.reference_reps,
        budget_s=config.budget_s,
        alongside=alongside,
        flush=flush,
    )
    print(f"  {name}: {step_harness.describe(case)}", flush=True)
    fused = timings[bench.FUSED].median
    mask_mul = timings[bench.MASK_MUL].median
    measured = {k: timings.pop(f"roofline:{k}") for k in kernels}
    roofline_gbps = max(stream.bytes(k) / t.median / 1e9 for k, t in measured.items())
    rec.rooflines[name] = roofline_gbps
    for kernel, timing in measured.items():
        rec.add(
            bench.BENCHMARK,
            f"roofline:{kernel}",
            name,
            timing,
            numel=stream.numel,
            nbytes=stream.bytes(kernel),
            roofline_gbps=roofline_gbps,
        )
    for provider, timing in timings.items():
        notes = ["truncates"] if found[provider].truncates else []
        if found[provider].compile_s is not None:
            notes.append(f"compiled in {found[provider].compile_s:.1f} s")
        eager = timings.get(bench_compile.eager_twin(provider))  # of a compiled step
        rec.add(
            bench.BENCHMARK,
            provider,
            name,
            timing,
            numel=case.numel,
            nbytes=step_harness.step_bytes(bench, case, found[provider].truncates),
            roofline_gbps=roofline_gbps,
            vs_fused=fused / timing.median,
            vs_mask_mul=mask_mul / timing.median,
            vs_eager=None if eager is None else eager.median / timing.median,
            note="; ".join(notes),
        )


def bench_masks(
    rec: Recorder, bits: int, device: torch.device, config: Settings, flush: Callable[[], object]
) -> None:
    names = [*step_harness.compiled_backends(device), "reference"]
    read, timings = bench_hamming.run(
        bits,
        HAMMING_WINDOW,
        device,
        names,
        warmup=config.warmup,
        reps=config.reps,
        budget_s=config.budget_s,
        flush=flush,
    )
    bool_time = timings[bench_hamming.EARLY_BIRD_BOOL].median
    label = f"{HAMMING_WINDOW} x {bits / (1 << 20):.0f}M bits"
    for provider, timing in timings.items():
        rec.add(
            "hamming_window",
            provider,
            label,
            timing,
            numel=bits,
            nbytes=read[provider],
            roofline_gbps=rec.read_roofline_gbps,
            vs_bool_ne_sum=bool_time / timing.median,
        )


def targets(rec: Recorder, device: torch.device) -> list[dict]:
    """The issue's targets, each with the value measured and whether it is met."""
    fast = step_harness.fast_backend(device)
    if fast is None:
        return [{"target": "WormSGD targets", "met": None, "note": "no compiled backend"}]
    ours = bench_sgd.OURS.format(backend=fast)
    found = []

    def check(target: str, param_set: str, value: float | None, threshold: float) -> None:
        met = None if value is None else value >= threshold
        found.append(
            {
                "target": target,
                "param_set": param_set,
                "value": value,
                "threshold": threshold,
                "met": met,
            }
        )

    for row in rec.rows:
        if row.benchmark == bench_sgd.BENCHMARK and row.provider == ours:
            check(
                "time vs fused torch SGD (speedup >= 1/1.05)",
                row.param_set,
                row.vs_fused,
                1 / 1.05,
            )
            check("speedup vs torch SGD + _foreach_mul_", row.param_set, row.vs_mask_mul, 1.5)
            if row.param_set.startswith("tensor-"):
                check("fraction of the roofline", row.param_set, row.roofline_fraction, 0.85)
        if row.benchmark == bench_sgd.BENCHMARK and row.provider == bench_sgd.FUSED:
            # A roofline is only one if the best torch kernel stays under it.
            check(
                "roofline / fused torch SGD GB/s (>= 1: a valid roofline)",
                row.param_set,
                rec.rooflines[row.param_set] / row.gbps,
                1.0,
            )
        if row.benchmark == "hamming_window" and row.provider == f"hamming_window_{fast}":
            check(
                "hamming_window speedup vs bool (m1 != m2).sum()",
                row.param_set,
                row.vs_bool_ne_sum,
                200,
            )
    return found


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, few repetitions")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument(
        "--skip-compile", action="store_true", help="leave out the torch.compile'd steps"
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    config = settings(args.quick, device)
    info = results.machine()
    rec = Recorder(device, info)
    start = time.perf_counter()
    print(f"{info['cpu']}: {info['threads']} threads, torch {info['torch']}", flush=True)
    for name, status in backends.available().items():
        print(f"  backend {name}: {'yes' if status.available else 'no'} ({status.reason})")
    if info["load_average_1min"] > 0.5:
        print(
            f"  note: load average {info['load_average_1min']:.1f}: other processes share "
            "the cores, expect noisy numbers"
        )

    print("roofline (STREAM) ...", flush=True)
    if device.type == "cpu":
        stream = roofline.Stream(config.stream_numel)
    else:
        stream = roofline.DeviceStream(config.stream_numel, device)
    best = bench_stream(rec, stream, config)
    flush = cache_flusher(device, config.flush_bytes)
    for bench in (bench_sgd, bench_adamw):
        print(f"{bench.BENCHMARK} ...", flush=True)
        for name, shapes in param_sets.for_run(args.quick).items():
            # BERT-base's 3 GB of AdamW state per provider: too slow for a few CPU cores.
            if bench is bench_adamw and name == "bert-base" and device.type == "cpu":
                continue
            bench_step(rec, bench, name, shapes, device, config, stream, best, flush)
    if not args.skip_compile:
        print(f"{bench_compile.BENCHMARK} (compiling first) ...", flush=True)
        for name, shapes in bench_compile.for_run(args.quick).items():
            bench_step(rec, bench_compile, name, shapes, device, config, stream, best, flush)
    print("mask distances ...", flush=True)
    bench_masks(rec, config.hamming_bits, device, config, flush)
    print("threshold and check ...", flush=True)
    threshold_targets = bench_threshold.record(rec, device, config, flush, args.quick)
    print("WORM-gradient penalty vs a training step ...", flush=True)
    bench_penalty.record(rec, device, config, args.quick)

    found = targets(rec, device) + threshold_targets
    print(results.table(rec.rows))
    print("\ntargets (reported, not asserted):")
    for t in found:
        verdict = {True: "met", False: "NOT met", None: "not measured"}[t["met"]]
        value = "" if t.get("value") is None else f"{t['value']:.3f}"
        print(f"  {verdict:<13}{t['target']} · {t.get('param_set', '')}: {value}")
    json_path, csv_path = results.write(rec.rows, info, found, args.out)
    print(f"\nwrote {json_path} and {csv_path} in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
