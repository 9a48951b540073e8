"""Mamba-2 (SSD): hand-built numbers, chunked scan == recurrent step, caches, engine, presets."""
from __future__ import annotations

import logging
import math
from pathlib import Path

import pytest
import torch
import yaml

from engine_fixtures import greedy_reference, save_model
from inference.engine.llm_engine import LLMEngine
from inference.engine.loading import load_model
from inference.engine.paged_cache import kv_bytes_per_token
from inference.engine.sampling import SamplingParams
from model import ModelConfig, build_model, count_params, get_preset
from model.hf import HFFormatError, config_to_hf
from model.mamba2 import Mamba2Mixer
from model.presets import PRESETS
from model.ssd import causal_conv1d, conv_state_after, segment_ids, segsum, ssd_chunked_scan, ssd_step
from serving_fixtures import make_tokenizer
from utils.paths import REPO_ROOT

HALF = torch.tensor([-math.log(2.0)])  # A: with dt = 1 the state halves every token


# ---------------------------------------------------------------------------- pure functions by hand
def test_step_and_scan_on_hand_numbers() -> None:
    # one head, P = N = 1, B = C = 1, dt = 1: h_t = h_{t-1} / 2 + x_t, y_t = h_t
    x = torch.tensor([1.0, 2.0, 3.0]).view(1, 3, 1, 1)  # (Bt, T, H, P)
    dt, ones = torch.ones(1, 3, 1), torch.ones(1, 3, 1, 1)
    expected = [1.0, 2.5, 4.25]
    state, ys = torch.zeros(1, 1, 1, 1), []
    for t in range(3):
        y, state = ssd_step(state, x[:, t], dt[:, t], HALF, ones[:, t], ones[:, t])
        ys.append(y.item())
    assert ys == pytest.approx(expected)
    y, final = ssd_chunked_scan(x, dt, HALF, ones, ones, chunk_size=2)  # 2 chunks, the last one padded
    assert y.flatten().tolist() == pytest.approx(expected)
    assert final.item() == pytest.approx(4.25)
    y, _ = ssd_chunked_scan(x, dt, HALF, ones, ones, chunk_size=2, init_state=torch.full((1, 1, 1, 1), 8.0))
    assert y.flatten().tolist() == pytest.approx([5.0, 4.5, 5.25])  # + 8 / 2, 8 / 4, 8 / 8


def test_dt_scales_input_and_decay() -> None:
    # dt = 2: decay exp(2 * -ln 2) = 1/4, input 2 x; B = 3, C = 5: y = 5 h
    x, dt = torch.tensor([1.0, 1.0]).view(1, 2, 1, 1), torch.full((1, 2, 1), 2.0)
    b, c = torch.full((1, 2, 1, 1), 3.0), torch.full((1, 2, 1, 1), 5.0)
    y, _ = ssd_chunked_scan(x, dt, HALF, b, c, chunk_size=4)
    assert y.flatten().tolist() == pytest.approx([30.0, 37.5])  # h = 6, then 6 / 4 + 6


def test_segsum_by_hand() -> None:
    out = segsum(torch.tensor([1.0, 2.0, 3.0]))
    inf = float("-inf")
    assert out.tolist() == [[0.0, inf, inf], [2.0, 0.0, inf], [5.0, 3.0, 0.0]]


def test_causal_conv_on_hand_numbers() -> None:
    x = torch.tensor([1.0, 2.0, 3.0]).view(1, 3, 1)  # (B, T, C)
    w = torch.tensor([[100.0, 10.0, 1.0]])  # K = 3: w[-1] on x_t, w[-2] on x_{t-1}, w[-3] on x_{t-2}
    assert causal_conv1d(x, w).flatten().tolist() == [1.0, 12.0, 123.0]
    assert causal_conv1d(x, w, torch.tensor([0.5])).flatten().tolist() == [1.5, 12.5, 123.5]
    state = torch.tensor([[[7.0, 8.0]]])  # (B, C, K-1): the two inputs before x
    assert causal_conv1d(x, w, state=state).flatten().tolist() == [781.0, 812.0, 123.0]
    assert conv_state_after(x, state).flatten().tolist() == [2.0, 3.0]
    assert conv_state_after(x, state, torch.tensor([1])).flatten().tolist() == [8.0, 1.0]  # 2 tokens of padding
    seg = torch.tensor([[0, 1, 1]])  # a document starts at t = 1: x_0 is not its input
    assert causal_conv1d(x, w, seg=seg).flatten().tolist() == [1.0, 2.0, 23.0]


def test_segment_ids() -> None:
    assert segment_ids(torch.tensor([[4, 4, 9, 9, 9, 2]])).tolist() == [[0, 0, 1, 1, 1, 2]]


# ---------------------------------------------------------------------------- scan == step
def _random_ssm(batch: int, seq_len: int, heads: int = 4, groups: int = 2, p: int = 3, n: int = 5, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, seq_len, heads, p, generator=g, dtype=torch.float64)
    dt = torch.nn.functional.softplus(torch.randn(batch, seq_len, heads, generator=g, dtype=torch.float64))
    A = -torch.rand(heads, generator=g, dtype=torch.float64) * 2
    b = torch.randn(batch, seq_len, groups, n, generator=g, dtype=torch.float64)
    c = torch.randn(batch, seq_len, groups, n, generator=g, dtype=torch.float64)
    return x, dt, A, b, c


@pytest.mark.parametrize("chunk_size", [1, 4, 7, 64])
def test_chunked_scan_equals_recurrent_step(chunk_size: int) -> None:
    x, dt, A, b, c = _random_ssm(2, 23)
    init = torch.randn(2, 4, 3, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    y, final = ssd_chunked_scan(x.float(), dt.float(), A.float(), b.float(), c.float(), chunk_size, init.float())
    state, ys = init, []
    for t in range(x.shape[1]):
        out, state = ssd_step(state, x[:, t], dt[:, t], A, b[:, t], c[:, t])
        ys.append(out)
    assert (y.double() - torch.stack(ys, dim=1)).abs().max().item() <= 1e-5
    assert (final.double() - state).abs().max().item() <= 1e-5


def test_documents_in_the_scan_start_from_zero() -> None:
    x, dt, A, b, c = _random_ssm(1, 19)
    seg = torch.tensor([[0] * 6 + [1] * 9 + [2] * 4])
    packed, _ = ssd_chunked_scan(x, dt, A, b, c, chunk_size=4, seg=seg)
    start = 0
    for n in (6, 9, 4):
        s = slice(start, start + n)
        alone, _ = ssd_chunked_scan(x[:, s], dt[:, s], A, b[:, s], c[:, s], chunk_size=4)
        assert (packed[:, s] - alone).abs().max().item() <= 1e-10
        start += n


# ---------------------------------------------------------------------------- module and model
def test_init_follows_mamba2() -> None:
    torch.manual_seed(0)
    mixer = build_model(get_preset("tiny-mamba2")).layers[0].mixer
    assert isinstance(mixer, Mamba2Mixer)
    a = torch.exp(mixer.A_log)
    assert ((a >= 1.0) & (a <= 16.0)).all() and a.std() > 0
    dt = torch.nn.functional.softplus(mixer.dt_bias)
    assert ((dt >= 1e-3 - 1e-7) & (dt <= 0.1 + 1e-7)).all()
    assert torch.equal(mixer.D, torch.ones_like(mixer.D))
    assert torch.equal(mixer.norm.weight, torch.ones_like(mixer.norm.weight))
    assert mixer.conv1d.weight.abs().max() <= 0.5 and mixer.conv1d.weight.std() > 0.1  # U(-1/sqrt(K), 1/sqrt(K))


def test_param_count_by_hand() -> None:
    cfg = get_preset("tiny-mamba2")  # dim 64, 2 layers, d_inner 128 in 8 heads of 16, 2 groups of N = 16, K = 4
    inner, conv_dim, heads = 128, 128 + 2 * 2 * 16, 8
    mixer = 64 * (inner + conv_dim + heads) + conv_dim * 4 + conv_dim + 3 * heads + inner + inner * 64
    total = 256 * 64 + 2 * (64 + mixer) + 64  # tied embedding, per layer norm + mixer, final norm
    assert count_params(cfg)["total"] == total == 77_168


def test_training_forward_backward_and_no_nans() -> None:
    torch.manual_seed(0)
    model = build_model(get_preset("tiny-mamba2-hybrid"))
    tokens = torch.randint(0, 256, (2, 40))
    doc_ids = torch.tensor([[0] * 25 + [1] * 15, [0] * 40])
    loss = model(tokens, doc_ids=doc_ids).logsumexp(-1).mean()
    loss.backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert model.layers[0].mixer.A_log.grad.abs().sum() > 0


@pytest.mark.parametrize("name", ["tiny-mamba2", "tiny-mamba2-hybrid"])
def test_cache_errors_are_clear(name: str) -> None:
    model = build_model(get_preset(name)).eval()
    cache = model.init_cache(1, 8)
    with torch.no_grad():
        model(torch.zeros(1, 4, dtype=torch.long), cache=cache)
        with pytest.raises(ValueError, match="cannot rewind or skip"):
            model(torch.zeros(1, 1, dtype=torch.long), positions=torch.tensor([[2]]), cache=cache)


# ---------------------------------------------------------------------------- config and export
def test_config_rules() -> None:
    assert get_preset("tiny-mamba2").layer_type(1) == "mamba"
    hybrid = ModelConfig(n_layers=3, layer_types=["mamba", "attention", "full"])
    assert hybrid.layer_types == ["mamba", "full", "full"]  # "attention" is read as "full"
    with pytest.raises(ValueError, match="alibi"):
        get_preset("tiny-mamba2", position_type="alibi")
    with pytest.raises(ValueError, match="sliding_window"):
        get_preset("tiny-mamba2-hybrid", sliding_window=8)
    with pytest.raises(ValueError, match="mamba_head_dim"):
        get_preset("tiny-mamba2", mamba_head_dim=48)
    with pytest.raises(ValueError, match="mamba_n_groups"):
        get_preset("tiny-mamba2", mamba_n_groups=3)


def test_hybrid_has_no_transformers_counterpart() -> None:
    with pytest.raises(HFFormatError, match="hybrid"):
        config_to_hf(get_preset("tiny-mamba2-hybrid"))
    with pytest.raises(HFFormatError, match="embed_scale"):
        config_to_hf(get_preset("tiny-mamba2", embed_scale=True))


def test_nano_recipe_config_is_the_preset() -> None:
    path = REPO_ROOT / "configs" / "pretrain" / "mamba2_nano.yaml"
    model = yaml.safe_load(path.read_text())["model"]
    assert ModelConfig(**model) == ModelConfig(**PRESETS["mamba2-nano"])
    llama_nano = count_params(get_preset("mamba2-nano", family="llama", position_type="rope", n_layers=4,
                                         n_heads=4, n_kv_heads=2, ffn_hidden_dim=352))
    assert abs(count_params(ModelConfig(**model))["total"] / llama_nano["total"] - 1) < 0.05


# ---------------------------------------------------------------------------- paged engine
VOCAB = 320  # the fixture tokenizer's
GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("mamba")
    tok = make_tokenizer(root / "tokenizer")
    return {name: save_model(get_preset(name, vocab_size=VOCAB), root / name, tok)
            for name in ("tiny-mamba2", "tiny-mamba2-hybrid")}


def _run(eng: LLMEngine, prompt_list: list[list[int]]) -> list[list[int]]:
    ids = [eng.add_request(p, GREEDY) for p in prompt_list]
    tokens: dict[str, list[int]] = {rid: [] for rid in ids}
    while eng.has_unfinished():
        for out in eng.step():
            tokens[out.request_id] += out.new_token_ids
    return [tokens[rid] for rid in ids]


@pytest.mark.parametrize("name", ["tiny-mamba2", "tiny-mamba2-hybrid"])
def test_engine_chunked_prefill_and_slot_reuse_match_full_forward(name: str, checkpoints, caplog) -> None:
    g = torch.Generator().manual_seed(3)
    plist = [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in (3, 21, 9, 14)]
    model = load_model(checkpoints[name], torch.device("cpu"), torch.float32).model
    expected = [greedy_reference(model, p, GREEDY.max_tokens) for p in plist]
    with caplog.at_level(logging.INFO, logger="inference.engine.llm_engine"):
        # 8 tokens per step: the 21-token prompt is prefilled in 3 chunks from the carried state,
        # beside rows that decode; 2 sequences at a time, so state slots are reused
        eng = LLMEngine(checkpoints[name], device="cpu", dtype="fp32", block_size=4, max_num_seqs=2,
                        max_num_batched_tokens=8)
    assert [r.message for r in caplog.records].count(
        "prefix caching is off: Mamba-2 layers keep their state outside the KV blocks") == 1
    assert not eng.scheduler.block_manager.enable_prefix_caching
    assert _run(eng, plist) == expected
    assert eng.num_free_blocks == eng.num_total_blocks


def test_hybrid_pool_holds_only_the_attention_layers(checkpoints) -> None:
    cfg = load_model(checkpoints["tiny-mamba2-hybrid"], torch.device("cpu"), torch.float32).config
    assert kv_bytes_per_token(cfg, torch.float32) == 1 * 2 * 2 * 16 * 4  # 1 attention layer: k, v of 2 x 16
    assert kv_bytes_per_token(get_preset("tiny-mamba2"), torch.float32) == 0


def test_speculative_decoding_is_refused(checkpoints) -> None:
    from utils.errors import UserError

    with pytest.raises(UserError, match="Mamba-2 layers cannot roll back"):
        LLMEngine(checkpoints["tiny-mamba2"], device="cpu", dtype="fp32",
                  draft_checkpoint=checkpoints["tiny-mamba2-hybrid"])


def test_context_parallel_refuses_mamba_layers() -> None:
    from trainer.context_parallel import check_supported
    from utils.config import TrainingConfig
    from utils.errors import UserError

    with pytest.raises(UserError, match="Mamba-2 layers"):
        check_supported(build_model(get_preset("tiny-mamba2-hybrid")), TrainingConfig())
