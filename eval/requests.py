"""The requests a task asks of a model, after lm-evaluation-harness's request model (Gao et al., 2023).

A task turns each sample into one or more requests of three kinds; the runner hands all requests
of a kind to the model at once, so the model can batch them however it likes:

- `Loglikelihood` (context, continuation) -> (log P(continuation | context), is_greedy): the sum of
  the continuation tokens' log-probabilities and whether greedy decoding would have produced them.
- `LoglikelihoodRolling` (text or token ids) -> (log P(text), tokens scored): the whole text scored
  in windows of the model's length (`rolling_windows`), each token predicted exactly once.
- `GenerateUntil` (context, until, ...) -> text: a completion cut before the first stop string.

`rolling_windows` reproduces lm-eval's ``get_rolling_token_windows`` + ``make_disjoint_window``:
with ``stride == max_len`` (the default, lm-eval's ``context_len=1``) the windows are disjoint
chunks; a smaller stride gives every window ``max_len - stride`` tokens of extra context (the
"sliding window" perplexity of the transformers docs) while each token is still scored once.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional, Union

Messages = list[dict[str, str]]


@dataclass(frozen=True)
class Loglikelihood:
    context: str
    continuation: str


@dataclass(frozen=True)
class LoglikelihoodRolling:
    text: Optional[str] = None  # a text, tokenized by the model
    token_ids: Optional[tuple[int, ...]] = None  # or tokens already (a token bin)


@dataclass(frozen=True)
class GenerateUntil:
    context: Union[str, Messages]  # a prompt, or chat messages (--chat): the model ends at the end of its turn
    until: tuple[str, ...] = ()
    max_gen_toks: int = 256
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    n: int = 1  # completions of this context (HumanEval pass@k)
    seed: Optional[int] = None  # sampling: completion i of this request draws with seed + i


Request = Union[Loglikelihood, LoglikelihoodRolling, GenerateUntil]


def rolling_windows(tokens: list[int], prefix_token: int, max_len: int,
                    stride: Optional[int] = None) -> Iterator[tuple[list[int], list[int]]]:
    """Disjoint (context, continuation) windows that score every token of `tokens` exactly once.

    The first window is ``[prefix_token] + tokens[:max_len - 1]`` predicting ``tokens[:max_len]``;
    each next one predicts the next ``stride`` tokens (fewer at the end) with as much preceding
    text as fits ``max_len`` inputs. ``stride=None`` means ``max_len`` (lm-eval's windows).
    """
    stride = max_len if stride is None else stride
    if not 1 <= stride <= max_len:
        raise ValueError(f"stride must be in [1, max_len={max_len}], got {stride}")
    if not tokens:
        return
    first = min(max_len, len(tokens))
    yield [prefix_token], tokens[:first]
    predicted = first
    while predicted < len(tokens):
        n = min(len(tokens) - predicted, stride)
        end = predicted + n
        yield tokens[end - max_len - 1 : end - n], tokens[end - n : end]
        predicted = end
