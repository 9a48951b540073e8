"""Evaluation speed: our runner vs lm-evaluation-harness's ``hf`` backend on the same weights.

Config A of `benchmarks/model_speed.py` (vocab 4096, dim 256, 4 layers, 8 heads / 4 KV heads,
FFN 688; ``max_seq_len`` 2048 so that 5-shot prompts fit), random weights, a 4096-token BPE
trained on the shared data, saved as our checkpoint and exported to Hugging Face (`utils/convert_hf`).
Side by side, on the same threads:

- MMLU val, 5-shot (1,531 questions, 4 log-likelihood requests each): ours batches requests that
  share their input and runs each batch's shared prefix once; lm-eval's ``HFLM`` sorts by length
  and runs one padded forward per batch (its one-token-continuation cache on);
- GSM8K, 50 questions, 5-shot, greedy up to 256 tokens: ours through the paged engine
  (continuous batching), lm-eval through ``transformers.generate`` in padded batches.

Times cover the model work of a prepared task (lm-eval: ``evaluator.evaluate`` on a built task
dict; ours: `eval.runner.run_task` on a loaded task); examples/s = questions / seconds. The
MMLU accuracies must agree (same weights, same prompts). MMLU is timed in ``--mmlu_chunks``
interleaved chunks of subjects (ours then lm-eval, the order alternating from chunk to chunk),
so that load from other processes that changes during the run hits both alike.

    python benchmarks/eval_speed.py            # full: MMLU val + 50 GSM8K questions (slow on CPU)
    python benchmarks/eval_speed.py --quick    # 4 MMLU subjects x 5 questions, 8 GSM8K x 32 tokens

Prints one JSON object.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import yaml  # noqa: E402

from eval.models import LocalLM  # noqa: E402
from eval.runner import run_task  # noqa: E402
from eval.tasks import TaskSettings  # noqa: E402
from eval.tasks.gsm8k import GSM8KTask  # noqa: E402
from eval.tasks.mmlu import SUBJECTS, MMLUTask  # noqa: E402
from utils.paths import shared_data_dir  # noqa: E402

QUICK_SUBJECTS = ("college_chemistry", "global_facts", "formal_logic", "marketing")


def build_models(tmp: Path, data: Path) -> tuple[Path, Path]:
    """Our checkpoint (config A, max_seq_len 2048, a 4096 BPE) and its Hugging Face export."""
    from data_pipeline.tokenizer.io import write_hf_configs
    from data_pipeline.tokenizer.train_tokenizer import train_hf
    from model import build_model
    from model.config import ModelConfig
    from utils.checkpoint import save_checkpoint
    from utils.convert_hf import checkpoint_to_hf

    texts = (data / "tinystories" / "tinystories_v1_valid_head.txt").read_text(encoding="utf-8").split("\n\n")
    texts += [json.loads(line)["question"] + "\n" + json.loads(line)["answer"]
              for line in (data / "gsm8k" / "train.jsonl").read_text().splitlines()[:3000]]
    for f in sorted((data / "mmlu" / "dev").glob("*.csv")):
        texts.append(f.read_text(encoding="utf-8"))
    tok_dir = tmp / "tokenizer"
    tok_dir.mkdir()
    train_hf(texts, 4096).save(str(tok_dir / "tokenizer.json"))
    write_hf_configs(tok_dir)
    cfg = ModelConfig(family="llama", vocab_size=4096, dim=256, n_layers=4, n_heads=8, n_kv_heads=4,
                      ffn_hidden_dim=688, max_seq_len=2048)
    torch.manual_seed(0)
    ckpt = save_checkpoint(tmp / "ckpt", build_model(cfg).state_dict(), cfg.model_dump(), tokenizer_dir=tok_dir)
    checkpoint_to_hf(ckpt, tmp / "hf")
    return ckpt, tmp / "hf"


def _lm_eval_yaml(path: Path) -> dict:
    class Loader(yaml.SafeLoader):
        pass

    Loader.add_constructor("!function", lambda loader, node: None)
    return yaml.load(path.read_text(), Loader=Loader)


def lm_eval_mmlu_configs(data: Path, tmp: Path, subjects: list[str]) -> list[dict]:
    import lm_eval

    tasks_dir = Path(lm_eval.__file__).parent / "tasks" / "mmlu" / "default"
    template = _lm_eval_yaml(tasks_dir / "_default_template_yaml")
    configs = []
    for subject in subjects:
        files = {}
        for split in ("dev", "val"):
            rows = list(csv.reader(open(data / "mmlu" / split / f"{subject}_{split}.csv", newline="", encoding="utf-8")))
            files[split] = tmp / f"{subject}_{split}.jsonl"
            files[split].write_text("".join(json.dumps({"question": r[0], "choices": r[1:5], "subject": subject,
                                                        "answer": "ABCD".index(r[5])}) + "\n" for r in rows))
        configs.append({**template, "task": f"local_mmlu_{subject}", "dataset_path": "json",
                        "dataset_kwargs": {"data_files": {k: str(v) for k, v in files.items()}},
                        "test_split": "val", "fewshot_split": "dev", "num_fewshot": 5,
                        "description": _lm_eval_yaml(tasks_dir / f"mmlu_{subject}.yaml")["description"]})
    return configs


def lm_eval_gsm8k_config(data: Path, max_gen_toks: int) -> dict:
    import lm_eval

    cfg = _lm_eval_yaml(Path(lm_eval.__file__).parent / "tasks" / "gsm8k" / "gsm8k.yaml")
    cfg["generation_kwargs"] = {**cfg["generation_kwargs"], "max_gen_toks": max_gen_toks}
    return {**cfg, "task": "local_gsm8k", "dataset_path": "json", "dataset_name": None, "test_split": "train",
            "fewshot_split": "train", "dataset_kwargs": {"data_files": {"train": str(data / "gsm8k" / "train.jsonl")}}}


def time_lm_eval(lm, configs: list[dict], limit) -> tuple[float, dict]:
    from lm_eval import evaluator
    from lm_eval.tasks import TaskManager, get_task_dict

    task_dict = get_task_dict(configs, TaskManager())
    for task in task_dict.values():
        task.set_fewshot_seed(1234)
    start = time.perf_counter()
    out = evaluator.evaluate(lm, task_dict, limit=limit, bootstrap_iters=0, log_samples=False, verbosity="ERROR")
    return time.perf_counter() - start, out["results"]


def time_ours(task, model) -> tuple[float, dict]:
    task.load(model)
    start = time.perf_counter()
    result = run_task(task, model)
    return time.perf_counter() - start, result.metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few questions, to check the script")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--mmlu_chunks", type=int, default=8, help="MMLU subjects timed in this many interleaved chunks")
    args = parser.parse_args()
    data = shared_data_dir()
    if data is None:
        sys.exit("shared data not found (set LLM_DATA_DIR or place it at ../shared/data)")
    from lm_eval.models.huggingface import HFLM

    subjects = list(QUICK_SUBJECTS) if args.quick else sorted(SUBJECTS)
    mmlu_limit = 5 if args.quick else None
    gsm_n, gen_toks = (8, 32) if args.quick else (50, 256)
    report: dict = {"config": "A (vocab 4096, dim 256, 4 layers, 8/4 heads, ffn 688), max_seq_len 2048",
                    "device": args.device, "threads": torch.get_num_threads(), "batch_size": args.batch_size,
                    "quick": args.quick}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        ckpt, hf_dir = build_models(tmp, data)
        ours = LocalLM(ckpt, device=args.device, dtype="float32", batch_size=args.batch_size)
        ref = HFLM(pretrained=str(hf_dir), device=args.device, dtype="float32", batch_size=args.batch_size)

        # interleaved: the subjects in chunks, each chunk timed for ours then lm-eval (the order alternating),
        # so that background load changing over the run hits both alike
        t_ours = t_ref = 0.0
        acc_ours, r_ref = {}, {}
        chunks = [subjects[i::args.mmlu_chunks] for i in range(min(args.mmlu_chunks, len(subjects)))]
        for k, chunk in enumerate(chunks):
            mmlu_data = tmp / f"data{k}"
            for split in ("dev", "val"):
                (mmlu_data / "mmlu" / split).mkdir(parents=True)
                for s in chunk:
                    name = f"{s}_{split}.csv"
                    (mmlu_data / "mmlu" / split / name).write_bytes((data / "mmlu" / split / name).read_bytes())
            runs = [lambda: time_ours(MMLUTask(TaskSettings(data_dir=mmlu_data, limit=mmlu_limit)), ours),
                    lambda: time_lm_eval(ref, lm_eval_mmlu_configs(data, tmp, chunk), mmlu_limit)]
            order = [0, 1] if k % 2 == 0 else [1, 0]
            timed = {i: runs[i]() for i in order}
            (dt_ours, m_ours), (dt_ref, r_chunk) = timed[0], timed[1]
            t_ours, t_ref = t_ours + dt_ours, t_ref + dt_ref
            acc_ours.update({key.split("/", 1)[1]: v["value"] for key, v in m_ours.items()
                             if key.startswith("acc_subject/")})
            r_ref.update(r_chunk)
            print(f"mmlu chunk {k + 1}/{len(chunks)}: ours {dt_ours:.1f} s, lm-eval {dt_ref:.1f} s", file=sys.stderr)
        rows = {s: min(mmlu_limit or 10**9, len(list(csv.reader(open(data / "mmlu" / "val" / f"{s}_val.csv",
                                                                      newline="", encoding="utf-8")))))
                for s in subjects}  # questions per subject (a CSV row may span several lines)
        questions = sum(rows.values())
        ref_acc = sum(r_ref[f"local_mmlu_{s}"]["acc,none"] * rows[s] for s in subjects) / questions
        report["mmlu"] = {"subjects": len(acc_ours), "questions": questions, "chunks": len(chunks),
                          "ours_s": round(t_ours, 2),
                          "lm_eval_s": round(t_ref, 2), "ours_examples_per_s": round(questions / t_ours, 2),
                          "lm_eval_examples_per_s": round(questions / t_ref, 2), "speedup": round(t_ref / t_ours, 2),
                          "acc_ours": sum(acc_ours[s] * rows[s] for s in subjects) / questions,
                          "acc_lm_eval": ref_acc}

        gsm = GSM8KTask(TaskSettings(data_dir=data, limit=gsm_n, max_gen_toks=gen_toks))
        t_ours, m_ours = time_ours(gsm, ours)
        t_ref, r_ref = time_lm_eval(ref, [lm_eval_gsm8k_config(data, gen_toks)], gsm_n)
        report["gsm8k"] = {"questions": gsm_n, "max_gen_toks": gen_toks, "ours_s": round(t_ours, 2),
                           "lm_eval_s": round(t_ref, 2), "ours_examples_per_s": round(gsm_n / t_ours, 2),
                           "lm_eval_examples_per_s": round(gsm_n / t_ref, 2), "speedup": round(t_ref / t_ours, 2),
                           "flexible_ours": m_ours["exact_match,flexible-extract"]["value"],
                           "flexible_lm_eval": r_ref["local_gsm8k"]["exact_match,flexible-extract"]}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
