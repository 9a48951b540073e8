"""The evaluation config (``configs/eval/*.yaml``): strict, typed, like every stage's.

    stage: eval
    model:  what to evaluate: checkpoint (+ adapter), or base_url (+ name) of an OpenAI-compatible server
    eval:   tasks and their settings (limit, shots, batch_size, data_dir, chat, samples_per_task, ...)
    output: where results go (out; default runs/eval/<name>)

The command-line flags of `eval/run_eval.py` set the same fields (flags win over the file).
"""
from __future__ import annotations

from typing import Any, Literal, Optional

from pydantic import Field, NonNegativeInt, PositiveFloat, PositiveInt, field_validator, model_validator

from eval.tasks import TASK_NAMES, unknown_task_message
from utils.config import RecipeSection, RepoPath, Section


class EvalModelConfig(Section):
    checkpoint: Optional[RepoPath] = None  # our checkpoint or a Hugging Face directory
    adapter: Optional[RepoPath] = None  # a LoRA adapter directory (with checkpoint)
    base_url: Optional[str] = None  # an OpenAI-compatible server, e.g. http://127.0.0.1:8000/v1
    name: Optional[str] = None  # the served model's name (base_url; default: the first it lists)
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    kv_cache_memory_mb: Optional[PositiveFloat] = None  # generation's KV pool (default: the engine's)
    concurrency: PositiveInt = 8  # base_url: HTTP requests in flight

    @model_validator(mode="after")
    def _one_source(self) -> "EvalModelConfig":
        if (self.checkpoint is None) == (self.base_url is None):
            raise ValueError("give exactly one of checkpoint (--checkpoint) or base_url (--base_url)")
        if self.adapter is not None and self.checkpoint is None:
            raise ValueError("adapter needs a checkpoint to apply it to")
        if self.name is not None and self.base_url is None:
            raise ValueError("name (--model) is for base_url; a checkpoint is named by its directory")
        return self


class EvalSettings(Section):
    tasks: list[str] = Field(default_factory=lambda: list(TASK_NAMES), min_length=1)
    limit: Optional[PositiveInt] = None  # samples per task (MMLU: per subject, as lm-eval)
    shots: Optional[NonNegativeInt] = None  # few-shot examples (default: 5 for mmlu and gsm8k)
    batch_size: PositiveInt = 16  # rows per forward; sequences decoded together
    data_dir: Optional[RepoPath] = None  # default: the shared data ($LLM_DATA_DIR, else ../shared/data)
    chat: bool = False  # gsm8k / mmlu in the chat template, shots as turns
    samples_per_task: PositiveInt = 1  # HumanEval completions per problem (pass@k for k <= n)
    temperature: Optional[float] = Field(None, ge=0.0)  # HumanEval sampling (default 0.2 when n > 1)
    top_p: Optional[float] = Field(None, gt=0.0, le=1.0)  # HumanEval sampling (default 0.95 when n > 1)
    max_gen_toks: Optional[PositiveInt] = None  # default: 256 (gsm8k), 1024 (humaneval)
    seed: int = 1234  # few-shot sampling (lm-eval's default seed) and sampling seeds
    ppl_data: Optional[RepoPath] = None  # a token bin (*.bin) or a text file
    ppl_stride: Optional[PositiveInt] = None  # rolling-window stride (default: the model's length)
    timeout: PositiveFloat = 10.0  # HumanEval: seconds per program
    workers: PositiveInt = 2  # HumanEval: sandboxed programs at once

    @field_validator("tasks", mode="before")
    @classmethod
    def _split(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [t.strip() for t in value.split(",") if t.strip()]
        return value

    @field_validator("tasks")
    @classmethod
    def _known(cls, value: list[str]) -> list[str]:
        for name in value:
            if name not in TASK_NAMES:
                raise ValueError(unknown_task_message(name))
        if len(set(value)) != len(value):
            raise ValueError("a task is listed twice")
        return value


class OutputConfig(Section):
    out: Optional[RepoPath] = None  # default: runs/eval/<name>
    name: Optional[str] = None  # default: from the checkpoint or served model


class EvalConfig(Section):
    stage: Literal["eval"] = "eval"
    recipe: Optional[RecipeSection] = None  # a recipe's 4_eval.yaml: the stage it evaluates
    model: EvalModelConfig = Field(default_factory=EvalModelConfig)
    eval: EvalSettings = Field(default_factory=EvalSettings)
    output: OutputConfig = Field(default_factory=OutputConfig)
