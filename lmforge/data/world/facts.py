"""The fact store: entities, their single-valued attributes and relations, and queries over them.

A :class:`World` is a list of :class:`Entity` objects (people, places, creatures, objects, guilds).
Every attribute is single-valued (one home per person, one material per object, ...), so a fact is a
``(subject, relation, object)`` triple with exactly one object per (subject, relation) pair and a
renderer can never state two different answers to one question.  Inverse relations that a renderer
needs (a town's mayor and the mayor's ``mayor_of``) are both stored, written at the same moment.

Worlds are immutable after :meth:`World.build`; :meth:`World.without` returns a restricted copy in
which held-out entities, and every relation pointing at them, are gone, which is how the corpus
generator keeps held-out entities out of pretraining text without any renderer knowing about it.
"""

from __future__ import annotations

import math
import random
from typing import Iterable

from lmforge.core.errors import ConfigError, DataError

from . import vocab
from .build import build_entities
from .entity import Entity, Value

Fact = tuple[str, str, Value]

KINDS: tuple[str, ...] = ("person", "place", "creature", "object", "guild")

# Relations whose value is another entity's name: dropped when that entity is excluded.
REF_RELATIONS: tuple[str, ...] = (
    "birthplace", "home", "guild", "sibling", "friend", "pet", "owns", "mayor_of", "leads",
    "mayor", "neighbor", "made_in", "seat", "leader",
)
# Attributes that only make sense next to a reference (dropped together with it).
_DEPENDENT: dict[str, tuple[str, ...]] = {"neighbor": ("neighbor_distance",)}

SIZES: dict[str, dict[str, int]] = {
    "tiny": {"person": 40, "place": 10, "creature": 8, "object": 12, "guild": 6},
    "small": {"person": 120, "place": 25, "creature": 16, "object": 30, "guild": 10},
    "default": {"person": 300, "place": 60, "creature": 40, "object": 80, "guild": 16},
    "large": {"person": 1000, "place": 150, "creature": 80, "object": 200, "guild": 24},
}


class World:
    """Entities plus indexes; build with :meth:`World.build`."""

    def __init__(self, entities: list[Entity], seed: int, size: dict[str, int]) -> None:
        self.entities = entities
        self.seed = seed
        self.size = dict(size)
        self._by_name = {e.name: e for e in entities}
        self._by_kind: dict[str, list[Entity]] = {k: [] for k in KINDS}
        for e in entities:
            self._by_kind[e.kind].append(e)
        # reverse indexes: (relation, target name) -> subjects, in entity order
        self._reverse: dict[tuple[str, str], list[Entity]] = {}
        for e in entities:
            for rel, value in e.attrs.items():
                if rel in REF_RELATIONS:
                    self._reverse.setdefault((rel, str(value)), []).append(e)
        self._facts: list[Fact] | None = None

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def build(cls, seed: int = 0, size: str | dict[str, int] = "default") -> "World":
        """Generate the world for ``seed``; ``size`` is a preset name or a dict of per-kind counts."""
        counts = resolve_size(size)
        return cls(build_entities(random.Random(seed), counts), seed, counts)

    # -- access ---------------------------------------------------------------------------------
    @property
    def people(self) -> list[Entity]:
        return self._by_kind["person"]

    @property
    def places(self) -> list[Entity]:
        return self._by_kind["place"]

    @property
    def creatures(self) -> list[Entity]:
        return self._by_kind["creature"]

    @property
    def objects(self) -> list[Entity]:
        return self._by_kind["object"]

    @property
    def guilds(self) -> list[Entity]:
        return self._by_kind["guild"]

    def of_kind(self, kind: str) -> list[Entity]:
        return self._by_kind[kind]

    def get(self, name: str) -> Entity | None:
        """The entity called ``name`` (full name for people, e.g. "Alva Dorn"), or None."""
        return self._by_name.get(name)

    def __getitem__(self, name: str) -> Entity:
        entity = self._by_name.get(name)
        if entity is None:
            raise KeyError(name)
        return entity

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def value(self, subject: str, relation: str) -> Value | None:
        entity = self._by_name.get(subject)
        return None if entity is None else entity.attrs.get(relation)

    def referrers(self, relation: str, target: str) -> list[Entity]:
        """Entities whose ``relation`` points at ``target`` (e.g. ``("home", town)`` -> residents)."""
        return self._reverse.get((relation, target), [])

    @property
    def facts(self) -> list[Fact]:
        """Every fact as a (subject, relation, object) triple, kind first, in entity order."""
        if self._facts is None:
            out: list[Fact] = []
            for e in self.entities:
                out.append((e.name, "kind", e.kind))
                out.extend((e.name, rel, v) for rel, v in e.attrs.items())
            self._facts = out
        return self._facts

    def query(self, subject: str | None = None, relation: str | None = None,
              object: Value | None = None) -> list[Fact]:
        """Facts matching every given field (None is a wildcard), in entity order."""
        if subject is not None:
            entity = self._by_name.get(subject)
            if entity is None:
                return []
            pool = [(entity.name, "kind", entity.kind)] + [(entity.name, r, v) for r, v in entity.attrs.items()]
        else:
            pool = self.facts
        return [f for f in pool
                if (relation is None or f[1] == relation) and (object is None or f[2] == object)]

    def distance(self, a: str, b: str) -> int:
        """Whole miles between two places (from their map coordinates; 0 for the same place)."""
        pa, pb = self[a].pos, self[b].pos
        if pa is None or pb is None:
            raise DataError(f"distance needs two places, got {a!r} and {b!r}")
        return 0 if a == b else max(1, round(math.hypot(pa[0] - pb[0], pa[1] - pb[1])))

    # -- held-out entities ----------------------------------------------------------------------
    def split(self, held_out_fraction: float = 0.1, seed: int = 0) -> tuple[list[str], list[str]]:
        """Deterministically split entity names into (train, held_out), stratified by kind.

        Lists, not sets, so callers iterating them get a fixed order in every process.
        """
        if not 0.0 <= held_out_fraction < 1.0:
            raise ConfigError(f"held_out_fraction must be in [0, 1), got {held_out_fraction}")
        rng = random.Random(seed)
        held: set[str] = set()
        for kind in KINDS:
            names = [e.name for e in self._by_kind[kind]]
            k = round(len(names) * held_out_fraction)
            held.update(rng.sample(names, k))
        train = [e.name for e in self.entities if e.name not in held]
        held_out = [e.name for e in self.entities if e.name in held]
        return train, held_out

    def without(self, exclude: Iterable[str] | None) -> "World":
        """A copy without the excluded entities and without any relation pointing at them."""
        gone = set(exclude or ())
        if not gone:
            return self
        unknown = sorted(n for n in gone if n not in self._by_name)
        if unknown:
            raise DataError(f"exclude names entities not in this world: {', '.join(unknown[:5])}")
        kept: list[Entity] = []
        for e in self.entities:
            if e.name in gone:
                continue
            drop: set[str] = set()
            for rel, v in e.attrs.items():
                if rel in REF_RELATIONS and v in gone:
                    drop.add(rel)
                    drop.update(_DEPENDENT.get(rel, ()))
            attrs = {r: v for r, v in e.attrs.items() if r not in drop}
            kept.append(Entity(e.kind, e.name, attrs, e.pos))
        return World(kept, self.seed, self.size)


def resolve_size(size: str | dict[str, int]) -> dict[str, int]:
    """Preset name or a dict overriding the default per-kind counts."""
    if isinstance(size, str):
        if size not in SIZES:
            raise ConfigError(f"unknown world size {size!r}; use one of {', '.join(SIZES)} or a dict of counts")
        return dict(SIZES[size])
    counts = dict(SIZES["default"])
    for key, n in size.items():
        if key not in counts:
            raise ConfigError(f"unknown world size key {key!r}; use {', '.join(KINDS)}")
        if not isinstance(n, int) or n < 1:
            raise ConfigError(f"world size {key}={n!r} must be a positive integer")
        counts[key] = n
    if counts["person"] < 2 or counts["place"] < 2:
        raise ConfigError("a world needs at least 2 people and 2 places")
    counts["guild"] = min(counts["guild"], len(vocab.OCCUPATIONS))
    return counts
