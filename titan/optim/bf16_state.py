"""Adam(W) and momentum SGD whose state tensors are stored in bfloat16.

Half the optimizer memory of fp32 states (AdamW: 4 bytes/param instead of 8). The update is
computed in fp32 from the bf16 states, and the new states are written back with stochastic
rounding (see `stochastic_round`). Parameters stay in their own dtype (fp32 master weights).

Why not torchao's optimizers: their `bf16_stochastic_round` rounds *bf16 parameters*, and their
states follow the parameter dtype, so fp32 params would keep fp32 states; they also
torch.compile a step per parameter shape (~20 s each, cold, on a CPU).

DTensor (FSDP2/TP) params work: states are created with `zeros_like(param)` (same sharding) and
the math runs on the local shards, which are elementwise-aligned with the grads' shards.
The noise generator is reseeded from (seed, step, param index), so a resumed run draws the same
noise as an uninterrupted one without any extra checkpointed state.
"""

from __future__ import annotations

import math
from typing import Iterable, Optional

import torch
from torch.optim import Optimizer

from titan.optim.stochastic_round import copy_stochastic_

STATE_KEYS = ("exp_avg", "exp_avg_sq", "momentum_buffer")


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


class _BF16StateOptimizer(Optimizer):
    def __init__(self, params: Iterable, defaults: dict, seed: int):
        super().__init__(params, defaults)
        self._seed = seed
        self._generators: dict[torch.device, torch.Generator] = {}
        # Optimizer.load_state_dict casts floating states to the param dtype (fp32): undo that.
        self.register_load_state_dict_post_hook(_states_back_to_bf16)

    def _noise(self, device: torch.device, step: int, index: int) -> torch.Generator:
        gen = self._generators.get(device)
        if gen is None:
            gen = self._generators[device] = torch.Generator(device=device)
        gen.manual_seed((self._seed * 1_000_003 + step) * 100_003 + index)
        return gen

    def _params_with_grad(self):
        index = 0
        for group in self.param_groups:
            for p in group["params"]:
                index += 1
                if p.grad is not None:
                    yield group, p, index

    def _state_for(self, p: torch.Tensor, keys: tuple[str, ...]) -> dict:
        state = self.state[p]
        if not state:
            state["step"] = torch.tensor(0.0)
            for key in keys:
                state[key] = torch.zeros_like(p, dtype=torch.bfloat16, memory_format=torch.preserve_format)
        state["step"] += 1
        return state


def _states_back_to_bf16(optimizer: Optimizer) -> None:
    for state in optimizer.state.values():
        for key in STATE_KEYS:
            if key in state and state[key].dtype is not torch.bfloat16:
                state[key] = state[key].to(torch.bfloat16)


def _as_fp32(p_local: torch.Tensor) -> torch.Tensor:
    return p_local if p_local.dtype is torch.float32 else p_local.float()


class BF16StateAdam(_BF16StateOptimizer):
    """Adam with bf16 exp_avg / exp_avg_sq. decoupled=True is AdamW (decay applied to the
    weights), False is Adam (decay added to the gradient as L2)."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, decoupled=True, seed=0):
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, decoupled=decoupled)
        super().__init__(params, defaults, seed)

    @torch.no_grad()
    def step(self, closure=None) -> Optional[torch.Tensor]:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group, p, index in self._params_with_grad():
            state = self._state_for(p, ("exp_avg", "exp_avg_sq"))
            step = int(state["step"].item())
            lr, wd, eps = float(group["lr"]), group["weight_decay"], group["eps"]
            beta1, beta2 = group["betas"]
            p_local = _local(p)
            param = _as_fp32(p_local)
            grad = _local(p.grad).float()
            if group["decoupled"]:
                param.mul_(1 - lr * wd)
            elif wd:
                grad = grad.add(param, alpha=wd)
            exp_avg_bf16, exp_avg_sq_bf16 = _local(state["exp_avg"]), _local(state["exp_avg_sq"])
            exp_avg = exp_avg_bf16.float().lerp_(grad, 1 - beta1)
            exp_avg_sq = exp_avg_sq_bf16.float().mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            gen = self._noise(p_local.device, step, index)
            copy_stochastic_(exp_avg_bf16, exp_avg, gen)
            copy_stochastic_(exp_avg_sq_bf16, exp_avg_sq, gen)
            denom = (exp_avg_sq.sqrt_() / math.sqrt(1 - beta2**step)).add_(eps)
            param.addcdiv_(exp_avg, denom, value=-lr / (1 - beta1**step))
            if param is not p_local:
                p_local.copy_(param)
        return loss


class BF16StateSGD(_BF16StateOptimizer):
    """SGD with a bf16 momentum buffer (L2 weight decay, no dampening, no Nesterov)."""

    def __init__(self, params, lr=1e-3, momentum=0.9, weight_decay=0.0, seed=0):
        if momentum <= 0:
            raise ValueError("BF16StateSGD needs momentum > 0 (plain SGD has no state to shrink)")
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay), seed)

    @torch.no_grad()
    def step(self, closure=None) -> Optional[torch.Tensor]:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group, p, index in self._params_with_grad():
            state = self._state_for(p, ("momentum_buffer",))
            step = int(state["step"].item())
            p_local = _local(p)
            param = _as_fp32(p_local)
            grad = _local(p.grad).float()
            if group["weight_decay"]:
                grad = grad.add(param, alpha=group["weight_decay"])
            buf_bf16 = _local(state["momentum_buffer"])
            # torch's SGD starts the buffer at the first gradient; zeros * momentum + grad is that.
            buf = buf_bf16.float().mul_(group["momentum"]).add_(grad)
            copy_stochastic_(buf_bf16, buf, self._noise(p_local.device, step, index))
            param.add_(buf, alpha=-float(group["lr"]))
            if param is not p_local:
                p_local.copy_(param)
        return loss
