"""EarlyBirdSearch: the EB Train / WORM controller (Algorithm 1 of the paper, DESIGN §3.2),
and the proposal's two other searches (WORM-gradient, WORM-RL).

Per check (once per epoch, or every k steps), in this order: compute the mask of the
representative parameters, push it into the window, compute ``d_max`` / ``d_avg``; if
the window is full and ``d_max < stop_distance`` the search has converged and the newest
mask is the ticket; else if the window is full, the mode is ``worm`` and
``d_avg < stop_distance + trigger_margin``, truncation ``r`` switches on. Then the
optimizer gets the newest mask with the ``r`` now in force, so the training after the
trigger check is already truncated and every later check refreshes the mask.

Mode ``gradient`` stops by the same rule, and its ``penalty()`` is a loss term that
pushes the mask to settle (``worm_fast.penalty``). Mode ``rl`` replaces the rule with a
learned policy that sees the recent distances, the epoch fraction, the training-loss
trend and the candidate's density at every check and decides to continue, stop, or
(when it has that action) switch truncation on (``worm_fast.rl``).
"""

import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, replace

import torch
from torch import nn

from worm_fast import masks as mask_ops
from worm_fast import ops
from worm_fast.penalty import PenaltySettings, soft_mask_constants
from worm_fast.presets import PAPER_CNN
from worm_fast.representative import select as select_representative
from worm_fast.rl.observation import ACTIONS, STOP, TRIGGER, CheckFeatures, ObservationLayout

MODES = ("eb", "truncate", "worm", "gradient", "rl")
# A policy: an observation vector in, an action index (rl.observation.ACTIONS) out.
Policy = Callable[[object], int]


@dataclass(frozen=True)
class CheckRecord:
    """What one check saw and decided. ``d_max``/``d_avg`` are None until two masks exist."""

    epoch: int  # 1-based index of the check
    d_max: float | None
    d_avg: float | None
    r: float  # truncation factor in force after this check
    triggered: bool  # this check switched truncation on
    converged: bool
    window_full: bool


@dataclass
class Ticket:
    """The converged masks: packed (DESIGN §3.1) by representative parameter name."""

    epoch: int
    packed: dict[str, torch.Tensor]
    shapes: dict[str, torch.Size]

    def bool_masks(self) -> dict[str, torch.Tensor]:
        """Bool masks of each parameter's shape, True = kept."""
        return {
            name: ops.unpack_mask(mask, self.shapes[name].numel()).view(self.shapes[name])
            for name, mask in self.packed.items()
        }

    @property
    def density(self) -> float:
        """Fraction of representative elements kept."""
        kept = sum(int(m.sum()) for m in self.bool_masks().values())
        return kept / sum(shape.numel() for shape in self.shapes.values())


class EarlyBirdSearch:
    """Early-Bird ticket search, optionally with WORM gradient truncation.

    Args:
        model_or_params: a model (representative parameters chosen by
            ``representative``), or the representative parameters themselves.
        optimizer: the training optimizer. Modes ``truncate`` and ``worm`` need one with
            ``set_truncation`` (``WormSGD``), and so does a policy with the trigger
            action; modes ``eb``, ``gradient`` and ``rl`` work with any, or None.
        mode: ``eb`` (r stays 1), ``truncate`` (r = truncation from the first check),
            ``worm`` (Algorithm 1: r switches on once ``d_avg`` nears the stop distance),
            ``gradient`` (EB's rule; add ``penalty()`` to the loss), ``rl`` (a learned
            policy decides when to stop).
        prune_ratio: fraction of representative elements pruned (p).
        stop_distance: converge when the window is full and ``d_max`` is below it (s).
        window: masks in the sliding window (l).
        trigger_margin: WORM triggers when ``d_avg < stop_distance + trigger_margin`` (δ).
        truncation: the factor r for pruned elements' gradients once triggered.
        scope: one threshold over all representative parameters (``global``, as the
            original Early-Bird code) or one per tensor (``per_tensor``).
        representative: preset or name patterns, see :mod:`worm_fast.representative`.
        distance_weight, duration_weight, temperature: mode ``gradient``'s penalty
            ``(distance_weight + duration_weight * checks) * D``, D the soft mask's mean
            distance to the window's masks at width ``temperature`` (x the spread of
            ``|w|``); see :mod:`worm_fast.penalty`.
        policy: mode ``rl``: the path of a policy saved by ``worm-fast rl train``, a
            loaded :class:`~worm_fast.rl.policy.StopPolicy`, or None to decide from
            outside with :meth:`act` after each check (as ``worm_fast.rl``'s environment
            does).
        max_checks: mode ``rl``: the checks the search may run at most (the epoch
            fraction the policy sees is checks run / max_checks).

    The defaults are the paper's CNN settings (:data:`worm_fast.presets.PAPER_CNN`);
    ``EarlyBirdSearch(model, opt, **PAPER_TRANSFORMER.kwargs())`` gives its BERT ones.
    """

    def __init__(
        self,
        model_or_params: nn.Module | Iterable[torch.Tensor] | Mapping[str, torch.Tensor],
        optimizer: torch.optim.Optimizer | None = None,
        *,
        mode: str = "worm",
        prune_ratio: float = PAPER_CNN.prune_ratio,
        stop_distance: float = PAPER_CNN.stop_distance,
        window: int = PAPER_CNN.window,
        trigger_margin: float = PAPER_CNN.trigger_margin,
        truncation: float = PAPER_CNN.truncation,
        scope: str = "global",
        representative: str | Iterable[str] = PAPER_CNN.representative,
        backend: str | None = None,
        distance_weight: float = PenaltySettings.distance_weight,
        duration_weight: float = PenaltySettings.duration_weight,
        temperature: float = PenaltySettings.temperature,
        policy: "str | os.PathLike | Policy | None" = None,
        max_checks: int | None = None,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        penalty = PenaltySettings(distance_weight, duration_weight, temperature)
        policy, layout = _load_policy(mode, policy, max_checks)
        actions = getattr(policy, "actions", ())
        needs_truncation = mode in ("truncate", "worm") or len(actions) > TRIGGER
        if needs_truncation and not hasattr(optimizer, "set_truncation"):
            raise TypeError(
                f"mode {mode!r} truncates gradients and needs an optimizer with "
                f"set_truncation (worm_fast.WormSGD), got {type(optimizer).__name__}"
            )
        mask_ops.check_prune_ratio(prune_ratio)
        if scope not in mask_ops.SCOPES:
            raise ValueError(f"scope must be one of {mask_ops.SCOPES}, got {scope!r}")
        if not 0.0 <= truncation <= 1.0:
            raise ValueError(f"truncation must be in [0, 1], got {truncation}")
        if stop_distance <= 0 or trigger_margin < 0:
            raise ValueError(
                f"stop_distance must be > 0 and trigger_margin >= 0, got {stop_distance} "
                f"and {trigger_margin}"
            )
        self.params = select_representative(model_or_params, representative)
        self.optimizer = optimizer
        self.config = dict(
            mode=mode,
            prune_ratio=prune_ratio,
            stop_distance=stop_distance,
            window=window,
            trigger_margin=trigger_margin,
            truncation=truncation,
            scope=scope,
        )
        # Only the new modes add keys, so saved states of the others still load.
        if mode == "gradient":
            self.config.update(asdict(penalty))
        if mode == "rl":
            self.config["max_checks"] = max_checks
        self.penalty_settings = penalty
        # Mode gradient: the soft mask's thresholds and widths, set at every check.
        self.soft_constants: tuple[torch.Tensor, torch.Tensor] | None = None
        self.policy = policy
        self.layout = layout
        self.features: list[CheckFeatures] = []  # mode rl: what each check measured
        self.observation = None  # mode rl: what the policy saw at the last check
        self.backend = backend
        numel = sum(p.numel() for p in self.params.values())
        device = next(iter(self.params.values())).device
        self.window = mask_ops.MaskWindow(window, numel, device)
        self.r = 1.0
        self.triggered_at: int | None = None  # the check that switched truncation on
        self.records: list[CheckRecord] = []
        self.ticket: Ticket | None = None
        self._newest: list[torch.Tensor] = []

    @property
    def converged(self) -> bool:
        return self.ticket is not None

    @property
    def mode(self) -> str:
        return self.config["mode"]

    def check(self, *, train_loss: float | None = None) -> CheckRecord:
        """Run one check of Algorithm 1 and return what it saw and decided.

        ``train_loss``: the mean training loss since the last check; mode ``rl``'s policy
        sees its trend (other modes ignore it).
        """
        if self.converged:
            raise RuntimeError(
                f"the search converged at check {self.ticket.epoch}; its ticket is in .ticket"
            )
        cfg = self.config
        self._newest = mask_ops.compute_masks(
            list(self.params.values()),
            cfg["prune_ratio"],
            scope=cfg["scope"],
            backend=self.backend,
        )
        self.window.push(self._newest)
        if cfg["mode"] == "gradient":
            self.soft_constants = soft_mask_constants(
                list(self.params.values()), cfg["prune_ratio"], scope=cfg["scope"],
                temperature=self.penalty_settings.temperature,
            )  # fmt: skip
        distances = self.window.distances()
        d_max = d_avg = None
        if distances.numel():
            # The one host round trip of a check: the stop / trigger decision.
            d_max, d_avg = torch.stack([distances.max(), distances.mean()]).tolist()

        epoch = len(self.records) + 1
        full = self.window.full
        if cfg["mode"] == "rl":
            record = CheckRecord(epoch, d_max, d_avg, self.r, False, False, full)
            self.records.append(record)
            self._observe(record, train_loss)
            self._hand_masks_to_optimizer()
            if self.policy is not None:
                self.act(self.policy(self.observation))
            return self.records[-1]
        converged = full and d_max < cfg["stop_distance"]
        worm_trigger = (
            cfg["mode"] == "worm"
            and full
            and not converged
            and d_avg < cfg["stop_distance"] + cfg["trigger_margin"]
        )
        if self.triggered_at is None and (cfg["mode"] == "truncate" or worm_trigger):
            self.r, self.triggered_at = cfg["truncation"], epoch
        triggered = self.triggered_at == epoch
        if converged:
            self.ticket = self.candidate()
        self._hand_masks_to_optimizer()

        record = CheckRecord(epoch, d_max, d_avg, self.r, triggered, converged, full)
        self.records.append(record)
        return record

    # -- WORM-gradient ----------------------------------------------------------------

    def penalty(self) -> torch.Tensor:
        """Mode ``gradient``: the term to add to the training loss at every step,
        ``(distance_weight + duration_weight * checks) * D`` (:mod:`worm_fast.penalty`).

        A 0-d tensor on the parameters' device, differentiable in the representative
        parameters; zero (with no gradient) before the first check and once the ticket
        has converged, when there is no mask to settle towards or nothing left to find.
        """
        if self.mode != "gradient":
            raise RuntimeError(
                f"penalty() belongs to mode='gradient'; this search runs mode={self.mode!r}"
            )
        if self.window.count == 0 or self.converged:
            return torch.zeros((), device=self.window.rows.device)
        held = self.window.rows[: min(self.window.count, self.window.length)]
        distance = ops.soft_mask_distance(
            list(self.params.values()), held, *self.soft_constants, backend=self.backend
        )
        return self.penalty_settings.weight(len(self.records)) * distance

    # -- WORM-RL ----------------------------------------------------------------------

    def _observe(self, record: CheckRecord, train_loss: float | None) -> None:
        newest = torch.cat(self._newest)
        kept = ops.hamming_window(torch.zeros_like(newest), newest[None])  # popcount
        density = float(kept) / self.window.numel
        self.features.append(
            CheckFeatures(record.epoch, record.d_max, record.d_avg, train_loss, density)
        )
        if self.layout is not None:
            self.observation = self.layout.observe(self.features, self.config["max_checks"])

    def act(self, action: int) -> CheckRecord:
        """Mode ``rl``: apply a decision about the last check (``rl.observation.ACTIONS``):
        stop (its newest mask becomes the ticket), trigger truncation, or continue.
        Returns the last check's record, updated."""
        if self.mode != "rl":
            raise RuntimeError(f"act() belongs to mode='rl'; this search runs {self.mode!r}")
        if not self.records or self.converged:
            raise RuntimeError("act() decides about the last check: run check() first, "
                               "and not after the search has stopped")  # fmt: skip
        action = int(action)
        if not 0 <= action < len(ACTIONS):
            raise ValueError(f"action must be an index of {ACTIONS}, got {action}")
        record = self.records[-1]
        if action == STOP:
            self.ticket = self.candidate()
            record = replace(record, converged=True)
        elif action == TRIGGER and self.triggered_at is None:
            if not hasattr(self.optimizer, "set_truncation"):
                raise TypeError(
                    "the trigger action truncates gradients and needs an optimizer with "
                    f"set_truncation (worm_fast.WormSGD), got {type(self.optimizer).__name__}"
                )
            self.r, self.triggered_at = self.config["truncation"], record.epoch
            self._hand_masks_to_optimizer()
            record = replace(record, r=self.r, triggered=True)
        self.records[-1] = record
        return record

    def candidate(self) -> Ticket:
        """The newest masks as a ticket: the ticket itself once converged, else the best
        guess so far (for pruning a search that ran out of epochs)."""
        if not self._newest:
            raise RuntimeError("no check has run yet, so there is no mask")
        shapes = {name: p.shape for name, p in self.params.items()}
        packed = {name: m.clone() for name, m in zip(self.params, self._newest)}
        return Ticket(self.window.count, packed, shapes)  # count: checks that made a mask

    def _hand_masks_to_optimizer(self) -> None:
        if self.triggered_at is not None:
            self.optimizer.set_truncation(dict(zip(self.params.values(), self._newest)), self.r)

    # -- state ------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {
            "config": dict(self.config),
            "names": list(self.params),
            "window": self.window.state_dict(),
            "r": self.r,
            "triggered_at": self.triggered_at,
            "records": [asdict(record) for record in self.records],
            "newest": [m.clone() for m in self._newest],
            "ticket": None if self.ticket is None else asdict(self.ticket),
            "features": [asdict(features) for features in self.features],
            "soft_constants": self.soft_constants,
        }

    def load_state_dict(self, state: dict) -> None:
        """Resume an interrupted search; the next check continues exactly where it left off."""
        if state["config"] != self.config or state["names"] != list(self.params):
            raise ValueError(
                "EarlyBirdSearch.load_state_dict: the saved search has a different "
                f"configuration or representative parameters ({state['config']}, "
                f"{len(state['names'])} parameters) than this one ({self.config}, "
                f"{len(self.params)} parameters)"
            )
        self.window.load_state_dict(state["window"])
        self.r = float(state["r"])
        self.triggered_at = state["triggered_at"]
        self.records = [CheckRecord(**record) for record in state["records"]]
        device = next(iter(self.params.values())).device
        self._newest = [m.to(device) for m in state["newest"]]
        self.ticket = None if state["ticket"] is None else Ticket(**state["ticket"])
        self.features = [CheckFeatures(**features) for features in state.get("features", [])]
        constants = state.get("soft_constants")
        self.soft_constants = None if constants is None else tuple(t.to(device) for t in constants)
        if self.features and self.layout is not None:
            self.observation = self.layout.observe(self.features, self.config["max_checks"])
        if self._newest and self.optimizer is not None:
            self._hand_masks_to_optimizer()


def _load_policy(mode: str, policy, max_checks: int | None):
    """(the policy as a callable or None, its observation layout or None), checked."""
    if mode != "rl":
        if policy is not None or max_checks is not None:
            raise ValueError(f"policy and max_checks belong to mode='rl', got mode={mode!r}")
        return None, None
    if isinstance(max_checks, bool) or not isinstance(max_checks, int) or max_checks < 1:
        raise ValueError(
            "mode='rl' needs max_checks, the checks the search may run at most (the policy "
            f"sees the fraction run), as an int >= 1; got {max_checks!r}"
        )
    if isinstance(policy, str | os.PathLike):
        from worm_fast.rl.policy import load_policy  # SB3 only when a file is loaded

        policy = load_policy(policy)
    if policy is not None and not callable(policy):
        raise TypeError(
            "policy must be a path, a worm_fast.rl.policy.StopPolicy or a callable "
            f"observation -> action, got {type(policy).__name__}"
        )
    return policy, getattr(policy, "layout", None) or ObservationLayout()
