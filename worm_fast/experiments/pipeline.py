"""One search → prune → retrain run, with the paper's metrics.

Search: (with ``first_check="init"``, one ``EarlyBirdSearch.check`` of the untrained
model first, as the Early-Bird code does) train an epoch, evaluate, run one check
(Algorithm 1), until the ticket converges or ``max_epochs`` pass. Prune: apply the
ticket (unstructured masks as the paper, or structured channel removal; ``none`` for the
dense baseline). Retrain: the same optimizer, without truncation, for
``retrain_epochs``; restoration is counted in retrain epochs to the run's
``restore_target``. CNNs and text models share this loop; what differs
(model, data, how a batch goes through the model, the optimizer) is the run's
:class:`~worm_fast.experiments.workloads.Workload`. Every epoch becomes a row handed to
``on_row`` as soon as it ends, so a caller can persist results of finished epochs if the
run is interrupted. A run whose training diverges (the search raises
:class:`~worm_fast.search.NonFiniteError`) is marked ``failed``, with the reason, before
the error propagates: it never prunes or reports a ticket.

Under torchrun (``parallel``) every rank runs this loop on its part of the data, training
through DistributedDataParallel (:mod:`worm_fast.experiments.parallel`); the search,
the pruning and the evaluation see the unwrapped model, whose parameters DDP keeps
identical on every rank, so every rank takes the same decisions and reports the same
numbers. The ticket's ``ticket_sha256`` lets runs be compared for the same ticket.
"""

import hashlib
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch

from worm_fast import prune
from worm_fast.experiments.config import RunConfig, parse_restore_target
from worm_fast.experiments.parallel import SINGLE_PROCESS, DataParallel
from worm_fast.experiments.train import accuracies, train_epoch
from worm_fast.experiments.workloads import (
    Workload,
    build_workload,
    make_optimizer,
    make_scheduler,
)
from worm_fast.profiling import (
    PhaseProfiler,
    adamw_step_cost,
    mask_check_cost,
    model_flops,
    penalty_step_cost,
    sgd_step_cost,
)
from worm_fast.search import EarlyBirdSearch, NonFiniteError, Ticket, printed_decimal

__all__ = [
    "RunConfig", "RunResult", "SetupError", "check_setup", "run", "search_mode_options",
    "ticket_digest",
]  # fmt: skip


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
        scope=config.scope, ties=config.ties, first_check=config.first_check,
        representative=config.representative,
        backend=None if config.backend == "auto" else config.backend,
        **search_mode_options(config),
    )  # fmt: skip


def ticket_digest(ticket: Ticket) -> str:
    """SHA-256 of a ticket's packed masks (DESIGN §3.1) and names, in name order: equal
    for equal tickets, whatever device or process found them."""
    digest = hashlib.sha256()
    for name in sorted(ticket.packed):
        digest.update(name.encode() + b"\0")
        digest.update(ticket.packed[name].cpu().numpy().tobytes())
    return digest.hexdigest()


def check_setup(config: RunConfig, model) -> None:
    """Build the optimizer and search of a run over ``model`` (its initial weights), so
    that a setting the model cannot satisfy (a representative pattern that matches
    nothing, ...) stops before any training, as :class:`SetupError`. Changes nothing."""
    try:
        make_search(config, model, make_optimizer(config, model.parameters()))
    except (ValueError, TypeError) as error:
        raise SetupError(str(error)) from error


def _restore_epochs(
    pre: float,
    pruned: float,
    retrain_accuracies: list[float],
    target: tuple[str, float] = ("relative", 0.9),
) -> int | None:
    """Retrain epochs until the test accuracy reaches ``target`` (``parse_restore_target``):
    ``relative`` F x the pre-pruned accuracy, or ``absolute`` A %. 0: already there after
    pruning; None: not within the retrain epochs (a censored count).

    Accuracies and F are compared as the decimals they print as, exactly: as floats,
    0.9 x 62.0 is 55.800000000000004, and 55.8 % would miss a target it reaches."""
    kind, value = target
    goal = printed_decimal(value) * (printed_decimal(pre) if kind == "relative" else 1)
    for epoch, accuracy in enumerate([pruned, *retrain_accuracies]):
        if printed_decimal(accuracy) >= goal:
            return epoch
    return None


def _check_columns(record) -> dict:
    """A search row's columns from its check (``CheckRecord``)."""
    return dict(
        d_max=record.d_max, d_avg=record.d_avg, r=record.r, triggered=record.triggered,
        converged=record.converged, window_full=record.window_full,
    )  # fmt: skip


def run(
    config: RunConfig,
    *,
    initial_state: dict | None = None,
    progress: bool = False,
    on_row: Callable[[RunResult], None] | None = None,
    parallel: DataParallel = SINGLE_PROCESS,
) -> RunResult:
    """Search, prune and retrain once; ``initial_state`` fixes the initialization;
    ``parallel``: this process's rank under torchrun.

    With ``config.first_check == "init"`` the search checks the untrained model first
    (a row of epoch 0, without training columns). ``config.prune == "none"`` is the dense
    baseline: no pruning phase, the same retraining. CNN rows and metrics carry top-5
    accuracy beside top-1."""
    result = RunResult(config=asdict(config))
    notify = on_row or (lambda _: None)
    device = torch.device(config.device)
    workload = build_workload(config, initial_state=initial_state, parallel=parallel)
    model, forward = workload.model, workload.forward
    train_loader, test_loader = workload.train_loader, workload.eval_loader
    ks = (1,) if config.is_text else (1, 5)  # top-5 of a 2-class task says nothing

    def test_accuracies(model) -> dict[int, float]:
        return accuracies(
            model, test_loader, device=device, forward=forward, ks=ks, parallel=parallel
        )

    def train(wrapped, optimizer, description: str, **options):
        return train_epoch(
            wrapped, train_loader, optimizer, device=device, forward=forward,
            progress=progress, description=description, parallel=parallel, **options,
        )  # fmt: skip

    profiler = PhaseProfiler(device, carbon_intensity=config.carbon_intensity, pue=config.pue)
    costs = _Costs(workload, config)

    # -- search ---------------------------------------------------------------------
    optimizer = make_optimizer(config, model.parameters())
    scheduler = make_scheduler(
        config, optimizer, epochs=config.max_epochs, steps_per_epoch=len(train_loader)
    )
    search = make_search(config, model, optimizer)
    wrapped = parallel.wrap(model)  # the model as training steps see it: DDP's, under torchrun
    penalty = search.penalty if config.mode == "gradient" else None
    # The optimizer masks whole parameters; the search ranks only their selected elements.
    masked_numel = sum(p.numel() for p in search.params.values())
    check_cost = mask_check_cost(search.window.numel, window=config.window)
    tested: dict[int, float] = {}
    try:
        if config.first_check == "init":  # the Early-Bird code's mask of the initialization
            with profiler.phase("search"):
                record = search.check()
                profiler.add_work(mask_ops=check_cost)
            result.rows.append(dict(phase="search", epoch=0, **_check_columns(record)))
            _publish(result, profiler, notify)
        for epoch in range(1, config.max_epochs + 1):
            with profiler.phase("search"):
                truncating = optimizer.truncation < 1.0
                trained = train(
                    wrapped, optimizer, f"{config.mode} search epoch {epoch}",
                    penalty=penalty if search.window.count else None, scheduler=scheduler,
                )  # fmt: skip
                tested = test_accuracies(model)
                row = dict(
                    phase="search", epoch=epoch, loss=trained.loss,
                    train_accuracy=trained.accuracy, test_accuracy=tested[1],
                    test_top5_accuracy=tested.get(5), seconds=trained.seconds,
                    steps=trained.steps, batch_losses=trained.batch_losses,
                )  # fmt: skip
                result.rows.append(row)  # kept if the check fails: the epoch did train
                held = min(search.window.count, config.window)  # the masks the penalty read
                record = search.check(train_loss=trained.loss)
                costs.count_epoch(profiler, model, trained.steps,
                                  masked_numel if truncating else 0)  # fmt: skip
                profiler.add_work(mask_ops=check_cost)
                if penalty is not None and held:
                    cost = penalty_step_cost(search.window.numel, rows=held) * trained.steps
                    profiler.add_work(mask_ops=cost)
            row.update(_check_columns(record))
            _publish(result, profiler, notify)
            if record.converged:
                break
        pre_pruned = tested

        # -- prune --------------------------------------------------------------------
        # A search that never converged is pruned with its last mask, and says so.
        ticket_masks = search.candidate().bool_masks()
        params_before = sum(p.numel() for p in model.parameters())
        params_after, pruned = params_before, {}
        if config.prune != "none":
            with profiler.phase("prune"):
                if config.prune == "structured":
                    channels = prune.prune_channels(model, ticket_masks, costs.example)
                    model, params_after = channels.model, channels.params_after
                else:
                    prune.apply_unstructured(model, ticket_masks)
                    params_after -= sum(int((~m).sum()) for m in ticket_masks.values())
                pruned = test_accuracies(model)
                costs.count_evaluation(profiler, model)
            result.rows.append(
                dict(phase="prune", epoch=0, test_accuracy=pruned[1],
                     test_top5_accuracy=pruned.get(5))
            )  # fmt: skip
            _publish(result, profiler, notify)

        # -- retrain ------------------------------------------------------------------
        optimizer = make_optimizer(config, model.parameters())
        scheduler = make_scheduler(
            config, optimizer, epochs=config.retrain_epochs, steps_per_epoch=len(train_loader)
        )
        wrapped = parallel.wrap(model)  # pruning changed the parameters DDP holds
        retrained, retrain_wall = [], []
        for epoch in range(1, config.retrain_epochs + 1):
            with profiler.phase("retrain"):
                started = time.perf_counter()
                trained = train(
                    wrapped, optimizer, f"{config.mode} retrain epoch {epoch}",
                    scheduler=scheduler,
                )  # fmt: skip
                retrained.append(test_accuracies(model))
                costs.count_epoch(profiler, model, trained.steps, 0)
                retrain_wall.append(time.perf_counter() - started)
            result.rows.append(
                dict(
                    phase="retrain", epoch=epoch, loss=trained.loss,
                    train_accuracy=trained.accuracy, test_accuracy=retrained[-1][1],
                    test_top5_accuracy=retrained[-1].get(5), seconds=trained.seconds,
                    steps=trained.steps, batch_losses=trained.batch_losses,
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

    result.metrics = _metrics(
        config, search, profiler, pre_pruned, pruned, retrained, retrain_wall,
        params=(params_before, params_after),
    )  # fmt: skip
    result.status = "complete"
    _publish(result, profiler, notify)
    return result


def _metrics(config, search, profiler, pre_pruned, pruned, retrained, retrain_wall, *, params):
    """The run's metrics (paper Tables I–VI and more): accuracies, epochs to the ticket,
    to the trigger and to restoration, times, FLOPs, sizes."""
    report = profiler.report()
    seconds = {row.phase: row.duration for row in report}
    flops = {row.phase: row.flops for row in report}
    pre = pre_pruned[1]
    start = pruned.get(1, pre)  # the dense baseline starts retraining where it was
    top1 = [accuracy[1] for accuracy in retrained]
    target = parse_restore_target(config.restore_target)
    restore = _restore_epochs(pre, start, top1, target)
    pruned_at = seconds["search"] + seconds.get("prune", 0.0)  # when retraining begins
    truncates = config.mode in ("worm", "truncate", "rl") and config.truncation < 1.0
    return dict(
        converged=search.converged,
        search_epochs=search.records[-1].epoch,  # trained epochs, whatever the convention
        # With r = 1 nothing is truncated, so there is no trigger to report.
        trigger_epoch=search.triggered_at if truncates else None,
        trigger_possible=truncates,
        pre_pruned_accuracy=pre,
        pre_pruned_top5_accuracy=pre_pruned.get(5),
        pruned_accuracy=pruned.get(1),
        pruned_top5_accuracy=pruned.get(5),
        retrain_accuracy_1=top1[0] if top1 else None,
        retrain_top5_accuracy_1=retrained[0].get(5) if retrained else None,
        accuracy_gain_1=top1[0] - pre if top1 else None,
        restore_target=config.restore_target,
        restore_epochs=restore,
        restore_90_relative_epochs=_restore_epochs(pre, start, top1, ("relative", 0.9)),
        restore_90_absolute_epochs=_restore_epochs(pre, start, top1, ("absolute", 90.0)),
        search_seconds=seconds["search"],
        prune_seconds=seconds.get("prune", 0.0),
        retrain_seconds=seconds.get("retrain", 0.0),
        total_seconds=seconds["total"],
        # Search, pruning and the retrain epochs up to the target (Table I's "Total Time").
        time_to_restore_seconds=None
        if restore is None
        else pruned_at + sum(retrain_wall[:restore]),
        search_flops=flops["search"],
        total_flops=flops["total"],
        params_before=params[0],
        params_after=params[1],
        ticket_density=None if config.prune == "none" else search.candidate().density,
        # Tensors the ticket prunes whole (layer collapse: retraining cannot restore them).
        collapsed_tensors=None if config.prune == "none" else len(search.candidate().collapsed()),
        ticket_sha256=None if config.prune == "none" else ticket_digest(search.candidate()),
    )


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
