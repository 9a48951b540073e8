"""The paged-KV engine reproduces plain greedy decoding, for every attention kind.

The reference is token-by-token greedy decoding with a full forward over the whole sequence
(no cache at all). The engine must give the same tokens with continuous batching (prompts of
different lengths in one batch, slots reused), prefix-cache hits and preemption.
"""
from __future__ import annotations

import random
import shutil

import pytest
import torch

from engine_fixtures import greedy_reference, save_model
from inference.engine.llm import LLM
from inference.engine.llm_engine import IncrementalDetokenizer, LLMEngine, find_stop, partial_stop_len
from inference.engine.loading import load_model
from inference.engine.paged_cache import StepBatch, kv_bytes_per_token, step_mask
from inference.engine.sampling import SamplingParams
from model import get_preset
from serving_fixtures import make_tokenizer

VOCAB = 320  # the fixture tokenizer's
MOE = dict(n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2, moe_ffn_hidden_dim=32)
KINDS = {
    "mha": dict(preset="tiny", n_kv_heads=None),
    "gqa": dict(preset="tiny"),
    "mqa": dict(preset="tiny", n_kv_heads=1),
    "qk_norm": dict(preset="tiny-qwen3"),
    "sliding_window": dict(preset="tiny-mistral", sliding_window=8),
    "gemma2_softcap": dict(preset="tiny-gemma2", sliding_window=8),
    "alibi": dict(preset="tiny", position_type="alibi", n_heads=6, n_kv_heads=2, head_dim=16),
    "mla": dict(preset="tiny-deepseek_v3"),  # MLA + MoE + MTP weights
    "linear_attention": dict(preset="tiny", attention_type="linear"),
    "moe": dict(preset="tiny", moe=MOE),
    "mamba2": dict(preset="tiny-mamba2", mamba_chunk_size=4),
    "mamba2_hybrid": dict(preset="tiny-mamba2-hybrid"),
}
PROMPT_LENS = (5, 11, 17)
NEW = 20
GREEDY = SamplingParams(temperature=0, max_tokens=NEW, ignore_eos=True)


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tok_dir):
    root = tmp_path_factory.mktemp("ckpts")
    made = {}

    def get(kind: str):
        if kind not in made:
            spec = dict(KINDS[kind])
            cfg = get_preset(spec.pop("preset"), vocab_size=VOCAB, **spec)
            made[kind] = save_model(cfg, root / kind, tok_dir)
        return made[kind]

    return get


def prompts(lens=PROMPT_LENS, seed=0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(VOCAB) for _ in range(n)] for n in lens]


def reference(ckpt, prompt_list, n=NEW) -> list[list[int]]:
    model = load_model(ckpt, torch.device("cpu"), torch.float32).model
    return [greedy_reference(model, p, n) for p in prompt_list]


def engine(ckpt, **kw) -> LLMEngine:
    return LLMEngine(ckpt, **{"device": "cpu", "dtype": "fp32", "block_size": 4, **kw})


def run(eng: LLMEngine, prompt_list, params=GREEDY) -> list[list[int]]:
    ids = [eng.add_request(p, params) for p in prompt_list]
    tokens = {rid: [] for rid in ids}
    while eng.has_unfinished():
        for out in eng.step():
            tokens[out.request_id] += out.new_token_ids
    return [tokens[rid] for rid in ids]


# ---------------------------------------------------------------------------- pure pieces
def test_step_mask_by_hand() -> None:
    q = torch.tensor([[2, 3]])
    k = torch.tensor([[0, 1, 2, 3, -1]])
    assert step_mask(q, k)[0, 0].int().tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 0]]
    assert step_mask(q, k, window=2)[0, 0].int().tolist() == [[0, 1, 1, 0, 0], [0, 0, 1, 1, 0]]


def test_step_batch_slots_by_hand() -> None:
    # block size 2; row 0 prefills 3 tokens in blocks [5, 2]; row 1 decodes position 3 in [1, 0]
    step = StepBatch([0, 3], [3, 1], [[5, 2], [1, 0]], [1, 0], block_size=2, scratch_block=9,
                      device=torch.device("cpu"))
    assert step.positions.tolist() == [[0, 1, 2], [3, 3, 3]]  # padding repeats the last position
    assert step.gather_slots.view(2, 4).tolist() == [[10, 11, 4, 5], [2, 3, 0, 1]]
    assert step.write_slots.tolist() == [10, 11, 4, 1, 18, 18]  # padding writes to the scratch block
    assert step.key_positions.tolist() == [[0, 1, 2, -1], [0, 1, 2, 3]]
    mask, is_causal = step.mask()
    assert not is_causal
    assert mask[0, 0].int().tolist() == [[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0]]
    assert mask[1, 0].int().tolist() == [[1, 1, 1, 1]] * 3
    decode = StepBatch([3], [1], [[1, 0]], [0], block_size=2, scratch_block=9, device=torch.device("cpu"))
    assert decode.mask() == (None, False)  # one row, no padding: every key visible, no mask tensor
    assert decode.mask(window=2)[0][0, 0].int().tolist() == [[0, 0, 1, 1]]
    assert step.contiguous_start is None and decode.contiguous_start is None  # 2 rows; blocks [1, 0]
    single = StepBatch([2], [2], [[3, 4, 7]], [0], block_size=2, scratch_block=9, device=torch.device("cpu"))
    assert single.contiguous_start == 6  # blocks 3, 4 hold positions 0..3: slots 6..9, read as a slice


def test_stop_string_helpers() -> None:
    assert find_stop("hello world", ["wor", "lo"], 0) == 3
    assert find_stop("hello world", ["wor"], 8) == -1
    assert partial_stop_len("the end", ["end!", "xyz"]) == 3
    assert partial_stop_len("the en", ["end"]) == 2
    assert partial_stop_len("the", ["end"]) == 1  # "e" may begin "end"
    assert partial_stop_len("thx", ["end"]) == 0


def test_incremental_detokenizer_keeps_multibyte_characters(tok_dir) -> None:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    text = "The cat said héllo wörld ✓✓ and ran."
    ids = tok.encode(text, add_special_tokens=False).ids
    prompt = ids[:3]
    detok = IncrementalDetokenizer(tok, len(prompt))
    pieces = [detok(ids[: i + 1]) for i in range(len(prompt), len(ids))]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == tok.decode(ids) [len(tok.decode(prompt)):]


def test_mla_cache_is_smaller_than_mha() -> None:
    mla = get_preset("tiny-deepseek_v3")
    assert kv_bytes_per_token(mla, torch.float32) == mla.n_layers * (32 + 16) * 4
    mha = get_preset("tiny", n_kv_heads=None)
    assert kv_bytes_per_token(mha, torch.float32) == mha.n_layers * 2 * 64 * 4


# ---------------------------------------------------------------------------- engine vs reference
@pytest.mark.parametrize("kind", list(KINDS))
def test_greedy_matches_full_forward(kind, checkpoint) -> None:
    ckpt = checkpoint(kind)
    plist = prompts()
    # 3 prompts of different lengths, 2 at a time: batched prefill with padding, then a slot is reused
    assert run(engine(ckpt, max_num_seqs=2), plist) == reference(ckpt, plist)


@pytest.mark.parametrize("kind", ["gqa", "sliding_window", "mla"])
def test_batched_equals_unbatched(kind, checkpoint) -> None:
    ckpt = checkpoint(kind)
    plist = prompts((3, 9, 14, 6), seed=1)
    batched = run(engine(ckpt), plist)
    one_at_a_time = [run(engine(ckpt, max_num_seqs=1), [p])[0] for p in plist]
    assert batched == one_at_a_time


def test_dynamic_ntk_rows_do_not_depend_on_their_batch_mates(tok_dir, tmp_path) -> None:
    """Regression: the dynamic-NTK RoPE base came from the longest row of the batch, so a short
    request's output changed with a long one beside it. Per row, batched equals one at a time."""
    scaling = dict(type="dynamic", factor=4.0, original_max_position_embeddings=8)
    ckpt = save_model(get_preset("tiny", vocab_size=VOCAB, rope_scaling=scaling), tmp_path / "ntk", tok_dir)
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, logprobs=0)

    def tokens_and_logprobs(eng: LLMEngine, plist: list[list[int]]) -> list[list[tuple[int, float]]]:
        ids = [eng.add_request(p, params) for p in plist]
        got: dict[str, list[tuple[int, float]]] = {rid: [] for rid in ids}
        while eng.has_unfinished():
            for out in eng.step():
                got[out.request_id] += [(t, lp) for t, lp, _ in out.logprobs]
        return [got[rid] for rid in ids]

    plist = prompts((4, 30, 11), seed=3)  # one row within the original 8 positions, two beyond
    batched = tokens_and_logprobs(engine(ckpt), plist)
    alone = [tokens_and_logprobs(engine(ckpt, max_num_seqs=1), [p])[0] for p in plist]
    for b, a in zip(batched, alone):
        assert [t for t, _ in b] == [t for t, _ in a]
        assert [lp for _, lp in b] == pytest.approx([lp for _, lp in a], abs=1e-4)


@pytest.mark.parametrize("kind", ["gqa", "sliding_window", "mla"])
def test_prefix_cache_hits_give_identical_output(kind, checkpoint) -> None:
    ckpt = checkpoint(kind)
    system = prompts((12,), seed=2)[0]  # 3 full blocks of 4
    a, b = system + [1, 2, 3], system + [7, 8]
    expected = reference(ckpt, [a, b])
    eng = engine(ckpt)
    assert run(eng, [a]) == [expected[0]]
    rid = eng.add_request(b, GREEDY)
    first = eng.step()  # the prefill
    assert eng.scheduler.get(rid).num_cached_tokens == 12  # the shared system prompt came from the cache
    tokens = first[0].new_token_ids
    while eng.has_unfinished():
        tokens += eng.step()[0].new_token_ids
    assert tokens == expected[1]
    rid = eng.add_request(a, GREEDY)  # the same prompt again: every full block is a hit
    eng.step()
    assert eng.scheduler.get(rid).num_cached_tokens == 12
    eng.abort(rid)
    assert run(eng, [a, a]) == [expected[0]] * 2  # identical prompts prefilled together
    assert eng.num_free_blocks == eng.num_total_blocks


@pytest.mark.parametrize("kind", ["gqa", "mla"])
def test_preemption_under_a_tiny_pool_completes_every_request(kind, checkpoint) -> None:
    ckpt = checkpoint(kind)
    plist = prompts((5, 11, 17, 9), seed=3)
    cfg = load_model(ckpt, torch.device("cpu"), torch.float32).config
    pool_mb = 12 * 4 * kv_bytes_per_token(cfg, torch.float32) / 2**20  # 12 blocks: 48 tokens in all
    eng = engine(ckpt, kv_cache_memory_mb=pool_mb)
    assert eng.num_total_blocks == 12
    preempted = []
    schedule = eng.scheduler.schedule

    def counting_schedule():
        out = schedule()
        preempted.extend(out.preempted)
        return out

    eng.scheduler.schedule = counting_schedule
    assert run(eng, plist) == reference(ckpt, plist)
    assert preempted  # the pool held ~1.5 sequences of the 4
    assert eng.num_free_blocks == eng.num_total_blocks


# ---------------------------------------------------------------------------- outputs
def test_logprobs_match_the_reference(checkpoint) -> None:
    ckpt = checkpoint("gqa")
    prompt = prompts((7,))[0]
    eng = engine(ckpt)
    eng.add_request(prompt, SamplingParams(temperature=0, max_tokens=5, logprobs=3, ignore_eos=True))
    entries = []
    while eng.has_unfinished():
        entries += eng.step()[0].logprobs
    model = load_model(ckpt, torch.device("cpu"), torch.float32).model
    tokens = prompt + [t for t, _, _ in entries]
    with torch.no_grad():
        ref = model(torch.tensor([tokens]))[0, len(prompt) - 1 : -1].log_softmax(-1)  # (5, V)
    for i, (token, logprob, top) in enumerate(entries):
        assert len(top) == 3 and top[0][0] == token
        assert logprob == pytest.approx(ref[i, token].item(), abs=1e-4)
        assert [t for t, _ in top] == ref[i].topk(3).indices.tolist()


def test_stop_strings_end_the_text_and_are_excluded(checkpoint) -> None:
    llm = LLM(checkpoint("gqa"), device="cpu", dtype="fp32")
    params = dict(temperature=0, max_tokens=40, ignore_eos=True)
    full = llm.generate("Once upon a time", SamplingParams(**params))[0]
    assert full.prompt_token_ids == llm.tokenizer.encode("Once upon a time", add_special_tokens=False).ids
    assert full.finish_reason == "length" and len(full.token_ids) == 40
    text = full.text
    # a stop string of two ASCII characters from the middle of the text
    cut = next(i for i in range(4, len(text) - 1) if text[i : i + 2].isascii() and text[i : i + 2].strip())
    stop = text[cut : cut + 2]
    eng = llm.engine
    rid = eng.add_request("Once upon a time", SamplingParams(**params, stop=[stop, "\u2603never"]))
    pieces, last = [], None
    while eng.has_unfinished():
        for out in eng.step():
            assert out.request_id == rid
            pieces.append(out.new_text)
            last = out
    assert last.finished and last.finish_reason == "stop"
    assert "".join(pieces) == text[: text.find(stop)]
    assert eng.num_free_blocks == eng.num_total_blocks


def test_abort_frees_blocks_and_other_requests_continue(checkpoint) -> None:
    ckpt = checkpoint("gqa")
    plist = prompts((6, 9), seed=4)
    expected = reference(ckpt, plist[1:])[0]
    eng = engine(ckpt)
    keep, drop = eng.add_request(plist[1], GREEDY), eng.add_request(plist[0], GREEDY)
    tokens = [t for o in eng.step() if o.request_id == keep for t in o.new_token_ids]
    eng.abort(drop)
    eng.abort("no-such-request")  # unknown ids are ignored
    while eng.has_unfinished():
        for out in eng.step():
            assert out.request_id == keep
            tokens += out.new_token_ids
    assert tokens == expected
    assert eng.num_free_blocks == eng.num_total_blocks


def test_bad_requests_are_value_errors(checkpoint) -> None:
    eng = engine(checkpoint("gqa"))
    with pytest.raises(ValueError, match="max_model_len"):
        eng.add_request([1] * 100, SamplingParams(max_tokens=eng.max_model_len))
    with pytest.raises(ValueError, match="token ids"):
        eng.add_request([VOCAB], SamplingParams())
    assert not eng.has_unfinished()


# ---------------------------------------------------------------------------- loading
def test_hugging_face_directory_and_lora_adapter(checkpoint, tmp_path) -> None:
    from model.hf import save_hf_dir
    from model.lora import LoraConfig, apply_lora, lora_parameters
    from model.lora_io import merged_state_dict, save_adapter

    ckpt = checkpoint("gqa")
    base = load_model(ckpt, torch.device("cpu"), torch.float32)
    plist = prompts((8,), seed=5)
    expected = reference(ckpt, plist)

    hf_dir = save_hf_dir(base.config, base.model.state_dict(), tmp_path / "hf")
    shutil.copy(ckpt / "tokenizer.json", hf_dir / "tokenizer.json")
    assert run(engine(hf_dir), plist) == expected

    lora = apply_lora(load_model(ckpt, torch.device("cpu"), torch.float32).model, LoraConfig(r=4))
    torch.manual_seed(0)
    with torch.no_grad():
        for p in lora_parameters(lora):
            p.normal_(0.0, 0.3)
    adapter = save_adapter(lora, tmp_path / "adapter")
    merged = load_model(ckpt, torch.device("cpu"), torch.float32).model
    merged.load_state_dict(merged_state_dict(lora))
    adapted = [greedy_reference(merged, p, NEW) for p in plist]
    assert adapted != expected  # the adapter changes the model
    assert run(engine(ckpt, adapter=adapter), plist) == adapted
