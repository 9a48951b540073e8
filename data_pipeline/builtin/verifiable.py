"""Built-in prompts with checkable answers, for RL with verifiable rewards when offline.

Small arithmetic word problems about story characters (add, take away, groups of, share
equally), counting problems, and reading questions about a generated story (a name or a
colour). Each record has the reference answer a verifier compares against: a number as
digits, or one word. Like GSM8K (Cobbe et al. 2021) but tiny, so a small model can learn it.
Worked solutions (`solution`) end with "The answer is X." for supervised warm-up.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

from data_pipeline.builtin import lexicon as lx
from data_pipeline.builtin.grammar import PRONOUNS, capitalize, count_phrase, join_list, number_word
from data_pipeline.builtin.stories import Character, generate_story, make_character

TASKS = ("addition", "subtraction", "multiplication", "division", "counting", "story_name", "story_color")


@dataclass(frozen=True)
class Problem:
    """A question, its short reference answer, and a worked solution."""

    prompt: str
    answer: str
    task: str
    solution: str


def _two_people(rng: random.Random) -> tuple[Character, Character]:
    a = make_character(rng, set(), animal=rng.random() < 0.3)
    b = make_character(rng, {a.name}, animal=rng.random() < 0.3)
    return a, b


def _items(rng: random.Random) -> tuple[str, str]:
    return rng.choice(lx.COUNTABLES)


def addition(rng: random.Random) -> Problem:
    a, b = _two_people(rng)
    one, many = _items(rng)
    x, y = rng.randint(1, 12), rng.randint(1, 12)
    pro = PRONOUNS[a.pronoun]
    prompt = (f"{a.name} had {count_phrase(x, one, many)}. {b.name} gave {pro['him']} "
              f"{number_word(y)} more {one if y == 1 else many}. How many {many} does {a.name} have now?")
    solution = f"{a.name} had {x} and got {y} more. {x} + {y} = {x + y}. The answer is {x + y}."
    return Problem(prompt, str(x + y), "addition", solution)


def subtraction(rng: random.Random) -> Problem:
    a, b = _two_people(rng)
    one, many = _items(rng)
    x = rng.randint(3, 15)
    y = rng.randint(1, x - 1)
    pro = PRONOUNS[a.pronoun]
    prompt = (f"{a.name} had {count_phrase(x, one, many)}. {capitalize(pro['he'])} gave "
              f"{count_phrase(y, one, many)} to {b.name}. How many {many} does {a.name} have left?")
    solution = f"{a.name} had {x} and gave away {y}. {x} - {y} = {x - y}. The answer is {x - y}."
    return Problem(prompt, str(x - y), "subtraction", solution)


def multiplication(rng: random.Random) -> Problem:
    a, _ = _two_people(rng)
    one, many = _items(rng)
    bags, each = rng.randint(2, 6), rng.randint(2, 6)
    box, boxes = rng.choice((("bag", "bags"), ("box", "boxes"), ("basket", "baskets"), ("jar", "jars")))
    prompt = (f"{a.name} has {count_phrase(bags, box, boxes)}. "
              f"Each {box} has {count_phrase(each, one, many)} in it. How many {many} are there in all?")
    total = bags * each
    solution = f"There are {bags} groups of {each}. {bags} x {each} = {total}. The answer is {total}."
    return Problem(prompt, str(total), "multiplication", solution)


def division(rng: random.Random) -> Problem:
    a, _ = _two_people(rng)
    one, many = _items(rng)
    friends, each = rng.randint(2, 5), rng.randint(1, 6)
    total = friends * each
    prompt = (f"{a.name} has {count_phrase(total, one, many)} and shares them equally among "
              f"{count_phrase(friends, 'friend', 'friends')}. How many {many} does each friend get?")
    solution = f"{total} shared by {friends} is {total} / {friends} = {each}. The answer is {each}."
    return Problem(prompt, str(each), "division", solution)


def counting(rng: random.Random) -> Problem:
    a, _ = _two_people(rng)
    place = rng.choice([p for p in lx.PLACES if p[3]])
    kinds = rng.sample(lx.ANIMALS, rng.randint(2, 3))
    counts = [rng.randint(1, 5) for _ in kinds]
    seen = join_list([count_phrase(c, k[0], k[1]) for c, k in zip(counts, kinds)])
    total = sum(counts)
    prompt = f"{capitalize(place[1])}, {a.name} saw {seen}. How many animals did {a.name} see?"
    solution = f"{' + '.join(map(str, counts))} = {total}. The answer is {total}."
    return Problem(prompt, str(total), "counting", solution)


def story_name(rng: random.Random) -> Problem:
    """A generated story; ask for the friend's name (or the hero's when no friend appears)."""
    story = generate_story(rng.randrange(2**31), rng.randrange(2**31))
    if story.friend.name in story.text and rng.random() < 0.5:
        who, desc = story.friend, "friend"
        question = f"What is the name of {story.hero.name}'s friend in the story?"
    else:
        who, desc = story.hero, "main character"
        question = f"What is the name of the {desc} in the story?"
    prompt = f"{story.text}\n\n{question} Answer with one word."
    solution = f"The {desc} is called {who.name}. The answer is {who.name}."
    return Problem(prompt, who.name, "story_name", solution)


def story_color(rng: random.Random) -> Problem:
    """A generated story whose hero owns a coloured thing; ask for the colour."""
    while True:
        story = generate_story(rng.randrange(2**31), rng.randrange(2**31))
        obj, noun = story.slots["obj"], story.slots["obj_noun"]
        color = obj[: -len(noun)].strip()
        if color and obj in story.text:
            break
    prompt = (f"{story.text}\n\nWhat color was the {noun} in the story? Answer with one word.")
    solution = f"The story says it was a {obj}. The answer is {color}."
    return Problem(prompt, color, "story_color", solution)


_MAKERS = {"addition": addition, "subtraction": subtraction, "multiplication": multiplication,
           "division": division, "counting": counting, "story_name": story_name,
           "story_color": story_color}


def generate_problems(n: int, seed: int = 0, tasks: tuple[str, ...] = TASKS) -> list[Problem]:
    """`n` problems cycling through `tasks`, deterministic by seed."""
    unknown = [t for t in tasks if t not in _MAKERS]
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}; known: {', '.join(TASKS)}")
    rng = random.Random(f"builtin-verifiable:{seed}")
    return [_MAKERS[tasks[i % len(tasks)]](rng) for i in range(n)]


def generate_verifiable_prompts(n: int, seed: int = 0) -> list[dict[str, str]]:
    """`n` records {"prompt", "answer", "task"} a verifier can check without a model."""
    return [{"prompt": p.prompt, "answer": p.answer, "task": p.task} for p in generate_problems(n, seed)]
