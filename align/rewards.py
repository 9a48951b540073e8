"""Composable reward functions for online RL (GRPO, PPO): the scalar each completion is trained on.

The config list ``rl.rewards`` holds one `RewardSpec` per reward; `RewardFunctions` sums them,
each times its ``weight``, and also returns every reward unweighted (for the metrics):

    rewards:
      - {type: verifiable}                          # 1 if the final answer equals the record's "answer"
      - {type: format, weight: 0.1}                 # 1 if the answer line is there
      - {type: reward_model, checkpoint: runs/rm/final, weight: 0.5}
      - {type: python, function: my_rewards:brevity, weight: -0.01, name: length}

Types:
    verifiable    `verifiable_reward`: 1.0 when `is_correct(completion, record["answer"])`, else 0.0.
                  A numeric reference (GSM8K, the built-in arithmetic) is compared with the number
                  after the last ``####`` / ``The answer is`` (else the last number of the text),
                  numerically (``1,234`` = ``1234``, ``5.0`` = ``5``, ``$12`` = ``12``); a word
                  reference (the built-in story questions: a name or a colour) with the first word
                  after the last ``The answer is`` (else the completion's last word), ignoring case
                  and punctuation. The rule-based outcome reward of DeepSeek-R1 / Tülu 3's RLVR.
    format        `format_reward`: 1.0 when the completion contains ``pattern`` (a regex, `re.search`),
                  by default the answer line (``The answer is <something>`` or ``#### <number>``).
    reward_model  `align.score.score_batch` of a reward model (our checkpoint or a Hugging Face
                  ``*ForSequenceClassification`` directory), loaded once in eval mode without grad on
                  the training device. It must use the policy's tokenizer (the same ``tokenizer.json``
                  vocabulary, merges and special tokens): one trained with another is refused.
    python        a function of yours, ``function: "package.module:function"`` (importable: on
                  ``PYTHONPATH`` or installed). It is called with keyword arguments only:

                      fn(prompts=[str, ...], completions=[str, ...], records=[dict, ...]) -> [float, ...]

                  ``prompts`` are the prompts (strings; a record whose "prompt" is a list of chat
                  messages gives that list), ``completions`` the generated texts (one per
                  prompt: a prompt sampled G times for GRPO appears G times), ``records`` the prompt
                  records of `data_pipeline/download/download_prompts.py` (``{"prompt", "answer",
                  "task", "source"}``, shallow copies). It returns one finite
                  number per completion. This is TRL's reward-function convention
                  (``reward_func(prompts, completions, **kwargs)``, where TRL passes the dataset
                  columns as keyword lists) with the columns together as ``records``; define yours as
                  ``def fn(prompts, completions, records, **kwargs)`` to stay compatible.

A reward that raises, returns None, the wrong number of values, a non-number, NaN or inf is a
`UserError` naming it (``reward python:my_mod:my_fn returned NaN for completion 3``), never a
silent 0: a broken reward would otherwise train the policy on noise.
"""
from __future__ import annotations

import importlib
import json
import math
import numbers
import re
import string
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, Callable, Literal, Optional, Sequence

import torch
from pydantic import Field, PositiveInt, model_validator

from utils.config import Section
from utils.errors import UserError
from utils.paths import resolve_path

RewardFn = Callable[..., Sequence[Any]]  # called as fn(prompts=..., completions=..., records=...)

# ---------------------------------------------------------------- answer extraction
_MARKER = re.compile(r"####|\banswer\s+is\b", re.IGNORECASE)  # "#### 72" (GSM8K), "The answer is 72."
_WORD_MARKER = re.compile(r"\banswer\s+is\b", re.IGNORECASE)
# a number: optional sign (not a minus between two operands, as in "10-3") and $, digits with or
# without thousands commas, optional decimals
_NUMBER = re.compile(r"(?:(?<![\w)\]])[-−+])?\$?(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?")
_PLAIN_NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d*)?|[-+]?\.\d+")
_PUNCT = string.punctuation + "“”‘’«»…–—"

DEFAULT_FORMAT_PATTERN = r"(?i)\bthe answer is:?\s*[^\s.]|####\s*[-$]?\d"
"""The default `format` reward pattern: an answer line, ``The answer is <something>`` or ``#### <number>``."""


def normalize_number(s: str) -> Optional[str]:
    """The canonical text of a number: ``"1,234"`` → ``"1234"``, ``"5.0"`` → ``"5"``, ``"$12"`` →
    ``"12"``, ``"-3"`` → ``"-3"``, ``"2.50"`` → ``"2.5"``; None if `s` is not a number."""
    t = s.strip().replace("−", "-")
    sign = ""
    if t and t[0] in "+-":
        sign, t = ("-" if t[0] == "-" else ""), t[1:]
    t = t.removeprefix("$").strip()
    if not _PLAIN_NUMBER.fullmatch(t):
        return None
    try:
        d = Decimal(sign + t.replace(",", ""))
    except InvalidOperation:
        return None
    if d == d.to_integral_value():
        return str(int(d))
    return format(d.normalize(), "f")


def extract_answer(text: str) -> Optional[str]:
    """The numeric answer of a completion, normalized (`normalize_number`): the first number after
    the last ``####`` or ``The answer is``, else the last number in the text; None if no number."""
    markers = list(_MARKER.finditer(text))
    if markers:
        after = _NUMBER.search(text, markers[-1].end())
        if after is not None:
            return normalize_number(after.group())
    numbers_ = _NUMBER.findall(text)
    return normalize_number(numbers_[-1]) if numbers_ else None


def _words(text: str) -> list[str]:
    """The words of `text`, punctuation (quotes, markdown ``**``) stripped, empty ones dropped."""
    return [w for w in (t.strip(_PUNCT) for t in text.split()) if w]


def extract_word_answer(text: str) -> Optional[str]:
    """The first word after the last ``The answer is`` (punctuation stripped), else None."""
    markers = list(_WORD_MARKER.finditer(text))
    if not markers:
        return None
    words = _words(text[markers[-1].end():])
    return words[0] if words else None


def is_correct(completion: str, answer: str) -> bool:
    """Whether `completion` reaches the reference `answer`: numerically for a numeric reference
    (`extract_answer`); for a word reference (a name, a colour) the word(s) after the last ``The
    answer is`` — or, with no such line, the completion's last word(s) — equal it ignoring case."""
    reference = normalize_number(str(answer))
    if reference is not None:
        got = extract_answer(completion)
        return got is not None and Decimal(got) == Decimal(reference)
    ref_words = [w.casefold() for w in _words(str(answer))]
    if not ref_words:
        return False
    markers = list(_WORD_MARKER.finditer(completion))
    if markers:
        got = _words(completion[markers[-1].end():])[:len(ref_words)]
    else:
        got = _words(completion)[-len(ref_words):]
    return [w.casefold() for w in got] == ref_words


# ---------------------------------------------------------------- built-in rewards
def verifiable_reward(prompts: Sequence[str], completions: Sequence[str], records: Sequence[dict]) -> list[float]:
    """1.0 for each completion that `is_correct` against ``records[i]["answer"]``, else 0.0."""
    out = []
    for i, (completion, record) in enumerate(zip(completions, records)):
        answer = record.get("answer") if isinstance(record, dict) else None
        if answer is None or not str(answer).strip():
            raise UserError(f"reward verifiable: prompt record {i} has no \"answer\" to check against "
                            "(use prompts with answers, e.g. data_pipeline/download/download_prompts.py)")
        out.append(1.0 if is_correct(completion, str(answer)) else 0.0)
    return out


def format_reward(prompts: Sequence[str], completions: Sequence[str], records: Sequence[dict],
                  pattern: Optional[str] = None) -> list[float]:
    """1.0 for each completion in which the regex `pattern` is found (`re.search`), else 0.0;
    by default `DEFAULT_FORMAT_PATTERN` (an answer line)."""
    regex = re.compile(pattern if pattern is not None else DEFAULT_FORMAT_PATTERN)
    return [1.0 if regex.search(c) else 0.0 for c in completions]


# ---------------------------------------------------------------- config
_TYPE_KEYS = {"checkpoint": "reward_model", "batch_size": "reward_model", "function": "python", "pattern": "format"}


class RewardSpec(Section):
    """One entry of ``rl.rewards``: a reward, its weight and the keys of its type."""

    type: Literal["verifiable", "format", "reward_model", "python"]
    weight: float = Field(1.0, allow_inf_nan=False)  # 0: logged, not trained on; < 0: a penalty
    checkpoint: Optional[str] = None  # reward_model: our RM checkpoint or a HF *ForSequenceClassification dir
    function: Optional[str] = None  # python: "package.module:function"
    pattern: Optional[str] = None  # format: a regex the completion must contain (default: the answer line)
    batch_size: PositiveInt = 16  # reward_model: scoring batch
    name: Optional[str] = Field(None, min_length=1, pattern=r"^\S+$")  # metric name (default: type / function)

    @model_validator(mode="after")
    def _check_keys(self) -> "RewardSpec":
        for key, owner in _TYPE_KEYS.items():
            given = key in self.model_fields_set and getattr(self, key) is not None  # `key: null` is no key
            if given and owner != self.type:
                raise ValueError(f"`{key}` is only for rewards of type {owner} (this one is type {self.type})")
        if self.type == "reward_model" and not self.checkpoint:
            raise ValueError("a reward_model reward needs `checkpoint` (a reward-model checkpoint directory)")
        if self.type == "python":
            if not self.function:
                raise ValueError("a python reward needs `function` (\"package.module:function\")")
            module, _, attr = self.function.partition(":")
            if not module.strip() or not attr.strip() or ":" in attr:
                raise ValueError(f"`function` must be \"package.module:function\", got {self.function!r}")
        if self.pattern is not None:
            try:
                re.compile(self.pattern)
            except re.error as e:
                raise ValueError(f"`pattern` {self.pattern!r} is not a valid regex: {e}") from None
        return self

    def label(self) -> str:
        """How errors name this reward: ``python:mod:fn``, ``reward_model:<checkpoint>``, ``format``."""
        if self.type == "python":
            return f"python:{self.function}"
        if self.type == "reward_model":
            return f"reward_model:{self.checkpoint}"
        return self.type

    def default_name(self) -> str:
        if self.name:
            return self.name
        if self.type == "python":
            return str(self.function).rsplit(":", 1)[1].rsplit(".", 1)[-1]
        return self.type

    def checkpoint_path(self) -> Path:
        """The reward model's directory, a relative path resolved against the repo root."""
        return resolve_path(str(self.checkpoint))


# ---------------------------------------------------------------- tokenizer identity
def _tokenizer_identity(file: Path) -> dict:
    """What decides how a ``tokenizer.json`` encodes text: its model (vocabulary, merges), added
    tokens, normalizer and pre-tokenizer — not formatting, key order, the merges' spelling
    ("a b" or ["a", "b"]), padding/truncation settings, the decoder or the version."""
    try:
        doc = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read {file} ({e})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("model"), dict):
        raise UserError(f"{file} is not a tokenizer.json (no \"model\")")
    model = dict(doc["model"])
    if isinstance(model.get("merges"), list):
        model["merges"] = [" ".join(m) if isinstance(m, list) else m for m in model["merges"]]
    added = sorted((t.get("id"), t.get("content"), bool(t.get("special"))) for t in doc.get("added_tokens") or [])
    return {"model": model, "added_tokens": added, "normalizer": doc.get("normalizer"),
            "pre_tokenizer": doc.get("pre_tokenizer")}


def _tokenizer_difference(policy: dict, rm: dict) -> Optional[str]:
    """None when the two identities encode alike, else a short reason."""
    if policy == rm:
        return None
    pv, rv = policy["model"].get("vocab"), rm["model"].get("vocab")
    pn, rn = len(pv or ()) + len(policy["added_tokens"]), len(rv or ()) + len(rm["added_tokens"])
    if pn != rn:
        return f"{rn} tokens against the policy's {pn}"
    if pv != rv or policy["added_tokens"] != rm["added_tokens"]:
        return "the same number of tokens but different token ids"
    if policy["model"].get("merges") != rm["model"].get("merges"):
        return "the same vocabulary but different merges"
    return "the same vocabulary but a different model, normalizer or pre-tokenizer"


def _tokenizer_file(path: Path) -> Path:
    return path / "tokenizer.json" if path.is_dir() else path


# ---------------------------------------------------------------- the sum
class RewardFunctions:
    """The weighted sum of the configured rewards.

    ``rewards(prompts, completions, records)`` → ``(total, per_reward)``: ``total`` (N,) float32
    = Σ weight_k · r_k, ``per_reward`` {name: (N,) float32 r_k unweighted}; CPU tensors.
    """

    def __init__(self, specs: Sequence[RewardSpec], policy_tokenizer_file: Optional[Path],
                 device: torch.device) -> None:
        self.specs = list(specs)
        self.weights = [s.weight for s in self.specs]
        self.names = _unique_names([s.default_name() for s in self.specs])
        self._fns: list[RewardFn] = []
        models: dict[Path, tuple[Any, Any]] = {}  # one load per checkpoint
        for spec in self.specs:
            if spec.type == "verifiable":
                self._fns.append(verifiable_reward)
            elif spec.type == "format":
                regex = spec.pattern

                def fmt(prompts, completions, records, _pattern=regex):
                    return format_reward(prompts, completions, records, _pattern)
                self._fns.append(fmt)
            elif spec.type == "reward_model":
                path = spec.checkpoint_path()
                if path not in models:
                    from align.score import load_reward_model  # model code only when a reward model is configured

                    self._check_tokenizer(spec, path, policy_tokenizer_file)  # before loading the weights
                    models[path] = load_reward_model(path, device, "auto")
                self._fns.append(_rm_reward(spec, *models[path]))
            else:
                self._fns.append(_import_function(spec))

    @staticmethod
    def _check_tokenizer(spec: RewardSpec, path: Path, policy_tokenizer_file: Optional[Path]) -> None:
        rm_file = path / "tokenizer.json"
        if not rm_file.is_file():
            return  # load_reward_model says so
        if policy_tokenizer_file is None or not _tokenizer_file(Path(policy_tokenizer_file)).is_file():
            raise UserError(f"reward {spec.label()}: the policy has no tokenizer.json to compare the reward "
                            f"model's with ({policy_tokenizer_file})")
        policy_file = _tokenizer_file(Path(policy_tokenizer_file))
        why = _tokenizer_difference(_tokenizer_identity(policy_file), _tokenizer_identity(rm_file))
        if why is not None:
            raise UserError(f"reward {spec.label()}: the reward model's tokenizer ({rm_file}) differs from the "
                            f"policy's ({policy_file}): {why}; use a reward model trained with the policy's tokenizer")

    def __call__(self, prompts: Sequence[str], completions: Sequence[str],
                 records: Sequence[dict]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        n = len(completions)
        if len(prompts) != n or len(records) != n:
            raise ValueError(f"{len(prompts)} prompts, {n} completions and {len(records)} records: one each")
        total = torch.zeros(n, dtype=torch.float64)
        per_reward: dict[str, torch.Tensor] = {}
        for spec, name, weight, fn in zip(self.specs, self.names, self.weights, self._fns):
            values = self._run(spec, fn, list(prompts), list(completions), records) if n else []
            r = torch.tensor(values, dtype=torch.float64)
            per_reward[name] = r.float()
            total += weight * r
        out = total.float()
        if not torch.isfinite(out).all():
            raise UserError(f"the weighted sum of the rewards is not finite ({out.tolist()}): lower the weights "
                            f"or the rewards' scale")
        return out, per_reward

    @staticmethod
    def _run(spec: RewardSpec, fn: Callable, prompts: list[str], completions: list[str],
             records: Sequence[dict]) -> list[float]:
        label = spec.label()
        try:
            result = fn(prompts=prompts, completions=completions, records=[dict(r) for r in records])
        except UserError:
            raise
        except Exception as e:
            raise UserError(f"reward {label} raised {type(e).__name__}: {e}") from e
        return _check_values(label, result, len(completions))


def _check_values(label: str, result: Any, n: int) -> list[float]:
    """`result` as n finite float32-representable floats, or a UserError naming the reward."""
    if result is None:
        raise UserError(f"reward {label} returned None (it must return a list of {n} numbers, one per completion)")
    if hasattr(result, "tolist") and not isinstance(result, (list, tuple)):  # a tensor or array
        result = result.tolist()
    if not isinstance(result, (list, tuple)):
        raise UserError(f"reward {label} returned a {type(result).__name__}, not a list of {n} numbers")
    if len(result) != n:
        raise UserError(f"reward {label} returned {len(result)} values for {n} completions")
    out = []
    f32_max = torch.finfo(torch.float32).max
    for i, v in enumerate(result):
        if hasattr(v, "item") and getattr(v, "ndim", None) == 0:  # a 0-d tensor / numpy scalar
            v = v.item()
        if isinstance(v, numbers.Real):  # bool counts as 0/1
            x = float(v)
            if math.isnan(x):
                raise UserError(f"reward {label} returned NaN for completion {i}")
            if math.isinf(x):
                raise UserError(f"reward {label} returned {x} for completion {i}")
            if abs(x) > f32_max:
                raise UserError(f"reward {label} returned {x!r} for completion {i}: beyond float32's range")
            out.append(x)
        else:
            shown = repr(v) if len(repr(v)) <= 40 else repr(v)[:37] + "..."
            raise UserError(f"reward {label} returned a non-number {shown} ({type(v).__name__}) for completion {i}")
    return out


def _unique_names(names: list[str]) -> list[str]:
    """Names made unique in order: a repeat gets ``_2``, ``_3``, … (skipping names already taken)."""
    taken: set[str] = set()
    out = []
    for name in names:
        unique, k = name, 2
        while unique in taken or (unique != name and unique in names):
            unique, k = f"{name}_{k}", k + 1
        taken.add(unique)
        out.append(unique)
    return out


def _rm_reward(spec: RewardSpec, model: Any, tokenizer: Any) -> Callable:
    from align.score import score_batch

    def reward_model(prompts, completions, records):
        try:  # score_batch runs under torch.inference_mode
            return score_batch(model, tokenizer, prompts, completions, spec.batch_size)
        except ValueError as e:  # a prompt too long for the reward model's max_seq_len
            raise UserError(f"reward {spec.label()}: {e}") from None
    return reward_model


def _import_function(spec: RewardSpec) -> Callable:
    """The callable `spec.function` names ("package.module:attr.path"), or a UserError naming it."""
    label = spec.label()
    module_name, _, attr_path = str(spec.function).partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name is not None and module_name.startswith(e.name) and module_name[len(e.name):][:1] in ("", "."):
            raise UserError(f"reward {label}: cannot import module {module_name!r} (is its directory on "
                            "PYTHONPATH?)") from None
        raise UserError(f"reward {label}: importing {module_name!r} raised ModuleNotFoundError: {e}") from e
    except Exception as e:
        raise UserError(f"reward {label}: importing {module_name!r} raised {type(e).__name__}: {e}") from e
    for part in attr_path.split("."):
        if not hasattr(obj, part):
            raise UserError(f"reward {label}: module {module_name!r} has no attribute {attr_path!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise UserError(f"reward {label}: {attr_path!r} is a {type(obj).__name__}, not a function")
    return obj
