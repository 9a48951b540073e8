"""Loading a model for inference: our checkpoint directories, Hugging Face directories, LoRA adapters.

- Our checkpoints (`utils.checkpoint`: config.json with `ModelConfig` fields + model.safetensors,
  tokenizer files copied beside them).
- Hugging Face ``transformers`` directories (config.json with a ``model_type``), converted by
  `model.hf.load_hf_dir`; the tokenizer is the directory's ``tokenizer.json``.
- ``adapter``: a LoRA adapter directory (PEFT layout, `model.lora_io`) applied on the base weights
  and merged into them (Hu et al., 2021), so inference runs a plain model at no extra cost.

The model is built on the meta device and takes the loaded tensors as its parameters (no random
init), then moves to the device and dtype. Every user mistake (missing path, not a checkpoint,
config or weights that do not fit, bad adapter) is a `UserError` with one line. A reward model
(our config.json with ``"task": "reward_model"``, or a Hugging Face ``*ForSequenceClassification``)
is refused: it scores text and has no language-model head (`align/score.py` runs it).

What ends a sequence and how it is sampled by default come with the model, as in transformers and
vLLM: every eos id named by the tokenizer (our ``<|endoftext|>``, tokenizer_config.json's
``eos_token``), config.json, an imported checkpoint's meta.json and ``generation_config.json``
(Llama 3 Instruct lists three) is a stop id, and generation_config.json's temperature, top_p,
top_k, min_p and repetition_penalty are the defaults of requests that leave them unset.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import torch
from pydantic import ValidationError
from tokenizers import Tokenizer

from data_pipeline.chat import read_chat_template
from data_pipeline.formats import EOS_TOKEN
from inference.engine.sampling import GENERATION_DEFAULT_KEYS, SamplingParams
from model.build import keep_fp32_modules
from model.config import ModelConfig
from model.transformer import Transformer
from utils.errors import UserError

@dataclass
class LoadedModel:
    model: Transformer  # eval mode, on the device, in the dtype
    config: ModelConfig
    tokenizer: Optional[Tokenizer]  # None when the directory has no tokenizer.json
    tokenizer_file: Optional[Path]
    eos_token_id: Optional[int]  # the model's main eos id (first of eos_token_ids)
    eos_token_ids: tuple[int, ...] = ()  # every id that ends a sequence; default: (eos_token_id,)
    generation_defaults: dict[str, float] = field(default_factory=dict)  # from generation_config.json

    def __post_init__(self) -> None:
        if not self.eos_token_ids and self.eos_token_id is not None:
            self.eos_token_ids = (self.eos_token_id,)

GENERATION_CONFIG_FILE = "generation_config.json"


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read {path}: {e}") from None


def _load_weights(path: Path) -> tuple[ModelConfig, dict[str, torch.Tensor], dict]:
    """(config, our state dict on the CPU, the raw config.json) of a checkpoint or HF directory."""
    if not path.exists():
        raise UserError(f"checkpoint not found: {path}")
    if not (path / "config.json").is_file():
        raise UserError(f"not a checkpoint directory (no config.json): {path}")
    raw = _read_json(path / "config.json")
    _refuse_reward_model(path, raw)
    if "model_type" in raw:  # a Hugging Face transformers directory
        from model.hf import HFFormatError, load_hf_dir

        try:
            cfg, state_dict = load_hf_dir(path)
        except HFFormatError as e:
            raise UserError(str(e)) from None
        return cfg, state_dict, raw
    from utils.checkpoint import load_checkpoint

    ckpt = load_checkpoint(path)
    try:
        cfg = ModelConfig(**ckpt.model_config)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "config"
        raise UserError(f"{path / 'config.json'}: {where}: {first['msg']}") from None
    return cfg, ckpt.state_dict, raw


def _refuse_reward_model(path: Path, raw: dict) -> None:
    """A reward model cannot generate: one clear line instead of a weights mismatch."""
    from model.hf import is_reward_config
    from utils.checkpoint import REWARD_MODEL, TASK_KEY

    if raw.get(TASK_KEY) == REWARD_MODEL:
        what = f"config.json {TASK_KEY}={REWARD_MODEL}"
    elif is_reward_config(raw):
        what = ", ".join(raw["architectures"])
    else:
        return
    raise UserError(f"{path} is a reward model ({what}): it scores text, it does not generate; use align/score.py")


def build_from_weights(cfg: ModelConfig, state_dict: dict[str, torch.Tensor], path: Path,
                       cls: type[Transformer] = Transformer) -> Transformer:
    """A `Transformer` (or subclass, e.g. `model.reward.RewardModel`) whose parameters are the
    given tensors (CPU, their own dtype); weights that do not fit are a `UserError`."""
    with torch.device("meta"):
        model = cls(cfg)
    try:
        model.load_state_dict(state_dict, strict=True, assign=True)
    except RuntimeError as e:
        detail = " ".join(str(e).split())[:300]
        what = "a reward model with its config" if cls is not Transformer else "its config"
        raise UserError(f"the weights in {path} do not fit {what} ({detail})") from None
    return model


def _apply_adapter(model: Transformer, cfg: ModelConfig, adapter: Path) -> Transformer:
    """Load a LoRA adapter on ``model`` and return a plain model with it merged in."""
    from model.lora_io import load_adapter, merged_state_dict

    if not adapter.is_dir():
        raise UserError(f"adapter directory not found: {adapter}")
    try:
        load_adapter(model, adapter)
    except (FileNotFoundError, ValueError) as e:
        raise UserError(" ".join(str(e).split())) from None
    return build_from_weights(cfg, merged_state_dict(model), adapter)


def _tokenizer(path: Path) -> tuple[Optional[Tokenizer], Optional[Path]]:
    file = path / "tokenizer.json"
    if not file.is_file():
        return None, None
    try:
        tok = Tokenizer.from_file(str(file))
    except Exception as e:  # `tokenizers` raises plain Exceptions for unreadable files
        raise UserError(f"{file} is not a valid tokenizer.json ({str(e).splitlines()[0]})") from None
    return tok, file


def token_ids(value: Any) -> list[int]:
    """The ids a config field names: an int, a list of ints, or nothing (None, other types)."""
    values = value if isinstance(value, list) else [value]
    return [v for v in values if isinstance(v, int) and not isinstance(v, bool) and v >= 0]


def eos_token_ids(path: Path, raw_config: dict, generation_config: dict, tok: Optional[Tokenizer]) -> tuple[int, ...]:
    """Every eos id of the model, de-duplicated, the main one first (see the module docstring)."""
    candidates: list[int] = []
    if tok is not None:
        named = [EOS_TOKEN, read_chat_template(path)[1].get("eos_token")]
        candidates += [i for i in (tok.token_to_id(t) for t in named if t) if i is not None]
    meta = _read_json(path / "meta.json") if (path / "meta.json").is_file() else {}
    hf_ids = meta.get("hf_token_ids") if isinstance(meta, dict) else None
    hf_ids = hf_ids if isinstance(hf_ids, dict) else {}
    for source in (raw_config, hf_ids, generation_config):
        candidates += token_ids(source.get("eos_token_id"))
    return tuple(dict.fromkeys(candidates))


def generation_defaults(path: Path, generation_config: dict) -> dict[str, float]:
    """The sampling defaults generation_config.json sets (UserError naming the file if one is invalid)."""
    defaults = {k: generation_config[k] for k in GENERATION_DEFAULT_KEYS if generation_config.get(k) is not None}
    try:
        SamplingParams(**defaults)
    except ValueError as e:
        raise UserError(f"{path / GENERATION_CONFIG_FILE}: {e}") from None
    return defaults


def load_model(
    checkpoint: Union[str, Path],
    device: torch.device,
    dtype: torch.dtype,
    adapter: Optional[Union[str, Path]] = None,
) -> LoadedModel:
    """Load a checkpoint or Hugging Face directory (+ optional LoRA adapter) for inference."""
    path = Path(checkpoint)
    cfg, state_dict, raw = _load_weights(path)
    model = build_from_weights(cfg, state_dict, path)
    if adapter is not None:
        model = _apply_adapter(model, cfg, Path(adapter))
    model = keep_fp32_modules(model.to(device=device, dtype=dtype)).eval()
    model.requires_grad_(False)
    tok, tok_file = _tokenizer(path)
    gen_file = path / GENERATION_CONFIG_FILE
    gen = _read_json(gen_file) if gen_file.is_file() else {}
    if not isinstance(gen, dict):
        raise UserError(f"{gen_file} is not a JSON object")
    eos_ids = eos_token_ids(path, raw, gen, tok)
    return LoadedModel(model, cfg, tok, tok_file, eos_ids[0] if eos_ids else None, eos_ids,
                       generation_defaults(path, gen))
