#!/usr/bin/env python3
"""Generates datasets/roman-numerals/{train,valid,test}.jsonl: chat records that ask for a number in
Roman numerals and answer with the numeral alone. Generated data (no licence needed); deterministic.

    python3 datasets/roman-numerals/make.py
"""
import json
import pathlib
import random

PAIRS = [(1000, "M"), (900, "CM"), (500, "D"), (400, "CD"), (100, "C"), (90, "XC"),
         (50, "L"), (40, "XL"), (10, "X"), (9, "IX"), (5, "V"), (4, "IV"), (1, "I")]
QUESTIONS = ["Write {n} in Roman numerals.", "What is {n} in Roman numerals?",
             "Convert {n} to Roman numerals.", "How do you write {n} as a Roman numeral?"]


def roman(n):
    out = ""
    for value, letters in PAIRS:
        while n >= value:
            out += letters
            n -= value
    return out


def record(n, rng):
    q = rng.choice(QUESTIONS).format(n=n)
    return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": roman(n)}]}


def main():
    rng = random.Random(2024)
    numbers = list(range(1, 2000))
    rng.shuffle(numbers)
    splits = {"test": numbers[:100], "valid": numbers[100:200], "train": numbers[200:1400]}
    here = pathlib.Path(__file__).resolve().parent
    for name, ns in splits.items():
        with open(here / f"{name}.jsonl", "w") as f:
            for n in ns:
                f.write(json.dumps(record(n, rng)) + "\n")
        print(f"{name}: {len(ns)} records")


if __name__ == "__main__":
    main()
