"""The training stage: ``fit_adapters(cfg) -> RunResult``.

Trains one adapter per modality with symmetric InfoNCE (mean over modality pairs; ``train.loss``,
``loss_direction`` and ``normalize`` select VSE++, a one-directional or an unnormalised loss) on the train
split, evaluates val retrieval (and, with a reference entry, val linear CKA) every
``eval_every`` epochs, keeps the epoch with the best val mean recall, then reports test
recall next to the closed-form baselines and writes the run folder and the aligned entries.

The run folder is written whole: everything goes to a hidden staging folder that replaces
``<cache>/runs/<name>`` only once the run and its aligned entries are complete
(``pipeline.runs.staging_dir`` / ``commit``); an error or Ctrl-C leaves the previous run of that
name as it was. A diverged run is committed as it stands (history and last good checkpoint), unless
a finished run of that name exists: that one is kept untouched (``pipeline.runs.commit_failed``).

Scale: a train split with more pairs than ``train.max_rows_in_memory`` is streamed from the
cache in shuffled windows (``train.stream``); under ``torchrun`` the run uses
DistributedDataParallel, each rank embedding a shard of every global batch
(``train.distributed``); only rank 0 evaluates and writes, the other ranks wait on a barrier.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from pipeline import runs
from pipeline.config import PipelineConfig, TrainConfig, check_finite_values
from pipeline.errors import did_you_mean
from pipeline.progress import Progress
from pipeline.runs import RunMetrics
from pipeline.runtime import resolve_device, write_json
from train import outputs
from train.adapters import MAX_LOGIT_SCALE, AlignModel, check_adapter
from train.tokens import check_token_config, token_info
from train.api import describe_sources, save_adapters
from train.data import SPLITS, SplitData, Stats, TrainData, load_data, open_entry_for
from train.distributed import Dist, gather_with_grad, setup
from train.errors import ConfigValueError, TrainError, TrainingDiverged, out_of_range
from train.evaluate import Reference, baseline_metrics, check_finite, load_reference, retrieval_metrics, split_sizes
from train.losses import DIRECTIONS, LOSSES, check_loss, loss_label, multi_info_nce, pair_loss
from train.optim import SCHEDULES, lr_schedule, make_optimizer
from train.stream import StreamSplit
from train.tracking import Tracker, check_track_metrics, make_tracker
from train.wandb_log import check_settings, open_logger
from train.init import apply_init, check_init
from train.layers import check_layers, choose_layers
from train.structure import StructureTerm, check_structure
from train.subset import read_subset

log = logging.getLogger(__name__)

DIVERGE_FACTOR = 3.0  # after epoch 1, a loss above DIVERGE_FACTOR * max(log(batch), first-epoch loss) is "exploding"


@dataclass
class RunResult:
    """What a run produced. history: one dict per epoch (the rows of history.csv); metrics: the
    record written to metrics.json; entries: {split: {modality: aligned cache entry name}}."""

    name: str
    run_dir: Path
    best_epoch: int
    history: list[dict]
    metrics: RunMetrics
    entries: dict[str, dict[str, str]] = field(default_factory=dict)


# ----------------------------------------------------------------------------- setup
def check_config(tc: TrainConfig) -> None:
    """Name, range and device checks of the [train] section, before any data is read (the adapter's
    own hyperparameters: ``adapters.check_adapter``)."""
    check_finite_values(tc, "train")  # inf passes "> 0"; for sections built in code (the loader refuses it too)
    check_adapter(tc)
    if tc.schedule not in SCHEDULES:
        hint = did_you_mean(tc.schedule, SCHEDULES)
        raise ConfigValueError(f"Unknown schedule train.schedule = {tc.schedule!r}.{hint} "
                               f"Use one of: {', '.join(SCHEDULES)}.")
    for key, allowed in (("loss", LOSSES), ("loss_direction", DIRECTIONS)):
        value = getattr(tc, key)
        if value not in allowed:
            raise ConfigValueError(f"Unknown train.{key} = {value!r}.{did_you_mean(value, allowed)} "
                                   f"Use one of: {', '.join(allowed)}.")
    try:
        check_loss(tc.loss, tc.loss_direction)  # combinations: the sigmoid loss has no direction
    except ValueError as exc:
        raise ConfigValueError(str(exc)) from None
    rules = [("margin", tc.margin >= 0, ">= 0"), ("epochs", tc.epochs >= 1, ">= 1"), ("batch_size", tc.batch_size >= 2, ">= 2"),
             ("lr", tc.lr > 0, "> 0"), ("temperature", tc.temperature > 0, "> 0"),
             ("mixup", tc.mixup >= 0, ">= 0"), ("eval_every", tc.eval_every >= 1, ">= 1"),
             ("warmup_epochs", tc.warmup_epochs >= 0, ">= 0"), ("weight_decay", tc.weight_decay >= 0, ">= 0"),
             ("max_rows_in_memory", tc.max_rows_in_memory >= 0, ">= 0"), ("stream_block", tc.stream_block >= 1, ">= 1"),
             ("train_fraction", 0 < tc.train_fraction <= 1, "in (0, 1]")]
    for key, ok, allowed in rules:
        if not ok:
            raise out_of_range(key, getattr(tc, key), allowed)
    lowest = 1.0 / MAX_LOGIT_SCALE
    if tc.learnable_temperature and not lowest <= tc.temperature <= 1.0:
        raise ConfigValueError(f"train.temperature = {tc.temperature:g} with train.learnable_temperature = true: the "
                               f"learnable temperature is kept in [{lowest:g}, 1] (CLIP's clamp of the logit scale), so "
                               f"it cannot start there. Start it in [{lowest:g}, 1], or keep it fixed at "
                               f"{tc.temperature:g} (--set train.learnable_temperature=false).")
    for check in (check_structure, check_layers, check_init, check_token_config):  # their own modules
        check(tc)
    if tc.subset:
        read_subset(tc.subset)  # the file exists and reads as a subset (its ids are checked with the data)
    resolve_device(tc.device)  # DeviceError for names torch does not know, or CUDA without CUDA
    runs.check_names(tc)  # the run's name and its aligned entries' names, before any work


def check_train(tc: TrainConfig) -> None:
    """Every check ``fit_adapters`` makes before it reads data (a study checks each cell with it)."""
    check_config(tc)
    check_track_metrics(tc.track_metrics)
    check_settings(tc)


# ----------------------------------------------------------------------------- training
class _Embed(nn.Module):
    """All modalities in one forward call (what DDP wraps): list of (b, d_m) inputs ->
    (list of (b, dim) embeddings, logit scale)."""

    def __init__(self, model: AlignModel, modalities: list[str]):
        super().__init__()
        self.model, self.modalities = model, list(modalities)

    def forward(self, xs: list[torch.Tensor]) -> tuple[list[torch.Tensor], torch.Tensor]:
        return [self.model(m, x) for m, x in zip(self.modalities, xs)], self.model.logit_scale()


class Trainer:
    """Optimisation steps of one model on one train split.

    ``split`` is a ``SplitData`` (every pair on the device) or a ``StreamSplit`` (windows read
    from the cache); both expose ``features`` (modality -> (rows, d_m) device tensor) and
    ``windows()`` (an epoch's (k, M) pair rows into ``features``). Each step gathers a batch of
    pairs (rows copied into a static (batch, M) buffer), optionally mixes it (FuseMix latent
    mixup), computes the mean pairwise InfoNCE, back-propagates, applies AdamW and clamps a
    learnable temperature. On CUDA that whole step is captured once as a CUDA graph and
    replayed: with batch 64 the step is a few hundred microseconds of GPU work, and launching
    its ~100 kernels one by one from Python would cost several times more. Elsewhere (and with
    ``graph=False``) the same code runs eagerly. The loss is accumulated on the device and read
    once per epoch.

    dist: with several processes, the model is wrapped in DistributedDataParallel, rank r
    embeds rows [r b/N, (r+1) b/N) of each global batch of b pairs and the embeddings are
    all-gathered (see ``train.distributed``); CUDA graphs are off (DDP's gradient hooks and
    NCCL calls inside a captured graph would need static-graph DDP and a captured warm-up).
    """

    def __init__(self, model: AlignModel, split: SplitData | StreamSplit, tc: TrainConfig,
                 graph: bool | None = None, dist: Dist | None = None, stats: Stats | None = None):
        self.model, self.split, self.tc = model, split, tc
        self.dist = dist or Dist()
        self.batch = min(tc.batch_size, split.n_pairs)
        if self.batch % self.dist.world_size:
            raise TrainError(f"train.batch_size = {self.batch} (the global batch) is not divisible by the "
                             f"{self.dist.world_size} processes; use a multiple of {self.dist.world_size}.")
        shard = self.batch // self.dist.world_size
        self.shard = (self.dist.rank * shard, (self.dist.rank + 1) * shard)  # this rank's rows of a batch
        self.steps_per_epoch = split.n_pairs // self.batch
        self.device = split.device
        self.features = split.features  # modality -> device tensor the batch rows index
        embed = _Embed(model, split.modalities)
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel  # noqa: PLC0415

            embed = DistributedDataParallel(embed, device_ids=[self.device] if self.device.type == "cuda" else None,
                                            forward_sync_buffers=False)
        self.embed = embed
        self.graph = (self.device.type == "cuda" and not self.dist.enabled) if graph is None else graph
        if self.graph and self.dist.enabled:
            raise TrainError("CUDA graphs are not supported with several processes; use graph=False.")
        self.loss = pair_loss(tc, model.logit_bias)  # (a, b, logit_scale) -> scalar: train.loss, loss_direction, normalize
        self.opt = make_optimizer(model, tc, capturable=self.graph)
        self.lr_at = lr_schedule(tc, self.steps_per_epoch)
        self.step_count = 0
        self.rows = torch.zeros((self.batch, len(split.modalities)), dtype=torch.long,
                                device=self.device)  # (batch, M) static batch buffer
        self.perm = torch.arange(self.batch, device=self.device)  # (batch,) mixup partner rows
        self.lam = torch.ones((), device=self.device)  # mixup lambda
        self.total = torch.zeros((), device=self.device)  # summed loss of the current epoch
        self.structure = None if tc.structure_weight == 0 else StructureTerm(  # STRUCTURE regulariser
            tc, stats.mean if stats else {m: 0.0 for m in split.modalities},
            stats.std if stats else {m: 1.0 for m in split.modalities}, self.steps_per_epoch, self.device)
        self._graph = self._capture() if self.graph else None

    def batch_loss(self) -> torch.Tensor:
        """Forward on the batch in the static buffers: the InfoNCE loss of the whole global
        batch (the same value on every rank), differentiable w.r.t. this rank's shard."""
        lo, hi = self.shard
        xs = []
        for j, m in enumerate(self.split.modalities):
            f = self.features[m]
            x = f[self.rows[lo:hi, j]]  # (batch / N, d_m)
            if self.tc.mixup > 0:  # one lambda and one permutation of the global batch for every modality
                x = self.lam * x + (1.0 - self.lam) * f[self.rows[self.perm[lo:hi], j]]
            xs.append(x)
        zs, scale = self.embed(xs)
        if self.dist.enabled:
            zs = [gather_with_grad(z) for z in zs]  # (batch, dim): every rank sees all negatives
        loss = multi_info_nce(zs, scale, self.loss)
        if self.structure is not None:  # on the whole global batch, like the InfoNCE term
            xs = [gather_with_grad(x) for x in xs] if self.dist.enabled else xs
            loss = loss + self.structure(self.split.modalities, xs, zs)
        return loss

    def _body(self) -> None:
        """Forward, backward and update on the static buffers (also what the graph records)."""
        loss = self.batch_loss()
        loss.backward()
        self.opt.step()
        if self.model.learnable_scale:  # learnable_temperature, or the sigmoid loss's scale
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
        """One update on the global batch of pairs ``rows`` (batch, M) (rows into ``features``)."""
        self._set_lr(self.lr_at(self.step_count))
        if self.structure is not None:
            self.structure.set_step(self.step_count)
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
        """One pass over the train pairs: per window (one in memory), a device permutation of
        its pairs, in full batches. Returns the mean loss as a 0-d device tensor (no host sync
        inside the epoch)."""
        b, steps = self.batch, 0
        self.total.zero_()
        self.model.train()
        for pairs in self.split.windows():
            order = pairs[torch.randperm(pairs.shape[0], device=pairs.device, generator=gen)]  # (k, M)
            for s in range(pairs.shape[0] // b):
                self.step(order[s * b:(s + 1) * b], gen, rng)
                steps += 1
        return self.total / max(steps, 1)


def _diverged(loss: float, first: float | None, batch: int) -> bool:
    """Non-finite, or (after the first epoch, which sets the scale) exploding."""
    if not math.isfinite(loss):
        return True
    return first is not None and loss > DIVERGE_FACTOR * max(math.log(batch), first)


@dataclass
class _Best:
    epoch: int = 0
    score: float = -1.0
    state: dict | None = None
    val: dict = field(default_factory=dict)


def _evaluate(model, data: TrainData, reference: Reference | None, tracker: Tracker | None = None) -> dict[str, float]:
    row = {f"val_{k}": v for k, v in retrieval_metrics(model, data.splits["val"]).items()}
    if reference is not None:
        row.update({f"val_cka_{m}": v for m, v in reference.cka(model, data.splits["val"]).items()})
    if tracker is not None:  # the Platonic criterion on val (train.tracking)
        row.update(tracker.row(model))
    return row


@dataclass
class _RunIO:
    """Where a run writes while training: name, folder written into (the staging folder on
    rank 0), the run folder it becomes, checkpoint writer, progress-bar switch."""

    name: str
    run_dir: Path
    final: Path
    save: Callable[[_Best], str]
    progress: bool | None
    log_epoch: Callable[[dict], None] = lambda row: None  # experiment tracking (train.wandb_log)


def _train(model: AlignModel, data: TrainData, reference: Reference | None, tc: TrainConfig,
           io: _RunIO, dist: Dist | None = None, tracker: Tracker | None = None) -> tuple[list[dict], _Best]:
    """The epoch loop: returns the history rows and the best (by val mean recall) epoch.

    With several processes every rank trains; rank 0 alone evaluates, keeps the best state and
    writes, while the others wait on a barrier (the loss and the weights are the same on every
    rank, so every rank takes the same decisions)."""
    dist = dist or Dist()
    run_dir = io.run_dir
    train = data.splits["train"]
    trainer = Trainer(model, train, tc, dist=dist, stats=data.stats)
    gen = torch.Generator(device=trainer.device).manual_seed(tc.seed)
    rng = np.random.default_rng(tc.seed)
    history: list[dict] = []
    best, first = _Best(), None
    start = _evaluate(model, data, reference, tracker) if dist.is_main else {}  # the weights before any step
    skipped = {k: float("nan") for k in start}  # columns of epochs without eval
    if tc.init != "random" and dist.is_main:  # the closed-form start is "epoch 0", a candidate for the best
        best = _Best(0, start["val_mean_R"], {k: v.detach().clone() for k, v in model.state_dict().items()},
                     {k[4:]: v for k, v in start.items() if k.startswith("val_")})
        io.save(best)
    bar = Progress(tc.epochs, f"fit {io.name}", "epoch", enabled=io.progress if dist.is_main else False)
    for epoch in range(1, tc.epochs + 1):
        t0 = time.perf_counter()
        loss = float(trainer.epoch(gen, rng))
        row = {"epoch": epoch, "train_loss": loss, "lr": trainer.lr,
               "temperature": model.temperature()}
        if model.logit_bias is not None:  # the sigmoid loss's learnt bias
            row["logit_bias"] = float(model.logit_bias.detach())
        if _diverged(loss, first, min(tc.batch_size, train.n_pairs)) or not check_finite(model):
            history.append(row)
            if dist.is_main:
                outputs.write_history(run_dir, history)
            raise TrainingDiverged(
                f"Training diverged at epoch {epoch}: train loss {loss:.4g} (first epoch: {first}). Stopped; "
                f"{{kept}}. Lower --lr (now {tc.lr:g}), raise --temperature, or add warm-up "
                f"(--set train.warmup_epochs=1).", best.epoch if best.state else None)
        first = loss if first is None else first
        if not dist.is_main:
            dist.barrier()  # rank 0 evaluates and writes
            history.append(row)
            continue
        if epoch % tc.eval_every == 0 or epoch == tc.epochs:
            row.update(_evaluate(model, data, reference, tracker))
            if row["val_mean_R"] > best.score:
                best = _Best(epoch, row["val_mean_R"], {k: v.detach().clone() for k, v in model.state_dict().items()},
                             {k[4:]: v for k, v in row.items() if k.startswith("val_")})
                io.save(best)
        else:
            row.update(skipped)
        row["time_s"] = time.perf_counter() - t0
        history.append(row)
        outputs.write_history(run_dir, history)
        io.log_epoch(row)
        bar.set_postfix(loss=f"{loss:.3f}", val_R=f"{row.get('val_mean_R', float('nan')):.3f}")
        bar.update()
        dist.barrier()
    bar.close()
    return history, best


def fit_adapters(cfg: PipelineConfig, *, require_reference: bool | None = None,
                 progress: bool | None = None) -> RunResult:
    """Train, select, evaluate and write a run; see the module docstring.

    require_reference: error (instead of warn and skip) when ``cfg.train.reference`` is not
        cached; None = only when it differs from the built-in default.
    progress: tqdm bar over epochs; None = only on a terminal.

    Under torchrun (or inside an initialised process group) every rank calls this; all of them
    return rank 0's RunResult.
    """
    tc = cfg.train
    check_train(tc)
    dist, device = setup(tc.device)
    try:
        return _fit(cfg, dist, device, require_reference, progress)
    finally:
        dist.close()


def _fit(cfg: PipelineConfig, dist: Dist, device: torch.device, require_reference: bool | None,
         progress: bool | None) -> RunResult:
    tc = cfg.train
    if require_reference is None:
        require_reference = tc.reference != TrainConfig().reference
    t_start = time.perf_counter()
    choice = choose_layers(cfg, {m: open_entry_for(cfg, "train", e) for m, e in runs.modality_entries(tc).items()},
                           str(device))
    data = load_data(cfg, device, splits=SPLITS if dist.is_main else ("train",), layers=choice.layers)
    try:
        reference = load_reference(cfg, data, require_reference) if dist.is_main else None
        name = runs.default_run_name(tc)
        final = runs.run_dir(cfg.data.cache, name)
        run_dir = runs.staging_dir(cfg.data.cache, name) if dist.is_main else final  # only rank 0 writes
        try:
            subset = {"subset": data.subset.record()} if data.subset is not None else {}
            if dist.is_main:
                write_json(run_dir / runs.CONFIG, {"source": cfg.source, **cfg.to_dict(), **subset})
                if data.subset is not None:  # the evaluation of the run reads this copy (train.subset)
                    (run_dir / runs.SUBSET).write_text(data.subset.text, encoding="utf-8")
            torch.manual_seed(tc.seed)
            model = AlignModel(data.dims, tc, token_info(data.splits["train"].entries)).to(device)
            apply_init(model, data, tc)  # closed-form start (train.init), same on every rank
            sources = describe_sources(data.splits["train"].entries, data.stats, data.layers)
            meta = {"run": name, "dataset": cfg.data.dataset, "layers": choice.to_json(),
                    "train_images": data.train_images, **subset}
            if dist.enabled:
                meta["processes"] = dist.world_size

            def save(best: _Best) -> str:
                return save_adapters(run_dir, model, tc, sources, {**meta, "best_epoch": best.epoch, "val": best.val})

            tracker = make_tracker(cfg, data, reference) if dist.is_main else None
            logger = open_logger(cfg, name, run_dir) if dist.is_main else None
            io = _RunIO(name, run_dir, final, save, progress, logger.log_epoch if logger else (lambda row: None))
            history, best = _train(model, data, reference, tc, io, dist, tracker)
            data.splits["train"].close()  # stop reading ahead; free the streaming buffers
            result = _finish(cfg, data, reference, model, history, best, meta, io, device, t_start,
                             tracker, logger) if dist.is_main else None
            if dist.is_main:
                runs.commit(run_dir, cfg.data.cache, name)
        except TrainingDiverged as exc:
            if not dist.is_main:
                raise
            raise exc.with_record(final, runs.commit_failed(run_dir, cfg.data.cache, name)) from None
        finally:
            if dist.is_main:
                runs.discard(run_dir)  # an error or Ctrl-C: the previous run stays (no-op after commit)
    finally:
        data.close()
    dist.barrier()  # the other ranks wait here while rank 0 writes
    return dist.broadcast(result)


def _finish(cfg, data, reference, model, history, best, meta, io: _RunIO, device, t_start,
            tracker=None, logger=None) -> RunResult:
    """Rank 0 after training: best weights, test metrics, baselines, run files, aligned entries
    (tagged with the adapters' sha256), all in the staging folder ``io.run_dir``; the tracked
    Platonic values (``tracker``) and the experiment log's final tables (``logger``)."""
    tc, run_dir = cfg.train, io.run_dir
    train_time = time.perf_counter() - t_start
    model.load_state_dict(best.state)
    sha = io.save(best)
    test = {runs.ADAPTERS_METHOD: retrieval_metrics(model, data.splits["test"]),  # no closed-form baselines on tokens
            **({} if tc.adapter == "token" else baseline_metrics(data, tc.dim))}
    tracking = (tracker.summary(next(r for r in history if r["epoch"] == best.epoch)) if tracker is not None
                else None)
    metrics = RunMetrics(
        run=meta["run"], dataset=meta["dataset"], processes=meta.get("processes", 1), run_dir=str(io.final),
        best_epoch=best.epoch, epochs_run=len(history), test=test, val_best=best.val, sizes=split_sizes(data),
        device=str(device), streamed=data.streaming, temperature=model.temperature(), train_time_s=train_time,
        adapter_sha256=sha, train_fraction=tc.train_fraction,
        reference=None if reference is None else
        {"entry": reference.name, "split": "val", "raw_cka": reference.raw_cka,
         "aligned_cka": {m: best.val.get(f"cka_{m}") for m in reference.rows}}, tracking=tracking)
    metrics.write(run_dir / runs.METRICS)
    curves = outputs.plot_curves(run_dir, history, reference.raw_cka if reference else None,
                                 loss_label(tc.loss, tc.loss_direction, tc.normalize))
    entries = outputs.write_aligned_entries(cfg, meta["run"], run_dir, model, data, sha)
    if logger is not None:
        logger.finish(metrics.to_json(), history, [curves])
    return RunResult(meta["run"], io.final, best.epoch, history, metrics, entries)
