"""One search → prune → retrain run, with the paper's metrics.

Search: train an epoch, evaluate, run one ``EarlyBirdSearch.check`` (Algorithm 1),
until the ticket converges or ``max_epochs`` pass. Prune: apply the ticket (unstructured
masks as the paper, or structured channel removal). Retrain: the same optimizer, without
truncation, for ``retrain_epochs``. CNNs and text models share this loop; what differs
(model, data, how a batch goes through the model, the optimizer) is the run's
:class:`~worm_fast.experiments.workloads.Workload`. Every epoch becomes a row handed to
``on_row`` as soon as it ends, so a caller can persist results of finished epochs if the
run is interrupted. A run whose training diverges (the search raises
:class:`~worm_fast.search.NonFiniteError`) is marked ``failed``, with the reason, before
the error propagates: it never prunes or reports a ticket.
"""

from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch

from worm_fast import prune
from worm_fast.experiments.config import RunConfig
from worm_fast.experiments.train import evaluate, train_epoch
from worm_fast.experiments.workloads import Workload, build_workload, make_optimizer
from worm_fast.profiling import (
    PhaseProfiler,
    adamw_step_cost,
    mask_check_cost,
    model_flops,
    penalty_step_cost,
    sgd_step_cost,
)
from worm_fast.search import EarlyBirdSearch, NonFiniteError

__all__ = ["RunConfig", "RunResult", "SetupError", "check_setup", "run", "search_mode_options"]


class SetupError(ValueError):
    """A run cannot start with its configuration (found before any training)."""


def search_mode_options(config: RunConfig) -> dict:
    """The EarlyBirdSearch arguments of the run's mode beyond Algorithm 1's."""
    if config.mode == "gradient":
        return dict(
            distance_weight=config.distance_weight,
            duration_weight=config.duration_weight,
            temperature=config.temperature,
        )
    if config.mode == "rl":
        return dict(policy=config.policy, max_checks=config.max_epochs)
    return {}


@dataclass
class RunResult:
    config: dict
    rows: list[dict] = field(default_factory=list)  # one per epoch (and one for pruning)
    metrics: dict = field(default_factory=dict)
    status: str = "running"  # running | complete | interrupted | failed
    profile: dict = field(default_factory=dict)  # PhaseProfiler.to_dict()
    error: str | None = None  # why the run failed


def make_search(config: RunConfig, model, optimizer) -> EarlyBirdSearch:
    """The run's Early-Bird / WORM search over ``model`` (settings from ``config``)."""
    return EarlyBirdSearch(
        model, optimizer, mode=config.mode, prune_ratio=config.prune_ratio,
        stop_distance=config.stop_distance, window=config.window,
        trigger_margin=config.trigger_margin, truncation=config.truncation,
        scope=config.scope, ties=config.ties, representative=config.representative,
        backend=None if config.backend == "auto" else config.backend,
        **search_mode_options(config),
    )  # fmt: skip


def check_setup(config: RunConfig, model) -> None:
    """Build the optimizer and search of a run over ``model`` (its initial weights), so
    that a setting the model cannot satisfy (a representative pattern that matches
    nothing, ...) stops before any training, as :class:`SetupError`. Changes nothing."""
    try:
        make_search(config, model, make_optimizer(config, model.parameters()))
    except (ValueError, TypeError) as error:
        raise SetupError(str(error)) from error


def _restore_epochs(pre: float, pruned: float, retrain_accuracies: list[float]) -> int | None:
    """Retrain epochs until accuracy is back to 90 % of the pre-pruned accuracy."""
    target = 0.9 * pre
    if pruned >= target:
        return 0
    for epoch, accuracy in enumerate(retrain_accuracies, start=1):
        if accuracy >= target:
            return epoch
    return None


def run(
    config: RunConfig,
    *,
    initial_state: dict | None = None,
    progress: bool = False,
    on_row: Callable[[RunResult], None] | None = None,
) -> RunResult:
    """Search, prune and retrain once; ``initial_state`` fixes the initialization."""
    result = RunResult(config=asdict(config))
    notify = on_row or (lambda _: None)
    device = torch.device(config.device)
    workload = build_workload(config, initial_state=initial_state)
    model, forward = workload.model, workload.forward
    train_loader, test_loader = workload.train_loader, workload.eval_loader

    profiler = PhaseProfiler(device, carbon_intensity=config.carbon_intensity, pue=config.pue)
    costs = _Costs(workload, config)

    # -- search ---------------------------------------------------------------------
    optimizer = make_optimizer(config, model.parameters())
    search = make_search(config, model, optimizer)
    penalty = search.penalty if config.mode == "gradient" else None
    masked_numel = sum(p.numel() for p in search.params.values())
    accuracy = None
    try:
        for epoch in range(1, config.max_epochs + 1):
            with profiler.phase("search"):
                truncating = optimizer.truncation < 1.0
                trained = train_epoch(
                    model, train_loader, optimizer, device=device, forward=forward,
                    progress=progress, description=f"{config.mode} search epoch {epoch}",
                    penalty=penalty if search.window.count else None,
                )  # fmt: skip
                accuracy = evaluate(model, test_loader, device=device, forward=forward)
                row = dict(
                    phase="search", epoch=epoch, loss=trained.loss,
                    train_accuracy=trained.accuracy, test_accuracy=accuracy,
                    seconds=trained.seconds, steps=trained.steps,
                    batch_losses=trained.batch_losses,
                )  # fmt: skip
                result.rows.append(row)  # kept if the check fails: the epoch did train
                held = min(search.window.count, config.window)  # the masks the penalty read
                record = search.check(train_loss=trained.loss)
                costs.count_epoch(profiler, model, trained.steps,
                                  masked_numel if truncating else 0)  # fmt: skip
                profiler.add_work(mask_ops=mask_check_cost(masked_numel, window=config.window))
                if penalty is not None and held:
                    cost = penalty_step_cost(masked_numel, rows=held) * trained.steps
                    profiler.add_work(mask_ops=cost)
            row.update(
                d_max=record.d_max, d_avg=record.d_avg, r=record.r, triggered=record.triggered,
                converged=record.converged,
            )  # fmt: skip
            _publish(result, profiler, notify)
            if record.converged:
                break
        pre_pruned = accuracy

        # -- prune --------------------------------------------------------------------
        # A search that never converged is pruned with its last mask, and says so.
        ticket_masks = search.candidate().bool_masks()
        params_before = sum(p.numel() for p in model.parameters())
        with profiler.phase("prune"):
            if config.prune == "structured":
                pruned = prune.prune_channels(model, ticket_masks, costs.example)
                model, params_after = pruned.model, pruned.params_after
            else:
                prune.apply_unstructured(model, ticket_masks)
                params_after = params_before - sum(int((~m).sum()) for m in ticket_masks.values())
            pruned_accuracy = evaluate(model, test_loader, device=device, forward=forward)
            costs.count_evaluation(profiler, model)
        result.rows.append(dict(phase="prune", epoch=0, test_accuracy=pruned_accuracy))
        _publish(result, profiler, notify)

        # -- retrain ------------------------------------------------------------------
        optimizer = make_optimizer(config, model.parameters())
        retrain_accuracies = []
        for epoch in range(1, config.retrain_epochs + 1):
            with profiler.phase("retrain"):
                trained = train_epoch(
                    model, train_loader, optimizer, device=device, forward=forward,
                    progress=progress, description=f"{config.mode} retrain epoch {epoch}",
                )  # fmt: skip
                retrain_accuracies.append(
                    evaluate(model, test_loader, device=device, forward=forward)
                )
                costs.count_epoch(profiler, model, trained.steps, 0)
            result.rows.append(
                dict(
                    phase="retrain", epoch=epoch, loss=trained.loss,
                    train_accuracy=trained.accuracy, test_accuracy=retrain_accuracies[-1],
                    seconds=trained.seconds, steps=trained.steps,
                    batch_losses=trained.batch_losses,
                )
            )  # fmt: skip
            _publish(result, profiler, notify)
    except KeyboardInterrupt:
        result.status = "interrupted"
        _publish(result, profiler, notify)
        raise
    except NonFiniteError as error:
        result.status, result.error = "failed", str(error)
        _publish(result, profiler, notify)
        raise

    report = profiler.report()
    seconds = {row.phase: row.duration for row in report}
    flops = {row.phase: row.flops for row in report}
    result.metrics = dict(
        converged=search.converged,
        search_epochs=len([row for row in result.rows if row["phase"] == "search"]),
        trigger_epoch=search.triggered_at,
        pre_pruned_accuracy=pre_pruned,
        pruned_accuracy=pruned_accuracy,
        retrain_accuracy_1=retrain_accuracies[0] if retrain_accuracies else None,
        accuracy_gain_1=retrain_accuracies[0] - pre_pruned if retrain_accuracies else None,
        restore_90_epochs=_restore_epochs(pre_pruned, pruned_accuracy, retrain_accuracies),
        search_seconds=seconds["search"],
        prune_seconds=seconds["prune"],
        retrain_seconds=seconds.get("retrain", 0.0),
        total_seconds=seconds["total"],
        search_flops=flops["search"],
        total_flops=flops["total"],
        params_before=params_before,
        params_after=params_after,
        ticket_density=search.candidate().density,
    )
    result.status = "complete"
    _publish(result, profiler, notify)
    return result


def _publish(result: RunResult, profiler: PhaseProfiler, notify) -> None:
    result.profile = profiler.to_dict()
    notify(result)


class _Costs:
    """Model FLOPs per sample (counted once per architecture on the meta device) and
    optimizer costs, added to the profiler per epoch.

    Text samples are counted at the training set's mean length (padding excluded); the
    optimizer step's FLOPs and bytes come from ``sgd_step_cost`` or ``adamw_step_cost``.
    """

    def __init__(self, workload: Workload, config: RunConfig):
        self.example = workload.example_input.to(config.device)
        self.config = config
        self.train_samples, self.test_samples = workload.train_samples, workload.eval_samples

    def _per_sample(self, model):
        # Two samples: BatchNorm in train mode needs more than one value per channel.
        pair = self.example.expand(2, *self.example.shape[1:])
        count = model_flops(model, pair)
        return count.train_step // 2, count.forward // 2

    def count_epoch(self, profiler, model, steps: int, masked_numel: int) -> None:
        train, _ = self._per_sample(model)
        if self.config.optimizer == "sgd":
            step_cost = sgd_step_cost(
                model.parameters(), momentum=self.config.momentum, masked_numel=masked_numel,
                weight_decay=self.config.weight_decay,
            )  # fmt: skip
        else:
            step_cost = adamw_step_cost(
                model.parameters(), masked_numel=masked_numel,
                weight_decay=self.config.weight_decay,
            )  # fmt: skip
        profiler.add_steps(steps, optimizer_per_step=step_cost)
        profiler.add_work(model_flops=train * self.train_samples)
        self.count_evaluation(profiler, model)

    def count_evaluation(self, profiler, model) -> None:
        _, forward = self._per_sample(model)
        profiler.add_work(model_flops=forward * self.test_samples)
