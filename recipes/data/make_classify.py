"""Make the classification example's support tickets (deterministic, seed 0): short customer messages in four
imbalanced classes, billing ~35%, technical ~30%, account ~20%, shipping ~15%.

Each class has many phrasings and some tickets name another class's words in passing (a login problem that
mentions an invoice), so the label follows from the meaning, not from one keyword. The same tickets are also
written as chat rows, to compare a label head (objective: classification) with instruction tuning.
Run: python recipes/data/make_classify.py
(writes classify/train.jsonl, eval.jsonl and the chat twins train-chat.jsonl, eval-chat.jsonl)
"""

import json
import random
from pathlib import Path

NAMES = [
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
PRODUCTS = [
    "wireless earbuds",
    "smart watch",
    "coffee grinder",
    "desk lamp",
    "robot vacuum",
    "yoga mat",
    "bluetooth speaker",
    "air purifier",
    "electric kettle",
    "gaming mouse",
    "standing desk",
    "baby monitor",
    "hiking backpack",
    "tablet stand",
]
DEVICES = ["iPhone", "Android phone", "iPad", "Windows laptop", "MacBook", "Chromebook", "Samsung tablet"]
BROWSERS = ["Chrome", "Firefox", "Safari", "Edge"]
ERRORS = ["error 500", "a blank white screen", "error code E42", "'something went wrong'", "a spinning wheel"]
PLANS = ["Basic", "Plus", "Premium", "Family", "Pro"]
CARRIERS = ["DHL", "UPS", "FedEx", "the postal service", "the courier"]
CITIES = ["Lisbon", "Berlin", "Nairobi", "Osaka", "Toronto", "Lima", "Cairo", "Oslo", "Madrid", "Dublin", "Austin"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October"]
WEEKDAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday"]
GREETINGS = ["", "", "", "Hi, ", "Hello, ", "Hi there, ", "Good morning, "]
SIGNOFFS = ["", "", "", " Thanks, {name}", " - {name}", " Regards, {name}", " Thank you!"]

TEMPLATES = {
    "billing": [
        "I was charged twice for order {order}, {amount} each time. Please refund the duplicate payment.",
        "my card was billed {amount} on {date} but I cancelled the {plan} plan the week before.",
        "could you send me an invoice for order {order}? Our accounts team needs it with our VAT number.",
        "the {plan} plan is advertised at {amount} a month, yet my statement shows a higher amount.",
        "I returned the {product} on {date} and still have not received the {amount} refund.",
        "why was I charged a {amount} fee? The checkout page said shipping was free.",
        "please switch my payment method to PayPal before the next renewal on {date}.",
        "the discount code was accepted at checkout but the {amount} was not taken off my total.",
        "I see a pending charge of {amount} from you that I don't recognise. What is it for?",
        "can I get a receipt for the {product}? I need it for my expense report.",
        "I downgraded to {plan} on {date} but was still charged the old price of {amount}.",
        "my bank says your payment of {amount} was declined three times, but I have enough funds. Please retry it.",
        "the app shows my subscription as active, but I was billed {amount} twice this month.",
        "I'd like to pay for order {order} in instalments rather than {amount} at once. Is that possible?",
    ],
    "technical": [
        "the app crashes every time I open the settings screen on my {device}.",
        "your website shows {error} when I try to check out in {browser}.",
        "my {product} stopped connecting to the app after yesterday's firmware update.",
        "the {product} turns on but the companion app can't find it over Bluetooth on my {device}.",
        "notifications stopped working on my {device} since the last update.",
        "I paid for order {order} fine, but the app freezes whenever I open the order history.",
        "the search bar on your site returns no results at all, even for '{product}'.",
        "the {product} keeps restarting by itself every few minutes. I already tried a factory reset.",
        "when I upload a photo in the app on my {device}, it spins forever and never finishes.",
        "the page loads without any images in {browser}; clearing the cache did not help.",
        "the download link in the confirmation email leads to {error}.",
        "since {date} the {product} has not synced with the app, so my data is missing.",
        "the tracking page itself is broken: it shows {error} instead of the map in {browser}.",
        "I can log in, but the dashboard shows {error} and none of the buttons respond.",
    ],
    "account": [
        "I forgot my password and the reset email never arrives at {email}.",
        "please change the email on my profile from {email} to my new work address.",
        "I'd like to delete my account and all the personal data you hold about me.",
        "someone changed my password without my permission. Please lock my account.",
        "I lost my phone and can't get the two-factor code to sign in. How do I recover access?",
        "my account was suspended on {date} and I don't know why. Can you reactivate it?",
        "how do I change the username on my profile? The settings page only lets me change the photo.",
        "I have two accounts, {email} and an older one, and want to merge them into one.",
        "I can't sign in to see my invoices: it says my email {email} is not registered.",
        "please add my partner as a second user on our {plan} household profile.",
        "I keep getting the verification email for an account I never created with {email}.",
        "I want to update my date of birth and phone number, but the profile form won't save them.",
        "my login stopped working after I changed my surname. The account is under {email}.",
        "how can I turn off marketing emails and make my profile private?",
    ],
    "shipping": [
        "my {product} (order {order}) was due on {date} but still hasn't arrived.",
        "tracking for order {order} has said 'in transit' with {carrier} for {days} days.",
        "the {product} arrived with a crushed box and a cracked cover. It was damaged in transit.",
        "can I change the delivery address for order {order} to my office in {city}?",
        "{carrier} marked my parcel as delivered on {date}, but nothing was left at my door.",
        "I paid for express delivery but order {order} is coming by standard post.",
        "do you ship to {city}? I'd like to send the {product} to my sister there.",
        "only half of order {order} arrived; the {product} was missing from the box.",
        "the courier left my package with a neighbour I don't know. Where exactly was it delivered?",
        "please hold order {order} at the {city} depot; I will be away until {weekday}.",
        "my parcel is stuck at customs in {city}. Do I need to send any documents?",
        "the app says order {order} shipped {days} days ago, but there is no tracking number.",
        "I received someone else's parcel instead of my {product}. How do I get mine?",
        "could the {product} be delivered on {weekday} instead? Nobody is home before then.",
    ],
}
SHARES = {"billing": 0.35, "technical": 0.30, "account": 0.20, "shipping": 0.15}
SYSTEM = "Classify the support ticket as one of: account, billing, shipping, technical. Answer with the label only."


def ticket(rng: random.Random, label: str) -> str:
    name = rng.choice(NAMES)
    slots = {
        "name": name,
        "product": rng.choice(PRODUCTS),
        "device": rng.choice(DEVICES),
        "browser": rng.choice(BROWSERS),
        "error": rng.choice(ERRORS),
        "plan": rng.choice(PLANS),
        "carrier": rng.choice(CARRIERS),
        "city": rng.choice(CITIES),
        "weekday": rng.choice(WEEKDAYS),
        "order": f"#{rng.randint(10000, 99999)}",
        "amount": f"${rng.randint(5, 250)}.{rng.choice(['00', '49', '99'])}",
        "date": f"{rng.choice(MONTHS)} {rng.randint(1, 28)}",
        "days": rng.randint(4, 15),
        "email": f"{name.lower()}{rng.randint(1, 99)}@example.com",
    }
    body = rng.choice(TEMPLATES[label]).format(**slots)
    greeting = rng.choice(GREETINGS)
    body = greeting + body if greeting else body[0].upper() + body[1:]
    return body + rng.choice(SIGNOFFS).format(name=name)


def split(rng: random.Random, n: int, seen: set[str]) -> list[dict]:
    """n tickets in the class shares, none already in `seen` (so eval shares no text with train), shuffled."""
    rows = []
    for label, share in SHARES.items():
        made = 0
        while made < round(n * share):
            text = ticket(rng, label)
            if text not in seen:
                seen.add(text)
                rows.append({"text": text, "label": label})
                made += 1
    rng.shuffle(rows)
    return rows


def write(path: Path, rows: list[dict]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def main() -> None:
    rng = random.Random(0)
    out = Path(__file__).parent / "classify"
    out.mkdir(exist_ok=True)
    seen: set[str] = set()
    for name, n in (("train", 320), ("eval", 80)):
        rows = split(rng, n, seen)
        write(out / f"{name}.jsonl", rows)
        chat = [
            {
                "messages": [
                    {"role": "system", "content": SYSTEM},
                    {"role": "user", "content": r["text"]},
                    {"role": "assistant", "content": r["label"]},
                ]
            }
            for r in rows
        ]
        write(out / f"{name}-chat.jsonl", chat)


if __name__ == "__main__":
    main()
