"""WORM-gradient's cost: the penalty's forward + backward per training step, as a
fraction of the training step it joins, on the demo workload and on BERT-base.

* ``demo-resnet20``: ResNet-20 at quarter width on MNIST-shaped batches of 64 with
  WormSGD (``make demo``), BatchNorm γ as representative parameters, 4 masks held;
* ``bert-base-qk``: BERT-base (random init, sequence classification) with WormAdamW,
  its 24 query / key matrices (14.2M elements) as representative parameters, 3 masks
  held (the transformer window). ``--quick`` runs a tiny BERT instead.

Providers: ``train_step`` (zero_grad, forward, loss, backward, optimizer step, no
penalty); ``penalty_fwd_bwd`` (``search.penalty()`` and its backward, what a training
step adds: the op over the held masks, with the threshold and width its last check set);
``soft_mask_distance_fwd_bwd_<backend>`` (the op alone) for the fast backend and the
pure-torch reference.
"""

from collections.abc import Callable

import torch
from torch import nn

from benchmarks.step_harness import fast_backend
from benchmarks.timing import Timing, measure
from worm_fast import EarlyBirdSearch, WormAdamW, WormSGD, ops
from worm_fast.experiments.models import build_model
from worm_fast.penalty import soft_mask_constants
from worm_fast.profiling import penalty_step_cost

TRAIN_STEP = "train_step"
PENALTY = "penalty_fwd_bwd"
OP = "soft_mask_distance_fwd_bwd_{backend}"


def _demo(device: torch.device, quick: bool):
    model = build_model("resnet20", num_classes=10, in_channels=1, width=0.25).to(device)
    batch = 16 if quick else 64
    inputs = torch.randn(batch, 1, 28, 28, device=device)
    labels = torch.randint(0, 10, (batch,), device=device)
    optimizer = WormSGD(model.parameters(), lr=0.02, momentum=0.9, weight_decay=1e-4)

    def loss() -> torch.Tensor:
        return nn.functional.cross_entropy(model(inputs), labels)

    return model, loss, optimizer, dict(representative="batchnorm", rows=4, window=5)


def _bert(device: torch.device, quick: bool):
    import transformers

    config = transformers.BertConfig()  # BERT-base: 12 layers, hidden 768
    batch, length = (8, 128) if device.type == "cpu" else (32, 128)
    if quick:
        config = transformers.BertConfig(hidden_size=64, num_hidden_layers=2,
                                         num_attention_heads=2, intermediate_size=128)  # fmt: skip
        batch, length = 4, 32
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(config).to(device)
    ids = torch.randint(1, config.vocab_size, (batch, length), device=device)
    labels = torch.randint(0, 2, (batch,), device=device)
    optimizer = WormAdamW(model.parameters(), lr=2e-5)

    def loss() -> torch.Tensor:
        return model(input_ids=ids, labels=labels).loss

    return model, loss, optimizer, dict(representative="attention", rows=3, window=4)


CASES = {"demo-resnet20": _demo, "bert-base-qk": _bert}


def _providers(model, loss, optimizer, case: dict, backends: list[str]):
    """The timed calls, and the search whose penalty they measure."""
    search = EarlyBirdSearch(
        model, optimizer, mode="gradient", window=case["window"], stop_distance=1e-9,
        representative=case["representative"],
    )  # fmt: skip
    for _ in range(case["rows"]):  # the window holds `rows` masks, not yet full
        search.check()
    params = list(search.params.values())
    held = search.window.rows[: case["rows"]]
    thresholds, temperatures = soft_mask_constants(params, 0.5, scope="global", temperature=0.1)

    def train_step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss().backward()
        optimizer.step()

    def penalty() -> None:
        search.penalty().backward()

    def op(backend: str) -> Callable[[], None]:
        def call() -> None:
            ops.soft_mask_distance(
                params, held, thresholds, temperatures, backend=backend
            ).backward()

        return call

    fns = {TRAIN_STEP: train_step, PENALTY: penalty}
    fns.update({OP.format(backend=name): op(name) for name in backends})
    return fns, search


def run(
    device: torch.device,
    backends: list[str],
    *,
    quick: bool,
    warmup: int,
    reps: int,
    budget_s: float | None,
) -> dict[str, tuple[dict, dict[str, Timing]]]:
    """Per case: (what was measured, timings by provider)."""
    found = {}
    for name, build in CASES.items():
        model, loss, optimizer, case = build(device, quick)
        fns, search = _providers(model, loss, optimizer, case, backends)
        numel = search.window.numel
        timings = measure(fns, device=device, warmup=warmup, reps=reps, budget_s=budget_s)
        described = dict(
            numel=numel,
            tensors=len(search.params),
            rows=case["rows"],
            params=sum(p.numel() for p in model.parameters()),
            op_bytes=penalty_step_cost(numel, rows=case["rows"]).bytes,
        )
        found[name] = (described, timings)
    return found


def record(rec, device: torch.device, config, quick: bool) -> None:
    """Measure every case and add its rows to ``rec`` (``benchmarks.run.Recorder``)."""
    fast = fast_backend(device)
    backends = [fast, "reference"] if fast else ["reference"]
    found = run(device, backends, quick=quick, warmup=config.warmup,
                reps=config.reps, budget_s=config.budget_s)  # fmt: skip
    for name, (case, timings) in found.items():
        step = timings[TRAIN_STEP].median
        label = (
            f"{name} ({case['numel']} masked in {case['tensors']} tensors, {case['rows']} masks)"
        )
        for provider, timing in timings.items():
            # Least traffic: the op's reads and gradient writes; a training step at least
            # reads every parameter, writes its gradient, reads both and writes it back.
            parameters = 4 * case["params"] * 4
            rec.add(
                "penalty", provider, label, timing,
                numel=case["numel"] if provider != TRAIN_STEP else case["params"],
                nbytes=parameters if provider == TRAIN_STEP else case["op_bytes"],
                roofline_gbps=None, fraction_of_step=timing.median / step,
            )  # fmt: skip
