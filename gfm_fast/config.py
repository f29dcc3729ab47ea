"""The one place for configuration: typed dataclasses, YAML loading and ``key=value`` overrides.

Torch-free on purpose so that the CLI can validate a config (and fail fast on a typo) before any
heavy import. Every value is checked when the config is built: an unknown key or a value of the
wrong type is a ``ConfigError`` naming the key.
"""
from __future__ import annotations

import dataclasses
import json
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from gfm_fast.errors import ConfigError

IMAGENET_MEAN: Tuple[float, ...] = (0.485, 0.456, 0.406)
IMAGENET_STD: Tuple[float, ...] = (0.229, 0.224, 0.225)
OPS_BACKENDS = ("auto", "reference", "cpp", "triton")
ATTENTION_PATHS = ("auto", "cpp", "sdpa", "explicit")  # gfm_fast.models.attention
BF16_MATMUL_PATHS = ("auto", "native", "widened")  # gfm_fast.models.linear
COMPILE_SCOPES = ("regional", "full")  # gfm_fast.models.compile




@dataclass
class SwinConfig:
    """Architecture of one Swin encoder (student or teacher)."""

    embed_dim: int = 128
    depths: Tuple[int, ...] = (2, 2, 18, 2)
    num_heads: Tuple[int, ...] = (4, 8, 16, 32)
    window_size: int = 6
    img_size: int = 192
    patch_size: int = 4
    in_chans: int = 3
    mlp_ratio: float = 4.0
    drop_path_rate: float = 0.0

    @property
    def num_features(self) -> int:
        """Channels after the last stage (1024 for Swin-B)."""
        return self.embed_dim * 2 ** (len(self.depths) - 1)

    @property
    def total_stride(self) -> int:
        """Pixel stride of the last stage (32 for a 4-stage, patch-4 Swin)."""
        return self.patch_size * 2 ** (len(self.depths) - 1)

    def validate(self, prefix: str) -> None:
        _require(self.embed_dim > 0, f"{prefix}.embed_dim", "must be positive")
        _require(len(self.depths) >= 2, f"{prefix}.depths", "needs at least 2 stages")
        _require(len(self.depths) == len(self.num_heads), f"{prefix}.num_heads",
                 f"must have one entry per stage ({len(self.depths)})")
        for i, heads in enumerate(self.num_heads):
            width = self.embed_dim * 2 ** i
            _require(heads > 0 and width % heads == 0, f"{prefix}.num_heads",
                     f"stage {i} width {width} is not divisible by {heads} heads")
        _require(self.in_chans > 0, f"{prefix}.in_chans", "must be positive")
        _require(self.window_size > 0, f"{prefix}.window_size", "must be positive")
        _require(self.img_size % self.total_stride == 0, f"{prefix}.img_size",
                 f"{self.img_size} is not divisible by the total stride {self.total_stride}")


def _student_default() -> SwinConfig:
    return SwinConfig()


def _teacher_default() -> SwinConfig:
    return SwinConfig(window_size=7, img_size=224)


@dataclass
class ModelConfig:
    """GFM pretrainer: student, frozen teacher, masking and loss weights (docs/method.md)."""

    student: SwinConfig = field(default_factory=_student_default)
    teacher: SwinConfig = field(default_factory=_teacher_default)
    teacher_weights: Optional[str] = None
    # Start the student from these weights rather than at random (anything load_model reads: a GFM
    # release, a run of ours, a Swin checkpoint); a resumed run takes its checkpoint's instead.
    student_weights: Optional[str] = None
    # auto: the run's precision (bf16 for bf16 and bf16-mixed runs, fp16 for fp16, else fp32); outside
    # training, the caller's autocast dtype. The weights are cast once, not on every step.
    teacher_dtype: str = "auto"
    teacher_bands: Tuple[int, ...] = (0, 1, 2)  # student channels fed to the RGB teacher
    mask_block: int = 32
    mask_ratio: float = 0.6
    alpha: float = 1.0
    mean: Tuple[float, ...] = IMAGENET_MEAN
    std: Tuple[float, ...] = IMAGENET_STD
    ops_backend: str = "auto"
    grad_checkpointing: bool = False  # recompute every stage's activations in the backward (less memory)
    checkpoint_stages: Tuple[int, ...] = ()  # or only these stages (0-based), e.g. [2]: Swin-B's 18-block stage
    # Window attention: auto (the path measured fastest per device, precision and use: SDPA on CUDA,
    # the fused C++ kernel on CPU), cpp, sdpa or explicit (timm's bmm + softmax).
    attention: str = "auto"
    # bf16 GEMMs of the linear layers: auto (on a CPU without bf16 instructions, the fp32 GEMM on
    # bf16 operands, exact products and fp32 sums as a bf16 GEMM, ~4.6x the rate of torch's emulated
    # one in benchmarks/results/cpu_step_*.json; torch's elsewhere), native (torch's) or widened.
    bf16_matmul: str = "auto"
    fused_attn: Optional[bool] = None  # older name: true = attention sdpa, false = explicit; null: use attention

    @property
    def attention_path(self) -> str:
        """``attention``, or what the older ``fused_attn`` asked for when it is set."""
        if self.fused_attn is None:
            return self.attention
        return "sdpa" if self.fused_attn else "explicit"

    def validate(self, prefix: str = "model") -> None:
        self.student.validate(f"{prefix}.student")
        self.teacher.validate(f"{prefix}.teacher")
        _require(self.teacher_dtype in ("auto", "fp32", "bf16", "fp16"), f"{prefix}.teacher_dtype",
                 "must be one of auto, fp32, bf16, fp16")
        _require(len(self.teacher_bands) == self.teacher.in_chans, f"{prefix}.teacher_bands",
                 f"needs {self.teacher.in_chans} entries (one per teacher input channel)")
        _require(all(0 <= b < self.student.in_chans for b in self.teacher_bands),
                 f"{prefix}.teacher_bands", f"indices must lie in [0, {self.student.in_chans})")
        _require(self.student.img_size % self.mask_block == 0, f"{prefix}.mask_block",
                 f"{self.mask_block} does not divide the image size {self.student.img_size}")
        stride = self.student.total_stride
        _require(self.mask_block % stride == 0, f"{prefix}.mask_block",
                 f"must be a multiple of the student's total stride ({stride}): the decoder predicts whole "
                 f"{stride}-px cells, each masked or not")
        _require(0.0 < self.mask_ratio < 1.0, f"{prefix}.mask_ratio", "must lie in (0, 1)")
        _require(len(self.mean) == self.student.in_chans and len(self.std) == self.student.in_chans,
                 f"{prefix}.mean/std", f"need {self.student.in_chans} entries (one per channel)")
        _require(all(s > 0 for s in self.std), f"{prefix}.std", "must be positive")
        _require(self.ops_backend in OPS_BACKENDS, f"{prefix}.ops_backend",
                 f"must be one of {', '.join(OPS_BACKENDS)}")
        _require(all(0 <= i < len(self.student.depths) for i in self.checkpoint_stages), f"{prefix}.checkpoint_stages",
                 f"stage indices must lie in [0, {len(self.student.depths)})")
        _require(self.attention in ATTENTION_PATHS, f"{prefix}.attention", f"must be one of {', '.join(ATTENTION_PATHS)}")
        _require(self.bf16_matmul in BF16_MATMUL_PATHS, f"{prefix}.bf16_matmul",
                 f"must be one of {', '.join(BF16_MATMUL_PATHS)}")


@dataclass
class DataConfig:
    """WebDataset stream of GeoPile shards and the GFM augmentation."""

    shards: Optional[str] = None  # brace pattern, URL list (comma separated) or a build dir with manifest.json; None: embedded sample
    source_weights: Dict[str, float] = field(default_factory=dict)  # per-source mixing weights; empty: natural mix
    batch_size: int = 128  # per device (micro-batch)
    num_workers: int = 2
    shuffle_buffer: int = 1000
    samples_per_epoch: int = 600_000
    crop_scale: Tuple[float, float] = (0.67, 1.0)
    crop_ratio: Tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = 0.5
    decode_device: str = "cpu"  # older key, cpu only: images are decoded in the DataLoader workers
    max_consecutive_failures: int = 100

    def validate(self, prefix: str = "data") -> None:
        _require(self.batch_size > 0, f"{prefix}.batch_size", "must be positive")
        _require(self.num_workers >= 0, f"{prefix}.num_workers", "must be >= 0")
        _require(self.shuffle_buffer >= 0, f"{prefix}.shuffle_buffer", "must be >= 0")
        _require(self.samples_per_epoch > 0, f"{prefix}.samples_per_epoch", "must be positive")
        _require(0 < self.crop_scale[0] <= self.crop_scale[1] <= 1, f"{prefix}.crop_scale",
                 "must satisfy 0 < min <= max <= 1")
        _require(0 < self.crop_ratio[0] <= self.crop_ratio[1], f"{prefix}.crop_ratio",
                 "must satisfy 0 < min <= max")
        _require(0.0 <= self.hflip <= 1.0, f"{prefix}.hflip", "is a probability in [0, 1]")
        if self.decode_device != "cpu":  # checked with the config, not when the loader starts after the model
            raise ConfigError(f"{prefix}.decode_device={self.decode_device!r} is no longer supported: images are "
                              "decoded in the DataLoader workers (the nvjpeg decoder was removed, never measured "
                              f"faster); drop the key or set {prefix}.decode_device=cpu")
        _require(all(w >= 0 for w in self.source_weights.values()), f"{prefix}.source_weights",
                 "weights must be >= 0")
        _require(self.max_consecutive_failures > 0, f"{prefix}.max_consecutive_failures", "must be positive")


@dataclass
class OptimConfig:
    """AdamW + warmup/cosine schedule of the reference recipe; LRs are for a global batch of 512."""

    base_lr: float = 2e-4
    warmup_lr: float = 1e-6
    min_lr: float = 1e-5
    lr_scale_batch: int = 512  # LRs scale by global_batch / lr_scale_batch
    weight_decay: float = 0.05
    betas: Tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    epochs: int = 100
    warmup_epochs: int = 10
    clip_grad: float = 5.0
    grad_accum: int = 1
    # 0: the global batch is data.batch_size x ranks x grad_accum. N: grad_accum becomes
    # N / (data.batch_size x ranks) at every start, so the run keeps one global batch (and LR
    # schedule) on any number of GPUs, a requeue onto fewer nodes included.
    global_batch: int = 0
    # torch's fused AdamW kernel (CPU and GPU), with the gradient clipping folded into it where the
    # optimizer sees the module's gradients (ZeRO-0, fp32 weights); false: torch's default AdamW
    # (a loop over the parameters on CPU) and DeepSpeed's clipping, as the reference code runs.
    fused: bool = True
    schedule_steps: int = 0  # LR schedule length in optimizer steps; 0: run.max_steps if set, else all epochs

    def validate(self, prefix: str = "optim") -> None:
        for key in ("base_lr", "warmup_lr", "min_lr", "eps"):
            _require(getattr(self, key) > 0, f"{prefix}.{key}", "must be positive")
        _require(self.weight_decay >= 0, f"{prefix}.weight_decay", "must be >= 0")
        _require(all(0 <= b < 1 for b in self.betas), f"{prefix}.betas", "must lie in [0, 1)")
        _require(self.epochs > 0, f"{prefix}.epochs", "must be positive")
        _require(0 <= self.warmup_epochs <= self.epochs, f"{prefix}.warmup_epochs", "must lie in [0, epochs]")
        _require(self.clip_grad >= 0, f"{prefix}.clip_grad", "must be >= 0 (0 disables clipping)")
        _require(self.grad_accum > 0, f"{prefix}.grad_accum", "must be positive")
        _require(self.global_batch >= 0, f"{prefix}.global_batch", "must be >= 0 (0: batch x ranks x grad_accum)")
        _require(self.lr_scale_batch > 0, f"{prefix}.lr_scale_batch", "must be positive")
        _require(self.schedule_steps >= 0, f"{prefix}.schedule_steps", "must be >= 0")


PRECISIONS = ("auto", "fp32", "bf16", "bf16-mixed", "fp16")


@dataclass
class RunConfig:
    """Where and how long to run, precision, ZeRO stage, logging and checkpoints."""

    output_dir: str = "runs/gfm"
    seed: int = 0
    max_steps: int = 0  # 0: epochs * steps_per_epoch
    zero_stage: int = 0
    # auto: bf16-mixed on CUDA when supported (else fp16), fp32 on CPU. bf16-mixed: fp32 weights and
    # gradients, forward under torch.autocast(bf16) (the AMP recipe GFM was trained with, in bf16).
    # bf16: DeepSpeed's bf16 (bf16 weights and gradients, fp32 master weights in the optimizer;
    # at ZeRO-0 its unfused optimizer reads every gradient back to the host each step).
    precision: str = "auto"
    device: str = "auto"  # auto | cpu | cuda
    log_every: int = 10
    preview_every: int = 200
    ckpt_every: int = 500
    keep_last: int = 3
    resume: Optional[str] = "auto"  # auto | none (null: the same) | PATH
    max_bad_steps: int = 10  # consecutive non-finite losses before stopping
    compile: bool = False  # torch.compile the student and the teacher (not with ZeRO-3)
    compile_scope: str = "regional"  # regional: each Swin block (compiled once per stage); full: whole modules
    tf32: bool = True  # TF32 tensor cores for fp32 matmuls/convolutions on CUDA
    teacher_cuda_graph: bool = False  # replay the teacher's forward as a CUDA graph (CUDA; static shapes)
    eval_data: Optional[str] = None  # labelled images (root/<class>/<image> or shards) for k-NN during training
    eval_every: int = 0  # steps between k-NN evaluations on eval_data; 0: never

    def validate(self, prefix: str = "run") -> None:
        _require(self.max_steps >= 0, f"{prefix}.max_steps", "must be >= 0")
        _require(self.zero_stage in (0, 1, 2, 3), f"{prefix}.zero_stage", "must be 0, 1, 2 or 3")
        _require(self.precision in PRECISIONS, f"{prefix}.precision", f"must be one of {', '.join(PRECISIONS)}")
        _require(self.device in ("auto", "cpu", "cuda"), f"{prefix}.device", "must be auto, cpu or cuda")
        for key in ("log_every", "preview_every", "ckpt_every", "keep_last", "max_bad_steps"):
            _require(getattr(self, key) > 0, f"{prefix}.{key}", "must be positive")
        _require(self.eval_every >= 0, f"{prefix}.eval_every", "must be >= 0 (0 disables the k-NN evaluation)")
        _require(self.eval_every == 0 or bool(self.eval_data), f"{prefix}.eval_data",
                 "must name a labelled folder (root/<class>/<image>) or shards when run.eval_every > 0")
        _require(self.compile_scope in COMPILE_SCOPES, f"{prefix}.compile_scope",
                 f"must be one of {', '.join(COMPILE_SCOPES)}")
        _require(not (self.compile and self.zero_stage == 3), f"{prefix}.compile",
                 "supports ZeRO stages 0-2 only (ZeRO-3 gathers parameters in module hooks, "
                 "which a compiled module does not run as eager code does); use zero_stage <= 2 or compile=false")


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def validate(self) -> None:
        self.model.validate("model")
        self.data.validate("data")
        self.optim.validate("optim")
        self.run.validate("run")


# --------------------------------------------------------------------------------------------
# Building configs from dicts, YAML files and overrides
# --------------------------------------------------------------------------------------------

def _require(ok: bool, key: str, why: str) -> None:
    if not ok:
        raise ConfigError(f"invalid config value {key}: {why}")


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Convert ``value`` to ``annotation`` (a typing annotation), or raise ConfigError naming key."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if dataclasses.is_dataclass(annotation):
        if isinstance(value, annotation):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"invalid config value {key}: expected a mapping, got {value!r}")
        return from_dict(annotation, value, prefix=key)
    if origin is typing.Union:  # Optional[X]
        if value is None:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key)
    if origin in (tuple, list, Tuple, List):
        if isinstance(value, str):
            value = [v for v in value.strip("()[] ").split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"invalid config value {key}: expected a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis and len(args) != len(value):
            raise ConfigError(f"invalid config value {key}: expected {len(args)} values, got {len(value)}")
        item_type = args[0] if args else str
        return tuple(_coerce(v, item_type, f"{key}[{i}]") for i, v in enumerate(value))
    if origin in (dict, Dict):
        if isinstance(value, str):
            value = json.loads(value) if value.strip().startswith("{") else dict(
                kv.split(":", 1) for kv in value.split(",") if kv)
        if not isinstance(value, dict):
            raise ConfigError(f"invalid config value {key}: expected a mapping, got {value!r}")
        ktype, vtype = args if args else (str, Any)
        return {_coerce(k, ktype, key): _coerce(v, vtype, f"{key}.{k}") for k, v in value.items()}
    if annotation is Any:
        return value
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"invalid config value {key}: expected true or false, got {value!r}")
    if annotation is int:
        if isinstance(value, bool):
            raise ConfigError(f"invalid config value {key}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"invalid config value {key}: expected an integer, got {value!r}") from None
        if not number.is_integer():
            raise ConfigError(f"invalid config value {key}: expected an integer, got {value!r}")
        return int(number)
    if annotation is float:
        if isinstance(value, bool):
            raise ConfigError(f"invalid config value {key}: expected a number, got {value!r}")
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"invalid config value {key}: expected a number, got {value!r}") from None
        if math.isnan(number):
            raise ConfigError(f"invalid config value {key}: NaN is not allowed")
        return number
    if annotation is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"invalid config value {key}: expected a string, got {value!r}")
        return str(value)
    return value


def from_dict(cls, data: Dict[str, Any], prefix: str = ""):
    """Build dataclass ``cls`` from a (nested) dict; unknown keys are an error naming them."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(f"unknown config key(s) {', '.join(where + k for k in unknown)}; "
                          f"valid keys here: {', '.join(sorted(names))}")
    kwargs = {k: _coerce(v, hints[k], f"{prefix}.{k}" if prefix else k) for k, v in data.items()}
    return cls(**kwargs)


def to_dict(cfg) -> Dict[str, Any]:
    """Plain nested dict (tuples as lists) suitable for JSON/YAML."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def apply_overrides(cfg, overrides: List[str]):
    """Return a copy of ``cfg`` with ``section.key=value`` overrides applied (values typed by the field)."""
    data = to_dict(cfg)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. run.max_steps=10)")
        dotted, raw = item.split("=", 1)
        node = data
        parts = dotted.strip().lstrip("-").split(".")
        for part in parts[:-1]:
            if not isinstance(node, dict) or part not in node:
                raise ConfigError(f"unknown config key {dotted!r} in override {item!r}")
            node = node[part]
        if not isinstance(node, dict) or parts[-1] not in node:
            raise ConfigError(f"unknown config key {dotted!r} in override {item!r}")
        node[parts[-1]] = _parse_scalar(raw)
    return from_dict(type(cfg), data)


def _parse_scalar(raw: str) -> Any:
    """YAML-like parsing of an override value: numbers, booleans, null, lists; else the string."""
    text = raw.strip()
    if text.lower() in ("null", "none", "~"):
        return None
    if text.startswith(("[", "{")):
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            return text
    return text


def load_config(path: Optional[str] = None, overrides: Optional[List[str]] = None) -> TrainConfig:
    """Read a YAML (or JSON) config file, apply overrides, validate, and return a TrainConfig."""
    data: Dict[str, Any] = {}
    if path is not None:
        file = Path(path)
        if not file.is_file():
            raise ConfigError(f"config file {path} does not exist")
        text = file.read_text()
        if file.suffix == ".json":
            data = json.loads(text)
        else:
            import yaml  # only needed for YAML files

            data = yaml.safe_load(text) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path} must hold a mapping of sections, got {type(data).__name__}")
    cfg = from_dict(TrainConfig, data)
    if overrides:
        cfg = apply_overrides(cfg, overrides)
    cfg.validate()
    return cfg
