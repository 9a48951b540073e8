"""The built-in corpus: deterministic, varied, grammatical stories and the data derived from them."""
from __future__ import annotations

import random
import re
from collections import Counter

import pytest

from data_pipeline.builtin import (
    generate_conversations,
    generate_instructions,
    generate_preferences,
    generate_stories,
    generate_story_records,
    generate_verifiable_prompts,
)
from data_pipeline.builtin.grammar import article, count_phrase, fill, fix_articles, join_list, number_word
from data_pipeline.builtin.stories import PLOTS, make_character, story_slots
from data_pipeline.builtin.tasks import degrade, split_sentences
from data_pipeline.builtin.verifiable import generate_problems
from data_pipeline.formats import EOS_TOKEN

N = 300


@pytest.fixture(scope="module")
def records():
    return generate_story_records(N, seed=123)


# ----------------------------------------------------------------------------- grammar helpers
@pytest.mark.parametrize("phrase,expected", [
    ("owl", "an"), ("red ball", "a"), ("orange kite", "an"), ("umbrella", "an"), ("unicorn", "a"),
    ("hour", "an"), ("honest fox", "an"), ("one-eyed cat", "a"), ("useful tool", "a"), ("elephant", "an"),
])
def test_article(phrase, expected):
    assert article(phrase) == expected


def test_fix_articles_and_lists():
    assert fix_articles("A apple and a orange kite, an red ball.") == "An apple and an orange kite, a red ball."
    assert join_list(["a cat"]) == "a cat"
    assert join_list(["a cat", "two dogs", "three mice"]) == "a cat, two dogs and three mice"
    assert count_phrase(1, "mouse", "mice") == "one mouse" and count_phrase(3, "mouse", "mice") == "three mice"
    assert count_phrase(25, "egg", "eggs") == "25 eggs"
    with pytest.raises(KeyError):
        fill("{nobody}", {})


# ----------------------------------------------------------------------------- stories
def test_stories_are_deterministic_and_sliceable():
    a = generate_stories(12, seed=5)
    assert a == generate_stories(12, seed=5)
    assert generate_stories(4, seed=5) == a[:4]
    assert generate_stories(3, seed=5, start=7) == a[7:10]
    assert generate_stories(12, seed=6) != a


def test_every_template_slot_exists():
    """Fill every alternative of every plot stage, not only those a random sample would pick."""
    rng = random.Random(0)
    for plot in PLOTS:
        hero = make_character(rng, set())
        slots = story_slots(rng, plot, hero, make_character(rng, {hero.name}), friend_introduced=False)
        for stage in ("problem", "attempt", "help", "resolution", "moral", "titles"):
            for template in getattr(plot, stage):
                assert "{" not in fill(template, slots)
        for template in (plot.summary, plot.reason, *[x for qa in plot.questions for x in qa]):
            fill(template, slots)
        for stage in plot.linked:  # stages that refer to each other need one alternative each
            assert len(getattr(plot, stage)) == len(plot.help), (plot.name, stage)


def test_stories_are_varied(records):
    texts = [r.text for r in records]
    assert len(set(texts)) == N
    assert {r.plot for r in records} == {p.name for p in PLOTS}
    assert len({t.split(".")[0] for t in texts}) > N // 2          # many different first sentences
    vocab = Counter(w.lower() for t in texts for w in re.findall(r"[A-Za-z]+", t))
    assert len(vocab) > 600
    assert {r.hero.pronoun for r in records} == {"he", "she", "they"}


def test_stories_are_well_formed(records):
    for r in records:
        text = r.text
        assert EOS_TOKEN not in text and "{" not in text and "}" not in text and "  " not in text
        assert len(r.paragraphs) == 4 and text == "\n".join(r.paragraphs)
        assert 80 <= len(text.split()) <= 320, text
        for para in r.paragraphs:
            assert para.count('"') % 2 == 0, para                  # dialogue quotes are closed
            for sentence in split_sentences(para):
                first = sentence.lstrip('"')[0]
                assert first.isupper() or first.isdigit(), sentence
            assert para.rstrip()[-1] in '.!?"', para


def test_stories_are_grammatical(records):
    vowel_ok = ("uni", "use", "one", "eu")
    for r in records:
        text = r.text
        # articles: an + vowel letter, a + consonant letter (with the usual exceptions)
        for art, word in re.findall(r"\b([Aa]n?) ([A-Za-z][\w-]*)", text):
            w = word.lower()
            vowel = w[0] in "aeiou" and not w.startswith(vowel_ok) or w.startswith("hour")
            assert (art.lower() == "an") == vowel, f"{art} {word}: {text}"
        # pronoun-verb agreement
        assert not re.search(r"\b(?:[Tt]hey) (?:was|has|is|does)\b", text), text
        assert not re.search(r"\b(?:[Hh]e|[Ss]he) (?:were|have|are|do)\b", text), text
        names = f"{r.hero.name}|{r.friend.name}"
        assert not re.search(rf"(?<!and )\b(?:{names}) (?:were|have)\b", text), text
        # the friend is introduced ("... named Spot") before being called by name alone
        first = re.search(rf"\b{r.friend.name}\b", text)
        if first:
            assert text[:first.start()].endswith("named "), text


def test_story_facts_match_text(records):
    for r in records:
        assert r.hero.name in r.text and r.hero.name in r.summary
        assert r.moral in r.text
        for question, answer in r.questions:
            assert question.endswith("?") and answer.endswith(".")


# ----------------------------------------------------------------------------- derived data
def test_instructions():
    recs = generate_instructions(120, seed=1)
    assert recs == generate_instructions(120, seed=1)
    kinds = Counter()
    for r in recs:
        assert set(r) == {"instruction", "input", "output"}
        assert all(isinstance(v, str) for v in r.values()) and r["instruction"] and r["output"]
        if r["instruction"] == "Continue the story.":
            assert len(r["input"].split("\n")) == 2 and len(r["output"].split("\n")) == 2
        if r["instruction"].startswith("Summarize"):
            assert r["output"].split()[0].rstrip("'s") in r["input"]
        if "The answer is" in r["output"]:
            kinds["math"] += 1
        kinds[r["instruction"].split()[0]] += 1
    assert kinds["math"] > 5 and kinds["Continue"] > 5 and kinds["Summarize"] + kinds["What"] > 5


def test_conversations():
    convs = generate_conversations(60, seed=2)
    assert convs == generate_conversations(60, seed=2)
    for c in convs:
        msgs = c["messages"]
        assert set(c) == {"messages"} and all(set(m) == {"role", "content"} and m["content"] for m in msgs)
        roles = [m["role"] for m in msgs if m["role"] != "system"]
        assert msgs[0]["role"] in ("system", "user") and all(m["role"] != "system" for m in msgs[1:])
        assert len(roles) >= 4 and roles == ["user", "assistant"] * (len(roles) // 2)


def test_preferences_and_degradations():
    prefs = generate_preferences(60, seed=3)
    for p in prefs:
        assert set(p) == {"prompt", "chosen", "rejected"} and p["chosen"] != p["rejected"]
    story = generate_stories(1, seed=9)[0]
    sentences = split_sentences(story.replace("\n", " "))
    seen = set()
    rng = random.Random(0)
    for _ in range(30):
        bad, kind = degrade(story, rng)
        seen.add(kind)
        assert bad != story and bad.count("\n") <= story.count("\n")
        if kind == "shuffled":
            assert sorted(split_sentences(bad.replace("\n", " "))) == sorted(sentences)
        elif kind == "repeated":
            got = split_sentences(bad.replace("\n", " "))
            assert len(got) > len(sentences) and any(a == b for a, b in zip(got, got[1:]))
        else:
            assert story.startswith(bad) and len(bad) < len(story) * 0.6
    assert seen == {"shuffled", "repeated", "truncated"}


def test_verifiable_prompts_have_correct_answers():
    problems = generate_problems(140, seed=4)
    assert {p.task for p in problems} == {"addition", "subtraction", "multiplication", "division",
                                          "counting", "story_name", "story_color"}
    ops = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "x": lambda a, b: a * b, "/": lambda a, b: a // b}
    for p in problems:
        assert p.solution.endswith(f"The answer is {p.answer}.")
        m = re.search(r"(\d+) ([-+x/]) (\d+) = (\d+)", p.solution)
        if p.task == "counting":
            counts = list(map(int, p.solution.split(" = ")[0].split(" + ")))
            assert sum(counts) == int(p.answer)
            assert all(re.search(rf"\b{number_word(c)} ", p.prompt) for c in counts)
        elif m:  # the worked equation is right, uses the prompt's numbers, and gives the answer
            a, op, b, c = int(m[1]), m[2], int(m[3]), int(m[4])
            assert ops[op](a, b) == c == int(p.answer)
            assert all(re.search(rf"\b{number_word(x)} ", p.prompt) for x in (a, b)), p
        elif p.task == "story_name":
            assert re.search(rf"\b{p.answer}\b", p.prompt)
        else:
            assert p.task == "story_color"
            assert re.search(rf"\b{p.answer} \w", p.prompt)
    public = generate_verifiable_prompts(14, seed=4)
    assert [set(r) for r in public] == [{"prompt", "answer", "task"}] * 14
