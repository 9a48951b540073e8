"""Cleaning: exact dedup, MinHash-LSH near dedup (checked against exact Jaccard on real text), PII."""
from __future__ import annotations

import importlib
import itertools
import random
import re
from collections import Counter, defaultdict
from fractions import Fraction
from math import comb

import numpy as np
import pytest

import data_pipeline.cleaning as cleaning
from data_pipeline.cleaning import exact_dedup, find_near_duplicates, near_dedup, scrub_pii
from data_pipeline.cleaning import minhash as mh
from data_pipeline.cleaning.documents import read_documents, write_documents
from data_pipeline.cleaning.pii import iban_valid, luhn_valid
from data_pipeline.formats import EOS_TOKEN
from conftest import assert_user_error, run_script

MOJIBAKE = [("â€œ", "“"), ("â€™", "’"), ("â€“", "–"), ("â€”", "—"), ("â€", "”")]


@pytest.fixture(scope="module")
def stories(shared_data):
    return read_documents(shared_data / "tinystories" / "tinystories_v1_train_first2MiB.txt")


def exact_jaccard_pairs(docs: list[str], ngram: int = 5) -> dict[tuple[int, int], float]:
    """Exact Jaccard of every pair of documents sharing at least one shingle (inverted index)."""
    sets = [mh.word_shingles(d, ngram) for d in docs]
    index = defaultdict(list)
    for i, s in enumerate(sets):
        for g in s:
            index[g].append(i)
    inter = Counter(p for ids in index.values() if len(ids) > 1 for p in itertools.combinations(ids, 2))
    return {p: c / (len(sets[p[0]]) + len(sets[p[1]]) - c) for p, c in inter.items()}


# ----------------------------------------------------------------------------- exact dedup
def test_exact_dedup_normalises_whitespace_only():
    docs = ["a  b\n c", "a b c", "A b c", "x", " x ", "a b c"]
    kept, removed = exact_dedup(docs)
    assert kept == ["a  b\n c", "A b c", "x"] and removed == 3


def test_exact_dedup_on_real_overlapping_files(shared_data, stories):
    """The V1 'head' file is a prefix of the 2 MiB file once its mojibake is repaired (shared README)."""
    head = (shared_data / "tinystories" / "tinystories_v1_train_head.txt").read_text(encoding="utf-8")
    for bad, good in MOJIBAKE:
        head = head.replace(bad, good)
    head_stories = [s for s in re.split(r"(?<=\S)\n(?=\S)", head) if s.strip()]  # paragraphs: blank lines
    kept, removed = exact_dedup(stories + head_stories)
    assert len(head_stories) > 1000
    assert removed >= 0.9 * len(head_stories)
    assert kept[: len(stories)] == stories  # the first copy is the one kept


def test_near_dedup_finds_the_cs336_sample_inside_v2(shared_data):
    v2 = read_documents(shared_data / "tinystories" / "tinystoriesV2_train_first10k_lines.txt")[:300]
    sample = read_documents(shared_data / "tinystories" / "cs336_tinystories_sample.txt")
    kept, removed = near_dedup(v2 + sample)
    assert removed == len(sample) == 5 and kept == v2


# ----------------------------------------------------------------------------- MinHash pieces
def test_s_curve_and_error_areas_match_closed_forms():
    assert mh.s_curve(np.array(0.5), 1, 1) == 0.5
    assert mh.s_curve(np.array(0.5), 2, 1) == 0.75       # 1 - (1 - s)^2
    assert mh.s_curve(np.array(0.5), 1, 2) == 0.25       # s^2
    t = 0.7
    for r in (1, 3, 8):   # b = 1: P = s^r
        fp, fn = mh.lsh_error_areas(t, np.array([1]), np.array([r]))
        assert fp[0] == pytest.approx(t ** (r + 1) / (r + 1), abs=1e-9)
        assert fn[0] == pytest.approx((1 - t) - (1 - t ** (r + 1)) / (r + 1), abs=1e-9)
    for b in (2, 5, 20):  # r = 1: P = 1 - (1 - s)^b
        fp, fn = mh.lsh_error_areas(t, np.array([b]), np.array([1]))
        assert fp[0] == pytest.approx(t - (1 - (1 - t) ** (b + 1)) / (b + 1), abs=1e-9)
        assert fn[0] == pytest.approx((1 - t) ** (b + 1) / (b + 1), abs=1e-9)


def _exact_areas(t: Fraction, b: int, r: int) -> tuple[Fraction, Fraction]:
    """FP/FN areas in exact rational arithmetic: (1 - s^r)^b expanded with the binomial theorem."""
    # ∫_0^x (1 - s^r)^b ds = sum_k C(b,k) (-1)^k x^(rk+1) / (rk+1)
    def integral(x: Fraction) -> Fraction:
        return sum(comb(b, k) * (-1) ** k * x ** (r * k + 1) / (r * k + 1) for k in range(b + 1))
    fp = t - integral(t)
    fn = integral(Fraction(1)) - integral(t)
    return fp, fn


def test_optimal_bands_rows_against_exact_rational_search():
    t, num_perm = Fraction(4, 5), 24
    best = min(((b, r) for b in range(1, num_perm + 1) for r in range(1, num_perm // b + 1)),
               key=lambda br: sum(_exact_areas(t, *br)))
    assert mh.optimal_bands_rows(0.8, num_perm) == best
    fp, fn = mh.lsh_error_areas(0.8, np.array([best[0]]), np.array([best[1]]))
    assert (fp[0], fn[0]) == pytest.approx(tuple(map(float, _exact_areas(t, *best))), abs=1e-9)
    b, r = mh.optimal_bands_rows(0.8, 128)
    assert b * r <= 128 and 0.75 < (1 / b) ** (1 / r) < 0.9   # S-curve midpoint near the threshold
    b_fp, r_fp = mh.optimal_bands_rows(0.8, 128, fp_weight=0.9, fn_weight=0.1)
    assert (1 / b_fp) ** (1 / r_fp) > (1 / b) ** (1 / r)      # fearing false positives moves it right


def test_shingle_hashes_match_exact_shingle_sets(stories):
    docs = stories[:40] + ["", "one two", "Just five words in here.", "a a a a a a a"]
    hashes, starts = mh.shingle_hashes(docs, ngram=5)
    bounds = np.append(starts, len(hashes))
    for i, d in enumerate(docs):
        assert len(set(hashes[bounds[i]:bounds[i + 1]].tolist())) == len(mh.word_shingles(d, 5))


def test_signatures_are_chunk_independent_and_seeded(stories, monkeypatch):
    docs = stories[:30] + [""]
    full = mh.minhash_signatures(docs, num_perm=64, seed=1)
    monkeypatch.setattr(mh, "_CHUNK_ELEMENTS", 64 * 50)   # ~50 shingles per chunk: many chunks
    assert np.array_equal(mh.minhash_signatures(docs, num_perm=64, seed=1), full)
    assert np.array_equal(np.concatenate([mh.minhash_signatures([d], num_perm=64, seed=1) for d in docs]), full)
    assert not np.array_equal(mh.minhash_signatures(docs, num_perm=64, seed=2), full)


def test_minhash_estimates_exact_jaccard_on_real_text(stories):
    rng = random.Random(1)
    docs = stories[:60]
    variants = []
    for d in docs:
        words = d.split()
        cut = rng.randint(len(words) // 3, len(words))          # shared prefix of varying length
        variants.append(" ".join(words[:cut] + [w[::-1] for w in words[cut:]]))
    exact = np.array([mh.jaccard(mh.word_shingles(a), mh.word_shingles(b)) for a, b in zip(docs, variants)])
    sig = mh.minhash_signatures(docs + variants, num_perm=256)
    est = mh.estimated_jaccard(sig, np.array([(i, i + len(docs)) for i in range(len(docs))]))
    assert exact.min() < 0.4 and exact.max() > 0.9
    assert np.abs(est - exact).mean() < 0.03 and np.abs(est - exact).max() < 0.12


# ----------------------------------------------------------------------------- near dedup on real text
def _perturb(text: str, rng: random.Random) -> str:
    words = text.split()
    for _ in range(rng.randint(1, 12)):
        i, op = rng.randrange(len(words)), rng.random()
        if op < 0.5:
            words[i] = rng.choice(["apple", "blue", "quickly", "zebra", "went", "the", "happy"])
        elif op < 0.75:
            del words[i]
        else:
            words.insert(i, rng.choice(["very", "big", "red"]))
    return " ".join(words)


def test_near_dedup_precision_recall_against_exact_jaccard(stories):
    rng = random.Random(0)
    base = stories[:300]
    docs = base + [_perturb(base[i], rng) for i in rng.sample(range(len(base)), 200)]
    exact = exact_jaccard_pairs(docs)
    found = find_near_duplicates(docs, threshold=0.8)
    pred = {tuple(p) for p in found.pairs.tolist()}
    true = {p for p, j in exact.items() if j >= 0.8}
    strong = {p for p, j in exact.items() if j >= 0.9}
    assert len(true) > 50 and len(strong) > 20
    # The (bands, rows) that balance false-positive and false-negative areas put the S-curve's
    # midpoint at ~0.85 for t = 0.8: pairs just above t are found about half the time (seed 0:
    # recall 0.76 for J >= 0.8, 0.55 for 0.8 <= J < 0.9, 1.0 for J >= 0.9; precision 0.91).
    recall = len(true & pred) / len(true)
    precision = len(true & pred) / len(pred)
    assert len(strong & pred) >= 0.9 * len(strong)           # clear duplicates are found
    assert recall >= 0.65 and precision >= 0.85
    assert all(exact.get(p, 0.0) >= 0.7 for p in pred)       # no pair far below the threshold
    removed = len(docs) - len(found.keep)
    assert removed == len(docs) - len(near_dedup(docs)[0]) and removed >= len(true & pred) * 0.9


def test_near_dedup_groups_and_repeats():
    a = "the little cat sat on the warm mat and looked at the big red ball in the sun all day long"
    b = a.replace("all day long", "all day")          # near duplicate of a
    c = "a completely different story about a dog who went to the beach and found a shiny shell"
    kept, removed = near_dedup([c, a, b, c, a] * 1 + [a] * 200)
    assert kept == [c, a] and removed == 203
    assert near_dedup([]) == ([], 0)


# ----------------------------------------------------------------------------- PII
POSITIVES = {
    "email": ["john.doe+news@example.co.uk", "mary_1@mail.org"],
    "phone": ["+1 202-555-0143", "+44 20 7946 0958", "(202) 555-0143", "202.555.0143", "1-800-555-0199",
              "+49 (0)30 1234567", "+33 1 23 45 67 89"],
    "ip": ["192.168.0.1", "8.8.8.8", "2001:db8::8a2e:370:7334", "::1", "fe80::1", "2001:0db8:0000:0000:0000:ff00:0042:8329"],
    "credit_card": ["4111 1111 1111 1111", "5555-5555-5555-4444", "378282246310005", "6011111111111117"],
    "iban": ["GB82 WEST 1234 5698 7654 32", "DE89370400440532013000", "FR14 2004 1010 0505 0001 3M02 606",
             "NL91ABNA0417164300"],
}
NEGATIVES = [
    "On 2024-05-17 at 12:30 (or 12:30:45) we met.", "Dates like 17/05/2024 and 05.17.2024 stay.",
    "Install version 1.2.3 or v2.10.4 today.", "It costs $1,299.99 or €15.50.", "Back in 1999 there were 42 cats.",
    "Pi is 3.14159 and a million is 1,000,000.", "Meet me @ the park, said Tom. @lily laughed.",
    "Her number was 4111 1111 1111 1112.", "The bad IBAN GB82 WEST 1234 5698 7654 33 stays.",
    "Call me maybe at 555-0143.", "Ten digits 1234567890 stay too.", "cafe::face is not an address.",
    "The MAC 00:1A:2B:3C:4D:5E is not an IP.",
]


@pytest.mark.parametrize("kind", sorted(POSITIVES))
def test_scrub_pii_finds_each_kind(kind):
    for value in POSITIVES[kind]:
        text, counts = scrub_pii(f"Write to {value}. Thanks!")
        assert text == f"Write to [{kind.upper()}]. Thanks!", (value, text)
        assert counts == {k: int(k == kind) for k in ("email", "phone", "ip", "credit_card", "iban")}


@pytest.mark.parametrize("text", NEGATIVES)
def test_scrub_pii_leaves_ordinary_text_alone(text):
    assert scrub_pii(text) == (text, {"email": 0, "phone": 0, "ip": 0, "credit_card": 0, "iban": 0})


def test_scrub_pii_trims_greedy_matches_and_leaves_real_stories_alone(stories):
    text, counts = scrub_pii("IBAN DE89 3704 0044 0532 0130 00 NOW and card 4111-1111-1111-1111 1234.")
    assert text == "IBAN [IBAN] NOW and card [CREDIT_CARD] 1234." and counts["iban"] == counts["credit_card"] == 1
    assert all(scrub_pii(s)[0] == s for s in stories[:300])


def test_checksums_on_published_examples():
    assert luhn_valid("79927398713") and not luhn_valid("79927398710")       # Luhn's textbook example
    assert luhn_valid("4111111111111111") and not luhn_valid("4111111111111112")
    assert iban_valid("GB82 WEST 1234 5698 7654 32") and iban_valid("BE68539007547034")
    assert not iban_valid("GB82 WEST 1234 5698 7654 23") and not iban_valid("GB82")


def test_package_exports_functions_even_after_the_script_module_is_imported():
    script_module = importlib.import_module("data_pipeline.cleaning.scrub_pii")
    assert callable(cleaning.scrub_pii) and script_module.scrub_pii is cleaning.scrub_pii


# ----------------------------------------------------------------------------- CLI scripts
def test_dedup_and_scrub_scripts(tmp_path, stories):
    docs = stories[:40] + stories[:5] + [stories[5].replace(".", "!", 1), "Mail a@b.co or call (202) 555-0143."]
    write_documents(tmp_path / "in.txt", docs)
    proc = run_script(["data_pipeline/cleaning/dedup.py", "--input", str(tmp_path / "in.txt"),
                       "--output", str(tmp_path / "dedup.txt")])
    assert proc.returncode == 0, proc.stderr
    assert len(proc.stdout.strip().splitlines()) == 1 and "removed 5 exact and 1 near" in proc.stdout
    assert read_documents(tmp_path / "dedup.txt") == stories[:40] + [docs[-1]]
    proc = run_script(["data_pipeline/cleaning/scrub_pii.py", "--input", str(tmp_path / "dedup.txt"),
                       "--output", str(tmp_path / "clean.txt")])
    assert proc.returncode == 0, proc.stderr
    assert "2 replaced" in proc.stdout and len(proc.stdout.strip().splitlines()) == 1
    assert read_documents(tmp_path / "clean.txt")[-1] == "Mail [EMAIL] or call [PHONE]."


@pytest.mark.parametrize("case", ["missing", "empty", "no_separator", "bad_threshold"])
def test_cleaning_scripts_fail_cleanly(tmp_path, case):
    src = tmp_path / "in.txt"
    extra = []
    if case == "empty":
        src.write_text("")
    elif case == "no_separator":
        src.write_text("a story without any separator line\n")
    elif case == "bad_threshold":
        src.write_text(f"a story\n{EOS_TOKEN}\n")
        extra = ["--threshold", "1.5"]
    script = "data_pipeline/cleaning/scrub_pii.py" if case == "empty" else "data_pipeline/cleaning/dedup.py"
    proc = run_script([script, "--input", str(src), "--output", str(tmp_path / "out.txt"), *extra])
    line = assert_user_error(proc)
    assert {"missing": "not found", "empty": "is empty", "no_separator": "no '<|endoftext|>'",
            "bad_threshold": "--threshold"}[case] in line
