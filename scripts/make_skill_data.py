#!/usr/bin/env python3
"""Generate the "json_extract" SFT dataset (structured extraction to compact JSON).

Skill: the user gives a short English text about a person and asks for the
person's name, age and city as JSON. The assistant answers with exactly one
line of compact JSON, keys in the fixed order name, age, city, e.g.

    {"name": "Maria Lopez", "age": 34, "city": "Lisbon"}

(``json.dumps(obj, ensure_ascii=False)`` with default separators; age is an int).

Everything here is synthetic and written for this project (Apache-2.0).
The generator is deterministic (fixed seed, stdlib only), so re-running it
reproduces the committed files byte for byte.

Outputs (relative to the repository root):
    datasets_cfg/data/json_extract/train.jsonl    400 rows
    datasets_cfg/data/json_extract/heldout.jsonl   60 rows (single-turn only)

Held-out rows use a disjoint set of first names (and therefore name/city
combinations and sentences that never occur in train), so no held-out prompt
equals or nearly equals a training prompt.

Usage:
    python scripts/make_skill_data.py [--out-dir DIR] [--check]
"""

import argparse
import json
import os
import random

SEED = 20240611
N_TRAIN = 400
N_HELDOUT = 60
N_TRAIN_SYSTEM = 40      # ~10% of train rows get a system message
N_TRAIN_TWO_TURN = 40    # ~10% of train rows are two-turn conversations
N_HELDOUT_SYSTEM = 6     # ~10% of held-out rows get a system message

# --------------------------------------------------------------------------
# Vocabulary (ASCII only, diverse origins)
# --------------------------------------------------------------------------
FIRST_NAMES = [
    "Maria", "James", "Aisha", "Kenji", "Olga", "Carlos", "Priya", "Liam",
    "Fatima", "Mateo", "Yuki", "Noah", "Amara", "Lucas", "Ingrid", "Omar",
    "Sofia", "Chen", "Elena", "Kwame", "Hannah", "Ravi", "Zara", "Diego",
    "Leila", "Tomas", "Mei", "Samuel", "Anika", "Pavel", "Grace", "Hiroshi",
    "Nadia", "Emeka", "Clara", "Arjun", "Freya", "Mohammed", "Lucia", "Tariq",
    "Isabel", "Bjorn", "Chiara", "Jonas", "Amina", "Rafael", "Sakura", "David",
    "Ana", "Felix", "Nia", "Viktor", "Laura", "Hassan", "Emma", "Jin",
    "Beatriz", "Oscar", "Keiko", "Daniel", "Ayesha", "Marco", "Teresa", "Kofi",
    "Sven", "Layla", "Pedro", "Anya", "Ibrahim", "Rosa", "Ethan", "Mariam",
]
# First names reserved for held-out rows only (never used in train).
HELDOUT_FIRST_NAMES = [
    "Camila", "Dmitri", "Esther", "Farid", "Greta", "Haruto",
    "Imani", "Joaquin", "Kavya", "Linnea", "Malika", "Nikolai",
    "Odette", "Pablo", "Quinn", "Rania",
]
LAST_NAMES = [
    "Lopez", "Smith", "Khan", "Tanaka", "Petrova", "Garcia", "Sharma", "Murphy",
    "Haddad", "Fernandez", "Sato", "Williams", "Okafor", "Silva", "Larsen", "Farouk",
    "Rossi", "Wang", "Popescu", "Mensah", "Becker", "Patel", "Ahmed", "Morales",
    "Nasser", "Novak", "Li", "Johnson", "Gupta", "Ivanov", "Kim", "Nakamura",
    "Rahman", "Nwosu", "Schmidt", "Reddy", "Nielsen", "Hussein", "Romero", "Aziz",
    "Costa", "Lindqvist", "Bianchi", "Weber", "Diallo", "Santos", "Yamamoto", "Cohen",
    "Kowalski", "Fischer", "Adeyemi", "Horvath", "Moreau", "Karimi", "Brown", "Park",
    "Oliveira", "Eriksen", "Mori", "Dubois", "Malik", "Ricci", "Herrera", "Boateng",
    "Jensen", "Yilmaz", "Alvarez", "Sokolova", "Ibrahim", "Torres", "Clarke", "Nguyen",
]
CITIES = [
    "Lisbon", "Toronto", "Nairobi", "Osaka", "Krakow", "Buenos Aires", "Mumbai",
    "Dublin", "Beirut", "Madrid", "Sapporo", "Chicago", "Lagos", "Sao Paulo",
    "Oslo", "Cairo", "Milan", "Shanghai", "Bucharest", "Accra", "Hamburg",
    "Bangalore", "Karachi", "Mexico City", "Amman", "Prague", "Taipei", "Boston",
    "Delhi", "Kazan", "Seoul", "Kyoto", "Dhaka", "Enugu", "Munich", "Hyderabad",
    "Copenhagen", "Baghdad", "Bogota", "Tunis", "Porto", "Gothenburg", "Naples",
    "Vienna", "Dakar", "Salvador", "Melbourne", "Tel Aviv", "Warsaw", "Zurich",
    "Ibadan", "Budapest", "Lyon", "Tehran", "Manchester", "Busan", "Cape Town",
    "Reykjavik", "Auckland", "Istanbul", "Lima", "Hanoi", "Vancouver", "Marseille",
]

# --------------------------------------------------------------------------
# Sentence templates: {name}, {age}, {city}; some also use {other_city} or
# {n} (a distractor number) so the model has to read, not just copy the
# first number / first city it sees. {first} is the first name alone.
# --------------------------------------------------------------------------
TEMPLATES = [
    "{name} is {age} years old and lives in {city}.",
    "Born {age} years ago, {name} now calls {city} home.",
    "{city} resident {name} turned {age} last spring.",
    "{name}, {age}, works as a teacher in {city}.",
    "At {age}, {name} moved to {city} for a new job.",
    "Meet {name}: {age} years young and based in {city}.",
    "{name} ({age}) has lived in {city} for {n} years.",
    "Originally from {other_city}, {name} is now {age} and lives in {city}.",
    "The {age}-year-old {name} runs a small bakery in {city}.",
    "Our new volunteer, {name}, is {age} and comes to us from {city}.",
    "{name} celebrated a {ordinal} birthday at home in {city} with {n} friends.",
    "Living in {city} these days, {name} is {age}.",
    "Name: {name}. Age: {age}. Lives in: {city}.",
    "{name} lives in {city}. {first} is {age}.",
    "After {n} years in {other_city}, {name}, aged {age}, settled in {city}.",
    "In {city}, {age}-year-old {name} coaches a youth football team.",
    "{name} just turned {age}. {first} has an apartment in {city}.",
    "According to the form, {name} is {age} and currently resides in {city}.",
    "{name} grew up in {other_city} but has lived in {city} since the age of {n}; {first} is {age} now.",
    "Say hello to {name} from {city}, who is {age} years old.",
]

# User instructions. Placement is decided per row (before or after the text).
INSTRUCTIONS = [
    "Extract the name, age and city as JSON.",
    "Return a JSON object with keys name, age, city for this text:",
    "Pull out the person's name, age and city and give them as JSON.",
    "Give me the name, age and city from the text below as a JSON object.",
    "Convert this description into JSON with the fields name, age and city.",
    "Extract name, age, city. Reply with JSON only.",
    "Read the text and output JSON containing name, age and city.",
    "I need the person's details as JSON (name, age, city).",
    "Parse the following and return {\"name\", \"age\", \"city\"} as JSON.",
    "What are the name, age and city here? Answer in JSON.",
]
# Instructions that read naturally after the text.
INSTRUCTIONS_AFTER = [
    "Extract the name, age and city as JSON.",
    "Return the name, age and city as a JSON object.",
    "Give me name, age and city as JSON.",
    "Output this person's name, age and city in JSON.",
    "Now extract name, age and city as JSON.",
    "JSON with name, age, city, please.",
]
# Follow-up requests for the second user turn of two-turn rows.
FOLLOWUPS = [
    "Now do the same for this one: {text}",
    "Same again, please:\n\n{text}",
    "Another one: {text}",
    "Great. Extract name, age and city from this text too:\n{text}",
    "{text}\n\nSame format as before.",
    "And this one? {text}",
]
SYSTEM_PROMPTS = [
    "You are a precise data extraction assistant.",
    "You extract structured data from text and reply with JSON only.",
    "You are a helpful assistant that converts text into JSON records.",
    "Answer with a single line of compact JSON.",
]


def target(name, age, city):
    """The canonical assistant reply: one line of compact JSON, fixed key order."""
    return json.dumps({"name": name, "age": age, "city": city}, ensure_ascii=False)


def ordinal(k):
    suffix = "th" if 10 <= k % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(k % 10, "th")
    return f"{k}{suffix}"


def make_text(rng, first, last, age, city):
    tpl = rng.choice(TEMPLATES)
    other_city = rng.choice([c for c in CITIES if c != city])
    # distractor number: never equal to the age
    # distractor number: always below 18, so never equal to the age
    n = rng.randint(3, 15)
    text = tpl.format(name=f"{first} {last}", first=first, age=age, city=city,
                      other_city=other_city, n=n, ordinal=ordinal(age))
    return text


def make_user(rng, text):
    mode = rng.random()
    if mode < 0.30:  # instruction after the text
        return f"{text}\n\n{rng.choice(INSTRUCTIONS_AFTER)}"
    instr = rng.choice(INSTRUCTIONS)
    style = rng.random()
    if style < 0.55:
        return f"{instr}\n\n{text}"
    if style < 0.80:
        return f"{instr}\nText: {text}"
    return f"{instr} {text}"


def sample_person(rng, first_names, used):
    """A (first, last, age, city) whose full name and name+city are unused."""
    while True:
        first = rng.choice(first_names)
        last = rng.choice(LAST_NAMES)
        city = rng.choice(CITIES)
        key = (first, last)
        if key in used:
            continue
        used.add(key)
        return first, last, rng.randint(18, 90), city


def build(seed=SEED):
    rng = random.Random(seed)
    assert not set(FIRST_NAMES) & set(HELDOUT_FIRST_NAMES)

    used_train = set()
    system_idx = set(rng.sample(range(N_TRAIN), N_TRAIN_SYSTEM))
    two_turn_idx = set(rng.sample(range(N_TRAIN), N_TRAIN_TWO_TURN))
    train, seen_prompts = [], set()
    i = 0
    while len(train) < N_TRAIN:
        first, last, age, city = sample_person(rng, FIRST_NAMES, used_train)
        user = make_user(rng, make_text(rng, first, last, age, city))
        if user in seen_prompts:
            continue
        seen_prompts.add(user)
        msgs = []
        if i in system_idx:
            msgs.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
        msgs.append({"role": "user", "content": user})
        msgs.append({"role": "assistant", "content": target(f"{first} {last}", age, city)})
        if i in two_turn_idx:
            f2, l2, a2, c2 = sample_person(rng, FIRST_NAMES, used_train)
            text2 = make_text(rng, f2, l2, a2, c2)
            msgs.append({"role": "user", "content": rng.choice(FOLLOWUPS).format(text=text2)})
            msgs.append({"role": "assistant", "content": target(f"{f2} {l2}", a2, c2)})
        train.append({"messages": msgs})
        i += 1

    used_held = set()
    system_idx = set(rng.sample(range(N_HELDOUT), N_HELDOUT_SYSTEM))
    heldout = []
    i = 0
    while len(heldout) < N_HELDOUT:
        first, last, age, city = sample_person(rng, HELDOUT_FIRST_NAMES, used_held)
        user = make_user(rng, make_text(rng, first, last, age, city))
        if user in seen_prompts:
            continue
        seen_prompts.add(user)
        msgs = []
        if i in system_idx:
            msgs.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
        msgs.append({"role": "user", "content": user})
        msgs.append({"role": "assistant", "content": target(f"{first} {last}", age, city)})
        heldout.append({"messages": msgs})
        i += 1
    return train, heldout


def write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def check(train, heldout):
    """Sanity checks; raises AssertionError on any problem."""
    assert len(train) == N_TRAIN and len(heldout) == N_HELDOUT
    for rows, single in ((train, False), (heldout, True)):
        for r in rows:
            msgs = r["messages"]
            roles = [m["role"] for m in msgs]
            if roles[0] == "system":
                roles = roles[1:]
            assert roles in (["user", "assistant"], ["user", "assistant"] * 2), roles
            if single:
                assert roles == ["user", "assistant"]
            for m in msgs:
                assert m["content"].isascii()
                if m["role"] == "assistant":
                    obj = json.loads(m["content"])
                    assert list(obj) == ["name", "age", "city"]
                    assert isinstance(obj["age"], int) and 18 <= obj["age"] <= 90
                    assert json.dumps(obj, ensure_ascii=False) == m["content"]
                    assert "\n" not in m["content"]
    train_users = {m["content"] for r in train for m in r["messages"] if m["role"] == "user"}
    train_firsts = {json.loads(m["content"])["name"].split()[0]
                    for r in train for m in r["messages"] if m["role"] == "assistant"}
    for r in heldout:
        user = r["messages"][-2]["content"]
        ref = json.loads(r["messages"][-1]["content"])
        assert user not in train_users
        assert ref["name"].split()[0] not in train_firsts
        # the held-out first name never appears anywhere in training text
        assert all(ref["name"].split()[0] not in u for u in train_users)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    ap.add_argument("--out-dir", default=os.path.join(root, "datasets_cfg", "data", "json_extract"))
    ap.add_argument("--check", action="store_true", help="only build and check, write nothing")
    args = ap.parse_args()
    train, heldout = build()
    check(train, heldout)
    if args.check:
        print(f"ok: {len(train)} train, {len(heldout)} held-out rows")
        return
    os.makedirs(args.out_dir, exist_ok=True)
    write_jsonl(os.path.join(args.out_dir, "train.jsonl"), train)
    write_jsonl(os.path.join(args.out_dir, "heldout.jsonl"), heldout)
    print(f"wrote {len(train)} train and {len(heldout)} held-out rows to {args.out_dir}")


if __name__ == "__main__":
    main()
