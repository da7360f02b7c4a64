"""Gradient methods: saliency and gradient × input (one forward and one backward per batch)."""
from __future__ import annotations

import torch

from xaicli import Attribution, Method, Param, hookimpl
from xaicli.model import Model, input_gradient
from xaicli.rng import BatchRNG


def saliency(model: Model, x: torch.Tensor, target: torch.Tensor, rng: BatchRNG, abs: bool = False) -> Attribution:
    """∂f_t/∂x (Simonyan et al. 2014); `abs` takes its magnitude, as captum's Saliency does by default."""
    grad, _ = input_gradient(model, x, target)
    return Attribution(grad.abs() if abs else grad)


def gradient_x_input(model: Model, x: torch.Tensor, target: torch.Tensor, rng: BatchRNG) -> Attribution:
    """x ⊙ ∂f_t/∂x (Shrikumar et al. 2016), as captum's InputXGradient."""
    grad, _ = input_gradient(model, x, target)
    return Attribution(grad * x)


@hookimpl
def xai_methods() -> list[Method]:
    return [
        Method(
            "saliency",
            "input gradient of the target logit",
            saliency,
            (Param("abs", bool, False, "take the absolute value of the gradient"),),
            reuses_forward=True,
        ),
        Method("gradient_x_input", "input times its gradient", gradient_x_input, reuses_forward=True),
    ]
