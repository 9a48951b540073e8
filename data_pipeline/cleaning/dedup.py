"""Remove duplicate documents: exact (hash of whitespace-normalised text), then near (MinHash-LSH).

Exact: two documents are duplicates when their texts are equal after collapsing runs of
whitespace. Near: two documents are duplicates when the Jaccard similarity of their word
5-gram sets is at least `threshold`, found with MinHash + LSH banding (Broder 1997; see
`minhash.py`) and confirmed on the MinHash estimate; duplicates are grouped by connected
components (union-find) and the first document of each group is kept, as in Lee et al. 2022,
"Deduplicating Training Data Makes Language Models Better".

    python data_pipeline/cleaning/dedup.py --input data/raw/tinystories.txt --output data/raw/dedup.txt [--threshold 0.8]
"""
from __future__ import annotations

import argparse
import hashlib
import time
from dataclasses import dataclass

import numpy as np

from data_pipeline.cleaning.documents import read_documents, write_documents
from data_pipeline.cleaning.minhash import (
    estimated_jaccard,
    lsh_candidate_pairs,
    minhash_signatures,
    optimal_bands_rows,
)
from utils.errors import UserError, cli_main
from utils.paths import resolve_path


def normalize_whitespace(text: str) -> str:
    return " ".join(text.split())


def exact_dedup_indices(docs: list[str]) -> list[int]:
    """Indices of the first occurrence of every distinct (whitespace-normalised) document."""
    seen: set[bytes] = set()
    keep = []
    for i, d in enumerate(docs):
        key = hashlib.blake2b(normalize_whitespace(d).encode("utf-8"), digest_size=16).digest()
        if key not in seen:
            seen.add(key)
            keep.append(i)
    return keep


def exact_dedup(docs: list[str]) -> tuple[list[str], int]:
    """(documents without exact duplicates, in order; how many were removed)."""
    keep = exact_dedup_indices(docs)
    return [docs[i] for i in keep], len(docs) - len(keep)


@dataclass(frozen=True)
class NearDuplicates:
    """What near-duplicate detection found."""

    keep: list[int]          # indices kept (the first document of each group)
    pairs: np.ndarray        # (K, 2) confirmed pairs i < j with estimated Jaccard >= threshold
    estimates: np.ndarray    # (K,) their estimated Jaccard similarity
    bands: int
    rows: int


def _union_find_roots(n: int, pairs: np.ndarray) -> np.ndarray:
    """Smallest index in each document's connected component."""
    parent = list(range(n))

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for i, j in pairs.tolist():
        ri, rj = find(i), find(j)
        if ri != rj:
            parent[max(ri, rj)] = min(ri, rj)
    return np.array([find(x) for x in range(n)], dtype=np.int64)


def find_near_duplicates(docs: list[str], threshold: float = 0.8, num_perm: int = 128, ngram: int = 5,
                         seed: int = 0) -> NearDuplicates:
    """MinHash-LSH near-duplicate detection on word `ngram`-shingles."""
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"threshold must be in (0, 1), got {threshold}")
    bands, rows = optimal_bands_rows(threshold, num_perm)
    if not docs:
        return NearDuplicates([], np.zeros((0, 2), dtype=np.int64), np.zeros(0), bands, rows)
    sig = minhash_signatures(docs, num_perm=num_perm, ngram=ngram, seed=seed)   # (N, P)
    # Identical signatures (e.g. repeated documents) are one LSH entry, so a document repeated
    # many times does not make a quadratic number of candidate pairs.
    _, first, group = np.unique(sig, axis=0, return_index=True, return_inverse=True)
    group = group.ravel()
    same = np.flatnonzero(first[group] != np.arange(len(docs)))
    same_pairs = np.stack([first[group[same]], same], axis=1)
    uniq = np.sort(first)
    cand = uniq[lsh_candidate_pairs(sig[uniq], bands, rows)]                   # (K, 2) doc ids
    est = estimated_jaccard(sig, cand)
    ok = est >= threshold
    pairs = np.concatenate([same_pairs, cand[ok]]).astype(np.int64).reshape(-1, 2)
    estimates = np.concatenate([np.ones(len(same_pairs)), est[ok]])
    roots = _union_find_roots(len(docs), pairs)
    keep = np.flatnonzero(roots == np.arange(len(docs))).tolist()
    return NearDuplicates(keep, pairs, estimates, bands, rows)


def near_dedup(docs: list[str], threshold: float = 0.8, num_perm: int = 128, ngram: int = 5,
               seed: int = 0) -> tuple[list[str], int]:
    """(documents without near duplicates, in order; how many were removed)."""
    keep = find_near_duplicates(docs, threshold, num_perm, ngram, seed).keep
    return [docs[i] for i in keep], len(docs) - len(keep)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--input", required=True, help="documents separated by lines <|endoftext|>")
    p.add_argument("--output", required=True, help="where to write the kept documents (same format)")
    p.add_argument("--threshold", type=float, default=0.8, help="Jaccard similarity of near duplicates")
    p.add_argument("--num_perm", type=int, default=128, help="MinHash signature length")
    p.add_argument("--ngram", type=int, default=5, help="words per shingle")
    p.add_argument("--exact_only", action="store_true", help="skip near-duplicate removal")
    p.add_argument("--seed", type=int, default=0, help="seed of the MinHash hash functions")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if not 0.0 < args.threshold < 1.0:
        raise UserError(f"--threshold must be between 0 and 1 (exclusive), got {args.threshold}")
    if args.num_perm < 2 or args.ngram < 1:
        raise UserError(f"--num_perm must be >= 2 and --ngram >= 1 (got {args.num_perm}, {args.ngram})")
    src, dst = resolve_path(args.input), resolve_path(args.output)
    t0 = time.perf_counter()
    docs = read_documents(src)
    kept, n_exact = exact_dedup(docs)
    n_near, bands_rows = 0, ""
    if not args.exact_only:
        found = find_near_duplicates(kept, args.threshold, args.num_perm, args.ngram, args.seed)
        n_near = len(kept) - len(found.keep)
        kept = [kept[i] for i in found.keep]
        bands_rows = f" (LSH {found.bands} bands x {found.rows} rows)"
    n_bytes = write_documents(dst, kept)
    words = sum(len(d.split()) for d in kept)
    print(f"dedup: {len(docs):,} -> {len(kept):,} documents, removed {n_exact:,} exact and {n_near:,} "
          f"near duplicates at Jaccard >= {args.threshold}{bands_rows}, ~{words:,} words, "
          f"{n_bytes:,} bytes, {time.perf_counter() - t0:.1f}s -> {dst}")


if __name__ == "__main__":
    cli_main(main)
