"""Replace personal data with typed placeholders: [EMAIL], [PHONE], [IP], [CREDIT_CARD], [IBAN].

The detectors (regular expressions + Luhn / mod-97 / address checks) are in `pii.py`. As a
script it cleans a file of documents separated by lines `<|endoftext|>`:

    python data_pipeline/cleaning/scrub_pii.py --input data/raw/tinystories.txt --output data/raw/scrubbed.txt
"""
from __future__ import annotations

import argparse
import time

from data_pipeline.cleaning.documents import read_documents, write_documents
from data_pipeline.cleaning.pii import DETECTORS, PLACEHOLDERS, longest_valid_prefix
from utils.errors import cli_main
from utils.paths import resolve_path


def scrub_pii(text: str) -> tuple[str, dict[str, int]]:
    """(text with personal data replaced, how many of each kind were replaced).

    The counts always hold every kind: email, phone, ip, credit_card, iban.
    """
    counts = {kind: 0 for kind in PLACEHOLDERS}
    for kind, pattern, valid, trim in DETECTORS:

        def replace(m, kind=kind, valid=valid, trim=trim) -> str:
            found = m.group(0)
            if valid is not None:
                hit = longest_valid_prefix(found, valid) if trim else (found if valid(found) else None)
            else:
                hit = found
            if hit is None:
                return found
            counts[kind] += 1
            return PLACEHOLDERS[kind] + found[len(hit):]

        text = pattern.sub(replace, text)
    return text, counts


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--input", required=True, help="documents separated by lines <|endoftext|>")
    p.add_argument("--output", required=True, help="where to write the scrubbed documents (same format)")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    src, dst = resolve_path(args.input), resolve_path(args.output)
    t0 = time.perf_counter()
    docs = read_documents(src)
    total = {kind: 0 for kind in PLACEHOLDERS}
    out, changed = [], 0
    for d in docs:
        clean, counts = scrub_pii(d)
        changed += clean != d
        out.append(clean)
        for k, v in counts.items():
            total[k] += v
    n_bytes = write_documents(dst, out)
    kinds = ", ".join(f"{k} {v:,}" for k, v in total.items())
    print(f"scrub_pii: {len(docs):,} documents, {changed:,} changed, {sum(total.values()):,} replaced "
          f"({kinds}), ~{sum(len(d.split()) for d in out):,} words, {n_bytes:,} bytes, "
          f"{time.perf_counter() - t0:.1f}s -> {dst}")


if __name__ == "__main__":
    cli_main(main)
