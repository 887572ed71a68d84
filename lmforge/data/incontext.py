"""In-context tasks: questions with choices (or a reference answer) and the k-shot prompts that ask them.

A task is a list of evaluated examples and a pool of demonstrations.  An example is ``{question, choices, answer}``
(``answer``: the right choice's 0-based index) or, for a generative task, ``{question, answer}`` with the answer
text and an optional ``check`` (a world verifier's rule).  Tasks come from

* the built-in world (:data:`WORLD_TASKS`): closed-book fact questions, arithmetic, entity kinds, true/false
  statements, and review sentiment and passage topic as choices, from :mod:`lmforge.data.world.instructions`
  records (evaluated: the validation split; demonstrations: the train split; true_false, a held-out type, has
  only ``test_types``: demonstrations from another seed), asked as the corpus asks questions, ``Q: ...\\nA:``;
* a user's file (``.jsonl``, ``.json``, ``.csv``, ... read by :func:`lmforge.data.tasks.iter_records`), whose
  own examples are the pool.

Prompts follow lm-evaluation-harness (``api/task.py::fewshot_context``, ``api/samplers.py::ContextSampler``):
``description + fewshot_delimiter`` (if any), then each demonstration as ``question + target_delimiter + answer +
fewshot_delimiter``, then the question.  Demonstrations are drawn by one ``random.Random(seed)`` per task, example
after example: ``sample(pool, k)``, or, when the pool holds the evaluated examples, ``sample(pool, k + 1)`` with the
evaluated one removed and the first ``k`` kept -- so an example never demonstrates itself.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from lmforge.core.errors import ConfigError, DataError
from lmforge.data.tasks import iter_records
from lmforge.data.world.instructions import INSTRUCTION_TYPES, build_instructions

PROMPT = "Q: {question}\nA:"
"""How the world's corpus asks its questions ("Test your knowledge" lists), so a base model knows the form."""


@dataclass(frozen=True)
class Example:
    question: str
    answer: Any
    """The right choice's index (choice tasks) or the answer (generative tasks)."""
    choices: tuple[str, ...] | None = None
    check: str = "text"
    """A generative answer's rule (:func:`lmforge.data.world.verifiers.verify`): text | label | number | list."""
    where: str = ""

    @property
    def target(self) -> str:
        """The answer as a demonstration writes it."""
        return self.choices[self.answer] if self.choices is not None else str(self.answer)


@dataclass(frozen=True)
class Task:
    name: str
    examples: tuple[Example, ...]
    pool: tuple[Example, ...]
    pool_is_examples: bool
    """The pool is the evaluated examples themselves (a user file): drawing leaves the evaluated one out."""

    @property
    def generative(self) -> bool:
        return self.examples[0].choices is None


# -- the world's tasks -------------------------------------------------------------------------------------

# task name -> (instruction type, answered by choices?)
WORLD_TASKS: dict[str, tuple[str, bool]] = {
    "world-fact": ("fact", True), "world-arithmetic": ("arithmetic", True), "world-kind": ("kind", True),
    "world-true-false": ("true_false", True), "world-sentiment": ("sentiment", True),
    "world-topic": ("topic", True), "world-fact-gen": ("fact", False), "world-arithmetic-gen": ("arithmetic", False),
}


def _number_choices(answer: int, rng: random.Random) -> list[int]:
    """The answer and three near misses (off by 1 or 2, never negative), in a seeded order."""
    near = [n for n in (answer - 2, answer - 1, answer + 1, answer + 2, answer + 3, answer + 4) if n >= 0][:4]
    out = [answer] + rng.sample(near, 3)
    rng.shuffle(out)
    return out


def _world_example(rec: dict[str, Any], choices: bool, rng: random.Random, where: str) -> Example | None:
    t = INSTRUCTION_TYPES[rec["type"]]
    question = PROMPT.format(question=rec["messages"][0]["content"])
    if not choices:
        return Example(question, rec["answer"], None, rec["check"], where)
    if rec["check"] == "label":
        opts = list(t.labels)
    elif rec["check"] == "number":
        opts = _number_choices(int(rec["answer"]), rng)
    else:  # text: the right value and the record's plausible wrong one (another value of the same relation)
        if rec.get("wrong") is None or str(rec["wrong"]) == str(rec["answer"]):
            return None
        opts = [rec["answer"], rec["wrong"]]
        rng.shuffle(opts)
    opts = [str(o) for o in opts]
    return Example(question, opts.index(str(rec["answer"])), tuple(opts), rec["check"], where)


def _world_examples(name: str, split: str, n: int, seed: int, world_seed: int) -> list[Example]:
    kind, choices = WORLD_TASKS[name]
    rng = random.Random(f"incontext:{name}:{split}:{seed}")
    out = []
    # only the first phrasing (the bare question, as the corpus asks it: "Q: Which town ...?"); enough records
    # that a quarter of them (test_types has four phrasings) and those with a wrong value still make ``n``
    for i, rec in enumerate(build_instructions(split, 5 * n + 8, seed=seed, world_seed=world_seed, types=[kind])):
        ex = _world_example(rec, choices, rng, f"{name} {split} #{i}") if rec["phrasing"] == 0 else None
        if ex is not None:
            out.append(ex)
    return out[:n]


def world_task(name: str, n: int, pool_size: int = 64, seed: int = 0, world_seed: int = 0) -> Task:
    """``n`` evaluated examples of a world task and ``pool_size`` demonstrations from other records."""
    kind = WORLD_TASKS[name][0]
    held_out = kind not in [n for n in INSTRUCTION_TYPES if n not in ("reverse", "compare", "true_false")]
    if held_out:  # only test_types holds it: demonstrations from records of another seed
        examples = _world_examples(name, "test_types", n, seed, world_seed)
        pool = _world_examples(name, "test_types", pool_size, seed + 1, world_seed)
    else:
        examples = _world_examples(name, "validation", n, seed, world_seed)
        pool = _world_examples(name, "train", pool_size, seed, world_seed)
    return Task(name, tuple(examples), tuple(pool), pool_is_examples=False)


# -- a user's file -----------------------------------------------------------------------------------------

def _file_example(rec: dict[str, Any], where: str) -> Example:
    if not isinstance(rec.get("question"), str):
        raise DataError(f"{where}: no text field 'question' (fields: {', '.join(map(str, rec)) or 'none'}); an "
                        f"in-context example is {{\"question\": ..., \"choices\": [...], \"answer\": index}}")
    if "answer" not in rec:
        raise DataError(f"{where}: no field 'answer'; give the right choice's 0-based index (or, without "
                        f"'choices', the answer text)")
    choices, answer = rec.get("choices"), rec["answer"]
    if choices is None:
        return Example(rec["question"], str(answer), None, str(rec.get("check", "text")), where)
    if not isinstance(choices, list) or not all(isinstance(c, (str, int, float)) for c in choices):
        raise DataError(f"{where}: 'choices' must be a list of strings, got {choices!r}")
    choices = tuple(str(c) for c in choices)
    if len(choices) < 2:
        raise DataError(f"{where}: {len(choices)} choice{'' if len(choices) == 1 else 's'} {list(choices)}; a "
                        f"multiple-choice question needs at least 2 choices")
    if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(choices):
        raise DataError(f"{where}: answer {answer!r} is not an index of its {len(choices)} choices "
                        f"(0..{len(choices) - 1}); give the right choice's 0-based index")
    return Example(rec["question"], answer, choices, "text", where)


def file_task(path: str) -> Task:
    examples = tuple(_file_example(rec, where) for where, rec in iter_records(path))
    if not examples:
        raise DataError(f"task file '{path}' holds no examples; add lines like {{\"question\": ..., \"choices\": "
                        f"[...], \"answer\": 0}}")
    kinds = {ex.choices is None for ex in examples}
    if len(kinds) > 1:
        raise DataError(f"task file '{path}' mixes examples with and without 'choices'; keep one kind per file")
    return Task(Path(path).name, examples, examples, pool_is_examples=True)


def is_task_file(name: str) -> bool:
    return Path(name).suffix.lower() in (".jsonl", ".json", ".csv", ".tsv", ".parquet", ".gz")


def load_task(name: str, n: int = 200, pool_size: int = 64, seed: int = 0, world_seed: int = 0) -> Task:
    """A world task by name or a user's task file by path; any other name is one line listing the known ones."""
    if name in WORLD_TASKS:
        return world_task(name, n, pool_size, seed, world_seed)
    if is_task_file(name):
        if not Path(name).is_file():
            raise DataError(f"task file '{name}' does not exist; pass a .jsonl of {{question, choices, answer}} or "
                            f"a world task ({', '.join(WORLD_TASKS)})")
        task = file_task(name)
        return Task(task.name, task.examples[:n], task.pool, True) if n < len(task.examples) else task
    raise ConfigError(f"unknown task {name!r}; the known tasks are {', '.join(WORLD_TASKS)}, or a path to a .jsonl "
                      f"file of {{question, choices, answer}}")


# -- k-shot prompts ----------------------------------------------------------------------------------------

def check_shots(task: Task, k: int) -> None:
    room = len(task.pool) - (1 if task.pool_is_examples else 0)
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise ConfigError(f"num_fewshot must be an integer >= 0, got {k!r}")
    if k > room:
        where = "other examples in the file" if task.pool_is_examples else "demonstrations in its pool"
        raise ConfigError(f"k={k} shots but task {task.name!r} has only {room} {where}; use k <= {room}"
                          + ("" if task.pool_is_examples else " or a larger --pool"))


def prompts(task: Task, k: int, seed: int = 1234, description: str = "", target_delimiter: str = " ",
            fewshot_delimiter: str = "\n\n") -> list[str]:
    """The context of every evaluated example, with ``k`` demonstrations drawn as lm-eval draws them."""
    check_shots(task, k)
    rnd = random.Random(seed)
    head = description + fewshot_delimiter if description else ""
    out = []
    for ex in task.examples:
        shots: Sequence[Example] = []
        if k:
            if task.pool_is_examples:
                shots = [d for d in rnd.sample(task.pool, k + 1) if d != ex][:k]
            else:
                shots = rnd.sample(task.pool, k)
        demos = "".join(d.question + target_delimiter + d.target + fewshot_delimiter for d in shots)
        out.append(head + demos + ex.question)
    return out
