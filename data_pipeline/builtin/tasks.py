"""Instruction, conversation and preference data derived from built-in stories.

Every record is built from a generated `Story` and its facts, so the answers are right by
construction: write a story about X, summarise this story, how did X feel, continue the
story, give it a title, answer a question about it, plus small word problems with worked
solutions. Formats:

  instructions   {"instruction", "input", "output"}                 (Alpaca style, Taori et al. 2023)
  conversations  {"messages": [{"role", "content"}, ...]}           (OpenAI chat messages)
  preferences    {"prompt", "chosen", "rejected"}                   (DPO pairs, Rafailov et al. 2023)

A rejected story is the chosen one degraded: sentences shuffled, a sentence repeated, or
cut off mid-way — the failure modes of small language models.
"""
from __future__ import annotations

import random
import re

from data_pipeline.builtin.stories import Story, generate_story
from data_pipeline.builtin.verifiable import generate_problems

SYSTEM_PROMPTS = (
    "You are a helpful assistant.",
    "You are a friendly storyteller who writes short, simple stories for young children.",
    "You are a kind assistant. Answer clearly and simply.",
)


def _story(rng: random.Random) -> Story:
    return generate_story(rng.randrange(2**31), rng.randrange(2**31))


def story_request(story: Story, rng: random.Random) -> str:
    """A user request that the story answers."""
    s = story.slots
    options = (
        f"Write a short story about a {s['hero_desc']} named {s['hero']}.",
        f"Tell me a story for children in which {story.summary[:-1]}.",
        f"Write a short, simple story with the title \"{story.title}\".",
        f"Can you write a bedtime story about {s['hero']}?",
        f"Write a short story for children that includes this sentence: {story.moral}",
    )
    return rng.choice(options)


def split_sentences(text: str) -> list[str]:
    """Split prose into sentences at . ! ? (keeping a closing quote with its sentence)."""
    return [p for p in re.split(r'(?:(?<=[.!?])|(?<=[.!?]["”]))\s+(?=["“]?[A-Z])', text.strip()) if p]


def swap_names(text: str, a: str, b: str) -> str:
    """Exchange two names in a text ('Eli helped Emma.' -> 'Emma helped Eli.')."""
    return re.sub(rf"\b({re.escape(a)}|{re.escape(b)})\b", lambda m: b if m.group(1) == a else a, text)


def degrade(story_text: str, rng: random.Random) -> tuple[str, str]:
    """A worse version of a story and how it was made worse: shuffled, repeated or truncated.

    The paragraph layout is kept (same number of paragraphs and sentences per paragraph for
    a shuffle), so the only difference from the good story is the quality of the text.
    """
    paragraphs = [split_sentences(p) for p in story_text.split("\n")]
    flat = [x for p in paragraphs for x in p]
    kind = rng.choice(("shuffled", "repeated", "truncated"))
    if kind == "shuffled" and len(set(flat)) > 1:
        shuffled = flat[:]
        while shuffled == flat:
            rng.shuffle(shuffled)
        it = iter(shuffled)
        return "\n".join(" ".join(next(it) for _ in p) for p in paragraphs), kind
    if kind == "repeated":
        p = rng.randrange(len(paragraphs))
        i = rng.randrange(len(paragraphs[p]))
        para = paragraphs[p]
        paragraphs[p] = para[: i + 1] + [para[i]] * rng.randint(2, 4) + para[i + 1:]
        return "\n".join(" ".join(x) for x in paragraphs), "repeated"
    spaces = [m.start() for m in re.finditer(r"\s", story_text)]
    cut = spaces[rng.randint(len(spaces) // 4, len(spaces) // 2)]
    return story_text[:cut], "truncated"


def _feeling_answer(story: Story) -> str:
    s = story.slots
    return (f"At first, {s['hero']} felt {story.feeling_start} {story.reason}. "
            f"At the end, {s['he']} felt {story.feeling_end}.")


def instruction_from_story(story: Story, rng: random.Random) -> dict[str, str]:
    """One {"instruction", "input", "output"} record about a story."""
    s = story.slots
    kind = rng.choice(("write", "summarize", "feeling", "continue", "title", "question", "lesson"))
    if kind == "write":
        return {"instruction": story_request(story, rng), "input": "", "output": story.text}
    if kind == "summarize":
        instruction = rng.choice(("Summarize this story in one sentence.",
                                  "What is this story about? Answer in one sentence."))
        return {"instruction": instruction, "input": story.text, "output": story.summary}
    if kind == "feeling":
        return {"instruction": f"How did {s['hero']} feel in this story, and why?",
                "input": story.text, "output": _feeling_answer(story)}
    if kind == "continue":
        return {"instruction": "Continue the story.", "input": "\n".join(story.paragraphs[:2]),
                "output": "\n".join(story.paragraphs[2:])}
    if kind == "title":
        return {"instruction": "Give this story a short title.", "input": story.text, "output": story.title}
    if kind == "question" or not story.moral.startswith(f"{s['hero']} learned"):
        question, answer = rng.choice(story.questions)
        return {"instruction": f"Read the story and answer the question: {question}",
                "input": story.text, "output": answer}
    return {"instruction": f"What did {s['hero']} learn in this story?", "input": story.text,
            "output": story.moral}


def generate_instructions(n: int, seed: int = 0) -> list[dict[str, str]]:
    """`n` Alpaca-style records: story tasks, and one in six a word problem with its solution."""
    rng = random.Random(f"builtin-instructions:{seed}")
    problems = iter(generate_problems(n, seed, tasks=("addition", "subtraction", "multiplication",
                                                      "division", "counting")))
    out = []
    for _ in range(n):
        if rng.random() < 1 / 6:
            p = next(problems)
            out.append({"instruction": p.prompt, "input": "", "output": p.solution})
        else:
            out.append(instruction_from_story(_story(rng), rng))
    return out


def _story_conversation(rng: random.Random) -> list[dict[str, str]]:
    story = _story(rng)
    s = story.slots
    turns = [(story_request(story, rng), story.text)]
    follow_ups = [
        ("Can you give it a title?", story.title),
        ("Please sum it up in one sentence.", story.summary),
        (f"How did {s['hero']} feel?", _feeling_answer(story)),
        *story.questions,
    ]
    turns += rng.sample(follow_ups, rng.randint(1, 3))
    return [m for user, assistant in turns
            for m in ({"role": "user", "content": user}, {"role": "assistant", "content": assistant})]


def _math_conversation(rng: random.Random) -> list[dict[str, str]]:
    x, y, z = rng.randint(1, 20), rng.randint(1, 20), rng.randint(1, 10)
    return [
        {"role": "user", "content": f"What is {x} + {y}?"},
        {"role": "assistant", "content": f"{x} + {y} = {x + y}."},
        {"role": "user", "content": f"And if I take away {z}?"},
        {"role": "assistant", "content": f"{x + y} - {z} = {x + y - z}."},
    ]


def generate_conversations(n: int, seed: int = 0) -> list[dict[str, list[dict[str, str]]]]:
    """`n` multi-turn chats {"messages": [...]} (roles system/user/assistant), user first."""
    rng = random.Random(f"builtin-conversations:{seed}")
    out = []
    for _ in range(n):
        messages = _math_conversation(rng) if rng.random() < 0.15 else _story_conversation(rng)
        if rng.random() < 0.5:
            messages = [{"role": "system", "content": rng.choice(SYSTEM_PROMPTS)}] + messages
        out.append({"messages": messages})
    return out


def generate_preferences(n: int, seed: int = 0) -> list[dict[str, str]]:
    """`n` pairs {"prompt", "chosen", "rejected"}: a good answer and a worse one.

    Mostly a story request answered by the story (chosen) and a degraded copy (rejected);
    some are questions about a story answered right (chosen) or wrongly, with the two
    characters' names swapped (rejected).
    """
    rng = random.Random(f"builtin-preferences:{seed}")
    out = []
    for _ in range(n):
        story = _story(rng)
        if rng.random() < 0.25:
            question, answer = rng.choice(story.questions)
            wrong = swap_names(answer, story.hero.name, story.friend.name)
            if wrong == answer:  # no name to swap: answer with another story's answer instead
                other = _story(rng)
                wrong = rng.choice([a for _, a in other.questions if a != answer] or [other.summary])
            out.append({"prompt": f"{story.text}\n\n{question}", "chosen": answer, "rejected": wrong})
        else:
            rejected, _ = degrade(story.text, rng)
            out.append({"prompt": story_request(story, rng), "chosen": story.text, "rejected": rejected})
    return out
