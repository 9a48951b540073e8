"""Convert between Hugging Face model directories and this project's checkpoints.

    python utils/convert_hf.py --hf_dir DIR --out CKPT_DIR         # Hugging Face -> checkpoint
    python utils/convert_hf.py --checkpoint CKPT_DIR --to_hf DIR   # checkpoint -> Hugging Face
    python utils/convert_hf.py --checkpoint CKPT_DIR --to_gguf out.gguf [--outtype f32|f16|q8_0]

Families: llama (2, 3), qwen2, qwen3, mistral, gemma2, gemma3 (text), deepseek_v3 (see
`model/hf.py`). Tokenizer files (with the chat template) and ``generation_config.json`` (the
model's eos ids and sampling defaults, read by the inference engine) present in the source
directory are copied along, both ways. The special token ids of an imported config are kept in
the checkpoint's meta.json and written back on export; a checkpoint trained here gets them from
its own tokenizer.json.

``--to_gguf`` writes one GGUF file for llama.cpp and Ollama (`model/gguf.py`: Llama, Mistral,
Qwen2, Qwen3), the byte-level BPE tokenizer and chat template embedded; ``--checkpoint`` may
then also be a Hugging Face directory.

Reward models go both ways too: a reward-model checkpoint (config.json ``"task": "reward_model"``)
exports as ``<Family>ForSequenceClassification`` with one label and the tokenizer's pad token
id; a Hugging Face ``*ForSequenceClassification`` directory imports as a reward-model checkpoint.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional, Sequence

if __package__ in (None, ""):  # run as a script: make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pydantic import ValidationError  # noqa: E402

from data_pipeline.formats import EOS_TOKEN, PAD_TOKEN  # noqa: E402
from model.config import ModelConfig  # noqa: E402
from model.gguf import OUTTYPES, GGUFExportError, check_exportable, write_gguf  # noqa: E402
from model.hf import (HFFormatError, is_reward_config, load_hf_dir, load_hf_reward_dir, read_hf_config,  # noqa: E402
                      save_hf_dir, save_hf_reward_dir)
from utils.checkpoint import (CAUSAL_LM, REWARD_MODEL, TASK_KEY, TOKENIZER_FILES, checkpoint_task,  # noqa: E402
                              copy_tokenizer_files, load_checkpoint, save_checkpoint)
from utils.errors import UserError, cli_main  # noqa: E402
from utils.paths import resolve_path  # noqa: E402

TOKEN_ID_FIELDS = ("bos_token_id", "eos_token_id", "pad_token_id")


def hf_to_checkpoint(hf_dir: Path, out: Path) -> ModelConfig:
    """Import a Hugging Face directory into a checkpoint directory at ``out`` (a causal LM, or a
    reward model from a ``*ForSequenceClassification``)."""
    if not hf_dir.is_dir():
        raise UserError(f"--hf_dir {hf_dir} is not a directory")
    try:
        hf_config = read_hf_config(hf_dir)
        reward = is_reward_config(hf_config)
        cfg, state_dict = (load_hf_reward_dir if reward else load_hf_dir)(hf_dir)
    except HFFormatError as e:
        raise UserError(f"--hf_dir {hf_dir}: {e}") from None
    has_tokenizer = any((hf_dir / name).is_file() for name in TOKENIZER_FILES)
    meta = {
        "source": "huggingface",
        "hf_model_type": hf_config.get("model_type"),
        "hf_token_ids": {k: hf_config[k] for k in TOKEN_ID_FIELDS if hf_config.get(k) is not None},
    }
    model_config = {**cfg.model_dump(), TASK_KEY: REWARD_MODEL} if reward else cfg.model_dump()
    save_checkpoint(out, state_dict, model_config, tokenizer_dir=hf_dir if has_tokenizer else None, meta=meta)
    return cfg


def _tokenizer_token_ids(ckpt_dir: Path) -> dict[str, int]:
    """eos/pad ids of the project's special tokens in the checkpoint's tokenizer.json, if any."""
    path = ckpt_dir / "tokenizer.json"
    if not path.is_file():
        return {}
    added = {t["content"]: t["id"] for t in json.loads(path.read_text()).get("added_tokens", [])}
    ids = {}
    if EOS_TOKEN in added:
        ids["eos_token_id"] = ids["bos_token_id"] = added[EOS_TOKEN]
    if PAD_TOKEN in added:
        ids["pad_token_id"] = added[PAD_TOKEN]
    return ids


def _model_config(fields: dict, ckpt_dir: Path) -> ModelConfig:
    """The checkpoint's `ModelConfig`; a field it rejects is a user error naming the file."""
    try:
        return ModelConfig(**fields)
    except ValidationError as e:
        err = e.errors()[0]
        raise UserError(f"{ckpt_dir}/config.json: {'.'.join(map(str, err['loc']))}: {err['msg']}") from None


def checkpoint_to_hf(ckpt_dir: Path, out: Path) -> ModelConfig:
    """Export a checkpoint directory as a Hugging Face directory at ``out``."""
    ckpt = load_checkpoint(ckpt_dir)
    if "model_type" in ckpt.model_config:
        raise UserError(f"--checkpoint {ckpt_dir} is a Hugging Face directory; import it with --hf_dir")
    cfg = _model_config(ckpt.model_config, ckpt_dir)
    if ckpt.task not in (CAUSAL_LM, REWARD_MODEL):
        raise UserError(f"{ckpt_dir}/config.json: unknown task {ckpt.task!r} (allowed: {CAUSAL_LM}, {REWARD_MODEL})")
    token_ids = ckpt.meta.get("hf_token_ids") or _tokenizer_token_ids(ckpt.path)
    try:
        if ckpt.task == REWARD_MODEL:
            pad = token_ids.get("pad_token_id", _tokenizer_token_ids(ckpt.path).get("pad_token_id"))
            if pad is None:
                raise UserError(f"--checkpoint {ckpt_dir} is a reward model without a pad token id (no tokenizer.json "
                                "with <|pad|> beside it): transformers reads the reward at the last non-pad token")
            save_hf_reward_dir(cfg, ckpt.state_dict, out, pad, extra_config=token_ids)
        else:
            save_hf_dir(cfg, ckpt.state_dict, out, extra_config=token_ids)
    except HFFormatError as e:
        raise UserError(f"--checkpoint {ckpt_dir}: {e}") from None
    copy_tokenizer_files(ckpt.path, out)
    return cfg


def _gguf_tokenizer(path: Path, token_ids: dict[str, int]) -> dict:
    """write_gguf's tokenizer arguments from the tokenizer files in ``path`` (UserError without any)."""
    from tokenizers import Tokenizer

    from data_pipeline.chat import read_chat_template

    file = path / "tokenizer.json"
    if not file.is_file():
        raise UserError(f"--checkpoint {path} has no tokenizer.json: llama.cpp and Ollama read the vocabulary "
                        "from the GGUF file")
    encoded = Tokenizer.from_file(str(file)).encode("a")
    add_bos = bool(encoded.special_tokens_mask and encoded.special_tokens_mask[0])
    special = {k.removesuffix("_token_id"): v for k, v in token_ids.items()}
    if add_bos:
        special["bos"] = encoded.ids[0]
    return {"tokenizer": json.loads(file.read_text()), "special_ids": special, "add_bos": add_bos,
            "chat_template": read_chat_template(path)[0]}


def checkpoint_to_gguf(src: Path, out: Path, outtype: str) -> ModelConfig:
    """Export a checkpoint (or Hugging Face) directory as one GGUF file at ``out``."""
    if src.is_dir() and (src / "config.json").is_file() and "model_type" in json.loads((src / "config.json").read_text()):
        try:
            cfg, state_dict = load_hf_dir(src)
        except HFFormatError as e:
            raise UserError(f"--checkpoint {src}: {e}") from None
        token_ids = {k: v for k, v in read_hf_config(src).items() if k in TOKEN_ID_FIELDS and isinstance(v, int)}
    else:
        ckpt = load_checkpoint(src)
        if ckpt.task != CAUSAL_LM:
            raise UserError(f"--checkpoint {src} is a {ckpt.task}: only causal language models export to GGUF")
        cfg = _model_config(ckpt.model_config, src)
        state_dict = ckpt.state_dict
        token_ids = ckpt.meta.get("hf_token_ids") or _tokenizer_token_ids(src)
    try:
        check_exportable(cfg)
        if cfg.sliding_window is not None:
            print(f"warning: llama.cpp's {cfg.family} attends to the whole context: the export equals this model "
                  f"up to {cfg.sliding_window} tokens (its sliding window)", file=sys.stderr)
        write_gguf(cfg, state_dict, out, outtype, name=src.name, **_gguf_tokenizer(src, token_ids))
    except GGUFExportError as e:
        raise UserError(f"--checkpoint {src}: {e}") from None
    return cfg


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--hf_dir", help="Hugging Face model directory to import (config.json + *.safetensors)")
    src.add_argument("--checkpoint", help="checkpoint directory to export")
    parser.add_argument("--out", help="checkpoint directory to write (with --hf_dir)")
    parser.add_argument("--to_hf", help="Hugging Face directory to write (with --checkpoint)")
    parser.add_argument("--to_gguf", help="GGUF file to write (with --checkpoint)")
    parser.add_argument("--outtype", choices=OUTTYPES, default="f32", help="GGUF weight type (default f32)")
    args = parser.parse_args(argv)

    if args.hf_dir is not None:
        if args.out is None or args.to_hf is not None or args.to_gguf is not None:
            raise UserError("--hf_dir needs --out CKPT_DIR (and no --to_hf / --to_gguf)")
        source, target = resolve_path(args.hf_dir), resolve_path(args.out)
        cfg = hf_to_checkpoint(source, target)
    elif args.to_gguf is not None:
        if args.to_hf is not None or args.out is not None:
            raise UserError("--checkpoint takes one of --to_hf DIR or --to_gguf FILE (and no --out)")
        source, target = resolve_path(args.checkpoint), resolve_path(args.to_gguf)
        cfg = checkpoint_to_gguf(source, target, args.outtype)
        print(f"{source} -> {target} ({cfg.family}, {args.outtype}, {cfg.n_layers} layers, dim {cfg.dim})")
        return
    else:
        if args.to_hf is None or args.out is not None:
            raise UserError("--checkpoint needs --to_hf DIR or --to_gguf FILE (and no --out)")
        source, target = resolve_path(args.checkpoint), resolve_path(args.to_hf)
        cfg = checkpoint_to_hf(source, target)
    kind = ", reward model" if checkpoint_task(target if args.hf_dir is not None else source) == REWARD_MODEL else ""
    print(f"{source} -> {target} ({cfg.family}{kind}, {cfg.n_layers} layers, dim {cfg.dim})")


if __name__ == "__main__":
    cli_main(main)
