"""EarlyBirdSearch: the EB Train / WORM controller (Algorithm 1 of the paper, DESIGN §3.2).

Per check (once per epoch, or every k steps), in this order: compute the mask of the
representative parameters, push it into the window, compute ``d_max`` / ``d_avg``; if
the window is full and ``d_max < stop_distance`` the search has converged and the newest
mask is the ticket; else if the window is full, the mode is ``worm`` and
``d_avg < stop_distance + trigger_margin``, truncation ``r`` switches on. Then the
optimizer gets the newest mask with the ``r`` now in force, so the training after the
trigger check is already truncated and every later check refreshes the mask.
"""

from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass

import torch
from torch import nn

from worm_fast import masks as mask_ops
from worm_fast import ops
from worm_fast.presets import PAPER_CNN
from worm_fast.representative import select as select_representative

MODES = ("eb", "truncate", "worm")


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
            ``set_truncation`` (``WormSGD``); mode ``eb`` works with any, or None.
        mode: ``eb`` (r stays 1), ``truncate`` (r = truncation from the first check),
            ``worm`` (Algorithm 1: r switches on once ``d_avg`` nears the stop distance).
        prune_ratio: fraction of representative elements pruned (p).
        stop_distance: converge when the window is full and ``d_max`` is below it (s).
        window: masks in the sliding window (l).
        trigger_margin: WORM triggers when ``d_avg < stop_distance + trigger_margin`` (δ).
        truncation: the factor r for pruned elements' gradients once triggered.
        scope: one threshold over all representative parameters (``global``, as the
            original Early-Bird code) or one per tensor (``per_tensor``).
        representative: preset or name patterns, see :mod:`worm_fast.representative`.

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
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if mode != "eb" and not hasattr(optimizer, "set_truncation"):
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

    def check(self) -> CheckRecord:
        """Run one check of Algorithm 1 and return what it saw and decided."""
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
        distances = self.window.distances()
        d_max = d_avg = None
        if distances.numel():
            # The one host round trip of a check: the stop / trigger decision.
            d_max, d_avg = torch.stack([distances.max(), distances.mean()]).tolist()

        epoch = len(self.records) + 1
        full = self.window.full
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
        if self._newest and self.optimizer is not None:
            self._hand_masks_to_optimizer()
