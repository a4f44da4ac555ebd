"""The Early-Bird threshold, and a whole check, on BERT-base's attention query and key
weights (24 tensors of 768 x 768, fp32: 14.2M elements), as the paper's BERT search has.

Threshold providers (the value at position ``int(total * 0.5)`` of the sorted ``|w|``):

* ``kthvalue``: ``torch.cat`` of the magnitudes, then ``kthvalue`` (how
  ``masks.global_threshold`` did it before ``radix_select``): the named baseline;
* ``radix_select_<backend>``: ``radix_select.kth_magnitudes``, as ``masks`` now does;
* ``torch_sum_read``: ``torch.sum`` over the same tensors. Not a threshold: one read of the
  magnitudes, the floor of any exact selection (its *roofline* column: read time / time).

Check providers (``EarlyBirdSearch.check``: threshold, packed masks, the Hamming distances
to the two older masks of a full window of 3, the stop decision), each reset before every
call to a window holding two masks of other weights, so every timed check is a full one:

* ``check_kthvalue``: with ``masks.global_threshold`` swapped for the ``torch.cat`` +
  ``kthvalue`` one (the check before ``radix_select``);
* ``check_radix_select``: as it is; and ``torch_sum_read`` again, in the same rounds.
"""

from collections.abc import Callable
from unittest import mock

import torch

from benchmarks.timing import Timing, measure
from worm_fast import masks, radix_select
from worm_fast.presets import PAPER_TRANSFORMER
from worm_fast.search import EarlyBirdSearch

KTHVALUE = "kthvalue"
READ_FLOOR = "torch_sum_read"
CHECK_BEFORE = "check_kthvalue"
CHECK = "check_radix_select"


def bert_base_query_key(quick: bool, device: torch.device) -> tuple[str, dict[str, torch.Tensor]]:
    """A label and BERT-base's 12 query and 12 key weights (2 layers of 128 when quick),
    drawn like a trained BERT's (normal, std 0.04)."""
    layers, hidden = (2, 128) if quick else (12, 768)
    generator = torch.Generator(device=device).manual_seed(0)
    weights = {
        f"encoder.layer.{i}.attention.self.{name}.weight": 0.04
        * torch.randn(hidden, hidden, generator=generator, device=device)
        for i in range(layers)
        for name in ("query", "key")
    }
    return f"{2 * layers} x {hidden}x{hidden} fp32", weights


def kthvalue_threshold(tensors, prune_ratio: float, *, backend=None, shards=None) -> torch.Tensor:
    """``masks.global_threshold`` before ``radix_select``: a float32 copy of every
    magnitude, then ``kthvalue`` (one process: ``shards`` is None)."""
    assert shards is None, "the baseline selects in one process"
    magnitudes = torch.cat([t.detach().reshape(-1).abs().float() for t in tensors])
    return magnitudes.kthvalue(int(magnitudes.numel() * prune_ratio) + 1).values


def _search(
    weights: dict[str, torch.Tensor], device: torch.device
) -> tuple[EarlyBirdSearch, Callable[[], None]]:
    """A search whose window holds two masks of other weights, and its reset to that."""
    settings = PAPER_TRANSFORMER.kwargs()
    del settings["representative"]  # the weights are given
    search = EarlyBirdSearch(weights, mode="eb", **settings)
    originals = [w.clone() for w in weights.values()]
    generator = torch.Generator(device=device).manual_seed(1)
    for _ in range(2):
        for w in weights.values():
            w.normal_(0.0, 0.04, generator=generator)
        search.check()
    for w, original in zip(weights.values(), originals):
        w.copy_(original)
    state = search.state_dict()
    return search, lambda: search.load_state_dict(state)


def run(
    quick: bool,
    device: torch.device,
    backend: str | None,
    *,
    warmup: int,
    reps: int,
    budget_s: float | None,
    flush: Callable[[], object],
) -> tuple[str, int, dict[str, dict[str, Timing]]]:
    """The label and element count of the weights, and the timings of the two groups
    (``threshold`` and ``check``), by provider."""
    label, weights = bert_base_query_key(quick, device)
    tensors = list(weights.values())
    numel = sum(t.numel() for t in tensors)
    position = int(numel * PAPER_TRANSFORMER.prune_ratio)

    def radix() -> torch.Tensor:
        return radix_select.kth_magnitudes(tensors, [position], backend=backend)[0]

    def read() -> torch.Tensor:
        return torch.stack([t.sum() for t in tensors])

    expected = kthvalue_threshold(tensors, PAPER_TRANSFORMER.prune_ratio)
    if not torch.equal(radix(), expected):
        raise RuntimeError("radix_select disagrees with kthvalue")
    thresholds = {
        KTHVALUE: lambda: kthvalue_threshold(tensors, PAPER_TRANSFORMER.prune_ratio),
        f"radix_select_{backend or 'auto'}": radix,
        READ_FLOOR: read,
    }
    timings = {
        "threshold": measure(
            thresholds, device=device, warmup=warmup, reps=reps, budget_s=budget_s, flush=flush
        )
    }

    before, reset_before = _search(weights, device)
    after, reset_after = _search(weights, device)

    def check_before() -> None:
        with mock.patch.object(masks, "global_threshold", kthvalue_threshold):
            before.check()

    def prepare() -> None:  # untimed: a full window of other masks, then cold caches
        reset_before()
        reset_after()
        flush()

    prepare()
    check_before()
    after.check()
    made = before.candidate().packed, after.candidate().packed
    if any(not torch.equal(made[0][name], made[1][name]) for name in weights):
        raise RuntimeError("the checks before and after radix_select made different masks")
    checks = {CHECK_BEFORE: check_before, CHECK: after.check, READ_FLOOR: read}
    timings["check"] = measure(
        checks, device=device, warmup=warmup, reps=reps, budget_s=budget_s, flush=prepare
    )
    return label, numel, timings


def record(rec, device: torch.device, config, flush: Callable[[], object], quick: bool) -> list:
    """Runs the benchmark, adds its rows to ``rec`` (``run.Recorder``) and returns the
    issue's targets for a check: <= 30 ms, >= 10x the check before, within 3x of a read."""
    backend = "cpp" if device.type == "cpu" else None
    label, numel, timings = run(
        quick,
        device,
        backend,
        warmup=config.warmup,
        reps=config.reps,
        budget_s=config.budget_s,
        flush=flush,
    )
    nbytes = numel * 4  # one read of the fp32 magnitudes: the least any provider moves
    for group, found in timings.items():
        baseline = found[KTHVALUE if group == "threshold" else CHECK_BEFORE].median
        floor_gbps = nbytes / found[READ_FLOOR].median / 1e9
        for provider, timing in found.items():
            rec.add(
                group,
                provider,
                label,
                timing,
                numel=numel,
                nbytes=nbytes,
                roofline_gbps=floor_gbps,
                vs_kthvalue=baseline / timing.median,
            )
    check = timings["check"]
    ms = check[CHECK].median * 1e3
    speedup = check[CHECK_BEFORE].median / check[CHECK].median
    reads = check[CHECK].median / check[READ_FLOOR].median

    def target(name: str, value: float, threshold: float, met: bool) -> dict:
        return dict(target=name, param_set=label, value=value, threshold=threshold, met=met)

    return [
        target("BERT-base Q/K check, ms (<= 30)", ms, 30.0, ms <= 30.0),
        target("check speedup vs torch.cat + kthvalue (>= 10)", speedup, 10.0, speedup >= 10),
        target("check time / one read of the magnitudes (<= 3)", reads, 3.0, reads <= 3.0),
    ]


def main(argv: list[str] | None = None) -> None:
    """This benchmark alone, with ``benchmarks.run``'s settings and outputs."""
    import argparse
    from pathlib import Path

    from benchmarks import results
    from benchmarks import run as full_run  # imports this module, so not at the top
    from benchmarks.timing import cache_flusher

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--quick", action="store_true", help="small sizes, few repetitions")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    config = full_run.settings(args.quick)
    info = results.machine()
    rec = full_run.Recorder(device, info)
    print(f"{info['cpu']}: {info['threads']} threads, load {info['load_average_1min']:.1f}")
    found = record(rec, device, config, cache_flusher(device, config.flush_bytes), args.quick)
    print(results.table(rec.rows))
    for t in found:
        print(f"  {'met' if t['met'] else 'NOT met':<9}{t['target']}: {t['value']:.3g}")
    json_path, csv_path = results.write(rec.rows, info, found, args.out)
    print(f"wrote {json_path} and {csv_path}")


if __name__ == "__main__":
    main()
