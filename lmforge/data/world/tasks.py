"""Fine-tuning tasks built from the pretraining world, with splits that hold something out honestly.

Pretraining text covers every entity of ``World.build(world_seed, "default")``, so a fine-tuning test
set can only measure generalisation if it holds out something the fine-tuning train set never shows:

* entity split (sentiment, topic, NER, open-book QA): the entities of each kind are shuffled once per
  ``seed`` into train / validation / test, and each split is rendered from ``world.without(the other
  splits' entities)``, so no entity *named anywhere* in a test record is named in any train record;
* question split (closed-book QA): every entity stays (the facts must have been seen in pretraining),
  but the (entity, relation) pairs asked in test are never asked in train.

Everything is seeded with string seeds (hashed with SHA-512 by :mod:`random`, not by ``hash()``), so
records are identical in every process regardless of ``PYTHONHASHSEED``.  Records are plain dicts so
they can be written as JSONL or fed to any loader.
"""

from __future__ import annotations

import difflib
import random
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable

from lmforge.core.errors import ConfigError, DataError

from . import vocab
from .encyclopedia import render_entry
from .entity import Entity
from .facts import KINDS, World
from .questions import QA, ask, askable
from .reviews import _BAD, _GOOD, _OBJ_ASPECTS, _OPEN_GIFT, _OPEN_OBJ, _OPEN_PLACE, _PLACE_ASPECTS, _PLURAL
from .stories import render_story
from .text import a, cap, plural_creature, plural_object

SPLITS: tuple[str, ...] = ("train", "validation", "test")
# Share of each kind's entities held out; a kind always keeps at least one entity per split.
_HELD_OUT = {"validation": 0.15, "test": 0.25}
_MAX_PASSAGE_WORDS = 80
_ENTITY_SPLIT = ("test and validation records name only entities that never appear in train "
                 "(entity split: each split is rendered from the world restricted to its own entities)")


@dataclass(frozen=True)
class WorldTask:
    name: str
    type: str  # "classification" | "token_classification" | "text2text"
    description: str
    labels: tuple[str, ...] | None  # class names / BIO tags; None for text2text
    closed_book: bool | None  # text2text only: True = answerable only from pretraining facts
    held_out: str  # one sentence: what fine-tuning train never shows


NER_TAGS: tuple[str, ...] = ("O", "B-PER", "I-PER", "B-LOC", "I-LOC", "B-CRE", "I-CRE", "B-OBJ", "I-OBJ",
                             "B-ORG", "I-ORG")
_NER_TYPE = {"person": "PER", "place": "LOC", "creature": "CRE", "object": "OBJ", "guild": "ORG"}

WORLD_TASKS: dict[str, WorldTask] = {t.name: t for t in (
    WorldTask("world-sentiment", "classification",
              "sentiment of a short review whose label needs negation and contrast, not keywords",
              ("negative", "positive"), None,
              "test and validation reviews are about objects and places that never appear in train (entity split)"),
    WorldTask("world-sentiment-mixed", "classification",
              "the overall sentiment of a review weighing three one-clause evaluations (plain or negated) that "
              "disagree: the majority decides (made for weak-to-strong studies)",
              ("negative", "positive"), None,
              "test and validation reviews are about objects and places that never appear in train (entity split)"),
    WorldTask("world-topic", "classification",
              "which kind of entity a short encyclopedia passage is about", tuple(sorted(KINDS)), None,
              _ENTITY_SPLIT),
    WorldTask("world-ner", "token_classification",
              "BIO tags of person, place, creature, object and guild names in one or two sentences",
              NER_TAGS, None, _ENTITY_SPLIT),
    WorldTask("world-qa-context", "text2text",
              "open-book QA: copy the short answer to a fact question out of a passage", None, False,
              _ENTITY_SPLIT),
    WorldTask("world-qa-closed", "text2text",
              "closed-book QA: answer a fact question from what pretraining taught", None, True,
              "no entity is held out; test questions (entity, relation) never appear in fine-tuning train"),
)}


def world_task(name: str) -> WorldTask:
    """The task called ``name``; an unknown name is a ConfigError that suggests the closest one."""
    task = WORLD_TASKS.get(name)
    if task is None:
        close = difflib.get_close_matches(str(name), WORLD_TASKS, n=1, cutoff=0.0)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"unknown world task {name!r}{hint}; use one of {', '.join(WORLD_TASKS)}")
    return task


def build_world_task(name: str, seed: int = 0, n_train: int = 2000, n_val: int = 300, n_test: int = 500,
                     world_seed: int = 0, counterfactual: float = 0.0) -> dict[str, list[dict]]:
    """``{"train": [...], "validation": [...], "test": [...]}`` of exactly the requested sizes.

    Deterministic for its arguments; each split has its own random stream, so e.g. the test set does
    not change when ``n_train`` (or ``counterfactual``) does.  ``counterfactual`` (world-qa-context only): the
    share of *train* records whose answer is swapped, in passage and target alike, for the same relation's value
    of another train entity — the answer can then only be read, not recalled (validation and test keep the
    world's facts).
    """
    world_task(name)
    if not 0.0 <= counterfactual <= 1.0:
        raise ConfigError(f"{name}: counterfactual must be in [0, 1], got {counterfactual!r}")
    if counterfactual and name != "world-qa-context":
        raise ConfigError(f"{name}: counterfactual applies to world-qa-context only (it swaps answers in passages); "
                          f"set it to 0")
    sizes = {"train": n_train, "validation": n_val, "test": n_test}
    for arg, n in zip(("n_train", "n_val", "n_test"), sizes.values()):
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            raise ConfigError(f"{name}: {arg} must be an integer >= 0, got {n!r}")
    if name == "world-qa-closed":
        return _closed_qa(_world(world_seed), seed, sizes)
    views = _split_views(world_seed, seed)
    make = _MAKERS[name]
    out = {}
    for split in SPLITS:
        rng = random.Random(f"{name}:{seed}:{split}")
        out[split] = make(views[split], rng, sizes[split], f"{name} {split}")
    if counterfactual:
        out["train"] = _counterfactual(views["train"], out["train"], counterfactual,
                                       random.Random(f"{name}:{seed}:train:counterfactual"))
    return {split: [{k: v for k, v in r.items() if not k.startswith("_")} for r in records]
            for split, records in out.items()}


# -- world and entity split -----------------------------------------------------------------------


@lru_cache(maxsize=4)
def _world(world_seed: int) -> World:
    return World.build(world_seed, "default")


def entity_split(seed: int = 0, world_seed: int = 0) -> dict[str, list[str]]:
    """Entity names per split (stratified by kind), the held-out sets of the entity-split tasks."""
    world = _world(world_seed)
    rng = random.Random(f"world-tasks:entity-split:{seed}")
    out: dict[str, list[str]] = {s: [] for s in SPLITS}
    for kind in KINDS:
        names = [e.name for e in world.of_kind(kind)]
        rng.shuffle(names)
        n_test = max(1, round(len(names) * _HELD_OUT["test"]))
        n_val = max(1, round(len(names) * _HELD_OUT["validation"]))
        if len(names) < n_test + n_val + 1:
            raise DataError(f"the world has {len(names)} {kind} entities, too few for an entity split")
        out["test"] += names[:n_test]
        out["validation"] += names[n_test:n_test + n_val]
        out["train"] += names[n_test + n_val:]
    return out


@lru_cache(maxsize=8)
def _split_views(world_seed: int, seed: int) -> dict[str, World]:
    """One restricted world per split: renderers then cannot name another split's entities."""
    world, split = _world(world_seed), entity_split(seed, world_seed)
    return {s: world.without([n for other in SPLITS if other != s for n in split[other]]) for s in SPLITS}


def _fill(n: int, make: Callable[[], dict | None], what: str) -> list[dict]:
    """``n`` distinct records from ``make`` (None = candidate rejected); DataError when the world
    cannot supply that many distinct ones within a generous number of tries."""
    out: list[dict] = []
    seen: set[str] = set()
    for _ in range(20 * n + 200):
        if len(out) == n:
            break
        record = make()
        if record is None:
            continue
        key = repr(sorted(record.items()))
        if key not in seen:
            seen.add(key)
            out.append(record)
    if len(out) < n:
        raise DataError(f"{what}: the world supplied only {len(out)} distinct records of the {n} asked for; "
                        f"ask for fewer")
    return out


def _balanced(n: int, labels: tuple[str, ...], make: Callable[[str], dict | None], rng: random.Random,
              what: str) -> list[dict]:
    """``n`` records with labels as equal as possible (earlier labels get the remainder), shuffled."""
    out: list[dict] = []
    for i, label in enumerate(labels):
        k = n // len(labels) + (i < n % len(labels))
        out += _fill(k, lambda: make(label), f"{what} ({label})")
    rng.shuffle(out)
    return out


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def _sentences(doc: str) -> list[str]:
    """Sentences of a rendered document, without its title line (titles have no final stop)."""
    paragraphs = [p for p in doc.split("\n\n") if p.strip()]
    if len(paragraphs) > 1 and not paragraphs[0].rstrip().endswith((".", "!", "?")):
        paragraphs = paragraphs[1:]
    return [s for s in _SENTENCE_END.split(" ".join(p.replace("\n", " ") for p in paragraphs)) if s]


def _passage(sentences: list[str], max_sentences: int | None = None) -> str:
    """Leading sentences up to ``max_sentences`` and about 80 words (always at least one)."""
    out: list[str] = []
    words = 0
    for s in sentences[:max_sentences]:
        words += len(s.split())
        if out and words > _MAX_PASSAGE_WORDS:
            break
        out.append(s)
    return " ".join(out)


# -- world-sentiment ------------------------------------------------------------------------------

# Words whose negation reads badly or ambiguously ("not worse than I expected", "not very bad"); they
# are left out of every form so each remaining word still occurs equally often under both labels.
_NO_NEGATION = ("better than I expected", "worse than I expected", "very bad")


def _polar(table: dict, aspect: str, good: bool) -> list[str]:
    pool = (_GOOD + table[aspect][0]) if good else (_BAD + table[aspect][1])
    return [w for w in pool if w not in _NO_NEGATION]


def _evaluation(table: dict, x: str, positive: bool, rng: random.Random, used: list[str], forms: int = 3) -> str:
    """One sentence about aspect ``x`` that agrees with the label, in one of three equally likely forms.

    Positive: "x was GOOD." / "x was not BAD (at all)." / "x was BAD, but y was GOOD."; negative is the
    mirror image.  Every adjective, "not" and "but" is therefore as frequent under either label, so
    only a reader of negation and contrast (not a bag of words) can tell the label.  ``forms=2``: the first two
    forms only (one clause each).
    """
    used.append(x)
    vx = "were" if x in _PLURAL else "was"
    form = rng.randrange(forms)
    if form == 0:
        return f"{cap(x)} {vx} {rng.choice(_polar(table, x, positive))}."
    if form == 1:
        return f"{cap(x)} {vx} not {rng.choice(_polar(table, x, not positive))}{rng.choice(('', ' at all'))}."
    others = [k for k in table if k not in (x, "it")]  # "..., but it was" would be ambiguous
    y = rng.choice([k for k in others if k not in used] or others)
    used.append(y)
    vy = "were" if y in _PLURAL else "was"
    return (f"{cap(x)} {vx} {rng.choice(_polar(table, x, not positive))}, "
            f"but {y} {vy} {rng.choice(_polar(table, y, positive))}.")


def _review(view: World, label: str, rng: random.Random, mixed: bool = False) -> dict:
    """A polarity-free opening (and for objects maybe a fact), then 1-2 evaluations; no verdict or
    rating, since those would be keyword giveaways.  ``mixed``: three one-clause evaluations (plain or negated),
    one of which (three times in four) disagrees with the label, so the label is their majority."""
    kinds = [k for k in ("object", "place") if view.of_kind(k)]
    kind = "object" if "object" in kinds and (rng.random() < 0.55 or "place" not in kinds) else "place"
    e: Entity = rng.choice(view.of_kind(kind))
    f = {"season": rng.choice(vocab.SEASONS), "rel": rng.choice(("neighbour", "brother", "sister", "friend"))}
    if kind == "object":
        f.update(a_N=a(e.name), price=e["price"], made_in=e.get("made_in"))
        opens = [t for t in _OPEN_OBJ + (_OPEN_GIFT,) if "{made_in}" not in t or "made_in" in e.attrs]
        sentences = [rng.choice(opens).format_map(f)]
        if rng.random() < 0.5:
            sentences.append(rng.choice((f"It is made of {e['material']} and it is {e['colour']}.",
                                         f"Mine is {e['colour']}.")))
        table = _OBJ_ASPECTS
    else:
        f.update(N=e.name, nb=e.get("neighbor", "the coast"))
        sentences = [rng.choice(_OPEN_PLACE).format_map(f)]
        table = _PLACE_ASPECTS
    used: list[str] = []
    positive = label == "positive"
    if mixed:
        votes = [positive, positive, positive if rng.random() < 0.25 else not positive]
        rng.shuffle(votes)
    else:
        votes = [positive] * rng.randint(1, 2)
    for vote in votes:
        x = rng.choice([k for k in table if k not in used] or list(table))
        sentences.append(_evaluation(table, x, vote, rng, used, forms=2 if mixed else 3))
    return {"text": " ".join(sentences), "label": label}


def _make_sentiment(view: World, rng: random.Random, n: int, what: str) -> list[dict]:
    if not view.objects and not view.places:
        raise DataError(f"{what}: the world has no object or place to review")
    return _balanced(n, WORLD_TASKS["world-sentiment"].labels, lambda label: _review(view, label, rng), rng, what)


def _make_sentiment_mixed(view: World, rng: random.Random, n: int, what: str) -> list[dict]:
    if not view.objects and not view.places:
        raise DataError(f"{what}: the world has no object or place to review")
    return _balanced(n, WORLD_TASKS["world-sentiment-mixed"].labels,
                     lambda label: _review(view, label, rng, mixed=True), rng, what)


# -- world-topic ----------------------------------------------------------------------------------


def _make_topic(view: World, rng: random.Random, n: int, what: str) -> list[dict]:
    def make(kind: str) -> dict:
        entry = render_entry(view, rng.choice(view.of_kind(kind)), rng)
        return {"text": _passage(_sentences(entry), max_sentences=3), "label": kind}

    return _balanced(n, WORLD_TASKS["world-topic"].labels, make, rng, what)


# -- world-ner ------------------------------------------------------------------------------------

_LEAD = "(\"'"
_TRAIL = ".,;:!?)\""


def _core(word: str) -> str:
    """A word without attached punctuation or possessive: "Dorn." -> "Dorn", "Alva's" -> "Alva"."""
    w = word.lstrip(_LEAD).rstrip(_TRAIL)
    return w[:-2] if w.endswith("'s") else w.rstrip("'")


@lru_cache(maxsize=4)
def _name_index(world_seed: int) -> dict[str, list[tuple[tuple[str, ...], str]]]:
    """First word -> [(name words, type)], longest first.  Besides full names: a person's first name
    (unique in the world; text often says just "Vago"), plural object/creature forms ("Mebas jugs")
    and sentence-initial creature names, since these all name the entity."""
    index: dict[str, list[tuple[tuple[str, ...], str]]] = {}
    for e in _world(world_seed).entities:
        forms = [e.name]
        if e.kind == "person":
            forms.append(str(e["first_name"]))
        elif e.kind == "creature":
            forms += [plural_creature(e.name), cap(e.name), cap(plural_creature(e.name))]
        elif e.kind == "object":
            forms.append(plural_object(e))
        for form in dict.fromkeys(forms):
            words = tuple(form.split())
            index.setdefault(words[0], []).append((words, _NER_TYPE[e.kind]))
    for entries in index.values():
        entries.sort(key=lambda t: -len(t[0]))
    return index


def bio_tags(tokens: list[str], world_seed: int = 0) -> list[str]:
    """BIO tags for whitespace ``tokens`` by exact, longest-first match of the world's entity names."""
    index = _name_index(world_seed)
    tags = ["O"] * len(tokens)
    i = 0
    while i < len(tokens):
        for words, typ in index.get(_core(tokens[i]), ()):
            n = len(words)
            window = tokens[i:i + n]
            if (len(window) == n and _core(window[-1]) == words[-1]
                    and all(w.lstrip(_LEAD) == t for w, t in zip(window[:-1], words[:-1]))):
                tags[i:i + n] = [f"B-{typ}"] + [f"I-{typ}"] * (n - 1)
                i += n
                break
        else:
            i += 1
    return tags


def _make_ner(view: World, rng: random.Random, n: int, what: str) -> list[dict]:
    def make() -> dict | None:
        doc = render_story(view, rng) if rng.random() < 0.4 else render_entry(view, rng.choice(view.entities), rng)
        sentences = _sentences(doc or "")
        if not sentences:
            return None
        start = rng.randrange(len(sentences))
        tokens = " ".join(sentences[start:start + rng.randint(1, 2)]).split()
        tags = bio_tags(tokens, view.seed)
        return {"tokens": tokens, "tags": tags} if any(t != "O" for t in tags) else None

    return _fill(n, make, what)


# -- world-qa-context -----------------------------------------------------------------------------


def passage_question(view: World, rng: random.Random) -> tuple[str, QA] | None:
    """A random entity's encyclopedia passage and a question it answers, or None when none fits: the answer must
    occur as whole words in the passage, be at most four words, and not equal another attribute of the entity (a
    passage saying only "lives in Kalgate" would otherwise seem to answer "where was she born?" when both are
    Kalgate).  Shared by the QA task and the instructions' extraction type."""
    e = rng.choice(view.entities)
    passage = _passage(_sentences(render_entry(view, e, rng)))
    values = [str(v) for v in e.attrs.values()]
    rels = [r for r in askable(e) if values.count(str(e[r])) == 1 and len(str(e[r]).split()) <= 4
            and re.search(rf"(?<!\w){re.escape(str(e[r]))}(?!\w)", passage)]
    if not rels:
        return None
    return passage, ask(view, e, rng.choice(rels), rng)


def _make_qa_context(view: World, rng: random.Random, n: int, what: str) -> list[dict]:
    """Reading comprehension over :func:`passage_question`."""
    def make() -> dict | None:
        made = passage_question(view, rng)
        if made is None:
            return None
        passage, qa = made
        # "_relation" is for _counterfactual; build_world_task drops "_" keys
        return {"input": f"question: {qa.question} context: {passage}", "target": qa.short,
                "_relation": qa.relation}

    return _fill(n, make, what)


def _counterfactual(view: World, records: list[dict], share: float, rng: random.Random) -> list[dict]:
    """Swap the answer of about ``share`` of the QA records for another entity's value of the same relation,
    everywhere it occurs (as whole words) in the passage; records whose swap cannot be made cleanly stay."""
    pool: dict[str, list[str]] = {}
    for e in view.entities:
        for r, v in e.attrs.items():
            pool.setdefault(r, []).append(str(v))
    out = []
    for rec in records:
        rec = dict(rec)
        question, _, passage = rec["input"].partition(" context: ")
        old = rec["target"]
        choices = [v for v in pool.get(rec["_relation"], []) if v != old and len(v.split()) <= 4]
        if choices and rng.random() < share:
            new = rng.choice(choices)
            words = lambda v: re.compile(rf"(?<!\w){re.escape(v)}(?!\w)")  # noqa: E731
            if not words(new).search(passage) and new not in question:
                rec["input"] = f"{question} context: {words(old).sub(new, passage)}"
                rec["target"] = new
        out.append(rec)
    return out


# -- world-qa-closed ------------------------------------------------------------------------------


def _closed_qa(world: World, seed: int, sizes: dict[str, int]) -> dict[str, list[dict]]:
    """Split the (entity, relation) pairs: test and validation take ``n`` distinct pairs each, train
    the rest, cycling through its pairs with fresh phrasings if it needs more records than pairs."""
    pairs = [(e, r) for e in world.entities for r in askable(e)]
    random.Random(f"world-qa-closed:{seed}:pairs").shuffle(pairs)
    n_test, n_val = sizes["test"], sizes["validation"]
    pools = {"test": pairs[:n_test], "validation": pairs[n_test:n_test + n_val],
             "train": pairs[n_test + n_val:]}
    if len(pairs) < n_test + n_val + (sizes["train"] > 0):
        raise DataError(f"world-qa-closed: the world has {len(pairs)} questions (entity, relation), fewer than "
                        f"n_val + n_test = {n_val + n_test} plus at least one for train; ask for fewer")
    out = {}
    for split in SPLITS:
        rng = random.Random(f"world-qa-closed:{seed}:{split}")
        pool = pools[split]
        records = []
        for i in range(sizes[split]):
            qa = ask(world, *pool[i % len(pool)], rng)
            records.append({"input": f"question: {qa.question}", "target": qa.short})
        out[split] = records
    return out


_MAKERS: dict[str, Callable[[World, random.Random, int, str], list[dict]]] = {
    "world-sentiment": _make_sentiment, "world-sentiment-mixed": _make_sentiment_mixed, "world-topic": _make_topic, "world-ner": _make_ner,
    "world-qa-context": _make_qa_context,
}
