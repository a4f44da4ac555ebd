"""One search → prune → retrain run, with the paper's metrics.

Search: train an epoch, evaluate, run one ``EarlyBirdSearch.check`` (Algorithm 1),
until the ticket converges or ``max_epochs`` pass. Prune: apply the ticket (unstructured
masks as the paper, or structured channel removal). Retrain: plain SGD for
``retrain_epochs``. Every epoch becomes a row handed to ``on_row`` as soon as it ends,
so a caller can persist results of finished epochs if the run is interrupted.
"""

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch

from worm_fast import prune
from worm_fast.data import load_dataset, make_loader
from worm_fast.models import build_model
from worm_fast.optim import WormSGD
from worm_fast.search import EarlyBirdSearch
from worm_fast.train import evaluate, train_epoch

PRUNE_METHODS = ("unstructured", "structured")


@dataclass
class RunConfig:
    """Everything that determines a run. Defaults: the paper's CNN settings."""

    model: str = "resnet20"
    width: float = 1.0
    dataset: str = "mnist"
    data_dir: str | None = None
    train_subset: int | None = None
    test_subset: int | None = None
    batch_size: int = 128
    lr: float = 0.01  # held constant, as in the paper
    momentum: float = 0.9
    weight_decay: float = 1e-4
    max_epochs: int = 30  # N of Algorithm 1
    retrain_epochs: int = 5
    mode: str = "worm"
    prune_ratio: float = 0.5
    stop_distance: float = 0.1
    window: int = 5
    trigger_margin: float = 0.05
    truncation: float = 3e-3
    scope: str = "global"
    prune: str = "unstructured"
    seed: int = 0
    device: str = "cpu"
    backend: str = "auto"

    def __post_init__(self) -> None:
        if self.prune not in PRUNE_METHODS:
            raise ValueError(f"prune must be one of {PRUNE_METHODS}, got {self.prune!r}")
        for name in ("max_epochs", "retrain_epochs", "batch_size"):
            if getattr(self, name) < (0 if name == "retrain_epochs" else 1):
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")


@dataclass
class RunResult:
    config: dict
    rows: list[dict] = field(default_factory=list)  # one per epoch (and one for pruning)
    metrics: dict = field(default_factory=dict)
    status: str = "running"  # running | complete | interrupted


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
    torch.manual_seed(config.seed)
    train_set, test_set, info = load_dataset(
        config.dataset, data_dir=config.data_dir, train_subset=config.train_subset,
        test_subset=config.test_subset, seed=config.seed,
    )  # fmt: skip
    train_loader = make_loader(train_set, config.batch_size, shuffle=True, seed=config.seed)
    test_loader = make_loader(test_set, 512, shuffle=False, seed=config.seed)
    model = build_model(
        config.model, num_classes=info.num_classes, in_channels=info.in_channels,
        width=config.width,
    )  # fmt: skip
    if initial_state is not None:
        model.load_state_dict(initial_state)
    model.to(device)

    def sgd(params):
        return WormSGD(
            params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay,
            backend=config.backend,
        )  # fmt: skip

    # -- search ---------------------------------------------------------------------
    optimizer = sgd(model.parameters())
    search = EarlyBirdSearch(
        model, optimizer, mode=config.mode, prune_ratio=config.prune_ratio,
        stop_distance=config.stop_distance, window=config.window,
        trigger_margin=config.trigger_margin, truncation=config.truncation,
        scope=config.scope, backend=None if config.backend == "auto" else config.backend,
    )  # fmt: skip
    search_start = time.perf_counter()
    accuracy = None
    for epoch in range(1, config.max_epochs + 1):
        trained = train_epoch(
            model, train_loader, optimizer, device=device, progress=progress,
            description=f"{config.mode} search epoch {epoch}",
        )  # fmt: skip
        accuracy = evaluate(model, test_loader, device=device)
        record = search.check()
        result.rows.append(
            dict(
                phase="search", epoch=epoch, loss=trained.loss,
                train_accuracy=trained.accuracy, test_accuracy=accuracy,
                d_max=record.d_max, d_avg=record.d_avg, r=record.r,
                triggered=record.triggered, converged=record.converged,
                seconds=trained.seconds, steps=trained.steps,
                batch_losses=trained.batch_losses,
            )
        )  # fmt: skip
        notify(result)
        if record.converged:
            break
    search_seconds = time.perf_counter() - search_start
    pre_pruned = accuracy

    # -- prune ----------------------------------------------------------------------
    # A search that never converged is pruned with its last mask, and says so.
    ticket_masks = search.candidate().bool_masks()
    prune_start = time.perf_counter()
    params_before = sum(p.numel() for p in model.parameters())
    if config.prune == "structured":
        example = test_set[0][0].unsqueeze(0).to(device)
        pruned = prune.prune_channels(model, ticket_masks, example)
        model, params_after = pruned.model, pruned.params_after
    else:
        prune.apply_unstructured(model, ticket_masks)
        params_after = params_before - sum(int((~m).sum()) for m in ticket_masks.values())
    pruned_accuracy = evaluate(model, test_loader, device=device)
    prune_seconds = time.perf_counter() - prune_start
    result.rows.append(
        dict(phase="prune", epoch=0, test_accuracy=pruned_accuracy, seconds=prune_seconds)
    )
    notify(result)

    # -- retrain --------------------------------------------------------------------
    optimizer = sgd(model.parameters())
    retrain_start = time.perf_counter()
    retrain_accuracies = []
    for epoch in range(1, config.retrain_epochs + 1):
        trained = train_epoch(
            model, train_loader, optimizer, device=device, progress=progress,
            description=f"{config.mode} retrain epoch {epoch}",
        )  # fmt: skip
        retrain_accuracies.append(evaluate(model, test_loader, device=device))
        result.rows.append(
            dict(
                phase="retrain", epoch=epoch, loss=trained.loss,
                train_accuracy=trained.accuracy, test_accuracy=retrain_accuracies[-1],
                seconds=trained.seconds, steps=trained.steps,
                batch_losses=trained.batch_losses,
            )
        )  # fmt: skip
        notify(result)
    retrain_seconds = time.perf_counter() - retrain_start

    search_epochs = len([row for row in result.rows if row["phase"] == "search"])
    result.metrics = dict(
        converged=search.converged,
        search_epochs=search_epochs,
        trigger_epoch=search.triggered_at,
        pre_pruned_accuracy=pre_pruned,
        pruned_accuracy=pruned_accuracy,
        retrain_accuracy_1=retrain_accuracies[0] if retrain_accuracies else None,
        restore_90_epochs=_restore_epochs(pre_pruned, pruned_accuracy, retrain_accuracies),
        search_seconds=search_seconds,
        prune_seconds=prune_seconds,
        retrain_seconds=retrain_seconds,
        total_seconds=search_seconds + prune_seconds + retrain_seconds,
        params_before=params_before,
        params_after=params_after,
    )
    result.status = "complete"
    notify(result)
    return result
