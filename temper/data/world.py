"""The built-in synthetic world: a small, seeded universe that every stage can measure itself on.

Nothing is downloaded at run time, so temper invents a world from a seed (pure standard library,
one `random.Random` stream per part, so the same seed gives byte-identical files):

* **people** with invented names and consistent facts: job, town, pet (kind and name),
  favourite colour, age (18-80) and one best friend; **towns** with a country and a river.
  A fact is stated the same everywhere; only the wording varies.
* **pretraining corpus** (`pretrain/train`, `pretrain/val`): short documents about people and
  towns that state facts with several templates each, arithmetic statements and short
  dialogues. Val documents are fresh documents about the same world, never copies of train
  ones. The train split also holds labelled noise for curation (`meta.kind`: exact_duplicate,
  near_duplicate, boilerplate, spam, pii; the rest are "clean").
* **instruction rows** (`sft/*`), **preference pairs** (`preference/*`, TRL columns) and **RL
  prompts with verifiable answers** (`rl/*`) about facts, arithmetic and string operations.
  Instruction replies are in the style the preference pairs choose (correct, short, polite)
  unless `sft_style_noise` > 0: then that share of sft/train rows, like scraped instruction
  data, ends on a reply in a rejected style (rambling, repetitive or rude, named in the row's
  `style`) that still holds the answer. sft/test stays clean.
* **step-labelled solutions** (`prm/*`, TRL's stepwise-supervision columns `prompt`,
  `completions`, `labels`) for process reward models: multi-step arithmetic, one line a step;
  in about half the rows one step's result is planted wrong (off by 1, 2 or 10), the later
  steps compute on from it, and every step from the wrong one on is labelled false (it can no
  longer reach the answer, Math-Shepherd's rule). Their own random streams: the other splits
  keep their bytes.

Held-out splits are disjoint by question identity: a (person or town, fact) pair, an
(operation, a, b) triple or a word is either train or test, for all three datasets at once.
The corpus states every fact (so test questions ask about known facts in unseen question form)
but its dialogues and arithmetic only use train identities.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from temper.errors import TemperError
from temper.io import atomic_writer

JOBS = ("baker", "potter", "weaver", "fisher", "carpenter", "tailor", "miller", "glassblower",
        "beekeeper", "cartographer", "librarian", "nurse", "teacher", "gardener", "shepherd",
        "brewer", "clockmaker", "ferryman", "mason", "painter")
PETS = ("cat", "dog", "parrot", "tortoise", "rabbit", "goat", "ferret", "hamster", "goldfish", "pony")
COLOURS = ("red", "blue", "green", "yellow", "purple", "orange", "grey", "white", "black", "teal",
           "amber", "violet")
TOWNS = ("Brimholt", "Quenmoor", "Ostervale", "Tallowick", "Vennaby", "Skarrow", "Pellamar",
         "Hostrand", "Yarrowfen", "Duvenne", "Marrowick", "Iskeby", "Corvallen", "Wethermoss",
         "Lunsby", "Frayhaven")
RIVERS = ("Quell", "Ambersike", "Tarrow", "Wend", "Orrin", "Fallowmere", "Brisk", "Hask", "Mirren",
          "Sablewash", "Corrin", "Dunwater", "Elsk", "Vay", "Pemble", "Gorran")
COUNTRIES = ("Osveria", "Talmark", "Quessany", "Drunmark", "Veloria")
# Words for the string tasks (3-9 letters, no palindromes).
WORDS = tuple("""lantern garden pocket silver window candle rocket bridge button turtle market
planet forest castle pencil basket ladder kitten dragon mirror orange hammer jacket violin
anchor bottle carpet desert engine feather goblet harbor island jungle kettle lemon magnet
needle oyster parrot quiver ribbon saddle tunnel umbrella valley walrus yogurt zipper apple
bread chair dance eagle flame grape house image juice knife light money night ocean paper
queen river stone table uncle voice water youth zebra cloud frost honey metal north plant
shirt smile storm sugar tiger train wheel world yellow bottle cactus dinner falcon glove
helmet insect jigsaw kernel lizard meadow napkin orchid pepper rabbit salmon tomato walnut
cat dog sun map cup box fox owl pig hat key bus egg ink jam net""".split())
WORDS = tuple(dict.fromkeys(w for w in WORDS if w != w[::-1]))

# name syllables (invented combinations)
_ONSETS = ("b", "d", "f", "g", "h", "j", "k", "l", "m", "n", "p", "r", "s", "t", "v", "w", "z",
           "br", "dr", "fl", "gr", "kr", "sh", "st", "th", "tr")
_VOWELS = ("a", "e", "i", "o", "u", "ai", "ea", "o", "a", "e")
_MIDDLES = ("l", "m", "n", "r", "s", "v", "d", "th", "nd", "rl", "ss", "lv")
_FIRST_ENDS = ("a", "an", "el", "en", "in", "is", "o", "ra", "ric", "wen", "ya", "ian", "ette", "on")
_LAST_CODAS = ("lt", "sk", "rn", "nd", "x", "rk", "ll", "st", "mb", "nt", "rs", "ft", "ck", "m")
_LAST_ENDS = ("", "", "", "holm", "wick", "by", "er", "ley", "mont", "ard", "ow", "ing")
_PET_CODAS = ("b", "d", "ff", "g", "ck", "l", "m", "n", "p", "x", "zz", "sh")

PERSON_KEYS = ("job", "town", "pet", "pet_name", "colour", "age", "friend")
TOWN_KEYS = ("country", "river")
CORPUS_KEYS = ("job", "town", "pet", "colour", "age", "friend")  # "pet" states kind and name

# Statement templates: a fact is always stated with one of these (the tests parse them back).
STATEMENTS: dict[str, tuple[str, ...]] = {
    "job": ("{name} works as a {job}.", "By trade, {name} is a {job}.", "{name}'s job: {job}.",
            "{name} earns a living as a {job}.", "{name} is a {job} by profession."),
    "town": ("{name} lives in {town}.", "{name} makes a home in {town}.",
             "Home for {name} is the town of {town}.", "{name}'s town: {town}."),
    "pet": ("{name} has a {pet} named {pet_name}.", "{name} keeps a {pet} called {pet_name}.",
            "{pet_name} is the {pet} that belongs to {name}.",
            "{name}'s pet is a {pet}; its name is {pet_name}."),
    "colour": ("{name}'s favourite colour is {colour}.", "{name} likes the colour {colour} best.",
               "Of all colours, {name} prefers {colour}.", "{name}'s favourite colour: {colour}."),
    "age": ("{name} is {age} years old.", "{name} is aged {age}.", "{name}'s age: {age}.",
            "{name} turned {age} this year."),
    "friend": ("{name}'s best friend is {friend}.", "The best friend of {name} is {friend}.",
               "{name} counts {friend} as a best friend.", "{name}'s best friend: {friend}."),
    "country": ("{town} is a town in {country}.", "{town} lies in {country}.",
                "The town of {town} is in {country}.", "{town}'s country: {country}."),
    "river": ("The river {river} flows through {town}.", "{town} sits on the river {river}.",
              "{town}'s river: {river}."),
}
STATEMENTS["pet_name"] = STATEMENTS["pet"]
QUESTIONS: dict[str, tuple[str, ...]] = {
    "job": ("What is {name}'s job?", "What does {name} do for a living?",
            "What is the occupation of {name}?"),
    "town": ("Where does {name} live?", "In which town does {name} live?",
             "Which town is home to {name}?"),
    "pet": ("What kind of pet does {name} have?", "What animal does {name} keep as a pet?"),
    "pet_name": ("What is the name of {name}'s {pet}?", "What is {name}'s pet called?"),
    "colour": ("What is {name}'s favourite colour?", "Which colour does {name} like best?"),
    "age": ("How old is {name}?", "What is {name}'s age?"),
    "friend": ("Who is {name}'s best friend?", "Who is the best friend of {name}?"),
    "country": ("In which country is {town}?", "Which country is {town} in?"),
    "river": ("Which river flows through {town}?", "What river runs through {town}?"),
}
OPENERS = ("Here is what we know about {x}.", "A short note about {x}.", "About {x}:", "{x}, in brief.")
ARITH_STATEMENTS = {
    "add": ("{a} plus {b} is {c}.", "{a} plus {b} equals {c}.", "The sum of {a} and {b} is {c}.",
            "Adding {b} to {a} gives {c}."),
    "sub": ("{a} minus {b} is {c}.", "{a} minus {b} equals {c}.", "Taking {b} from {a} leaves {c}.",
            "The difference between {a} and {b} is {c}."),
    "mul": ("{a} times {b} is {c}.", "{a} times {b} equals {c}.", "The product of {a} and {b} is {c}.",
            "{a} multiplied by {b} makes {c}."),
}
ARITH_QUESTIONS = {
    "add": ("What is {a} plus {b}?", "Compute {a} + {b}.", "Add {a} and {b}."),
    "sub": ("What is {a} minus {b}?", "Compute {a} - {b}.", "Subtract {b} from {a}."),
    "mul": ("What is {a} times {b}?", "Compute {a} * {b}.", "Multiply {a} by {b}."),
}
STRING_QUESTIONS = {
    "reverse": ("Reverse the word '{w}'.", "Write '{w}' backwards.", "What is '{w}' spelled backwards?"),
    "length": ("How many letters are in '{w}'?", "Count the letters in the word '{w}'."),
    "upper": ("Spell '{w}' in capital letters.", "Write '{w}' in uppercase."),
}
STRING_REPLIES = {"reverse": "'{w}' backwards is {v}.", "length": "'{w}' has {v} letters.",
                  "upper": "In capital letters: {v}."}
SYSTEM_PROMPTS = ("You are a helpful assistant.", "You are a concise assistant. Answer in a few words.",
                  "Answer the user's question briefly and correctly.")
FILLER = ("That is a really interesting question, and there are many ways to think about it.",
          "Before answering, it is worth considering the broader context of the question.",
          "People often wonder about this sort of thing, and opinions differ quite a lot.",
          "Let me think about this carefully, step by step, from several different angles.",
          "Of course, one should always be careful when giving answers to questions like this.",
          "I hope this long explanation has been helpful and answers everything you wanted.")
RUDE = ("Ugh, obviously. {r}", "{r} Don't waste my time with such easy questions.",
        "Seriously? Look it up yourself. Fine: {r}", "What a silly thing to ask. {r}")
BOILERPLATE = (  # every boilerplate document has one of the first three lines
    "We use cookies to give you the best experience on our website. By continuing to browse, you agree to our use of cookies.",
    "Subscribe to our newsletter and never miss an update! Enter your email below.",
    "Copyright 2024. All rights reserved. Terms of use | Privacy | Sitemap",
    "Accept all cookies | Manage preferences | Reject non-essential",
    "Home | About us | Blog | Shop | Contact | Privacy policy",
    "Skip to main content", "Share this page: Facebook | Twitter | Email | Print",
    "Sign in | Register | Forgot your password?", "Click here to read more articles like this one.",
    "This site is best viewed in a modern browser. Enable JavaScript to continue.")
SPAM = ("BUY NOW!!! Limited offer, click here!!!", "Cheap deals cheap deals best price guaranteed",
        "WIN A FREE PRIZE TODAY click the link", "Make money fast from home, no experience needed!",
        "hot offers hot offers hot offers", "Lose weight quickly with this one weird trick")
PII = ("Contact {name} at {email} or call {phone}.", "For bookings, email {email} (office: {phone}).",
       "{name}'s new number is {phone}; the old address {email} still works.",
       "Send your CV to {email}. Questions? Ring {phone} between 9 and 5.")
# Why a preference pair's rejected reply loses; the last three are styles (the answer is still
# there), which is what sft_style_noise writes into instruction rows.
REJECTED_STYLES = ("wrong", "rambling", "repetitive", "rude")
NOISE_STYLES = REJECTED_STYLES[1:]
NOISE_KINDS = ("exact_duplicate", "near_duplicate", "boilerplate", "spam", "pii")
SPLIT_NAMES = ("pretrain/train", "pretrain/val", "sft/train", "sft/test", "preference/train",
               "preference/test", "rl/train", "rl/test", "prm/train", "prm/test")


@dataclass
class WorldConfig:
    seed: int = 0
    num_people: int = 60
    num_towns: int = 12
    docs_per_person: int = 50
    docs_per_town: int = 6
    num_arithmetic_docs: int = 500
    num_dialogue_docs: int = 500
    val_docs_per_person: int = 2
    noise_fraction: float = 0.1
    heldout_fraction: float = 0.15
    num_sft_train: int = 2000
    num_sft_test: int = 200
    num_pref_train: int = 1000
    num_pref_test: int = 100
    num_rl_train: int = 1000
    num_rl_test: int = 100
    num_prm_train: int = 1000
    num_prm_test: int = 100
    sft_style_noise: float = 0.0

    def validate(self) -> None:
        if not 4 <= self.num_people <= 2000:
            raise TemperError(f"num_people must be in [4, 2000], got {self.num_people}")
        if not 2 <= self.num_towns <= len(TOWNS):
            raise TemperError(f"num_towns must be in [2, {len(TOWNS)}], got {self.num_towns}")
        if not 0.0 <= self.noise_fraction <= 0.5:
            raise TemperError(f"noise_fraction must be in [0, 0.5], got {self.noise_fraction}")
        if not 0.0 < self.heldout_fraction < 1.0:
            raise TemperError(f"heldout_fraction must be in (0, 1), got {self.heldout_fraction}")
        if not 0.0 <= self.sft_style_noise < 1.0:
            raise TemperError(f"sft_style_noise (the share of sft/train replies written rambling, repetitive or "
                              f"rude) must be in [0, 1), got {self.sft_style_noise}")
        for name, value in asdict(self).items():
            if name not in ("seed", "noise_fraction", "heldout_fraction", "sft_style_noise") and value < 0:
                raise TemperError(f"{name} must not be negative, got {value}")


@dataclass
class World:
    config: WorldConfig
    people: list[dict]  # name, job, town, pet, pet_name, colour, age, friend
    towns: list[dict]  # name, country, river
    splits: dict[str, list[dict]] = field(default_factory=dict)  # "sft/train" -> rows

    def facts(self) -> dict:
        return {"seed": self.config.seed, "people": self.people, "towns": self.towns}


@dataclass
class _Item:
    """One question with its checkable answer; `reply(value)` words an answer with any value."""
    question: str
    answer: str
    wrong: str
    reply: Callable[[str], str]
    task: str
    meta: dict


def _bad_reply(rng: random.Random, it: _Item, style: str) -> str:
    """`it` answered in one of the REJECTED_STYLES; all but "wrong" still hold the answer."""
    if style == "wrong":
        return it.reply(it.wrong)
    if style == "rambling":
        fill = rng.sample(FILLER, 5)
        return " ".join(fill[:3] + [f"Anyway, the answer would be {it.answer}."] + fill[3:])
    if style == "repetitive":
        return " ".join([f"The answer is {it.answer}."] * rng.randint(5, 9))
    assert style == "rude", style
    return rng.choice(RUDE).format(r=it.reply(it.answer))


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def _names(rng: random.Random, n: int, taken: set[str]) -> list[str]:
    out: list[str] = []
    while len(out) < n:
        first = _cap(rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_MIDDLES) + rng.choice(_FIRST_ENDS))
        last = _cap(rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_LAST_CODAS) + rng.choice(_LAST_ENDS))
        name = f"{first} {last}"
        if name not in taken and first not in taken and last not in taken:
            taken.add(name)
            out.append(name)
    return out


class _Builder:
    def __init__(self, cfg: WorldConfig):
        self.cfg = cfg
        rng = self.rng("entities")
        towns = rng.sample(range(len(TOWNS)), cfg.num_towns)
        rivers = rng.sample(RIVERS, cfg.num_towns)
        self.towns = [{"name": TOWNS[t], "country": rng.choice(COUNTRIES), "river": r}
                      for t, r in zip(towns, rivers)]
        names = _names(rng, cfg.num_people, set(TOWNS) | set(RIVERS) | set(COUNTRIES))
        self.people = []
        for i, name in enumerate(names):
            pet_name = _cap(rng.choice(_ONSETS) + rng.choice("aeiou") + rng.choice(_PET_CODAS))
            friend = rng.choice([n for j, n in enumerate(names) if j != i])
            self.people.append({"name": name, "job": rng.choice(JOBS), "town": rng.choice(self.towns)["name"],
                                "pet": rng.choice(PETS), "pet_name": pet_name, "colour": rng.choice(COLOURS),
                                "age": rng.randint(18, 80), "friend": friend})
        self.pools = self._split_identities()

    def rng(self, part: str) -> random.Random:
        return random.Random(f"{self.cfg.seed}:{part}")

    def _split_identities(self) -> dict[str, dict[str, list]]:
        """Each question identity goes to train or test, once, for every dataset."""
        rng, frac = self.rng("heldout"), self.cfg.heldout_fraction
        pools: dict[str, dict[str, list]] = {s: {"fact": [], "arith": [], "word": []} for s in ("train", "test")}

        def split(items: list, kind: str) -> None:
            items = list(items)
            rng.shuffle(items)
            k = min(len(items) - 1, max(1, round(frac * len(items))))
            pools["test"][kind] += items[:k]
            pools["train"][kind] += items[k:]

        for key in PERSON_KEYS:
            split([("person", i, key) for i in range(len(self.people))], "fact")
        for key in TOWN_KEYS:
            split([("town", i, key) for i in range(len(self.towns))], "fact")
        split([("add", a, b) for a in range(1, 51) for b in range(1, 51)], "arith")
        split([("sub", a, b) for a in range(1, 51) for b in range(1, a + 1)], "arith")
        split([("mul", a, b) for a in range(2, 13) for b in range(2, 13)], "arith")
        split(WORDS, "word")
        return pools

    # ------------------------------------------------------------------ questions and answers
    def fields(self, kind: str, idx: int) -> dict[str, str]:
        if kind == "person":
            return {k: str(v) for k, v in self.people[idx].items()}
        t = self.towns[idx]
        return {"town": t["name"], "country": t["country"], "river": t["river"]}

    def _wrong_fact(self, rng: random.Random, key: str, fields: dict[str, str]) -> str:
        true = fields[key]
        if key == "age":
            return str(rng.choice([a for a in range(max(18, int(true) - 9), min(80, int(true) + 9) + 1) if str(a) != true]))
        choices = {"job": JOBS, "pet": PETS, "colour": COLOURS, "country": COUNTRIES,
                   "town": [t["name"] for t in self.towns], "river": [t["river"] for t in self.towns],
                   "pet_name": [p["pet_name"] for p in self.people],
                   "friend": [p["name"] for p in self.people if p["name"] != fields.get("name")]}[key]
        return rng.choice([c for c in choices if c != true])

    def item(self, rng: random.Random, split: str, task: str | None = None) -> _Item:
        task = task or rng.choices(("fact", "arithmetic", "string"), weights=(2, 1, 1))[0]
        pools = self.pools[split]
        if task == "fact":
            kind, idx, key = rng.choice(pools["fact"])
            f = self.fields(kind, idx)
            tmpl = rng.choice(STATEMENTS[key])
            bare = rng.random() < 0.3

            def reply(v: str) -> str:
                return v if bare else tmpl.format(**{**f, key: v})

            return _Item(rng.choice(QUESTIONS[key]).format(**f), f[key], self._wrong_fact(rng, key, f),
                         reply, task, {kind: f["name" if kind == "person" else "town"], "key": key})
        if task == "arithmetic":
            op, a, b = rng.choice(pools["arith"])
            c = {"add": a + b, "sub": a - b, "mul": a * b}[op]
            wrong = str(max(0, c + rng.choice([d for d in range(-10, 11) if d and c + d >= 0])))
            tmpl = rng.choice(ARITH_STATEMENTS[op] + ("{c}", "{c}", "The answer is {c}."))
            return _Item(rng.choice(ARITH_QUESTIONS[op]).format(a=a, b=b), str(c), wrong,
                         lambda v: tmpl.format(a=a, b=b, c=v), task, {"op": op, "a": a, "b": b})
        w = rng.choice(pools["word"])
        op = rng.choice(tuple(STRING_QUESTIONS))
        answer = {"reverse": w[::-1], "length": str(len(w)), "upper": w.upper()}[op]
        if op == "reverse":
            i = rng.randrange(len(w) - 1)
            r = list(answer)
            r[i], r[i + 1] = r[i + 1], r[i]
            wrong = "".join(r) if r != list(answer) else w
        elif op == "length":
            wrong = str(len(w) + rng.choice((-1, 1)))
        else:
            wrong = w.capitalize()
        tmpl = STRING_REPLIES[op] if rng.random() < 0.4 else "{v}"
        return _Item(rng.choice(STRING_QUESTIONS[op]).format(w=w), answer, wrong,
                     lambda v: tmpl.format(w=w, v=v), "string", {"op": op, "word": w})

    def _items(self, rng: random.Random, split: str, n: int, seen: set[str]) -> list[_Item]:
        """n items, avoiding repeated questions while the pool allows it."""
        out = []
        for _ in range(n):
            for _attempt in range(20):
                it = self.item(rng, split)
                if it.question not in seen:
                    break
            seen.add(it.question)
            out.append(it)
        return out

    # ------------------------------------------------------------------ instruction data
    def sft(self, split: str, n: int) -> list[dict]:
        rng, rows, items = self.rng(f"sft-{split}"), [], []
        for it in self._items(rng, split, n, set()):
            msgs = []
            if rng.random() < 0.2:
                msgs.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
            if rng.random() < 0.15:
                first = self.item(rng, split)
                msgs += [{"role": "user", "content": first.question},
                         {"role": "assistant", "content": first.reply(first.answer)}]
            msgs += [{"role": "user", "content": it.question}, {"role": "assistant", "content": it.reply(it.answer)}]
            rows.append({"messages": msgs, "answer": it.answer, "task": it.task, "meta": it.meta})
            items.append(it)
        if split == "train" and self.cfg.sft_style_noise > 0:
            self._style_noise(rows, items)
        return rows

    def _style_noise(self, rows: list[dict], items: list[_Item]) -> None:
        """Rewrite the final reply of round(sft_style_noise * len(rows)) rows in a rejected style.

        The choices come from their own stream, so the clean rows (and every other split) are
        the same bytes as in a world without noise."""
        rng = self.rng("sft-style-noise")
        for i in sorted(rng.sample(range(len(rows)), round(self.cfg.sft_style_noise * len(rows)))):
            style = rng.choice(NOISE_STYLES)
            rows[i]["messages"][-1]["content"] = _bad_reply(rng, items[i], style)
            rows[i]["style"] = style

    def preference(self, split: str, n: int) -> list[dict]:
        rng, rows = self.rng(f"pref-{split}"), []
        for i, it in enumerate(self._items(rng, split, n, set())):
            reason = REJECTED_STYLES[i % len(REJECTED_STYLES)]
            good, bad = it.reply(it.answer), _bad_reply(rng, it, reason)
            rows.append({"prompt": [{"role": "user", "content": it.question}],
                         "chosen": [{"role": "assistant", "content": good}],
                         "rejected": [{"role": "assistant", "content": bad}],
                         "reason": reason, "answer": it.answer, "task": it.task, "meta": it.meta})
        return rows

    def rl(self, split: str, n: int) -> list[dict]:
        rng = self.rng(f"rl-{split}")
        return [{"prompt": [{"role": "user", "content": it.question}], "answer": it.answer,
                 "task": it.task, "meta": it.meta} for it in self._items(rng, split, n, set())]

    def prm(self, split: str, n: int) -> list[dict]:
        """Step-labelled arithmetic solutions (module docstring). The first operation is an
        (op, a, b) identity of the split (so train and test stay disjoint), then 1-3 more on the
        running value; half the rows (seeded) carry one planted wrong step."""
        rng = self.rng(f"prm-{split}")
        pool = self.pools[split]["arith"]
        symbol = {"add": "+", "sub": "-", "mul": "*"}
        words = {"add": "add {x}", "sub": "subtract {x}", "mul": "multiply by {x}"}
        rows = []
        for _ in range(n):
            op, a, b = rng.choice(pool)
            ops = [(op, b)]
            value = {"add": a + b, "sub": a - b, "mul": a * b}[op]
            for _ in range(rng.randint(1, 3)):
                choices = ["add"] + (["sub"] if value >= 1 else []) + (["mul"] if value <= 30 else [])
                nxt = rng.choice(choices)
                x = rng.randint(2, 5) if nxt == "mul" else rng.randint(1, 20) if nxt == "add" else \
                    rng.randint(1, min(value, 20))  # the right values stay >= 0 (a wrong one may not)
                ops.append((nxt, x))
                value = {"add": value + x, "sub": value - x, "mul": value * x}[nxt]
            wrong_at = rng.randrange(len(ops)) if rng.random() < 0.5 else None
            delta = rng.choice((-10, -2, -1, 1, 2, 10))
            steps, labels, value, correct = [], [], a, a
            for i, (o, x) in enumerate(ops):
                result = {"add": value + x, "sub": value - x, "mul": value * x}[o]
                correct = {"add": correct + x, "sub": correct - x, "mul": correct * x}[o]
                if i == wrong_at:
                    result = result + delta if result + delta >= 0 else result - delta
                steps.append(f"{value} {symbol[o]} {x} = {result}")
                labels.append(wrong_at is None or i < wrong_at)
                value = result
            plan = ", ".join(words[o].format(x=x) for o, x in ops[1:])
            question = f"Start from {a}, {words[op].format(x=b)}, then {plan}. What do you get?"
            rows.append({"prompt": [{"role": "user", "content": question}], "completions": steps, "labels": labels,
                         "answer": str(correct), "task": "arithmetic",
                         "meta": {"ops": len(ops), "first_error": wrong_at}})
        return rows

    # ------------------------------------------------------------------ pretraining corpus
    def person_doc(self, rng: random.Random, i: int, counts: dict[str, int]) -> str:
        f = self.fields("person", i)
        keys = sorted(CORPUS_KEYS, key=lambda k: (counts[k], rng.random()))[: rng.randint(2, 6)]
        rng.shuffle(keys)
        for k in keys:
            counts[k] += 1
        sents = [rng.choice(STATEMENTS[k]).format(**f) for k in keys]
        if rng.random() < 0.3:
            sents.insert(0, rng.choice(OPENERS).format(x=f["name"]))
        return " ".join(sents)

    def town_doc(self, rng: random.Random, i: int) -> str:
        f = self.fields("town", i)
        sents = [rng.choice(STATEMENTS[k]).format(**f) for k in rng.sample(TOWN_KEYS, rng.randint(1, 2))]
        residents = [p for p in self.people if p["town"] == f["town"]]
        for p in rng.sample(residents, min(len(residents), rng.randint(1, 4))):
            sents.append(rng.choice(STATEMENTS["town"]).format(**{k: str(v) for k, v in p.items()}))
        rng.shuffle(sents)
        return " ".join(sents)

    def arithmetic_doc(self, rng: random.Random) -> str:
        sents = []
        for _ in range(rng.randint(3, 6)):
            op, a, b = rng.choice(self.pools["train"]["arith"])
            c = {"add": a + b, "sub": a - b, "mul": a * b}[op]
            sents.append(rng.choice(ARITH_STATEMENTS[op]).format(a=a, b=b, c=c))
        return " ".join(sents)

    def dialogue_doc(self, rng: random.Random) -> str:
        user, bot = rng.choice((("Q", "A"), ("User", "Assistant")))
        lines = []
        for _ in range(rng.randint(2, 4)):
            it = self.item(rng, "train")
            lines += [f"{user}: {it.question}", f"{bot}: {it.reply(it.answer)}"]
        return "\n".join(lines)

    def corpus(self, split: str, seen: set[str]) -> list[dict]:
        """Clean documents; none repeats a text in `seen` (which they are added to)."""
        rng, cfg = self.rng(f"corpus-{split}"), self.cfg
        per_person = cfg.docs_per_person if split == "train" else cfg.val_docs_per_person
        scale = 1 if split == "train" else 0.1
        jobs: list[tuple[str, str | None, Callable[[], str]]] = []
        for i, p in enumerate(self.people):
            counts = dict.fromkeys(CORPUS_KEYS, 0)
            jobs += [("person", p["name"], lambda i=i, c=counts: self.person_doc(rng, i, c))] * per_person
        town_docs = cfg.docs_per_town if split == "train" else max(1, cfg.docs_per_town // 6)
        for i, t in enumerate(self.towns):
            jobs += [("town", t["name"], lambda i=i: self.town_doc(rng, i))] * town_docs
        jobs += [("arithmetic", None, lambda: self.arithmetic_doc(rng))] * round(cfg.num_arithmetic_docs * scale)
        jobs += [("dialogue", None, lambda: self.dialogue_doc(rng))] * round(cfg.num_dialogue_docs * scale)
        docs = []
        for topic, about, make in jobs:
            for _attempt in range(20):
                text = make()
                if text not in seen:
                    break
            else:
                continue
            seen.add(text)
            meta = {"id": f"{split}-{len(docs):06d}", "kind": "clean", "topic": topic}
            if about is not None:
                meta["about"] = about
            docs.append({"text": text, "meta": meta})
        rng.shuffle(docs)
        return docs

    def noise(self, clean: list[dict], seen: set[str]) -> list[dict]:
        rng, f = self.rng("noise"), self.cfg.noise_fraction
        n = round(len(clean) * f / (1 - f))
        kinds = [NOISE_KINDS[i % len(NOISE_KINDS)] for i in range(n)]
        rng.shuffle(kinds)
        long_docs = [d for d in clean if d["text"].count(". ") >= 2] or clean
        out = []
        for j, kind in enumerate(kinds):
            meta = {"id": f"noise-{j:06d}", "kind": kind}
            if kind == "exact_duplicate":
                src = rng.choice(clean)
                text, meta["source"] = src["text"], src["meta"]["id"]
            elif kind == "near_duplicate":
                src = rng.choice(long_docs)
                text, meta["source"] = self._perturb(rng, src["text"], seen), src["meta"]["id"]
            elif kind == "boilerplate":
                lines = [rng.choice(BOILERPLATE[:3])] + rng.sample(BOILERPLATE[3:], rng.randint(2, 4))
                rng.shuffle(lines)
                text = "\n".join(lines)
            elif kind == "spam":
                text = rng.choice((" ", "\n")).join([rng.choice(SPAM)] * rng.randint(8, 30))
            else:
                sents = []
                for _ in range(rng.randint(1, 3)):
                    first, last = rng.choice(self.people)["name"].lower().split()
                    email = f"{first}.{last}{rng.choice(('', str(rng.randint(1, 99))))}@{rng.choice(('example.com', 'example.org'))}"
                    phone = f"{rng.choice(('', '(0' + str(rng.randint(10, 99)) + ') '))}555-01{rng.randint(0, 99):02d}"
                    sents.append(rng.choice(PII).format(name=_cap(first) + " " + _cap(last), email=email, phone=phone))
                text = " ".join(sents)
            out.append({"text": text, "meta": meta})
        return out

    @staticmethod
    def _perturb(rng: random.Random, text: str, seen: set[str]) -> str:
        """A few small edits (punctuation, a filler word, spacing) that keep the text recognisable."""
        out = text
        while out == text or out in seen:
            out = text
            for _ in range(rng.randint(1, 3)):
                op = rng.randrange(4)
                if op == 0:
                    out = out[:-1] + "!" if out.endswith(".") else out + "!"
                elif op == 1:  # a filler word at the start of a random sentence
                    parts = out.split(". ")
                    i = rng.randrange(len(parts))
                    parts[i] = f"{rng.choice(('Also', 'Indeed', 'Note'))}, {parts[i]}"
                    out = ". ".join(parts)
                elif op == 2:
                    out = out.replace(" ", "  ", 1)
                else:
                    out = out + rng.choice((" Thanks for reading.", " (updated)", " More soon."))
        return out


def build_world(cfg: WorldConfig) -> World:
    """Generate the whole world from `cfg` (deterministic in `cfg.seed`)."""
    cfg.validate()
    b = _Builder(cfg)
    seen: set[str] = set()
    train = b.corpus("train", seen)
    val = b.corpus("val", seen)
    train += b.noise(train, seen)
    b.rng("shuffle").shuffle(train)
    splits = {"pretrain/train": train, "pretrain/val": val}
    for split, sft_n, pref_n, rl_n in (("train", cfg.num_sft_train, cfg.num_pref_train, cfg.num_rl_train),
                                       ("test", cfg.num_sft_test, cfg.num_pref_test, cfg.num_rl_test)):
        splits[f"sft/{split}"] = b.sft(split, sft_n)
        splits[f"preference/{split}"] = b.preference(split, pref_n)
        splits[f"rl/{split}"] = b.rl(split, rl_n)
    splits["prm/train"], splits["prm/test"] = b.prm("train", cfg.num_prm_train), b.prm("test", cfg.num_prm_test)
    return World(config=cfg, people=b.people, towns=b.towns, splits=splits)


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_writer(path, newline="\n") as fh:  # the same bytes on every platform
        fh.write(text)


README = """# The temper synthetic world

Generated by `temper world` (temper.data.world) with this config:

```json
{config}
```

| file | rows | content |
|---|---|---|
{table}

Rows of `sft`, `preference` and `rl` carry `answer` (the exact-match target), `task`
(fact, arithmetic, string) and `meta` (what the question is about). Train and test are
disjoint by question identity: a (person or town, fact) pair, an (op, a, b) triple, or a word.
"""
DESCRIPTIONS = {
    "pretrain/train": "pretraining documents {text, meta}; meta.kind labels planted noise (clean, exact_duplicate, near_duplicate, boilerplate, spam, pii)",
    "pretrain/val": "fresh clean documents about the same world (never copies of train)",
    "sft/train": "instruction rows {messages, answer, task, meta}; `style` (rambling, repetitive, rude) marks a reply written in a rejected style (sft_style_noise)", "sft/test": "held-out instruction rows",
    "preference/train": "TRL preference pairs {prompt, chosen, rejected, reason}",
    "preference/test": "held-out preference pairs",
    "rl/train": "RL prompts with verifiable answers {prompt, answer, task}", "rl/test": "held-out RL prompts",
    "prm/train": "step-labelled arithmetic solutions {prompt, completions, labels, answer}; meta.first_error: the "
                 "planted wrong step (null: none)",
    "prm/test": "held-out step-labelled solutions",
}


def write_world(world: World, out_dir: str | Path) -> dict[str, Path]:
    """Write every split as JSONL plus facts.json and README.md; returns name -> path."""
    out = Path(out_dir)
    paths: dict[str, Path] = {}
    for name in SPLIT_NAMES:
        rows = world.splits[name]
        paths[name] = out / f"{name}.jsonl"
        _write_atomic(paths[name], "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    paths["facts"] = out / "facts.json"
    _write_atomic(paths["facts"], json.dumps(world.facts(), ensure_ascii=False, indent=1) + "\n")
    table = "\n".join(f"| `{n}.jsonl` | {len(world.splits[n])} | {DESCRIPTIONS[n]} |" for n in SPLIT_NAMES)
    table += f"\n| `facts.json` | {len(world.people)} people, {len(world.towns)} towns | the ground truth |"
    paths["readme"] = out / "README.md"
    _write_atomic(paths["readme"], README.format(config=json.dumps(asdict(world.config), indent=1), table=table))
    return paths


# Completion probes: a statement template cut just before the value, chosen so the prefix
# can only go on with that fact ("X is" could go on with a job or an age; "X's age:" cannot).
PROBE_TEMPLATES = {"job": STATEMENTS["job"][0], "town": STATEMENTS["town"][0],
                   "colour": STATEMENTS["colour"][0], "age": STATEMENTS["age"][2]}


def fact_probes(facts: dict, keys: tuple[str, ...] = tuple(PROBE_TEMPLATES)) -> list[dict[str, str]]:
    """What a pretrained model knows, as completions ("Wula Rembard works as a" -> "tailor"):
    one probe per person and fact. `facts` is the content of facts.json."""
    probes = []
    for person in facts["people"]:
        for key in keys:
            template = PROBE_TEMPLATES[key]
            prefix = template[:template.index("{" + key + "}")].rstrip()
            probes.append({"prompt": prefix.format(name=person["name"]), "answer": str(person[key]), "fact": key})
    return probes


def prepare_world(settings: dict, seed: int, world_dir: str | Path) -> Path:
    """The world of `settings` (WorldConfig keys; `seed` unless they name one) written to `world_dir`,
    rewritten only when its config changed (unchanged files keep caches built on them valid)."""
    cfg = WorldConfig(**{"seed": seed, **settings})
    cfg.validate()
    world_dir = Path(world_dir)
    stamp = world_dir / "world_config.json"
    wanted = json.dumps(asdict(cfg), sort_keys=True)
    if not (stamp.is_file() and stamp.read_text() == wanted):
        write_world(build_world(cfg), world_dir)
        _write_atomic(stamp, wanted)
    return world_dir


# ----------------------------------------------------------------------------- understanding tasks
# What an encoder is fine-tuned and measured on. Each fact is a sentence in one of its STATEMENTS
# templates; the held-out split uses each fact's LAST template, which no training row uses, so
# a model is measured on wordings it was not fine-tuned on (the pretraining corpus uses them all).

UNDERSTANDING_KEYS = ("job", "town", "pet", "colour", "age", "friend")
UNDERSTANDING_TASKS = ("classify", "tokens")
TAGS = ("O", "B-PER", "I-PER", "B-LOC")  # people (the person, a friend) and towns
_WORD = re.compile(r"\w+|[^\w\s]")


def _templates(key: str, split: str) -> tuple[str, ...]:
    if split not in ("train", "test"):
        raise TemperError(f"split must be train or test, got {split!r}")
    templates = STATEMENTS[key]
    return templates[:-1] if split == "train" else templates[-1:]


def _tagged_words(template: str, fields: dict[str, str]) -> tuple[list[str], list[str]]:
    """The sentence as words (word characters, or one punctuation mark) and each word's BIO tag."""
    words, tags = [], []
    for piece in re.split(r"(\{\w+\})", template):
        field_name = piece[1:-1] if piece.startswith("{") and piece.endswith("}") else None
        piece_words = _WORD.findall(fields[field_name] if field_name else piece)
        kind = {"name": "PER", "friend": "PER", "town": "LOC"}.get(field_name or "")
        words += piece_words
        tags += [("B-" if i == 0 else "I-") + kind if kind else "O" for i in range(len(piece_words))]
    return words, tags


def understanding_rows(facts: dict, task: str, split: str) -> list[dict]:
    """The built-in understanding task, as rows `temper finetune-encoder` reads:

    - `classify`: {"text": a fact sentence, "label": which fact it states (job, town, pet, colour,
      age, friend)}, one row per person, fact and template;
    - `tokens`: {"tokens": the sentence's words, "tags": O / B-PER / I-PER / B-LOC per word} (names
      of people and towns; the tokenizer lower-cases, so capitals do not give them away).

    `facts` is facts.json's content; train rows use every template of a fact but the last, test
    rows only the last."""
    if task not in UNDERSTANDING_TASKS:
        raise TemperError(f"task must be one of {', '.join(UNDERSTANDING_TASKS)}, got {task!r}")
    rows = []
    for person in facts["people"]:
        fields = {k: str(v) for k, v in person.items()}
        for key in UNDERSTANDING_KEYS:
            for template in _templates(key, split):
                if task == "classify":
                    rows.append({"text": template.format(**fields), "label": key})
                else:
                    words, tags = _tagged_words(template, fields)
                    rows.append({"tokens": words, "tags": tags})
    return rows


def paraphrase_pairs(facts: dict, split: str) -> list[dict]:
    """{"anchor", "positive"}: one fact about one person in two templates (a paraphrase). Train pairs
    use two of a fact's templates but the last; test pairs pair the last template with the first,
    so a test anchor's wording is one no training pair has."""
    rows = []
    for person in facts["people"]:
        fields = {k: str(v) for k, v in person.items()}
        for key in UNDERSTANDING_KEYS:
            templates = STATEMENTS[key]
            if split == "test":
                rows.append({"anchor": templates[-1].format(**fields), "positive": templates[0].format(**fields),
                             "fact": key})
                continue
            _templates(key, split)
            usable = templates[:-1]
            for a, b in zip(usable, usable[1:]):
                rows.append({"anchor": a.format(**fields), "positive": b.format(**fields), "fact": key})
    return rows
