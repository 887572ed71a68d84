"""The pretraining corpus: a deterministic stream of documents of mixed genres, and its JSONL cache.

One ``random.Random(seed)`` drives the whole stream (genre choice, entity choice, templates), so the
same (world, seed, exclude) always yields the same documents in the same order, and a longer corpus
starts with the shorter one.  Bump :data:`GENERATOR_VERSION` whenever a change alters output, so the
cache in :func:`world_corpus_path` never serves stale text.
"""

from __future__ import annotations

import json
import os
import random
import re
from pathlib import Path
from typing import Callable, Iterable, Iterator

from lmforge.core.errors import ConfigError, DataError
from lmforge.core.io import atomic_path

from .arithmetic import render_arithmetic
from .dialogues import render_dialogue
from .encyclopedia import render_entry
from .facts import World
from .lists import render_list
from .reviews import render_review
from .stories import render_story

GENERATOR_VERSION = 1

# genre -> share of documents (not of bytes); encyclopedia entries carry most facts.
GENRE_WEIGHTS: dict[str, float] = {
    "encyclopedia": 0.34, "story": 0.18, "dialogue": 0.16, "list": 0.10, "arithmetic": 0.10, "review": 0.12,
}
GENRES: tuple[str, ...] = tuple(GENRE_WEIGHTS)
# which kind of entity an encyclopedia entry is about
_ENTRY_KIND_WEIGHTS: dict[str, float] = {
    "person": 0.45, "place": 0.2, "creature": 0.1, "object": 0.15, "guild": 0.1,
}


def _entry(world: World, rng: random.Random) -> str | None:
    kinds = [k for k in _ENTRY_KIND_WEIGHTS if world.of_kind(k)]
    if not kinds:
        return None
    kind = rng.choices(kinds, [_ENTRY_KIND_WEIGHTS[k] for k in kinds])[0]
    return render_entry(world, rng.choice(world.of_kind(kind)), rng)


# Each renderer returns a document, or None when the (restricted) world lacks what it needs.
_RENDERERS: dict[str, Callable[[World, random.Random], str | None]] = {
    "encyclopedia": _entry, "story": render_story, "dialogue": render_dialogue, "list": render_list,
    "arithmetic": render_arithmetic, "review": render_review,
}


def generate_records(world: World, seed: int, n_docs: int | None = None, target_bytes: int | None = None,
                     exclude: Iterable[str] | None = None) -> Iterator[tuple[str, str]]:
    """Yield ``(genre, text)`` pairs; stop after ``n_docs`` documents or once ``target_bytes``
    (UTF-8) have been yielded, whichever comes first (endless if both are None).

    ``exclude`` names entities (e.g. the held-out half of :meth:`World.split`) that must not appear:
    documents are rendered from ``world.without(exclude)``, so no text mentions them at all.
    """
    if n_docs is not None and n_docs < 0:
        raise ConfigError(f"n_docs must be >= 0, got {n_docs}")
    if target_bytes is not None and target_bytes < 0:
        raise ConfigError(f"target_bytes must be >= 0, got {target_bytes}")
    view = world.without(exclude)
    rng = random.Random(seed)
    genres = list(GENRE_WEIGHTS)
    cum = []
    total = 0.0
    for g in genres:
        total += GENRE_WEIGHTS[g]
        cum.append(total)
    count = size = 0
    while (n_docs is None or count < n_docs) and (target_bytes is None or size < target_bytes):
        for _attempt in range(50):
            genre = rng.choices(genres, cum_weights=cum)[0]
            text = _RENDERERS[genre](view, rng)
            if text:
                break
        else:
            raise DataError("the world is too small (after exclusion) to render documents; "
                            "use a larger size or exclude fewer entities")
        count += 1
        size += len(text.encode("utf-8"))
        yield genre, text


def generate_documents(world: World, seed: int, n_docs: int | None = None, target_bytes: int | None = None,
                       exclude: Iterable[str] | None = None) -> Iterator[str]:
    """Yield document texts; see :func:`generate_records` for the arguments."""
    for _genre, text in generate_records(world, seed, n_docs, target_bytes, exclude):
        yield text


def write_corpus(path: str | os.PathLike, seed: int = 0, target_bytes: int = 10_000_000,
                 size: str | dict[str, int] = "default", exclude: Iterable[str] | None = None,
                 world: World | None = None, n_docs: int | None = None) -> Path:
    """Write a JSONL corpus (one ``{"text": ..., "genre": ...}`` per line) atomically; return path.

    The world is ``World.build(seed, size)`` unless one is passed in; documents use the same seed.
    """
    path = Path(path)
    world = world if world is not None else World.build(seed, size)
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        records = generate_records(world, seed, n_docs=n_docs, target_bytes=target_bytes, exclude=exclude)
        for genre, text in records:
            fh.write(json.dumps({"text": text, "genre": genre}) + "\n")
    return path


WORLD_CORPUS_NAME = re.compile(r"world-v\d+-(?P<size>[\w.-]+)-seed(?P<seed>\d+)-(?P<bytes>\d+)\.jsonl")
"""The names :func:`world_corpus_path` gives cached corpora (``lmforge cache`` recognises them by it)."""


def world_corpus_path(cache_dir: str | os.PathLike, seed: int = 0, target_bytes: int = 10_000_000,
                      size: str = "default") -> Path:
    """The cached corpus for (seed, target_bytes, size, generator version), written on first use."""
    if not isinstance(size, str):
        raise ConfigError("world_corpus_path caches named sizes only; call write_corpus for a custom size")
    path = Path(cache_dir).expanduser() / f"world-v{GENERATOR_VERSION}-{size}-seed{seed}-{target_bytes}.jsonl"
    if not path.exists():
        write_corpus(path, seed=seed, target_bytes=target_bytes, size=size)
    return path
