"""Per-request sampling parameters and the batched sampler.

`sample()` turns the last-position logits of a batch into one token per row, each row with
its own parameters. The processing order, per row:

1. penalties on the raw logits
   - repetition penalty (CTRL, Keskar et al., 2019): every token seen in prompt + output has
     its logit divided by r when positive, multiplied by r when negative;
   - presence / frequency penalties (OpenAI API formula), over OUTPUT tokens only:
     logit -= count * frequency_penalty + (count > 0) * presence_penalty;
2. temperature below `SAMPLING_EPS` (0 in practice; as vLLM): greedy argmax of the penalised
   logits; otherwise divide by temperature;
3. truncation, each on the distribution left by the previous one: top-k (keep the k largest),
   top-p / nucleus (Holtzman et al., 2019: keep the smallest set whose probability reaches p,
   always at least the most likely token), min-p (Nguyen et al., 2024: drop tokens whose
   probability is below min_p * the largest probability);
4. draw from the truncated distribution: argmax(p / q) with q ~ Exp(1) (the exponential race,
   equivalent to multinomial sampling) from the global RNG; a request with a seed draws one
   uniform from its own torch.Generator and takes the inverse CDF (`inverse_cdf_sample`), so
   its tokens never depend on what else is in the batch.

Log-probabilities reported (chosen token and top alternatives) are
log_softmax(penalised logits / temperature) -- after penalties and temperature (temperature 1
for greedy rows), BEFORE top-k/top-p/min-p truncation, so that alternatives outside the nucleus
still get finite values. Seeded generators must live on the logits' device
(`make_generator(seed, logits.device)`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

MAX_TOP_LOGPROBS = 20  # the OpenAI API's limit on top_logprobs
SAMPLING_EPS = 1e-5  # temperatures below this are greedy (vLLM's threshold; dividing by less overflows)
SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.Generator.manual_seed accepts
# What a model's generation_config.json may set as defaults (the fields vLLM takes from it)
GENERATION_DEFAULT_KEYS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")


@dataclass
class SamplingParams:
    """How one request is sampled and when it stops. Bad values raise ValueError (one line)."""

    temperature: float = 1.0  # 0 (or below SAMPLING_EPS) = greedy
    top_p: float = 1.0  # (0, 1]; 1 = off
    top_k: int = 0  # 0 = off
    min_p: float = 0.0  # [0, 1]; 0 = off
    repetition_penalty: float = 1.0  # > 0; 1 = off
    presence_penalty: float = 0.0  # [-2, 2]
    frequency_penalty: float = 0.0  # [-2, 2]
    seed: int | None = None
    stop: list[str] = field(default_factory=list)  # stop strings (handled by the engine's detokenizer)
    stop_token_ids: list[int] = field(default_factory=list)
    max_tokens: int | None = 16  # None: until max_model_len
    logprobs: int | None = None  # None: none; 0: chosen token only; k: + the k most likely tokens
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop, self.stop_token_ids = list(self.stop), list(self.stop_token_ids)
        checks = [
            ("temperature", _is_real(self.temperature) and self.temperature >= 0, ">= 0"),
            ("top_p", _is_real(self.top_p) and 0 < self.top_p <= 1, "in (0, 1]"),
            ("top_k", _is_int(self.top_k) and self.top_k >= 0, "an integer >= 0 (0 = off)"),
            ("min_p", _is_real(self.min_p) and 0 <= self.min_p <= 1, "in [0, 1]"),
            ("repetition_penalty", _is_real(self.repetition_penalty) and self.repetition_penalty > 0, "> 0"),
            ("presence_penalty", _is_real(self.presence_penalty) and -2 <= self.presence_penalty <= 2, "in [-2, 2]"),
            ("frequency_penalty", _is_real(self.frequency_penalty) and -2 <= self.frequency_penalty <= 2, "in [-2, 2]"),
            ("seed", self.seed is None or (_is_int(self.seed) and SEED_RANGE[0] <= self.seed <= SEED_RANGE[1]),
             f"an integer in [{SEED_RANGE[0]}, {SEED_RANGE[1]}] or None"),
            ("stop", all(isinstance(s, str) and s for s in self.stop), "a list of non-empty strings"),
            ("stop_token_ids", all(_is_int(t) and t >= 0 for t in self.stop_token_ids), "a list of token ids >= 0"),
            ("max_tokens", self.max_tokens is None or (_is_int(self.max_tokens) and self.max_tokens >= 1),
             "an integer >= 1 or None"),
            ("logprobs", self.logprobs is None or (_is_int(self.logprobs) and 0 <= self.logprobs <= MAX_TOP_LOGPROBS),
             f"None or an integer in [0, {MAX_TOP_LOGPROBS}]"),
            ("ignore_eos", isinstance(self.ignore_eos, bool), "true or false"),
        ]
        for name, ok, allowed in checks:
            if not ok:
                raise ValueError(f"invalid sampling parameter {name}={getattr(self, name)!r}: must be {allowed}")

    @property
    def greedy(self) -> bool:
        return self.temperature < SAMPLING_EPS


def with_generation_defaults(defaults: dict[str, float], **fields: object) -> SamplingParams:
    """SamplingParams from ``fields``; a sampling field (`GENERATION_DEFAULT_KEYS`) given as None or
    not at all takes the model's default (``defaults``, from generation_config.json), else
    SamplingParams' own, as vLLM and transformers do."""
    for key in GENERATION_DEFAULT_KEYS:
        if fields.get(key) is None:
            fields.pop(key, None)
            if key in defaults:
                fields[key] = defaults[key]
    return SamplingParams(**fields)


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_real(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def make_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator | None:
    """The per-request random stream: a seeded generator on `device`, or None (global RNG)."""
    if seed is None:
        return None
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator


@dataclass
class SampleResult:
    token_ids: torch.Tensor  # (B,) int64
    logprobs: torch.Tensor  # (B,) float32, log-probability of each chosen token
    top_logprobs: list[list[tuple[int, float]]] | None  # per row, best first; None if no row asked


# ---- pure logit transforms (each (B, V) -> (B, V), unit-tested with hand numbers) ----------
def apply_penalties(
    logits: torch.Tensor,  # (B, V) float
    seen: torch.Tensor,  # (B, V) bool: token occurs in prompt + output
    output_counts: torch.Tensor,  # (B, V) float: occurrences in the output
    repetition: torch.Tensor,  # (B, 1)
    presence: torch.Tensor,  # (B, 1)
    frequency: torch.Tensor,  # (B, 1)
) -> torch.Tensor:
    penalised = torch.where(logits > 0, logits / repetition, logits * repetition)
    logits = torch.where(seen, penalised, logits)
    return logits - output_counts * frequency - (output_counts > 0).float() * presence


def top_k_top_p_min_p_mask(
    logits: torch.Tensor,  # (B, V) float, already divided by temperature
    top_k: torch.Tensor,  # (B,) int64, 0 = off
    top_p: torch.Tensor,  # (B, 1) float, 1 = off
    min_p: torch.Tensor,  # (B, 1) float, 0 = off
) -> torch.Tensor:
    """(B, V) bool: True where a token is removed. The most likely token is never removed."""
    vocab = logits.shape[-1]
    sorted_logits, order = logits.sort(dim=-1, descending=True)  # (B, V)
    rank = torch.arange(vocab, device=logits.device).expand_as(sorted_logits)  # (B, V)
    k = torch.where(top_k > 0, top_k.clamp(max=vocab), vocab).unsqueeze(-1)  # (B, 1)
    remove = rank >= k
    probs = sorted_logits.masked_fill(remove, float("-inf")).softmax(dim=-1)  # after top-k
    mass_before = probs.cumsum(dim=-1) - probs  # probability of the strictly better tokens
    remove |= (mass_before >= top_p) & (top_p < 1)  # top_p == 1 is off (no rounding losses)
    remove |= probs < min_p * probs[:, :1]
    remove[:, 0] = False
    return torch.zeros_like(remove).scatter(-1, order, remove)


def inverse_cdf_sample(probs: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
    """One token per row of probs (R, V), row r drawing a single uniform u from its own generator:
    the first token whose cumulative probability exceeds u · total (inverse-CDF sampling, exact
    for the distribution; a zero-probability token is never picked). One random number per row
    instead of V keeps seeded sampling cheap at large batches."""
    u = torch.stack([torch.rand((), generator=g, device=probs.device, dtype=torch.float64) for g in generators])
    cdf = probs.double().cumsum(dim=-1)  # (R, V)
    idx = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(-1), right=True).squeeze(-1)  # (R,)
    return idx.clamp(max=probs.shape[-1] - 1)


# ---- the batched sampler ------------------------------------------------------------------
def _penalty_inputs(
    histories: list[list[int]], prompt_lens: list[int], shape: torch.Size, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, V) bool `seen` over prompt + output and (B, V) float output counts."""
    batch, vocab = shape
    seen = torch.zeros(batch, vocab, dtype=torch.bool, device=device)
    counts = torch.zeros(batch, vocab, dtype=torch.float32, device=device)
    for i, (history, prompt_len) in enumerate(zip(histories, prompt_lens)):
        ids = torch.tensor(history, dtype=torch.long, device=device)
        seen[i, ids] = True
        out = ids[prompt_len:]
        counts[i].index_add_(0, out, torch.ones_like(out, dtype=torch.float32))
    return seen, counts


def sample(
    logits: torch.Tensor,  # (B, V)
    params: list[SamplingParams],
    histories: list[list[int]],  # prompt + output token ids of each row
    generators: list[torch.Generator | None],
    prompt_lens: list[int],  # how many of each history are prompt (for presence/frequency)
) -> SampleResult:
    """One token per row, each row with its own SamplingParams (see the module docstring)."""
    batch = logits.shape[0]
    if not (len(params) == len(histories) == len(generators) == len(prompt_lens) == batch):
        raise ValueError(f"sample(): {batch} logit rows but {len(params)} params, {len(histories)} "
                         f"histories, {len(generators)} generators, {len(prompt_lens)} prompt lengths")
    device = logits.device
    logits = logits.float()  # (B, V), a copy when the model ran in half precision

    def column(values: list[float]) -> torch.Tensor:  # (B, 1)
        return torch.tensor(values, dtype=torch.float32, device=device).unsqueeze(-1)

    if any(p.repetition_penalty != 1 or p.presence_penalty or p.frequency_penalty for p in params):
        seen, counts = _penalty_inputs(histories, prompt_lens, logits.shape, device)
        logits = apply_penalties(
            logits, seen, counts,
            column([p.repetition_penalty for p in params]),
            column([p.presence_penalty for p in params]),
            column([p.frequency_penalty for p in params]),
        )
    greedy = torch.tensor([p.greedy for p in params], device=device)  # (B,)
    logits = logits / column([1.0 if p.greedy else p.temperature for p in params])
    logprobs_all = logits.log_softmax(dim=-1)  # (B, V) what we report

    token_ids = logits.argmax(dim=-1)  # (B,) greedy choice
    if not greedy.all():
        if any(p.top_k or p.top_p < 1 or p.min_p for p in params):  # the mask costs a (B, V) sort
            removed = top_k_top_p_min_p_mask(
                logits,
                torch.tensor([min(p.top_k, logits.shape[-1]) for p in params], dtype=torch.long, device=device),
                column([p.top_p for p in params]),
                column([p.min_p for p in params]),
            )
            logits = logits.masked_fill(removed, float("-inf"))
        probs = logits.softmax(dim=-1)  # (B, V)
        sampled = token_ids.clone()  # (B,)
        if any(g is None for g in generators):  # the global RNG: the exponential race over the batch
            race = torch.empty_like(probs).exponential_()  # (B, V)
            sampled = (probs / race.clamp_min(1e-20)).argmax(dim=-1)
        seeded = [i for i, g in enumerate(generators) if g is not None and not params[i].greedy]
        if seeded:
            sampled[seeded] = inverse_cdf_sample(probs[seeded], [generators[i] for i in seeded])
        token_ids = torch.where(greedy, token_ids, sampled)

    chosen_logprobs = logprobs_all.gather(-1, token_ids.unsqueeze(-1)).squeeze(-1)  # (B,)
    top_logprobs = None
    wanted = [p.logprobs or 0 for p in params]
    if max(wanted) > 0:
        values, ids = logprobs_all.topk(max(wanted), dim=-1)  # (B, K)
        values, ids = values.tolist(), ids.tolist()
        top_logprobs = [list(zip(ids[i][:k], values[i][:k])) for i, k in enumerate(wanted)]
    return SampleResult(token_ids, chosen_logprobs, top_logprobs)
