"""The built-in world: a seeded, consistent fictional world rendered into English.

It is lmforge's default pretraining data and, in later modules, the source of tasks with known
answers.  Everything is deterministic for a seed and uses only the standard library::

    world = World.build(seed=0)                      # people, places, creatures, objects, guilds
    world.query(subject="Alva Dorn", relation="home")
    train, held_out = world.split(0.1, seed=0)
    docs = generate_documents(world, seed=0, target_bytes=1_000_000, exclude=held_out)
    path = world_corpus_path("~/.cache/lmforge", seed=0, target_bytes=10_000_000)

Modules: ``entity`` (one thing and its attributes), ``facts`` (store, queries, split), ``build`` (generation),
``names`` (syllable names), ``vocab`` (closed word lists), renderers ``encyclopedia``, ``stories``, ``dialogues``,
``lists``, ``arithmetic``, ``reviews`` (labelled sentiment), ``questions`` (fact Q&A), ``corpus`` (stream + cache).
"""

from .corpus import (
    GENERATOR_VERSION,
    GENRES,
    WORLD_CORPUS_NAME,
    generate_documents,
    generate_records,
    world_corpus_path,
    write_corpus,
)
from .entity import Entity
from .facts import KINDS, Fact, World
from .questions import QA, ask, askable
from .reviews import LABELS, Review, make_review
from .tasks import WORLD_TASKS, WorldTask, build_world_task, world_task
from .vocab import CURRENT_YEAR

__all__ = [
    "CURRENT_YEAR", "GENERATOR_VERSION", "GENRES", "KINDS", "LABELS", "QA", "Entity", "Fact", "Review",
    "WORLD_CORPUS_NAME", "WORLD_TASKS", "World", "WorldTask", "ask", "askable", "build_world_task",
    "generate_documents", "generate_records", "make_review", "world_corpus_path", "world_task", "write_corpus",
]
