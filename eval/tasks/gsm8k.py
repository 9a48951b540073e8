"""GSM8K (Cobbe et al., 2021) as lm-evaluation-harness's ``gsm8k`` task (version 3).

Prompt: ``--shots`` (default 5) solved problems drawn from the train split, then the question:

    Question: {question}\\nAnswer: {answer with its "#### n" line}\\n\\n   (x shots)
    Question: {question}\\nAnswer:

The shots are drawn as lm-eval's default sampler does: one ``random.Random(1234)`` for the task,
``sample(train, shots)`` per question in order, or, when the questions come from the train split
itself, ``sample(train, shots + 1)`` without the question. ``--chat``: the shots as user/assistant
turns (lm-eval's ``--apply_chat_template --fewshot_as_multiturn``). Greedy generation until
"Question:", "</s>" or "<|im_end|>" (256 new tokens at most, lm-eval's ``max_gen_toks``).

Answers are extracted by lm-eval's two filters and scored by its ``exact_match`` settings
(ignore_case, regexes_to_ignore ``,`` ``$`` ``(?s).*#### `` ``.$`` on both sides; the reference
is the whole answer, cut to its number by the third regex):

- ``strict-match``: the first ``#### (\\-?[0-9\\.\\,]+)``;
- ``flexible-extract``: the last ``(-?[$0-9.,]{2,})|(-?[0-9]+)``.

Data: ``<data_dir>/gsm8k/test.jsonl`` when present, else the train split (what the shared data
holds; the shots then never include the question), else ``openai/gsm8k`` from the hub.
"""
from __future__ import annotations

import random
import re
from pathlib import Path
from typing import Any, Optional

from data_pipeline.download.sources import read_jsonl
from eval.requests import GenerateUntil
from eval.tasks import Task, builtin, hub_rows, mean, mean_stderr, metric
from utils.errors import UserError

UNTIL = ("Question:", "</s>", "<|im_end|>")
MAX_GEN_TOKS = 256
FALLBACK = "[invalid]"
FILTERS = {
    "strict-match": (re.compile(r"#### (\-?[0-9\.\,]+)"), 0),
    "flexible-extract": (re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)"), -1),
}
REGEXES_TO_IGNORE = (",", "\\$", "(?s).*#### ", "\\.$")


def extract(text: str, filter_name: str) -> str:
    """lm-eval's ``RegexFilter`` + ``take_first``: the selected match, stripped, or "[invalid]"."""
    pattern, group_select = FILTERS[filter_name]
    matches = pattern.findall(text)
    if not matches:
        return FALLBACK
    match = matches[group_select]
    if isinstance(match, tuple):
        match = next((m for m in match if m), FALLBACK)
    return match.strip()


def normalize(text: str) -> str:
    """lm-eval's ``exact_match`` preprocessing for gsm8k: the ignored regexes, then lower case."""
    for pattern in REGEXES_TO_IGNORE:
        text = re.sub(pattern, "", text)
    return text.lower()


def exact_match(prediction: str, reference: str) -> bool:
    return normalize(prediction) == normalize(reference)


def question_text(doc: dict[str, Any]) -> str:
    return f"Question: {doc['question']}\nAnswer:"


def build_context(shots: list[dict[str, Any]], doc: dict[str, Any]) -> str:
    return "".join(f"{question_text(s)} {s['answer']}\n\n" for s in shots) + question_text(doc)


def build_messages(shots: list[dict[str, Any]], doc: dict[str, Any]) -> list[dict[str, str]]:
    messages = []
    for s in shots:
        messages += [{"role": "user", "content": question_text(s)}, {"role": "assistant", "content": s["answer"]}]
    return messages + [{"role": "user", "content": question_text(doc)}]


def draw_shots(pool: list[dict[str, Any]], docs: list[dict[str, Any]], shots: int, seed: int,
               same_split: bool) -> list[list[dict[str, Any]]]:
    """lm-eval's default ``ContextSampler`` over the docs in order (one RNG for the task)."""
    rnd = random.Random(seed)
    out = []
    for doc in docs:
        if shots == 0:
            out.append([])
            continue
        if not same_split:
            out.append(rnd.sample(pool, shots))
            continue
        drawn = [x for x in rnd.sample(pool, shots + 1) if x != doc][:shots]
        if len(drawn) < shots:  # duplicates of the question were drawn
            drawn = rnd.sample([x for x in pool if x != doc], shots)
        out.append(drawn)
    return out


def _records(rows: list[dict[str, Any]], where: str) -> list[dict[str, Any]]:
    for i, r in enumerate(rows):
        if not isinstance(r.get("question"), str) or not isinstance(r.get("answer"), str):
            raise UserError(f"{where}: record {i + 1} needs string fields question and answer")
    return [{"question": r["question"], "answer": r["answer"]} for r in rows]


class GSM8KTask(Task):
    name = "gsm8k"
    kind = "generate_until"

    def load(self, model: Any) -> None:
        root = self._data_path("gsm8k") if self.settings.data_dir is not None else Path("gsm8k")
        train_file, test_file = root / "train.jsonl", root / "test.jsonl"
        if train_file.is_file():
            train = _records(read_jsonl(train_file), str(train_file))
            self._record_files([train_file])
            if test_file.is_file():
                test, split = _records(read_jsonl(test_file), str(test_file)), "test"
                self._record_files([test_file])
            else:
                test, split = train, "train"
        else:
            try:
                train = _records(hub_rows("openai/gsm8k", "main", "train", train_file, self.name), "openai/gsm8k")
                test = _records(hub_rows("openai/gsm8k", "main", "test", train_file, self.name), "openai/gsm8k")
                split = "test"
            except UserError as e:  # offline and no data: the built-in problems, if no directory was named
                if not self.settings.builtin_fallback:
                    raise
                builtin.announce(self.name, str(e))
                (train, test), split = builtin.gsm8k_records(), "builtin"
        shots = 5 if self.settings.shots is None else self.settings.shots
        pool_size = len(train) - (1 if split == "train" else 0)
        if shots > pool_size:
            raise UserError(f"--shots {shots} is more than the {pool_size} GSM8K train examples")
        docs = test if self.settings.limit is None else test[: self.settings.limit]
        drawn = draw_shots(train, docs, shots, self.settings.seed, same_split=split == "train")
        self.docs = [{**d, "index": i, "shots": s} for i, (d, s) in enumerate(zip(docs, drawn))]
        self.max_gen_toks = self.settings.max_gen_toks or MAX_GEN_TOKS
        self.info = {"split": split, "shots": shots, "fewshot_seed": self.settings.seed, "chat": self.settings.chat,
                     "until": list(UNTIL), "max_gen_toks": self.max_gen_toks, "greedy": True}

    def requests(self, doc: dict[str, Any]) -> list[GenerateUntil]:
        context = build_messages(doc["shots"], doc) if self.settings.chat else build_context(doc["shots"], doc)
        return [GenerateUntil(context, UNTIL, self.max_gen_toks, temperature=0.0)]

    def score(self, docs: list[dict[str, Any]], answers: list[list[Any]]) -> list[dict[str, Any]]:
        records = []
        for doc, (completions,) in zip(docs, answers):
            output = completions[0]
            extracted = {f: extract(output, f) for f in FILTERS}
            correct = {f: exact_match(extracted[f], doc["answer"]) for f in FILTERS}
            context = self.requests(doc)[0].context
            records.append({
                "index": doc["index"], "prompt": context, "output": output, "extracted": extracted,
                "target": normalize(doc["answer"]), "correct": correct,
            })
        return records

    def aggregate(self, records: list[dict[str, Any]]) -> dict[str, dict[str, Optional[float]]]:
        out = {}
        for f in FILTERS:
            values = [float(r["correct"][f]) for r in records]
            out[f"exact_match,{f}"] = metric(mean(values), mean_stderr(values))
        return out
