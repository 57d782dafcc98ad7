"""STRUCTURE: the geometry-preserving regulariser of Gröger, Wen, Le & Brbić, "With Limited Data
for Multimodal Alignment, Let the STRUCTURE Guide You" (NeurIPS 2025, arXiv 2506.16895).

Idea: with few pairs, InfoNCE is free to tear apart the neighbourhoods the frozen encoder already
knows; the regulariser asks each modality's aligned batch to keep the frozen batch's
neighbourhood distributions, at several scales.

Definition (for one modality, a batch of b rows; X (b, d) frozen features, Z (b, k) adapter
outputs), as in the authors' reference implementation (cosine similarity, mean centring after
normalisation, no per-level weighting, no margin):

    X~ = normalise(X) - mean over the batch of normalise(X)            (same for Z~)
    P_X = row-softmax(X~ X~^T / tau)                                  (b, b), rows sum to 1
    R(X, Z) = (1/L) sum_{l=1..L} (1/b) sum_i JS(P_X^l[i] || P_Z^l[i])

(The paper names the divergence Jensen-Shannon and it is computed exactly so here; the public
code's ``kl_div(log q, m)`` terms amount to (KL(m || p) + KL(m || q)) / 2, which is likewise
zero exactly when p = q.) P^l is the l-step random walk on the batch's similarity graph (l = 1: direct neighbours,
larger l: the coarser cluster structure). JS(p || q) = (KL(p || m) + KL(q || m)) / 2 with
m = (p + q) / 2, in nats; it is symmetric, bounded by log 2, and 0 only when p = q. The
training loss adds ``structure_weight`` times the mean of R over modalities, the weight ramped
linearly from 0 over ``structure_warmup_epochs`` (the paper's lambda = 10 with a warm-up).

Properties: R = 0 when Z equals X up to an isometry (an orthogonal map onto a space of any
dimension >= rank, Z = X Q with Q^T Q = I) and an isotropic scale, because normalising,
centring and inner products are all unchanged by these; not under a general linear map.
Everything is dense (b, b) torch on the batch's device (b = batch size, a few hundred at most).

Where the frozen features come from here: the adapters see standardised features, so the
trainer undoes the standardisation (x * std + mean) to compare against the encoder's own
geometry; with latent mixup the mixed features are used on both sides.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F

from pipeline.config import TrainConfig
from train.errors import ConfigValueError

EPS = 1e-12  # inside the logarithms of the divergence


def neighbourhoods(x: torch.Tensor, temperature: float) -> torch.Tensor:
    """(b, d) -> (b, b) row-stochastic P = softmax(X~ X~^T / tau) of the centred unit rows."""
    u = F.normalize(x.float(), dim=-1)
    u = u - u.mean(0, keepdim=True)
    return torch.softmax(u @ u.T / temperature, dim=-1)


def js_divergence(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Mean over rows of the Jensen-Shannon divergence of row distributions p, q: (b, n) -> scalar."""
    m = 0.5 * (p + q)
    log_m = (m + EPS).log()
    kl_pm = (p * ((p + EPS).log() - log_m)).sum(-1)
    kl_qm = (q * ((q + EPS).log() - log_m)).sum(-1)
    return 0.5 * (kl_pm + kl_qm).mean()


def structure_loss(frozen: torch.Tensor, aligned: torch.Tensor, levels: int = 1,
                   temperature: float = 0.05) -> torch.Tensor:
    """R(frozen, aligned) of the module docstring: frozen (b, d), aligned (b, k) -> scalar in
    [0, log 2]; differentiable w.r.t. ``aligned`` (the frozen side carries no gradient)."""
    p = neighbourhoods(frozen.detach(), temperature)
    q = neighbourhoods(aligned, temperature)
    total, pl, ql = 0.0, p, q
    for level in range(1, levels + 1):
        if level > 1:
            pl, ql = pl @ p, ql @ q
        total = total + js_divergence(pl, ql)
    return total / levels


def check_structure(tc: TrainConfig) -> None:
    """Range checks of the structure_* keys (ConfigValueError)."""
    rules = [("structure_weight", tc.structure_weight >= 0), ("structure_levels", tc.structure_levels >= 1),
             ("structure_temperature", tc.structure_temperature > 0),
             ("structure_warmup_epochs", tc.structure_warmup_epochs >= 0)]
    for key, ok in rules:
        if not ok:
            raise ConfigValueError(f"train.{key} = {getattr(tc, key)!r} is out of range.")


class StructureTerm:
    """The regulariser inside the trainer: holds the un-standardisation statistics and the
    current weight as a device tensor (updated per step, so a captured CUDA graph sees it).

    mean, std: modality -> (d_m,) arrays of the train standardisation; steps_per_epoch: for the
    warm-up length in steps.
    """

    def __init__(self, tc: TrainConfig, mean: Mapping, std: Mapping, steps_per_epoch: int,
                 device: torch.device):
        self.levels, self.temperature, self.base = tc.structure_levels, tc.structure_temperature, tc.structure_weight
        self.warmup_steps = int(math.ceil(tc.structure_warmup_epochs * steps_per_epoch))
        self.mean = {m: torch.as_tensor(v, dtype=torch.float32, device=device) for m, v in mean.items()}
        self.std = {m: torch.as_tensor(v, dtype=torch.float32, device=device) for m, v in std.items()}
        self.weight = torch.zeros((), device=device)
        self.set_step(0)

    def set_step(self, step: int) -> None:
        """Weight of optimisation step ``step`` (0-based): base * min(1, (step + 1) / warm-up steps)."""
        ramp = 1.0 if self.warmup_steps == 0 else min(1.0, (step + 1) / self.warmup_steps)
        self.weight.fill_(self.base * ramp)

    def __call__(self, modalities: Sequence[str], xs: Sequence[torch.Tensor],
                 zs: Sequence[torch.Tensor]) -> torch.Tensor:
        """weight * mean over modalities of R(frozen x_m, aligned z_m); xs: standardised (b, d_m)
        adapter inputs, zs: (b, dim) adapter outputs of the same rows."""
        terms = [structure_loss(x * self.std[m] + self.mean[m], z, self.levels, self.temperature)
                 for m, x, z in zip(modalities, xs, zs)]
        return self.weight * (sum(terms) / len(terms))
