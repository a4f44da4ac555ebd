"""EarlyBirdSearch: the EB Train / WORM controller (Algorithm 1 of the paper, DESIGN §3.2).

Per check (once per epoch, or every k steps), in this order: compute the mask of the
representative parameters, push it into the window, compute ``d_max`` / ``d_avg``; if
the window is full and ``d_max < stop_distance`` the search has converged and the newest
mask is the ticket; else if the window is full, the mode is ``worm`` and
``d_avg < stop_distance + trigger_margin``, truncation ``r`` switches on. Then the
optimizer gets the newest mask with the ``r`` now in force, so the training after the
trigger check is already truncated and every later check refreshes the mask.

Both decisions are made on integer counts: the differing bits of each older mask against
``s · bits`` (and their sum against ``(s + δ) · bits · (l − 1)``), with ``s`` and ``δ``
read as the decimals they are written as, so a distance exactly at ``s`` (or at
``s + δ``) neither stops (nor triggers), as Algorithm 1's strict ``<`` says; a float
comparison would let ``0.1 + 0.05 = 0.15000000000000002`` admit ``d_avg = 0.15``.

When the first mask is taken (``first_check``): ``"epoch"`` (the default) expects a
check after each trained epoch, so check ``k`` is epoch ``k``. ``"init"`` is the
original Early-Bird code's convention: the first check is made on the untrained
initialization (epoch 0), then after each trained epoch, so the window is full after
``l − 1`` trained epochs instead of ``l``. Either way ``CheckRecord.epoch`` and the
ticket's epoch count trained epochs. BatchNorm γ all start at 1, so the Early-Bird rule
prunes every one of them at initialization (as the Early-Bird code's mask does): that
check gives no warning about ties, later ones do.

Mode ``gradient`` stops by the same rule, and its ``penalty()`` is a loss term that
pushes the mask to settle (``worm_fast.penalty``). Mode ``rl`` replaces the rule with a
learned policy that sees the recent distances, the epoch fraction, the training-loss
trend and the candidate's density at every check and decides to continue, stop, or
(when it has that action) switch truncation on (``worm_fast.rl``).

Every check, and the constructor and ``load_state_dict``, first verifies everything it
relies on and changes nothing when it raises: a search never advances its window, ``r``
or trigger and then fails. Representative values that are not finite (a diverged
training) stop the search with :class:`NonFiniteError` instead of a NaN threshold's
all-pruned, "converged" mask.
"""

import math
import numbers
import os
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field, replace
from fractions import Fraction

import torch
from torch import nn

from worm_fast import backends, distributed, ops, radix_select
from worm_fast import masks as mask_ops
from worm_fast.penalty import PenaltySettings, soft_mask_constants
from worm_fast.presets import PAPER_CNN
from worm_fast.representative import representatives as find_representatives
from worm_fast.rl.observation import ACTIONS, STOP, TRIGGER, CheckFeatures, ObservationLayout
from worm_fast.selection import Selection

MODES = ("eb", "truncate", "worm", "gradient", "rl")
# When the first mask is taken: after the first trained epoch, or at initialization (the
# Early-Bird code's convention); see the module docstring.
FIRST_CHECKS = ("epoch", "init")
# A policy: an observation vector in, an action index (rl.observation.ACTIONS) out.
Policy = Callable[[object], int]
# Warn (once) when a mask keeps more than this fraction of the elements (and at least two
# elements) fewer or more than 1 - prune_ratio: ties at the threshold, see compute_masks.
TIE_TOLERANCE = 0.01


class NonFiniteError(FloatingPointError):
    """The representative parameters hold NaN or inf: the training diverged, and no mask
    over them means anything. Raised by :meth:`EarlyBirdSearch.check`."""


def check_settings(
    *,
    mode: str,
    prune_ratio: float,
    stop_distance: float,
    window: int,
    trigger_margin: float,
    truncation: float,
    scope: str = "global",
    ties: str = "early_bird",
    first_check: str = "epoch",
) -> None:
    """Raise ValueError naming the first search setting out of range (Algorithm 1)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if first_check not in FIRST_CHECKS:
        raise ValueError(f"first_check must be one of {FIRST_CHECKS}, got {first_check!r}")
    for name, value in (
        ("prune_ratio", prune_ratio),
        ("stop_distance", stop_distance),
        ("trigger_margin", trigger_margin),
        ("truncation", truncation),
    ):
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise ValueError(f"{name} must be a number, got {value!r}")
    mask_ops.check_prune_ratio(prune_ratio)
    if not (math.isfinite(stop_distance) and stop_distance > 0):
        raise ValueError(f"stop_distance must be a finite number > 0, got {stop_distance}")
    if not (math.isfinite(trigger_margin) and trigger_margin >= 0):
        raise ValueError(f"trigger_margin must be a finite number >= 0, got {trigger_margin}")
    if not 0.0 <= truncation <= 1.0:
        raise ValueError(f"truncation must be in [0, 1], got {truncation}")
    if isinstance(window, bool) or not isinstance(window, numbers.Integral) or window < 2:
        raise ValueError(f"window must be an integer >= 2 (masks compared), got {window!r}")
    if scope not in mask_ops.SCOPES:
        raise ValueError(f"scope must be one of {mask_ops.SCOPES}, got {scope!r}")
    if ties not in mask_ops.TIES:
        raise ValueError(f"ties must be one of {mask_ops.TIES}, got {ties!r}")


@dataclass(frozen=True)
class CheckRecord:
    """What one check saw and decided. ``d_max``/``d_avg`` are None until two masks exist."""

    epoch: int  # trained epochs before the check (0: the check at initialization)
    d_max: float | None
    d_avg: float | None
    r: float  # truncation factor in force after this check
    triggered: bool  # this check switched truncation on
    converged: bool
    window_full: bool


@dataclass
class Ticket:
    """The converged masks: packed (DESIGN §3.1) by representative parameter name.

    A parameter searched in part (a fused attention projection) has a ``selections``
    entry; its packed mask covers the selected elements only, in the parameter's
    row-major order (:mod:`worm_fast.selection`).
    """

    epoch: int  # trained epochs behind the masks
    packed: dict[str, torch.Tensor]
    shapes: dict[str, torch.Size]  # the parameters' shapes
    selections: dict[str, Selection] = field(default_factory=dict)

    def __post_init__(self) -> None:  # saved tickets hold selections as dicts
        self.selections = {
            name: Selection.from_state(selection) for name, selection in self.selections.items()
        }

    def selected_shape(self, name: str) -> torch.Size:
        """The shape of the elements of parameter ``name`` that its mask covers."""
        selection = self.selections.get(name)
        shape = self.shapes[name]
        return shape if selection is None else selection.selected_shape(shape)

    def bool_masks(self) -> dict[str, torch.Tensor]:
        """Bool masks of each parameter's shape, True = kept; elements outside a
        parameter's selection are kept (``prune.apply_unstructured`` leaves them)."""
        masks = {}
        for name, packed in self.packed.items():
            shape = self.selected_shape(name)
            kept = ops.unpack_mask(packed, shape.numel()).view(shape)
            selection = self.selections.get(name)
            masks[name] = kept if selection is None else selection.expand(kept, self.shapes[name])
        return masks

    def collapsed(self) -> list[str]:
        """The parameters whose every searched element the ticket prunes (layer collapse:
        a BatchNorm layer with every γ pruned outputs its bias alone, whatever its input,
        so no signal passes it). Pad bits are zero, so an all-zero packed mask is one."""
        return [name for name, packed in self.packed.items() if not bool(packed.any())]

    @property
    def density(self) -> float:
        """Fraction of representative elements kept."""
        sizes = {name: self.selected_shape(name).numel() for name in self.packed}
        kept = sum(int(ops.unpack_mask(m, sizes[name]).sum()) for name, m in self.packed.items())
        return kept / sum(sizes.values())


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
        ties: ``early_bird`` (elements equal to the threshold are pruned, as the original
            code does; a warning says when that prunes far more than ``prune_ratio``) or
            ``exact`` (exactly that fraction pruned, ties by index); see
            :func:`worm_fast.masks.compute_masks`.
        first_check: ``epoch`` (call :meth:`check` after each trained epoch; check k is
            epoch k) or ``init`` (the Early-Bird code's convention: call it once on the
            untrained initialization, recorded as epoch 0, then after each trained
            epoch). The default stays ``epoch`` so that the natural loop, a check after
            every epoch, is labelled right; the paper presets use ``init``
            (:data:`worm_fast.presets.PAPER_CNN`), so pass ``**PAPER_CNN.kwargs()`` and
            check before the first epoch to follow the paper.
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
        process_group: the ranks that search together (``worm_fast.distributed``). By
            default the default (world) group when torch.distributed is initialized:
            under DDP every check proves with one tiny all-reduce that every rank
            computed the same mask; over FSDP2 (DTensor) parameters the search works on
            each rank's shards (default: their mesh's group). ``None``: no collectives,
            each rank searches alone. Every rank of the group must build the search
            with the same settings (checked here) and call every :meth:`check`.

    ``params`` maps each representative name to its parameter, ``representatives`` to
    the parameter and the elements of it that are searched: all of them, or a fused
    attention projection's query and key rows or columns (:mod:`worm_fast.selection`),
    whose other elements the optimizer never truncates.

    In modes ``truncate`` and ``worm`` (and ``rl`` with the trigger action) the optimizer
    must hold every representative parameter (it truncates their updates). Representative
    parameters must keep their shapes and device while the search runs.

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
        ties: str = "early_bird",
        first_check: str = "epoch",
        representative: str | Iterable[str] = PAPER_CNN.representative,
        backend: str | None = None,
        distance_weight: float = PenaltySettings.distance_weight,
        duration_weight: float = PenaltySettings.duration_weight,
        temperature: float = PenaltySettings.temperature,
        policy: "str | os.PathLike | Policy | None" = None,
        max_checks: int | None = None,
        process_group=distributed.WORLD,
    ) -> None:
        self.config = dict(
            mode=mode,
            prune_ratio=prune_ratio,
            stop_distance=stop_distance,
            window=window,
            trigger_margin=trigger_margin,
            truncation=truncation,
            scope=scope,
            ties=ties,
            first_check=first_check,
        )
        # Each representative: a parameter and the elements of it that are searched.
        self.representatives = find_representatives(model_or_params, representative)
        self.params = {name: part.param for name, part in self.representatives.items()}
        # The ranks agree on the search before anything that one rank alone could refuse.
        self.placement = distributed.placement(self.params, process_group)
        self.placement.agree({
            **self.config, "distance_weight": distance_weight,
            "duration_weight": duration_weight, "temperature": temperature,
            "max_checks": max_checks, "names": list(self.params),
            "shapes": [tuple(p.shape) for p in self.params.values()],
        })  # fmt: skip
        check_settings(**self.config)
        # Exact limits for the integer decisions (see the module docstring).
        self._stop_limit = printed_decimal(stop_distance)
        self._trigger_limit = self._stop_limit + printed_decimal(trigger_margin)
        penalty = PenaltySettings(distance_weight, duration_weight, temperature)
        policy, layout = _load_policy(mode, policy, max_checks)
        needs_truncation = (
            mode in ("truncate", "worm") or len(getattr(policy, "actions", ())) > TRIGGER
        )
        if needs_truncation and not hasattr(optimizer, "set_truncation"):
            raise TypeError(
                f"mode {mode!r} truncates gradients and needs an optimizer with "
                f"set_truncation (worm_fast.WormSGD), got {type(optimizer).__name__}"
            )
        if mode == "gradient" and self.placement.shards is not None:
            raise ValueError(
                "mode 'gradient' adds a loss term over whole parameters; it does not run on "
                "sharded (FSDP2) parameters"
            )
        if self.placement.shards is not None and any(
            part.selection is not None for part in self.representatives.values()
        ):
            raise ValueError(
                "parts of fused weights (a selection of rows or columns) are not searched "
                "over sharded (FSDP2) parameters; name whole query and key weights instead"
            )
        self._held = distributed.holders(model_or_params, self.params)
        self._shapes = {name: p.shape for name, p in self.params.items()}
        self._device = _common_device(self.params)
        if backend is not None:
            backends.resolve(backend, self._device)  # an unknown or unavailable one fails here
        if needs_truncation:
            _check_optimizer_holds(optimizer, self.params, mode)
        self.optimizer = optimizer
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
        # The searched elements (of selections; sharded: every shard's).
        self._numel = sum(part.numel for part in self.representatives.values())
        if self._numel == 0:
            raise ValueError("the representative parameters have no elements")
        local = sum(t.numel() for t in self._tensors())
        self.window = mask_ops.MaskWindow(window, local, self._device)
        self.r = 1.0
        self.triggered_at: int | None = None  # the check that switched truncation on
        self.records: list[CheckRecord] = []
        self.ticket: Ticket | None = None
        self._newest: list[torch.Tensor] = []
        self._warned_about_ties = False

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

        Raises :class:`NonFiniteError` if a representative value is NaN or inf, and
        ValueError if a representative parameter changed shape or device; either way
        the search is left as it was.
        """
        if self.converged:
            raise RuntimeError(
                f"the search converged at check {len(self.records)} (epoch {self.ticket.epoch}); "
                "its ticket is in .ticket"
            )
        self._check_parameters_unchanged()
        cfg = self.config
        with torch.no_grad():  # a gathered selection needs no autograd record here
            tensors = self._tensors()
        try:
            newest = mask_ops.compute_masks(
                tensors, cfg["prune_ratio"], scope=cfg["scope"], ties=cfg["ties"],
                backend=self.backend, shards=self.placement.shards,
            )  # fmt: skip
        except radix_select.NaNMagnitudesError:
            # Replicated ranks join the check's collective first, so that all of them stop.
            self.placement.refuse_non_finite(2 + min(self.window.count, self.window.length - 1))
            raise NonFiniteError(self._non_finite_message()) from None
        row = torch.cat(newest)
        differing = self.window.differing_bits(row)
        finite = torch.stack([torch.isfinite(t.detach()).all() for t in tensors]).all()
        kept = ops.hamming_window(row, torch.zeros_like(row).unsqueeze(0))  # set bits
        # The one host round trip of a check: non-finite flag, kept count, differing bits
        # (over the ranks: summed over shards, or proven equal on replicas).
        non_finite, kept_count, *counts = self.placement.reduce_counts(
            torch.cat([(~finite).reshape(1).long(), kept, differing]), row
        )
        if non_finite:
            raise NonFiniteError(self._non_finite_message())
        soft_constants = self.soft_constants
        if cfg["mode"] == "gradient":
            soft_constants = soft_mask_constants(
                tensors, cfg["prune_ratio"], scope=cfg["scope"],
                temperature=self.penalty_settings.temperature,
            )  # fmt: skip

        numel = self._numel
        d_max = max(counts) / numel if counts else None
        d_avg = sum(counts) / len(counts) / numel if counts else None
        epoch = self._epoch_of(len(self.records))
        full = self.window.count + 1 >= self.window.length
        # Mode rl: the policy decides (below, or from outside through act()).
        converged = cfg["mode"] != "rl" and full and _below(max(counts), numel, self._stop_limit)
        worm_trigger = (
            cfg["mode"] == "worm"
            and full
            and not converged
            and _below(sum(counts), len(counts) * numel, self._trigger_limit)
        )
        r, triggered_at = self.r, self.triggered_at
        if triggered_at is None and (cfg["mode"] == "truncate" or worm_trigger):
            r, triggered_at = cfg["truncation"], epoch
        if triggered_at is not None:  # checked and applied at once, or not at all
            self.optimizer.set_truncation(self._truncation_masks(newest), r, packed=True)

        self.window.push(row)
        self.r, self.triggered_at, self._newest = r, triggered_at, newest
        self.soft_constants = soft_constants
        if converged:
            self._settle()
        record = CheckRecord(epoch, d_max, d_avg, r, triggered_at == epoch, converged, full)
        self.records.append(record)
        if epoch > 0:  # at initialization equal magnitudes are expected (BatchNorm γ = 1)
            self._warn_about_ties(int(kept_count))
        if cfg["mode"] == "rl":
            self._observe(record, train_loss, kept_count / numel)
            if self.policy is not None:
                return self.act(self.policy(self.observation))
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
            self._tensors(), held, *self.soft_constants, backend=self.backend
        )
        return self.penalty_settings.weight(len(self.records)) * distance

    # -- WORM-RL ----------------------------------------------------------------------

    def _observe(self, record: CheckRecord, train_loss: float | None, density: float) -> None:
        check = len(self.records)  # 1-based, whichever convention numbers the epochs
        self.features.append(CheckFeatures(check, record.d_max, record.d_avg, train_loss, density))
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
            self._settle()
            record = replace(record, converged=True)
        elif action == TRIGGER and self.triggered_at is None:
            if not hasattr(self.optimizer, "set_truncation"):
                raise TypeError(
                    "the trigger action truncates gradients and needs an optimizer with "
                    f"set_truncation (worm_fast.WormSGD), got {type(self.optimizer).__name__}"
                )
            r = self.config["truncation"]
            self.optimizer.set_truncation(self._truncation_masks(self._newest), r, packed=True)
            self.r, self.triggered_at = r, record.epoch
            record = replace(record, r=r, triggered=True)
        self.records[-1] = record
        return record

    def candidate(self) -> Ticket:
        """The newest masks as a ticket: the ticket itself once converged, else the best
        guess so far (for pruning a search that ran out of epochs)."""
        if not self._newest:
            raise RuntimeError("no check has run yet, so there is no mask")
        # Sharded: the masks of this rank's shards (distributed.gather_ticket: the whole).
        shapes = {
            name: t.shape
            for name, t in zip(self.params, distributed.local_tensors(self.params.values()))
        }
        packed = {name: m.clone() for name, m in zip(self.params, self._newest)}
        selections = {
            name: part.selection
            for name, part in self.representatives.items()
            if part.selection is not None
        }
        # The trained epochs behind the newest mask (count: checks that made a mask).
        return Ticket(self._epoch_of(self.window.count - 1), packed, shapes, selections)

    def _truncation_masks(self, packed: list[torch.Tensor]) -> dict[torch.Tensor, torch.Tensor]:
        """The optimizer's masks: over each whole parameter, unselected elements kept."""
        return {
            part.param: part.whole_mask(mask, backend=self.backend)
            for part, mask in zip(self.representatives.values(), packed)
        }

    def _epoch_of(self, check_index: int) -> int:
        """The trained epochs before check ``check_index`` (0-based), per ``first_check``."""
        return check_index + (self.config["first_check"] == "epoch")

    def _tensors(self) -> list[torch.Tensor]:
        """The searched elements this process holds, read now, in the representatives'
        order: sharded, its local shards; else each representative's values (views, or
        gathered parts of fused weights)."""
        if self.placement.shards is not None:
            return distributed.local_tensors(self.params.values())
        return [part.values() for part in self.representatives.values()]

    def _check_parameters_unchanged(self) -> None:
        distributed.check_held(self._held)
        for name, param in self.params.items():
            if param.shape != self._shapes[name]:
                raise ValueError(
                    f"representative parameter {name!r} has shape {tuple(param.shape)}, but "
                    f"{tuple(self._shapes[name])} when the search began; the search compares "
                    "masks over fixed parameters"
                )
            if param.device != self._device:
                raise ValueError(
                    f"representative parameter {name!r} is on {param.device}, but the "
                    f"search's masks are on {self._device}; move the model before creating "
                    "the search"
                )

    def _non_finite_message(self) -> str:
        bad = {
            name: (int((~torch.isfinite(t.detach())).sum()), t.numel())
            for name, t in zip(self.params, self._tensors())
        }
        found = [f"{name}: {n} of {total}" for name, (n, total) in bad.items() if n]
        listed = ", ".join(found[:3]) + (f" and {len(found) - 3} more" if len(found) > 3 else "")
        if not found:  # another rank's replica or shard
            listed = "on another rank; none on this one"
        return (
            f"EarlyBirdSearch check {len(self.records) + 1}: representative parameters hold "
            f"NaN or inf values ({listed}); the training diverged (is the learning rate too "
            "large?). No mask was computed from them, the search's state is unchanged and "
            "there is no ticket."
        )

    def _settle(self) -> None:
        """Take the newest masks as the ticket, warning if it collapses a layer."""
        self.ticket = self.candidate()
        if self.placement.shards is None:
            collapsed = self.ticket.collapsed()
        else:  # a rank's shard alone says nothing of its tensor: ask every shard, once
            kept = [bool(mask.any()) for mask in self.ticket.packed.values()]
            kept = self.placement.all_reduce(
                torch.tensor(kept, dtype=torch.int64, device=self.placement.device)
            )
            collapsed = [name for name, k in zip(self.ticket.packed, kept.tolist()) if not k]
        if collapsed:
            listed = ", ".join(collapsed[:3]) + (
                f" and {len(collapsed) - 3} more" if len(collapsed) > 3 else ""
            )
            warnings.warn(
                f"EarlyBirdSearch: the ticket prunes every element of {listed} (layer "
                "collapse): pruned as the ticket says, no signal passes such a layer and "
                "retraining cannot restore it. A lower prune_ratio, scope='per_tensor' or a "
                "wider model avoids it; Ticket.collapsed() lists them.",
                RuntimeWarning,
                stacklevel=3,
            )

    def _warn_about_ties(self, kept: int) -> None:
        if self.config["ties"] != "early_bird" or self._warned_about_ties:
            return
        p = self.config["prune_ratio"]
        sizes = [self._numel] if self.config["scope"] == "global" else [
            part.numel for part in self.representatives.values()
        ]  # fmt: skip
        # Distinct magnitudes keep those above the one at position int(n * p): n - int(n * p)
        # - 1 per threshold (so a per-tensor search over many tensors is not a tie).
        expected = sum(n - int(n * p) - 1 for n in sizes)
        total = self._numel
        if abs(kept - expected) > max(2, math.ceil(TIE_TOLERANCE * total)):
            self._warned_about_ties = True
            warnings.warn(
                f"EarlyBirdSearch check {len(self.records)}: the mask keeps {kept} of {total} "
                f"representative elements ({kept / total:.1%}), not {1 - p:.1%}: many "
                "magnitudes equal the threshold (a check at initialization, frozen "
                "BatchNorm γ, low-precision weights) and the Early-Bird rule prunes them "
                "all. Pass ties='exact' to prune exactly prune_ratio of them (this "
                "warning is given once per search).",
                RuntimeWarning,
                stacklevel=3,
            )

    # -- state ------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """The search's state. Sharded, its tensors are DTensors of a fixed layout, for
        ``torch.distributed.checkpoint`` (see ``distributed.Sharded.state_dict``)."""
        return self.placement.state_dict(
            {
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
        )

    def load_state_dict(self, state: dict) -> None:
        """Resume an interrupted search; the next check continues exactly where it left off.

        Everything saved is checked (and the truncation handed to the optimizer) before
        anything of this search changes.
        """
        state = self.placement.local_state(state)
        # Saved before `ties` and `first_check` existed: their behaviour then.
        config = {"ties": "early_bird", "first_check": "epoch", **state["config"]}
        if config != self.config or state["names"] != list(self.params):
            raise ValueError(
                "EarlyBirdSearch.load_state_dict: the saved search has a different "
                f"configuration or representative parameters ({state['config']}, "
                f"{len(state['names'])} parameters) than this one ({self.config}, "
                f"{len(self.params)} parameters)"
            )
        window = mask_ops.MaskWindow(self.window.length, self.window.numel, self._device)
        window.load_state_dict(state["window"])
        r, triggered_at = state["r"], state["triggered_at"]
        if not 0.0 <= r <= 1.0:
            raise ValueError(f"EarlyBirdSearch.load_state_dict: r must be in [0, 1], got {r}")
        checks = len(state["records"])
        if triggered_at is not None and not (
            isinstance(triggered_at, int)
            and self._epoch_of(0) <= triggered_at <= self._epoch_of(checks - 1)
        ):
            raise ValueError(
                f"EarlyBirdSearch.load_state_dict: triggered_at must be None or the epoch of "
                f"one of the {checks} checks, got {triggered_at!r}"
            )
        try:
            records = [CheckRecord(**record) for record in state["records"]]
            ticket = None if state["ticket"] is None else Ticket(**state["ticket"])
        except TypeError as error:
            message = f"EarlyBirdSearch.load_state_dict: bad record or ticket: {error}"
            raise ValueError(message) from None
        newest = [m.to(self._device) for m in state["newest"]]
        if newest and len(newest) != len(self.params):
            raise ValueError(
                f"EarlyBirdSearch.load_state_dict: {len(newest)} saved masks for "
                f"{len(self.params)} representative parameters"
            )
        for name, tensor, mask in zip(self.params, self._tensors(), newest):
            expected = ops.packed_nbytes(tensor.numel())
            if mask.dtype != torch.uint8 or mask.shape != (expected,):
                raise ValueError(
                    f"EarlyBirdSearch.load_state_dict: the saved mask of {name!r} is "
                    f"{mask.dtype} of shape {tuple(mask.shape)}, expected {expected} packed "
                    "uint8 bytes"
                )
        try:
            features = [CheckFeatures(**features) for features in state.get("features", [])]
        except TypeError as error:
            raise ValueError(f"EarlyBirdSearch.load_state_dict: bad features: {error}") from None
        constants = state.get("soft_constants")
        if constants is not None:
            constants = tuple(t.to(self._device) for t in constants)
        if newest and triggered_at is not None and self.optimizer is not None:
            self.optimizer.set_truncation(self._truncation_masks(newest), r, packed=True)
        self.window, self.r, self.triggered_at = window, float(r), triggered_at
        self.records, self._newest, self.ticket = records, newest, ticket
        self.features, self.soft_constants = features, constants
        if self.features and self.layout is not None:
            self.observation = self.layout.observe(self.features, self.config["max_checks"])


def printed_decimal(value: float) -> Fraction:
    """``value`` as the decimal it prints as: 0.1 is 1/10, not the nearest double."""
    return Fraction(repr(float(value)))


def _below(count: int, total: int, limit: Fraction) -> bool:
    """``count / total < limit``, exactly."""
    return count * limit.denominator < limit.numerator * total


def _common_device(params: Mapping[str, torch.Tensor]) -> torch.device:
    """The one device of the representative parameters (floating point, every one)."""
    devices = {}
    for name, param in params.items():
        if not param.is_floating_point():
            raise TypeError(
                f"representative parameter {name!r} has dtype {param.dtype}; the search "
                "ranks magnitudes of floating-point weights"
            )
        devices.setdefault(param.device, name)
    if len(devices) > 1:
        listed = ", ".join(f"{name!r} on {device}" for device, name in devices.items())
        raise ValueError(f"the representative parameters must be on one device, got {listed}")
    return next(iter(devices))


def _check_optimizer_holds(optimizer, params: Mapping[str, torch.Tensor], mode: str) -> None:
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    missing = [name for name, param in params.items() if id(param) not in held]
    if missing:
        shown = ", ".join(repr(name) for name in missing[:3])
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise ValueError(
            f"mode {mode!r} truncates the updates of the representative parameters through "
            f"the optimizer, which does not hold {shown}{more}; build it over the model's "
            "parameters (e.g. WormSGD(model.parameters(), ...))"
        )


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
