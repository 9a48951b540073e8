"""Does a long prompt stall the streams already decoding? (`benchmarks/decode_speed.py --chunked_prefill`)

Eight streams decode on config B; after a few steps a 2,000-token prompt arrives. We record the
eight streams' inter-token latency (ITL) while they decode alone (the baseline) and while the long
prompt is being prefilled, without chunked prefill (the whole prompt in one step: every stream
waits for it) and with ``prefill_chunk_size`` chunks, each packed into a decode step (one forward
for the streams' tokens and the chunk). The goal: ITL p99 during the prefill <= 2x the median ITL.
"""
from __future__ import annotations

import random
import statistics
import time
from pathlib import Path
from typing import Optional

LONG_PROMPT = 2000
STREAMS = 8
STREAM_PROMPT = 32
ARRIVAL_STEP = 24  # decode steps of the streams alone before the long prompt arrives (the baseline)


def _percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q / 100 * len(values)))]


def _one_run(hf_dir: Path, vocab: int, chunk: Optional[int], n: int) -> dict:
    from inference.engine.llm_engine import LLMEngine
    from inference.engine.sampling import SamplingParams

    engine = LLMEngine(hf_dir, device="cpu", dtype="fp32", max_num_seqs=STREAMS + 1, prefill_chunk_size=chunk,
                       max_num_batched_tokens=4096)
    rng = random.Random(0)
    params = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
    for _ in range(STREAMS):
        engine.add_request([rng.randrange(vocab) for _ in range(STREAM_PROMPT)], params)
    last: dict[str, float] = {}
    before: list[float] = []
    during: list[float] = []
    arrived = done = None
    steps = 0
    while engine.has_unfinished():
        outs = engine.step()
        now = time.perf_counter()
        steps += 1
        for o in outs:
            if o.request_id == "long":
                done = done or now
                continue
            prev = last.get(o.request_id)
            if prev is not None and arrived is None:
                before.append(now - prev)
            elif prev is not None and (done is None or prev < done):  # the gap overlaps the long prefill
                during.append(now - prev)
            last[o.request_id] = now
        if steps == ARRIVAL_STEP:  # the streams are decoding: the long prompt arrives
            engine.add_request([rng.randrange(vocab) for _ in range(LONG_PROMPT)],
                               SamplingParams(temperature=0, max_tokens=1, ignore_eos=True), request_id="long")
            arrived = now
    ms = lambda v: round(v * 1e3, 2)  # noqa: E731
    median = statistics.median(before)
    return {
        "itl_ms_median_decoding_alone": ms(median),
        "itl_ms_p50_during_prefill": ms(statistics.median(during)),
        "itl_ms_p99_during_prefill": ms(_percentile(during, 99)),
        "itl_ms_max_during_prefill": ms(max(during)),
        "p99_over_median": round(_percentile(during, 99) / median, 2),
        "long_prompt_ttft_s": round(done - arrived, 2),
    }


def chunked_prefill_report(hf_dir: Path, vocab: int, chunks: list[Optional[int]]) -> dict:
    """One run per chunk size (None: no chunking); the streams generate enough to outlast the prefill."""
    out = {}
    for chunk in chunks:
        n = ARRIVAL_STEP + 16 + (0 if chunk is None else LONG_PROMPT // chunk)
        out["no_chunking" if chunk is None else f"chunk_{chunk}"] = _one_run(hf_dir, vocab, chunk, n)
    return out
