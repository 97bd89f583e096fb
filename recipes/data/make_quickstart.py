"""Make the quickstart dataset: order messages -> one-line JSON records (deterministic, seed 0).

The base model answers such requests in prose; after a few minutes of LoRA it answers with the
exact JSON shape, so the change is visible in the eval loss and in a generation.
Run: python recipes/data/make_quickstart.py   (writes quickstart/train.jsonl and quickstart/eval.jsonl)
"""

import json
import random
from pathlib import Path

FIRST = [
    "Maria",
    "John",
    "Aisha",
    "Wei",
    "Lukas",
    "Sofia",
    "Omar",
    "Emma",
    "Raj",
    "Chloe",
    "Diego",
    "Hana",
    "Ivan",
    "Grace",
    "Tariq",
    "Nora",
    "Pablo",
    "Yuki",
    "Ben",
    "Leila",
]
LAST = [
    "Lopez",
    "Smith",
    "Khan",
    "Chen",
    "Weber",
    "Rossi",
    "Haddad",
    "Brown",
    "Patel",
    "Martin",
    "Garcia",
    "Sato",
    "Petrov",
    "Kim",
    "Nasser",
    "Berg",
    "Ruiz",
    "Tanaka",
    "Cohen",
    "Silva",
]
ITEMS = [
    "mug",
    "notebook",
    "lamp",
    "backpack",
    "umbrella",
    "scarf",
    "water bottle",
    "desk chair",
    "phone case",
    "teapot",
    "towel",
    "pillow",
    "candle",
    "headphones",
    "keyboard",
]
COLORS = ["red", "blue", "green", "black", "white", "yellow", "grey", "purple", "orange", "pink"]
CITIES = [
    "Lisbon",
    "Berlin",
    "Nairobi",
    "Osaka",
    "Toronto",
    "Lima",
    "Cairo",
    "Oslo",
    "Madrid",
    "Seoul",
    "Dublin",
    "Austin",
    "Milan",
    "Prague",
    "Delhi",
]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
TEMPLATES = [
    "Hi, this is {name}. I'd like {qty} {color} {items} delivered to {city} by {day}, please.",
    "Please send {qty} {color} {items} to {city}. Needed by {day}. Thanks, {name}",
    "{name} here - could you ship {qty} {items} in {color} to my address in {city} before {day}?",
    "Order for {name}: {qty} x {item} ({color}), deliver to {city}, deadline {day}.",
    "Can I get {qty} {color} {items}? I live in {city} and need them by {day}. - {name}",
    "Hello! {name} from {city}. I need {qty} {items}, {color} if possible, by {day}.",
]
SYSTEM = "Extract the order as one line of JSON with keys name, item, quantity, color, city, deliver_by."


def example(rng: random.Random) -> dict:
    name = f"{rng.choice(FIRST)} {rng.choice(LAST)}"
    item, color, city, day = rng.choice(ITEMS), rng.choice(COLORS), rng.choice(CITIES), rng.choice(DAYS)
    qty = rng.randint(1, 12)
    items = item if qty == 1 else (item + "es" if item.endswith("ch") else item + "s")
    text = rng.choice(TEMPLATES).format(name=name, qty=qty, color=color, item=item, items=items, city=city, day=day)
    answer = {"name": name, "item": item, "quantity": qty, "color": color, "city": city, "deliver_by": day}
    return {
        "messages": [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": text},
            {"role": "assistant", "content": json.dumps(answer)},
        ]
    }


def main() -> None:
    rng = random.Random(0)
    out = Path(__file__).parent / "quickstart"
    out.mkdir(exist_ok=True)
    for name, n in (("train", 240), ("eval", 40)):
        with (out / f"{name}.jsonl").open("w", encoding="utf-8") as f:
            for _ in range(n):
                f.write(json.dumps(example(rng)) + "\n")


if __name__ == "__main__":
    main()
