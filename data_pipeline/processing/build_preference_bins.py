"""Step 6 of the data pipeline: preference pairs (prompt / chosen / rejected) for DPO-style training.

Source: the built-in preference pairs (default) or `--input`, a JSON array or JSON Lines file
(optionally gzipped) in one of three forms, detected from the first record:
  HH-RLHF        {"chosen", "rejected"}: whole "\\n\\nHuman: … \\n\\nAssistant: …" transcripts
                 (Bai et al. 2022). The prompt is the shared part up to and including the last
                 "Assistant:" before the two differ; what follows are the two replies.
  conversations  {"conversations": [{"from", "value"}], "chosen": {"from", "value"},
                 "rejected": {"from", "value"}, "system"?} (ShareGPT-style, as LLaMA-Factory)
  prompt         {"prompt", "chosen", "rejected"} plain strings (single turn)
The prompt goes through the chat template with the generation header; each reply is its text
plus <|im_end|>. Pairs whose prompt leaves no room under `--max_seq_len` are dropped, longer
replies truncated keeping <|im_end|>; HH pairs that cannot be split are skipped; all counted.
Writes `<data_dir>/preference/{train,val}.{bin,idx,json}`: per pair three token spans.

    python data_pipeline/processing/build_preference_bins.py [--data_dir data] [--input pairs.jsonl.gz]
"""
from __future__ import annotations

import argparse
import re
import time
from collections import Counter
from os.path import commonprefix
from pathlib import Path
from typing import Optional

from data_pipeline.builtin import generate_preferences
from data_pipeline.chat import ChatTokenizer, Message, check_messages, encode_prompt, encode_response
from data_pipeline.formats import COMMANDS, SPLITS, TokenBinWriter, bin_nbytes, file_sha256, token_dtype
from data_pipeline.processing.common import (add_chat_bin_args, check_fields, check_max_seq_len, layout_from,
                                             load_tokenizer,
                                             progress, read_records, sharegpt_messages, split_indices, summary,
                                             text_field)
from utils.errors import UserError, cli_main
from utils.paths import resolve_path

Pair = tuple[list[Message], str, str]  # (prompt messages, chosen reply, rejected reply)
HH_ASSISTANT = "\n\nAssistant:"
_HH_TURN = re.compile(r"\n\n(Human|Assistant):")


def parse_hh_transcript(text: str) -> list[Message]:
    """"\\n\\nHuman: a\\n\\nAssistant: b" → [{user: a}, {assistant: b}] (ValueError if malformed)."""
    parts = _HH_TURN.split(text)
    if parts[0].strip():
        raise ValueError("text before the first Human:/Assistant: turn")
    roles = {"Human": "user", "Assistant": "assistant"}
    return [{"role": roles[parts[k]], "content": parts[k + 1].strip()} for k in range(1, len(parts), 2)]


def split_hh(chosen: str, rejected: str) -> Pair:
    """Split an HH-RLHF pair at the last "Assistant:" of the shared prefix (ValueError why not)."""
    shared = len(commonprefix([chosen, rejected]))
    cut = chosen.rfind(HH_ASSISTANT, 0, shared)
    if cut < 0:
        raise ValueError("no shared Assistant: turn")
    end = cut + len(HH_ASSISTANT)
    prompt = parse_hh_transcript(chosen[:cut])
    replies = chosen[end:].strip(), rejected[end:].strip()
    if not all(replies):
        raise ValueError("an empty reply")
    if any(_HH_TURN.search(r) for r in replies):
        raise ValueError("the replies differ before the last turn")
    if replies[0] == replies[1]:
        raise ValueError("identical replies")
    check_messages(prompt, last_role="user")
    return prompt, replies[0], replies[1]


def detect_format(record: dict) -> str:
    if "conversations" in record:
        return "conversations"
    if "prompt" in record:
        return "prompt"
    if "chosen" in record and "rejected" in record:
        return "hh"
    raise UserError(f"record 0 has fields {sorted(record)}; expected HH-RLHF (chosen, rejected), "
                    "conversations (conversations, chosen, rejected) or prompt (prompt, chosen, rejected)")


def _reply(value: object, i: int, side: str, fmt: str) -> str:
    if fmt == "conversations":
        ok = isinstance(value, dict) and set(value) == {"from", "value"} and value["from"] in ("gpt", "assistant")
        if not ok or not isinstance(value["value"], str):
            raise UserError(f"record {i}: {side} must be {{\"from\": \"gpt\", \"value\": <text>}}")
        return value["value"]
    return text_field(value, i, side)


def to_pair(record: dict, i: int, fmt: str) -> Pair:
    """One record as (prompt messages, chosen, rejected); HH records that cannot be split raise
    ValueError (skipped and counted by the caller), everything else malformed is a UserError."""
    if fmt == "hh":
        check_fields(record, i, "HH-RLHF", {"chosen", "rejected"}, set())
        return split_hh(_reply(record["chosen"], i, "chosen", fmt), _reply(record["rejected"], i, "rejected", fmt))
    if fmt == "conversations":
        check_fields(record, i, "conversations", {"conversations", "chosen", "rejected"}, {"system"})
        prompt = sharegpt_messages(record["conversations"], i)
        if record.get("system"):
            prompt = [{"role": "system", "content": text_field(record["system"], i, "system")}] + prompt
    else:
        check_fields(record, i, "prompt", {"prompt", "chosen", "rejected"}, set())
        prompt = [{"role": "user", "content": _reply(record["prompt"], i, "prompt", fmt)}]
    try:
        check_messages(prompt, last_role="user")
    except ValueError as e:
        raise UserError(f"record {i}: prompt: {e}") from None
    return prompt, _reply(record["chosen"], i, "chosen", fmt), _reply(record["rejected"], i, "rejected", fmt)


def load_pairs(input_path: Optional[Path], num_builtin: int, seed: int) -> tuple[list[Pair], Counter, dict]:
    """All pairs, the skip reasons counted, and how the sidecar describes the source."""
    if input_path is None:
        records, fmt = generate_preferences(num_builtin, seed), "prompt"
        source = {"input": "builtin", "num_pairs": num_builtin, "builtin_seed": seed}
    else:
        records = read_records(input_path)
        fmt = detect_format(records[0])
        source = {"input": str(input_path), "format": fmt, "sha256": file_sha256(input_path)}
    pairs, skipped = [], Counter()
    for i, r in enumerate(records):
        try:
            pairs.append(to_pair(r, i, fmt))
        except ValueError as e:  # only HH transcripts are skipped; other problems are UserErrors
            skipped[str(e)] += 1
    if not pairs:
        raise UserError(f"no usable preference pair in {input_path} ({dict(skipped)})")
    return pairs, skipped, source


def encode_pair(ct: ChatTokenizer, pair: Pair, max_len: int) -> Optional[tuple[list[list[int]], bool]]:
    """[prompt, chosen, rejected] ids with prompt + reply <= max_len (replies cut keeping
    <|im_end|>), and whether a reply was cut; None when the prompt leaves no room for a reply."""
    prompt = encode_prompt(ct, pair[0])
    room = max_len - len(prompt)
    if room < 2:
        return None
    replies = [encode_response(ct, r) for r in pair[1:]]
    cut = [r if len(r) <= room else r[:room - 1] + [ct.im_end_id] for r in replies]
    return [prompt, *cut], cut != replies


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_chat_bin_args(p, "HH-RLHF / conversations / prompt-form JSON or JSONL, optionally .gz (default: built-in)",
                      "longest prompt + reply in tokens", "pairs")
    p.add_argument("--num_pairs", type=int, default=1000, help="built-in pairs")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    layout = layout_from(args)
    check_max_seq_len(args.max_seq_len)
    ct, tok_hash = load_tokenizer(layout)
    t0 = time.perf_counter()
    input_path = resolve_path(args.input) if args.input else None
    pairs, skipped, source = load_pairs(input_path, args.num_pairs, args.seed)
    train_idx, val_idx = split_indices(len(pairs), args.val_fraction, args.seed)

    dtype = token_dtype(ct.vocab_size)
    totals = Counter()
    bar = progress(len(pairs), "encode", unit="pair")
    for split, idx in (("train", train_idx), ("val", val_idx)):
        with TokenBinWriter(layout.preference(split), dtype, parts_per_item=3) as w:
            stats = Counter({"truncated": 0, "dropped": 0})
            for i in idx:
                enc = encode_pair(ct, pairs[i], args.max_seq_len)
                bar.update(1)
                if enc is None:
                    stats["dropped"] += 1
                    continue
                parts, truncated = enc
                stats["truncated"] += truncated
                w.add(parts)
            if len(idx) and w.num_items == 0:
                raise UserError(f"no {split} pair is left: every prompt is longer than --max_seq_len "
                                f"{args.max_seq_len}")
            w.close(kind="preference", vocab_size=ct.vocab_size, tokenizer_hash=tok_hash, eos_id=ct.eos_id,
                    pad_id=ct.pad_id, created_by=COMMANDS["preference"],
                    stats={**stats, "input_skipped": dict(skipped)},
                    source={**source, "split": split, "max_seq_len": args.max_seq_len,
                            "val_fraction": args.val_fraction, "seed": args.seed})
        totals.update({"pairs": w.num_items, "tokens": w.num_tokens, **stats})
    bar.close()
    reasons = "; ".join(f"{k}: {v}" for k, v in skipped.items())
    skip_note = f", {sum(skipped.values()):,} skipped ({reasons})" if skipped else ""
    summary("build_preference_bins", totals["pairs"], "pairs", totals["tokens"],
            sum(bin_nbytes(layout.preference(s)) for s in SPLITS), time.perf_counter() - t0,
            f"{totals['truncated']:,} truncated to {args.max_seq_len}, {totals['dropped']:,} dropped "
            f"(prompt too long){skip_note} -> {layout.root / 'preference'}")


if __name__ == "__main__":
    cli_main(main)
