"""One Early-Bird search run one check at a time, with the quality of its candidate
ticket measured on demand: what WORM-RL's recordings and its online environment share.

The run trains on the training data minus a seeded validation split; a ticket's quality
is the validation accuracy of the model pruned with it after a short, fixed retraining
budget (``reward_steps`` optimizer steps on the training split). The test set is never
read. The quality is measured on a copy of the model, inside a forked RNG, so measuring
it does not change the search's own trajectory.
"""

import copy

import torch
from torch.utils.data import Subset

from worm_fast import prune
from worm_fast.experiments.config import RunConfig
from worm_fast.experiments.data import make_loader, random_subset
from worm_fast.experiments.train import evaluate, train_epoch
from worm_fast.experiments.workloads import build_workload, make_optimizer
from worm_fast.rl.observation import CheckFeatures
from worm_fast.search import EarlyBirdSearch

DEFAULT_VALIDATION_FRACTION = 0.1
DEFAULT_REWARD_STEPS = 50


class SearchSession:
    """A WORM-RL search on ``config``'s workload, advanced by :meth:`advance`.

    ``search`` runs mode ``rl`` without a policy: whoever drives the session decides
    (``search.act``) after each check.
    """

    def __init__(
        self,
        config: RunConfig,
        *,
        validation_fraction: float = DEFAULT_VALIDATION_FRACTION,
        reward_steps: int = DEFAULT_REWARD_STEPS,
        initial_state: dict | None = None,
        progress: bool = False,
    ) -> None:
        if not 0 < validation_fraction < 1:
            raise ValueError(f"validation_fraction must be in (0, 1), got {validation_fraction}")
        if isinstance(reward_steps, bool) or not isinstance(reward_steps, int) or reward_steps < 1:
            raise ValueError(f"reward_steps must be an int >= 1, got {reward_steps!r}")
        if config.first_check != "epoch":
            raise ValueError(
                "a WORM-RL session checks after each trained epoch (the policy sees the "
                f"fraction of epochs run); first_check={config.first_check!r} is not supported"
            )
        self.config = config  # its mode is not used: the session's search runs mode rl
        self.reward_steps = reward_steps
        self.progress = progress
        self.device = torch.device(config.device)
        workload = build_workload(config, initial_state=initial_state)
        self.model, self.forward = workload.model, workload.forward
        self.example_input = workload.example_input.to(self.device)
        self.train_set, validation = _split(
            workload.train_loader.dataset, validation_fraction, seed=config.seed
        )
        self.collate_fn = workload.train_loader.collate_fn
        self.train_loader = make_loader(self.train_set, config.batch_size, shuffle=True,
                                        seed=config.seed, collate_fn=self.collate_fn)  # fmt: skip
        self.validation_loader = make_loader(
            validation, workload.eval_loader.batch_size, shuffle=False, seed=config.seed,
            collate_fn=workload.eval_loader.collate_fn,
        )  # fmt: skip
        self.optimizer = make_optimizer(config, self.model.parameters())
        self.search = EarlyBirdSearch(
            self.model, self.optimizer, mode="rl", max_checks=config.max_epochs,
            prune_ratio=config.prune_ratio, stop_distance=config.stop_distance,
            window=config.window, trigger_margin=config.trigger_margin,
            truncation=config.truncation, scope=config.scope, ties=config.ties,
            representative=config.representative,
            backend=None if config.backend == "auto" else config.backend,
        )  # fmt: skip

    @property
    def checks(self) -> int:
        return len(self.search.records)

    @property
    def done(self) -> bool:
        """The search has used its epochs, or was stopped."""
        return self.checks >= self.config.max_epochs or self.search.converged

    def advance(self) -> CheckFeatures:
        """Train one epoch on the training split, then run one check."""
        if self.done:
            raise RuntimeError(f"the search ran its {self.checks} checks; there is no next one")
        trained = train_epoch(
            self.model, self.train_loader, self.optimizer, device=self.device,
            forward=self.forward, progress=self.progress,
            description=f"rl search epoch {self.checks + 1}",
        )  # fmt: skip
        self.search.check(train_loss=trained.loss)
        return self.search.features[-1]

    def ticket_accuracy(self) -> float:
        """Validation accuracy (%) of the model pruned with the newest mask, after
        ``reward_steps`` steps of retraining; the search's model and RNG are untouched."""
        masks = self.search.candidate().bool_masks()
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            model = copy.deepcopy(self.model)
            if self.config.prune == "structured":
                model = prune.prune_channels(model, masks, self.example_input).model
            else:
                prune.apply_unstructured(model, masks)
            steps = self.reward_steps * self.config.batch_size
            subset = random_subset(
                self.train_set, min(steps, len(self.train_set)),
                seed=self.config.seed + self.checks, what="reward samples",
            )  # fmt: skip
            loader = make_loader(subset, self.config.batch_size, shuffle=True,
                                 seed=self.config.seed, collate_fn=self.collate_fn)  # fmt: skip
            train_epoch(model, loader, make_optimizer(self.config, model.parameters()),
                        device=self.device, forward=self.forward)  # fmt: skip
            return evaluate(model, self.validation_loader, device=self.device, forward=self.forward)


def _split(dataset, fraction: float, *, seed: int) -> tuple[Subset, Subset]:
    """(training part, validation part) of ``dataset``, drawn with ``seed``."""
    size = len(dataset)
    held = max(1, round(size * fraction))
    if held >= size:
        raise ValueError(
            f"a validation split of {fraction} leaves no training data ({size} samples)"
        )
    order = torch.randperm(size, generator=torch.Generator().manual_seed(seed)).tolist()
    return Subset(dataset, sorted(order[held:])), Subset(dataset, sorted(order[:held]))
