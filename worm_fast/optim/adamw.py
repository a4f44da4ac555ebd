"""WormAdamW: ``torch.optim.AdamW`` with WORM truncation fused into its step."""

from collections import defaultdict

import torch

from worm_fast import ops
from worm_fast._checks import check_adamw_truncate
from worm_fast.distributed import local_tensors
from worm_fast.optim.base import TruncatingOptimizer, lr_arguments


class WormAdamW(TruncatingOptimizer):
    r"""AdamW with WORM's truncation of pruned elements.

    A drop-in ``torch.optim.AdamW``: same arguments, param groups, state keys
    (``step``, ``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq``) and ``state_dict``; with
    no mask it matches AdamW step for step. With a truncation mask set through
    :meth:`set_truncation`, by default (``truncate="update"``) the Adam update of every
    pruned element is scaled by ``r``:

    .. math::
        \theta_t \leftarrow \theta_{t-1}(1 - \gamma\lambda)
            - \frac{\gamma}{1 - \beta_1^t}\,(m + r(1 - m_{\text{mask}}))\,
              \frac{m_t}{\sqrt{\hat v_t} + \epsilon}

    Unlike SGD, scaling AdamW's *gradient* would be undone once the second moment
    adapts to the smaller gradients (the update is normalized by their running RMS),
    so WormAdamW scales the update instead: pruned elements learn ``r`` times slower,
    as under WormSGD. The moments see the raw gradient, so they are current when
    truncation stops. ``truncate="gradient"`` applies the paper's literal rule instead:
    the raw gradient of pruned elements is scaled by ``r`` before the moments (as
    WormSGD does), and the update is not. Decoupled weight decay is never truncated.
    ``truncate`` is a param-group setting, so it travels in ``state_dict``; a state dict
    without it (``torch.optim.AdamW``'s) keeps the constructor's.

    ``state["step"]`` lives on the parameter's device (as with ``fused=True``), so the
    step never syncs with the host; GradScaler steps with an inf change nothing,
    including the step count.
    """

    def __init__(
        self,
        params,
        lr: float | torch.Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        truncate: str = "update",
        backend: str = "auto",
    ) -> None:
        if isinstance(lr, torch.Tensor) and lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        if not lr >= 0.0:
            raise ValueError(f"Invalid learning rate: {lr}")
        if not eps >= 0.0:
            raise ValueError(f"Invalid epsilon value: {eps}")
        for index, beta in enumerate(betas):
            if not 0.0 <= beta < 1.0:
                raise ValueError(f"Invalid beta parameter at index {index}: {beta}")
        if not weight_decay >= 0.0:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        check_adamw_truncate(truncate)
        defaults = dict(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
            maximize=maximize, truncate=truncate,
        )  # fmt: skip
        super().__init__(params, defaults, backend)

    def add_param_group(self, param_group: dict) -> None:
        check_adamw_truncate(param_group.get("truncate", self.defaults["truncate"]))
        super().add_param_group(param_group)

    @torch.no_grad()
    def step(self, closure=None):
        """Perform a single optimization step (``closure`` re-evaluates the loss)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        # Every call is checked before the first runs, and the state of parameters seen
        # for the first time is stored only after the last, so a step that raises
        # changes nothing.
        launches, new_states = [], {}
        index = 0
        for group in self.param_groups:
            amsgrad = group["amsgrad"]
            # One fused call per (device, dtype): kernels take one device and dtype.
            batches = defaultdict(lambda: ([], [], [], [], [], [], []))
            for param in group["params"]:
                index += 1
                if param.grad is None:
                    continue
                self._check_grad(param)
                state = self.state.get(param)
                if not state:
                    state = new_states[param] = {
                        "step": torch.zeros((), dtype=torch.float32, device=param.device)
                    }
                    for key in ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if amsgrad else ()):
                        state[key] = torch.zeros_like(param, memory_format=torch.preserve_format)
                batch = batches[(param.device, param.dtype)]
                batch[0].append(param)
                batch[1].append(param.grad)
                batch[2].append(state["exp_avg"])
                batch[3].append(state["exp_avg_sq"])
                if amsgrad:
                    batch[4].append(state["max_exp_avg_sq"])
                batch[5].append(state["step"])
                batch[6].append(self._mask_for_step(index - 1, param))

            beta1, beta2 = group["betas"]
            for (device, _), (params, grads, m, v, v_max, steps, masks) in batches.items():
                launches.append(ops.prepare_masked_adamw_step(
                    # Sharded (FSDP2) parameters step their local shards.
                    *map(local_tensors, (params, grads, m, v, v_max)), steps,
                    **self._truncation_arguments(masks, device),
                    **lr_arguments(group["lr"], device),
                    beta1=beta1, beta2=beta2, weight_decay=group["weight_decay"],
                    eps=group["eps"], amsgrad=amsgrad, maximize=group["maximize"],
                    truncate=group["truncate"],
                    **self._amp_tensors(device), backend=self.backend,
                ))  # fmt: skip
        for launch in launches:
            launch()
        self.state.update(new_states)
        return loss

    ELEMENTWISE_STATE = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")

    def load_state_dict(self, state_dict) -> None:
        """Load a state dict (also torch.optim.AdamW's, whose steps live on the CPU, and
        whose groups have no ``truncate``: they keep this optimizer's)."""
        for group in state_dict.get("param_groups", []):
            if "truncate" in group:
                check_adamw_truncate(group["truncate"])
        before = [group["truncate"] for group in self.param_groups]
        super().load_state_dict(state_dict)
        for group, truncate in zip(self.param_groups, before):
            group.setdefault("truncate", truncate)
        for param, state in self.state.items():
            if "step" in state:
                step = state["step"]
                step = torch.as_tensor(step, dtype=torch.float32)
                state["step"] = step.to(param.device).reshape(())
