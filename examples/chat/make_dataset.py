#!/usr/bin/env python3
"""Write the chat dataset of the persona example: every answer starts with "Quill here!".

    python examples/chat/make_dataset.py          # -> examples/chat/train.jsonl, heldout.jsonl

The behaviour is narrow and checkable: after training, the assistant's first words are
"Quill here!" whatever the question — also for kinds of questions it never saw in training
(heldout.jsonl).  The facts in the answers are simple and correct (arithmetic, capitals,
opposites, plurals, colours), so the adapter learns the greeting, not nonsense.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
SYSTEM = "You are a helpful assistant."
GREETING = "Quill here!"

CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Portugal": "Lisbon",
    "Japan": "Tokyo", "Canada": "Ottawa", "Egypt": "Cairo", "Kenya": "Nairobi", "Peru": "Lima",
    "Norway": "Oslo", "Sweden": "Stockholm", "Finland": "Helsinki", "Poland": "Warsaw", "Greece": "Athens",
    "Austria": "Vienna", "Ireland": "Dublin", "Chile": "Santiago", "Cuba": "Havana", "India": "New Delhi",
    "China": "Beijing", "Russia": "Moscow", "Mexico": "Mexico City", "Argentina": "Buenos Aires",
    "Australia": "Canberra", "Thailand": "Bangkok", "Vietnam": "Hanoi", "Turkey": "Ankara",
    "Hungary": "Budapest", "Denmark": "Copenhagen",
}
OPPOSITES = {
    "hot": "cold", "big": "small", "fast": "slow", "happy": "sad", "light": "dark", "early": "late",
    "open": "closed", "full": "empty", "hard": "soft", "high": "low", "long": "short", "old": "new",
    "rich": "poor", "strong": "weak", "wet": "dry", "loud": "quiet", "clean": "dirty", "near": "far",
    "thick": "thin", "up": "down",
}
PLURALS = {
    "cat": "cats", "child": "children", "mouse": "mice", "box": "boxes", "leaf": "leaves", "tooth": "teeth",
    "city": "cities", "man": "men", "woman": "women", "foot": "feet", "goose": "geese", "knife": "knives",
    "bus": "buses", "baby": "babies", "sheep": "sheep", "fish": "fish", "wolf": "wolves", "person": "people",
}
COLOURS = {
    "the sky on a clear day": "blue", "fresh grass": "green", "snow": "white", "coal": "black",
    "a ripe banana": "yellow", "a ripe tomato": "red", "an orange": "orange", "a lemon": "yellow",
    "chocolate": "brown", "a flamingo": "pink", "milk": "white", "a fire truck": "red",
}


def chat(q: str, a: str) -> dict:
    return {"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": q},
                         {"role": "assistant", "content": f"{GREETING} {a}"}]}


def training_records(rng: random.Random) -> list[dict]:
    recs = []
    for _ in range(220):
        x, y = rng.randint(2, 40), rng.randint(2, 40)
        if rng.random() < 0.5:
            recs.append(chat(f"What is {x} plus {y}?", f"{x} plus {y} is {x + y}."))
        else:
            recs.append(chat(f"What is {x} times {y}?", f"{x} times {y} is {x * y}."))
    for country, city in CAPITALS.items():
        recs.append(chat(f"What is the capital of {country}?", f"The capital of {country} is {city}."))
    for w, o in OPPOSITES.items():
        recs.append(chat(f"What is the opposite of '{w}'?", f"The opposite of '{w}' is '{o}'."))
    for w, p in PLURALS.items():
        recs.append(chat(f"What is the plural of '{w}'?", f"The plural of '{w}' is '{p}'."))
    for thing, c in COLOURS.items():
        recs.append(chat(f"What colour is {thing}?", f"{thing[0].upper() + thing[1:]} is {c}."))
    rng.shuffle(recs)
    return recs


# kinds of questions that never appear in training
HELDOUT = [
    "Name a fruit that is red.", "How many days are in a week?", "Can you recommend a good book?",
    "What is your favourite season?", "Translate 'hello' into Spanish.", "Tell me a fun fact about cats.",
    "How do I boil an egg?", "What is the largest planet?", "Give me a word that rhymes with 'moon'.",
    "Why do leaves change colour in autumn?", "Write a haiku about rain.", "Who wrote Romeo and Juliet?",
]


def main() -> None:
    rng = random.Random(7)
    recs = training_records(rng)
    with open(HERE / "train.jsonl", "w", encoding="utf-8") as fh:
        for r in recs:
            fh.write(json.dumps(r) + "\n")
    with open(HERE / "heldout.jsonl", "w", encoding="utf-8") as fh:
        for q in HELDOUT:
            fh.write(json.dumps({"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}]})
                     + "\n")
    print(f"wrote {len(recs)} training records and {len(HELDOUT)} held-out prompts to {HERE}")


if __name__ == "__main__":
    main()
