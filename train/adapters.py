"""Adapters: small trainable maps from a frozen encoder's features into the shared space.

Every adapter maps (batch, d_in) -> (batch, dim). The kinds (``ADAPTERS``):

* ``linear``      d_in -> dim (the methods draft's default)
* ``mlp``         d_in -> hidden -> dim, GELU in between
* ``bottleneck``  d_in -> bottleneck -> dim, GELU in between
* ``residual``    d_in -> dim, then ``depth`` pre-norm residual MLP blocks
                  (x + W2 GELU(W1 LayerNorm(x)), width ``hidden``), as in FuseMix / Freeze-Align
* ``token``       token projectors on token entries (``train.tokens``): built for the image and
                  text modalities together (the text side may share the vision side's weights)

``AlignModel`` holds one adapter per modality and the InfoNCE temperature (with the sigmoid
loss: its learnt scale and bias).
"""

from __future__ import annotations

import math
from typing import Callable, Mapping

import torch
from torch import nn

from pipeline.config import TrainConfig
from pipeline.errors import did_you_mean
from train.errors import ConfigValueError, out_of_range
from train.tokens import ResidualBlock, build_token_adapters

MAX_LOGIT_SCALE = 100.0  # CLIP's clamp on the learnable logit scale 1/tau (so tau >= 0.01)


def _linear(d_in: int, cfg: TrainConfig) -> nn.Module:
    return nn.Linear(d_in, cfg.dim)


def _two_layer(width: int) -> Callable[[int, TrainConfig], nn.Module]:
    def build(d_in: int, cfg: TrainConfig) -> nn.Module:
        w = cfg.hidden if width == 0 else cfg.bottleneck
        return nn.Sequential(nn.Linear(d_in, w), nn.GELU(), nn.Dropout(cfg.dropout), nn.Linear(w, cfg.dim))
    return build


def _residual(d_in: int, cfg: TrainConfig) -> nn.Module:
    blocks = [ResidualBlock(cfg.dim, cfg.hidden, cfg.dropout) for _ in range(cfg.depth)]
    return nn.Sequential(nn.Linear(d_in, cfg.dim), *blocks)


# name -> builder(d_in, TrainConfig) -> module mapping (batch, d_in) -> (batch, cfg.dim)
ADAPTERS: dict[str, Callable[[int, TrainConfig], nn.Module]] = {
    "linear": _linear,
    "mlp": _two_layer(0),
    "bottleneck": _two_layer(1),
    "residual": _residual,
}
JOINT_ADAPTERS = ("token",)  # built for every modality at once (train.tokens.build_token_adapters)


# The adapters' hyperparameters ([train] keys) -> (valid?, the rule in words). A new hyperparameter: its
# builder above, one line here, and its [train] key in pipeline/config.py + pipeline.toml.
HYPERPARAMETERS: dict[str, tuple[Callable[[float], bool], str]] = {
    "dim": (lambda v: v >= 1, ">= 1"),
    "hidden": (lambda v: v >= 1, ">= 1"),
    "bottleneck": (lambda v: v >= 1, ">= 1"),
    "depth": (lambda v: v >= 0, ">= 0"),
    "dropout": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "sigmoid_scale": (lambda v: 1 <= v <= MAX_LOGIT_SCALE, f"in [1, {MAX_LOGIT_SCALE:g}] (the learnt scale's clamp)"),
}


def check_adapter_name(name: str) -> None:
    """ConfigValueError (a PipelineError and ValueError) for a name not in ``ADAPTERS``."""
    if name not in ADAPTERS and name not in JOINT_ADAPTERS:
        known = [*ADAPTERS, *JOINT_ADAPTERS]
        raise ConfigValueError(f"Unknown adapter train.adapter = {name!r}.{did_you_mean(name, known, n=2)} "
                               f"Choose one of: {', '.join(known)}.")


def check_adapter(cfg: TrainConfig) -> None:
    """The adapter kind and every hyperparameter in ``HYPERPARAMETERS``, before any data is read."""
    check_adapter_name(cfg.adapter)
    for key, (ok, allowed) in HYPERPARAMETERS.items():
        if not ok(getattr(cfg, key)):
            raise out_of_range(key, getattr(cfg, key), allowed)


def build_adapter(d_in: int, cfg: TrainConfig) -> nn.Module:
    """An adapter of kind ``cfg.adapter`` mapping (batch, d_in) -> (batch, cfg.dim)."""
    check_adapter_name(cfg.adapter)
    if cfg.adapter in JOINT_ADAPTERS:
        raise ConfigValueError(f"train.adapter = {cfg.adapter!r} is built by AlignModel for every modality at once.")
    return ADAPTERS[cfg.adapter](d_in, cfg)


class AlignModel(nn.Module):
    """One adapter per modality plus the temperature.

    ``log_scale`` holds log(1/tau); it is a parameter only when the temperature is learnable
    (then clamped to 1/tau <= ``MAX_LOGIT_SCALE`` after each step, as CLIP does). A fixed
    temperature is used as given: the clamp applies only to the learnable one.

    With ``loss = "sigmoid"`` (SigLIP) both the scale and a bias are learnt: ``log_scale`` starts
    at log(``sigmoid_scale``) (SigLIP's t' = log 10) and ``logit_bias`` (a scalar parameter, in
    the state dict, so saved with the run) at ``sigmoid_bias`` (-10); ``temperature`` and
    ``learnable_temperature`` are not used. Other losses have ``logit_bias = None``.
    """

    def __init__(self, dims: Mapping[str, int], cfg: TrainConfig, tokens: Mapping[str, Mapping] | None = None):
        """dims: modality -> input width; tokens: modality -> {"width", "layout"} of token
        entries (``train.tokens.TokenView.info``), for train.adapter = "token"."""
        super().__init__()
        if cfg.adapter == "token":
            self.adapters = build_token_adapters(dims, cfg, tokens)
        else:
            self.adapters = nn.ModuleDict({m: build_adapter(d, cfg) for m, d in dims.items()})
        sigmoid = cfg.loss == "sigmoid"
        scale = cfg.sigmoid_scale if sigmoid else 1.0 / cfg.temperature
        init = torch.tensor(math.log(scale), dtype=torch.float32)
        if cfg.learnable_temperature or sigmoid:
            self.log_scale = nn.Parameter(init)
        else:
            self.register_buffer("log_scale", init)
        self.logit_bias = nn.Parameter(torch.tensor(float(cfg.sigmoid_bias))) if sigmoid else None

    @property
    def learnable_scale(self) -> bool:
        """True when the logit scale is trained (then clamped after each step)."""
        return isinstance(self.log_scale, nn.Parameter)

    @property
    def modalities(self) -> list[str]:
        return list(self.adapters)

    def logit_scale(self) -> torch.Tensor:
        """Scalar tensor 1/tau (a learnable one never above ``MAX_LOGIT_SCALE``)."""
        scale = self.log_scale.exp()
        return scale.clamp(max=MAX_LOGIT_SCALE) if self.learnable_scale else scale

    def temperature(self) -> float:
        """Current tau = 1 / logit scale."""
        return float(1.0 / self.logit_scale().detach())

    def clamp_temperature(self) -> None:
        """CLIP's in-place clamp of the learnable scale to [1, MAX_LOGIT_SCALE]."""
        with torch.no_grad():
            self.log_scale.clamp_(0.0, math.log(MAX_LOGIT_SCALE))

    def forward(self, modality: str, x: torch.Tensor) -> torch.Tensor:
        """(batch, d_modality) -> (batch, dim), not normalised."""
        return self.adapters[modality](x)
