"""The optimiser and the learning-rate schedule of ``fit-adapters``."""

from __future__ import annotations

import math
from typing import Callable

import torch

from pipeline.config import CHOICES, TrainConfig
from train.adapters import AlignModel

SCHEDULES = CHOICES["train.schedule"]  # learning-rate shape after the linear warm-up


def make_optimizer(model: AlignModel, tc: TrainConfig, capturable: bool = False) -> torch.optim.AdamW:
    """AdamW; weight decay applies to weight matrices only (not biases, norms, temperature).

    Fused on CUDA. ``capturable``: learning rate held in a device tensor and state kept on the
    device, as CUDA-graph capture requires.
    """
    decay = [p for p in model.parameters() if p.ndim >= 2]
    rest = [p for p in model.parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": tc.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    device = next(model.parameters()).device
    if capturable:
        return torch.optim.AdamW(groups, lr=torch.tensor(tc.lr, device=device), fused=True, capturable=True)
    return torch.optim.AdamW(groups, lr=tc.lr, fused=True if device.type == "cuda" else None)


def lr_schedule(tc: TrainConfig, steps_per_epoch: int) -> Callable[[int], float]:
    """step (0-based, over the whole run) -> learning rate: linear warm-up over
    ``warmup_epochs``, then constant or cosine decay to 0 at the last step."""
    warm = int(round(tc.warmup_epochs * steps_per_epoch))
    total = tc.epochs * steps_per_epoch

    def lr(step: int) -> float:
        if step < warm:
            return tc.lr * (step + 1) / warm
        if tc.schedule == "cosine":
            return tc.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm + 1) / max(1, total - warm))))
        return tc.lr

    return lr
