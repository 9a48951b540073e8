"""Typed, strict experiment configs: YAML → validated pydantic objects, with CLI overrides.

Every stage script loads its config through `load_config` / `config_from_args`:

    parser = argparse.ArgumentParser()
    add_config_args(parser)                # --config_path, --set key=value, --print_config
    args = parser.parse_args()
    cfg = config_from_args(args, ExperimentConfig)   # exits 2 with one line on a user mistake

Strictness: every section forbids unknown keys (with a "did you mean" suggestion), every
value is type- and range-checked, and combinations a section owns are checked by its
validators. Relative paths resolve against the repo root, not the working directory, and
``{timestamp}`` in ``logging.run_name`` is filled in.
"""
from __future__ import annotations

import argparse
import difflib
import time
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, TypeVar

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    ValidationError,
    model_validator,
)

from model.config import ModelConfig
from utils.errors import UserError
from utils.paths import REPO_ROOT, resolve_path

RepoPath = Annotated[Path, AfterValidator(lambda p: resolve_path(p, REPO_ROOT))]
"""A path field: relative values resolve against the repo root."""


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, validate_default=True)


class DataConfig(Section):
    data_dir: RepoPath = Path("data")
    tokenizer_dir: Optional[RepoPath] = None  # None → <data_dir>/tokenizer
    train_bin: Optional[RepoPath] = None  # None → <data_dir>/pretrain/train.bin
    val_bin: Optional[RepoPath] = None  # None → <data_dir>/pretrain/val.bin
    seq_len: Optional[PositiveInt] = None  # None → model.max_seq_len
    num_workers: NonNegativeInt = 0  # threads building training batches ahead (loader.Prefetcher); 0: in the loop
    doc_masking: bool = False  # pretraining: no attention across EOS-separated documents (Llama 3)

    def tokenizer_path(self) -> Path:
        return self.tokenizer_dir or self.data_dir / "tokenizer"

    def train_path(self) -> Path:
        return self.train_bin or self.data_dir / "pretrain" / "train.bin"

    def val_path(self) -> Path:
        return self.val_bin or self.data_dir / "pretrain" / "val.bin"


class TrainingConfig(Section):
    # batch
    batch_size: PositiveInt = 8  # micro-batch per process
    grad_accum_steps: PositiveInt = 1
    max_steps: PositiveInt = 1000
    # optimizer
    optimizer: Literal["adamw", "muon"] = "adamw"
    learning_rate: PositiveFloat = 3e-4
    muon_learning_rate: PositiveFloat = 0.02  # Muon's own LR for 2-D hidden matrices
    muon_momentum: float = Field(0.95, ge=0.0, lt=1.0)
    weight_decay: float = Field(0.1, ge=0.0)
    beta1: float = Field(0.9, ge=0.0, lt=1.0)
    beta2: float = Field(0.95, ge=0.0, lt=1.0)
    eps: PositiveFloat = 1e-8
    grad_clip: float = Field(1.0, ge=0.0)  # 0 disables clipping
    # schedule
    lr_schedule: Literal["cosine", "wsd", "constant"] = "cosine"
    warmup_steps: NonNegativeInt = 100
    decay_fraction: float = Field(0.2, gt=0.0, le=1.0)  # wsd: final fraction of steps that decays
    wsd_decay_shape: Literal["linear", "1-sqrt"] = "linear"  # wsd: shape of the final decay (1-sqrt: Hägele et al. 2024)
    min_lr_ratio: float = Field(0.1, ge=0.0, le=1.0)
    # numerics and hardware
    seed: int = 1337
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    compile: bool = False
    # torch.compile backend: "inductor" (fast kernels); "aot_eager" / "eager" trace without
    # generating code (debugging, quick tests). Checked against torch's registered backends.
    compile_backend: str = Field("inductor", min_length=1)
    parallelism: Literal["ddp", "fsdp"] = "ddp"  # used when launched with torchrun (WORLD_SIZE > 1)
    activation_checkpointing: bool = False
    # under torchrun the world is a data-parallel x context-parallel (or x pipeline-parallel) mesh:
    # context_parallel ranks share each sequence (ring attention, trainer/context_parallel.py);
    # pipeline_parallel ranks each hold a slice of the layers (trainer/pipeline.py)
    context_parallel: PositiveInt = 1
    pipeline_parallel: PositiveInt = 1
    pipeline_schedule: Literal["gpipe", "1f1b", "interleaved_1f1b"] = "1f1b"  # interleaved: 2 stages per rank
    pipeline_split: Optional[list[PositiveInt]] = None  # layers per stage (None: equal)
    # evaluation
    eval_interval: PositiveInt = 200
    eval_steps: PositiveInt = 20
    # stability: spike guard
    spike_guard: bool = True
    spike_threshold: PositiveFloat = 3.0  # loss > mean + threshold * std of recent losses → skip
    spike_window: PositiveInt = 50
    spike_max_consecutive: PositiveInt = 5  # then roll back to the last good checkpoint
    spike_lr_factor: float = Field(0.5, gt=0.0, le=1.0)

    @model_validator(mode="after")
    def _check_parallel(self) -> "TrainingConfig":
        if self.context_parallel > 1 and self.pipeline_parallel > 1:
            raise ValueError("context_parallel and pipeline_parallel cannot be combined; use one of them")
        if self.pipeline_parallel > 1 and self.grad_accum_steps < self.pipeline_parallel:
            raise ValueError(f"pipeline_parallel={self.pipeline_parallel} needs grad_accum_steps (the micro-batches) "
                             f">= the number of stages, got grad_accum_steps={self.grad_accum_steps}")
        if self.pipeline_parallel > 1 and self.eval_steps % self.grad_accum_steps:
            raise ValueError(f"pipeline_parallel={self.pipeline_parallel} validates grad_accum_steps batches at a time "
                             f"(the micro-batches): eval_steps={self.eval_steps} must be a multiple of "
                             f"grad_accum_steps={self.grad_accum_steps}")
        if self.pipeline_schedule == "interleaved_1f1b" and self.grad_accum_steps % self.pipeline_parallel:
            raise ValueError(f"pipeline_schedule=interleaved_1f1b needs grad_accum_steps (the micro-batches) to be a "
                             f"multiple of pipeline_parallel={self.pipeline_parallel}, got {self.grad_accum_steps}")
        return self

    def pipeline_stages(self) -> int:
        """Pipeline stages in all: two per rank for the interleaved schedule."""
        return self.pipeline_parallel * (2 if self.pipeline_schedule == "interleaved_1f1b" else 1)


def stage_layer_counts(n_layers: int, tcfg: TrainingConfig) -> list[int]:
    """Layers of each pipeline stage: ``training.pipeline_split``, or equal shares.
    ValueError (naming the keys) when they do not cover every layer."""
    stages = tcfg.pipeline_stages()
    split = tcfg.pipeline_split
    if split is not None:
        if len(split) != stages or sum(split) != n_layers:
            raise ValueError(f"training.pipeline_split={split} must give {stages} stages summing to "
                             f"model.n_layers={n_layers}")
        return list(split)
    if n_layers % stages:
        raise ValueError(f"model.n_layers={n_layers} is not divisible into {stages} pipeline stages: set "
                         "training.pipeline_split (layers per stage)")
    return [n_layers // stages] * stages


class LoggingConfig(Section):
    runs_dir: RepoPath = Path("runs")
    run_name: str = Field("{timestamp}", min_length=1)
    # the whole run directory, instead of <runs_dir>/<stage>/<run_name> (the recipes' stable paths,
    # e.g. runs/classic/deepseek/v3_nano/0_pretrain)
    run_dir: Optional[RepoPath] = None
    log_interval: PositiveInt = 10
    sample_interval: NonNegativeInt = 0  # 0 disables sample generations
    sample_prompt: str = "Once upon a time"
    sample_tokens: PositiveInt = 48
    sample_top_k: NonNegativeInt = 0  # sample generations: 0 → greedy, k → top-k sampling
    tensorboard: bool = False
    wandb: bool = False
    wandb_project: str = "llm-from-scratch"


class CheckpointingConfig(Section):
    save_interval: PositiveInt = 500
    keep_last: PositiveInt = 3
    keep_best: bool = True
    init_from: Optional[RepoPath] = None  # start from these weights (a checkpoint directory)


class RecipeNeed(Section):
    path: RepoPath  # what an earlier stage writes, e.g. runs/classic/.../1_sft_qlora/checkpoints/final
    run: str = Field(min_length=1)  # the command that writes it


class RecipeSection(Section):
    """Where a stage config sits in a recipe (`utils/setup_classic_models.py` writes it): the
    stage's name and what earlier stages must have written, each with the command that writes it."""

    name: str = Field(min_length=1)  # e.g. deepseek/v3_nano
    stage: str = Field(min_length=1)  # e.g. 3_rlhf_grpo
    needs: list[RecipeNeed] = Field(default_factory=list)


def check_recipe_needs(recipe: Optional[RecipeSection]) -> None:
    """A stage run before the one it continues from: one line naming the exact command to run."""
    for need in recipe.needs if recipe is not None else []:
        if not need.path.exists():
            raise UserError(f"{recipe.name} {recipe.stage} continues from {need.path}, which does not exist yet: "
                            f"run `{need.run}` first")


class ExperimentConfig(Section):
    """The root config of a pretraining run. Stage scripts extend it with their own sections."""

    stage: str = "pretrain"
    recipe: Optional[RecipeSection] = None
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    checkpointing: CheckpointingConfig = Field(default_factory=CheckpointingConfig)

    @model_validator(mode="after")
    def _fill_run_name(self) -> "ExperimentConfig":
        if "{timestamp}" in self.logging.run_name:
            stamp = time.strftime("%Y%m%d-%H%M%S")
            self.logging.run_name = self.logging.run_name.replace("{timestamp}", stamp)
        if "/" in self.logging.run_name or self.logging.run_name in (".", ".."):
            raise ValueError(f"logging.run_name must be a plain name, got {self.logging.run_name!r}")
        return self

    @model_validator(mode="after")
    def _check_parallel_shapes(self) -> "ExperimentConfig":
        cp = self.training.context_parallel
        seq_len = self.data.seq_len or self.model.max_seq_len
        if cp > 1 and seq_len % (2 * cp):
            raise ValueError(f"sequence length {seq_len} (data.seq_len, else model.max_seq_len) is not divisible by "
                             f"2 x training.context_parallel = {2 * cp} (zig-zag sharding)")
        if self.training.pipeline_parallel > 1:
            stage_layer_counts(self.model.n_layers, self.training)
        return self


C = TypeVar("C", bound=BaseModel)


# ---------------------------------------------------------------- overrides
def parse_override(item: str) -> tuple[list[str], Any]:
    """``"training.learning_rate=3e-4"`` → (["training", "learning_rate"], 3e-4), typed like YAML."""
    if "=" not in item:
        raise UserError(f"bad --set {item!r}: expected key.path=value, e.g. --set training.learning_rate=3e-4")
    key, raw = item.split("=", 1)
    parts = key.strip().split(".")
    if not key.strip() or any(not p for p in parts):
        raise UserError(f"bad --set {item!r}: empty key, expected key.path=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise UserError(f"bad --set {item!r}: value is not valid YAML ({_first_line(e)})") from None
    return parts, value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Set each ``key.path=value`` in the nested dict (creating sections as needed)."""
    for item in overrides:
        parts, value = parse_override(item)
        node = data
        for i, p in enumerate(parts[:-1]):
            child = node.get(p)
            if child is None:
                child = node[p] = {}
            elif not isinstance(child, dict):
                path = ".".join(parts[: i + 1])
                raise UserError(f"bad --set {item!r}: {path} is a value ({child!r}), not a section")
            node = child
        node[parts[-1]] = value
    return data


# ---------------------------------------------------------------- loading
def read_yaml(path: Path) -> dict:
    if not path.exists():
        raise UserError(f"config file not found: {path}")
    if path.is_dir():
        raise UserError(f"config path is a directory, expected a YAML file: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise UserError(f"malformed YAML in {path}: {_first_line(e)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"config {path} must be a mapping of sections, got {type(data).__name__}")
    return data


def load_config(path: Optional[str | Path], schema: type[C] = ExperimentConfig, overrides: Optional[list[str]] = None) -> C:
    """YAML file (or defaults when `path` is None) + overrides → validated `schema` instance."""
    data = read_yaml(find_config_file(path)) if path else {}
    data = apply_overrides(data, overrides or [])
    cfg = validate(data, schema)
    check_recipe_needs(getattr(cfg, "recipe", None))  # a recipe stage run before the one it continues from
    return cfg


def find_config_file(path: str | Path) -> Path:
    """A config path as typed: relative to the working directory, else to the repo root."""
    p = resolve_path(path, Path.cwd())
    if not p.exists():
        in_repo = resolve_path(path, REPO_ROOT)
        if in_repo.exists():
            return in_repo
    return p


def validate(data: dict, schema: type[C]) -> C:
    try:
        return schema.model_validate(data)
    except ValidationError as e:
        raise UserError(format_validation_error(e, schema)) from None


def format_validation_error(err: ValidationError, schema: type[BaseModel]) -> str:
    """The first error as one line: key path, the value, what is allowed (+ "did you mean")."""
    e = err.errors()[0]
    loc = [str(x) for x in e["loc"]]
    key = ".".join(loc) or "<root>"
    kind = e["type"]
    if kind == "extra_forbidden":
        msg = f"unknown key `{key}`"
        hint = _suggest(schema, loc)
        if hint:
            msg += f" — did you mean `{hint}`?"
        else:
            allowed = _fields_at(schema, loc[:-1])
            if allowed:
                msg += f" (allowed: {', '.join(sorted(allowed))})"
        return msg
    if kind == "missing":
        return f"missing required key `{key}`"
    value = e.get("input")
    text = e["msg"]
    if text.startswith("Value error, "):
        text = text[len("Value error, "):]
    if isinstance(value, dict):  # a check across keys: a root-level one names its keys itself
        return f"`{key}`: {text}" if loc else text
    extra = f" ({len(err.errors()) - 1} more error(s))" if len(err.errors()) > 1 else ""
    return f"`{key}` = {value!r}: {text}{extra}"


def _fields_at(schema: type[BaseModel], loc: list[str]) -> Optional[list[str]]:
    """Field names of the (nested) section at `loc`, or None if it can't be followed."""
    model: Any = schema
    for part in loc:
        fields = getattr(model, "model_fields", None)
        if not fields or part not in fields:
            return None
        model = _model_of(fields[part].annotation)
        if model is None:
            return None
    fields = getattr(model, "model_fields", None)
    return list(fields) if fields else None


def _model_of(annotation: Any) -> Optional[type[BaseModel]]:
    """The BaseModel inside an annotation like `Foo`, `Optional[Foo]`."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        m = _model_of(arg)
        if m is not None:
            return m
    return None


def _suggest(schema: type[BaseModel], loc: list[str]) -> Optional[str]:
    allowed = _fields_at(schema, loc[:-1])
    if not allowed:
        return None
    match = difflib.get_close_matches(loc[-1], allowed, n=1, cutoff=0.6)
    return match[0] if match else None


def _first_line(e: Exception) -> str:
    return " ".join(str(e).split())


# ---------------------------------------------------------------- CLI glue
def add_config_args(parser: argparse.ArgumentParser, required: bool = True) -> None:
    parser.add_argument("--config_path", required=required, help="YAML config file")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override any config key, typed like YAML (repeatable): --set training.learning_rate=3e-4",
    )
    parser.add_argument("--print_config", action="store_true", help="print the resolved config and exit")


def config_from_args(args: argparse.Namespace, schema: type[C] = ExperimentConfig) -> C:
    """Load + validate; with --print_config print the resolved YAML and exit 0."""
    cfg = load_config(args.config_path, schema, args.overrides)
    if getattr(args, "print_config", False):
        print(to_yaml(cfg), end="")
        raise SystemExit(0)
    return cfg


def to_plain(cfg: BaseModel) -> dict:
    """The config as plain YAML/JSON-able data (paths as strings)."""
    return cfg.model_dump(mode="json")


def to_yaml(cfg: BaseModel) -> str:
    return yaml.safe_dump(to_plain(cfg), sort_keys=False)


def save_config(cfg: BaseModel, path: Path) -> None:
    path.write_text(to_yaml(cfg))
