"""Adam on one tensor, for the encoder's searches.

torch.optim's Adam gives the same numbers, but creating one imports torch._dynamo (about a second of
every encode, more than a gradient step costs). This is its single-tensor update, operation for
operation (torch's default on the CPU), so a search takes the same steps either way.
"""

from __future__ import annotations

import torch


class Adam:
    def __init__(self, param: torch.Tensor, lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> None:
        self.param, self.lr, self.eps = param, lr, eps
        self.beta1, self.beta2 = betas
        self.t = 0
        self.m = torch.zeros_like(param)
        self.v = torch.zeros_like(param)

    @torch.no_grad()
    def step(self, grad: torch.Tensor) -> None:
        """One update of the parameter in place, at the current self.lr."""
        self.t += 1
        self.m.lerp_(grad, 1 - self.beta1)
        self.v.mul_(self.beta2).addcmul_(grad, grad, value=1 - self.beta2)
        step_size = self.lr / (1 - self.beta1 ** float(self.t))
        denom = (self.v.sqrt() / (1 - self.beta2 ** float(self.t)) ** 0.5).add_(self.eps)
        self.param.addcdiv_(self.m, denom, value=-step_size)
