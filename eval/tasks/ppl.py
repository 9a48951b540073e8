"""Perplexity: rolling log-likelihood of a token bin or a text file (lm-eval's ``loglikelihood_rolling``).

Each document is one `LoglikelihoodRolling` request, scored in windows of the model's length
(`eval.requests.rolling_windows`; ``ppl_stride`` < the length gives each window extra context,
the default is lm-eval's disjoint windows). Documents:

- a token bin (``*.bin``, data_pipeline's pretrain ``val.bin``): its items (EOS-separated
  documents), checked against the model's tokenizer; token perplexity only;
- a text file: split at ``<|endoftext|>`` lines when it has them, else at blank lines; token,
  word and byte perplexity and bits per byte (lm-eval's ``wikitext`` metrics: words are
  ``re.split(r"\\s+", doc)``, bytes the UTF-8 length).

Default data: ``<data_dir>/pretrain/val.bin``, else the repo's ``data/pretrain/val.bin``, else the
TinyStories validation text of the shared data (``tinystories/tinystories_v1_valid_head.txt``).
``--limit N`` takes the first N documents.

Metrics are ratios of sums over documents (exp(-sum log-lik / sum units)); their standard errors
come from the ratio estimator's variance over documents, through the delta method (lm-eval
bootstraps them instead).
"""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Optional

import numpy as np

from eval.requests import LoglikelihoodRolling
from eval.tasks import Task, metric
from utils.errors import UserError
from utils.paths import DEFAULT_DATA_DIR

DOC_SEPARATOR = "<|endoftext|>"
TEXT_DEFAULT = ("tinystories", "tinystories_v1_valid_head.txt")


def split_documents(text: str) -> list[str]:
    """Documents of a text file: the pieces between ``<|endoftext|>`` markers, else its blank-line
    separated blocks."""
    pieces = text.split(DOC_SEPARATOR) if DOC_SEPARATOR in text else re.split(r"\n[ \t]*\n", text)
    return [d.strip("\n") for d in pieces if d.strip()]


def eos_documents(tokens: np.ndarray, eos_id: int) -> list[tuple[int, ...]]:
    """The documents of a flat token stream (a pretrain bin, which keeps no item offsets): the
    non-empty runs between EOS tokens, without the EOS."""
    ends = np.flatnonzero(np.asarray(tokens) == eos_id)
    starts = np.concatenate([[0], ends + 1])
    stops = np.concatenate([ends, [len(tokens)]])
    return [tuple(int(t) for t in tokens[a:b]) for a, b in zip(starts, stops) if b > a]


def ratio_and_stderr(num: list[float], den: list[float]) -> tuple[float, float]:
    """sum(num) / sum(den) and its standard error over documents (ratio estimator)."""
    r = math.fsum(num) / math.fsum(den)
    n = len(num)
    if n < 2:
        return r, float("nan")
    mean_den = math.fsum(den) / n
    var = math.fsum((a - r * b) ** 2 for a, b in zip(num, den)) / (n - 1)
    return r, math.sqrt(var / n) / mean_den


class PerplexityTask(Task):
    name = "ppl"
    kind = "loglikelihood_rolling"

    def _source(self) -> Path:
        s = self.settings
        if s.ppl_data is not None:
            if not s.ppl_data.is_file():
                raise UserError(f"ppl: data file not found: {s.ppl_data}")
            return s.ppl_data
        candidates = []
        if s.data_dir is not None:
            candidates.append(s.data_dir / "pretrain" / "val.bin")
        candidates.append(DEFAULT_DATA_DIR / "pretrain" / "val.bin")
        if s.data_dir is not None:
            candidates.append(s.data_dir.joinpath(*TEXT_DEFAULT))
        for c in candidates:
            if c.is_file():
                return c
        raise UserError(f"ppl: no validation data (looked for {', '.join(map(str, candidates))}); "
                        "pass a token bin or text file in the config's eval.ppl_data")

    def load(self, model: Any) -> None:
        path = self._source()
        limit = self.settings.limit
        if path.suffix == ".bin":
            from data_pipeline.formats import TokenBin, bin_base
            from data_pipeline.tokenizer.io import tokenizer_hash

            tok_file = getattr(getattr(model, "loaded", None), "tokenizer_file", None)
            vocab = getattr(getattr(model, "loaded", None), "config", None)
            tb = TokenBin(bin_base(path), "pretrain", vocab_size=vocab.vocab_size if vocab else None,
                          tokenizer_hash=tokenizer_hash(tok_file) if tok_file else None)
            if tb.offsets is None:  # a pretrain bin: one EOS-separated stream
                docs = eos_documents(tb.tokens, tb.sidecar.eos_id)[:limit]
            else:
                n = len(tb) if limit is None else min(limit, len(tb))
                docs = [tuple(int(t) for t in tb.item(i)) for i in range(n)]
            self.docs = [{"index": i, "token_ids": d} for i, d in enumerate(docs)]
            n = len(docs)
            self._record_files([path])
            self.info = {"data": str(path), "format": "token-bin", "documents": n}
        else:
            try:
                text = path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as e:
                raise UserError(f"ppl: cannot read {path} as UTF-8 text ({e})") from None
            docs = split_documents(text)
            docs = docs if limit is None else docs[:limit]
            self.docs = [{"index": i, "text": d} for i, d in enumerate(docs)]
            self._record_files([path])
            self.info = {"data": str(path), "format": "text", "documents": len(docs)}
        if not self.docs:
            raise UserError(f"ppl: {path} holds no document")
        self.info["stride"] = self.settings.ppl_stride  # None: the model's length (lm-eval's windows)

    def requests(self, doc: dict[str, Any]) -> list[LoglikelihoodRolling]:
        if "token_ids" in doc:
            return [LoglikelihoodRolling(token_ids=doc["token_ids"])]
        return [LoglikelihoodRolling(text=doc["text"])]

    def score(self, docs: list[dict[str, Any]], answers: list[list[Any]]) -> list[dict[str, Any]]:
        records = []
        for doc, ((ll, n_tokens),) in zip(docs, answers):
            rec: dict[str, Any] = {"index": doc["index"], "loglikelihood": ll, "tokens": n_tokens}
            if "text" in doc:
                rec["words"] = len(re.split(r"\s+", doc["text"]))
                rec["bytes"] = len(doc["text"].encode("utf-8"))
                rec["prompt"] = doc["text"][:200]
            records.append(rec)
        return records

    def aggregate(self, records: list[dict[str, Any]]) -> dict[str, dict[str, Optional[float]]]:
        nll = [-r["loglikelihood"] for r in records]
        out = {}
        per_token, se = ratio_and_stderr(nll, [r["tokens"] for r in records])
        out["token_perplexity"] = metric(math.exp(per_token), math.exp(per_token) * se)
        out["nll_per_token"] = metric(per_token, se)
        if records and "words" in records[0]:
            per_word, se_w = ratio_and_stderr(nll, [r["words"] for r in records])
            per_byte, se_b = ratio_and_stderr(nll, [r["bytes"] for r in records])
            out["word_perplexity"] = metric(math.exp(per_word), math.exp(per_word) * se_w)
            out["byte_perplexity"] = metric(math.exp(per_byte), math.exp(per_byte) * se_b)
            out["bits_per_byte"] = metric(per_byte / math.log(2), se_b / math.log(2))
        return out
