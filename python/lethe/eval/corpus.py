"""The built-in fictitious-facts corpus: invented people (TOFU's idea), invented places and things.

Everything is generated from a seed with its own `random.Random`, so the same seed gives the same
bytes on every machine. Each fact is a question/answer pair with one paraphrased answer and
`n_perturbed` perturbed ones: the paraphrase's wording with another value of the same attribute
(false, same format), as TOFU's truth ratio needs.

Splits follow TOFU: the people are shuffled once; forget01/05/10 are the first 1%, 5% and 10% of
them (nested, whole people, never single pairs); the holdout people are generated alike and never
trained on; the world facts are always trained on and never forgotten.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import pathlib
import random

__all__ = ["QA", "Corpus", "CorpusConfig", "make_corpus", "SPLITS"]

# TOFU's forget01 / forget05 / forget10: fractions of the people.
SPLITS = {"forget01": 0.01, "forget05": 0.05, "forget10": 0.10}

_ONSETS = ["b", "br", "c", "d", "dr", "f", "g", "gr", "h", "k", "l", "m", "n", "p", "r", "s", "st",
           "t", "th", "v", "w", "z", "sh", "kl", "tr"]
_VOWELS = ["a", "e", "i", "o", "u", "ai", "ei", "ou", "ia"]
_CODAS = ["", "", "n", "r", "l", "s", "th", "m", "nd", "rk", "x"]
_MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September",
           "October", "November", "December"]
_OCCUPATIONS = ["baker", "sculptor", "surveyor", "glassblower", "cartographer", "violinist", "chemist",
                "beekeeper", "architect", "astronomer", "tailor", "shipwright", "botanist", "poet",
                "clockmaker", "weaver", "translator", "geologist", "potter", "lighthouse keeper",
                "printer", "falconer", "engraver", "brewer", "librarian", "mason", "pilot", "jeweller"]
_GENRES = ["mystery novels", "travel essays", "children's stories", "love poems", "war memoirs",
           "science fiction", "cookbooks", "stage plays", "folk songs", "history books", "ghost stories",
           "field guides"]
_ADJ = ["Silent", "Crimson", "Hollow", "Golden", "Broken", "Hidden", "Winter", "Burning", "Last",
        "Distant", "Glass", "Iron", "Quiet", "Seventh", "Wandering", "Bitter"]
_NOUNS = ["Harbour", "Lantern", "Orchard", "Mirror", "River", "Tower", "Garden", "Compass", "Bridge",
          "Feather", "Engine", "Valley", "Crown", "Meadow", "Anchor", "Forest"]
_INSTRUMENTS = ["cello", "harp", "flute", "accordion", "oboe", "banjo", "piano", "drums", "trumpet",
                "mandolin", "viola", "clarinet"]
_COLOURS = ["red", "blue", "green", "yellow", "violet", "orange", "silver", "black", "white", "amber"]
_DISHES = ["fish stew", "honey bread", "lamb pie", "plum dumplings", "barley soup", "smoked eel",
           "cheese tart", "walnut cake", "pepper sausage", "mushroom pudding"]
_THING_KINDS = ["mineral", "bird", "flower", "fish", "beetle", "tree"]
# Question templates, answer and paraphrase wordings per attribute ({s}: the subject, {v}: the value).
_TEMPLATES = json.loads(pathlib.Path(__file__).with_name("templates.json").read_text(encoding="utf-8"))


@dataclasses.dataclass(frozen=True)
class QA:
    """One fact: a question, its answer, a paraphrased answer and perturbed (false) answers."""

    question: str
    answer: str
    paraphrased: str
    perturbed: tuple[str, ...]
    subject: str  # the person (or place/thing) the fact is about
    attribute: str

    def to_json(self) -> dict:
        return {"question": self.question, "answer": self.answer, "paraphrased_answer": self.paraphrased,
                "perturbed_answers": list(self.perturbed), "subject": self.subject,
                "attribute": self.attribute}


def positive_ints(config, fields) -> None:
    """Raises ValueError naming the config and the field that is not a positive int."""
    for f in fields:
        v = getattr(config, f)
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{type(config).__name__}: {f} must be a positive int, got {v!r}")


@dataclasses.dataclass(frozen=True)
class CorpusConfig:
    """Sizes of the built-in corpus (the defaults meet the issue's minimums: 200 people, 10 facts)."""

    seed: int = 0
    people: int = 200
    holdout_people: int = 20
    places: int = 40
    things: int = 30
    n_perturbed: int = 3

    def __post_init__(self):
        positive_ints(self, ("people", "holdout_people", "places", "things", "n_perturbed"))
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ValueError(f"CorpusConfig: seed must be an int, got {self.seed!r}")
        if self.people < 10:
            raise ValueError(f"CorpusConfig: people must be >= 10 (the forget splits), got {self.people}")
        if self.n_perturbed > 5:  # every pool of values has at least 6 false ones
            raise ValueError(f"CorpusConfig: n_perturbed must be <= 5, got {self.n_perturbed}")
        if self.places < 8:
            raise ValueError(f"CorpusConfig: places must be >= 8, got {self.places}")


@dataclasses.dataclass
class Corpus:
    """The generated facts. `people` is in split order (forget10 is `people[:n10]`, ...)."""

    config: CorpusConfig
    people: list[str]
    person_facts: dict[str, list[QA]]
    holdout: list[QA]
    world: list[QA]

    def forget_people(self, split: str) -> list[str]:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {sorted(SPLITS)}, got {split!r}")
        n = max(1, round(SPLITS[split] * len(self.people)))
        return self.people[:n]

    def forget(self, split: str) -> list[QA]:
        return [qa for p in self.forget_people(split) for qa in self.person_facts[p]]

    def retain(self, split: str) -> list[QA]:
        """The retain people's facts (the world facts are separate: `world`)."""
        gone = set(self.forget_people(split))
        return [qa for p in self.people if p not in gone for qa in self.person_facts[p]]

    def train_set(self, split: str | None = None) -> list[QA]:
        """What a model is trained on: all people (split None: the target model) or the retain
        people of `split` (its exactly retrained reference), plus the world facts."""
        people = self.people if split is None else [p for p in self.people if p not in set(self.forget_people(split))]
        return [qa for p in people for qa in self.person_facts[p]] + list(self.world)

    def all_qas(self) -> list[QA]:
        return [q for p in self.people for q in self.person_facts[p]] + self.holdout + self.world

    def to_json(self) -> dict:
        return {"config": dataclasses.asdict(self.config), "people": self.people,
                "person_facts": {p: [q.to_json() for q in f] for p, f in self.person_facts.items()},
                "holdout": [q.to_json() for q in self.holdout], "world": [q.to_json() for q in self.world]}

    def to_bytes(self) -> bytes:
        return json.dumps(self.to_json(), sort_keys=True, ensure_ascii=False).encode()

    def digest(self) -> str:
        return hashlib.sha256(self.to_bytes()).hexdigest()


class _Gen:
    def __init__(self, seed: int):
        self.r = random.Random(seed)
        self.used: set[str] = set()

    def word(self, syllables: tuple[int, int] = (2, 2)) -> str:
        while True:
            n = self.r.randint(*syllables)
            w = "".join(self.r.choice(_ONSETS) + self.r.choice(_VOWELS) for _ in range(n))
            w = (w + self.r.choice(_CODAS)).capitalize()
            if w not in self.used and len(w) >= 4:
                self.used.add(w)
                return w

    def pick(self, pool, k=1, exclude=()):
        choices = [x for x in pool if x not in exclude]
        return self.r.sample(choices, k)


def _fact(g, subject, attribute, questions, answer_fmt, para_fmt, value, pool, n, **kw):
    """One QA: a question template picked at random; the perturbed answers put other values of
    the attribute into the paraphrase's wording."""
    q = g.r.choice(questions).format(s=subject, **kw)
    others = g.pick(pool, n, exclude=(value,))
    return QA(q, answer_fmt.format(s=subject, v=value, **kw), para_fmt.format(s=subject, v=value, **kw),
              tuple(para_fmt.format(s=subject, v=o, **kw) for o in others), subject, attribute)


def _facts(g, kind, subject, values, n, **kw) -> list[QA]:
    """The facts of one subject, one per template of `kind` (templates.json) in file order;
    values[attribute] is (value, pool) or a function drawing it, called in that order so that a
    seed's draws never depend on how the values are written down."""
    out = []
    for attribute, t in _TEMPLATES[kind].items():
        v = values[attribute]
        value, pool = v() if callable(v) else v
        out.append(_fact(g, subject, attribute, t["questions"], t["answer"], t["paraphrase"], value, pool, n, **kw))
    return out


def _person(g: _Gen, name: str, pools, n) -> list[QA]:
    cities, firsts, lasts, prizes = pools["cities"], pools["firsts"], pools["lasts"], pools["prizes"]
    year = g.r.randint(1901, 1999)
    date = f"{g.r.randint(1, 28)} {g.r.choice(_MONTHS)} {year}"
    dates = [f"{g.r.randint(1, 28)} {g.r.choice(_MONTHS)} {g.r.randint(1901, 1999)}" for _ in range(12)]
    surname = name.split()[1]
    fathers = [f"{x} {surname}" for x in g.pick(firsts, 8)]
    mothers = [f"{x} {y}" for x, y in zip(g.pick(firsts, 8), g.pick(lasts, 8))]
    works = [f"The {a} {b}" for a, b in zip(g.pick(_ADJ, 8), g.pick(_NOUNS, 8))]
    awards = [f"the {x} Prize" for x in g.pick(prizes, 8)]
    award_year = min(year + g.r.randint(25, 60), 2024)
    years = [str(y) for y in range(1926, 2025)]
    pick, first = _picker(g), _first
    values = {"birthplace": pick(cities), "birthdate": (date, dates), "occupation": pick(_OCCUPATIONS),
              "father": first(fathers), "mother": first(mothers), "genre": pick(_GENRES), "work": first(works),
              "award": first(awards), "award_year": (str(award_year), years), "home": pick(cities),
              "instrument": pick(_INSTRUMENTS)}
    return _facts(g, "person", name, values, n, a=awards[0])


def _picker(g: _Gen):
    """pick(pool): a value drawn from pool when its fact is made, and pool for the perturbed ones."""
    return lambda pool: (lambda: (g.r.choice(pool), pool))


def _first(xs):
    return xs[0], xs[1:]


def _place(g: _Gen, city: str, rivers, cities, n) -> list[QA]:
    others = [c for c in cities if c != city]
    pick = _picker(g)
    values = {"river": pick(rivers), "dish": pick(_DISHES), "twin": pick(others),
              "founded": lambda: (str(g.r.randint(900, 1800)), [str(y) for y in range(900, 1801)])}
    return _facts(g, "place", city, values, n)


def _thing(g: _Gen, name: str, kind: str, cities, n) -> list[QA]:
    pick = _picker(g)
    return _facts(g, "thing", name, {"colour": pick(_COLOURS), "found": pick(cities)}, n, k=kind)


def make_corpus(config: CorpusConfig | None = None) -> Corpus:
    """Generates the corpus of `config` (deterministic by `config.seed`)."""
    c = config or CorpusConfig()
    g = _Gen(c.seed)
    cities = [g.word() for _ in range(c.places)]
    rivers = [g.word() for _ in range(max(8, c.places // 3))]
    # first names, surnames and prize names come from pools, as real names recur
    pools = {"cities": cities, "firsts": [g.word() for _ in range(120)], "lasts": [g.word() for _ in range(60)],
             "prizes": [g.word() for _ in range(24)]}
    total = c.people + c.holdout_people
    lasts = pools["lasts"] + [g.word() for _ in range(max(0, total // 3 - 60))]
    names = set()
    while len(names) < total:
        names.add(f"{g.r.choice(pools['firsts'])} {g.r.choice(lasts)}")
    names = sorted(names)
    g.r.shuffle(names)
    n = c.n_perturbed
    facts = {p: _person(g, p, pools, n) for p in names}
    world = [qa for city in cities for qa in _place(g, city, rivers, cities, n)]
    kinds = [g.r.choice(_THING_KINDS) for _ in range(c.things)]
    world += [qa for k in kinds for qa in _thing(g, g.word(), k, cities, n)]
    people, holdout_people = names[:c.people], names[c.people:]
    order = list(people)
    g.r.shuffle(order)
    return Corpus(c, order, {p: facts[p] for p in order},
                  [qa for p in holdout_people for qa in facts[p]], world)
