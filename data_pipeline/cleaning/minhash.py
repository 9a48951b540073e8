"""MinHash signatures and locality-sensitive hashing (LSH) for near-duplicate detection.

MinHash (Broder 1997, "On the resemblance and containment of documents"): for a random hash
function h, P[min h(A) == min h(B)] = |A ∩ B| / |A ∪ B| = J(A, B), the Jaccard similarity of
two shingle sets. A signature of `num_perm` such minima estimates J by the fraction of equal
entries. LSH banding (Indyk & Motwani 1998; Leskovec, Rajaraman & Ullman, "Mining of Massive
Datasets", ch. 3): cut the signature into b bands of r rows; two documents become candidates
when all r rows of some band agree, which happens with probability

    P(s) = 1 - (1 - s^r)^b          (an S-curve in the similarity s)

`optimal_bands_rows` picks (b, r) for a target threshold t by minimising the weighted area of
false positives, ∫_0^t P(s) ds, plus false negatives, ∫_t^1 (1 - P(s)) ds — the same
criterion as datasketch's `_optimal_param`, derived and computed here with numpy.

Hashing: words -> 64-bit blake2b; a shingle (n consecutive words) -> a polynomial of its word
hashes mod 2^64, mixed with the splitmix64 finaliser and cut to 32 bits x; the `num_perm`
hash functions are multiply-add-shift h_i(x) = ((a_i x + b_i) mod 2^64) >> 32 with random
64-bit a_i, b_i — a strongly universal family (Dietzfelbinger 1996, "Universal hashing and
k-wise independent random variables via integer arithmetic without primes") that needs only
wrapping uint64 arithmetic, so everything is vectorised numpy.
"""
from __future__ import annotations

import hashlib
import re

import numpy as np

_WORD = re.compile(r"\w+")
_ROLL = np.uint64(0x9E3779B97F4A7C15)       # odd 64-bit multiplier for the shingle polynomial
_CHUNK_ELEMENTS = 1 << 22                   # shingles x permutations hashed at once (~32 MiB)


def tokenize(text: str) -> list[str]:
    """Lower-cased words; punctuation and whitespace are ignored."""
    return _WORD.findall(text.lower())


def word_shingles(text: str, ngram: int = 5) -> set[tuple[str, ...]]:
    """The exact set of word n-grams (a text shorter than n words is one shingle)."""
    words = tokenize(text)
    if len(words) < ngram:
        return {tuple(words)}
    return {tuple(words[i:i + ngram]) for i in range(len(words) - ngram + 1)}


def jaccard(a: set, b: set) -> float:
    """|A ∩ B| / |A ∪ B| (1.0 for two empty sets)."""
    union = len(a | b)
    return len(a & b) / union if union else 1.0


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser: spreads every input bit over the output (uint64 -> uint64)."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _word_hash(word: str) -> int:
    return int.from_bytes(hashlib.blake2b(word.encode("utf-8"), digest_size=8).digest(), "little")


def shingle_hashes(docs: list[str], ngram: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """Hashes of every document's word n-grams, flat, and where each document starts.

    Returns (hashes (S,) uint64 in [0, 2^32), starts (N,) int64). Every document has at least one
    shingle (an empty document hashes the empty shingle), so `starts` is strictly increasing.
    """
    vocab: dict[str, int] = {}
    word_ids: list[int] = []
    lengths = np.empty(len(docs), dtype=np.int64)
    for d, text in enumerate(docs):
        words = tokenize(text)
        lengths[d] = len(words)
        word_ids.extend(vocab.setdefault(w, len(vocab)) for w in words)
    table = np.array([_word_hash(w) for w in vocab], dtype=np.uint64)
    flat = table[np.asarray(word_ids, dtype=np.int64)] if word_ids else np.zeros(0, np.uint64)  # (T,)

    ends = np.cumsum(lengths)
    begins = ends - lengths
    n_shingles = np.maximum(lengths - ngram + 1, 1)                      # (N,)
    starts = np.cumsum(n_shingles) - n_shingles                         # (N,) first shingle of each doc
    # position of every shingle's first word in the flat word array
    pos = np.repeat(begins, n_shingles) + (np.arange(n_shingles.sum()) - np.repeat(starts, n_shingles))
    width = np.repeat(np.minimum(lengths, ngram), n_shingles)           # words in each shingle
    h = np.zeros(len(pos), dtype=np.uint64)
    for k in range(ngram):                                             # h = sum_k w[pos+k] * C^k
        use = width > k
        h[use] = h[use] * _ROLL + flat[pos[use] + k]
    return _mix64(h + width.astype(np.uint64)) >> np.uint64(32), starts


def hash_params(num_perm: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The random 64-bit (a, b) of the `num_perm` hash functions; every a_i is odd."""
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 2**64, size=num_perm, dtype=np.uint64) | np.uint64(1)
    b = rng.integers(0, 2**64, size=num_perm, dtype=np.uint64)
    return a, b


def minhash_signatures(docs: list[str], num_perm: int = 128, ngram: int = 5, seed: int = 0) -> np.ndarray:
    """MinHash signatures, (N, num_perm) uint32: row d holds min_x h_i(x) over d's shingles."""
    hashes, starts = shingle_hashes(docs, ngram)
    a, b = hash_params(num_perm, seed)
    n = len(docs)
    sig = np.empty((n, num_perm), dtype=np.uint32)
    bounds = np.append(starts, len(hashes))
    max_shingles = max(_CHUNK_ELEMENTS // num_perm, 1)
    d0 = 0
    while d0 < n:  # documents d0..d1-1 in one chunk (always at least one document)
        d1 = int(np.searchsorted(bounds, bounds[d0] + max_shingles, side="right")) - 1
        d1 = min(max(d1, d0 + 1), n)
        x = hashes[bounds[d0]:bounds[d1], None]                         # (S_chunk, 1)
        hv = x * a[None, :]                                             # (S_chunk, P), wraps mod 2^64
        hv += b[None, :]
        hv >>= np.uint64(32)                                            # < 2^32
        sig[d0:d1] = np.minimum.reduceat(hv, starts[d0:d1] - bounds[d0], axis=0)
        d0 = d1
    return sig


def s_curve(s: np.ndarray, bands: int | np.ndarray, rows: int | np.ndarray) -> np.ndarray:
    """Probability that two documents of similarity s share at least one LSH band."""
    return 1.0 - (1.0 - s ** rows) ** bands


def _simpson(y: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Composite Simpson rule along the last axis (len(x) odd, evenly spaced)."""
    h = (x[-1] - x[0]) / (len(x) - 1)
    return h / 3 * (y[..., 0] + y[..., -1] + 4 * y[..., 1:-1:2].sum(-1) + 2 * y[..., 2:-1:2].sum(-1))


def lsh_error_areas(threshold: float, bands: np.ndarray, rows: np.ndarray,
                    points: int = 1001) -> tuple[np.ndarray, np.ndarray]:
    """(false-positive area ∫_0^t P, false-negative area ∫_t^1 (1 - P)) for each (bands, rows)."""
    b = np.asarray(bands, dtype=np.float64)[..., None]                  # (K, 1)
    r = np.asarray(rows, dtype=np.float64)[..., None]
    lo = np.linspace(0.0, threshold, points)                           # (points,)
    hi = np.linspace(threshold, 1.0, points)
    fp = _simpson(s_curve(lo, b, r), lo)                               # (K,)
    fn = _simpson(1.0 - s_curve(hi, b, r), hi)
    return fp, fn


def optimal_bands_rows(threshold: float, num_perm: int, fp_weight: float = 0.5,
                       fn_weight: float = 0.5) -> tuple[int, int]:
    """(bands, rows) with bands * rows <= num_perm minimising fp_weight*FP + fn_weight*FN."""
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"threshold must be in (0, 1), got {threshold}")
    if num_perm < 2:
        raise ValueError(f"num_perm must be >= 2, got {num_perm}")
    pairs = np.array([(b, r) for b in range(1, num_perm + 1) for r in range(1, num_perm // b + 1)])
    fp, fn = lsh_error_areas(threshold, pairs[:, 0], pairs[:, 1])
    best = int(np.argmin(fp_weight * fp + fn_weight * fn))
    return int(pairs[best, 0]), int(pairs[best, 1])


def lsh_candidate_pairs(sig: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """All pairs (i < j) that agree on every row of at least one band; (K, 2) int64, sorted."""
    n = sig.shape[0]
    found = []
    for band in range(bands):
        block = np.ascontiguousarray(sig[:, band * rows:(band + 1) * rows])   # (N, r)
        _, label = np.unique(block, axis=0, return_inverse=True)
        label = label.ravel()                                                # bucket of each doc
        shared = np.flatnonzero(np.bincount(label)[label] > 1)              # docs not alone
        order = shared[np.argsort(label[shared], kind="stable")]             # grouped, i < j inside
        cut = np.flatnonzero(np.diff(label[order])) + 1
        for bucket in np.split(order, cut) if len(order) else []:
            i, j = np.triu_indices(len(bucket), k=1)
            found.append(bucket[i] * n + bucket[j])
    if not found:
        return np.zeros((0, 2), dtype=np.int64)
    codes = np.unique(np.concatenate(found))
    return np.stack([codes // n, codes % n], axis=1)


def estimated_jaccard(sig: np.ndarray, pairs: np.ndarray) -> np.ndarray:
    """Fraction of equal signature entries for each pair (K,) — the MinHash estimate of J."""
    out = np.empty(len(pairs), dtype=np.float64)
    step = max(_CHUNK_ELEMENTS // sig.shape[1], 1)
    for k in range(0, len(pairs), step):
        p = pairs[k:k + step]
        out[k:k + step] = (sig[p[:, 0]] == sig[p[:, 1]]).mean(axis=1)
    return out
