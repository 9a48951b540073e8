"""Small English grammar helpers for the built-in corpus: articles, pronouns, plurals, numbers.

The generated stories must be grammatical so that a tiny model learns real English: "an owl"
but "a unicorn", "she was" but "they were", "one apple" but "two apples". Every rule the
templates rely on lives here as a small pure function.
"""
from __future__ import annotations

import re

# Words that start with a vowel letter but a consonant sound ("a unicorn", "a one-eyed cat"),
# and words that start with a silent h ("an hour", "an honest fox").
_CONSONANT_SOUND_PREFIXES = ("uni", "use", "usu", "one", "eu", "ukulele")
_VOWEL_SOUND_PREFIXES = ("hour", "honest", "honor", "heir")

PRONOUNS: dict[str, dict[str, str]] = {
    "he": {"he": "he", "him": "him", "his": "his", "hers": "his", "self": "himself",
           "was": "was", "is": "is", "has": "has", "does": "does"},
    "she": {"he": "she", "him": "her", "his": "her", "hers": "hers", "self": "herself",
            "was": "was", "is": "is", "has": "has", "does": "does"},
    "they": {"he": "they", "him": "them", "his": "their", "hers": "theirs", "self": "themselves",
             "was": "were", "is": "are", "has": "have", "does": "do"},
}

_NUMBER_WORDS = [
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
    "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen",
    "nineteen", "twenty",
]


def article(phrase: str) -> str:
    """The indefinite article for a noun phrase: 'an' before a vowel sound, else 'a'."""
    word = phrase.strip().lower()
    if word.startswith(_VOWEL_SOUND_PREFIXES):
        return "an"
    if word.startswith(_CONSONANT_SOUND_PREFIXES):
        return "a"
    return "an" if word[:1] in "aeiou" else "a"


def capitalize(text: str) -> str:
    """Upper-case the first letter only ('the park' -> 'The park'; 'iPad' keeps the rest)."""
    return text[:1].upper() + text[1:]


def number_word(n: int) -> str:
    """0..20 as a word, larger numbers as digits (as children's books write them)."""
    return _NUMBER_WORDS[n] if 0 <= n < len(_NUMBER_WORDS) else str(n)


def count_phrase(n: int, singular: str, plural: str) -> str:
    """'one apple', 'three apples' (the caller gives both forms: English plurals are irregular)."""
    return f"{number_word(n)} {singular if n == 1 else plural}"


def join_list(items: list[str]) -> str:
    """'a', 'a and b', 'a, b and c' (no Oxford comma, as most children's books)."""
    if not items:
        raise ValueError("join_list needs at least one item")
    if len(items) == 1:
        return items[0]
    return ", ".join(items[:-1]) + " and " + items[-1]


def pronoun_slots(prefix: str, pronoun: str) -> dict[str, str]:
    """Template slots for one character's pronoun set and the verbs that agree with it.

    pronoun_slots("f_", "they") -> {"f_he": "they", "f_him": "them", "f_was": "were", ...}.
    Capitalised variants ({He}, {F_was}) are added for every slot by `add_capitalized`.
    """
    return {prefix + key: value for key, value in PRONOUNS[pronoun].items()}


def add_capitalized(slots: dict[str, str]) -> dict[str, str]:
    """Add a sentence-start variant of every slot: {he} -> {He}, {friend_first} -> {Friend_first}."""
    out = dict(slots)
    for key, value in slots.items():
        out.setdefault(capitalize(key), capitalize(value))
    return out


_SLOT = re.compile(r"\{([A-Za-z_]+)\}")


def fill(template: str, slots: dict[str, str]) -> str:
    """Fill {slot} names in a template; a missing slot is a bug in the templates (KeyError)."""
    return _SLOT.sub(lambda m: slots[m.group(1)], template)


def fix_articles(text: str) -> str:
    """Repair 'a'/'an' in front of words that a template slot filled in ('a {color} kite').

    Only the standalone lower- or title-case words 'a'/'an' followed by a word are changed.
    """
    def repl(m: re.Match) -> str:
        art, word = m.group(1), m.group(2)
        right = article(word)
        if art[0].isupper():
            right = capitalize(right)
        return f"{right} {word}"

    return re.sub(r"\b([Aa]n?) ([A-Za-z][\w-]*)", repl, text)
