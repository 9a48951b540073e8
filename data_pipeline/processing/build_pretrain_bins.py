"""Step 4 of the data pipeline: split the encoded stories into pretraining train/val bins.

Reads `<data_dir>/encoded/stories.*` (from encode_stories.py), splits the stories by document
into train and validation deterministically (`--val_fraction`, `--seed`) and writes
`<data_dir>/pretrain/{train,val}.bin` — a flat token stream with EOS closing every document,
as in nanoGPT's `train.bin` — plus `{train,val}.json` sidecars (dtype, vocab size, token and
document counts, tokenizer hash) that the training loader checks before use.

    python data_pipeline/processing/build_pretrain_bins.py [--data_dir data] [--val_fraction 0.02] [--seed 1337]
"""
from __future__ import annotations

import argparse
import time
from contextlib import ExitStack

import numpy as np

from data_pipeline.formats import (COMMANDS, SPLITS, TokenBin, TokenBinWriter, bin_nbytes, check_compatible,
                                   sidecar_path)
from data_pipeline.processing.common import (add_data_dir_arg, layout_from, load_tokenizer, progress,
                                             source_entry, split_indices, summary)
from utils.errors import UserError, cli_main

CHUNK_DOCS = 65536  # documents copied per step


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_data_dir_arg(p)
    p.add_argument("--val_fraction", type=float, default=0.02, help="fraction of documents held out (default 0.02)")
    p.add_argument("--seed", type=int, default=1337, help="seed of the train/val split")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    layout = layout_from(args)
    _, tok_hash = load_tokenizer(layout)
    enc = TokenBin(layout.encoded_stories, "encoded")
    check_compatible(enc.sidecar, sidecar_path(layout.encoded_stories), tokenizer_hash=tok_hash)
    t0 = time.perf_counter()
    n_docs = len(enc)
    if n_docs < 2:
        raise UserError(f"{layout.encoded_stories}.bin holds {n_docs} document(s); at least 2 are needed "
                        f"for a train/val split: check the raw data and rerun `{COMMANDS['encoded']}`")
    train_idx, val_idx = split_indices(n_docs, args.val_fraction, args.seed)
    is_val = np.zeros(n_docs, dtype=bool)
    is_val[val_idx] = True

    source = source_entry(layout, layout.encoded_stories)
    with ExitStack() as stack:
        writers = {s: stack.enter_context(TokenBinWriter(layout.pretrain(s), enc.sidecar.dtype, with_offsets=False))
                   for s in SPLITS}
        bar = progress(n_docs, "split", unit="doc")
        lengths = np.diff(enc.offsets)
        for a in range(0, n_docs, CHUNK_DOCS):
            b = min(a + CHUNK_DOCS, n_docs)
            tokens = np.asarray(enc.tokens[enc.offsets[a]:enc.offsets[b]])
            token_is_val = np.repeat(is_val[a:b], lengths[a:b])
            n_val = int(is_val[a:b].sum())
            writers["train"].extend(tokens[~token_is_val], (b - a) - n_val)
            writers["val"].extend(tokens[token_is_val], n_val)
            bar.update(b - a)
        bar.close()
        for split, w in writers.items():
            w.close(kind="pretrain", vocab_size=enc.sidecar.vocab_size, tokenizer_hash=tok_hash,
                    eos_id=enc.sidecar.eos_id, pad_id=enc.sidecar.pad_id, created_by=COMMANDS["pretrain"],
                    source={**source, "split": split, "val_fraction": args.val_fraction, "seed": args.seed})
    tokens_total = sum(w.num_tokens for w in writers.values())
    nbytes = sum(bin_nbytes(layout.pretrain(s)) for s in SPLITS)
    summary("build_pretrain_bins", n_docs, "documents", tokens_total, nbytes, time.perf_counter() - t0,
            f"train {len(train_idx):,} docs / {writers['train'].num_tokens:,} tokens, "
            f"val {len(val_idx):,} docs / {writers['val'].num_tokens:,} tokens -> {layout.root / 'pretrain'}")


if __name__ == "__main__":
    cli_main(main)
