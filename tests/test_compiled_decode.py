"""The compiled decode step (`inference/engine/compiled_decode.py`) gives what eager decoding gives.

The paged-engine scenarios of `test_paged_engine.py` run with ``compile=True``: greedy tokens
equal the full-forward reference (continuous batching with rows of different lengths, so batch
and context padding), prefix-cache hits, preemption, speculative decoding; sampled logprobs equal
eager ones. Each batch bucket compiles once, whatever the context length, and is then replayed. Where the step
cannot be compiled the engine says so and decodes eagerly.

Inductor compiles in seconds per bucket here with its light options (`FAST`); the engine's
default CPU options (freezing, autotuned GEMMs, the C++ wrapper) get one test of their own.
"""
from __future__ import annotations

import logging

import pytest
import torch
from torch._dynamo.utils import counters

import inference.engine.compiled_decode as cd
from inference.engine.compiled_decode import StaticStep, bucket_batch, bucket_slots, round_up
from inference.engine.loading import LoadedModel, load_model
from inference.engine.paged_cache import kv_bytes_per_token
from inference.engine.sampling import SamplingParams
from engine_fixtures import save_model
from model import get_preset
from test_paged_engine import VOCAB, checkpoint, engine, prompts, reference, run, tok_dir  # noqa: F401 (fixtures)

pytestmark = pytest.mark.slow
FAST = {"freezing": True}  # Inductor without autotuning or the C++ wrapper: same graph, quicker to build


@pytest.fixture(autouse=True)
def fast_inductor(monkeypatch):
    monkeypatch.setattr(cd, "CPU_OPTIONS", FAST)


def compiled_engine(ckpt, **kw):
    eng = engine(ckpt, compile=True, **kw)
    assert eng.runner.compiled is not None
    return eng


def used_compiled(eng) -> None:
    compiled = eng.runner.compiled
    assert compiled.disabled is None and compiled.compiled_buckets


# ---------------------------------------------------------------------------- pure pieces
def test_buckets_by_hand() -> None:
    assert [bucket_batch(n) for n in (1, 2, 3, 5, 16, 17, 256)] == [1, 2, 4, 8, 16, 24, 256]
    assert bucket_batch(257) is None
    assert [round_up(n, 8) for n in (1, 8, 9, 17)] == [8, 8, 16, 24]


def test_bucket_slots_and_static_step_by_hand() -> None:
    # two rows (block size 2): row 0 writes position 2 with blocks [5, 1]; row 1 position 0 with block [3];
    # padded to 4 rows and 4 context slots; scratch block 9
    slots = bucket_slots([[5, 1], [3]], 4, 4, 2, 9)
    assert slots.tolist() == [[10, 11, 2, 3], [6, 7, 18, 19], [18, 19, 18, 19], [18, 19, 18, 19]]
    step = StaticStep(torch.tensor([[2], [0], [0], [0]]), slots)
    assert step.write_slots.tolist() == [2, 6, 18, 18]  # block 1 offset 0; block 3 offset 0; padding: scratch
    assert step.gather_slots.tolist() == sum(slots.tolist(), [])
    assert step.key_positions.tolist() == [[0, 1, 2, -1], [0, -1, -1, -1], [0, -1, -1, -1], [0, -1, -1, -1]]
    mask, is_causal = step.mask(window=2)
    assert not is_causal and mask.shape == (4, 1, 1, 4)
    assert mask[:, 0, 0].tolist()[:2] == [[False, True, True, False], [True, False, False, False]]


# ---------------------------------------------------------------------------- engine, compiled
@pytest.mark.parametrize("kind", ["gqa", "qk_norm", "sliding_window", "gemma2_softcap", "mla", "moe"])
def test_compiled_greedy_matches_full_forward(kind, checkpoint) -> None:
    ckpt = checkpoint(kind)
    plist = prompts()  # 3 rows of different lengths: a padding row in the 4-row bucket
    eng = compiled_engine(ckpt)
    assert run(eng, plist) == reference(ckpt, plist)
    used_compiled(eng)
    assert 4 in eng.runner.compiled.compiled_buckets


def test_one_graph_per_batch_bucket_whatever_the_context(checkpoint) -> None:
    eng = compiled_engine(checkpoint("gqa"))
    plist = prompts()  # contexts grow from 6..18 to 25..37 positions: 4 to 10 blocks of 4
    graphs = counters["stats"]["unique_graphs"]
    first = run(eng, plist)
    # at most one graph (the 4-row bucket, context symbolic; none if an earlier engine's graph fits)
    assert counters["stats"]["unique_graphs"] - graphs <= 1
    assert eng.runner.compiled.compiled_buckets == {4}
    graphs = counters["stats"]["unique_graphs"]
    assert run(eng, plist) == first
    assert counters["stats"]["unique_graphs"] == graphs  # nothing compiled the second time


def test_compiled_prefix_cache_and_preemption(checkpoint) -> None:
    ckpt = checkpoint("gqa")
    system = prompts((12,), seed=2)[0]
    a, b = system + [1, 2, 3], system + [7, 8]
    eng = compiled_engine(ckpt)
    assert run(eng, [a, b, a]) == reference(ckpt, [a, b, a])
    plist = prompts((5, 11, 17, 9), seed=3)
    cfg = load_model(ckpt, torch.device("cpu"), torch.float32).config
    pool_mb = 12 * 4 * kv_bytes_per_token(cfg, torch.float32) / 2**20  # 12 blocks: ~1.5 of the 4 sequences
    eng = compiled_engine(ckpt, kv_cache_memory_mb=pool_mb)
    assert run(eng, plist) == reference(ckpt, plist)
    used_compiled(eng)


def test_compiled_speculative_decoding_equals_target_greedy(checkpoint) -> None:
    target, draft = checkpoint("gqa"), checkpoint("mqa")
    plist = prompts()
    eng = compiled_engine(target, draft_checkpoint=draft, num_speculative_tokens=3)
    assert run(eng, plist) == reference(target, plist)
    compiled = eng.speculative.draft.compiled  # the draft proposes one token per row per step: compiled
    assert compiled is not None and compiled.compiled_buckets


def test_compiled_sampled_logprobs_equal_eager(checkpoint) -> None:
    ckpt = checkpoint("gqa")
    params = SamplingParams(temperature=0.8, top_p=0.9, max_tokens=12, seed=7, logprobs=2, ignore_eos=True)

    def sample(eng):
        rid = eng.add_request(prompts((9,))[0], params)
        got = []
        while eng.has_unfinished():
            for out in eng.step():
                got += out.logprobs
        return rid, got

    (_, eager), (_, compiled) = sample(engine(ckpt)), sample(compiled_engine(ckpt))
    assert [t for t, _, _ in compiled] == [t for t, _, _ in eager]
    assert [lp for _, lp, _ in compiled] == pytest.approx([lp for _, lp, _ in eager], abs=1e-4)


@pytest.mark.parametrize("kind", ["linear_attention", "alibi"])
def test_uncompilable_models_decode_eagerly_with_a_warning(kind, checkpoint, caplog) -> None:
    ckpt = checkpoint(kind)
    with caplog.at_level(logging.WARNING):
        eng = engine(ckpt, compile=True)
    assert eng.runner.compiled is None
    assert "compiled decoding is off" in caplog.text
    assert run(eng, prompts()[:1]) == reference(ckpt, prompts()[:1])


def test_a_compiler_failure_falls_back_to_eager(checkpoint, caplog, monkeypatch) -> None:
    ckpt = checkpoint("gqa")
    eng = compiled_engine(ckpt)

    def broken(*args):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(eng.runner.compiled, "_compiled", broken)
    with caplog.at_level(logging.WARNING):
        assert run(eng, prompts()) == reference(ckpt, prompts())
    assert "torch.compile failed: RuntimeError: no C++ compiler" in caplog.text
    assert eng.runner.compiled.disabled


def test_in_memory_models_are_not_compiled(checkpoint) -> None:
    loaded = load_model(checkpoint("gqa"), torch.device("cpu"), torch.float32)
    assert isinstance(loaded, LoadedModel)
    with pytest.raises(ValueError, match="compile"):
        engine(loaded, compile=True)


def test_default_cpu_options(checkpoint, monkeypatch) -> None:
    """The engine's own CPU options: frozen weights, autotuned GEMMs, the C++ wrapper."""
    monkeypatch.setattr(cd, "CPU_OPTIONS", cd.DEFAULT_CPU_OPTIONS)
    ckpt = checkpoint("gqa")
    plist = prompts((5,))
    eng = compiled_engine(ckpt)
    assert run(eng, plist) == reference(ckpt, plist)
    used_compiled(eng)


def test_engines_with_different_weights_each_decode_their_own(tok_dir, tmp_path) -> None:
    """Two live engines of one shape: a graph compiled for one must never serve the other's weights."""
    cfg = get_preset("tiny", vocab_size=VOCAB)
    a, b = save_model(cfg, tmp_path / "a", tok_dir, seed=0), save_model(cfg, tmp_path / "b", tok_dir, seed=1)
    first, second = compiled_engine(a), compiled_engine(b)
    plist = prompts()
    assert run(first, plist) == reference(a, plist)
    assert run(second, plist) == reference(b, plist)
    assert run(first, plist) == reference(a, plist)
