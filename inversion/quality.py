"""Reconstruction quality (pure torch)."""

from __future__ import annotations

import math

import torch


def psnr(image: torch.Tensor, reference: torch.Tensor) -> float:
    """Peak signal-to-noise ratio in dB of two images with values in [0, 1]: 10 log10(1 / MSE)."""
    mse = float(torch.mean((image.float() - reference.float()) ** 2))
    return float("inf") if mse == 0 else 10.0 * math.log10(1.0 / mse)
