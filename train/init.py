"""Closed-form starts for linear adapters (``train.init = "procrustes" | "cca"``).

On small data the closed-form baselines of ``train.baselines`` are already competitive with
InfoNCE; starting InfoNCE from them keeps that solution as the first candidate instead of
throwing it away. The baseline is fitted exactly as the test-time baseline row is (same train
pairs of the first two modalities, same standardised features, same ``dim``), and copied into
the adapters:

    baseline side m:  z = (x - mean_m) @ W_m,  W_m (d_m, k), k <= dim
    adapter m:        weight[:k] = W_m^T, weight[k:] = 0, bias[:k] = -mean_m @ W_m, bias[k:] = 0

so before any step every adapter output is the baseline's embedding padded with dim - k zeros:
the same cosine similarities, hence the same retrieval. The trainer evaluates this start as
"epoch 0", so best-epoch selection on val can keep it when training does not beat it.

Only ``linear`` adapters (one nn.Linear) have a closed form to copy; other adapters with an
init other than ``random`` are refused (a non-linear adapter has no weights that reproduce
the linear map exactly), as are more than two modalities (the baselines align one pair).
"""

from __future__ import annotations

import torch

from pipeline.config import TrainConfig
from train.adapters import AlignModel
from train.baselines import FROM_MOMENTS, Alignment, LinearMap, Moments, accumulate_moments, pair_moments
from train.data import TrainData
from train.errors import ConfigValueError
from train.stream import StreamSplit

RANDOM = "random"


def check_init(tc: TrainConfig) -> None:
    """ConfigValueError for a closed-form start the adapter or the modalities cannot take."""
    if tc.init == RANDOM:
        return
    if tc.init not in FROM_MOMENTS:
        raise ConfigValueError(f"train.init = {tc.init!r}: use random, {', '.join(FROM_MOMENTS)}.")
    if tc.adapter != "linear":
        raise ConfigValueError(f"train.init = {tc.init!r} copies a linear closed-form map into the adapters, so it "
                               f"needs train.adapter = \"linear\" (got {tc.adapter!r}); use train.init = \"random\" "
                               f"with non-linear adapters.")
    if tc.modalities:
        raise ConfigValueError(f"train.init = {tc.init!r} aligns one image-text pair; it cannot start "
                               f"extra modalities ({', '.join(tc.modalities)}). Use train.init = \"random\".")


def train_moments(data: TrainData) -> tuple[str, str, Moments]:
    """(a, b, moments) of the train pairs of the primary modality pair (streamed blocks when the
    train split is streamed): what the baselines and the closed-form starts are fitted on."""
    train = data.splits["train"]
    a, b = next(iter(data.splits["train"].retrieval))
    if isinstance(train, StreamSplit):
        return a, b, accumulate_moments(train.iter_pairs([a, b]))
    j = train.modalities.index
    return a, b, pair_moments(train.features[a], train.features[b], train.pairs[:, j(a)], train.pairs[:, j(b)])


@torch.no_grad()
def _copy(linear: torch.nn.Linear, fit: LinearMap) -> None:
    k = fit.weight.shape[1]
    linear.weight.zero_()
    linear.bias.zero_()
    linear.weight[:k] = fit.weight.T.to(linear.weight)
    linear.bias[:k] = (-fit.mean @ fit.weight).to(linear.bias)


def apply_init(model: AlignModel, data: TrainData, tc: TrainConfig) -> Alignment | None:
    """Overwrite the linear adapters with the closed-form ``tc.init`` fit; None for random."""
    check_init(tc)
    if tc.init == RANDOM:
        return None
    a, b, mom = train_moments(data)
    fit = FROM_MOMENTS[tc.init](mom, tc.dim)
    _copy(model.adapters[a], fit.a)
    _copy(model.adapters[b], fit.b)
    return fit
