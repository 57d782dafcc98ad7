"""Evaluation during and after training: embeddings, retrieval recall, and linear CKA against
a reference model's features."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from pipeline.cache import CacheError, find_entry
from pipeline.config import PipelineConfig
from pipeline.join import join_rows
from similarity.metrics import cka
from train.adapters import AlignModel
from train.data import SplitData, TrainData, read_features
from train.errors import TrainError
from train.baselines import FROM_MOMENTS
from train.init import train_moments
from train.retrieval import retrieval_summary

log = logging.getLogger(__name__)

EMBED_BLOCK = 8192  # rows embedded at once (bounds activation memory at evaluation)


@torch.no_grad()
def embed(model: AlignModel, modality: str, x: torch.Tensor) -> torch.Tensor:
    """(n, d_modality) standardised features -> (n, dim) adapter outputs (not normalised)."""
    was_training = model.training
    model.eval()
    out = torch.cat([model(modality, x[s:s + EMBED_BLOCK]) for s in range(0, max(1, x.shape[0]), EMBED_BLOCK)])
    model.train(was_training)
    return out


def check_finite(model: AlignModel) -> bool:
    """True when every parameter and buffer is finite."""
    return all(bool(torch.isfinite(t).all()) for t in list(model.parameters()) + list(model.buffers()))


def retrieval_metrics(model: AlignModel, split: SplitData) -> dict[str, float]:
    """Recall of the primary pair (first two modalities) on one split; with more than two
    modalities also ``<a>-<b>/<key>`` for every other pair."""
    out: dict[str, float] = {}
    for n, ((a, b), r) in enumerate(split.retrieval.items()):
        ea = embed(model, a, split.features[a][r.rows_a])
        eb = embed(model, b, split.features[b][r.rows_b])
        res = retrieval_summary(ea, eb, r.b_to_a)
        out.update(res if n == 0 else {f"{a}-{b}/{k}": v for k, v in res.items()})
    return out


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA of paired (n, d_x) and (n, d_y) features (Kornblith et al. 2019), computed in
    float64 on x's device by ``similarity.metrics.cka`` (feature-space form, no n x n matrix):
    ||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F) with column-centred Xc, Yc."""
    return cka(x, y, kernel="linear", device=x.device)


@dataclass
class Reference:
    """A reference model's val features lined up with the first two modalities, one row per image.

    features: (n, d_ref) on the training device; rows: modality -> (n,) entry rows of that
    modality; raw_cka: modality -> CKA of the unaligned (standardised) features with the reference.
    """

    name: str
    features: torch.Tensor
    rows: dict[str, torch.Tensor]
    raw_cka: dict[str, float]

    def cka(self, model: AlignModel, split: SplitData) -> dict[str, float]:
        """modality -> linear CKA(aligned embeddings, reference) on this split's rows."""
        return {m: linear_cka(embed(model, m, split.features[m][r]), self.features) for m, r in self.rows.items()}


def load_reference(cfg: PipelineConfig, data: TrainData, required: bool) -> Reference | None:
    """The reference entry on the val split, or None (with one warning) when it is not cached
    and not ``required``. Empty ``cfg.train.reference`` means no reference."""
    name = cfg.train.reference
    if not name:
        return None
    val = data.splits["val"]
    try:
        ref = find_entry(cfg.data.cache, cfg.data.dataset, "val", name, cfg.data.data_dir)
    except CacheError as exc:
        if required:
            raise TrainError(f"Reference entry {name!r} is not in the cache for the val split: {exc} "
                             f"Extract it (`extract --encoder {name} --split val`) or pass --reference ''.") from None
        log.warning("reference entry %r not cached for %s/val: skipping the CKA curve", name, cfg.data.dataset)
        return None
    mods = val.modalities[:2]
    _, rows = join_rows([val.entries[m] for m in mods] + [ref])
    dev = val.pairs.device
    ref_x = torch.from_numpy(read_features(ref)[rows[-1]]).to(dev)
    mod_rows = {m: torch.as_tensor(r, device=dev) for m, r in zip(mods, rows)}
    raw = {m: linear_cka(val.features[m][r], ref_x) for m, r in mod_rows.items()}
    return Reference(name, ref_x, mod_rows, raw)


# ----------------------------------------------------------------------------- final metrics
def baseline_metrics(data: TrainData, dim: int) -> dict[str, dict[str, float]]:
    """Test recall of each closed-form baseline, fitted on the train pairs of the first two
    modalities (their moments accumulated over blocks, streamed when the train split is). A
    baseline that maps a test row to zero (degenerate train pairs, e.g. a constant side when not
    standardising) has no cosine ranking: it is left out, with a warning."""
    test = data.splits["test"]
    a, b, mom = train_moments(data)
    r = test.retrieval[(a, b)]
    out = {}
    for name, fit in FROM_MOMENTS.items():
        al = fit(mom, dim)
        za, zb = al.a(test.features[a][r.rows_a]), al.b(test.features[b][r.rows_b])
        zero = {m: int((z == 0).all(1).sum()) for m, z in ((a, za), (b, zb))}
        if any(zero.values()):
            log.warning("baseline %s left out of metrics.json: fitted on %d train pairs it maps %s test rows to "
                        "zero, which have no cosine ranking", name, mom.n,
                        " and ".join(f"{v} {m}" for m, v in zero.items() if v))
            continue
        out[name] = retrieval_summary(za, zb, r.b_to_a)
    return out


def split_sizes(data: TrainData) -> dict:
    """Rows per split and modality (metrics.json's ``sizes``)."""
    out = {}
    for s, sd in data.splits.items():
        (a, b), r = next(iter(sd.retrieval.items()))
        out[s] = {"pairs": sd.n_pairs, a: int(r.rows_a.shape[0]), b: int(r.rows_b.shape[0])}
    if "train" in out and data.train_pairs_total:
        out["train"]["pairs_before_fraction"] = data.train_pairs_total
    return out
