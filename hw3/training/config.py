"""A training run's settings as dataclasses, between the pipeline and the trainer: the trainer's command line
builds them (cli.parse_config), the pipeline builds them directly (TrainingConfig.from_options), and `to_argv`
turns them back into the one command a record keeps.

A config remembers which options were given, in the order they were given, with their values as given: `to_argv`
writes exactly those, so the command recorded for a training (finished.json, started.json, a stage's settings) is the
command as it was always written, and a record made before still names the same training.
"""
from __future__ import annotations

import argparse
import dataclasses
from typing import Any, Dict, List, Optional, Tuple

from hw3.evaluation import metrics
from hw3.data import caption_files
from hw3.models import clip_backend
from hw3.models.encoder import DEFAULT_ENCODER
from hw3.models.decoding import DECODE_DEFAULTS
from hw3.util.config import flag_name


@dataclasses.dataclass(frozen=True)
class DataSettings:
    train_json: Optional[str] = None
    train_images: Optional[str] = None
    val_json: Optional[str] = None
    val_images: Optional[str] = None
    train_split: Optional[str] = None
    val_split: Optional[str] = None
    val_fraction: float = caption_files.VAL_FRACTION
    val_max_images: int = 0
    max_caption_tokens: Optional[int] = None  # None: from the training captions, when the run reads them
    raw_captions: bool = False
    augment: bool = False
    feature_cache: Optional[str] = None


@dataclasses.dataclass(frozen=True)
class ModelSettings:
    """The encoder, and the architecture options by field name (--arch, --peft, a PEFT method's or a from-scratch
    decoder's options): their flags, checks and decoder config are the architecture registry's."""
    encoder: str = DEFAULT_ENCODER
    architecture: Dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def arch(self) -> str:
        return self.architecture.get("arch") or "gpt2"


@dataclasses.dataclass(frozen=True)
class OptimisationSettings:
    epochs: int = 10
    batch_size: int = 32
    grad_accum: int = 1
    lr: float = 2e-4
    min_lr: float = 1e-5
    warmup_steps: int = 500
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    label_smoothing: float = 0.1
    no_amp: bool = False
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class ValidationSettings:
    select: str = "cider"
    val_metrics: Any = None  # the --val-metrics text, or once resolved the metric names
    val_decode: str = "greedy"
    val_beam_size: int = DECODE_DEFAULTS["beam_size"]
    val_max_len: Optional[int] = None  # None: covering max_caption_tokens, when that is known
    val_batch_size: int = 64
    clip_model: str = clip_backend.CLIPSCORE_CLIP[0]
    clip_pretrained: str = clip_backend.CLIPSCORE_CLIP[1]
    no_clipscore: bool = False


@dataclasses.dataclass(frozen=True)
class ScstSettings:
    """Self-critical training (Rennie et al. 2017) after the cross-entropy epochs."""
    scst_epochs: int = 0
    init_from: Optional[str] = None
    scst_samples: int = 5
    scst_baseline: str = "mean"
    scst_lr: float = 2e-5
    scst_temperature: float = 1.0
    scst_end_word: bool = False
    scst_clip_weight: float = 0.0


@dataclasses.dataclass(frozen=True)
class RunSettings:
    """Where the run writes and how it runs: nothing here changes what it learns."""
    out: str = "runs/p2"
    resume: bool = False
    stop_after: int = 0
    device: str = "auto"
    workers: int = 4
    encode_batch_size: int = 64
    log_every: int = 50


GROUPS = (("data", DataSettings), ("optimisation", OptimisationSettings), ("validation", ValidationSettings),
          ("scst", ScstSettings), ("run", RunSettings))


def _group_of(option: str) -> Optional[str]:
    if option == "encoder":
        return "model"
    return next((name for name, cls in GROUPS if option in {f.name for f in dataclasses.fields(cls)}), None)


@dataclasses.dataclass(frozen=True)
class TrainingConfig:
    data: DataSettings = DataSettings()
    model: ModelSettings = ModelSettings()
    optimisation: OptimisationSettings = OptimisationSettings()
    validation: ValidationSettings = ValidationSettings()
    scst: ScstSettings = ScstSettings()
    run: RunSettings = RunSettings()
    given: Tuple[str, ...] = ()  # the options set, in the order given: what to_argv writes

    @classmethod
    def from_options(cls, options: Dict[str, Any]) -> "TrainingConfig":
        """The config of {field name: value} in the order given (a value None or False is not given; a list is
        the comma list its flag takes); any field not named by a settings group is an architecture option."""
        options = {k.replace("-", "_"): ",".join(map(str, v)) if isinstance(v, (list, tuple)) else v
                   for k, v in options.items()}
        grouped: Dict[str, Dict[str, Any]] = {}
        for option, value in options.items():
            grouped.setdefault(_group_of(option) or "architecture", {})[option] = value
        config = cls(model=ModelSettings(encoder=grouped.get("model", {}).get("encoder", DEFAULT_ENCODER),
                                         architecture=grouped.get("architecture", {})),
                     given=tuple(k for k, v in options.items() if v is not None and v is not False),
                     **{name: group(**grouped.get(name, {})) for name, group in GROUPS})
        return config

    def value(self, option: str):
        group = _group_of(option)
        if group is None:
            return self.model.architecture.get(option)
        return getattr(getattr(self, group), option)

    def replace(self, **options) -> "TrainingConfig":
        """A copy with these fields changed (not among the options given: the recorded command stays)."""
        changes: Dict[str, Any] = {}
        for option, value in options.items():
            group = _group_of(option)
            if group is None:
                architecture = dict(changes.get("model", self.model).architecture, **{option: value})
                changes["model"] = dataclasses.replace(changes.get("model", self.model), architecture=architecture)
            else:
                changes[group] = dataclasses.replace(changes.get(group, getattr(self, group)), **{option: value})
        return dataclasses.replace(self, **changes)

    def namespace(self) -> argparse.Namespace:
        """Every field as one flat namespace, for the architecture options' checks (they read the command line's
        names) and for args.json."""
        flat = dict(encoder=self.model.encoder, **self.model.architecture)
        for name, _ in GROUPS:
            flat.update(dataclasses.asdict(getattr(self, name)))
        return argparse.Namespace(**flat)


def to_argv(config: TrainingConfig) -> List[str]:
    """The trainer's command of `config`: each option given, in its order; a flag alone for True, a value for the
    rest (0 is a value)."""
    argv: List[str] = []
    for option in config.given:
        value = config.value(option)
        if value is True:
            argv.append(flag_name(option))
        elif value is not False and value is not None:
            argv += [flag_name(option), str(value)]
    return argv


def validation_metric_names(config: TrainingConfig) -> tuple:
    """The metric names of --val-metrics (None: the default set, without the CLIP ones under --no-clipscore)."""
    v = config.validation
    if v.val_metrics is None:
        return tuple(m for m in metrics.DEFAULT_METRICS if not (v.no_clipscore and m in metrics.CLIP_METRICS))
    if isinstance(v.val_metrics, tuple):
        return v.val_metrics
    return metrics.parse_metrics(v.val_metrics, "--val-metrics")
