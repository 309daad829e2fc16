#!/usr/bin/env python3
"""Build the "scratch_corpus" pretraining corpus for a tiny from-scratch language model (offline).

Sources (one document per JSON line, {"text": ...}):
  1. docstrings   Docstrings (ast.get_docstring of modules, classes and functions) of the CPython standard
                  library installed with this Python, at least 200 characters each; site-packages,
                  test/tests, idlelib, lib2to3, turtledemo and ensurepip are skipped; exact duplicates
                  dropped; files read in sorted order. License: PSF-2.0.
  2. topics       pydoc_data.topics.topics, the Python reference topics, one document per topic. PSF-2.0.
  3. stories      Synthetic paragraphs (3-8 sentences) about one or two people: name, age, city, job,
                  family, hobbies, a small event. Facts stay consistent (same name later, agreeing
                  pronouns, "is 34" ... "will turn 35", a city referred back to). Written for this project
                  by this script (Apache-2.0); its phrasing differs from scripts/make_skill_data.py.

Split: a document is held out when the first 8 hex digits of sha256(text) mod 1000 < 30 (about 3%), so
whole documents are split. Train documents are shuffled with a fixed seed. Everything is deterministic
(fixed seed, sorted inputs); the docstring and topic documents depend on the installed Python version.

With --measure (default) it trains a byte-level BPE tokenizer (vocab 8192) on the train split and prints
token counts per split (each document + 1 end-of-text token) and the held-out unigram cross-entropy under
the train split's add-one-smoothed unigram distribution: the bar a model must beat.

Outputs (relative to the repository root; described by datasets_cfg/scratch_corpus.yaml):
    datasets_cfg/data/scratch_corpus/train.jsonl, datasets_cfg/data/scratch_corpus/heldout.jsonl

Usage (runs in about 10 seconds):
    python scripts/make_corpus.py [--out-dir DIR] [--no-measure]
"""

import argparse
import ast
import hashlib
import json
import math
import os
import random
import sysconfig
from collections import Counter

SEED = 20240917
N_STORIES = 9300
MIN_DOCSTRING = 200
SKIP_DIRS = {"site-packages", "test", "tests", "idlelib", "lib2to3", "turtledemo", "ensurepip"}
HELDOUT_PER_MILLE = 30
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]


def words(s):
    """Comma-separated items; line breaks count as spaces."""
    return [w.strip() for w in " ".join(s.split()).split(",")]


FEMALE = """Maria Aisha Olga Priya Fatima Yuki Amara Ingrid Sofia Elena Hannah Zara Leila Mei Anika Grace Nadia Clara
Freya Lucia Isabel Chiara Amina Sakura Ana Nia Laura Emma Beatriz Keiko Ayesha Teresa Layla Anya Rosa Mariam Camila
Esther Greta Imani Kavya Linnea Malika Odette Rania Alice Beatrice Charlotte Daphne Eliza Fiona Gabriela Helga Irene
Julia Katarina Lena Marta Nora Olivia Paula Renata Selma Tamar Ursula Valentina Wanda Ximena Yasmin Zofia Adaeze Bisi
Chioma Efua Folake Ama Nkechi Thandiwe Wanjiru Zainab Hoa Lan Linh Mai Ngoc Aiko Emi Haruka Naoko Rin Yumi Ji-woo
Min-seo Soo-ah Hye-jin Xiu Ling Fang Jing Yan Deepa Lakshmi Meera Nisha Pooja Sunita Ananya Divya Farah Noor Samira
Yara Dalia Hiba Rana Salma Ayla Elif Zeynep Defne Sila Agnieszka Magda Ewa Katya Irina Svetlana Daria Milena Jana Petra
Lucie Ilse Sanne Femke Astrid Sigrid Maja Elin Saoirse Aoife Niamh Siobhan Carmen Pilar Lorena Ines Joana Leonor Bruna
Luana Francesca Giulia Elisa Claire Margot Sophie Amelie Chloe Ruth Miriam Naomi Talia Abigail Emily Megan Rebecca
Sarah Victoria Matilda Hazel Iris Penelope Rosalind Tessa Vera Wilma Adriana""".split()
MALE = """James Kenji Carlos Liam Mateo Noah Lucas Omar Chen Kwame Ravi Diego Tomas Samuel Pavel Hiroshi Emeka Arjun
Mohammed Tariq Bjorn Jonas Rafael David Felix Viktor Hassan Jin Oscar Daniel Marco Kofi Sven Pedro Ibrahim Ethan Dmitri
Farid Haruto Joaquin Nikolai Pablo Adam Benedict Cedric Dominic Edgar Frederik Gustavo Henrik Ivan Jakob Karl Leon
Milan Nils Otto Patrick Quentin Rolf Stefan Tobias Ulrich Victor Walter Xavier Yusuf Zoltan Adebayo Chidi Femi Kayode
Obinna Tunde Yaw Kojo Sipho Thabo Baraka Juma Minh Tuan Duc Hieu Quang Daichi Takeshi Ren Sota Kaito Min-jun Seo-jun
Ji-ho Wei Jun Hao Lei Ming Vikram Rahul Sanjay Anil Karan Rohan Imran Bilal Karim Nabil Rami Samir Walid Ziad Emre
Murat Kerem Baris Mehmet Piotr Marek Tomasz Jakub Sergei Andrei Mikhail Boris Oleg Ondrej Lukas Jan Pieter Sander Ruben
Anders Erik Magnus Olaf Lars Cian Eoin Declan Padraig Javier Alvaro Sergio Miguel Joao Tiago Rui Bruno Matteo Lorenzo
Giorgio Alessandro Julien Antoine Hugo Mathis Elias Isaac Levi Aaron Gideon Benjamin Oliver George Henry Arthur Edward
Harold Simon Theo Vincent William Rupert Lionel""".split()
SURNAMES = """Lopez Smith Khan Tanaka Petrova Garcia Sharma Murphy Haddad Fernandez Sato Williams Okafor Silva Larsen
Farouk Rossi Wang Popescu Mensah Becker Patel Ahmed Morales Nasser Novak Li Johnson Gupta Ivanov Kim Nakamura Rahman
Nwosu Schmidt Reddy Nielsen Hussein Romero Aziz Costa Lindqvist Bianchi Weber Diallo Santos Yamamoto Cohen Kowalski
Fischer Adeyemi Horvath Moreau Karimi Brown Park Oliveira Eriksen Mori Dubois Malik Ricci Herrera Boateng Jensen Yilmaz
Alvarez Sokolova Ibrahim Torres Clarke Nguyen Abara Achebe Afolabi Agarwal Akhtar Almeida Andersson Arslan Asante
Bakker Banerjee Barros Bauer Bergstrom Bhatt Blanco Bondarenko Brennan Byrne Caruso Castillo Chao Chaudhry Chowdhury
Ciobanu Conti Cruz Dahl Das Delgado Demir Desai Dimitrov Dinh Dlamini Doyle Duarte Eze Falk Ferrari Fitzgerald Fonseca
Fujita Gallo Gomes Greco Gunawardena Hakimi Hansen Hayashi Hoffmann Holm Hosseini Huang Ikeda Iyer Jaber Jovanovic
Kamara Kaya Keller Kennedy Kiplagat Kobayashi Koch Kovacs Kruger Kumar Kuznetsov Lam Lange Laurent Lefebvre Lehmann
Leone Lin Liu Lund Ma Mahmoud Marino Martens Medina Mendes Meyer Molina Moreno Mukherjee Mwangi Nair Navarro Ndlovu
Nilsson Nowak Obi O'Brien Ogunleye Okeke Olsen Omondi Ortiz Owusu Ozturk Pereira Perez Peters Pham Pillai Quinn Ramos
Rao Reyes Richter Rivera Rocha Rodrigues Ruiz Saito Salazar Sanchez Schneider Shapiro Shevchenko Singh Soto Suzuki
Svensson Takahashi Tan Tembo Thompson Tran Uchenna Vargas Vasquez Vogel Volkov Walsh Watanabe Wojcik Wu Xu Yang Yeo
Yusuf Zhang Zhou Zielinski Abbasi Bello Campbell Castro Dogan Evans Fox Grant Hughes Jansen Kaplan Lewis Mitchell
Morgan Ng Osei Pacheco Rasmussen Sorensen Stewart Taylor Varga""".split()
CITIES = words("""Lisbon, Toronto, Nairobi, Osaka, Krakow, Buenos Aires, Mumbai, Dublin, Beirut, Madrid, Sapporo,
Chicago, Lagos, Sao Paulo, Oslo, Cairo, Milan, Shanghai, Bucharest, Accra, Hamburg, Bangalore, Karachi, Mexico City,
Amman, Prague, Taipei, Boston, Delhi, Kazan, Seoul, Kyoto, Dhaka, Munich, Copenhagen, Bogota, Tunis, Porto, Gothenburg,
Naples, Vienna, Dakar, Melbourne, Warsaw, Zurich, Budapest, Lyon, Manchester, Busan, Cape Town, Reykjavik, Auckland,
Istanbul, Lima, Hanoi, Vancouver, Marseille, Athens, Rome, Paris, Berlin, London, Edinburgh, Glasgow, Cardiff,
Brussels, Antwerp, Amsterdam, Rotterdam, Stockholm, Helsinki, Tallinn, Riga, Vilnius, Kyiv, Sofia, Belgrade, Zagreb,
Ljubljana, Valencia, Seville, Bilbao, Turin, Florence, Geneva, Montreal, Seattle, Denver, Austin, Havana, Santiago,
Quito, Montevideo, Casablanca, Addis Ababa, Kampala, Kigali, Lusaka, Durban, Muscat, Doha, Lahore, Colombo, Kathmandu,
Bangkok, Manila, Jakarta, Perth""")
JOBS = words("""teacher, nurse, engineer, baker, carpenter, pharmacist, architect, librarian, electrician, plumber,
journalist, translator, dentist, firefighter, pilot, chef, gardener, accountant, mechanic, painter, photographer,
tailor, midwife, surgeon, lawyer, judge, farmer, fisher, bus driver, taxi driver, letter carrier, shop owner, butcher,
florist, potter, violinist, piano teacher, dance teacher, bookseller, barber, hairdresser, optician, veterinarian,
zookeeper, geologist, chemist, biologist, astronomer, historian, economist, editor, software developer, data analyst,
web designer, game designer, sound engineer, film editor, radio host, museum guide, tour guide, park ranger, lifeguard,
police officer, social worker, nursery teacher, cook, waiter, bartender, baker's assistant, hotel manager, bank clerk,
city planner, interpreter, locksmith, shoemaker, watchmaker, printer, glassblower, beekeeper, sailor, train driver,
radiographer, physiotherapist""")
HOBBIES = words("""playing chess, painting, growing tomatoes, baking bread, knitting, reading detective novels,
swimming, cycling, running, hiking in the hills, birdwatching, fishing, playing the guitar, playing the piano, singing
in a choir, writing poems, taking photographs, collecting stamps, collecting old coins, sewing, woodworking, repairing
old radios, learning languages, cooking curries, making pottery, rock climbing, skating, playing football, playing
tennis, playing cards, doing crossword puzzles, solving riddles, dancing, watching old films, keeping bees, building
model ships, drawing maps, practising yoga, sailing, rowing, gardening, visiting museums, writing letters, baking
cakes, making jam, learning to juggle, star gazing""")
OBJECTS = words("""umbrella, notebook, wallet, watch, scarf, camera, blue bicycle, key ring, pair of glasses, library
card, thermos, red backpack, pocket knife, phone, map, diary, fountain pen, wool hat, lunch box, guitar case, old
radio, compass, envelope, tennis racket, photo album, sketchbook, recipe book, toolbox, flashlight, yellow raincoat,
teapot, kite, chess set, green jacket, violin, basket of apples, clock, lantern""")
FOODS = words("""soup, dumplings, rice with beans, lentil stew, pancakes, apple pie, fish curry, noodles, flatbread,
roast potatoes, chocolate cake, fried plantains, grilled corn, cheese, olives, fresh figs, honey biscuits, tomato
salad, mushroom pie, plum jam, spiced tea, baked fish, pasta, omelettes, mango slices, couscous""")
ADJS = """kind patient funny careful curious generous quiet cheerful honest stubborn clever calm brave polite
hard-working friendly thoughtful modest lively reliable shy warm organised gentle""".split()
WEATHER = "rainy windy snowy foggy sunny cold hot humid cloudy stormy grey freezing warm".split()
PETS = "cat dog parrot rabbit tortoise goldfish hamster canary".split()
PET_NAMES = """Biscuit Pepper Luna Max Coco Milo Nala Oreo Pip Rocky Simba Tiger Whiskers Ziggy Mango Olive Bruno Daisy
Ginger Kiwi Noodle Pebble Sunny Toffee""".split()
DAYS = "Monday Tuesday Wednesday Thursday Friday Saturday Sunday".split()
MONTHS = "January February March April May June July August September October November December".split()
# (relation, gender, age offset from the main person: min, max, main person's age: min, max)
RELATIONS = [("sister", "f", -12, 12, 20, 80), ("brother", "m", -12, 12, 20, 80), ("cousin", "f", -10, 10, 20, 80),
             ("cousin", "m", -10, 10, 20, 80), ("daughter", "f", -38, -20, 40, 80), ("son", "m", -38, -20, 40, 80),
             ("mother", "f", 20, 36, 20, 62), ("father", "m", 20, 38, 20, 60),
             ("grandmother", "f", 44, 56, 20, 40), ("grandfather", "m", 45, 58, 20, 38)]
PRONOUNS = {"f": dict(p="she", o="her", s="her"), "m": dict(p="he", o="him", s="his")}

# Sentence templates; the first letter of each sentence is capitalised after formatting. {a_x} is x with a/an.
INTRO = ["{full} is {a_job} in {city}, {age} years old.", "{full}, {a_job} from {city}, is {age}.",
         "This is a story about {full}, {a_job} in {city} who is {age} years old.",
         "In {city} there lives {a_job} named {full}; {p} is {age}.",
         "{full} is {age} and earns a living as {a_job} in {city}.",
         "{full} was born in {home} {age} years ago and now works in {city} as {a_job}.",
         "Everyone on {s} street in {city} knows {full}, the {age}-year-old {job}.",
         "{full} has spent {years} of {s} {age} years in {city}, where {p} is {a_job}.",
         "People in {city} often ask {full}, {age}, for help, because {p} is {a_job}.",
         "Here is {full}: {a_job}, {age} years of age, with a small flat in {city}."]
TOPICS = [  # (lead sentences, follow-up sentences that may rely on the lead)
    (["Next year {p} will turn {age1}.", "{first} had a birthday in {month}, when {p} turned {age}.",
      "A year ago {first} was {age_1}, and {p} says {p} does not feel any older now.",
      "In ten years {first} will be {age10}, and {p} tries not to think about it."],
     ["{first} plans a big party for {s} {age1th} birthday next year."]),
    (["{first} came to {city} from {home} {years} years ago.", "Every {day}, {first} walks the old streets of {city}.",
      "{first} likes {city} because it never feels too crowded, though {p} sometimes misses {home}."],
     ["{city} has changed a lot since {first} arrived {years} years ago.",
      "The winters in {city} are harder than the ones {p} remembers from {home}."]),
    (["As {a_job}, {first} usually starts work before eight in the morning.",
      "{first} became {a_job} at the age of {job_age}, so {p} has done the job for {job_years} years.",
      "{s} colleagues say {p} is the most {adj} {job} they have ever met."],
     ["{first} says the best part of being {a_job} is meeting new people every day.",
      "On {day} afternoons {first} teaches younger colleagues what {p} has learned."]),
    (["{s} {rel}, {rel_name}, is {rel_age} now and has a home in {rel_city}.",
      "{first} has a {rel} named {rel_name}, who is {rel_age}.",
      "{first} is very close to {s} {rel} {rel_name}, who lives in {rel_city}."],
     ["{rel_name} is {rel_cmp} {first}.", "{rel_name} calls {first} every {day} and {rel_p} always asks about {city}.",
      "When {rel_name} visits, {rel_p} brings {first} a box of {food}.",
      "Next year {rel_name} will be {rel_age1}, and {first} is already planning a present for {rel_o}."]),
    (["In {s} free time, {first} enjoys {hobby}.", "{first} has loved {hobby} since {p} was a child.",
      "On weekends {first} prefers {hobby2} to {hobby}."],
     ["{p} says {hobby} helps {o} forget about work.", "Last {month} {p} even joined a club for {hobby} in {city}."]),
    (["{first} lives with a {pet} named {pet_name}.", "At home, {first} looks after a small {pet} called {pet_name}."],
     ["{pet_name} waits by the door every evening until {first} comes home.",
      "When {first} travels, {s} {minder} takes care of {pet_name}."]),
    (["Last {day} it was {weather}, so {first} stayed at home and spent the evening {hobby}.",
      "On {day} morning, {first} lost {s} {obj} somewhere in {city}; a stranger brought it back the next day.",
      "One {weather} {day}, {first} found {a_obj} on a bench and took it to the lost property office.",
      "Yesterday {first} bought {a_obj} at a market in {city} for {price} euros.",
      "Because of the {weather} weather on {day}, {first} was late for work for the first time in {job_years} years.",
      "Last {month}, {first} travelled from {city} to {trip} to see old friends."],
     ["{p} still laughs about it when {p} tells the story.", "Afterwards {first} wrote about it in {s} diary.",
      "{p} did not mind, because the day ended with a plate of {food}."])]
PAIR = (["{first} shares an office with {b_full}, {b_a_job} from {b_city}.",
         "{s} closest friend is {b_full}, who is {b_a_job} in {b_city}.",
         "Next door to {first} lives {b_full}, {b_a_job} originally from {b_city}.",
         "{first} is married to {b_full}, {b_a_job} who grew up in {b_city}."],
        ["{b_first} is {b_age}, which makes {b_o} {b_cmp} {first}.", "{b_first} teases {first} about {s} {hobby}.",
         "The two met in {meet} {known} years ago and have been friends ever since.",
         "Every {day2}, {first} and {b_first} have lunch together near the station in {city}.",
         "Unlike {first}, {b_first} does not care for {hobby}; {b_p} would rather spend {b_s} evenings {b_hobby}.",
         "When {b_first} turned {b_age}, {first} gave {b_o} {a_obj} as a present.",
         "Next year {b_first} will turn {b_age1} and {first} will turn {age1}."])
CLOSING = ["Friends describe {first} as {adj} and {adj2}.", "{first} hopes to stay in {city} for many more years.",
           "Next year, when {first} turns {age1}, {p} wants to take a long trip to {trip}.",
           "Whatever happens, {first} says {p} will never leave {city}.", "And that is how {first} spends a week.",
           "For now, {first} is happy with {s} life as {a_job} in {city}."]


def article(x):
    return ("an " if x[0] in "aeiou" else "a ") + x


def ordinal(k):
    return f"{k}{'th' if 10 <= k % 100 <= 20 else {1: 'st', 2: 'nd', 3: 'rd'}.get(k % 10, 'th')}"


def compare(a, b):
    """Someone aged a relative to someone aged b: '3 years older than', 'the same age as'."""
    gap = abs(a - b)
    return "the same age as" if gap == 0 else f"{gap} year{'s' * (gap > 1)} {'older' if a > b else 'younger'} than"


def person(rng, age, prefix="", avoid=()):
    g = rng.choice("fm")
    first = rng.choice([n for n in (FEMALE if g == "f" else MALE) if n not in avoid])
    job = rng.choice(JOBS)
    f = dict(first=first, full=f"{first} {rng.choice(SURNAMES)}", age=age, age1=age + 1, age1th=ordinal(age + 1),
             job=job, a_job=article(job), city=rng.choice(CITIES), hobby=rng.choice(HOBBIES), **PRONOUNS[g])
    return {prefix + k: v for k, v in f.items()}


def story(rng):
    """One paragraph of 3-8 sentences about one person, sometimes two, whose facts agree throughout."""
    f = person(rng, rng.randint(20, 80))
    age, first = f["age"], f["first"]
    home, trip, meet, other = rng.sample([c for c in CITIES if c != f["city"]], 4)
    rel, rg, lo, hi = rng.choice([r[:4] for r in RELATIONS if r[4] <= age <= r[5]])
    rel_age, job_age, obj = max(1, age + rng.randint(lo, hi)), rng.randint(18, age - 2), rng.choice(OBJECTS)
    hobby2, b_hobby = rng.sample([h for h in HOBBIES if h != f["hobby"]], 2)
    f.update(home=home, trip=trip, meet=meet, years=rng.randint(2, min(age - 1, 30)), age_1=age - 1, age10=age + 10,
             job_age=job_age, job_years=age - job_age, month=rng.choice(MONTHS), day=rng.choice(DAYS),
             day2=rng.choice(DAYS), weather=rng.choice(WEATHER), obj=obj, a_obj=article(obj), food=rng.choice(FOODS),
             pet=rng.choice(PETS), pet_name=rng.choice(PET_NAMES), hobby2=hobby2, price=rng.randint(3, 60),
             rel=rel, rel_name=rng.choice([n for n in (FEMALE if rg == "f" else MALE) if n != first]),
             rel_age=rel_age, rel_age1=rel_age + 1, rel_cmp=compare(rel_age, age),
             rel_city=rng.choice([f["city"], other]), minder=rng.choice([rel, "neighbour", "best friend"]),
             **{"rel_" + k: v for k, v in PRONOUNS[rg].items()})
    f["adj"], f["adj2"] = rng.sample(ADJS, 2)
    n = rng.randint(3, 8)
    out = [rng.choice(INTRO)]
    if n >= 4 and rng.random() < 0.4:  # a second person, of similar age
        b = person(rng, max(18, min(85, age + rng.randint(-15, 15))), "b_", avoid=(first, f["rel_name"]))
        f.update(b, b_cmp=compare(b["b_age"], age), b_city=rng.choice([f["city"], other]), known=rng.randint(2, 15),
                 b_hobby=b_hobby)
        out += [rng.choice(PAIR[0])] + rng.sample(PAIR[1], rng.randint(1, min(3, n - 3)))
    closing = int(len(out) < n and rng.random() < 0.5)
    for leads, follows in rng.sample(TOPICS, len(TOPICS)):
        if len(out) >= n - closing:
            break
        out.append(rng.choice(leads))
        if len(out) < n - closing and rng.random() < 0.4:
            out.append(rng.choice(follows))
    out += [rng.choice(CLOSING)] * closing
    return " ".join(s[0].upper() + s[1:] for s in (t.format(**f) for t in out))


def docstrings():
    """Docstrings of at least MIN_DOCSTRING characters in the standard library, files in sorted order."""
    root = sysconfig.get_paths()["stdlib"]
    paths = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in SKIP_DIRS]
        paths += [os.path.join(dirpath, n) for n in filenames if n.endswith(".py")]
    for path in sorted(paths, key=lambda p: os.path.relpath(p, root).split(os.sep)):
        with open(path, encoding="utf-8") as fh:
            try:
                tree = ast.parse(fh.read())
            except (SyntaxError, ValueError, UnicodeDecodeError):
                continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= MIN_DOCSTRING:
                    yield doc


def build():
    """[(source, text)] in a stable order, exact duplicates dropped."""
    from pydoc_data.topics import topics
    rng = random.Random(SEED)
    sources = [("docstrings", docstrings()), ("topics", (topics[k].strip() for k in sorted(topics))),
               ("stories", (story(rng) for _ in range(N_STORIES)))]
    seen, docs = set(), []
    for name, texts in sources:
        for text in texts:
            if text not in seen:
                seen.add(text)
                docs.append((name, text))
    return docs


def is_heldout(text):
    return int(hashlib.sha256(text.encode("utf-8")).hexdigest()[:8], 16) % 1000 < HELDOUT_PER_MILLE


def measure(train, heldout):
    """Train a byte-level BPE on train; print tokens per split and the held-out unigram cross-entropy."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(train, trainers.BpeTrainer(
        vocab_size=8192, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    eot, vocab = tok.token_to_id("<|endoftext|>"), tok.get_vocab_size()
    ids = {}
    for split, texts in (("train", train), ("heldout", heldout)):
        ids[split] = [i for enc in tok.encode_batch(texts) for i in [*enc.ids, eot]]
        print(f"tokens {split:8s} {len(ids[split]):>10,d}  (incl. one end-of-text token per document)")
    print(f"tokens total    {len(ids['train']) + len(ids['heldout']):>10,d}  (byte-level BPE, vocab {vocab})")
    counts, n = Counter(ids["train"]), len(ids["train"])
    nats = -sum(math.log((counts[i] + 1) / (n + vocab)) for i in ids["heldout"]) / len(ids["heldout"])
    print(f"held-out unigram cross-entropy under train unigrams (add-one): {nats:.4f} nats/token "
          f"(perplexity {math.exp(nats):.1f})")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    ap.add_argument("--out-dir", default=os.path.join(root, "datasets_cfg", "data", "scratch_corpus"))
    ap.add_argument("--measure", action=argparse.BooleanOptionalAction, default=True,
                    help="train a BPE tokenizer on train, print token counts and unigram entropy (default: on)")
    args = ap.parse_args()
    docs = build()
    split = {"train": [d for d in docs if not is_heldout(d[1])], "heldout": [d for d in docs if is_heldout(d[1])]}
    random.Random(SEED).shuffle(split["train"])
    os.makedirs(args.out_dir, exist_ok=True)
    for name in ("train", "heldout"):
        path = os.path.join(args.out_dir, f"{name}.jsonl")
        with open(path, "w", encoding="utf-8", newline="\n") as fh:
            fh.writelines(json.dumps({"text": t}, ensure_ascii=False) + "\n" for _, t in split[name])
        print(f"wrote {path} ({os.path.getsize(path):,d} bytes)")
    for source in ("docstrings", "topics", "stories"):
        for name in ("train", "heldout"):
            texts = [t for s, t in split[name] if s == source]
            print(f"{source:10s} {name:8s} {len(texts):>6,d} documents {sum(map(len, texts)):>10,d} characters")
    if args.measure:
        measure([t for _, t in split["train"]], [t for _, t in split["heldout"]])


if __name__ == "__main__":
    main()
