"""Anchoring to the base weights (L2-SP): lambda/2 * ||theta - theta_0||^2 over the trained weights.

Contract: `WeightAnchor(model, lam)` remembers theta_0 when it is made — before the first update, and on
resume before the checkpoint's weights are loaded, so theta_0 is always the starting model. After the
backward passes of a step, `add_to_gradients()` adds the penalty's exact gradient to every trained
parameter's `.grad` and returns the penalty's value. The gradient is added directly rather than through
autograd so that it is identical on every process after the data-parallel gradient reduction, and costs
no second backward.
- Full fine-tuning: the gradient is lambda * (theta - theta_0). theta_0 is shared with a `FrozenBase` copy
  when there is one (no third copy of the weights).
- LoRA: theta - theta_0 is the adapter's weight change, delta W = s * B @ A per adapted layer (s the
  LoRA scaling), so the penalty is lambda/2 * s^2 * ||B A||_F^2 = lambda/2 * s^2 * sum((B^T B) * (A A^T)) —
  r x r products, never the full delta W — with gradients lambda s^2 B (A A^T) for B and
  lambda s^2 (B^T B) A for A. Every other trained parameter (e.g. modules_to_save) is anchored plainly.
"""

from __future__ import annotations

import torch
from torch import nn


class WeightAnchor:
    def __init__(self, model: nn.Module, lam: float, reference: nn.Module | None = None):
        self.lam = lam
        self._lora: list[tuple[nn.Parameter, nn.Parameter, float]] = []
        in_lora: set[int] = set()
        for module in model.modules():
            for adapter, a in getattr(module, "lora_A", {}).items():
                pair = (a.weight, module.lora_B[adapter].weight, float(module.scaling[adapter]))
                if pair[0].requires_grad:
                    self._lora.append(pair)
                    in_lora.update((id(pair[0]), id(pair[1])))
        start = dict(reference.named_parameters()) if reference is not None else {}
        self._plain = [(p, start[n].detach() if n in start else p.detach().clone())
                       for n, p in model.named_parameters() if p.requires_grad and id(p) not in in_lora]

    @torch.no_grad()
    def add_to_gradients(self) -> float:
        """Add the penalty's gradient to the trained parameters' grads; return lambda/2 * ||delta||^2."""
        total = torch.zeros((), dtype=torch.float64)
        for p, p0 in self._plain:
            delta = p - p0
            total += delta.double().pow(2).sum().cpu()
            p.grad = self.lam * delta if p.grad is None else p.grad.add_(delta, alpha=self.lam)
        for a, b, scale in self._lora:
            gram_a, gram_b = a @ a.T, b.T @ b  # (r, r)
            total += (scale**2 * (gram_a * gram_b).sum()).double().cpu()
            coef = self.lam * scale**2
            grad_b, grad_a = coef * (b @ gram_a), coef * (gram_b @ a)
            b.grad = grad_b if b.grad is None else b.grad.add_(grad_b)
            a.grad = grad_a if a.grad is None else a.grad.add_(grad_a)
        return float(self.lam / 2 * total)
