"""The checkpoint directory format — the one module that writes and reads it.

A checkpoint is a directory:

    config.json            model config (ModelConfig fields) + format version
    model.safetensors      weights (no `_orig_mod.` / `module.` prefixes)
    tokenizer.json ...     tokenizer files + chat template (+ an imported model's generation_config.json:
                           its eos ids and sampling defaults), copied when known
    meta.json              free-form metadata (stage, step, metrics, ...)
    training_state/        only for resumable training:
        state.json         the nested state with tensors replaced by references
        tensors.safetensors  every tensor of the state (optimizer moments, RNG states, ...)

Writes are atomic: everything goes to a hidden temp directory beside the target, is fsynced,
then renamed into place, so a crash at any moment leaves the previous checkpoint intact.
Loading never unpickles: safetensors + JSON only.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from utils.errors import UserError

FORMAT_VERSION = 1
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer_meta.json",
    "chat_template.jinja", "tokenizer.model", "generation_config.json",
)
_STRIP_PREFIXES = ("_orig_mod.", "module.")
# config.json of a checkpoint that is not a causal LM says what it is: {"task": "reward_model", ...}.
# Absent means a causal language model (a policy). Loaders that expect one kind refuse the other.
TASK_KEY = "task"
CAUSAL_LM, REWARD_MODEL = "causal_lm", "reward_model"


@dataclass
class Checkpoint:
    path: Path
    model_config: dict
    state_dict: dict[str, torch.Tensor]
    meta: dict = field(default_factory=dict)
    training_state: Optional[dict] = None
    task: str = CAUSAL_LM  # CAUSAL_LM or REWARD_MODEL (config.json's "task"; not part of model_config)

    @property
    def tokenizer_dir(self) -> Optional[Path]:
        return self.path if (self.path / "tokenizer.json").exists() else None


def clean_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop wrapper prefixes (torch.compile's `_orig_mod.`, DDP's `module.`) and make tensors
    contiguous, detached and un-shared so safetensors can write them."""
    out: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        for p in _STRIP_PREFIXES:
            k = k.replace(p, "")
        out[k] = v.detach().contiguous()
    return _unshare(out)


def _unshare(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors that share memory (tied weights): clone the duplicates."""
    seen: set[tuple[int, int]] = set()
    out = {}
    for k, v in tensors.items():
        key = (v.untyped_storage().data_ptr(), v.storage_offset()) if v.numel() else (id(v), 0)
        out[k] = v.clone() if key in seen else v
        seen.add(key)
    return out


# ---------------------------------------------------------------- nested state ↔ safetensors + JSON
def _flatten(obj: Any, tensors: dict[str, torch.Tensor], prefix: str) -> Any:
    if isinstance(obj, torch.Tensor):
        tensors[prefix] = obj.detach().cpu().contiguous()
        return {"__tensor__": prefix}
    if isinstance(obj, np.ndarray):
        tensors[prefix] = torch.from_numpy(np.ascontiguousarray(obj))
        return {"__ndarray__": prefix}
    if isinstance(obj, dict):
        for k in obj:
            if not isinstance(k, (str, int)):
                raise TypeError(f"state keys must be str or int, got {type(k).__name__} at {prefix}")
        return {"__dict__": [[k, _flatten(v, tensors, f"{prefix}/{k}")] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tuple__": [_flatten(v, tensors, f"{prefix}/{i}") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_flatten(v, tensors, f"{prefix}/{i}") for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, (np.integer, np.floating)):
        return obj.item()
    raise TypeError(f"cannot store {type(obj).__name__} at {prefix} in a checkpoint")


def _unflatten(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, list):
        return [_unflatten(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__ndarray__" in obj:
            return tensors[obj["__ndarray__"]].numpy()
        if "__tuple__" in obj:
            return tuple(_unflatten(v, tensors) for v in obj["__tuple__"])
        if "__dict__" in obj:
            return {k: _unflatten(v, tensors) for k, v in obj["__dict__"]}
    return obj


def save_state_tree(state: dict, directory: Path) -> None:
    """A nested dict of tensors / arrays / scalars → state.json + tensors.safetensors."""
    directory.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    tree = _flatten(state, tensors, "state")
    save_file(_unshare(tensors), str(directory / "tensors.safetensors"))
    (directory / "state.json").write_text(json.dumps(tree))


def load_state_tree(directory: Path) -> dict:
    tree = json.loads((directory / "state.json").read_text())
    tensors = load_file(str(directory / "tensors.safetensors"))
    return _unflatten(tree, tensors)


# ---------------------------------------------------------------- atomic directory writes
def _fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for f in files:
            with open(os.path.join(dirpath, f), "rb") as fh:
                os.fsync(fh.fileno())
        fd = os.open(dirpath, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_replace_dir(tmp: Path, final: Path) -> None:
    """Move a fully written `tmp` directory to `final`, replacing any previous one atomically
    enough that some complete version is always present under `final` or its backup."""
    _fsync_tree(tmp)
    if final.exists():
        backup = final.parent / f".old-{final.name}-{os.getpid()}"
        os.rename(final, backup)
        os.rename(tmp, final)
        shutil.rmtree(backup, ignore_errors=True)
    else:
        os.rename(tmp, final)
    fd = os.open(final.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _recover_backup(final: Path) -> None:
    """A crash between the two renames of `atomic_replace_dir` leaves only the backup: restore it."""
    if not final.parent.is_dir():
        return
    for b in sorted(final.parent.glob(f".old-{final.name}-*")):
        if is_checkpoint(b):
            os.rename(b, final)
            return


def save_checkpoint(
    ckpt_dir: str | Path,
    model_state: dict[str, torch.Tensor],
    model_config: dict,
    tokenizer_dir: Optional[str | Path] = None,
    training_state: Optional[dict] = None,
    meta: Optional[dict] = None,
) -> Path:
    """Write a checkpoint directory atomically (temp dir + rename). Returns its path."""
    final = Path(ckpt_dir)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".tmp-{final.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        save_file(clean_state_dict(model_state), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps({**model_config, "format_version": FORMAT_VERSION}, indent=2))
        (tmp / "meta.json").write_text(json.dumps(meta or {}, indent=2))
        if tokenizer_dir is not None:
            copy_tokenizer_files(Path(tokenizer_dir), tmp)
        if training_state is not None:
            save_state_tree(training_state, tmp / "training_state")
        atomic_replace_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def copy_tokenizer_files(src: Path, dst: Path) -> int:
    """Copy the tokenizer files found in `src` into `dst`; returns how many were copied."""
    n = 0
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
            n += 1
    return n


def is_checkpoint(path: Path) -> bool:
    return (path / "config.json").is_file() and (path / "model.safetensors").is_file()


def load_checkpoint(ckpt_dir: str | Path, load_training_state: bool = False, map_location: str = "cpu") -> Checkpoint:
    """Read a checkpoint directory (safetensors + JSON only; never unpickles)."""
    path = Path(ckpt_dir)
    if not path.exists():
        _recover_backup(path)
    if not path.exists():
        raise UserError(f"checkpoint not found: {path}")
    if not is_checkpoint(path):
        raise UserError(f"not a checkpoint directory (needs config.json + model.safetensors): {path}")
    try:
        config = json.loads((path / "config.json").read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"corrupt {path / 'config.json'}: {e}") from None
    config.pop("format_version", None)
    task = config.pop(TASK_KEY, CAUSAL_LM)
    state_dict = load_file(str(path / "model.safetensors"), device=map_location)
    meta = json.loads((path / "meta.json").read_text()) if (path / "meta.json").exists() else {}
    training_state = None
    if load_training_state:
        ts = path / "training_state"
        if not (ts / "state.json").exists():
            raise UserError(f"checkpoint has no training_state/ to resume from: {path}")
        training_state = load_state_tree(ts)
    return Checkpoint(path=path, model_config=config, state_dict=state_dict, meta=meta, training_state=training_state,
                      task=task)


def checkpoint_task(path: str | Path) -> str:
    """What a checkpoint directory holds, from its config.json alone: CAUSAL_LM or REWARD_MODEL."""
    try:
        config = json.loads((Path(path) / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return CAUSAL_LM
    return config.get(TASK_KEY, CAUSAL_LM) if isinstance(config, dict) else CAUSAL_LM


def list_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoints under `root` named `step_<N>`, oldest first (temp dirs ignored)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        if p.name.startswith("step_") and p.name[5:].isdigit() and is_checkpoint(p):
            found.append((int(p.name[5:]), p))
    return [p for _, p in sorted(found)]


def latest_checkpoint(root: str | Path, resumable: bool = True) -> Optional[Path]:
    """The newest complete checkpoint under `root` (with training_state/ when `resumable`)."""
    for p in reversed(list_checkpoints(root)):
        if not resumable or (p / "training_state" / "state.json").exists():
            return p
    return None


def step_dir(root: str | Path, step: int) -> Path:
    return Path(root) / f"step_{step:08d}"
