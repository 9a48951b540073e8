"""Supervised fine-tuning (SFT) on chat data: the stage shared by full-parameter, LoRA and QLoRA.

    python finetune/sft_train.py --config_path configs/sft/full.yaml                 # every weight
    python finetune/peft/lora/sft_lora_train.py --config_path configs/sft/lora.yaml   # LoRA adapters
    python finetune/peft/qlora/sft_qlora_train.py --config_path configs/sft/qlora.yaml  # NF4 base + LoRA
        [--set key=value ...] [--resume auto|PATH] [--print_config] [--compile] [--device ...]
        [--merge_and_save]   (LoRA / QLoRA)

As every stage, this is data + loss + which parameters train, handed to the one engine
(`trainer.engine.Trainer`: AMP, compile, DDP/FSDP2, exact resume, spike guard, metrics):

* Data: the SFT bins (``<data_dir>/sft/{train,val}``: chat tokens, a per-token loss mask and
  the sample boundaries; `data_pipeline/processing/build_sft_bins.py`) read by
  `data_pipeline.chat_loaders.SFTLoader`. Packed (``sft.packing``, the default): several
  samples per row, positions restarting at every sample and attention that never crosses a
  sample boundary (document masking, as in Krell et al. 2021), so a packed row computes
  exactly what its samples would one at a time. Padded: one sample per row.
* Loss: next-token cross-entropy on the assistant tokens only (labels are -100 elsewhere),
  summed by `trainer.losses.causal_lm_loss` and divided by the engine by the number of
  target tokens of the whole step (all micro-batches and ranks): every assistant token
  weighs the same, whatever the sample lengths and packing (InstructGPT-style SFT,
  Ouyang et al. 2022).
* Parameters: all (``full``), or LoRA adapters on a frozen base (``lora``, Hu et al. 2021),
  or LoRA on a frozen 4-bit NF4 base (``qlora``, Dettmers et al. 2023); see
  `finetune.base_model` and `finetune.peft.adapters`. Under torchrun, full SFT runs with DDP
  or FSDP2; LoRA / QLoRA with DDP (the adapters are small and the frozen base is not sharded).

The run starts from ``checkpointing.init_from`` (our checkpoint or a Hugging Face directory;
how its config merges with ``model:`` is in `finetune.config`) and writes
``runs/sft/<run_name>/``: config.yaml (resolved), train.log, metrics.jsonl, loss.png and
checkpoints/ — each with the tokenizer and its chat template; LoRA/QLoRA checkpoints also hold
the adapters alone (PEFT layout), and ``final`` is the adapters (+ merged weights with
``--merge_and_save``).
"""
from __future__ import annotations

import itertools
import json
import logging
from pathlib import Path
from typing import Any, Optional

import torch

from data_pipeline.chat_loaders import SFTLoader
from data_pipeline.formats import CHAT_TEMPLATE, COMMANDS, bin_base
from data_pipeline.tokenizer.io import required_tokenizer_hash
from finetune.base_model import BaseModelSource, build_sft_model, check_base_tokenizer
from finetune.config import SFTConfig, check_method_sections, resolve_model_config, rope_scaling_summary
from finetune.peft.adapters import AdapterTrainer, export_final, optimizer_factory, trainable_filter
from model import count_params, flops_per_token
from trainer.distributed import DistInfo
from trainer.engine import Trainer
from trainer.evaluation import TextSampler
from trainer.launch import flag_overrides, launch, start_run, training_arg_parser
from trainer.losses import Batch, LossFn, LossOutput, causal_lm_loss
from utils.config import load_config, to_yaml
from utils.device import pick_dtype
from utils.errors import UserError

STAGE = "sft"
logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------- data + loss
def sft_bins(cfg: SFTConfig) -> tuple[Path, Path]:
    """Train / val bin base paths: ``data.train_bin`` / ``data.val_bin``, else ``<data_dir>/sft/``."""
    root = cfg.data.data_dir / "sft"
    return bin_base(cfg.data.train_bin or root / "train.bin"), bin_base(cfg.data.val_bin or root / "val.bin")


def build_sft_loaders(cfg: SFTConfig, rank: int, world_size: int, tok_hash: Optional[str]):
    """Training loader, a factory for the fixed validation batches, and the row length."""
    seq_len = cfg.data.seq_len or cfg.model.max_seq_len
    if seq_len > cfg.model.max_seq_len:
        raise UserError(f"data.seq_len={seq_len} exceeds model.max_seq_len={cfg.model.max_seq_len}: to fine-tune "
                        "at a longer context set model.max_seq_len (and model.rope_scaling, e.g. "
                        "{type: yarn, factor: 4})")
    train_base, val_base = sft_bins(cfg)
    common = dict(seq_len=seq_len, batch_size=cfg.training.batch_size, rank=rank, world_size=world_size,
                  seed=cfg.training.seed, mode="packed" if cfg.sft.packing else "padded",
                  vocab_size=cfg.model.vocab_size, tokenizer_hash=tok_hash)
    train = SFTLoader(train_base, shuffle=True, **common)
    val = SFTLoader(val_base, shuffle=False, **common)
    if val.steps_per_epoch() == 0:
        raise UserError(f"{val_base}.bin is too small for one validation batch of {cfg.training.batch_size} x "
                        f"{world_size} rows: lower training.batch_size or hold out more samples "
                        f"(`{COMMANDS['sft']} --val_fraction ...`)")
    start = val.state_dict()

    def val_batches():
        val.load_state_dict(start)  # the same batches at every evaluation
        return itertools.islice(val, val.steps_per_epoch())

    return train, val_batches, seq_len


def sft_loss(packed: bool) -> LossFn:
    """`causal_lm_loss` on the assistant tokens. Packed rows pass their sample ids and
    positions to the model (document masking); a padded row holds one sample followed by
    padding, which plain causal attention already keeps out of every real token's view, so it
    runs without a mask (the fast causal attention path)."""
    if packed:
        return causal_lm_loss

    def padded_loss(model: torch.nn.Module, batch: Batch) -> LossOutput:
        return causal_lm_loss(model, {"input_ids": batch["input_ids"], "labels": batch["labels"]})

    return padded_loss


def check_chat_template(tokenizer_dir: Path) -> None:
    """The checkpoints carry the tokenizer directory: it must hold the chat template the SFT
    bins were rendered with, so a chat with the result formats prompts the same way."""
    path = tokenizer_dir / "tokenizer_config.json"
    template = json.loads(path.read_text()).get("chat_template") if path.is_file() else None
    if template is None:
        raise UserError(f"{tokenizer_dir} has no chat template (tokenizer_config.json): SFT checkpoints carry it "
                        f"for chat; rerun `{COMMANDS['tokenizer']}`")
    if template != CHAT_TEMPLATE:
        raise UserError(f"the chat template in {path} is not the project's ChatML template the SFT bins were "
                        "built with; rerun the tokenizer step or fix tokenizer_config.json")


# ---------------------------------------------------------------------------- the stage
def prepare(cfg: SFTConfig, method: str) -> BaseModelSource:
    """Check the sections for `method`, open the base model and resolve ``cfg.model`` from it
    (before anything is written, so config.yaml holds the resolved model)."""
    check_method_sections(cfg, method)
    source = BaseModelSource.open(cfg.checkpointing.init_from)
    cfg.model = resolve_model_config(source.config, cfg.model, source.path)
    return source


def check_inputs(cfg: SFTConfig, method: str, source: BaseModelSource, dist: DistInfo) -> tuple[Path, str]:
    """What every stage that starts from a base model checks first (also `align.stage`):
    parallelism fits the method, the tokenizer has the chat template and is the base's.
    Returns the tokenizer directory and its hash."""
    if method != "full" and cfg.training.pipeline_parallel > 1:
        raise UserError("training.pipeline_parallel is not supported with LoRA/QLoRA: the adapters are saved from "
                        "the whole model on one rank; use full SFT, or context_parallel for long rows")
    if method != "full" and dist.is_distributed and cfg.training.parallelism == "fsdp":
        raise UserError("training.parallelism=fsdp is not supported with LoRA/QLoRA: the frozen base is not "
                        "sharded and the adapters are small; use ddp")
    tokenizer_dir = cfg.data.tokenizer_path()
    tok_hash = required_tokenizer_hash(tokenizer_dir)
    check_chat_template(tokenizer_dir)
    check_base_tokenizer(source, tok_hash)
    return tokenizer_dir, tok_hash


def build_trainer(cfg: SFTConfig, method: str, source: BaseModelSource, dist: DistInfo,
                  resume: Optional[str] = None) -> Trainer:
    """Inputs checked, run directory created, model built: the engine ready to `fit`."""
    tokenizer_dir, tok_hash = check_inputs(cfg, method, source, dist)
    train_data, val_data, seq_len = build_sft_loaders(cfg, dist.dp_rank, dist.dp_size, tok_hash)
    run = start_run(cfg, STAGE, dist, resume)
    compute_dtype = pick_dtype(cfg.training.dtype, dist.device)
    model = build_sft_model(source, cfg, method, dist.device, compute_dtype)
    log_model(model, cfg, method, source, seq_len)
    lcfg = cfg.logging
    sampler = (TextSampler(tokenizer_dir, lcfg.sample_prompt, lcfg.sample_tokens, lcfg.sample_top_k,
                           cfg.training.seed) if lcfg.sample_interval > 0 else None)
    common = dict(stage=STAGE, val_data=val_data, tokenizer_dir=tokenizer_dir, sampler=sampler)
    loss = sft_loss(cfg.sft.packing)
    if method == "full":
        return Trainer(cfg, model, loss, train_data, run, dist, flops_per_token=flops_per_token(cfg.model, seq_len),
                       **common)
    # adapters: no MFU (the frozen weights need no weight gradients, so 6N FLOPs/token overstates the work)
    return AdapterTrainer(cfg, model, loss, train_data, run, dist, trainable=trainable_filter(model),
                          optimizer_factory=optimizer_factory(cfg), base_model_path=str(source.path), **common)


def log_model(model: torch.nn.Module, cfg: SFTConfig, method: str, source: BaseModelSource, seq_len: int) -> None:
    total = count_params(cfg.model)["total"]
    trainable = total if method == "full" else sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    logger.info("SFT (%s) from %s (%s): %.2fM parameters, %.3fM trainable (%.2f%%); rows of %d tokens (%s), "
                "rope scaling %s", method, source.path, source.kind, total / 1e6, trainable / 1e6,
                100 * trainable / total, seq_len, "packed" if cfg.sft.packing else "padded",
                rope_scaling_summary(cfg.model.rope_scaling))


def train(cfg: SFTConfig, method: str, resume: Optional[str] = None, stop_at: Optional[int] = None) -> dict[str, Any]:
    """Run (or resume) one SFT run with ``method`` in full / lora / qlora; returns the
    engine's summary (``final_checkpoint`` is the exported final directory)."""
    source = prepare(cfg, method)
    with launch(cfg) as dist:
        trainer = build_trainer(cfg, method, source, dist, resume)
        trainer.resume(resume)
        summary = trainer.fit(stop_at=stop_at)
        final = summary["final_checkpoint"]
        if method != "full" and final is not None:  # rank 0 wrote it
            export_final(trainer, source, cfg, method, final, cfg.data.tokenizer_path())
        return summary


# ---------------------------------------------------------------------------- CLI
def main(method: str, description: str) -> None:
    """The command line of the three SFT scripts (they differ only in `method`)."""
    parser = training_arg_parser(description)
    if method != "full":
        parser.add_argument("--merge_and_save", action="store_true",
                            help="at the end also write checkpoints/final as a plain checkpoint with the adapters "
                                 "merged into the base weights (loadable by inference alone)")
    args = parser.parse_args()
    args.overrides = flag_overrides(args)
    if getattr(args, "merge_and_save", False):
        args.overrides.append("lora.merge_and_save=true")
    cfg = load_config(args.config_path, SFTConfig, args.overrides)
    if args.print_config:  # resolved: the model config as merged with the base's
        prepare(cfg, method)
        print(to_yaml(cfg), end="")
        return
    train(cfg, method, resume=args.resume)
