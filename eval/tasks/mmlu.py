"""MMLU (Hendrycks et al., 2021) as lm-evaluation-harness's ``mmlu`` task (its ``default`` variant).

Per subject, the prompt is the description, ``--shots`` (default 5) solved examples from the
subject's dev split (the first ones: lm-eval's ``first_n`` sampler) and the question:

    The following are multiple choice questions (with answers) about {subject}.\\n\\n
    {question.strip()}\\nA. {A}\\nB. {B}\\nC. {C}\\nD. {D}\\nAnswer: {letter}\\n\\n   (x shots)
    {question.strip()}\\nA. ..\\nD. ..\\nAnswer:

scored by the log-likelihood of the continuations " A" .. " D" (with ``--chat``: the description
as a system message, the shots as user/assistant turns, continuations "A" .. "D", as lm-eval's
``--apply_chat_template --fewshot_as_multiturn``). The prediction is the most likely letter.

Data: ``<data_dir>/mmlu/{dev,val,test}/<subject>_<split>.csv`` (no header: question, A, B, C, D,
answer letter); the test split when present, else val (the shared data has dev and val), else
``cais/mmlu`` from the hub. ``--limit N`` takes the first N questions of each subject (lm-eval
applies limits per subtask). Metrics: accuracy per subject, per category (lm-eval's four groups)
and overall, the micro average (every question counts once; lm-eval's ``mmlu`` number, stderr
pooled as lm-eval's) and the macro average (every subject counts once).
"""
from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any, Optional

from eval.requests import Loglikelihood
from eval.tasks import Task, builtin, hub_rows, mean, mean_stderr, metric, pooled_stderr
from utils.errors import UserError

LETTERS = ("A", "B", "C", "D")
CATEGORIES = ("stem", "humanities", "social_sciences", "other")
_BY_CATEGORY = {
    "stem": "abstract_algebra anatomy astronomy college_biology college_chemistry college_computer_science "
            "college_mathematics college_physics computer_security conceptual_physics electrical_engineering "
            "elementary_mathematics high_school_biology high_school_chemistry high_school_computer_science "
            "high_school_mathematics high_school_physics high_school_statistics machine_learning",
    "humanities": "formal_logic high_school_european_history high_school_us_history high_school_world_history "
                  "international_law jurisprudence logical_fallacies moral_disputes moral_scenarios philosophy "
                  "prehistory professional_law world_religions",
    "social_sciences": "econometrics high_school_geography high_school_government_and_politics "
                       "high_school_macroeconomics high_school_microeconomics high_school_psychology "
                       "human_sexuality professional_psychology public_relations security_studies sociology "
                       "us_foreign_policy",
    "other": "business_ethics clinical_knowledge college_medicine global_facts human_aging management marketing "
             "medical_genetics miscellaneous nutrition professional_accounting professional_medicine virology",
}
SUBJECTS: dict[str, str] = {s: cat for cat, names in _BY_CATEGORY.items() for s in names.split()}  # lm-eval's map


def description(subject: str) -> str:
    return f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"


def question_text(doc: dict[str, Any]) -> str:
    """lm-eval's ``doc_to_text``."""
    a, b, c, d = doc["choices"]
    return f"{doc['question'].strip()}\nA. {a}\nB. {b}\nC. {c}\nD. {d}\nAnswer:"


def build_context(shots: list[dict[str, Any]], doc: dict[str, Any]) -> str:
    """The plain-text prompt: description, solved shots, the question (ends with "Answer:")."""
    parts = [description(doc["subject"])]
    parts += [f"{question_text(s)} {LETTERS[s['answer']]}\n\n" for s in shots]
    return "".join(parts) + question_text(doc)


def build_messages(shots: list[dict[str, Any]], doc: dict[str, Any]) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": description(doc["subject"])}]
    for s in shots:
        messages += [{"role": "user", "content": question_text(s)},
                     {"role": "assistant", "content": LETTERS[s["answer"]]}]
    return messages + [{"role": "user", "content": question_text(doc)}]


def read_csv(path: Path, subject: str) -> list[dict[str, Any]]:
    docs = []
    try:
        with open(path, newline="", encoding="utf-8") as f:
            for line_no, row in enumerate(csv.reader(f), 1):
                if len(row) != 6 or row[5].strip() not in LETTERS:
                    raise UserError(f"{path}:{line_no}: expected question,A,B,C,D,answer-letter")
                docs.append({"subject": subject, "question": row[0], "choices": row[1:5],
                             "answer": LETTERS.index(row[5].strip())})
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise UserError(f"cannot read {path}: {e}") from None
    return docs


class MMLUTask(Task):
    name = "mmlu"
    kind = "loglikelihood"

    def _local(self, root: Path, split: str) -> dict[str, list[dict[str, Any]]]:
        by_subject = {}
        for subject in SUBJECTS:
            path = root / split / f"{subject}_{split}.csv"
            if path.is_file():
                by_subject[subject] = read_csv(path, subject)
                self._record_files([path])
        return by_subject

    def _hub(self, root: Path, split: str) -> dict[str, list[dict[str, Any]]]:
        rows = hub_rows("cais/mmlu", "all", split, root, self.name)
        by_subject: dict[str, list[dict[str, Any]]] = {}
        for r in rows:
            by_subject.setdefault(r["subject"], []).append(
                {"subject": r["subject"], "question": r["question"], "choices": list(r["choices"]),
                 "answer": int(r["answer"])})
        return by_subject

    def load(self, model: Any) -> None:
        root = self._data_path("mmlu") if self.settings.data_dir is not None else Path("mmlu")
        split = next((s for s in ("test", "val") if (root / s).is_dir()), None)
        if split is None:
            split = "test"
            try:
                evals, dev = self._hub(root, "test"), self._hub(root, "dev")
            except UserError as e:  # offline and no data: the built-in problems, if no directory was named
                if not self.settings.builtin_fallback:
                    raise
                builtin.announce(self.name, str(e))
                (evals, dev), split = builtin.mmlu_subjects(), "builtin"
        else:
            evals, dev = self._local(root, split), self._local(root, "dev")
        if not evals:
            raise UserError(f"mmlu: no <subject>_{split}.csv files in {root / split}")
        shots = 5 if self.settings.shots is None else self.settings.shots
        limit = self.settings.limit
        self.chat = self.settings.chat
        self.docs = []
        for subject in sorted(evals):
            pool = dev.get(subject, [])
            if shots > len(pool):
                raise UserError(f"--shots {shots} is more than the {len(pool)} MMLU dev examples of {subject}")
            questions = evals[subject] if limit is None else evals[subject][:limit]
            for i, doc in enumerate(questions):
                self.docs.append({**doc, "index": i, "shots": pool[:shots]})
        self.info = {"split": split, "shots": shots, "subjects": len(evals), "chat": self.chat,
                     "limit_per_subject": limit}
        self._chat_text = getattr(model, "chat_text", None)
        if self.chat and self._chat_text is None:
            raise UserError("mmlu --chat needs a local model (--checkpoint)")

    def requests(self, doc: dict[str, Any]) -> list[Loglikelihood]:
        if self.chat:
            context = self._chat_text(build_messages(doc["shots"], doc))
            return [Loglikelihood(context, letter) for letter in LETTERS]
        context = build_context(doc["shots"], doc)
        return [Loglikelihood(context, f" {letter}") for letter in LETTERS]

    def score(self, docs: list[dict[str, Any]], answers: list[list[Any]]) -> list[dict[str, Any]]:
        records = []
        for doc, lls in zip(docs, answers):
            values = [ll for ll, _ in lls]
            pred = max(range(len(values)), key=lambda i: (values[i], -i))  # first of ties, as np.argmax
            records.append({
                "subject": doc["subject"], "index": doc["index"],
                "prompt": self.requests(doc)[0].context, "loglikelihoods": values,
                "output": LETTERS[pred], "extracted": LETTERS[pred], "target": LETTERS[doc["answer"]],
                "correct": pred == doc["answer"], "acc": float(pred == doc["answer"]),
            })
        return records

    def aggregate(self, records: list[dict[str, Any]]) -> dict[str, dict[str, Optional[float]]]:
        by_subject: dict[str, list[float]] = {}
        for r in records:
            by_subject.setdefault(r["subject"], []).append(r["acc"])
        out: dict[str, dict[str, Optional[float]]] = {}
        stats = {s: (mean(v), mean_stderr(v), len(v)) for s, v in sorted(by_subject.items())}

        def group(subjects: list[str]) -> tuple[float, float]:
            sizes = [stats[s][2] for s in subjects]
            micro = sum(stats[s][0] * stats[s][2] for s in subjects) / sum(sizes)
            return micro, pooled_stderr([stats[s][1] for s in subjects], sizes)

        micro, se = group(list(stats))
        out["acc"] = metric(micro, se)
        macro = [stats[s][0] for s in stats]  # stderr: lm-eval's unweighted_mean_stderr
        ses = [0.0 if math.isnan(stats[s][1]) else stats[s][1] for s in stats]
        out["acc_macro"] = metric(mean(macro), math.sqrt(math.fsum(x * x for x in ses)) / len(ses))
        for cat in CATEGORIES:
            members = [s for s in stats if SUBJECTS.get(s) == cat]
            if members:
                out[f"acc_{cat}"] = metric(*group(members))
        for s, (value, stderr, _) in stats.items():
            out[f"acc_subject/{s}"] = metric(value, stderr)
        return out
