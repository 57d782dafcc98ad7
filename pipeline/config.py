"""Configuration: one frozen dataclass per stage, mirrored by ``pipeline.toml``.

The defaults below ARE the defaults of the tool (the original experiment: Flickr30k,
ResNet-18, GPT-2, DINOv2). ``pipeline.toml`` repeats them with comments; a test checks
that the two agree. Precedence, lowest first: these defaults, the TOML file
(``--config PATH``, else ``./pipeline.toml`` when present), ``--set section.key=value``
overrides, then explicit command-line options.

Unknown keys and values of the wrong type are errors that name the key.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

from pipeline.errors import PipelineError, did_you_mean

DEFAULT_CONFIG_FILE = "pipeline.toml"  # looked up in the current directory


class ConfigError(PipelineError, ValueError):
    """A config file or override that does not fit the schema."""


@dataclass(frozen=True)
class DataConfig:
    dataset: str = "flickr30k"  # flickr30k | coco | imagefolder | hf:<hub id or saved path>
    data_dir: str = "data/flickr30k"  # folder holding the dataset files (see README: data layout)
    captions: str = "longest"  # caption policy: longest | first | all (one row per caption, ids <image>#k)
    on_empty: str = "error"  # empty caption: error | skip (logged, recorded in the cache)
    missing: str = "error"  # missing image file: error | skip (logged, recorded in the cache)
    options: dict = field(default_factory=dict)  # the format's own options, e.g. {"caption_column": "text"}
    #   (imagefolder), {"restval": "train"} (coco); README: Datasets
    cache: str = "cache"  # feature-cache directory: <cache>/<format>-<data folder>-<hash>/<split>/<entry>.h5|.zarr
    label_from: str = "label"  # zero-shot class labels: a metadata column (imagefolder) | dir (first folder of file_name)
    language: str = "en"  # caption language extract and training read: caption_<lang> columns (docs/languages.md)
    default_language: str = "en"  # the language of the plain caption column; its entries keep their old names


@dataclass(frozen=True)
class ExtractConfig:
    encoders: tuple[str, ...] = ("resnet18", "gpt2", "dinov2")  # registry names (extract --list-encoders)
    split: str = "all"  # a split the dataset has (train, val, test, restval, ...) | all (= every split it has)
    format: str = "h5"  # cache format for new entries: h5 | zarr
    batch_size: int = 64  # items per forward pass
    precision: str = "fp32"  # fp32 | bf16 | fp16 (autocast; features are stored as float32)
    device: str = "auto"  # auto (cuda when present) | cpu | cuda | cuda:N
    workers: int = -1  # DataLoader worker processes; -1 = min(8, CPU cores - 1), 0 for text on CPU
    chunk_rows: int = 1024  # rows per resumable chunk (a multiple of batch_size keeps batches aligned)
    layers: str = "last"  # last | all (also store the pooled features of every hidden layer)
    on_error: str = "error"  # unreadable image: error | skip (logged, recorded in the cache)
    decode: str = "auto"  # image decoding: auto (gpu when the model runs on CUDA) | cpu (PIL in workers) | gpu (nvJPEG)
    tokens: str = "none"  # token features too: none | all (every token) | grid:K (image grids average-pooled to K x K,
    #   + CLS for ViTs; texts keep every real token); part of the entry key (docs/tokens.md)
    token_dtype: str = "float16"  # stored dtype of token features: float16 | float32
    max_token_bytes: int = 8_000_000_000  # refuse a token entry whose estimated size (rows x tokens x width x bytes)
    #   is larger, bytes (Flickr30k with DINOv2-L, every token at 224 px, is about 16e9 at float16)
    encoder_options: dict = field(default_factory=dict)  # per encoder: {"gpt2": {"pooling": "last"}}


# [train.token]: the branches of train.adapter = "token" (train/tokens.py checks them; docs/tokens.md).
TOKEN_DEFAULTS = {
    "vision_local": "token",  # image local tokens: identity | mlp | token (x + MLP(LN(x)) per token), then mean-pooled
    "vision_cls": "token",  # image global token (CLS; CNNs: mean of the positions): identity | mlp | token
    "text_local": "token",  # text tokens: identity | mlp | token | patch (share vision_local's weights), mean-pooled
    "text_global": "mlp",  # after text pooling: identity | mlp (two layers) | token
    "pooling": "mean",  # local tokens -> one vector: mean (over real tokens) | attention (a learned query per side)
}


@dataclass(frozen=True)
class TrainConfig:
    image: str = "resnet18"  # cache entry of the image modality
    text: str = "gpt2"  # cache entry of the text modality
    modalities: dict = field(default_factory=dict)  # more than two: {"audio": "clap"}; adds to image/text
    adapter: str = "linear"  # linear (d -> dim) | mlp (d -> 1024 -> dim) | bottleneck (d -> 256 -> dim) | residual
    #   | token (token projectors on token entries: train.token, docs/tokens.md)
    token: dict = field(default_factory=lambda: dict(TOKEN_DEFAULTS))  # adapter = "token": TOKEN_DEFAULTS
    dim: int = 768  # shared space dimension d_e
    hidden: int = 1024  # hidden width of the mlp and residual adapters
    bottleneck: int = 256  # width of the bottleneck adapter
    depth: int = 2  # residual blocks of the residual adapter
    dropout: float = 0.0  # dropout inside mlp/residual adapters
    epochs: int = 50  # passes over the train split
    batch_size: int = 64  # pairs per step (InfoNCE negatives = batch_size - 1)
    lr: float = 1e-4  # peak AdamW learning rate
    weight_decay: float = 0.0  # AdamW weight decay
    schedule: str = "constant"  # constant | cosine (after warm-up)
    warmup_epochs: float = 0.0  # linear warm-up length in epochs
    temperature: float = 0.07  # InfoNCE temperature tau (initial value when learnable)
    learnable_temperature: bool = False  # learn log(1/tau), clamped at 1/tau <= 100 as CLIP does
    loss: str = "infonce"  # infonce | vsepp (hinge on the hardest negative, VSE++; margin below) | sigmoid (SigLIP)
    loss_direction: str = "symmetric"  # symmetric | image_to_text (the proposal's one-directional sum)
    normalize: bool = True  # loss on L2-normalised embeddings; false = raw inner products / tau (the proposal)
    margin: float = 0.2  # VSE++ hinge margin (loss = "vsepp" only)
    sigmoid_scale: float = 10.0  # sigmoid loss: initial logit scale t = exp(t'), SigLIP's t' = log 10; learnt,
    #   in [1, 100] (loss = "sigmoid" only; it replaces temperature / learnable_temperature there)
    sigmoid_bias: float = -10.0  # sigmoid loss: initial logit bias b (SigLIP: -10); learnt, saved with the run
    mixup: float = 0.0  # latent mixup alpha (0 = off); one lambda ~ Beta(alpha, alpha) for both modalities
    standardize: bool = True  # z-score inputs with train-split mean/std (saved with the adapters)
    seed: int = 0  # seeds init, batch order and mixup
    train_fraction: float = 1.0  # share of the train images used, in (0, 1]: a seeded, nested subset
    #   (the first round(f * n) of a permutation of the image ids seeded by train.seed)
    subset: str = ""  # CSV (id, concept, score; `curate` writes one) of the train pair ids kept; "" = all.
    #   Applied before train_fraction; its sha256 is recorded with the run (adapters.json, config.json)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    reference: str = "dinov2"  # cache entry used for the per-epoch CKA curve ("" = none)
    name: str = ""  # run name; "" = <image>-<text>-<adapter>
    eval_every: int = 1  # epochs between validation evaluations
    max_rows_in_memory: int = 0  # train pairs held at once; 0 = all in memory, > 0 = stream the train split
    #   from the cache when it has more pairs (two windows of max_rows_in_memory / 2: training + prefetch)
    stream_block: int = 1024  # pairs per cache read when streaming (rounded up to a multiple of batch_size)
    track_metrics: tuple[str, ...] = ("cka", "unbiased_cka", "mutual_knn")  # tracked each eval epoch on val:
    #   metric(aligned side, reference) and the Platonic delta (needs train.reference; () = off; k = analyze.k)
    wandb: bool = False  # log config, per-epoch history, final tables and figures to Weights & Biases
    wandb_project: str = "platonic-align"  # W&B project name
    wandb_mode: str = "offline"  # offline (no login or network; sync later) | online | disabled
    wandb_group: str = ""  # W&B group (a study sets its name); "" = none
    init: str = "random"  # adapter start: random | procrustes | cca (closed-form fit on train; linear adapters)
    structure_weight: float = 0.0  # STRUCTURE geometry-preserving regulariser lambda (0 = off; the paper uses 10)
    structure_levels: int = 1  # random-walk scales L of the regulariser (softmax similarity matrix powers 1..L)
    structure_temperature: float = 0.05  # temperature of the regulariser's neighbourhood softmax
    structure_warmup_epochs: float = 0.0  # linear ramp of structure_weight from 0, in epochs
    image_layer: str | int = "last"  # image features: last (the entry's features) | k (stored layer k) | auto
    text_layer: str | int = "last"  # text features: last | k | auto (pair with the highest layer_metric on train)
    layer_metric: str = "mutual_knn"  # similarity.metrics name used by layer "auto"
    layer_rows: int = 1000  # train images (fixed random subset) the layer metric is computed on


@dataclass(frozen=True)
class AnalyzeConfig:
    split: str = "test"  # split the kernels are computed on
    entries: tuple[str, ...] = ()  # cache entries to compare; () = every entry of the split
    metrics: tuple[str, ...] = ("cka", "unbiased_cka", "mutual_knn")  # names in analyze.metrics.METRICS
    k: int = 10  # neighbours for the kNN metrics
    reference: str = "dinov2"  # reference model entry (the "performant" model)
    bootstrap: int = 200  # bootstrap resamples for 95% confidence intervals
    permutations: int = 200  # shuffled-pairing draws for the null distribution
    calibrate: bool = False  # analyze cka / layers: calibrated scores against a permutation null
    controls: tuple[str, ...] = ("random", "cca", "procrustes")  # Platonic-test controls; () = none
    control_seeds: int = 3  # untrained adapters per run for the "random" control (seeds seed .. seed+n-1)
    max_rows: int = 0  # 0 = all rows; else a fixed random subset of this many rows
    duplicates: str = "drop"  # images that are byte-identical copies under other ids: drop (keep one of each) or keep
    kernel_rows: int = 200  # rows shown in kernel heatmaps
    seed: int = 0  # seeds subsets, bootstrap and permutations
    out: str = "reports"  # folder for tables, figures and reports


# [study.slurm]: the settings of `study --launcher slurm` (submitit's names; study.slurm checks them).
SLURM_DEFAULTS = {
    "partition": "",  # SLURM partition; "" = the cluster's default
    "timeout_min": 240,  # time limit of each task, minutes (a task runs cells until none are left)
    "gpus_per_task": 1,  # GPUs of each task (0 = CPU only)
    "cpus_per_task": 8,  # CPU cores of each task (torch threads)
    "mem_gb": 32.0,  # memory of each task, GB
    "array_size": 8,  # tasks of the training array (at most one per training; extra tasks are not submitted)
    "setup": [],  # shell lines run before each task, e.g. ["module load cuda", "source .venv/bin/activate"]
    "additional": {},  # more sbatch flags without the dashes, e.g. {"account" = "lab", "qos" = "high"}
}


@dataclass(frozen=True)
class StudyConfig:
    name: str = "study"  # study name: outputs go to <analyze.out>/<dataset>/<analyze.split>/studies/<name>/
    repeat: str = "train.seed"  # the axis the summary averages over (its values are repeats); "" = none
    axes: dict = field(default_factory=dict)  # dotted config key -> list of values; the grid is their product
    variants: dict = field(default_factory=dict)  # name -> {dotted key: value}: named recipes, a leading axis "variant"
    evaluations: tuple[str, ...] = ("platonic",)  # what each cell measures after training: platonic, zeroshot
    jobs: int = 1  # cells run at once on this machine (worker processes; on CUDA worker i takes GPU i mod count)
    launcher: str = "local"  # local (this machine, study.jobs workers) | slurm (a job array through submitit)
    claim_timeout: float = 300.0  # seconds without a heartbeat after which another worker takes a claimed cell over
    slurm: dict = field(default_factory=lambda: copy.deepcopy(SLURM_DEFAULTS))  # launcher = "slurm": SLURM_DEFAULTS


@dataclass(frozen=True)
class SearchConfig:
    run: str = ""  # the aligned model `search index` embeds with: a run name in data.cache, a run folder or an
    #   exported model folder; "" = train.name, else <image>-<text>-<adapter>; query/serve: "" = the index's own
    index: str = "search-index"  # index folder written by `search index`, read by `search query` and `search serve`
    top_k: int = 10  # results per query
    exact_max: int = 200000  # galleries of at most this many images are searched exactly; larger ones through a
    #   faiss IVF index (approximate; its recall@10 against exact search is measured when it is built)
    nprobe: int = 8  # faiss: inverted lists visited per query, at least; `search index` doubles it until the
    #   measured recall@10 against exact search reaches 0.95 (or every list is visited) and records it
    port: int = 8765  # `search serve` listens on 127.0.0.1:port (0 = any free port)


@dataclass(frozen=True)
class PipelineConfig:
    data: DataConfig = field(default_factory=DataConfig)
    extract: ExtractConfig = field(default_factory=ExtractConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    analyze: AnalyzeConfig = field(default_factory=AnalyzeConfig)
    study: StudyConfig = field(default_factory=StudyConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    source: str = "defaults"  # where the values came from (file path), for provenance

    def to_dict(self) -> dict:
        """Plain nested dict (tuples become lists): goes into caches and run folders."""
        return {s: _plain(dataclasses.asdict(getattr(self, s))) for s in SECTIONS}


SECTIONS = ("data", "extract", "train", "analyze", "study", "search")

# Keys whose value is one of a fixed set; checked when the config is built, before any work starts.
# (Names that live in a registry of a stage above pipeline/ -- encoders, adapters, metrics, datasets --
# are checked by that stage before it starts.)
CHOICES: dict[str, tuple[str, ...]] = {
    "data.captions": ("longest", "first", "all"),
    "data.on_empty": ("error", "skip"),
    "data.missing": ("error", "skip"),
    "extract.format": ("h5", "zarr"),
    "extract.precision": ("fp32", "bf16", "fp16"),
    "extract.layers": ("last", "all"),
    "extract.on_error": ("error", "skip"),
    "extract.decode": ("auto", "cpu", "gpu"),
    "extract.token_dtype": ("float16", "float32"),
    "train.schedule": ("constant", "cosine"),
    "train.loss": ("infonce", "vsepp", "sigmoid"),
    "train.loss_direction": ("symmetric", "image_to_text"),
    "train.init": ("random", "procrustes", "cca"),
    "analyze.duplicates": ("drop", "keep"),
    "study.launcher": ("local", "slurm"),
}


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _unknown(kind: str, key: str, known: Iterable[str]) -> ConfigError:
    known = list(known)
    hint = did_you_mean(key, known) or f" Known: {', '.join(known)}."
    return ConfigError(f"Unknown config {kind} {key!r}.{hint}")


def _check_choice(where: str, value: Any) -> None:
    choices = CHOICES.get(where)
    if choices is not None and value not in choices:
        raise ConfigError(f"Config key {where!r} must be one of {', '.join(choices)}; got {value!r}."
                          f"{did_you_mean(value, choices)}")


def _coerce(where: str, value: Any, annotation: Any) -> Any:
    """Check ``value`` against a field annotation; convert lists to tuples, ints to floats."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):  # e.g. str | int: the first member the value fits
        for member in typing.get_args(annotation):
            if type(value) is member:
                return value
        names = " or ".join(a.__name__ for a in typing.get_args(annotation))
        raise ConfigError(f"Config key {where!r} expects {names}, got {value!r} ({type(value).__name__}).")
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation is float and isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"Config key {where!r} must be a finite number, got {value!r}.")
    if annotation in (str, int, float, bool):
        if type(value) is annotation:
            return value
    elif origin is tuple:
        (item,) = {a for a in typing.get_args(annotation) if a is not Ellipsis}
        if isinstance(value, str):  # "a,b" from the command line
            value = [v.strip() for v in value.split(",") if v.strip()]
        if isinstance(value, (list, tuple)) and all(type(v) is item for v in value):
            return tuple(value)
    elif annotation is dict or origin is dict:
        if isinstance(value, dict):
            return value
    else:  # pragma: no cover - schema error, not user error
        raise TypeError(f"unsupported annotation {annotation} for {where}")
    name = getattr(annotation, "__name__", str(annotation))
    raise ConfigError(f"Config key {where!r} expects {name}, got {value!r} ({type(value).__name__}).")


def check_finite_values(values: Any, section: str) -> None:
    """Every float of a config section (``values``: its dataclass) must be finite; the config
    loader already refuses inf and nan, this checks sections built in code."""
    for f in dataclasses.fields(values):
        value = getattr(values, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"Config key '{section}.{f.name}' must be a finite number, got {value!r}.")


def _section_fields(section: str) -> dict[str, Any]:
    cls = typing.get_type_hints(PipelineConfig)[section]
    return typing.get_type_hints(cls)


def _merge(base: PipelineConfig, tree: Mapping[str, Any], origin: str) -> PipelineConfig:
    sections = {}
    for section, values in tree.items():
        if section not in SECTIONS:
            raise _unknown("section", section, SECTIONS)
        if not isinstance(values, Mapping):
            raise ConfigError(f"Config section [{section}] in {origin} must be a table.")
        hints = _section_fields(section)
        updates = {}
        for key, value in values.items():
            if key not in hints:
                raise _unknown("key", f"{section}.{key}", [f"{section}.{k}" for k in hints])
            updates[key] = _coerce(f"{section}.{key}", value, hints[key])
            _check_choice(f"{section}.{key}", updates[key])
        sections[section] = dataclasses.replace(getattr(base, section), **updates)
    return dataclasses.replace(base, **sections)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"train.lr=3e-4"`` -> (["train", "lr"], 0.0003). Values are read as TOML, else as strings."""
    if "=" not in text:
        raise ConfigError(f"Override {text!r} must look like section.key=value (e.g. train.lr=3e-4).")
    key, raw = text.split("=", 1)
    path = [p for p in key.strip().split(".") if p]
    if len(path) < 2:
        raise ConfigError(f"Override {text!r} must name a section and a key, e.g. train.lr=3e-4.")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return path, value


def _nest(path: list[str], value: Any) -> dict:
    for part in reversed(path):
        value = {part: value}
    return value


def _deep_update(tree: dict, other: Mapping) -> dict:
    for k, v in other.items():
        if isinstance(v, Mapping) and isinstance(tree.get(k), dict):
            tree[k] = _deep_update(dict(tree[k]), v)
        else:
            tree[k] = v
    return tree


def load_config(path: str | Path | None = None, overrides: Iterable[str] = (),
                options: Mapping[str, Any] | None = None) -> PipelineConfig:
    """Build the configuration.

    path: a TOML file; None = ``./pipeline.toml`` if it exists, else the built-in defaults.
    overrides: ``section.key=value`` strings (``--set``); dict-valued keys accept deeper
        paths, e.g. ``extract.encoder_options.gpt2.pooling=last``.
    options: ``{"section.key": value}`` from explicit command-line options; None values are ignored.
    """
    config = PipelineConfig()
    if path is None and Path(DEFAULT_CONFIG_FILE).is_file():
        path = DEFAULT_CONFIG_FILE
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"Config file {str(path)!r} does not exist.")
        try:
            tree = tomllib.loads(path.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"Config file {str(path)!r} is not valid TOML: {exc}") from None
        config = dataclasses.replace(_merge(config, tree, str(path)), source=str(path))
    extra: dict = {}
    for text in overrides:
        _add_path(extra, config, *parse_override(text))
    for key, value in (options or {}).items():
        if value is not None:
            _deep_update(extra, _nest(key.split("."), value))
    return _merge(config, extra, "command-line options") if extra else config


def _add_path(extra: dict, config: PipelineConfig, keys: list[str], value: Any) -> None:
    """Put ``value`` at ``keys`` (section, key[, deeper...]) into the update tree ``extra``; a
    path into a dict-valued key merges into that key's current dict."""
    if len(keys) > 2:
        section, key = keys[0], keys[1]
        hints = _section_fields(section) if section in SECTIONS else {}
        if section in SECTIONS and key in hints and hints[key] is dict:
            current = extra.get(section, {}).get(key, getattr(getattr(config, section), key))
            value = _deep_update(dict(current), _nest(keys[2:], value))
            keys = keys[:2]
    _deep_update(extra, _nest(keys, value))


def with_values(config: PipelineConfig, values: Mapping[str, Any], origin: str = "values") -> PipelineConfig:
    """``config`` with dotted keys set, e.g. ``{"train.lr": 3e-4, "extract.encoder_options.gpt2.pooling":
    "last"}``: checked as a config file is (unknown keys with close matches, types, choices);
    ``origin`` names the source in errors. ``config.source`` is kept."""
    extra: dict = {}
    for key, value in values.items():
        keys = [p for p in str(key).split(".") if p]
        if len(keys) < 2:
            raise ConfigError(f"Config key {key!r} ({origin}) must name a section and a key, e.g. train.lr.")
        _add_path(extra, config, keys, value)
    return _merge(config, extra, origin) if extra else config


def config_default(key: str) -> Any:
    """The built-in default of ``"section.name"``; a ConfigError with close matches if unknown."""
    section, _, name = key.partition(".")
    if section not in SECTIONS:
        raise _unknown("section", section, SECTIONS)
    values = getattr(PipelineConfig(), section)
    if name not in _section_fields(section):
        raise _unknown("key", key, [f"{section}.{k}" for k in _section_fields(section)])
    return getattr(values, name)


def defaults_tree() -> dict:
    """The built-in defaults as a nested dict (what pipeline.toml must equal)."""
    return PipelineConfig().to_dict()
