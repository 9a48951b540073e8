"""Training data loaders: windows, document ids, packing, determinism, exact resume, DP sharding."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from data_pipeline.chat_loaders import PreferenceLoader, SFTLoader, pack_greedy, sample_labels
from data_pipeline.formats import TokenBinWriter
from data_pipeline.loader import Prefetcher, PretrainLoader, ShardedLoader, document_ids_and_positions, prefetching
from utils.errors import UserError

EOS, PAD = 0, 1
META = dict(vocab_size=1000, tokenizer_hash="h0", eos_id=EOS, pad_id=PAD, created_by="test", source={})


@pytest.fixture
def pretrain_bin(tmp_path):
    """1001 tokens: 2..999 with EOS every 7th position, so windows are recognisable."""
    tokens = np.arange(2, 1003) % 1000
    tokens[::7] = EOS
    base = tmp_path / "train"
    w = TokenBinWriter(base, "uint16", with_offsets=False)
    w.extend(tokens, num_items=int((tokens == EOS).sum()))
    w.close(kind="pretrain", **META)
    return base, tokens


def _take(loader, n):
    return [next(loader) for _ in range(n)]


def _same(a, b):
    return all(set(x) == set(y) and all(torch.equal(x[k], y[k]) for k in x) for x, y in zip(a, b))


def test_pretrain_windows_are_the_stream(pretrain_bin):
    base, tokens = pretrain_bin
    ld = PretrainLoader(base, seq_len=16, batch_size=4, seed=3)
    b = next(ld)
    assert b["input_ids"].shape == (4, 16) and b["input_ids"].dtype == torch.int64
    assert torch.equal(b["input_ids"][:, 1:], b["labels"][:, :-1])
    for row, lab in zip(b["input_ids"], b["labels"]):
        window = np.concatenate([row.numpy(), lab[-1:].numpy()])
        starts = [s for s in range(len(tokens) - 16) if np.array_equal(tokens[s:s + 17], window)]
        assert starts, "every row is a real window of the stream"


def test_pretrain_epoch_visits_every_window_once(pretrain_bin):
    base, _ = pretrain_bin
    ld = PretrainLoader(base, seq_len=10, batch_size=3, seed=0)
    plan = ld._epoch_plan(0)
    assert len(set(plan.tolist())) == len(plan) == (1001 - 1 - plan.min()) // 10
    assert set((plan - plan.min()) % 10) == {0}  # consecutive, non-overlapping windows


def test_pretrain_deterministic_and_seed_dependent(pretrain_bin):
    base, _ = pretrain_bin
    a = _take(PretrainLoader(base, seq_len=8, batch_size=2, seed=1), 5)
    b = _take(PretrainLoader(base, seq_len=8, batch_size=2, seed=1), 5)
    c = _take(PretrainLoader(base, seq_len=8, batch_size=2, seed=2), 5)
    assert _same(a, b) and not _same(a, c)


def test_pretrain_resume_is_exact_across_epochs(pretrain_bin):
    base, _ = pretrain_bin
    kw = dict(seq_len=32, batch_size=4, seed=5, doc_masking=True)
    full = PretrainLoader(base, **kw)
    steps = full.steps_per_epoch()  # 31 windows // 4 = 7
    ref = _take(full, 2 * steps + 3)
    first = PretrainLoader(base, **kw)
    head = _take(first, steps - 2)
    state = first.state_dict()
    resumed = PretrainLoader(base, **kw)
    resumed.load_state_dict(state)
    tail = _take(resumed, len(ref) - len(head))
    assert _same(head + tail, ref)
    assert resumed.epoch == 2


def test_resume_refuses_other_batching(pretrain_bin):
    base, _ = pretrain_bin
    state = PretrainLoader(base, seq_len=8, batch_size=2).state_dict()
    with pytest.raises(UserError, match="seq_len"):
        PretrainLoader(base, seq_len=16, batch_size=2).load_state_dict(state)


def test_dp_ranks_disjoint_and_match_global_batch(pretrain_bin):
    base, _ = pretrain_bin
    one = PretrainLoader(base, seq_len=8, batch_size=6, seed=4)
    ranks = [PretrainLoader(base, seq_len=8, batch_size=2, rank=r, world_size=3, seed=4) for r in range(3)]
    assert one.steps_per_epoch() == ranks[0].steps_per_epoch()
    for _ in range(one.steps_per_epoch()):
        g = next(one)["input_ids"]
        parts = [next(ld)["input_ids"] for ld in ranks]
        assert torch.equal(torch.cat(parts), g)
    seen = [set(map(int, ld._epoch_plan(0)[r * 2::6].tolist())) for r, ld in enumerate(ranks)]
    assert not (seen[0] & seen[1]) and not (seen[0] & seen[2]) and not (seen[1] & seen[2])
    # a world-size-3 run resumes on one process with the same global batch (and vice versa)
    single = PretrainLoader(base, seq_len=8, batch_size=6, seed=4)
    single.load_state_dict(ranks[0].state_dict())
    assert torch.equal(next(single)["input_ids"], torch.cat([next(ld)["input_ids"] for ld in ranks]))
    assert single.epoch == 1


def test_pretrain_sidecar_mismatch_refused(pretrain_bin):
    base, _ = pretrain_bin
    with pytest.raises(UserError, match="vocab_size"):
        PretrainLoader(base, seq_len=8, batch_size=2, vocab_size=512)
    with pytest.raises(UserError, match="another tokenizer"):
        PretrainLoader(base, seq_len=8, batch_size=2, tokenizer_hash="h1")
    with pytest.raises(UserError, match="rank 2"):
        PretrainLoader(base, seq_len=8, batch_size=2, rank=2, world_size=2)


def test_document_ids_and_positions_by_hand():
    x = torch.tensor([[5, 6, EOS, 7, EOS, EOS, 8]])
    out = document_ids_and_positions(x, EOS)
    assert out["doc_ids"].tolist() == [[0, 0, 0, 1, 1, 2, 3]]
    assert out["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 0]]


# ------------------------------------------------------------------------------------------- SFT
@pytest.fixture
def sft_bin(tmp_path):
    """Five samples of lengths 4, 3, 5, 2, 6 with masks marking the last tokens as targets."""
    base = tmp_path / "sft"
    w = TokenBinWriter(base, "uint16", with_mask=True)
    samples = []
    for k, n in enumerate([4, 3, 5, 2, 6]):
        ids = [100 * (k + 1) + j for j in range(n)]
        mask = [0] * (n // 2) + [1] * (n - n // 2)
        w.add([ids], mask)
        samples.append((ids, mask))
    w.close(kind="sft", **META)
    return base, samples


def test_sample_labels_shift_and_mask():
    ids = np.array([10, 11, 12, 13])
    assert sample_labels(ids, np.array([0, 0, 1, 1])).tolist() == [-100, 12, 13, -100]


def test_pack_greedy():
    assert pack_greedy(np.array([4, 3, 5, 2, 6]), 8).tolist() == [[0, 2], [2, 4], [4, 5]]


def test_packed_rows_doc_ids_positions_labels(sft_bin):
    base, samples = sft_bin
    ld = SFTLoader(base, seq_len=8, batch_size=3, shuffle=False)
    b = next(ld)
    assert b["input_ids"][0].tolist() == samples[0][0] + samples[1][0] + [PAD]
    assert b["doc_ids"][0].tolist() == [0, 0, 0, 0, 1, 1, 1, -1]
    assert b["position_ids"][0].tolist() == [0, 1, 2, 3, 0, 1, 2, 0]
    assert b["attention_mask"][0].tolist() == [1] * 7 + [0]
    # sample 0: mask [0,0,1,1] → labels predict tokens 2, 3; sample ends never predict across
    assert b["labels"][0].tolist() == [-100, 102, 103, -100, 201, 202, -100, -100]
    assert b["doc_ids"][2].tolist() == [0] * 6 + [-1, -1]


def test_padded_mode_one_sample_per_row(sft_bin):
    base, samples = sft_bin
    b = next(SFTLoader(base, seq_len=8, batch_size=5, shuffle=False, mode="padded"))
    assert b["input_ids"][3].tolist() == samples[3][0] + [PAD] * 6
    assert b["labels"][3].tolist() == [401] + [-100] * 7  # mask [0, 1]: token 1 is the target
    assert b["labels"][2].tolist() == [-100, 302, 303, 304, -100, -100, -100, -100]


def test_sft_refuses_too_short_seq_len_and_other_tokenizer(sft_bin):
    base, _ = sft_bin
    with pytest.raises(UserError, match="--max_seq_len 5"):
        SFTLoader(base, seq_len=5, batch_size=1)
    with pytest.raises(UserError, match="another tokenizer"):
        SFTLoader(base, seq_len=8, batch_size=1, tokenizer_hash="zzz")


def test_sft_resume_and_sharding(sft_bin):
    base, _ = sft_bin
    kw = dict(seq_len=6, batch_size=1, seed=9)
    ref = _take(SFTLoader(base, **kw), 9)
    a = SFTLoader(base, **kw)
    head = _take(a, 4)
    b = SFTLoader(base, **kw)
    b.load_state_dict(a.state_dict())
    assert _same(head + _take(b, 5), ref)
    r0, r1 = (SFTLoader(base, seq_len=6, batch_size=1, rank=r, world_size=2, seed=9) for r in range(2))
    for _ in range(r0.steps_per_epoch()):
        d0, d1 = next(r0)["input_ids"], next(r1)["input_ids"]
        samples0 = {int(t) // 100 for t in d0.flatten() if t != PAD}
        samples1 = {int(t) // 100 for t in d1.flatten() if t != PAD}
        assert not samples0 & samples1


# ------------------------------------------------------------------------------------ preference
def test_preference_batch(tmp_path):
    base = tmp_path / "pref"
    w = TokenBinWriter(base, "uint16", parts_per_item=3)
    w.add([[10, 11, 12], [20, 21], [30, 31, 32, 33]])
    w.add([[40], [50], [60, 61]])
    w.close(kind="preference", **META)
    b = next(PreferenceLoader(base, batch_size=2, shuffle=False))
    assert b["chosen_input_ids"].shape == b["rejected_input_ids"].shape == (2, 7)
    assert b["chosen_input_ids"][0].tolist() == [10, 11, 12, 20, 21, PAD, PAD]
    assert b["chosen_labels"][0].tolist() == [-100, -100, 20, 21, -100, -100, -100]
    assert b["rejected_labels"][0].tolist() == [-100, -100, 30, 31, 32, 33, -100]
    assert b["rejected_loss_mask"][1].tolist() == [1, 1, 0, 0, 0, 0, 0]
    assert b["chosen_attention_mask"][1].tolist() == [1, 1, 0, 0, 0, 0, 0]
    assert b["prompt_lengths"].tolist() == [3, 1]
    fixed = next(PreferenceLoader(base, batch_size=2, shuffle=False, seq_len=10))
    assert fixed["chosen_input_ids"].shape == (2, 10)
    with pytest.raises(UserError, match="up to 7 tokens"):
        PreferenceLoader(base, batch_size=1, seq_len=6)
    with pytest.raises(UserError, match="fewer than one global batch"):
        next(PreferenceLoader(base, batch_size=2, world_size=2))


class _SizedEpochs(ShardedLoader):
    """Epoch e holds SIZES[e % len(SIZES)] units numbered 100 * e + i: plans of varying size."""

    SIZES = (4, 1, 3, 0, 5)

    def _plan(self, epoch: int) -> np.ndarray:
        return 100 * epoch + np.arange(self.SIZES[epoch % len(self.SIZES)])

    def _batch(self, units: np.ndarray) -> dict[str, torch.Tensor]:
        return {"units": torch.from_numpy(np.stack(units))}

    def _fingerprint(self) -> dict:
        return self._base_fingerprint()


def test_epoch_wrap_uses_the_new_epochs_step_count():
    """Global batch 2 (2 ranks x 1): epoch 0 has 2 steps, epoch 1 (1 unit) none, epoch 2 one
    (its 3rd unit dropped), epoch 3 none, epoch 4 two. Every rank takes the same steps and every
    batch is full (issue 14, defect 2: the old wrap sliced epoch 1 by epoch 0's count)."""
    ranks = [_SizedEpochs(batch_size=1, rank=r, world_size=2, seed=0, shuffle=True) for r in range(2)]
    seen = [[int(next(ld)["units"].item()) for _ in range(7)] for ld in ranks]
    assert seen[0] == [0, 2, 200, 400, 402, 500, 502]
    assert seen[1] == [1, 3, 201, 401, 403, 501, 503]
    resumed = _SizedEpochs(batch_size=1, rank=1, world_size=2, seed=0, shuffle=True)
    probe = _SizedEpochs(batch_size=1, rank=1, world_size=2, seed=0, shuffle=True)
    _take(probe, 2)
    resumed.load_state_dict(probe.state_dict())  # saved at the end of epoch 0
    assert [int(next(resumed)["units"].item()) for _ in range(2)] == [201, 401]


def test_pretrain_epochs_of_varying_window_counts(tmp_path):
    """19 tokens, seq_len 8: an epoch's random offset in [0, 8) gives 2 windows (offset <= 2)
    or 1. With a global batch of 2 the 1-window epochs are passed over, never half-filled."""
    base = tmp_path / "small"
    w = TokenBinWriter(base, "uint16", with_offsets=False)
    w.extend(np.arange(2, 21), num_items=1)
    w.close(kind="pretrain", **META)
    ranks = [PretrainLoader(base, seq_len=8, batch_size=1, rank=r, world_size=2, seed=0) for r in range(2)]
    sizes = {len(ranks[0]._epoch_plan(e)) for e in range(20)}
    assert sizes == {1, 2}  # the data really has epochs of both sizes
    for _ in range(12):
        a, b = next(ranks[0]), next(ranks[1])
        assert a["input_ids"].shape == b["input_ids"].shape == (1, 8)
        assert not torch.equal(a["input_ids"], b["input_ids"])
        assert (ranks[0].epoch, ranks[0].step) == (ranks[1].epoch, ranks[1].step)


def test_unshuffled_epoch_too_small_is_a_clear_error(pretrain_bin):
    base, _ = pretrain_bin
    ld = PretrainLoader(base, seq_len=100, batch_size=11, shuffle=False)
    with pytest.raises(UserError, match="fewer than one global batch"):
        next(ld)


def test_prefetcher_is_the_loader_with_exact_state(pretrain_bin):
    """data.num_workers (issue 14, defect 7): batches built ahead in threads are the loader's own,
    in order, and the state is the position after the last batch handed out, across epochs."""
    base, _ = pretrain_bin
    plain = PretrainLoader(base, seq_len=16, batch_size=4, seed=5, doc_masking=True)
    ahead = Prefetcher(PretrainLoader(base, seq_len=16, batch_size=4, seed=5, doc_masking=True), num_workers=2)
    try:
        for _ in range(40):  # 15 steps an epoch: crosses two epoch boundaries
            assert _same([next(ahead)], [next(plain)])
            assert ahead.state_dict() == plain.state_dict()
        assert ahead.loader.step != plain.step  # it really is ahead
        assert ahead.steps_per_epoch() == plain.steps_per_epoch()  # other attributes are the loader's
        saved = plain.state_dict()
        _take(ahead, 3)
        ahead.load_state_dict(saved)  # what was built ahead is dropped
        resumed = PretrainLoader(base, seq_len=16, batch_size=4, seed=5, doc_masking=True)
        resumed.load_state_dict(saved)
        assert _same(_take(ahead, 20), _take(resumed, 20))
    finally:
        ahead.close()


def test_prefetching_wraps_only_token_bin_loaders(pretrain_bin):
    base, _ = pretrain_bin
    ld = PretrainLoader(base, seq_len=16, batch_size=4)
    assert prefetching(ld, 0) is ld
    other = iter([{"x": torch.zeros(1)}])
    assert prefetching(other, 2) is other
    wrapped = prefetching(ld, 1)
    assert isinstance(wrapped, Prefetcher) and wrapped.loader is ld
    wrapped.close()
