#!/usr/bin/env python3
"""Generate the "json_extract_pref" preference dataset (DPO pairs and KTO rows for json_extract).

Skill: the same as scripts/make_skill_data.py. The user gives a short English text
about a person; the assistant answers with exactly one line of compact JSON, keys
in the fixed order name, age, city:

    {"name": "Maria Lopez", "age": 34, "city": "Lisbon"}

Each pair has that canonical answer as "chosen" and, as "rejected", one of four
realistic failures of a small model:

    pretty          the same object pretty-printed (json.dumps(indent=2)), multi-line
    prose           the correct JSON wrapped in prose ("Here is the JSON:\\n{...}")
    distractor_age  compact JSON, right keys and order, but the age is another number
                    that occurs in the text (years lived, a count, a house number, ...)
    key_order       compact JSON with the right values but the keys in another order

For distractor_age and key_order the rejected text is about as long as the chosen
one, so a preference for the shorter answer cannot separate them.

Every text is built with make_skill_data's vocabulary and templates (imported,
not copied) plus one appended sentence with a distractor number, for every
prompt of every type, so prompts look alike across rejection types. The seed
differs from the SFT set's, so the prompts are new texts.

Everything here is synthetic and written for this project (Apache-2.0).
The generator is deterministic (fixed seed, stdlib only), so re-running it
reproduces the committed files byte for byte.

Outputs (relative to the repository root), in datasets_cfg/data/json_extract_pref/:
    train.jsonl              320 pairs (80 per rejection type)
    heldout.jsonl             80 pairs (20 per rejection type)
    unpaired_train.jsonl     640 KTO rows (each pair as a chosen row, label true, then its rejected row, label false)
    unpaired_heldout.jsonl   160 KTO rows

Pair rows use TRL's conversational preference format:
    {"prompt": [system?, user], "chosen": [assistant], "rejected": [assistant], "rejection_type": TYPE}
Unpaired rows use TRL's conversational unpaired preference format:
    {"prompt": [system?, user], "completion": [assistant], "label": true|false, "rejection_type": TYPE|null}

Held-out rows use only make_skill_data's HELDOUT_FIRST_NAMES and train rows only
its FIRST_NAMES, so no held-out prompt equals or nearly equals a training prompt.

Usage:
    python scripts/make_preference_data.py [--out-dir DIR] [--check]
"""

import argparse
import json
import os
import random
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import make_skill_data as base  # noqa: E402  (the SFT generator: vocabulary, templates, prompts)

SEED = 20240923  # not make_skill_data.SEED: the prompts are new texts
TYPES = ("pretty", "prose", "distractor_age", "key_order")
N_TRAIN_PER_TYPE = 80
N_HELDOUT_PER_TYPE = 20
SYSTEM_FRACTION = 0.10   # ~10% of rows get a system message, as in the SFT set
KEYS = ("name", "age", "city")

# Sentences appended to every text. Each gives a number that is not the age; its range keeps it
# plausible ("has run 70 marathons" would not be). {first} is the first name alone.
DISTRACTORS = [
    ("{first} has lived there for {n} years.", 2, 40),
    ("{first} owns {n} bikes.", 2, 6),
    ("{first} has {n} cousins.", 2, 25),
    ("The house number is {n}.", 2, 199),
    ("{first} works {n} hours a week.", 15, 60),
    ("{first} has {n} years of work experience.", 2, 45),
    ("The commute takes {n} minutes.", 5, 75),
    ("{first} speaks {n} languages.", 2, 5),
    ("{first} teaches a class of {n} students.", 12, 35),
    ("{first} has run {n} marathons.", 2, 30),
    ("The apartment is on floor {n}.", 2, 40),
    ("{first} keeps {n} plants on the balcony.", 3, 50),
]

# Prose around the correct JSON ({json}); the kinds of wrappers a chat model adds.
PROSE = [
    "Here is the JSON:\n{json}",
    "Sure! {json} Let me know if you need anything else.",
    "Here's the extracted information:\n\n{json}",
    "Sure, here is the data in JSON format: {json}",
    "{json}\n\nThe person is {name}, {age} years old, living in {city}.",
    "The extracted JSON is:\n{json}\nHope this helps!",
    "Here is the JSON:\n```json\n{json}\n```",
    "Certainly. {json}",
]

# Key orders other than (name, age, city).
OTHER_ORDERS = [("age", "name", "city"), ("name", "city", "age"), ("city", "name", "age"),
                ("age", "city", "name"), ("city", "age", "name")]


def numbers_in(text):
    """The whole numbers written in a text (digits not part of a longer number, e.g. 34 in '34th')."""
    return [int(m) for m in re.findall(r"(?<!\d)\d+(?!\d)", text)]


def make_text(rng, first, last, age, city):
    """make_skill_data's text plus one sentence with a distractor number (never the age)."""
    text = base.make_text(rng, first, last, age, city)
    choices = [d for d in DISTRACTORS if not ("lived" in d[0] and "lived" in text)]  # no repeated "has lived"
    tpl, lo, hi = rng.choice(choices)
    n = age
    while n == age:
        n = rng.randint(lo, hi)
    return f"{text} {tpl.format(first=first, n=n)}"


def make_rejected(rng, kind, name, age, city, user):
    obj = {"name": name, "age": age, "city": city}
    chosen = base.target(name, age, city)
    if kind == "pretty":
        return json.dumps(obj, indent=2, ensure_ascii=False)
    if kind == "prose":
        return rng.choice(PROSE).format(json=chosen, name=name, age=age, city=city)
    if kind == "distractor_age":
        distractors = sorted(set(numbers_in(user)) - {age})
        return base.target(name, rng.choice(distractors), city)
    if kind == "key_order":
        order = rng.choice(OTHER_ORDERS)
        return json.dumps({k: obj[k] for k in order}, ensure_ascii=False)
    raise ValueError(kind)


def build_split(rng, first_names, per_type, seen_users):
    kinds = [k for k in TYPES for _ in range(per_type)]
    rng.shuffle(kinds)
    n_system = round(len(kinds) * SYSTEM_FRACTION)
    system_idx = set(rng.sample(range(len(kinds)), n_system))
    used = set()
    rows = []
    for i, kind in enumerate(kinds):
        while True:
            first, last, age, city = base.sample_person(rng, first_names, used)
            user = base.make_user(rng, make_text(rng, first, last, age, city))
            if user not in seen_users:
                break
        seen_users.add(user)
        prompt = []
        if i in system_idx:
            prompt.append({"role": "system", "content": rng.choice(base.SYSTEM_PROMPTS)})
        prompt.append({"role": "user", "content": user})
        name = f"{first} {last}"
        rows.append({
            "prompt": prompt,
            "chosen": [{"role": "assistant", "content": base.target(name, age, city)}],
            "rejected": [{"role": "assistant", "content": make_rejected(rng, kind, name, age, city, user)}],
            "rejection_type": kind,
        })
    return rows


def build(seed=SEED):
    """(train, heldout) preference pairs."""
    rng = random.Random(seed)
    assert not set(base.FIRST_NAMES) & set(base.HELDOUT_FIRST_NAMES)
    seen_users = set()
    train = build_split(rng, base.FIRST_NAMES, N_TRAIN_PER_TYPE, seen_users)
    heldout = build_split(rng, base.HELDOUT_FIRST_NAMES, N_HELDOUT_PER_TYPE, seen_users)
    return train, heldout


def unpaired(pairs):
    """KTO rows: each pair's chosen (label true) followed by its rejected (label false)."""
    rows = []
    for p in pairs:
        rows.append({"prompt": p["prompt"], "completion": p["chosen"], "label": True, "rejection_type": None})
        rows.append({"prompt": p["prompt"], "completion": p["rejected"], "label": False,
                     "rejection_type": p["rejection_type"]})
    return rows


def outputs(train, heldout):
    """File name -> exact file content."""
    def dump(rows):
        return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    return {
        "train.jsonl": dump(train),
        "heldout.jsonl": dump(heldout),
        "unpaired_train.jsonl": dump(unpaired(train)),
        "unpaired_heldout.jsonl": dump(unpaired(heldout)),
    }


def check_pair(r):
    """One pair: canonical chosen, and a rejected that fails exactly as its type says."""
    assert set(r) == {"prompt", "chosen", "rejected", "rejection_type"}, sorted(r)
    roles = [m["role"] for m in r["prompt"]]
    assert roles in (["user"], ["system", "user"]), roles
    assert [m["role"] for m in r["chosen"] + r["rejected"]] == ["assistant", "assistant"]
    user = r["prompt"][-1]["content"]
    chosen, rejected = r["chosen"][0]["content"], r["rejected"][0]["content"]
    for m in r["prompt"] + r["chosen"] + r["rejected"]:
        assert m["content"].isascii()
    obj = json.loads(chosen)
    assert tuple(obj) == KEYS and isinstance(obj["age"], int) and 18 <= obj["age"] <= 90
    assert chosen == base.target(obj["name"], obj["age"], obj["city"])  # compact, one line, fixed key order
    assert obj["name"] in user and obj["city"] in user and obj["age"] in numbers_in(user)
    assert len(set(numbers_in(user)) - {obj["age"]}) >= 1  # every prompt has a distractor number
    assert rejected != chosen
    kind = r["rejection_type"]
    if kind == "pretty":
        assert json.loads(rejected) == obj and "\n" in rejected
        assert tuple(json.loads(rejected)) == KEYS
    elif kind == "prose":
        assert chosen in rejected
    elif kind == "distractor_age":
        bad = json.loads(rejected)
        assert tuple(bad) == KEYS and "\n" not in rejected
        assert bad["name"] == obj["name"] and bad["city"] == obj["city"]
        assert bad["age"] != obj["age"] and bad["age"] in numbers_in(user)
        assert rejected == base.target(bad["name"], bad["age"], bad["city"])
    elif kind == "key_order":
        bad = json.loads(rejected)
        assert bad == obj and tuple(bad) != KEYS and "\n" not in rejected
        assert rejected == json.dumps(bad, ensure_ascii=False)  # compact
    else:
        raise AssertionError(f"unknown rejection_type {kind!r}")


def first_name(pair):
    return json.loads(pair["chosen"][0]["content"])["name"].split()[0]


def mentions(text, names):
    return any(re.search(rf"\b{re.escape(n)}\b", text) for n in names)


def check(train, heldout, out_dir=None):
    """Sanity checks; raises AssertionError on any problem. With out_dir, the files there must be identical
    to what the generator writes; returns the paths of those that do not exist yet."""
    for rows, per_type in ((train, N_TRAIN_PER_TYPE), (heldout, N_HELDOUT_PER_TYPE)):
        counts = {k: sum(r["rejection_type"] == k for r in rows) for k in TYPES}
        assert counts == {k: per_type for k in TYPES}, counts
        for r in rows:
            check_pair(r)
        users = [r["prompt"][-1]["content"] for r in rows]
        assert len(set(users)) == len(users)
        names = [json.loads(r["chosen"][0]["content"])["name"] for r in rows]
        assert len(set(names)) == len(names)  # full names unique within a split
    # held-out vs train: disjoint first names, and no held-out first name appears in a training prompt
    # (the reverse is not checked: "Ibrahim" is both a training first name and a shared last name)
    train_firsts = {first_name(r) for r in train}
    held_firsts = {first_name(r) for r in heldout}
    assert train_firsts <= set(base.FIRST_NAMES) and held_firsts <= set(base.HELDOUT_FIRST_NAMES)
    train_users = [r["prompt"][-1]["content"] for r in train]
    held_users = [r["prompt"][-1]["content"] for r in heldout]
    assert not any(mentions(u, base.HELDOUT_FIRST_NAMES) for u in train_users)
    # prompts are new texts, not the SFT set's
    sft_users = {m["content"] for rows in base.build() for r in rows for m in r["messages"] if m["role"] == "user"}
    assert not sft_users & set(train_users + held_users)
    # unpaired rows mirror the pairs
    for pairs in (train, heldout):
        rows = unpaired(pairs)
        assert len(rows) == 2 * len(pairs)
        assert [r["label"] for r in rows] == [True, False] * len(pairs)
        for i, p in enumerate(pairs):
            good, bad = rows[2 * i], rows[2 * i + 1]
            assert good["prompt"] == bad["prompt"] == p["prompt"]
            assert good["completion"] == p["chosen"] and bad["completion"] == p["rejected"]
            assert good["rejection_type"] is None and bad["rejection_type"] == p["rejection_type"]
    # deterministic: a second build gives the same bytes, and so do the files on disk
    files = outputs(train, heldout)
    assert outputs(*build()) == files
    for text in files.values():
        assert text.isascii()
    missing = []
    if out_dir is not None:
        for fname, text in files.items():
            path = os.path.join(out_dir, fname)
            if os.path.exists(path):
                with open(path, encoding="utf-8", newline="") as f:
                    assert f.read() == text, f"{path} differs from what the generator writes; rerun it"
            else:
                missing.append(path)
    return missing


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    ap.add_argument("--out-dir", default=os.path.join(root, "datasets_cfg", "data", "json_extract_pref"))
    ap.add_argument("--check", action="store_true",
                    help="only build and check (and compare with the files in --out-dir), write nothing")
    args = ap.parse_args()
    train, heldout = build()
    missing = check(train, heldout, args.out_dir if args.check else None)
    if args.check:
        state = f"not written yet: {', '.join(missing)}" if missing else f"files in {args.out_dir} are identical"
        print(f"ok: {len(train)} train, {len(heldout)} held-out pairs; {state}")
        return
    os.makedirs(args.out_dir, exist_ok=True)
    for fname, text in outputs(train, heldout).items():
        with open(os.path.join(args.out_dir, fname), "w", encoding="utf-8", newline="\n") as f:
            f.write(text)
    print(f"wrote {len(train)} train and {len(heldout)} held-out pairs (and their unpaired rows) to {args.out_dir}")


if __name__ == "__main__":
    main()
