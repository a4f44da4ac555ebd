"""``make gpu-check``: build, test and time worm_fast on a GPU, in one command.

``python -m benchmarks.gpu_check [--out DIR] [--quick] [--device cpu] [--rebuild]
[--no-time-limits]``

1. build: ``worm_fast._C`` with its CUDA kernels (nvcc, for this GPU's architecture
   only), unless it was already built with them.
2. test: every test that runs on CUDA tensors (``pytest -m gpu`` over ``tests/ops``,
   ``tests/optim`` and ``tests/backends``): the ``cuda`` and ``triton`` backends against
   the reference backend and the optimizers against ``torch.optim``, on odd sizes and
   every dtype; Triton's GPU-only tests (large tensors, Inductor).
3. bench: ``python -m benchmarks.run --device cuda --skip-compile``: WormSGD and
   WormAdamW on both backends against ``torch.optim.SGD`` / ``AdamW(fused=True)``, mask
   distances, and the HBM roofline (device-to-device copy, triad and dot) timed in the
   same run.
4. ``DIR/gpu_check.json`` (every step's outcome, the tests' counts and failures, the
   benchmark results) and a printed summary; each step's output in ``DIR/<step>.log``.

Each step runs in its own process with a time limit (``LIMITS``), so that the whole
check stays under 8 minutes; no GPU has run it yet, so the limits are estimates, and the
JSON records each step's time. Exit status 0 when every step passed.

Without a GPU it says so and exits 0. ``--device cpu`` runs the same steps on the CPU
instead, all but the hardware: the CUDA build (nvcc needs no GPU), the Triton kernels'
tests in the interpreter and the CUDA build's tests, and the benchmarks on the CPU.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import xml.etree.ElementTree as ElementTree
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

# Not worm_fast: importing it loads worm_fast._C, which the build step may rewrite.

ROOT = Path(__file__).resolve().parents[1]
TEST_DIRS = ("tests/ops", "tests/optim", "tests/backends")
# Seconds per step: 8 minutes in all.
LIMITS = {"build": 150, "test": 210, "bench": 100}


@dataclass
class Step:
    name: str
    command: list[str]
    limit_s: float | None = None  # the step's time limit (None: none)
    status: str = "not run"  # passed | failed | timed out | skipped
    seconds: float = 0.0
    log: str = ""
    details: dict = field(default_factory=dict)


def _run(step: Step, out: Path, env: dict | None = None) -> Step:
    """Run ``step.command`` in the repository within its time limit; output to its log."""
    log = out / f"{step.name}.log"
    step.log = str(log)
    start = time.perf_counter()
    print(f"== {step.name}: {' '.join(step.command)}", flush=True)
    with log.open("w") as file:
        try:
            result = subprocess.run(
                step.command,
                cwd=ROOT,
                env={**os.environ, **(env or {})},
                stdout=file,
                stderr=subprocess.STDOUT,
                timeout=step.limit_s,
            )
            step.status = "passed" if result.returncode == 0 else "failed"
        except subprocess.TimeoutExpired:
            step.status = "timed out"
    step.seconds = round(time.perf_counter() - start, 1)
    print(f"   {step.status} in {step.seconds:.0f} s (log: {log})", flush=True)
    return step


def _extension_has_cuda() -> bool:
    """Whether worm_fast._C is built with CUDA kernels (asked in a fresh process, which
    sees a build made after this one started)."""
    probe = "from worm_fast import _C; print(_C.WITH_CUDA)"
    result = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    return result.returncode == 0 and result.stdout.strip().endswith("1")


def _cuda_home() -> str | None:
    for home in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if home and (Path(home) / "bin" / "nvcc").is_file():
            return home
    nvcc = shutil.which("nvcc")
    return str(Path(nvcc).resolve().parents[1]) if nvcc else None


def build(out: Path, limits: dict, device: torch.device, rebuild: bool) -> Step:
    command = [sys.executable, "setup.py", "-q", "build_ext", "--inplace"]
    step = Step("build", command, limits.get("build"))
    if not rebuild and _extension_has_cuda():
        step.status, step.details["note"] = "skipped", "worm_fast._C already has CUDA kernels"
        print(f"== build: {step.details['note']}", flush=True)
        return step
    cuda_home = _cuda_home()
    if cuda_home is None:
        step.status, step.details["note"] = "failed", "no CUDA toolkit (nvcc): set CUDA_HOME"
        print(f"== build: {step.details['note']}", flush=True)
        return step
    # One architecture: this GPU's (without one, an H100/H200's) keeps the build short.
    major, minor = torch.cuda.get_device_capability(device) if device.type == "cuda" else (9, 0)
    env = {
        "CUDA_HOME": cuda_home,
        "TORCH_CUDA_ARCH_LIST": f"{major}.{minor}",
        "MAX_JOBS": str(os.cpu_count() or 1),
    }
    step.details.update(env)
    _run(step, out, {**env, "WORM_FAST_NO_CUDA": ""})
    if step.status == "passed" and not _extension_has_cuda():
        step.status, step.details["note"] = "failed", "built, but without CUDA kernels"
    return step


def test(out: Path, limits: dict, device: torch.device) -> Step:
    report = out / "tests.xml"
    if device.type == "cuda":
        selection = ["-m", "gpu"]
    else:  # the Triton kernels in the interpreter, and the CUDA build
        selection = ["-m", "not slow and not gpu", "-k", "triton or cuda"]
    workers = min(8, os.cpu_count() or 1)
    parallel = ["-n", str(workers)] if workers > 1 and _has_xdist() else ["-p", "no:xdist"]
    command = [sys.executable, "-m", "pytest", "-q", *parallel, *selection, *TEST_DIRS]
    step = _run(Step("test", [*command, f"--junitxml={report}"], limits.get("test")), out)
    if report.exists():
        step.details = _junit_counts(report)
    return step


def _has_xdist() -> bool:
    try:
        import xdist  # noqa: F401
    except ImportError:
        return False
    return True


def _junit_counts(report: Path) -> dict:
    suite = ElementTree.parse(report).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    failed = []
    for case in suite.iter("testcase"):
        if case.find("failure") is not None or case.find("error") is not None:
            failed.append(f"{case.get('classname')}::{case.get('name')}")
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    return {**counts, "failed": failed}


def bench(out: Path, limits: dict, device: torch.device, quick: bool) -> Step:
    results = out / "bench"
    # Not the torch.compile'd steps: Inductor's compiles would take the step's time limit
    # (the tests compile the optimizers on the GPU; `make bench` times them).
    command = [sys.executable, "-m", "benchmarks.run", "--device", device.type, "--skip-compile"]
    command += ["--out", str(results), *(["--quick"] if quick else [])]
    step = _run(Step("bench", command, limits.get("bench")), out)
    if step.status == "passed":
        step.details = json.loads((results / "results.json").read_text())
    return step


def summary(steps: list[Step]) -> list[str]:
    """The printed summary: each step, the test counts, and each optimizer step's speed
    against torch's fused one and the roofline."""
    lines = [f"{s.name:<6} {s.status:<10} {s.seconds:>6.0f} s" for s in steps]
    details = {s.name: s.details for s in steps}
    counts = details.get("test", {})
    if "tests" in counts:
        lines.append(
            f"tests: {counts['passed']} passed, {counts['failures'] + counts['errors']} failed, "
            f"{counts['skipped']} skipped"
        )
        lines += [f"  FAILED {name}" for name in counts["failed"][:20]]
    results = details.get("bench", {})
    rows = results.get("rows", [])
    ours = [r for r in rows if r["provider"].startswith("worm_") and r["vs_fused"] is not None]
    if ours:
        lines.append("optimizer steps (time of torch's fused step / ours; fraction of roofline):")
    for row in ours:
        fraction = row["roofline_fraction"]
        lines.append(
            f"  {row['benchmark']:<11}{row['param_set']:<12}{row['provider']:<28}"
            f"{row['median_ms']:>9.3f} ms  x{row['vs_fused']:.2f}"
            + ("" if fraction is None else f"  {fraction:.0%}")
        )
    for target in results.get("targets", []):
        verdict = {True: "met", False: "NOT met", None: "not measured"}[target["met"]]
        value = "" if target.get("value") is None else f"{target['value']:.3f}"
        lines.append(
            f"  target {verdict}: {target['target']} {target.get('param_set', '')} {value}"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/gpu_check"))
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--quick", action="store_true", help="benchmarks at small sizes")
    parser.add_argument("--rebuild", action="store_true", help="build even if already built")
    parser.add_argument(
        "--no-time-limits", action="store_true", help="for a slow machine (a CPU rehearsal)"
    )
    args = parser.parse_args(argv)
    limits = {} if args.no_time_limits else LIMITS
    if args.device == "cuda" and not torch.cuda.is_available():
        print(
            "gpu-check: no CUDA device here (torch.cuda.is_available() is False), nothing to "
            "check; `python -m benchmarks.gpu_check --device cpu` runs the same steps on the "
            "CPU"
        )
        return 0
    device = torch.device(args.device)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    steps = [build(out, limits, device, args.rebuild)]
    if steps[0].status in ("passed", "skipped"):
        steps += [test(out, limits, device), bench(out, limits, device, args.quick)]
    machine = {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "device": str(device),
        "seconds": round(time.perf_counter() - start, 1),
    }
    payload = {"machine": machine, "steps": [asdict(s) for s in steps]}
    from worm_fast.files import atomic_write_text  # after the build (see the imports)

    report = atomic_write_text(out / "gpu_check.json", json.dumps(payload, indent=2) + "\n")
    print("\n".join(["", f"gpu-check on {machine['gpu'] or device}:", *summary(steps)]))
    print(f"wrote {report} in {machine['seconds']:.0f} s")
    return 0 if all(s.status in ("passed", "skipped") for s in steps) else 1


if __name__ == "__main__":
    sys.exit(main())
