"""Token projectors (``train.adapter = "token"``), following Freeze-Align (CVPR 2025, Fig. 3, Table 1).

Inputs: a token entry (``extract --tokens``) seen as flat rows by :class:`TokenView`: row i holds
L token slots of w + 1 values each, the token's w values then a 1 (real token) or 0 (padding),
so every training path of ``train`` (in memory, streamed from the cache, DDP, mixup, every loss)
moves token rows as it moves pooled ones. L is the longest row of the entry over every split
read (image grids are all the same length; captions are padded to the longest). The projectors
read the layout back; they do not depend on L, only on w.

Vision side (``image``), tokens t_1..t_L, and a global token g (CLS for ``cls+patches`` layouts,
ViTs: token 0, the others are the local tokens; for CNN feature-map ``positions``: the mean of the
tokens)::

    z = Linear_{w -> dim}( mean_{real i} Local(t_i) + Cls(g) )

Text side (``text``), the real tokens t_1..t_T::

    z = Linear_{w -> dim}( Global( mean_{real i} Local(t_i) ) )

Branches (``train.token``: vision_local, vision_cls, text_local, text_global), each one of

* ``identity``  skip it
* ``mlp``       two layers, w -> hidden -> w, GELU (per token for the local branches)
* ``token``     Freeze-Align's token projector, per token: x + MLP(LayerNorm(x)) (hidden width)
* ``patch``     text_local only: the vision side's local projector itself (shared weights; the
                two encoders' token widths must be equal)

Pooling (``train.token.pooling``): ``mean``, the mean over real tokens (the mask), the simplest
choice that ignores padding (the default); or ``attention``: softmax(t_i . q / sqrt(w)) over the real
tokens with a learned query q per side, initialised at 0 (so training starts from the mean). The final Linear to ``train.dim`` is always
there (identity branches still need a map into the shared space). Inputs are not standardised
(the statistics are mean 0, std 1): the token projector normalises each token itself.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np
import torch
from torch import nn

from pipeline.cache import CacheError, Entry
from pipeline.config import TOKEN_DEFAULTS
from pipeline.errors import did_you_mean
from train.errors import ConfigValueError, TrainError

BRANCHES = ("identity", "mlp", "token", "patch")
POOLINGS = ("mean", "attention")
SIDES = {"image": "vision", "text": "text"}  # modality -> the side its branches are named after
GLOBAL_LAYOUT = "cls+patches"  # token 0 is the global (CLS) token


def token_settings(tc) -> dict[str, str]:
    """``train.token`` over TOKEN_DEFAULTS, checked: unknown keys (close matches), values in
    BRANCHES, ``patch`` only for text_local."""
    given = dict(tc.token)
    for key, value in given.items():
        if key not in TOKEN_DEFAULTS:
            raise ConfigValueError(f"Unknown key train.token.{key}.{did_you_mean(key, TOKEN_DEFAULTS)} "
                                   f"Known: {', '.join(TOKEN_DEFAULTS)}.")
        allowed = POOLINGS if key == "pooling" else BRANCHES if key == "text_local" else BRANCHES[:3]
        if value not in allowed:
            raise ConfigValueError(f"train.token.{key} = {value!r} must be one of {', '.join(allowed)}."
                                   f"{did_you_mean(str(value), allowed)}")
    return {**TOKEN_DEFAULTS, **given}


def check_token_config(tc) -> None:
    """The token adapter's settings before any data is read."""
    token_settings(tc)
    if tc.adapter != "token":
        return
    extra = sorted(set(tc.modalities))
    if extra:
        raise ConfigValueError(f"train.adapter = \"token\" aligns an image and a text entry; train.modalities adds "
                               f"{', '.join(extra)}. Use another adapter for more modalities.")


# ------------------------------------------------------------------------------------- inputs
class TokenView:
    """A token entry read as flat rows of L slots x (w + 1) values (see the module docstring);
    everything else (ids, key, name, path, ...) is the entry's."""

    def __init__(self, entry: Entry, length: int):
        if not entry.has_tokens:
            entry.token_lengths()  # CacheError: pooled features only, with the extract command
        self.entry, self.length, self.width = entry, int(length), entry.token_width
        self.layout = str(entry.key.get("token_layout", "positions"))

    def __getattr__(self, name):  # only called for names not found on the view itself
        if name == "entry":  # not set yet (unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.entry, name)

    def __repr__(self) -> str:
        return f"TokenView({self.entry.name!r}, {self.length} x {self.width})"

    @property
    def dim(self) -> int:
        return self.length * (self.width + 1)

    @property
    def layers(self) -> tuple:
        return ()

    @property
    def info(self) -> dict:
        """What the projector needs to know (stored with the run): width and layout."""
        return {"width": self.width, "layout": self.layout}

    def features(self, layer: int | None = None, rows: slice | None = None) -> np.ndarray:
        """(k, L * (w + 1)) float32 padded token rows (rows longer than L: their first L tokens)."""
        if layer is not None:
            raise CacheError(f"Token adapters read the tokens of {self.entry.name!r}, not hidden layer {layer}.")
        flat, lengths = self.entry.tokens(rows)
        return pad_tokens(flat, lengths, self.length)


def pad_tokens(flat: np.ndarray, lengths: np.ndarray, length: int) -> np.ndarray:
    """Flat tokens (T, w) of rows with ``lengths`` -> (k, length * (w + 1)) float32: each slot the
    token then 1, padding slots all zero (a row longer than ``length`` keeps its first tokens)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    k, w = len(lengths), flat.shape[1]
    out = np.zeros((k, length, w + 1), dtype=np.float32)
    row = np.repeat(np.arange(k), lengths)  # (T,) the row of each token
    pos = np.arange(len(flat)) - np.repeat(np.cumsum(lengths) - lengths, lengths)  # its slot within the row
    keep = pos < length
    out[row[keep], pos[keep], :w] = flat[keep]
    out[row[keep], pos[keep], w] = 1.0
    return out.reshape(k, length * (w + 1))


def pad_token_batch(tokens: torch.Tensor, mask: torch.Tensor, length: int) -> torch.Tensor:
    """Token states (B, T, w) with mask (B, T) (real tokens first, as right-padded batches and
    token grids are) -> (B, length * (w + 1)) rows laid out as :func:`pad_tokens` lays them out."""
    b, t, w = tokens.shape
    keep = min(t, length)
    out = tokens.new_zeros((b, length, w + 1))
    m = mask[:, :keep].to(tokens.dtype)
    out[:, :keep, :w] = tokens[:, :keep] * m.unsqueeze(-1)
    out[:, :keep, w] = m
    return out.reshape(b, length * (w + 1))


def token_views(entries: Mapping[str, Mapping[str, Entry]]) -> dict[str, dict[str, TokenView]]:
    """split -> modality -> TokenView, L per modality the longest row over every split."""
    try:
        longest = {m: max(int(entries[s][m].token_lengths().max(initial=0)) for s in entries)
                   for m in next(iter(entries.values()))}
    except CacheError as exc:
        raise TrainError(f"train.adapter = \"token\": {exc}") from None
    return {s: {m: TokenView(e, max(1, longest[m])) for m, e in by.items()} for s, by in entries.items()}


def token_info(entries: Mapping[str, object]) -> dict[str, dict] | None:
    """modality -> TokenView.info for the token views among ``entries`` (None when there are none)."""
    info = {m: e.info for m, e in entries.items() if isinstance(e, TokenView)}
    return info or None


def unpack(x: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, L * (w + 1)) -> (tokens (B, L, w), mask (B, L) bool)."""
    x = x.reshape(x.shape[0], -1, width + 1)
    return x[..., :width], x[..., width] > 0.5


def masked_mean(t: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, L, w), (B, L) -> (B, w): the mean over real tokens (0 for a row without any)."""
    m = mask.unsqueeze(-1).to(t.dtype)
    return (t * m).sum(1) / m.sum(1).clamp_min(1.0)


# ------------------------------------------------------------------------------------- modules
class AttentionPool(nn.Module):
    """(B, L, w), (B, L) -> (B, w): softmax(t . q / sqrt(w)) over real tokens; q starts at 0 (the mean)."""

    def __init__(self, width: int):
        super().__init__()
        self.query = nn.Parameter(torch.zeros(width))
        self.scale = width ** -0.5

    def forward(self, t: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        scores = (t @ self.query * self.scale).masked_fill(~mask, -1e30)
        weights = torch.softmax(scores, dim=1) * mask.to(t.dtype)  # a row without tokens pools to 0
        return (weights.unsqueeze(-1) * t).sum(1)


def pooling(kind: str, width: int) -> nn.Module | None:
    """None for the masked mean (a function, no parameters), else an AttentionPool."""
    return AttentionPool(width) if kind == "attention" else None


class ResidualBlock(nn.Module):
    """Pre-norm residual MLP block x + MLP(LayerNorm(x)), (..., w) -> (..., w): the ``residual``
    adapter's blocks (train.adapters) and, applied to each token, Freeze-Align's token projector."""

    def __init__(self, width: int, hidden: int, dropout: float):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(self.norm(x))


def branch(kind: str, width: int, tc) -> nn.Module:
    """identity | mlp (w -> hidden -> w) | token (a ResidualBlock on each token)."""
    if kind == "identity":
        return nn.Identity()
    if kind == "mlp":
        return nn.Sequential(nn.Linear(width, tc.hidden), nn.GELU(), nn.Dropout(tc.dropout), nn.Linear(tc.hidden, width))
    return ResidualBlock(width, tc.hidden, tc.dropout)


class VisionTokens(nn.Module):
    """Vision side: (B, L * (w + 1)) -> (B, dim) (module docstring)."""

    def __init__(self, width: int, layout: str, settings: Mapping[str, str], tc):
        super().__init__()
        self.width, self.has_cls = width, layout == GLOBAL_LAYOUT
        self.local = branch(settings["vision_local"], width, tc)
        self.cls = branch(settings["vision_cls"], width, tc)
        self.pool = pooling(settings["pooling"], width)
        self.out = nn.Linear(width, tc.dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t, mask = unpack(x, self.width)
        if self.has_cls:
            g, t, mask = t[:, 0], t[:, 1:], mask[:, 1:]
        else:
            g = masked_mean(t, mask)
        local = self.local(t)
        pooled = masked_mean(local, mask) if self.pool is None else self.pool(local, mask)
        return self.out(pooled + self.cls(g))


class TextTokens(nn.Module):
    """Text side: (B, L * (w + 1)) -> (B, dim); ``shared``: the vision side's local projector (patch)."""

    def __init__(self, width: int, settings: Mapping[str, str], tc, shared: nn.Module | None = None):
        super().__init__()
        self.width = width
        self._shared = [shared] if shared is not None else []  # a list: not registered twice (one copy saved)
        self.local = nn.Identity() if shared is not None else branch(settings["text_local"], width, tc)
        self.glob = branch(settings["text_global"], width, tc)
        self.pool = pooling(settings["pooling"], width)
        self.out = nn.Linear(width, tc.dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t, mask = unpack(x, self.width)
        local = (self._shared[0] if self._shared else self.local)(t)
        pooled = masked_mean(local, mask) if self.pool is None else self.pool(local, mask)
        return self.out(self.glob(pooled))


def build_token_adapters(dims: Mapping[str, int], tc, tokens: Mapping[str, Mapping] | None) -> nn.ModuleDict:
    """{"image": VisionTokens, "text": TextTokens} for ``tokens`` (modality -> {"width", "layout"})."""
    tokens = dict(tokens or {})
    if sorted(dims) != ["image", "text"] or sorted(tokens) != ["image", "text"]:
        raise TrainError("train.adapter = \"token\" needs token entries for exactly the image and text modalities "
                         f"(got {', '.join(sorted(tokens)) or 'none'} of {', '.join(sorted(dims))}); extract them "
                         "with --tokens grid:4 (or all).")
    settings = token_settings(tc)
    wi, wt = int(tokens["image"]["width"]), int(tokens["text"]["width"])
    for m, w in (("image", wi), ("text", wt)):
        if dims[m] % (w + 1):
            raise TrainError(f"{m}: {dims[m]} input values are not rows of {w}-wide tokens (+ mask).")
    vision = VisionTokens(wi, str(tokens["image"].get("layout", "positions")), settings, tc)
    shared = None
    if settings["text_local"] == "patch":
        if wi != wt:
            raise ConfigValueError(f"train.token.text_local = \"patch\" shares the vision token projector with the "
                                   f"text side, which needs equal token widths; image tokens are {wi}-wide, text "
                                   f"tokens {wt}-wide. Use text_local = \"token\" or an encoder pair of one width.")
        if settings["vision_local"] == "identity":
            raise ConfigValueError("train.token.text_local = \"patch\" shares vision_local, which is identity here; "
                                   "set vision_local to token or mlp.")
        shared = vision.local
    return nn.ModuleDict({"image": vision, "text": TextTokens(wt, settings, tc, shared)})
