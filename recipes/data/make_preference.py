"""Make the DPO example's preference pairs (deterministic, seed 0): short questions, each with a direct answer
(chosen) and a short evasive one (rejected).

The instruct model already ranks these pairs right, by a small margin; a few minutes of DPO with LoRA widens
the margin (chosen minus rejected log-probability) on the held-out questions several times over.
Run: python recipes/data/make_preference.py   (writes preference/train.jsonl and preference/eval.jsonl)
"""

import json
import random
from pathlib import Path

CAPITALS = {
    "France": "Paris",
    "Japan": "Tokyo",
    "Italy": "Rome",
    "Spain": "Madrid",
    "Germany": "Berlin",
    "Canada": "Ottawa",
    "Egypt": "Cairo",
    "Kenya": "Nairobi",
    "Peru": "Lima",
    "Norway": "Oslo",
    "Greece": "Athens",
    "Poland": "Warsaw",
    "Chile": "Santiago",
    "Cuba": "Havana",
    "Ireland": "Dublin",
    "Portugal": "Lisbon",
    "Austria": "Vienna",
    "Sweden": "Stockholm",
    "Thailand": "Bangkok",
    "Vietnam": "Hanoi",
}
COLOURS = {
    "grass": "green",
    "the sky on a clear day": "blue",
    "snow": "white",
    "coal": "black",
    "a ripe banana": "yellow",
}
EVASIVE = ["I'm not sure.", "I can't answer that.", "Sorry, I don't know.", "Hard to say."]


def questions() -> list[tuple[str, str]]:
    out = [(f"What is the capital of {c}?", f"The capital of {c} is {city}.") for c, city in CAPITALS.items()]
    out += [
        (f"What colour is {thing}?", f"{thing[0].upper() + thing[1:]} is {colour}.")
        for thing, colour in COLOURS.items()
    ]
    for a in range(2, 12):
        for b in (3, 4, 7):
            out.append((f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}."))
            out.append((f"What is {a} times {b}?", f"{a} times {b} is {a * b}."))
    return out


def main() -> None:
    rng = random.Random(0)
    items = questions()
    rng.shuffle(items)
    pairs = [{"prompt": q, "chosen": good, "rejected": rng.choice(EVASIVE)} for q, good in items]
    held, train = pairs[:24], pairs[24:]
    folder = Path(__file__).resolve().parent / "preference"
    folder.mkdir(exist_ok=True)
    (folder / "train.jsonl").write_text("".join(json.dumps(p) + "\n" for p in train), encoding="utf-8")
    system = "Answer briefly and directly."
    with (folder / "eval.jsonl").open("w", encoding="utf-8") as f:  # the same pairs as message lists
        for p in held:
            row = {
                "prompt": [{"role": "system", "content": system}, {"role": "user", "content": p["prompt"]}],
                "chosen": [{"role": "assistant", "content": p["chosen"]}],
                "rejected": [{"role": "assistant", "content": p["rejected"]}],
            }
            f.write(json.dumps(row) + "\n")
    print(f"wrote {len(train)} train and {len(held)} eval pairs to {folder}")


if __name__ == "__main__":
    main()
