"""Memory of full-parameter SFT vs LoRA vs QLoRA on one ~50M-parameter model, side by side.

For the ``llama-50m`` preset (`model.get_preset`) each mode runs in a fresh subprocess, through
the real SFT stage (`finetune.sft.build_trainer`: base loading, NF4 quantisation, adapters,
the engine's optimizer step), for a few optimizer steps on chat data. Each child reports:

- ``peak_rss_mb``: peak resident memory of the whole process, ``getrusage(RUSAGE_SELF).ru_maxrss``
  (interpreter and torch included, the same for every mode; weights, gradients, optimizer
  state and activations on top),
- ``weight_bytes``: bytes of the model's weights as stored in memory (`model.qlinear.weight_bytes`:
  ``base`` = the frozen or trained base weights — NF4 blocks and scales included — and
  ``adapters``), next to ``fp16_bytes``, the same parameters at 2 bytes each,
- ``trainable_params`` and the assistant-token loss of every step.

Data: ``alpaca_en_demo.json`` from the shared data (`utils.paths.shared_data_dir`), encoded
with a 4096-token byte-level BPE trained on it, into SFT bins (`build_sft_bins.py`); without
the shared data, the built-in instruction data. The base is a randomly initialised model (the
memory does not depend on the values), so the losses start near ln(4096) ≈ 8.3. Every mode
trains with bf16 autocast (fp32 master weights for full SFT, a bf16 frozen base for LoRA,
NF4 with bf16 compute for QLoRA), AdamW and activation checkpointing (as QLoRA does, so the
activations, the same in every mode, do not hide the difference in weights and optimizer state).

Goals: QLoRA's base weight bytes ≤ 0.3 × fp16, its peak memory ≤ 0.5 × full SFT's.

    python benchmarks/sft_memory.py [--steps 6] [--seq_len 256] [--batch_size 2] [--device cpu|cuda|auto]
        [--out results.json]

Prints one JSON object.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.procs import emit_report, ru_maxrss_mb  # noqa: E402

MODES = ("full", "lora", "qlora")
PRESET = "llama-50m"
VOCAB = 4096
LORA = {"r": 16, "alpha": 32.0, "target_modules": "auto"}
QLORA = {"backend": "auto", "quantize_head": True}  # the head in NF4 too: every linear layer is 4-bit
LEARNING_RATE = {"full": 1e-3, "lora": 1e-2, "qlora": 1e-2}


# ---------------------------------------------------------------------------- parent: data + base
def prepare(work: Path, seq_len: int) -> dict[str, Any]:
    """Tokenizer, SFT bins and a random llama-50m base checkpoint under `work`."""
    import torch

    from data_pipeline.builtin import generate_instructions
    from data_pipeline.processing import build_sft_bins
    from data_pipeline.processing.common import read_records
    from data_pipeline.tokenizer.io import write_hf_configs
    from data_pipeline.tokenizer.train_tokenizer import train_hf
    from model import build_model, get_preset
    from utils.checkpoint import save_checkpoint
    from utils.paths import shared_data_dir

    shared = shared_data_dir()
    alpaca = shared / "sft" / "alpaca_en_demo.json" if shared is not None else None
    if alpaca is not None and alpaca.is_file():
        records, source = read_records(alpaca), str(alpaca)
    else:
        records, source = generate_instructions(1000, seed=0), "builtin instructions (shared data not found)"
    data = work / "data"
    texts = [" ".join(str(r.get(k, "")) for k in ("instruction", "input", "output")) for r in records]
    tok = train_hf(texts, VOCAB)
    (data / "tokenizer").mkdir(parents=True, exist_ok=True)
    tok.save(str(data / "tokenizer" / "tokenizer.json"))
    write_hf_configs(data / "tokenizer")
    input_path = work / "records.json"
    input_path.write_text(json.dumps(records))
    with contextlib.redirect_stdout(sys.stderr):  # stdout is for the JSON report alone
        build_sft_bins.main(["--data_dir", str(data), "--input", str(input_path), "--max_seq_len", str(seq_len)])
    cfg = get_preset(PRESET)
    torch.manual_seed(0)
    save_checkpoint(work / "base", build_model(cfg).state_dict(), cfg.model_dump(mode="json"),
                    tokenizer_dir=data / "tokenizer")
    return {"data": source, "records": len(records)}


# ---------------------------------------------------------------------------- child: one mode
def child(mode: str, work: Path, steps: int, seq_len: int, batch_size: int, device: str) -> dict[str, Any]:
    """Build the mode's trainer through the SFT stage, run `steps` optimizer steps, measure."""
    import torch

    from finetune import sft
    from finetune.config import SFTConfig
    from model import count_params
    from model.qlinear import NF4Linear, weight_bytes
    from trainer.launch import launch
    from utils.config import validate

    sections: dict[str, Any] = {
        "data": {"data_dir": str(work / "data"), "seq_len": seq_len},
        "training": {"batch_size": batch_size, "max_steps": steps, "learning_rate": LEARNING_RATE[mode],
                     "warmup_steps": 0, "lr_schedule": "constant", "weight_decay": 0.0, "dtype": "bf16",
                     "activation_checkpointing": True,
                     "device": device, "eval_steps": 1},
        "logging": {"runs_dir": str(work / "runs"), "run_name": mode},
        "checkpointing": {"init_from": str(work / "base")},
    }
    if mode != "full":
        sections["lora"] = LORA
    if mode == "qlora":
        sections["qlora"] = QLORA
    cfg = validate(sections, SFTConfig)
    t0 = time.perf_counter()
    source = sft.prepare(cfg, mode)
    with launch(cfg) as dist:
        trainer = sft.build_trainer(cfg, mode, source, dist)
        model = trainer.base
        build_s = time.perf_counter() - t0
        losses = [round(trainer.train_step()["loss"], 4) for _ in range(steps)]
    peak_mb = ru_maxrss_mb()
    wb = weight_bytes(model)
    n_params = count_params(cfg.model)["total"]
    head = model.lm_head.base_layer if hasattr(model.lm_head, "base_layer") else model.lm_head
    result = {
        "peak_rss_mb": round(peak_mb, 1),
        "weight_bytes": {"base": wb["nf4"] + wb["other"], "adapters": wb["lora"], "total": wb["total"]},
        "fp16_bytes": 2 * n_params,
        "params": n_params,
        "trainable_params": sum(p.numel() for p in trainer.params),
        "losses": losses,
        "build_s": round(build_s, 1),
        "s_per_step": round((time.perf_counter() - t0 - build_s) / steps, 2),
        "threads": torch.get_num_threads(),
    }
    if dist.device.type == "cuda":
        result["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    if isinstance(head, NF4Linear):  # what keeping the head in bf16 (qlora.quantize_head: false) would store
        head_nf4 = sum(b.numel() * b.element_size() for b in head.qweight.buffers())
        bf16_head = 2 * head.in_features * head.out_features
        result["base_bytes_with_bf16_head"] = result["weight_bytes"]["base"] - head_nf4 + bf16_head
    return result


# ---------------------------------------------------------------------------- report
def summarize(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    full, q = results["full"], results["qlora"]
    fp16 = full["fp16_bytes"]
    out = {
        "qlora_base_bytes_over_fp16": round(q["weight_bytes"]["base"] / fp16, 3),
        "qlora_total_bytes_over_fp16": round(q["weight_bytes"]["total"] / fp16, 3),
        "qlora_peak_over_full": round(q["peak_rss_mb"] / full["peak_rss_mb"], 3),
        "lora_peak_over_full": round(results["lora"]["peak_rss_mb"] / full["peak_rss_mb"], 3),
        "loss_fell": {m: r["losses"][-1] < r["losses"][0] for m, r in results.items()},
    }
    if "base_bytes_with_bf16_head" in q:
        out["qlora_base_bytes_over_fp16_with_bf16_head"] = round(q["base_bytes_with_bf16_head"] / fp16, 3)
    out["goals_met"] = {"qlora_weight_bytes<=0.3xfp16": out["qlora_base_bytes_over_fp16"] <= 0.3,
                        "qlora_peak<=0.5xfull": out["qlora_peak_over_full"] <= 0.5}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=6, help="optimizer steps per mode")
    p.add_argument("--seq_len", type=int, default=256, help="tokens per row (samples are packed)")
    p.add_argument("--batch_size", type=int, default=2, help="rows per step")
    p.add_argument("--device", choices=["cpu", "cuda", "auto"], default="cpu",
                   help="where to train (peak_rss_mb is host memory; on CUDA peak_gpu_mb is added)")
    p.add_argument("--workdir", default=None, help="where data, base and runs go (default: a temp dir)")
    p.add_argument("--out", default=None, help="also write the JSON here")
    p.add_argument("--child", choices=MODES, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child is not None:
        print(json.dumps(child(args.child, Path(args.workdir), args.steps, args.seq_len, args.batch_size, args.device)))
        return
    with tempfile.TemporaryDirectory(prefix="sft_memory_") as tmp:
        work = Path(args.workdir or tmp)
        info = prepare(work, args.seq_len)
        results = {}
        for mode in MODES:
            cmd = [sys.executable, __file__, "--child", mode, "--workdir", str(work), "--steps", str(args.steps),
                   "--seq_len", str(args.seq_len), "--batch_size", str(args.batch_size), "--device", args.device]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                raise SystemExit(f"{mode} failed:\n{proc.stderr[-3000:]}")
            results[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
    report = {"model": PRESET, **info, "seq_len": args.seq_len, "batch_size": args.batch_size, "steps": args.steps,
              "device": args.device, "dtype": "bf16 autocast", "activation_checkpointing": True, "lora": LORA,
              "qlora": QLORA, "results": results, "summary": summarize(results)}
    emit_report(report, args.out)


if __name__ == "__main__":
    main()
