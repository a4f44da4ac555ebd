"""WormSGD: ``torch.optim.SGD`` with WORM gradient truncation fused into its step."""

from collections import defaultdict
from collections.abc import Mapping

import torch
from torch.optim import Optimizer

from worm_fast import backends, ops

_STATE_KEY = "worm_truncation"


class WormSGD(Optimizer):
    r"""Stochastic gradient descent with WORM's masked gradient scaling (truncation).

    A drop-in ``torch.optim.SGD``: same arguments, param groups,
    ``state["momentum_buffer"]`` and ``state_dict``. With a truncation mask set through
    :meth:`set_truncation`, the raw gradient of every masked parameter is first scaled
    element-wise, then the ordinary SGD update follows:

    .. math::
        g_t &\leftarrow \nabla_\theta f_t(\theta_{t-1}) \odot (m + r\,(1 - m))
              \quad (m = 1 \text{ kept}, 0 \text{ pruned}) \\
        g_t &\leftarrow -g_t \text{ if maximize}; \quad g_t \leftarrow g_t + \lambda\theta_{t-1} \\
        b_t &\leftarrow g_t \ (t = 1), \quad \mu b_{t-1} + (1 - \tau) g_t \ (t > 1) \\
        g_t &\leftarrow g_t + \mu b_t \text{ (nesterov) or } b_t; \quad
        \theta_t \leftarrow \theta_{t-1} - \gamma g_t

    Truncation acts on the raw gradient, before weight decay and momentum, because WORM
    asks the network to stop *learning* through the weights about to be pruned; weight
    decay still shrinks them and momentum accumulated before the trigger decays
    normally. The update runs as one fused kernel per device and dtype (C++ on CPU,
    CUDA or Triton on GPU, pure torch elsewhere; ``backend`` forces one).

    ``torch.amp.GradScaler`` hands this optimizer ``grad_scale`` and ``found_inf``
    (it sets ``_step_supports_amp_scaling``): the kernel unscales the gradients itself
    and a step with an inf changes nothing, without a host sync. As with
    ``torch.optim.SGD(fused=True)``, a skipped *first* step leaves zero momentum
    buffers, so with ``dampening != 0`` the next step damps its gradient.
    """

    def __init__(
        self,
        params,
        lr: float | torch.Tensor = 1e-3,
        momentum: float = 0,
        dampening: float = 0,
        weight_decay: float = 0,
        nesterov: bool = False,
        *,
        maximize: bool = False,
        backend: str = "auto",
    ) -> None:
        if isinstance(lr, torch.Tensor) and lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        if lr < 0.0:
            raise ValueError(f"Invalid learning rate: {lr}")
        if momentum < 0.0:
            raise ValueError(f"Invalid momentum value: {momentum}")
        if weight_decay < 0.0:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")
        defaults = dict(
            lr=lr,
            momentum=momentum,
            dampening=dampening,
            weight_decay=weight_decay,
            nesterov=nesterov,
            maximize=maximize,
        )
        if backend != "auto" and backend not in backends.NAMES:
            raise ValueError(
                f"unknown backend {backend!r}; expected 'auto' or one of {backends.NAMES}"
            )
        super().__init__(params, defaults)
        self.backend = None if backend == "auto" else backend
        self._step_supports_amp_scaling = True
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

    # -- step -------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure=None):
        """Perform a single optimization step (``closure`` re-evaluates the loss)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)

        for group in self.param_groups:
            has_momentum = group["momentum"] != 0
            # One fused call per (device, dtype, first step?): kernels take one device
            # and dtype, and a parameter's first momentum step initialises its buffer.
            batches = defaultdict(lambda: ([], [], [], []))
            for param in group["params"]:
                if param.grad is None:
                    continue
                if param.grad.is_sparse:
                    raise RuntimeError("WormSGD does not support sparse gradients")
                state = self.state[param]
                first = has_momentum and state.get("momentum_buffer") is None
                params, grads, buffers, masks = batches[(param.device, param.dtype, first)]
                params.append(param)
                grads.append(param.grad)
                if has_momentum:
                    buffers.append(
                        torch.zeros_like(param, memory_format=torch.preserve_format)
                        if first
                        else state["momentum_buffer"]
                    )
                masks.append(self._masks.get(param))

            for (device, _, first), (params, grads, buffers, masks) in batches.items():
                ops.masked_sgd_step_(
                    params,
                    grads,
                    buffers,
                    masks if any(m is not None for m in masks) else [],
                    **self._step_scalars(group, device),
                    is_first_step=first,
                    truncation=self.truncation,
                    grad_scale=_on(grad_scale, device),
                    found_inf=_on(found_inf, device),
                    backend=self.backend,
                )
                if first:
                    for param, buffer in zip(params, buffers):
                        self.state[param]["momentum_buffer"] = buffer
        return loss

    @staticmethod
    def _step_scalars(group, device: torch.device) -> dict:
        lr = group["lr"]
        lr_tensor = None
        if isinstance(lr, torch.Tensor):
            # A CPU lr is read on the host at no cost; a device lr is read by the kernel.
            if lr.device.type == "cpu":
                lr = lr.item()
            else:
                lr_tensor, lr = lr.to(device), 0.0
        return dict(
            lr=lr,
            lr_tensor=lr_tensor,
            weight_decay=float(group["weight_decay"]),
            momentum=group["momentum"],
            dampening=group["dampening"],
            nesterov=group["nesterov"],
            maximize=group["maximize"],
        )

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


def _on(tensor: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    return None if tensor is None else tensor.to(device)
