"""Every number a run reports, and the tables print, on runs whose answers are known.

The pipeline runs for real (search, pruning, retraining, profiling) on a scripted
workload: a tiny CNN whose 8 BatchNorm γ each "training epoch" sets so that the mask
at every check is the script's, evaluations that return the script's accuracies (and
note the model they were given), and a clock that moves only by the script's durations
(10 s per search epoch, 7 s per retrain epoch, 1 s per evaluation)."""

import math
import types
from dataclasses import asdict, dataclass, field

import pytest
import torch
from torch import nn

from worm_fast.experiments import pipeline, report, variants
from worm_fast.experiments.config import RunConfig
from worm_fast.experiments.parallel import SINGLE_PROCESS
from worm_fast.experiments.train import EpochResult, classify_images
from worm_fast.experiments.variants import compare_variants, run_variants
from worm_fast.experiments.workloads import Workload, make_optimizer
from worm_fast.profiling import (
    OpCost,
    adamw_step_cost,
    mask_check_cost,
    penalty_step_cost,
    phases,
    sgd_step_cost,
)
from worm_fast.rl import policy as rl_policy
from worm_fast.rl.observation import CONTINUE, STOP, ObservationLayout
from worm_fast.search import NonFiniteError

CHANNELS = 8  # BatchNorm γ: the representative parameters; p = 0.5 keeps 3 (|γ| > the 5th)
STEPS, TRAIN_SAMPLES, TEST_SAMPLES = 3, 10, 6  # per epoch; counted into the FLOPs
SEARCH_SECONDS, RETRAIN_SECONDS, EVAL_SECONDS = 10.0, 7.0, 1.0


def forward_flops(channels: int) -> int:
    """Model FLOPs of a forward pass of one 1×4×4 image through tiny_cnn: the 3×3 conv
    (2·C outputs of 2×2, 9 multiply-adds each) and the linear layer (2·C·2)."""
    return 2 * channels * 4 * 9 + 2 * channels * 2


def train_step_flops(channels: int) -> int:
    """Forward and backward of one image: the conv's dW, the linear layer's dW and dX."""
    return forward_flops(channels) + 2 * channels * 4 * 9 + 2 * (2 * channels * 2)


# Kept channels at each check; window 2, s = 0.2, s + δ = 0.6: distances 6/8, 2/8 (WORM
# triggers), 0 (the ticket).
SETTLING = [{0, 1, 2}, {4, 5, 6}, {0, 4, 5}, {0, 4, 5}]
NEVER_SETTLING = [{0, 1, 2}, {4, 5, 6}, {0, 1, 2}, {4, 5, 6}, {0, 1, 2}]


def tiny_cnn(channels=CHANNELS) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, channels, 3, bias=False), nn.BatchNorm2d(channels), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, 2),
    )  # fmt: skip


def config(**overrides) -> RunConfig:
    settings = dict(
        model="resnet20_projection", window=2, stop_distance=0.2, trigger_margin=0.4,
        prune_ratio=0.5, max_epochs=6, retrain_epochs=3, lr=0.1, momentum=0.9,
        weight_decay=1e-4,
    )  # fmt: skip
    return RunConfig(**{**settings, **overrides})


@dataclass
class Script:
    """What the workload of one run does: the masks of its checks, the top-1 accuracy of
    each evaluation (top-5: 5 more), and what training and evaluation were handed."""

    masks: list[set[int]]
    search: list[float]  # one per trained search epoch
    pruned: float | None
    retrain: list[float]
    progress: bool = False  # what run() is told
    interrupt: tuple[str, int] | None = None  # Ctrl-C in this (phase, epoch)
    now: float = 0.0
    phase: str = "search"
    evaluated: list[tuple[str, nn.Module]] = field(default_factory=list)
    trained: list[dict] = field(default_factory=list)  # per epoch: what train_epoch got
    workload: Workload | None = None
    config: RunConfig | None = None

    def clock(self) -> float:
        return self.now

    def set_mask(self, model: nn.Module) -> None:
        kept = self.masks.pop(0) or set()  # None: the training diverged
        values = [2.0 + 0.1 * i if i in kept else 0.5 + 0.01 * i for i in range(CHANNELS)]
        if not kept:
            values = [math.nan] * CHANNELS
        with torch.no_grad():
            model[1].weight.copy_(torch.tensor(values))

    def train_epoch(self, model, loader, optimizer, *, device, forward, progress, description,
                    penalty=None, scheduler=None, parallel) -> EpochResult:  # fmt: skip
        assert parallel is SINGLE_PROCESS
        self.phase = "search" if " search " in description else "retrain"
        epoch = int(description.split()[-1])
        assert description == f"{self.config.mode} {self.phase} epoch {epoch}"
        assert loader is self.workload.train_loader and forward is classify_images
        assert device == torch.device("cpu") and progress is self.progress
        assert _held(optimizer) == [id(p) for p in model.parameters()]
        self.trained.append(dict(phase=self.phase, model=model, optimizer=optimizer,
                                 penalty=penalty, scheduler=scheduler))  # fmt: skip
        if self.interrupt == (self.phase, epoch):
            raise KeyboardInterrupt
        if self.phase == "search":
            self.set_mask(model)
        seconds = SEARCH_SECONDS if self.phase == "search" else RETRAIN_SECONDS
        self.now += seconds
        loss = 1.0 / epoch if self.phase == "search" else 0.5 / epoch
        return EpochResult(loss, 50.0 + epoch, seconds, STEPS, [loss] * STEPS)

    def accuracies(self, model, loader, *, device, forward, ks, parallel) -> dict[int, float]:
        assert parallel is SINGLE_PROCESS
        assert loader is self.workload.eval_loader and forward is classify_images
        assert device == torch.device("cpu") and ks == ((1,) if self.config.is_text else (1, 5))
        self.now += EVAL_SECONDS
        if self.phase == "search" and self.search:
            top1 = self.search.pop(0)
        elif self.phase == "search":  # the evaluation right after pruning
            top1, self.phase = self.pruned, "prune"
        else:
            top1 = self.retrain.pop(0)
        self.evaluated.append((self.phase, model))
        return {k: top1 + 5 * (k > 1) for k in ks}


def _held(optimizer) -> list[int]:
    return [id(p) for group in optimizer.param_groups for p in group["params"]]


@pytest.fixture
def scripted(monkeypatch):
    """Runs the pipeline with ``scripts[(mode, seed)]`` as each run's workload."""
    scripts: dict[tuple[str, int], Script] = {}
    current: list[Script] = []

    def build_workload(config, *, initial_state=None, parallel):
        assert parallel is SINGLE_PROCESS
        script = scripts[config.mode, config.seed]
        current[:] = [script]
        torch.manual_seed(config.seed)
        model = tiny_cnn()
        if initial_state is not None:
            model.load_state_dict(initial_state)
        if config.first_check == "init":  # the mask of the check at initialization
            script.set_mask(model)
        train = [(torch.randn(2, 1, 4, 4), torch.tensor([0, 1]))] * STEPS
        evaluation = train[:1]
        example = torch.randn(1, 1, 4, 4)
        script.config = config
        script.workload = Workload(model, train, evaluation, classify_images, example,
                                   TRAIN_SAMPLES, TEST_SAMPLES)  # fmt: skip
        return script.workload

    def delegate(name):
        return lambda *args, **kwargs: getattr(current[0], name)(*args, **kwargs)

    monkeypatch.setattr(pipeline, "build_workload", build_workload)
    monkeypatch.setattr(variants, "initial_model", lambda config: tiny_cnn())
    monkeypatch.setattr(pipeline, "train_epoch", delegate("train_epoch"))
    monkeypatch.setattr(pipeline, "accuracies", delegate("accuracies"))
    monkeypatch.setattr(pipeline, "time", types.SimpleNamespace(perf_counter=delegate("clock")))
    monkeypatch.setattr(phases, "perf_counter", delegate("clock"))
    return scripts


def settling_script(**changes) -> Script:
    values = dict(masks=list(SETTLING), search=[30.0, 40.0, 50.0, 80.0], pruned=60.0,
                  retrain=[70.0, 72.0, 90.0])  # fmt: skip
    return Script(**{**values, **changes})


def step_cost(channels: int, masked: int, momentum=0.9, weight_decay=1e-4) -> OpCost:
    """The optimizer's cost over an epoch (STEPS steps) of tiny_cnn with ``channels``."""
    model = tiny_cnn(channels)
    cost = sgd_step_cost(model.parameters(), momentum=momentum, masked_numel=masked,
                         weight_decay=weight_decay)  # fmt: skip
    return cost * STEPS


def optimizer_flops(channels: int, masked: int) -> int:
    return step_cost(channels, masked).flops


def epoch_flops(channels: int) -> int:
    """Model FLOPs of one epoch: training, then evaluating the test set."""
    return train_step_flops(channels) * TRAIN_SAMPLES + forward_flops(channels) * TEST_SAMPLES


@pytest.mark.parametrize("first_check", ["epoch", "init"])
def test_a_worm_run_reports_what_its_script_says(scripted, first_check):
    # With a check at initialization the same masks come one trained epoch sooner.
    trained = 4 if first_check == "epoch" else 3
    scripted["worm", 0] = settling_script(search=[30.0, 40.0, 50.0, 80.0][-trained:])
    result = pipeline.run(config(first_check=first_check))
    metrics = result.metrics

    assert result.status == "complete"
    assert metrics["converged"] and metrics["search_epochs"] == trained
    assert metrics["trigger_epoch"] == trained - 1 and metrics["trigger_possible"]
    assert (metrics["pre_pruned_accuracy"], metrics["pre_pruned_top5_accuracy"]) == (80.0, 85.0)
    assert (metrics["pruned_accuracy"], metrics["pruned_top5_accuracy"]) == (60.0, 65.0)
    assert (metrics["retrain_accuracy_1"], metrics["retrain_top5_accuracy_1"]) == (70.0, 75.0)
    assert metrics["accuracy_gain_1"] == -10.0  # 70 after one retrain epoch, 80 before
    # Retrain accuracies 70, 72, 90: exactly 0.9 × 80 after two epochs, exactly 90 %
    # after three: a target reached exactly counts.
    assert metrics["restore_target"] == "relative:0.9" and metrics["restore_epochs"] == 2
    assert metrics["restore_90_relative_epochs"] == 2
    assert metrics["restore_90_absolute_epochs"] == 3
    search_seconds = trained * (SEARCH_SECONDS + EVAL_SECONDS)
    retrain_seconds = 3 * (RETRAIN_SECONDS + EVAL_SECONDS)
    assert metrics["search_seconds"] == search_seconds
    assert metrics["prune_seconds"] == EVAL_SECONDS
    assert metrics["retrain_seconds"] == retrain_seconds
    assert metrics["total_seconds"] == search_seconds + EVAL_SECONDS + retrain_seconds
    # Search, pruning and the two retrain epochs that restored the accuracy.
    assert metrics["time_to_restore_seconds"] == (
        search_seconds + EVAL_SECONDS + 2 * (RETRAIN_SECONDS + EVAL_SECONDS)
    )
    # The masks prune elements: 5 of the 8 γ; the ticket keeps the other 3.
    assert (metrics["params_before"], metrics["params_after"]) == (106, 101)
    assert metrics["ticket_density"] == 3 / 8

    # FLOPs: every epoch trains and evaluates; each check's mask ops; the optimizer steps
    # truncate the 8 γ in the epochs after the trigger (none before the last one).
    checks = trained + (first_check == "init")
    masks = mask_check_cost(CHANNELS, window=2).flops * checks
    search = (
        trained * epoch_flops(8)
        + (trained - 1) * optimizer_flops(8, masked=0) + optimizer_flops(8, masked=CHANNELS)
        + masks
    )  # fmt: skip
    prune = forward_flops(8) * TEST_SAMPLES  # masks remove no multiply-adds
    retrain = 3 * (epoch_flops(8) + optimizer_flops(8, masked=0))
    assert metrics["search_flops"] == search
    assert metrics["total_flops"] == search + prune + retrain
    assert all(isinstance(metrics[key], int) for key in ("search_flops", "total_flops"))
    profile = {row["phase"]: row for row in [*result.profile["phases"], result.profile["total"]]}
    assert [profile[name]["steps"] for name in ("search", "prune", "retrain", "total")] == [
        trained * STEPS, 0, 3 * STEPS, (trained + 3) * STEPS,
    ]  # fmt: skip
    assert profile["search"]["mask_flops"] == masks
    assert profile["prune"]["duration"] == EVAL_SECONDS
    truncated = step_cost(8, masked=CHANNELS)
    assert profile["search"]["optimizer_bytes"] == (
        (trained - 1) * step_cost(8, masked=0).bytes + truncated.bytes
    )
    assert profile["retrain"]["optimizer_bytes"] == 3 * step_cost(8, masked=0).bytes

    # Training got the search's optimizer, truncating after the trigger check, then a
    # fresh one for the pruned model; no penalty, no schedule.
    script = scripted["worm", 0]
    searching = [call for call in script.trained if call["phase"] == "search"]
    retraining = [call for call in script.trained if call["phase"] == "retrain"]
    search_optimizer = searching[0]["optimizer"]
    assert all(call["optimizer"] is search_optimizer for call in searching)
    assert search_optimizer.truncation == 3e-3
    assert all(call["optimizer"] is retraining[0]["optimizer"] for call in retraining)
    assert retraining[0]["optimizer"] is not search_optimizer
    assert retraining[0]["optimizer"].truncation == 1.0
    assert all(call["penalty"] is call["scheduler"] is None for call in script.trained)

    # One row per check and epoch, as they happened.
    rows = [(row["phase"], row["epoch"]) for row in result.rows]
    first = [("search", 0)] if first_check == "init" else []
    epochs = [("search", e) for e in range(1, trained + 1)]
    assert rows == first + epochs + [("prune", 0)] + [("retrain", e) for e in (1, 2, 3)]
    searched = [row for row in result.rows if row["phase"] == "search"]
    assert [row["d_max"] for row in searched] == [None, 0.75, 0.25, 0.0]
    assert [row["r"] for row in searched] == [1.0, 1.0, 3e-3, 3e-3]
    assert [row["triggered"] for row in searched] == [False, False, True, False]
    assert [row["converged"] for row in searched] == [False, False, False, True]
    last, pruning, retrained = result.rows[-5], result.rows[-4], result.rows[-1]
    assert last == dict(
        phase="search", epoch=trained, loss=1 / trained, train_accuracy=50.0 + trained,
        test_accuracy=80.0, test_top5_accuracy=85.0, seconds=SEARCH_SECONDS, steps=STEPS,
        batch_losses=[1 / trained] * STEPS, d_max=0.0, d_avg=0.0, r=3e-3, triggered=False,
        converged=True, window_full=True,
    )  # fmt: skip
    assert pruning == dict(phase="prune", epoch=0, test_accuracy=60.0, test_top5_accuracy=65.0)
    assert retrained == dict(
        phase="retrain", epoch=3, loss=0.5 / 3, train_accuracy=53.0, test_accuracy=90.0,
        test_top5_accuracy=95.0, seconds=RETRAIN_SECONDS, steps=STEPS,
        batch_losses=[0.5 / 3] * STEPS,
    )  # fmt: skip


def test_a_structured_run_measures_and_counts_the_pruned_model(scripted):
    script = scripted["worm", 0] = settling_script()
    result = pipeline.run(config(prune="structured"))
    metrics = result.metrics
    # The ticket keeps channels 0, 4, 5: the model left has 3 channels, 41 parameters.
    assert (metrics["params_before"], metrics["params_after"]) == (106, 41)
    pruned_model = next(model for phase, model in script.evaluated if phase == "prune")
    assert sum(p.numel() for p in pruned_model.parameters()) == 41
    assert pruned_model[1].num_features == 3
    assert metrics["pruned_accuracy"] == 60.0
    assert all(model is pruned_model for phase, model in script.evaluated if phase == "retrain")
    assert all(model is script.workload.model for phase, model in script.evaluated
               if phase == "search")  # fmt: skip
    assert script.workload.model is not pruned_model
    # Pruning evaluates the smaller model, and retraining trains it.
    profile = {row["phase"]: row for row in result.profile["phases"]}
    assert profile["prune"]["model_flops"] == forward_flops(3) * TEST_SAMPLES
    assert profile["retrain"]["model_flops"] == 3 * epoch_flops(3)
    assert profile["retrain"]["optimizer_flops"] == 3 * optimizer_flops(3, masked=0)


def test_an_unconverged_eb_run_reports_its_limits(scripted):
    # EB Train never triggers; the masks never settle; retraining never reaches 90 %.
    scripted["eb", 0] = Script(masks=list(NEVER_SETTLING), search=[50.0, 52.0, 55.0, 57.0, 60.0],
                               pruned=20.0, retrain=[61.0, 62.0])  # fmt: skip
    result = pipeline.run(config(mode="eb", max_epochs=5, retrain_epochs=2))
    metrics = result.metrics
    assert not metrics["converged"] and metrics["search_epochs"] == 5
    assert metrics["trigger_epoch"] is None and not metrics["trigger_possible"]
    assert metrics["accuracy_gain_1"] == 1.0  # 61 after one retrain epoch, 60 before
    # 0.9 × 60 = 54 is reached after one retrain epoch, 90 % never.
    assert metrics["restore_epochs"] == 1 and metrics["restore_90_absolute_epochs"] is None
    assert metrics["time_to_restore_seconds"] == 5 * 11.0 + 1.0 + 8.0  # search, prune, 1
    # The last mask, pruned anyway: channels 0–2 kept.
    assert metrics["ticket_density"] == 3 / 8
    searched = [row for row in result.rows if row["phase"] == "search"]
    assert [row["r"] for row in searched] == [1.0] * 5 and not any(r["converged"] for r in searched)


def test_a_run_never_restored_has_no_time_to_restoration(scripted):
    scripted["worm", 0] = settling_script(retrain=[70.0, 71.0, 71.9])
    metrics = pipeline.run(config()).metrics
    assert metrics["restore_epochs"] is None and metrics["time_to_restore_seconds"] is None
    assert metrics["accuracy_gain_1"] == -10.0


def test_the_dense_baseline_reports_no_pruning(scripted):
    scripted["eb", 0] = settling_script(pruned=None)
    result = pipeline.run(config(mode="eb", prune="none"))
    metrics = result.metrics
    assert [row["phase"] for row in result.rows].count("prune") == 0
    assert metrics["pruned_accuracy"] is None and metrics["ticket_density"] is None
    assert metrics["params_before"] == metrics["params_after"] == 106
    assert metrics["prune_seconds"] == 0.0
    # Retraining starts from the pre-pruned accuracy: already at 90 % of it.
    assert metrics["restore_epochs"] == 0
    assert metrics["time_to_restore_seconds"] == metrics["search_seconds"] == 44.0


@pytest.mark.parametrize(
    "target, accuracies, epochs",
    [
        # 0.9 × 62 is 55.800000000000004 as floats: 55.8 % is exactly the target.
        (("relative", 0.9), [55.7, 55.8], 2),
        (("relative", 0.9), [55.79], None),
        (("absolute", 90.0), [89.99, 90.0], 2),
        (("relative", 0.5), [31.0], 1),
    ],
)
def test_a_restoration_target_reached_exactly_counts(target, accuracies, epochs):
    assert pipeline._restore_epochs(62.0, 10.0, accuracies, target) == epochs
    assert pipeline._restore_epochs(62.0, accuracies[-1], [], target) == (
        None if epochs is None else 0
    )


def test_the_tables_print_the_runs_numbers(scripted):
    # Two seeds of EB Train and WORM. Times: a search epoch is 11 s with its evaluation,
    # pruning 1 s, a retrain epoch 8 s.
    scripted["eb", 0] = settling_script()  # pre 80, restored after 2 (72): 44+1+16 = 61 s
    scripted["eb", 1] = settling_script(  # pre 90, restored after 1 (91 ≥ 81): 44+1+8 s
        search=[30.0, 40.0, 50.0, 90.0], retrain=[91.0] * 3
    )
    scripted["worm", 0] = settling_script()  # as EB's seed 0, and triggers at epoch 3
    # Never converges in 5 epochs, never triggers; pre 50, restored after 2 (45 ≥ 45):
    # 55 + 1 + 16 = 72 s.
    scripted["worm", 1] = Script(masks=list(NEVER_SETTLING), search=[50.0] * 5, pruned=20.0,
                                 retrain=[30.0, 45.0, 46.0])  # fmt: skip
    document = run_variants(config(max_epochs=5), compare_variants(), runs=2)
    lines = [line for line in report.paper_table(document).splitlines() if line.startswith("| ")]
    header, *rows = [[cell.strip() for cell in line.strip("| ").split(" | ")] for line in lines]
    cells = {row[0]: dict(zip(header, row)) for row in rows}
    eb, worm = cells["EB Train"], cells["WORM"]

    assert (eb["Ticket Search Epoch Count"], worm["Ticket Search Epoch Count"]) == (
        "4", "≥ 4.5 (1/2 converged)",  # WORM: (4 + 5) / 2, one run cut off at 5
    )  # fmt: skip
    assert (eb["Trigger Epoch"], worm["Trigger Epoch"]) == ("–", "3 (1/2 triggered)")
    assert (eb["Pre-Pruned Acc."], worm["Pre-Pruned Acc."]) == ("85.00%", "65.00%")
    assert (eb["Post-Prune Acc."], worm["Post-Prune Acc."]) == ("60.00%", "40.00%")
    assert (eb["Retrain Acc. after One Epoch"], worm["Retrain Acc. after One Epoch"]) == (
        "80.50%", "50.00%",  # (70 + 91) / 2 and (70 + 30) / 2
    )  # fmt: skip
    assert (eb["90% Restoration Epochs"], worm["90% Restoration Epochs"]) == ("1.5", "2")
    assert eb["Time to Restoration"] == f"{(61 + 53) / 2:.0f}s"
    assert worm["Time to Restoration"] == f"{(61 + 72) / 2:.0f}s"
    assert eb["Total Time"] == "69s"  # 44 + 1 + 24 both times
    assert worm["Total Time"] == f"{(69 + 80) / 2:.0f}s"
    assert (eb["Pre-Pruned Top-5"], worm["Top-5 after One Epoch"]) == ("90.00%", "55.00%")
    assert eb["Runs"] == worm["Runs"] == "2"


# -- what the run hands the search, training, the profiler -----------------------------


def test_the_search_takes_every_setting_of_the_run():
    model = tiny_cnn()
    run_config = config(
        mode="truncate", prune_ratio=0.25, stop_distance=0.3, window=4, trigger_margin=0.1,
        truncation=0.5, scope="per_tensor", ties="exact", first_check="init",
        representative=("0.weight",), backend="reference",
    )  # fmt: skip
    optimizer = make_optimizer(run_config, model.parameters())
    search = pipeline.make_search(run_config, model, optimizer)
    assert search.config == dict(
        mode="truncate", prune_ratio=0.25, stop_distance=0.3, window=4, trigger_margin=0.1,
        truncation=0.5, scope="per_tensor", ties="exact", first_check="init",
    )  # fmt: skip
    assert list(search.params) == ["0.weight"] and search.optimizer is optimizer
    assert search.backend == "reference"
    assert pipeline.make_search(config(), model, optimizer).backend is None  # "auto"


def test_gradient_and_rl_runs_pass_their_own_settings(tmp_path):
    gradient = config(mode="gradient", distance_weight=0.5, duration_weight=0.25,
                      temperature=0.125)  # fmt: skip
    assert pipeline.search_mode_options(gradient) == dict(
        distance_weight=0.5, duration_weight=0.25, temperature=0.125
    )
    policy = tmp_path / "policy.zip"
    policy.write_bytes(b"")
    rl = config(mode="rl", policy=str(policy), max_epochs=7)
    assert pipeline.search_mode_options(rl) == dict(policy=str(policy), max_checks=7)
    assert pipeline.search_mode_options(config()) == {}


def test_a_linear_schedule_spans_each_phase(scripted):
    script = scripted["worm", 0] = settling_script(progress=True)
    pipeline.run(config(lr_schedule="linear", max_epochs=6, retrain_epochs=3), progress=True)
    search = [call for call in script.trained if call["phase"] == "search"]
    retrain = [call for call in script.trained if call["phase"] == "retrain"]
    for calls, epochs in ((search, 6), (retrain, 3)):
        scheduler = calls[0]["scheduler"]
        assert all(call["scheduler"] is scheduler for call in calls)
        assert scheduler.optimizer is calls[0]["optimizer"]
        decay = scheduler.lr_lambdas[0]  # to 0 at the phase's last step, not before
        assert (decay(0), decay(epochs * STEPS)) == (1.0, 0.0) and decay(epochs * STEPS - 1) > 0


def test_a_gradient_run_adds_its_penalty_and_counts_it(scripted):
    script = scripted["gradient", 0] = settling_script()
    result = pipeline.run(config(mode="gradient"))
    metrics = result.metrics
    # EB's rule stops at the fourth check; nothing is truncated.
    assert metrics["search_epochs"] == 4 and metrics["converged"]
    assert metrics["trigger_epoch"] is None and not metrics["trigger_possible"]
    # No penalty before the first mask; then the search's, read over the masks held
    # before each epoch's check: 1, 2, 2 (window 2).
    penalties = [call["penalty"] for call in script.trained if call["phase"] == "search"]
    assert penalties[0] is None
    assert all(penalty.__name__ == "penalty" for penalty in penalties[1:])
    assert penalties[1]().ndim == 0
    mask_flops = 4 * mask_check_cost(CHANNELS, window=2).flops + STEPS * sum(
        penalty_step_cost(CHANNELS, rows=rows).flops for rows in (1, 2, 2)
    )
    assert result.profile["phases"][0]["mask_flops"] == mask_flops


def test_an_rl_run_shows_its_policy_the_training_loss(scripted, monkeypatch, tmp_path):
    seen = []

    def policy(observation):  # continue twice, then stop
        seen.append(observation)
        return STOP if len(seen) == 3 else CONTINUE

    monkeypatch.setattr(rl_policy, "load_policy", lambda path: policy)
    (tmp_path / "policy.zip").write_bytes(b"")
    scripted["rl", 0] = settling_script(masks=list(NEVER_SETTLING), search=[30.0, 40.0, 80.0])
    metrics = pipeline.run(config(mode="rl", policy=str(tmp_path / "policy.zip"))).metrics
    assert metrics["converged"] and metrics["search_epochs"] == 3
    assert metrics["trigger_possible"] and metrics["trigger_epoch"] is None
    # After 3 of at most 6 checks; training losses 1, 1/2, 1/3: a trend of -2/3.
    layout = ObservationLayout()
    fraction, trend = (seen[-1][layout.names.index(name)] for name in ("epoch_fraction",
                                                                        "loss_trend"))  # fmt: skip
    assert (fraction, trend) == pytest.approx((3 / 6, -2 / 3))


@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
def test_a_text_run_reports_top_1_only(scripted, weight_decay):
    scripted["worm", 0] = settling_script()
    result = pipeline.run(config(task="rt-polarity", model=None, representative=("1.weight",),
                                 weight_decay=weight_decay))  # fmt: skip
    metrics = result.metrics
    assert metrics["pre_pruned_accuracy"] == 80.0 and metrics["retrain_accuracy_1"] == 70.0
    for key in ("pre_pruned_top5_accuracy", "pruned_top5_accuracy", "retrain_top5_accuracy_1"):
        assert metrics[key] is None, key
    assert all(row.get("test_top5_accuracy") is None for row in result.rows)
    # A text run fine-tunes with AdamW: its optimizer cost, with or without weight decay.
    model = tiny_cnn()
    cost = adamw_step_cost(model.parameters(), masked_numel=0, weight_decay=weight_decay)
    retrain = result.profile["phases"][-1]
    assert (retrain["optimizer_flops"], retrain["optimizer_bytes"]) == (
        3 * STEPS * cost.flops, 3 * STEPS * cost.bytes,
    )  # fmt: skip


def test_plain_sgd_costs_less_than_sgd_with_momentum_and_decay(scripted):
    scripted["worm", 0] = settling_script()
    result = pipeline.run(config(momentum=0.0, weight_decay=0.0))
    retrain = result.profile["phases"][-1]
    cost = step_cost(8, masked=0, momentum=0.0, weight_decay=0.0)
    assert (retrain["optimizer_flops"], retrain["optimizer_bytes"]) == (
        3 * cost.flops, 3 * cost.bytes,
    )  # fmt: skip
    assert cost.flops < step_cost(8, masked=0).flops


@pytest.mark.parametrize("truncation, possible", [(1.0, False), (0.25, True)])
def test_a_trigger_is_reported_only_where_truncation_can_happen(scripted, truncation, possible):
    # Mode truncate switches r on at the first check; with r = 1 nothing is truncated.
    scripted["truncate", 0] = settling_script()
    result = pipeline.run(config(mode="truncate", truncation=truncation))
    metrics = result.metrics
    assert metrics["trigger_possible"] == possible
    assert metrics["trigger_epoch"] == (1 if possible else None)
    assert [row["r"] for row in result.rows if row["phase"] == "search"] == [truncation] * 4


def test_a_run_without_retraining(scripted):
    scripted["worm", 0] = settling_script(retrain=[])
    metrics = pipeline.run(config(retrain_epochs=0)).metrics
    assert metrics["retrain_seconds"] == 0.0
    for key in ("retrain_accuracy_1", "retrain_top5_accuracy_1", "accuracy_gain_1",
                "restore_epochs", "time_to_restore_seconds"):  # fmt: skip
        assert metrics[key] is None, key
    assert metrics["total_seconds"] == 4 * 11.0 + 1.0


def test_an_absolute_restore_target(scripted):
    scripted["worm", 0] = settling_script()
    # Retrain accuracies 70, 72, 90: 70 % after one epoch (0.9 × 80 = 72 after two).
    metrics = pipeline.run(config(restore_target="absolute:70")).metrics
    assert metrics["restore_target"] == "absolute:70" and metrics["restore_epochs"] == 1


@pytest.mark.parametrize("phase, epoch", [("search", 3), ("retrain", 2)])
def test_an_interrupted_run_publishes_the_finished_epochs(scripted, phase, epoch):
    scripted["worm", 0] = settling_script(interrupt=(phase, epoch))
    published = []
    with pytest.raises(KeyboardInterrupt):
        pipeline.run(config(), on_row=published.append)
    result = published[-1]
    assert result.status == "interrupted"
    finished = [(row["phase"], row["epoch"]) for row in result.rows]
    assert finished[-1] == ((phase, epoch - 1) if phase == "search" else ("retrain", 1))
    assert [row["phase"] for row in result.profile["phases"]][-1] == phase


def test_a_diverged_run_is_published_as_failed(scripted):
    scripted["worm", 0] = settling_script(masks=[{0, 1, 2}, None])
    published = []
    with pytest.raises(NonFiniteError):
        pipeline.run(config(), on_row=published.append)
    result = published[-1]
    assert result.status == "failed" and "NaN or inf" in result.error
    assert [(row["phase"], row["epoch"]) for row in result.rows] == [("search", 1), ("search", 2)]
    assert result.profile["phases"][0]["phase"] == "search"


def test_initial_weights_and_carbon_settings_reach_the_run(scripted):
    script = scripted["worm", 0] = settling_script()
    start = tiny_cnn().state_dict()
    start["0.weight"] = torch.full_like(start["0.weight"], 0.5)
    result = pipeline.run(config(carbon_intensity=400.0, pue=1.5), initial_state=start)
    assert torch.equal(script.trained[0]["model"][0].weight, start["0.weight"])
    assert result.config == asdict(config(carbon_intensity=400.0, pue=1.5))
    total = result.profile["total"]
    assert (total["carbon_intensity"], total["pue"]) == (400.0, 1.5)
