"""WormSGD: ``torch.optim.SGD`` with WORM gradient truncation fused into its step."""

from collections import defaultdict

import torch

from worm_fast import ops
from worm_fast.distributed import local_tensors
from worm_fast.optim.base import TruncatingOptimizer, lr_arguments


class WormSGD(TruncatingOptimizer):
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
        super().__init__(params, defaults, backend)

    ELEMENTWISE_STATE = ("momentum_buffer",)

    @torch.no_grad()
    def step(self, closure=None):
        """Perform a single optimization step (``closure`` re-evaluates the loss)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        # Every call is checked before the first runs, and new momentum buffers are
        # stored only after the last, so a step that raises changes nothing.
        launches, new_buffers = [], []
        index = 0
        for group in self.param_groups:
            has_momentum = group["momentum"] != 0
            # One fused call per (device, dtype, first step?): kernels take one device
            # and dtype, and a parameter's first momentum step initialises its buffer.
            batches = defaultdict(lambda: ([], [], [], []))
            for param in group["params"]:
                index += 1
                if param.grad is None:
                    continue
                self._check_grad(param)
                buffer = self.state.get(param, {}).get("momentum_buffer")
                first = has_momentum and buffer is None
                params, grads, buffers, masks = batches[(param.device, param.dtype, first)]
                params.append(param)
                grads.append(param.grad)
                if has_momentum:
                    buffers.append(
                        torch.zeros_like(param, memory_format=torch.preserve_format)
                        if first
                        else buffer
                    )
                masks.append(self._mask_for_step(index - 1, param))

            for (device, _, first), (params, grads, buffers, masks) in batches.items():
                launches.append(
                    ops.prepare_masked_sgd_step(
                        # Sharded (FSDP2) parameters step their local shards.
                        local_tensors(params),
                        local_tensors(grads),
                        local_tensors(buffers),
                        **self._truncation_arguments(masks, device),
                        **lr_arguments(group["lr"], device),
                        weight_decay=float(group["weight_decay"]),
                        momentum=group["momentum"],
                        dampening=group["dampening"],
                        nesterov=group["nesterov"],
                        maximize=group["maximize"],
                        is_first_step=first,
                        **self._amp_tensors(device),
                        backend=self.backend,
                    )
                )
                if first:
                    new_buffers.extend(zip(params, buffers))
        for launch in launches:
            launch()
        for param, buffer in new_buffers:
            self.state[param]["momentum_buffer"] = buffer
        return loss
