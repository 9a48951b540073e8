"""Our evaluation against lm-evaluation-harness itself (a reference nobody here wrote).

A tiny random model of ours is exported to a Hugging Face directory and loaded in lm-eval's
``HFLM``; lm-eval's own task configs (read from the installed package: MMLU's default template
and subject description, GSM8K's yaml) run on the shared data, converted to JSON Lines in a temp
dir. Checked:

- MMLU: per-sample log-likelihoods equal to 1e-4, the same predictions, the same accuracy;
- GSM8K: the same 5-shot prompts (lm-eval's seeded sampler), and lm-eval's own filters and
  exact_match on the same texts give the same extracted answers and scores, sample by sample,
  on 60 questions (texts: each question's reference solution and rewrites of it);
- perplexity: our rolling log-likelihood equals lm-eval's ``loglikelihood_rolling``;
- the rolling windows equal lm-eval's ``get_rolling_token_windows`` + ``make_disjoint_window``.
"""
from __future__ import annotations

import csv
import json
import os
import random
from pathlib import Path

import pytest
import yaml

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
lm_eval = pytest.importorskip("lm_eval")

from eval.models import LocalLM  # noqa: E402
from eval.requests import LoglikelihoodRolling, rolling_windows  # noqa: E402
from eval.runner import run_task  # noqa: E402
from eval.tasks import TaskSettings  # noqa: E402
from eval.tasks.gsm8k import FILTERS, GSM8KTask, exact_match, extract  # noqa: E402
from eval.tasks.mmlu import MMLUTask  # noqa: E402
from serving_fixtures import make_checkpoint  # noqa: E402

MMLU_SUBJECTS = ("college_chemistry", "high_school_computer_science", "global_facts", "formal_logic")
LM_EVAL_TASKS = Path(lm_eval.__file__).parent / "tasks"


def _yaml(path: Path) -> dict:
    class Loader(yaml.SafeLoader):
        pass

    Loader.add_constructor("!function", lambda loader, node: None)  # we never need the functions
    return yaml.load(path.read_text(), Loader=Loader)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from lm_eval.models.huggingface import HFLM

    from utils.convert_hf import checkpoint_to_hf

    root = tmp_path_factory.mktemp("parity")
    ckpt = make_checkpoint(root / "ckpt", max_seq_len=2048, seed=3)
    checkpoint_to_hf(ckpt, root / "hf")
    ours = LocalLM(ckpt, device="cpu", dtype="float32", batch_size=8)
    ref = HFLM(pretrained=str(root / "hf"), device="cpu", dtype="float32", batch_size=8)
    return ours, ref


def _evaluate(ref, task_configs: list[dict], **kwargs) -> dict:
    return lm_eval.simple_evaluate(model=ref, tasks=task_configs, log_samples=True, bootstrap_iters=0,
                                   verbosity="ERROR", **kwargs)


# ---------------------------------------------------------------------------- MMLU
def _all_subjects(shared_data: Path) -> tuple[str, ...]:
    return tuple(sorted(p.name[:-len("_val.csv")] for p in (shared_data / "mmlu" / "val").glob("*_val.csv")))


@pytest.mark.parametrize("split", ["four_subjects", pytest.param("whole_val", marks=[pytest.mark.slow, pytest.mark.long])])
def test_mmlu_loglikelihoods_and_accuracy_equal_lm_eval(models, shared_data, tmp_path, split):
    ours, ref = models
    subjects = MMLU_SUBJECTS if split == "four_subjects" else _all_subjects(shared_data)
    template = _yaml(LM_EVAL_TASKS / "mmlu" / "default" / "_default_template_yaml")
    configs, local = [], tmp_path / "data" / "mmlu"
    for part in ("dev", "val"):
        (local / part).mkdir(parents=True)
    for subject in subjects:
        files = {}
        for part in ("dev", "val"):
            src = shared_data / "mmlu" / part / f"{subject}_{part}.csv"
            (local / part / src.name).write_bytes(src.read_bytes())
            rows = list(csv.reader(open(src, newline="", encoding="utf-8")))
            files[part] = tmp_path / f"{subject}_{part}.jsonl"
            files[part].write_text("".join(json.dumps({"question": r[0], "subject": subject, "choices": r[1:5],
                                                       "answer": "ABCD".index(r[5])}) + "\n" for r in rows))
        subject_yaml = _yaml(LM_EVAL_TASKS / "mmlu" / "default" / f"mmlu_{subject}.yaml")
        configs.append({**template, "task": f"local_mmlu_{subject}", "dataset_path": "json",
                        "dataset_kwargs": {"data_files": {k: str(v) for k, v in files.items()}},
                        "test_split": "val", "fewshot_split": "dev", "num_fewshot": 5,
                        "description": subject_yaml["description"]})
    out = _evaluate(ref, configs)

    task = MMLUTask(TaskSettings(data_dir=tmp_path / "data"))
    task.load(ours)
    result = run_task(task, ours)
    by_key = {(r["subject"], r["index"]): r for r in result.records}
    n, worst = 0, 0.0
    for subject in subjects:
        samples = out["samples"][f"local_mmlu_{subject}"]
        for s in samples:
            mine = by_key[(subject, s["doc_id"])]
            theirs = [float(r[0][0]) for r in s["resps"]]
            worst = max(worst, max(abs(a - b) for a, b in zip(mine["loglikelihoods"], theirs)))
            assert mine["acc"] == s["acc"], (subject, s["doc_id"], mine["loglikelihoods"], theirs)
            n += 1
        assert result.metrics[f"acc_subject/{subject}"]["value"] == pytest.approx(
            out["results"][f"local_mmlu_{subject}"]["acc,none"], abs=1e-12)
    assert n == len(result.records) == sum(1 for _ in by_key)
    assert worst <= 1e-4, worst
    if split == "whole_val":
        assert len(subjects) == 57 and n > 1500
        assert result.metrics["acc"]["value"] == pytest.approx(
            sum(out["results"][f"local_mmlu_{s}"]["acc,none"] * len(out["samples"][f"local_mmlu_{s}"])
                for s in subjects) / n, abs=1e-12)
    print(f"MMLU parity ({len(subjects)} subjects): {n} questions, max |ll ours - lm-eval| = {worst:.2e}, "
          f"acc ours {result.metrics['acc']['value']:.4f}")


# ---------------------------------------------------------------------------- GSM8K
def _gsm8k_config(train: Path) -> dict:
    cfg = _yaml(LM_EVAL_TASKS / "gsm8k" / "gsm8k.yaml")
    return {**cfg, "task": "local_gsm8k", "dataset_path": "json", "dataset_name": None,
            "dataset_kwargs": {"data_files": {"train": str(train)}}, "test_split": "train", "fewshot_split": "train"}


def _rewrites(answer: str, rng: random.Random) -> list[str]:
    """Texts a model might write: the solution, its number in other dress, wrong and missing answers."""
    body, number = answer.rsplit("#### ", 1)
    wrong = str(int(float(number.replace(",", ""))) + rng.randint(1, 9))
    return [answer, f"{body}The answer is ${number}.", f"#### {wrong}\n\nQuestion: next", f"{body}so {number}.",
            "I do not know.", f"#### ${number}", f"{number},000 or {number}", f"-{number} apples.\n#### -{number}"]


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_gsm8k_prompts_filters_and_scores_equal_lm_eval(models, shared_data, tmp_path):
    from lm_eval.api.metrics import exact_match_hf_evaluate
    from lm_eval.filters import build_filter_ensemble
    from lm_eval.tasks import TaskManager, get_task_dict

    ours, _ = models
    train = shared_data / "gsm8k" / "train.jsonl"
    n_questions = 60
    ref_task = get_task_dict([_gsm8k_config(train)], TaskManager())["local_gsm8k"]
    ref_task.set_fewshot_seed(1234)
    ref_task.build_all_requests(limit=n_questions, rank=0, world_size=1)
    ref_contexts = {inst.doc_id: inst.args[0] for inst in ref_task.instances}

    task = GSM8KTask(TaskSettings(data_dir=shared_data, limit=n_questions))
    task.load(ours)
    assert [task.requests(d)[0].context for d in task.docs] == [ref_contexts[i] for i in range(n_questions)]

    yaml_cfg = _yaml(LM_EVAL_TASKS / "gsm8k" / "gsm8k.yaml")
    ensembles = {f["name"]: build_filter_ensemble(f["name"], [(s["function"], {k: v for k, v in s.items()
                                                                               if k != "function"})
                                                              for s in f["filter"]])
                 for f in yaml_cfg["filter_list"]}
    em_kwargs = {k: v for k, v in yaml_cfg["metric_list"][0].items() if k not in ("metric", "aggregation",
                                                                                   "higher_is_better")}
    rng = random.Random(0)
    compared = 0
    for doc in task.docs:
        texts = _rewrites(doc["answer"], rng)
        for name in FILTERS:
            filtered = [[t] for t in texts]  # lm-eval's whole pipeline: regex, then take_first
            for step in ensembles[name].filters:
                filtered = list(step().apply(filtered, [doc] * len(texts)))
            ours_extracted = [extract(t, name) for t in texts]
            assert ours_extracted == filtered, (name, texts)
            for pred in ours_extracted:
                theirs = exact_match_hf_evaluate([pred], [doc["answer"]], **em_kwargs)["exact_match"]
                assert exact_match(pred, doc["answer"]) == bool(theirs), (pred, doc["answer"])
                compared += 1
    assert compared >= 50 * 2 * 8
    print(f"GSM8K parity: {n_questions} prompts equal, {compared} filter + exact-match comparisons equal")


@pytest.mark.slow
def test_gsm8k_end_to_end_equals_lm_eval_generation(models, shared_data):
    """lm-eval generates with HFLM and filters; we generate with the paged engine and filter."""
    ours, ref = models
    n_questions = 50
    train = shared_data / "gsm8k" / "train.jsonl"
    out = _evaluate(ref, [{**_gsm8k_config(train), "generation_kwargs": {
        "until": ["Question:", "</s>", "<|im_end|>"], "do_sample": False, "temperature": 0.0, "max_gen_toks": 24}}],
        limit=n_questions)
    task = GSM8KTask(TaskSettings(data_dir=shared_data, limit=n_questions, max_gen_toks=24))
    task.load(ours)
    result = run_task(task, ours)
    samples = out["samples"]["local_gsm8k"]
    assert len(samples) == n_questions * len(FILTERS)  # one sample per question and filter
    same_text = 0
    for s in samples:
        mine, doc = result.records[s["doc_id"]], task.docs[s["doc_id"]]
        name, text, extracted = s["filter"], s["resps"][0][0], s["filtered_resps"][0]
        assert mine["prompt"] == s["arguments"][0][0]
        assert extract(text, name) == extracted  # our filter on lm-eval's text
        assert exact_match(extracted, doc["answer"]) == bool(s["exact_match"])
        if mine["output"] == text:  # same generation: same record
            same_text += 1
            assert mine["extracted"][name] == extracted and mine["correct"][name] == bool(s["exact_match"])
    print(f"GSM8K end to end: {same_text // len(FILTERS)}/{n_questions} greedy generations equal to lm-eval's")
    assert same_text >= 0.9 * len(samples), f"{same_text}/{len(samples)} generations equal"


# ---------------------------------------------------------------------------- perplexity
def test_rolling_windows_equal_lm_eval():
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    rng = random.Random(0)
    for n in (0, 1, 5, 16, 17, 40, 100):
        tokens = [rng.randrange(1000) for _ in range(n)]
        for max_len in (1, 4, 16):
            for stride in range(1, max_len + 1):
                theirs = [make_disjoint_window(w) for w in
                          get_rolling_token_windows(tokens, 999, max_len, context_len=max_len - stride + 1)]
                assert list(rolling_windows(tokens, 999, max_len, stride)) == theirs


def test_perplexity_equals_lm_eval_rolling_loglikelihood(models, shared_data):
    from lm_eval.api.instance import Instance

    ours, ref = models
    text = (shared_data / "tinystories" / "cs336_tinystories_sample.txt").read_text(encoding="utf-8")
    docs = [d.strip() for d in text.split("<|endoftext|>") if d.strip()][:3]
    docs.append(docs[0] * 12)  # longer than the 2048-token window: several windows
    ref._max_length = 512  # both sides roll in 512-token windows
    ours.max_length = 512
    try:
        theirs = ref.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (d,), i) for i, d in enumerate(docs)])
        mine = ours.loglikelihood_rolling([LoglikelihoodRolling(text=d) for d in docs])
    finally:
        ours.max_length = 2048
        ref._max_length = None
    for (ll, n_tokens), ref_ll, d in zip(mine, theirs, docs):
        assert n_tokens == len(ours.tok_encode(d))
        assert ll == pytest.approx(ref_ll, abs=1e-4 * max(1, n_tokens / 100)), (ll, ref_ll)
    assert len(ours.tok_encode(docs[-1])) > 2 * 512
    print("perplexity parity:", [round(ll, 4) for ll, _ in mine], "vs lm-eval", [round(x, 4) for x in theirs])
