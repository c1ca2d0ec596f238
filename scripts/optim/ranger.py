"""Ranger 20.4.11: RAdam + Lookahead + gradient centralisation, the optimiser of the official SMILE code.

Written here from the published algorithm (Liu et al. 2020, RAdam; Zhang et al. 2019, Lookahead;
Yong et al. 2020, gradient centralisation; Wright's Ranger 20.4.11 combination of the three) because
neither torch nor timm ships that combination: timm's ``lookahead_radam`` has no gradient
centralisation and applies coupled L2 decay to weights only.

One step, for every parameter ``p`` with gradient ``g`` (step counter ``t`` per parameter, starting at 1):

1. gradient centralisation, only for tensors with more than one dimension:
   ``g -= mean(g over every dimension but the first)`` (one mean per output unit);
2. moments: ``m = b1*m + (1-b1)*g``; ``v = b2*v + (1-b2)*g*g``;
3. RAdam's length of the approximated simple moving average:
   ``rho_max = 2/(1-b2) - 1``; ``rho_t = rho_max - 2*t*b2**t/(1-b2**t)``;
4. decoupled weight decay on every parameter (biases and norms included): ``p -= wd*lr*p``;
5. if ``rho_t > 5`` (the rectification threshold) the adaptive, rectified step
   ``p -= lr * r_t/(1-b1**t) * m/(sqrt(v)+eps)`` with
   ``r_t = sqrt((1-b2**t) * (rho_t-4)/(rho_max-4) * (rho_t-2)/rho_t * rho_max/(rho_max-2))``,
   else the un-adapted momentum step ``p -= lr/(1-b1**t) * m``;
6. Lookahead, every ``k`` steps: ``slow += alpha*(p - slow)``; ``p = slow`` (``slow`` starts as the
   initial weights).

Note that in step 5 ``sqrt(1-b2**t)`` corrects ``v``'s bias *outside* the square root, as Ranger
20.4.11 does (eps is therefore added to the uncorrected ``sqrt(v)``).

Defaults are the SMILE settings: betas (0.95, 0.999), eps 1e-5, alpha 0.5, k 6. State is kept in
float32 whatever the parameter dtype.
"""

from __future__ import annotations

import math

import torch
from torch.optim import Optimizer

__all__ = ["Ranger"]


class Ranger(Optimizer):
    """Ranger 20.4.11 (RAdam + Lookahead k/alpha + gradient centralisation + decoupled weight decay).

    Args:
        params: parameters or parameter groups (an ``nn.Module``'s ``parameters()``).
        lr: learning rate (SMILE: 2e-4).
        alpha: Lookahead interpolation factor towards the fast weights.
        k: Lookahead synchronisation period in steps.
        n_sma_threshold: the rectified (adaptive) step is taken when RAdam's SMA length exceeds this.
        betas, eps: Adam moment decays and denominator epsilon.
        weight_decay: decoupled decay ``p -= weight_decay * lr * p`` on every parameter.
        use_gc: centralise the gradients of tensors with more than one dimension.
    """

    def __init__(
        self, params, lr: float = 1e-3, alpha: float = 0.5, k: int = 6, n_sma_threshold: float = 5.0,
        betas=(0.95, 0.999), eps: float = 1e-5, weight_decay: float = 0.0, use_gc: bool = True,
    ):  # fmt: skip
        if lr <= 0:
            raise ValueError(f"Ranger: lr must be > 0, got {lr}")
        if not 0.0 < alpha <= 1.0:
            raise ValueError(f"Ranger: alpha must be in (0, 1], got {alpha}")
        if int(k) < 1:
            raise ValueError(f"Ranger: k must be >= 1, got {k}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"Ranger: betas must be in [0, 1), got {betas}")
        if eps < 0 or weight_decay < 0:
            raise ValueError(f"Ranger: eps and weight_decay must be >= 0, got {eps}, {weight_decay}")
        defaults = dict(lr=lr, alpha=alpha, k=int(k), n_sma_threshold=n_sma_threshold, betas=tuple(betas), eps=eps,
                        weight_decay=weight_decay, use_gc=use_gc)  # fmt: skip
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
            beta1, beta2 = group["betas"]
            rho_max = 2.0 / (1.0 - beta2) - 1.0
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("Ranger does not support sparse gradients")
                grad = p.grad.detach().float()  # a copy for low-precision params; cloned below otherwise
                if grad.dtype == p.grad.dtype:
                    grad = grad.clone()
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.preserve_format)
                    state["slow_buffer"] = p.detach().float().clone()
                if group["use_gc"] and grad.dim() > 1:
                    grad -= grad.mean(dim=tuple(range(1, grad.dim())), keepdim=True)
                state["step"] += 1
                t = state["step"]
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                exp_avg.mul_(beta1).add_(grad, alpha=1.0 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)

                beta2_t = beta2**t
                rho_t = rho_max - 2.0 * t * beta2_t / (1.0 - beta2_t)
                bias1 = 1.0 - beta1**t
                weights = p.detach().float()
                if wd != 0:
                    weights.mul_(1.0 - wd * lr)
                if rho_t > group["n_sma_threshold"]:
                    rect = math.sqrt(
                        (1.0 - beta2_t) * (rho_t - 4.0) / (rho_max - 4.0) * (rho_t - 2.0) / rho_t * rho_max / (rho_max - 2.0)
                    )
                    weights.addcdiv_(exp_avg, exp_avg_sq.sqrt().add_(eps), value=-lr * rect / bias1)
                else:
                    weights.add_(exp_avg, alpha=-lr / bias1)
                if t % group["k"] == 0:
                    slow = state["slow_buffer"]
                    slow.add_(weights - slow, alpha=group["alpha"])
                    weights.copy_(slow)
                p.copy_(weights)
        return loss
