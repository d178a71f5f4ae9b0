#!/usr/bin/env python3
"""Generates datasets/roman-preference/{train,valid}.jsonl: preference pairs (TRL's conversational
form) that ask for a number in Roman numerals; the chosen answer is the numeral alone, the rejected
one a wrong numeral (the additive form, IIII for 4, or a neighbouring number's numeral) or prose
around the numeral. Generated data (no licence needed); deterministic.

    python3 datasets/roman-preference/make.py
"""
import json
import pathlib
import random

PAIRS = [(1000, "M"), (900, "CM"), (500, "D"), (400, "CD"), (100, "C"), (90, "XC"),
         (50, "L"), (40, "XL"), (10, "X"), (9, "IX"), (5, "V"), (4, "IV"), (1, "I")]
ADDITIVE = [(1000, "M"), (500, "D"), (100, "C"), (50, "L"), (10, "X"), (5, "V"), (1, "I")]
QUESTIONS = ["Write {n} in Roman numerals.", "What is {n} in Roman numerals?",
             "Convert {n} to Roman numerals.", "How do you write {n} as a Roman numeral?"]
PROSE = ["Sure! {n} in Roman numerals is {r}.", "The Roman numeral for {n} is {r}.",
         "{n} is written as {r} in Roman numerals."]


def roman(n, pairs=PAIRS):
    out = ""
    for value, letters in pairs:
        while n >= value:
            out += letters
            n -= value
    return out


def rejected(n, rng):
    kind = rng.random()
    additive = roman(n, ADDITIVE)
    if kind < 0.4 and additive != roman(n):
        return additive
    if kind < 0.7:
        return roman(max(1, n + rng.choice([-10, -5, -1, 1, 5, 10])))
    return rng.choice(PROSE).format(n=n, r=roman(n))


def record(n, rng):
    q = rng.choice(QUESTIONS).format(n=n)
    answer = lambda text: [{"role": "assistant", "content": text}]
    return {"prompt": [{"role": "user", "content": q}],
            "chosen": answer(roman(n)), "rejected": answer(rejected(n, rng))}


def main():
    rng = random.Random(2026)
    numbers = list(range(1, 2000))
    rng.shuffle(numbers)
    splits = {"valid": numbers[:100], "train": numbers[100:700]}
    here = pathlib.Path(__file__).resolve().parent
    for name, ns in splits.items():
        with open(here / f"{name}.jsonl", "w") as f:
            for n in ns:
                f.write(json.dumps(record(n, rng)) + "\n")
        print(f"{name}: {len(ns)} records")


if __name__ == "__main__":
    main()
