"""The training stage: ``fit_adapters(cfg) -> RunResult``.

Trains one adapter per modality with symmetric InfoNCE (mean over modality pairs) on the train
split, evaluates val retrieval (and, with a reference entry, val linear CKA) every
``eval_every`` epochs, keeps the epoch with the best val mean recall, then reports test
recall next to the closed-form baselines and writes the run folder and the aligned entries.
"""

from __future__ import annotations

import difflib
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from pipeline.config import PipelineConfig, TrainConfig
from train import outputs
from train.adapters import AlignModel, check_adapter_name
from train.api import describe_sources, save_adapters
from train.baselines import BASELINES
from train.data import SplitData, TrainData, TrainError, load_data
from train.evaluate import Reference, check_finite, load_reference, retrieval_metrics
from train.losses import multi_info_nce
from train.retrieval import recall_at_k

log = logging.getLogger(__name__)

SCHEDULES = ("constant", "cosine")  # learning-rate shape after the linear warm-up
DIVERGE_FACTOR = 3.0  # an epoch loss above DIVERGE_FACTOR * max(log(batch), first-epoch loss) is "exploding"


class TrainingDiverged(TrainError):
    """The loss became non-finite or exploded; the last good checkpoint is kept."""


@dataclass
class RunResult:
    """What a run produced. history: one dict per epoch (the rows of history.csv); metrics: the
    content of metrics.json; entries: {split: {modality: aligned cache entry name}}."""

    name: str
    run_dir: Path
    best_epoch: int
    history: list[dict]
    metrics: dict
    entries: dict[str, dict[str, str]] = field(default_factory=dict)


# ----------------------------------------------------------------------------- setup
def resolve_device(name: str) -> torch.device:
    """``auto`` -> cuda when available, else cpu; an unusable name is a TrainError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise TrainError(f"Unknown device {name!r}; use auto, cpu, cuda or cuda:N.") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise TrainError(f"Device {name!r} requested but CUDA is not available; use --device cpu.")
    return dev


def check_config(tc: TrainConfig) -> None:
    """Range and name checks of the [train] section."""
    check_adapter_name(tc.adapter)
    if tc.schedule not in SCHEDULES:
        close = difflib.get_close_matches(tc.schedule, SCHEDULES, n=1)
        hint = f" Did you mean: {close[0]}?" if close else ""
        raise TrainError(f"Unknown schedule {tc.schedule!r}.{hint} Use one of: {', '.join(SCHEDULES)}.")
    rules = [("epochs", tc.epochs >= 1), ("batch_size", tc.batch_size >= 2), ("lr", tc.lr > 0),
             ("dim", tc.dim >= 1), ("temperature", tc.temperature > 0), ("mixup", tc.mixup >= 0),
             ("eval_every", tc.eval_every >= 1), ("warmup_epochs", tc.warmup_epochs >= 0),
             ("weight_decay", tc.weight_decay >= 0), ("dropout", 0 <= tc.dropout < 1),
             ("hidden", tc.hidden >= 1), ("bottleneck", tc.bottleneck >= 1), ("depth", tc.depth >= 0)]
    for key, ok in rules:
        if not ok:
            raise TrainError(f"train.{key} = {getattr(tc, key)!r} is out of range.")


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


# ----------------------------------------------------------------------------- training
class Trainer:
    """Optimisation steps of one model on one train split.

    Each step gathers a batch of pairs from the device-resident features (rows copied into a
    static (batch, M) buffer), optionally mixes it (FuseMix latent mixup), computes the mean
    pairwise InfoNCE, back-propagates, applies AdamW and clamps a learnable temperature.
    On CUDA that whole step is captured once as a CUDA graph and replayed: with batch 64 the
    step is a few hundred microseconds of GPU work, and launching its ~100 kernels one by one
    from Python would cost several times more. Elsewhere (and with ``graph=False``) the same
    code runs eagerly. The loss is accumulated on the device and read once per epoch.
    """

    def __init__(self, model: AlignModel, split: SplitData, tc: TrainConfig, graph: bool | None = None):
        self.model, self.split, self.tc = model, split, tc
        self.batch = min(tc.batch_size, split.n_pairs)
        self.steps_per_epoch = split.n_pairs // self.batch
        device = split.pairs.device
        self.graph = device.type == "cuda" if graph is None else graph
        self.opt = make_optimizer(model, tc, capturable=self.graph)
        self.lr_at = lr_schedule(tc, self.steps_per_epoch)
        self.step_count = 0
        self.rows = split.pairs[:self.batch].clone()  # (batch, M) static batch buffer
        self.perm = torch.arange(self.batch, device=device)  # (batch,) mixup partner rows
        self.lam = torch.ones((), device=device)  # mixup lambda
        self.total = torch.zeros((), device=device)  # summed loss of the current epoch
        self._graph = self._capture() if self.graph else None

    def _body(self) -> None:
        """Forward, backward and update on the static buffers (also what the graph records)."""
        mods = self.split.modalities
        xs = [self.split.features[m][self.rows[:, j]] for j, m in enumerate(mods)]  # M x (batch, d_m)
        if self.tc.mixup > 0:  # one lambda and one permutation shared by every modality
            xs = [self.lam * x + (1.0 - self.lam) * x[self.perm] for x in xs]
        loss = multi_info_nce([self.model(m, x) for m, x in zip(mods, xs)], self.model.logit_scale())
        loss.backward()
        self.opt.step()
        if self.tc.learnable_temperature:
            self.model.clamp_temperature()
        self.total += loss.detach()

    def _capture(self) -> torch.cuda.CUDAGraph:
        """Record ``_body`` as a CUDA graph, after warm-up steps whose effects are then undone."""
        saved = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                self.opt.zero_grad(set_to_none=True)
                self._body()
        torch.cuda.current_stream().wait_stream(side)
        self.opt.zero_grad(set_to_none=True)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._body()
        with torch.no_grad():  # back to the initial weights and a fresh optimizer state
            for k, v in self.model.state_dict().items():
                v.copy_(saved[k])
            for state in self.opt.state.values():
                for t in state.values():
                    if isinstance(t, torch.Tensor):
                        t.zero_()
            self.total.zero_()
        return graph

    def _set_lr(self, lr: float) -> None:
        for group in self.opt.param_groups:
            if isinstance(group["lr"], torch.Tensor):
                group["lr"].fill_(lr)
            else:
                group["lr"] = lr

    @property
    def lr(self) -> float:
        """Learning rate of the last step."""
        return self.lr_at(max(0, self.step_count - 1))

    def step(self, rows: torch.Tensor, gen: torch.Generator, rng: np.random.Generator) -> None:
        """One update on the pairs ``rows`` (batch, M) (entry row of each modality)."""
        self._set_lr(self.lr_at(self.step_count))
        self.rows.copy_(rows)
        if self.tc.mixup > 0:
            self.lam.fill_(float(rng.beta(self.tc.mixup, self.tc.mixup)))
            self.perm.copy_(torch.randperm(self.batch, device=self.perm.device, generator=gen))
        if self._graph is not None:
            self._graph.replay()
        else:
            self.opt.zero_grad(set_to_none=True)
            self._body()
        self.step_count += 1

    def epoch(self, gen: torch.Generator, rng: np.random.Generator) -> torch.Tensor:
        """One pass over a device permutation of the train pairs (full batches only).

        Returns the mean loss as a 0-d device tensor (no host sync inside the epoch).
        """
        n, b = self.split.n_pairs, self.batch
        order = self.split.pairs[torch.randperm(n, device=self.split.pairs.device, generator=gen)]  # (n, M)
        self.total.zero_()
        self.model.train()
        for s in range(self.steps_per_epoch):
            self.step(order[s * b:(s + 1) * b], gen, rng)
        return self.total / self.steps_per_epoch


def _diverged(loss: float, first: float | None, batch: int) -> bool:
    if not math.isfinite(loss):
        return True
    return loss > DIVERGE_FACTOR * max(math.log(batch), first if first is not None else 0.0)


@dataclass
class _Best:
    epoch: int = 0
    score: float = -1.0
    state: dict | None = None
    val: dict = field(default_factory=dict)


def _evaluate(model, data: TrainData, reference: Reference | None) -> dict[str, float]:
    row = {f"val_{k}": v for k, v in retrieval_metrics(model, data.splits["val"]).items()}
    if reference is not None:
        row.update({f"val_cka_{m}": v for m, v in reference.cka(model, data.splits["val"]).items()})
    return row


@dataclass
class _RunIO:
    """Where a run writes while training: name, folder, checkpoint writer, progress-bar switch."""

    name: str
    run_dir: Path
    save: Callable[[_Best], str]
    progress: bool | None


def _train(model: AlignModel, data: TrainData, reference: Reference | None, tc: TrainConfig,
           io: _RunIO) -> tuple[list[dict], _Best]:
    """The epoch loop: returns the history rows and the best (by val mean recall) epoch."""
    run_dir = io.run_dir
    train = data.splits["train"]
    trainer = Trainer(model, train, tc)
    gen = torch.Generator(device=train.pairs.device).manual_seed(tc.seed)
    rng = np.random.default_rng(tc.seed)
    history: list[dict] = []
    best, first = _Best(), None
    skipped = {k: float("nan") for k in _evaluate(model, data, reference)}  # columns of epochs without eval
    bar = tqdm(range(1, tc.epochs + 1), desc=f"fit {io.name}", unit="epoch",
               disable=None if io.progress is None else not io.progress)
    for epoch in bar:
        t0 = time.perf_counter()
        loss = float(trainer.epoch(gen, rng))
        row = {"epoch": epoch, "train_loss": loss, "lr": trainer.lr,
               "temperature": model.temperature()}
        if _diverged(loss, first, min(tc.batch_size, train.n_pairs)) or not check_finite(model):
            history.append(row)
            outputs.write_history(run_dir, history)
            kept = (f"the last good checkpoint (epoch {best.epoch}) is kept in {run_dir}" if best.state
                    else f"no checkpoint was written (history in {run_dir})")
            raise TrainingDiverged(
                f"Training diverged at epoch {epoch}: train loss {loss:.4g} (first epoch: {first}). Stopped; "
                f"{kept}. Lower --lr (now {tc.lr:g}), raise --temperature, or add warm-up "
                f"(--set train.warmup_epochs=1).")
        first = loss if first is None else first
        if epoch % tc.eval_every == 0 or epoch == tc.epochs:
            row.update(_evaluate(model, data, reference))
            if row["val_mean_R"] > best.score:
                best = _Best(epoch, row["val_mean_R"], {k: v.detach().clone() for k, v in model.state_dict().items()},
                             {k[4:]: v for k, v in row.items() if k.startswith("val_")})
                io.save(best)
        else:
            row.update(skipped)
        row["time_s"] = time.perf_counter() - t0
        history.append(row)
        outputs.write_history(run_dir, history)
        bar.set_postfix(loss=f"{loss:.3f}", val_R=f"{row.get('val_mean_R', float('nan')):.3f}")
    return history, best


# ----------------------------------------------------------------------------- final metrics
def baseline_metrics(data: TrainData, dim: int) -> dict[str, dict[str, float]]:
    """Test recall of each closed-form baseline, fitted on the train pairs of the first two modalities."""
    train, test = data.splits["train"], data.splits["test"]
    (a, b), r = next(iter(test.retrieval.items()))
    out = {}
    for name, fit in BASELINES.items():
        al = fit(train.features[a], train.features[b], train.pairs[:, 0], train.pairs[:, 1], dim)
        out[name] = recall_at_k(al.a(test.features[a][r.rows_a]), al.b(test.features[b][r.rows_b]), r.b_to_a)
    return out


def _sizes(data: TrainData) -> dict:
    out = {}
    for s, sd in data.splits.items():
        (a, b), r = next(iter(sd.retrieval.items()))
        out[s] = {"pairs": sd.n_pairs, a: int(r.rows_a.shape[0]), b: int(r.rows_b.shape[0])}
    return out


def fit_adapters(cfg: PipelineConfig, *, require_reference: bool | None = None,
                 progress: bool | None = None) -> RunResult:
    """Train, select, evaluate and write a run; see the module docstring.

    require_reference: error (instead of warn and skip) when ``cfg.train.reference`` is not
        cached; None = only when it differs from the built-in default.
    progress: tqdm bar over epochs; None = only on a terminal.
    """
    tc = cfg.train
    check_config(tc)
    device = resolve_device(tc.device)
    if require_reference is None:
        require_reference = tc.reference != TrainConfig().reference
    t_start = time.perf_counter()
    data = load_data(cfg, device)
    reference = load_reference(cfg, data, require_reference)
    name = outputs.default_run_name(cfg)
    run_dir = outputs.run_dir_for(cfg, name)
    run_dir.mkdir(parents=True, exist_ok=True)
    outputs.write_json(run_dir / outputs.CONFIG, {"source": cfg.source, **cfg.to_dict()})
    torch.manual_seed(tc.seed)
    model = AlignModel(data.dims, tc).to(device)
    sources = describe_sources(data.splits["train"].entries, data.stats)
    meta = {"run": name, "dataset": cfg.data.dataset}

    def save(best: _Best) -> str:
        return save_adapters(run_dir, model, tc, sources, {**meta, "best_epoch": best.epoch, "val": best.val})

    history, best = _train(model, data, reference, tc, _RunIO(name, run_dir, save, progress))
    train_time = time.perf_counter() - t_start
    model.load_state_dict(best.state)
    sha = save(best)
    test = {"infonce": retrieval_metrics(model, data.splits["test"]), **baseline_metrics(data, tc.dim)}
    metrics = {**meta, "run_dir": str(run_dir), "best_epoch": best.epoch, "epochs_run": len(history),
               "test": test, "val_best": best.val, "sizes": _sizes(data), "device": str(device),
               "temperature": model.temperature(), "train_time_s": train_time,
               "reference": None if reference is None else
               {"entry": reference.name, "split": "val", "raw_cka": reference.raw_cka,
                "aligned_cka": {m: best.val.get(f"cka_{m}") for m in reference.rows}}}
    outputs.write_json(run_dir / outputs.METRICS, metrics)
    outputs.plot_curves(run_dir, history, reference.raw_cka if reference else None)
    entries = outputs.write_aligned_entries(cfg, name, run_dir, model, data, sha)
    return RunResult(name, run_dir, best.epoch, history, metrics, entries)
