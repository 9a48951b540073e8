"""Step 5 of the data pipeline: chat-formatted SFT bins with a per-token loss mask.

Source: the built-in instruction and multi-turn conversation data (default) or `--input`, a
JSON array or JSON Lines file (optionally gzipped) in one of three formats, detected from the
first record:
  Alpaca    {"instruction", "input"?, "output", "system"?}
  ShareGPT  {"conversations": [{"from": "human"|"gpt"|"system", "value"}], "system"?}
  OpenAI    {"messages": [{"role": "system"|"user"|"assistant", "content"}]}
Every conversation goes through the one chat template (`data_pipeline/chat.py`); targets are
the assistant turns and their closing <|im_end|>. Samples over `--max_seq_len` tokens are
truncated keeping the closing <|im_end|> (counted); samples left without any target are
dropped (counted). Writes `<data_dir>/sft/{train,val}.{bin,mask,idx,json}`.

    python data_pipeline/processing/build_sft_bins.py [--data_dir data] [--input file.json] [--max_seq_len 512]
"""
from __future__ import annotations

import argparse
import time
from collections import Counter
from pathlib import Path
from typing import Optional

from data_pipeline.builtin import generate_conversations, generate_instructions
from data_pipeline.chat import Message, check_messages, encode_chat
from data_pipeline.formats import COMMANDS, SPLITS, TokenBinWriter, bin_nbytes, file_sha256, token_dtype
from data_pipeline.processing.common import (add_chat_bin_args, check_fields, check_max_seq_len, layout_from,
                                             load_tokenizer,
                                             progress, read_records, sharegpt_messages, split_indices, summary,
                                             text_field)
from utils.errors import UserError, cli_main
from utils.paths import resolve_path

FORMATS = "Alpaca (instruction, input, output), ShareGPT (conversations) or OpenAI (messages)"


def detect_format(record: dict) -> str:
    if "messages" in record:
        return "openai"
    if "conversations" in record:
        return "sharegpt"
    if "instruction" in record:
        return "alpaca"
    raise UserError(f"record 0 has fields {sorted(record)}; expected {FORMATS}")


def to_messages(record: dict, i: int, fmt: str) -> list[Message]:
    """One input record as a validated conversation (UserError naming the record otherwise)."""
    if fmt == "alpaca":
        check_fields(record, i, "Alpaca", {"instruction", "output"}, {"input", "system"})
        prompt = text_field(record["instruction"], i, "instruction")
        extra = text_field(record.get("input", ""), i, "input")
        if extra.strip():
            prompt = f"{prompt}\n\n{extra}"
        msgs = [{"role": "user", "content": prompt},
                {"role": "assistant", "content": text_field(record["output"], i, "output")}]
    elif fmt == "sharegpt":
        check_fields(record, i, "ShareGPT", {"conversations"}, {"system"})
        msgs = sharegpt_messages(record["conversations"], i)
    else:
        check_fields(record, i, "OpenAI messages", {"messages"}, set())
        if not isinstance(record["messages"], list) or not all(isinstance(m, dict) for m in record["messages"]):
            raise UserError(f"record {i}: messages must be a list of {{role, content}} objects")
        msgs = [dict(m) for m in record["messages"]]
    system = record.get("system")
    if system and fmt != "openai":
        msgs = [{"role": "system", "content": text_field(system, i, "system")}] + msgs
    try:
        check_messages(msgs)
    except ValueError as e:
        raise UserError(f"record {i}: {e}") from None
    return msgs


def load_conversations(input_path: Optional[Path], num_instructions: int, num_conversations: int,
                       seed: int) -> tuple[list[list[Message]], dict]:
    """All conversations to encode, and how the sidecar describes their source."""
    if input_path is None:
        instructions = generate_instructions(num_instructions, seed)
        convs = [to_messages(r, i, "alpaca") for i, r in enumerate(instructions)]
        convs += [to_messages(r, i, "openai") for i, r in enumerate(generate_conversations(num_conversations, seed))]
        return convs, {"input": "builtin", "num_instructions": num_instructions,
                       "num_conversations": num_conversations, "builtin_seed": seed}
    records = read_records(input_path)
    fmt = detect_format(records[0])
    convs = [to_messages(r, i, fmt) for i, r in enumerate(records)]
    return convs, {"input": str(input_path), "format": fmt, "sha256": file_sha256(input_path)}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_chat_bin_args(p, "Alpaca / ShareGPT / OpenAI-messages JSON or JSONL, optionally .gz (default: built-in data)",
                      "longest sample in tokens; longer ones are truncated", "samples")
    p.add_argument("--num_instructions", type=int, default=2000, help="built-in single-turn samples")
    p.add_argument("--num_conversations", type=int, default=500, help="built-in multi-turn samples")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    layout = layout_from(args)
    check_max_seq_len(args.max_seq_len)
    ct, tok_hash = load_tokenizer(layout)
    t0 = time.perf_counter()
    input_path = resolve_path(args.input) if args.input else None
    convs, source = load_conversations(input_path, args.num_instructions, args.num_conversations, args.seed)
    train_idx, val_idx = split_indices(len(convs), args.val_fraction, args.seed)

    dtype = token_dtype(ct.vocab_size)
    totals: Counter = Counter()
    bar = progress(len(convs), "encode", unit="sample")
    for split, idx in (("train", train_idx), ("val", val_idx)):
        with TokenBinWriter(layout.sft(split), dtype, with_mask=True) as w:
            stats = Counter({"target_tokens": 0, "truncated": 0, "dropped": 0})
            for i in idx:
                enc = encode_chat(ct, convs[i], args.max_seq_len)
                bar.update(1)
                if enc is None:
                    stats["dropped"] += 1
                    continue
                ids, mask, truncated = enc
                stats.update(truncated=int(truncated), target_tokens=sum(mask))
                w.add([ids], mask)
            if len(idx) and w.num_items == 0:
                raise UserError(f"no {split} sample is left: every one has a prompt longer than "
                                f"--max_seq_len {args.max_seq_len}")
            w.close(kind="sft", vocab_size=ct.vocab_size, tokenizer_hash=tok_hash, eos_id=ct.eos_id,
                    pad_id=ct.pad_id, created_by=COMMANDS["sft"], stats=dict(stats),
                    source={**source, "split": split, "max_seq_len": args.max_seq_len,
                            "val_fraction": args.val_fraction, "seed": args.seed})
        totals.update(samples=w.num_items, tokens=w.num_tokens, **stats)
    bar.close()
    summary("build_sft_bins", totals["samples"], "samples", totals["tokens"],
            sum(bin_nbytes(layout.sft(s)) for s in SPLITS), time.perf_counter() - t0,
            f"{totals['target_tokens']:,} target tokens, {totals['truncated']:,} truncated to "
            f"{args.max_seq_len}, {totals['dropped']:,} dropped (prompt too long) -> {layout.root / 'sft'}")


if __name__ == "__main__":
    cli_main(main)
