"""The built-in story generator: simple, grammatical children's stories, any number, by seed.

Each story picks characters, a place, the weather, a thing, and one plot from `plots.py` /
`plots_more.py`, then fills the plot's templates. The result keeps its facts (who, what,
where, how the hero felt, the moral) so `tasks.py` and `verifiable.py` can derive instructions,
questions and checkable answers from the same story. Stories are four short paragraphs:
setup, problem and attempt, help and resolution, ending with a moral — the arc of the
TinyStories corpus (Eldan & Li 2023, "TinyStories: How Small Can Language Models Be and
Still Speak Coherent English?").

Story `i` of seed `s` depends only on (s, i), so any prefix or slice of the stream can be
generated on its own.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field

from data_pipeline.builtin import lexicon as lx
from data_pipeline.builtin.grammar import add_capitalized, fill, fix_articles, pronoun_slots
from data_pipeline.builtin.plots import PLOTS_PART1, Plot
from data_pipeline.builtin.plots_more import PLOTS_PART2

PLOTS: tuple[Plot, ...] = PLOTS_PART1 + PLOTS_PART2

OPENINGS = (
    "Once upon a time, there was a {hero_desc} named {hero}.",
    "Once upon a time, in a quiet little town, there lived a {hero_desc} called {hero}.",
    "There once was a {hero_desc} named {hero}.",
    "In a cozy little house, there lived a {hero_desc} named {hero}.",
    "{Hero} was a {hero_desc} with a big smile.",
    "Not long ago, there was a {hero_desc}. {His} name was {hero}.",
)
DESCRIPTIONS = (
    "{He} loved to {activity}.",
    "Every day, {he} liked to {activity}.",
    "{His} favorite thing to do was to {activity}.",
    "More than anything, {hero} liked to {activity}.",
)
FRIEND_INTROS = (
    "{His} best friend was a {friend_desc} named {friend}.",
    "{He} had a good friend, a {friend_desc} named {friend}.",
)
SETTINGS = (
    "{Time}, {hero} {go_place}.",
    "{Time}, {hero} was {at_place}.",
)
FEELING_ENDINGS = (
    "Now {hero} felt {good}.",
    "{Hero} smiled. {He} felt so {good}.",
    "That night, {hero} went to bed feeling {good}.",
    "In the end, {hero} felt {good}.",
)
CLOSINGS = ("", "", "", "The end.", "And that was a very good day.")


@dataclass(frozen=True)
class Character:
    """A story character: 'a curious owl named Pip' (he) or 'a kind child named Alex' (they)."""

    name: str
    kind: str
    pronoun: str
    adjective: str
    is_animal: bool

    @property
    def description(self) -> str:
        return f"{self.adjective} {self.kind}"


@dataclass(frozen=True)
class Story:
    """A generated story and the facts it was built from."""

    text: str
    paragraphs: tuple[str, ...]
    plot: str
    title: str
    summary: str
    moral: str
    feeling_start: str
    feeling_end: str
    reason: str                       # why the hero felt feeling_start, filled in
    questions: tuple[tuple[str, str], ...]
    hero: Character
    friend: Character
    slots: dict[str, str] = field(repr=False)


def title_case(text: str) -> str:
    """'ride a bike' -> 'Ride a Bike' (small words stay lower case except at the start)."""
    small = {"a", "an", "the", "of", "to", "in", "on", "and", "his", "her", "their"}
    words = text.split()
    return " ".join(w if (i and w in small) else w[:1].upper() + w[1:] for i, w in enumerate(words))


def make_character(rng: random.Random, taken: set[str], animal: bool | None = None) -> Character:
    """A random character whose name is not in `taken` (so two characters never share a name)."""
    if animal is None:
        animal = rng.random() < 0.5
    if animal:
        kind = rng.choice(lx.ANIMALS)[0]
        pronoun = rng.choice(("he", "she"))
        names = lx.ANIMAL_NAMES
    else:
        pronoun = rng.choices(("he", "she", "they"), weights=(45, 45, 10))[0]
        kind = rng.choice(lx.HUMAN_KINDS[pronoun])
        names = {"he": lx.BOY_NAMES, "she": lx.GIRL_NAMES, "they": lx.THEY_NAMES}[pronoun]
    name = rng.choice([n for n in names if n not in taken])
    return Character(name, kind, pronoun, rng.choice(lx.CHARACTER_ADJECTIVES), animal)


def _pick_place(rng: random.Random, plot: Plot) -> tuple:
    places = [p for p in lx.PLACES
              if (not plot.places or p[0] in plot.places)
              and (plot.outdoor is None or p[3] == plot.outdoor)
              and (not plot.needs_trees or p[4])]
    return rng.choice(places)


def _pick_toy(rng: random.Random, plot: Plot) -> tuple:
    toys = [t for t in lx.TOYS
            if plot.toy == "any" or (plot.toy == "fly" and t[1]) or (plot.toy == "break" and t[2])]
    return rng.choice(toys)


def story_slots(rng: random.Random, plot: Plot, hero: Character, friend: Character,
                friend_introduced: bool) -> dict[str, str]:
    """Every {slot} a plot template may use, filled for one story (capitalised variants too)."""
    place = _pick_place(rng, plot)
    toy = _pick_toy(rng, plot)
    helper, helper_pronoun = rng.choice(lx.HELPERS)
    animal, animal_problem = rng.choice(lx.HURT_ANIMALS)
    skill = rng.choice(lx.SKILLS)
    food = rng.choice(lx.FOODS)
    obj = f"{rng.choice(lx.COLORS)} {toy[0]}" if rng.random() < 0.7 else toy[0]
    friend_full = f"{fix_articles('a ' + friend.description)} named {friend.name}"
    slots = {
        "hero": hero.name, "kind": hero.kind, "hero_desc": hero.description,
        "friend": friend.name, "f_kind": friend.kind, "friend_desc": friend.description,
        "friend_first": friend.name if friend_introduced else friend_full,
        "helper": helper, "helper_rel": helper.lower(),
        "obj": obj, "obj_noun": toy[0], "obj_title": title_case(toy[0]),
        "place": place[0], "at_place": place[1], "go_place": place[2],
        "spot": rng.choice(lx.OUTDOOR_SPOTS if place[3] else lx.INDOOR_SPOTS),
        "food": food, "food_title": title_case(food),
        "animal": animal, "animal_title": title_case(animal), "animal_problem": animal_problem,
        "bad": rng.choice(plot.bad_feelings), "good": rng.choice(plot.good_feelings),
        "time": rng.choice(lx.TIMES),
        **pronoun_slots("", hero.pronoun), **pronoun_slots("f_", friend.pronoun),
        **pronoun_slots("h_", helper_pronoun),
    }
    slots["activity"] = fill(rng.choice(lx.ACTIVITIES), slots)
    slots["skill"] = fill(skill[0], slots)
    slots["skill_title"] = title_case(slots["skill"])
    slots = add_capitalized(slots)
    for key, template in zip(("skill_try", "skill_fail", "skill_win"), skill[1:]):
        slots[key] = fill(template, slots)
    return add_capitalized(slots)


def _render(template: str, slots: dict[str, str]) -> str:
    return fix_articles(fill(template, slots))


def generate_story(seed: int, index: int) -> Story:
    """Story number `index` of the stream `seed` (depends on nothing else)."""
    rng = random.Random(f"builtin-story:{seed}:{index}")
    plot = rng.choice(PLOTS)
    hero = make_character(rng, set())
    friend = make_character(rng, {hero.name}, animal=hero.is_animal if rng.random() < 0.7 else None)
    friend_introduced = plot.friend_in_opening and rng.random() < 0.4
    slots = story_slots(rng, plot, hero, friend, friend_introduced)
    weather = rng.choice(plot.weather)

    linked_index = rng.randrange(len(plot.help))

    def pick(options: tuple[str, ...], stage: str = "") -> str:
        i = linked_index if stage in plot.linked else rng.randrange(len(options))
        return _render(options[i], slots)

    intro = [pick(OPENINGS), pick(DESCRIPTIONS)]
    if friend_introduced:
        intro.append(pick(FRIEND_INTROS))
    intro.append(pick(SETTINGS))
    if plot.weather != ("rainy",):  # rain-only plots bring the rain in themselves
        intro.append(rng.choice(lx.WEATHER[weather]))
    moral = pick(plot.moral)
    closing = rng.choice(CLOSINGS)
    paragraphs = (
        " ".join(intro),
        pick(plot.problem, "problem") + " " + pick(plot.attempt, "attempt"),
        pick(plot.help, "help") + " " + pick(plot.resolution, "resolution"),
        " ".join(s for s in (pick(FEELING_ENDINGS), moral, closing) if s),
    )
    return Story(
        text="\n".join(paragraphs),
        paragraphs=paragraphs,
        plot=plot.name,
        title=pick(plot.titles),
        summary=_render(plot.summary, slots),
        moral=moral,
        feeling_start=slots["bad"],
        feeling_end=slots["good"],
        reason=_render(plot.reason, slots),
        questions=tuple((_render(q, slots), _render(a, slots)) for q, a in plot.questions),
        hero=hero,
        friend=friend,
        slots=slots,
    )


def generate_story_records(n: int, seed: int = 0, start: int = 0) -> list[Story]:
    """Stories start..start+n-1 of the stream `seed`, with their facts."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    return [generate_story(seed, start + i) for i in range(n)]


def generate_stories(n: int, seed: int = 0, start: int = 0) -> list[str]:
    """`n` story texts (paragraphs separated by newlines), deterministic in (seed, start)."""
    return [s.text for s in generate_story_records(n, seed, start)]
