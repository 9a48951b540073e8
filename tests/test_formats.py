"""On-disk token bins: round trips, sidecar checks, refusal of broken or foreign bins."""
from __future__ import annotations

import json

import numpy as np
import pytest

from data_pipeline.formats import (BinSidecar, DataLayout, TokenBin, TokenBinWriter, check_compatible,
                                   sidecar_path, token_dtype)
from utils.errors import UserError

META = dict(vocab_size=300, tokenizer_hash="abc123", eos_id=0, pad_id=1, created_by="test", source={"x": 1})


def test_token_dtype_boundary():
    assert token_dtype(4096) == "uint16"
    assert token_dtype(65535) == "uint16"
    assert token_dtype(65536) == "uint32"


def test_layout_paths(tmp_path):
    lay = DataLayout(tmp_path)
    assert lay.pretrain("train") == tmp_path / "pretrain" / "train"
    assert lay.encoded_stories == tmp_path / "encoded" / "stories"
    assert lay.raw_stories == tmp_path / "raw" / "tinystories.txt"


def test_roundtrip_items_with_mask(tmp_path):
    base = tmp_path / "sft" / "train"
    w = TokenBinWriter(base, "uint16", with_mask=True)
    w.add([[5, 6, 7]], [0, 1, 1])
    w.add([[8, 9]], [1, 0])
    sc = w.close(kind="sft", **META)
    assert (sc.num_tokens, sc.num_items, sc.dtype) == (5, 2, "uint16")
    assert sorted(p.name for p in base.parent.iterdir()) == ["train.bin", "train.idx", "train.json", "train.mask"]
    assert base.with_suffix(".bin").stat().st_size == 5 * 2
    b = TokenBin(base, "sft")
    assert b.offsets.tolist() == [0, 3, 5]
    assert b.item(1).tolist() == [8, 9]
    assert b.mask.tolist() == [0, 1, 1, 1, 0]
    assert b.item_lengths().tolist() == [3, 2]
    assert b.sidecar.source == {"x": 1}


def test_roundtrip_three_parts_uint32(tmp_path):
    base = tmp_path / "pref"
    w = TokenBinWriter(base, token_dtype(70000), parts_per_item=3)
    w.add([[1, 2], [69999], [3, 4, 5]])
    w.add([[6], [7, 8], [9]])
    w.close(kind="preference", **{**META, "vocab_size": 70000})
    b = TokenBin(base, "preference")
    assert b.tokens.dtype == np.dtype("<u4")
    assert b.item(0, 1).tolist() == [69999]
    assert b.span(1, 2) == (9, 10)
    assert b.item_lengths().tolist() == [6, 4]


def test_stream_extend_without_offsets(tmp_path):
    base = tmp_path / "train"
    w = TokenBinWriter(base, "uint16", with_offsets=False)
    w.extend(np.array([1, 2, 0, 3, 0]), num_items=2)
    sc = w.close(kind="pretrain", **META)
    assert (sc.num_items, sc.num_tokens, sc.has_offsets) == (2, 5, False)
    assert not (tmp_path / "train.idx").exists()
    assert TokenBin(base, "pretrain").tokens.tolist() == [1, 2, 0, 3, 0]
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def _one_bin(tmp_path, kind="encoded"):
    base = tmp_path / "stories"
    w = TokenBinWriter(base, "uint16")
    w.add([[4, 5, 0]])
    w.close(kind=kind, **META)
    return base


def test_missing_sidecar_names_the_command(tmp_path):
    with pytest.raises(UserError, match="encode_stories.py"):
        TokenBin(tmp_path / "nothing", "encoded")


def test_wrong_kind_refused(tmp_path):
    with pytest.raises(UserError, match="'encoded' bin, expected 'pretrain'"):
        TokenBin(_one_bin(tmp_path), "pretrain")


def test_truncated_bin_refused(tmp_path):
    base = _one_bin(tmp_path)
    with open(base.with_suffix(".bin"), "r+b") as f:
        f.truncate(4)
    with pytest.raises(UserError, match="does not match its sidecar"):
        TokenBin(base, "encoded")


def test_unknown_sidecar_field_refused(tmp_path):
    base = _one_bin(tmp_path)
    side = sidecar_path(base)
    d = json.loads(side.read_text())
    d["surprise"] = 1
    side.write_text(json.dumps(d))
    with pytest.raises(UserError, match="surprise"):
        TokenBin(base, "encoded")


def test_compatibility_checks(tmp_path):
    base = _one_bin(tmp_path)
    TokenBin(base, "encoded", vocab_size=512, tokenizer_hash="abc123")  # larger model vocab is fine
    with pytest.raises(UserError, match="vocab_size 300 but the model has vocab_size 256"):
        TokenBin(base, "encoded", vocab_size=256)
    with pytest.raises(UserError, match="another tokenizer"):
        TokenBin(base, "encoded", tokenizer_hash="def456")
    sc = BinSidecar(kind="sft", dtype="uint16", num_tokens=0, num_items=0, **META)
    with pytest.raises(UserError, match="build_sft_bins.py"):
        check_compatible(sc, tmp_path, tokenizer_hash="other")


def test_failed_write_keeps_the_previous_bin(tmp_path):
    base = _one_bin(tmp_path)
    with pytest.raises(RuntimeError):
        with TokenBinWriter(base, "uint16") as w:
            w.add([[7, 7, 7, 7]])
            raise RuntimeError("crash mid-write")
    assert TokenBin(base, "encoded").tokens.tolist() == [4, 5, 0]
    assert not list(tmp_path.glob("*.tmp"))
