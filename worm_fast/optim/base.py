"""What WORM's optimizers share: the truncation masks and factor, and their state.

Subclasses implement ``step``; this class holds ``set_truncation`` /
``clear_truncation`` and carries masks and ``r`` through ``state_dict`` so that a
resumed run continues identically.
"""

from collections.abc import Mapping

import torch
from torch.optim import Optimizer

from worm_fast import backends, ops

_STATE_KEY = "worm_truncation"


class TruncatingOptimizer(Optimizer):
    """An optimizer whose step scales the updates of masked-out elements by ``r``."""

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

    # -- truncation -------------------------------------------------------------------

    def set_truncation(self, masks: Mapping[torch.Tensor, torch.Tensor], r: float) -> None:
        """Scale the gradients of pruned elements by ``r`` from the next step on.

        ``masks`` maps parameters of this optimizer to a mask over them (1 = kept): a
        bool tensor of the parameter's shape, or a packed uint8 mask (DESIGN §3.1).
        Parameters without a mask are not truncated. Replaces any earlier masks.
        """
        if not 0.0 <= r <= 1.0:
            raise ValueError(f"truncation r must be in [0, 1], got {r}")
        held = {p for group in self.param_groups for p in group["params"]}
        packed = {}
        for param, mask in masks.items():
            if param not in held:
                raise ValueError(
                    f"set_truncation: a mask was given for a parameter of shape "
                    f"{tuple(param.shape)} that this optimizer does not hold"
                )
            packed[param] = self._as_packed(param, mask)
        self._masks = packed
        self.truncation = float(r)

    def clear_truncation(self) -> None:
        """Stop truncating: plain SGD from the next step on."""
        self._masks = {}
        self.truncation = 1.0

    @property
    def truncation_masks(self) -> dict[torch.Tensor, torch.Tensor]:
        """The packed masks in force, by parameter (a copy of the mapping)."""
        return dict(self._masks)

    @staticmethod
    def _as_packed(param: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if mask.device != param.device:
            raise ValueError(
                f"set_truncation: mask on {mask.device} for a parameter on {param.device}"
            )
        if mask.dtype == torch.bool:
            if mask.shape != param.shape:
                raise ValueError(
                    f"set_truncation: bool mask of shape {tuple(mask.shape)} for a parameter "
                    f"of shape {tuple(param.shape)}"
                )
            return ops.pack_mask(mask, 0.5)
        expected = ops.packed_nbytes(param.numel())
        if mask.dtype != torch.uint8 or mask.dim() != 1 or mask.numel() != expected:
            raise ValueError(
                f"set_truncation: expected a bool mask of shape {tuple(param.shape)} or a "
                f"packed uint8 mask of {expected} bytes, got {mask.dtype} of shape "
                f"{tuple(mask.shape)}"
            )
        return mask.contiguous()

    # -- state ------------------------------------------------------------------------

    def state_dict(self):
        """``torch.optim.SGD``'s state dict plus the truncation factor and masks in force."""
        state = super().state_dict()
        index = {p: i for i, p in enumerate(self._all_params())}
        state[_STATE_KEY] = {
            "r": self.truncation,
            "masks": {index[p]: mask.clone() for p, mask in self._masks.items()},
        }
        return state

    def load_state_dict(self, state_dict) -> None:
        """Load a state dict; one without truncation (e.g. from torch SGD) clears it."""
        state_dict = dict(state_dict)
        saved = state_dict.pop(_STATE_KEY, {"r": 1.0, "masks": {}})
        params = self._all_params()
        masks = {}
        for i, mask in saved["masks"].items():
            if not 0 <= int(i) < len(params):
                raise ValueError(f"load_state_dict: truncation mask for unknown param {i}")
            param = params[int(i)]
            masks[param] = mask.to(param.device)
        # Validate everything before any state changes.
        previous = (self._masks, self.truncation)
        self.set_truncation(masks, saved["r"])
        try:
            super().load_state_dict(state_dict)
        except Exception:
            self._masks, self.truncation = previous
            raise

    def _all_params(self) -> list[torch.Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    def _amp_tensors(self, device: torch.device) -> dict:
        """``grad_scale`` / ``found_inf`` that GradScaler set for this step, on ``device``."""
        return {
            name: None if value is None else value.to(device)
            for name in ("grad_scale", "found_inf")
            for value in [getattr(self, name, None)]
        }


def lr_arguments(lr: float | torch.Tensor, device: torch.device) -> dict:
    """``lr`` / ``lr_tensor`` kernel arguments: a CPU tensor lr is read on the host at no
    cost; a device tensor lr is read by the kernel, so the step never syncs."""
    if isinstance(lr, torch.Tensor):
        if lr.device.type == "cpu":
            return {"lr": lr.item(), "lr_tensor": None}
        return {"lr": 0.0, "lr_tensor": lr.to(device)}
    return {"lr": float(lr), "lr_tensor": None}
