"""What WORM's optimizers share: the truncation masks and factor, and their state.

Subclasses implement ``step``; this class holds ``set_truncation`` /
``clear_truncation`` and carries masks and ``r`` through ``state_dict`` so that a
resumed run continues identically. Every method that can fail checks everything first
and changes nothing when it raises.
"""

from collections.abc import Mapping

import torch
from torch.optim import Optimizer

from worm_fast import backends, ops
from worm_fast.distributed import local_tensor

_STATE_KEY = "worm_truncation"


# What a TruncatingOptimizer holds beside torch's optimizer state.
_TRUNCATION_ATTRIBUTES = (
    "backend", "_step_supports_amp_scaling", "truncation", "_masks", "_mask_shapes",
    "_truncation_tensors",
)  # fmt: skip


class TruncatingOptimizer(Optimizer):
    """An optimizer whose step scales the updates of masked-out elements by ``r``."""

    # The per-element state tensors of a parameter (checked by load_state_dict).
    ELEMENTWISE_STATE: tuple[str, ...] = ()

    def __init__(self, params, defaults: dict, backend: str) -> None:
        if backend != "auto" and backend not in backends.NAMES:
            raise ValueError(
                f"unknown backend {backend!r}; expected 'auto' or one of {backends.NAMES}"
            )
        super().__init__(params, defaults)
        self.backend = None if backend == "auto" else backend
        self._step_supports_amp_scaling = True  # GradScaler hands us grad_scale/found_inf
        self.truncation = 1.0
        self._masks: dict[torch.Tensor, torch.Tensor] = {}
        # Each masked parameter's shape when its mask was set: a step refuses a mask
        # whose parameter has since changed size.
        self._mask_shapes: dict[torch.Tensor, torch.Size] = {}
        # r as a one-element float64 tensor on each device that has masked parameters,
        # which the kernels read: a compiled step takes it as an input, not as a constant,
        # and a new r is written into it, so setting r never compiles the step again. (Not
        # 0-d: Dynamo reads a 0-d float64 CPU tensor as a Python float and traces twice.)
        self._truncation_tensors: dict[torch.device, torch.Tensor] = {}

    def __getstate__(self) -> dict:
        # torch.optim.Optimizer keeps only defaults, state and param_groups in a copy or a
        # pickle; a copy must keep truncating as the original does.
        state = super().__getstate__()
        state.update({name: self.__dict__[name] for name in _TRUNCATION_ATTRIBUTES})
        return state

    # -- truncation -------------------------------------------------------------------

    def set_truncation(
        self, masks: Mapping[torch.Tensor, torch.Tensor], r: float, *, packed: bool = False
    ) -> None:
        """Scale the gradients of pruned elements by ``r`` from the next step on.

        ``masks`` maps parameters of this optimizer to a mask over them (1 = kept): bool
        tensors of the parameter's shape, or with ``packed=True`` packed uint8 masks
        (DESIGN §3.1; ``ops.pack_mask``). The form is never guessed from the values: a
        uint8 tensor of 0/1 values over an 8-element parameter would read as either.
        Parameters without a mask are not truncated. Replaces any earlier masks.
        """
        self._hold(*self._checked(masks, r, packed))

    def clear_truncation(self) -> None:
        """Stop truncating: plain SGD from the next step on."""
        self._hold({}, {}, 1.0)

    @property
    def truncation_masks(self) -> dict[torch.Tensor, torch.Tensor]:
        """The packed masks in force, by parameter (a copy of the mapping); hand them
        back with ``set_truncation(..., packed=True)``."""
        return dict(self._masks)

    def _hold(self, masks: dict, shapes: dict, r: float) -> None:
        """Put checked masks, their parameters' shapes and r in force."""
        self._masks, self._mask_shapes, self.truncation = masks, shapes, r
        for device in {param.device for param in masks}:
            held = self._truncation_tensors.get(device)
            if held is None:
                held = self._truncation_tensors[device] = torch.empty(
                    1, dtype=torch.float64, device=device
                )
            held.fill_(r)

    def _checked(self, masks: Mapping, r: float, packed: bool) -> tuple[dict, dict, float]:
        """What ``set_truncation`` would hold: (packed masks, shapes, r), all checked."""
        if not 0.0 <= r <= 1.0:
            raise ValueError(f"truncation r must be in [0, 1], got {r}")
        held = set(self._all_params())
        result, shapes = {}, {}
        for param, mask in masks.items():
            if param not in held:
                raise ValueError(
                    f"set_truncation: a mask was given for a parameter of shape "
                    f"{tuple(param.shape)} that this optimizer does not hold"
                )
            result[param] = self._as_packed(param, mask, packed)
            shapes[param] = param.shape
        return result, shapes, float(r)

    @staticmethod
    def _as_packed(param: torch.Tensor, mask: torch.Tensor, packed: bool) -> torch.Tensor:
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"set_truncation: masks must be tensors, got {type(mask).__name__}")
        if mask.device != param.device:
            raise ValueError(
                f"set_truncation: mask on {mask.device} for a parameter on {param.device}"
            )
        # A sharded (FSDP2) parameter's mask covers its local shard, as its step does.
        expected = ops.packed_nbytes(local_tensor(param).numel())
        if packed:
            if mask.dtype != torch.uint8 or mask.dim() != 1 or mask.numel() != expected:
                raise ValueError(
                    f"set_truncation: expected a packed uint8 mask of {expected} bytes for a "
                    f"parameter of shape {tuple(param.shape)}, got {mask.dtype} of shape "
                    f"{tuple(mask.shape)}"
                )
            return mask.contiguous()
        if mask.dtype != torch.bool:
            raise ValueError(
                f"set_truncation: expected a bool mask of shape {tuple(param.shape)} (True = "
                f"kept), got {mask.dtype} of shape {tuple(mask.shape)}; a packed uint8 mask "
                f"of {expected} bytes needs packed=True"
            )
        if mask.shape != param.shape:
            raise ValueError(
                f"set_truncation: bool mask of shape {tuple(mask.shape)} for a parameter "
                f"of shape {tuple(param.shape)}"
            )
        return ops.pack_mask(mask, 0.5)

    def _mask_for_step(self, index: int, param: torch.Tensor) -> torch.Tensor | None:
        """The packed mask of ``param`` for this step; refuses one set when the parameter
        had another size (its bits would land on the wrong elements) or was elsewhere."""
        mask = self._masks.get(param)
        if mask is None:
            return None
        if param.shape != self._mask_shapes[param]:
            raise ValueError(
                f"{type(self).__name__}.step: parameter {index} has shape "
                f"{tuple(param.shape)}, but its truncation mask was set for shape "
                f"{tuple(self._mask_shapes[param])}; call set_truncation again"
            )
        if param.device != mask.device:
            raise ValueError(
                f"{type(self).__name__}.step: parameter {index} is on {param.device}, but "
                f"its truncation mask was set on {mask.device}; call set_truncation again"
            )
        return mask

    def _truncation_arguments(self, masks: list, device: torch.device) -> dict:
        """``masks`` and ``truncation_tensor`` of one fused call, given the mask (or None)
        of each of its parameters on ``device``: none at all when no parameter has one.
        Never the float r, which a compiled step would hold as a constant."""
        if all(mask is None for mask in masks):
            return {"masks": [], "truncation_tensor": None}
        return {"masks": masks, "truncation_tensor": self._truncation_tensors[device]}

    # -- state ------------------------------------------------------------------------

    def state_dict(self):
        """``torch.optim``'s state dict plus the truncation factor and masks in force."""
        state = super().state_dict()
        index = {p: i for i, p in enumerate(self._all_params())}
        state[_STATE_KEY] = {
            "r": self.truncation,
            "masks": {index[p]: mask.clone() for p, mask in self._masks.items()},
        }
        return state

    def load_state_dict(self, state_dict) -> None:
        """Load a state dict; one without truncation (e.g. from torch SGD) clears it.

        Everything is checked before anything changes: the truncation masks, and each
        saved per-element state against its parameter's size.
        """
        state_dict = dict(state_dict)
        saved = state_dict.pop(_STATE_KEY, {"r": 1.0, "masks": {}})
        params = self._all_params()
        masks = {}
        for i, mask in saved["masks"].items():
            if not 0 <= int(i) < len(params):
                raise ValueError(f"load_state_dict: truncation mask for unknown param {i}")
            param = params[int(i)]
            masks[param] = mask.to(param.device) if isinstance(mask, torch.Tensor) else mask
        truncation = self._checked(masks, saved["r"], packed=True)
        self._check_saved_state(state_dict)
        super().load_state_dict(state_dict)  # checks the groups before it changes anything
        self._hold(*truncation)

    def _check_saved_state(self, state_dict: dict) -> None:
        """Each saved per-element state has its parameter's number of elements, and each
        saved step count is one number."""
        saved_ids = [i for group in state_dict.get("param_groups", []) for i in group["params"]]
        param_of = dict(zip(saved_ids, self._all_params()))
        for key, state in state_dict.get("state", {}).items():
            param = param_of.get(key)
            if param is None:
                continue  # torch refuses groups that do not match, before any change
            for name in self.ELEMENTWISE_STATE:
                value = state.get(name)
                if value is not None and (
                    not isinstance(value, torch.Tensor) or value.numel() != param.numel()
                ):
                    raise ValueError(
                        f"load_state_dict: saved {name} of param {key} has "
                        f"{getattr(value, 'shape', type(value).__name__)}, the parameter "
                        f"has shape {tuple(param.shape)}"
                    )
            step = state.get("step")
            if step is not None and not (
                isinstance(step, int | float) or torch.as_tensor(step).numel() == 1
            ):
                raise ValueError(f"load_state_dict: saved step of param {key} is not one number")

    def _all_params(self) -> list[torch.Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    def _amp_tensors(self, device: torch.device) -> dict:
        """``grad_scale`` / ``found_inf`` that GradScaler set for this step, on ``device``."""
        return {
            name: None if value is None else value.to(device)
            for name in ("grad_scale", "found_inf")
            for value in [getattr(self, name, None)]
        }

    def _check_grad(self, param: torch.Tensor) -> None:
        if param.grad.is_sparse:
            raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")


def lr_arguments(lr: float | torch.Tensor, device: torch.device) -> dict:
    """``lr`` / ``lr_tensor`` kernel arguments: a CPU tensor lr is read on the host at no
    cost; a device tensor lr is read by the kernel, so the step never syncs. Under
    torch.compile every tensor lr goes to the kernel: reading it would end the graph, and
    a float lr is a constant of the graph (a new value compiles it again)."""
    if isinstance(lr, torch.Tensor):
        if lr.device.type == "cpu" and not torch.compiler.is_compiling():
            return {"lr": lr.item(), "lr_tensor": None}
        return {"lr": 0.0, "lr_tensor": lr.to(device)}
    return {"lr": float(lr), "lr_tensor": None}
