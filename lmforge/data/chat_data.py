"""Conversation records: the instruction-data formats users bring, read into one shape.

Every record becomes a :class:`Conversation` (``messages``: role/content dicts; ``weights``: one 0/1 per message,
0 taking an assistant turn out of the loss; ``where``: ``file:line``).  Formats, by the keys a record holds
(``format: auto`` picks by the first record's keys):

===================  ==========================================================================================
``messages``         OpenAI chat: ``{"messages": [{"role": "system|user|assistant", "content": ..., "weight": 0|1}]}``
``sharegpt``         ``{"conversations": [{"from": "system|human|gpt", "value": ...}]}`` (user/assistant too)
``alpaca``           ``{"instruction", "input"?, "output", "system"?}``: one user turn (instruction, blank line, input)
``prompt_completion`` ``{"prompt", "completion"}``: strings (one user and one assistant turn) or message lists
===================  ==========================================================================================

Files are read by :func:`lmforge.data.readers.read_records` (JSON lines / arrays, CSV, Parquet); a ``datasets``
folder saved with ``save_to_disk`` row by row.  A record that is not a conversation — an unknown role, an empty
assistant message, no assistant turn at all — is a one-line DataError naming its ``file:line``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from lmforge.core.errors import DataError
from lmforge.data.chat import ROLES
from lmforge.data.readers import Where, read_records, record_format

FORMATS = ("auto", "messages", "sharegpt", "alpaca", "prompt_completion")
_REQUIRED = {"messages": ("messages",), "sharegpt": ("conversations",), "alpaca": ("instruction", "output"),
             "prompt_completion": ("prompt", "completion")}
_SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


@dataclass
class Conversation:
    messages: list[dict[str, str]]
    weights: list[int]
    where: str


def detect_format(rec: Any, where: str) -> str:
    if isinstance(rec, dict):
        if "messages" in rec:
            return "messages"
        if "conversations" in rec:
            return "sharegpt"
        if "instruction" in rec and "output" in rec:
            return "alpaca"
        if "prompt" in rec and "completion" in rec:
            return "prompt_completion"
        keys = ", ".join(sorted(rec)) or "none"
    else:
        keys = f"a {type(rec).__name__}, not an object"
    raise DataError(f"{where}: not a conversation record (keys: {keys}); give 'messages', 'conversations' "
                    f"(ShareGPT), 'instruction'/'output' (Alpaca) or 'prompt'/'completion'")


def _text(value: Any, where: str, what: str) -> str:
    if not isinstance(value, str):
        raise DataError(f"{where}: {what} must be a string, not {type(value).__name__}")
    return value


def message_list(items: Any, where: str, role_key: str, content_key: str, roles: dict[str, str],
                  field: str) -> tuple[list[dict[str, str]], list[int]]:
    if not isinstance(items, list) or not items:
        raise DataError(f"{where}: '{field}' must be a non-empty list of messages")
    messages, weights = [], []
    for i, m in enumerate(items):
        if not isinstance(m, dict):
            raise DataError(f"{where}: {field}[{i}] must be an object with '{role_key}' and '{content_key}'")
        role = m.get(role_key)
        if role not in roles:
            raise DataError(f"{where}: {field}[{i}] has unknown role {role!r} (roles: {', '.join(roles)})")
        content = m.get(content_key)
        content = "" if content is None else _text(content, where, f"{field}[{i}].{content_key}")
        weight = m.get("weight", 1)
        if weight not in (0, 1) or isinstance(weight, bool):
            raise DataError(f"{where}: {field}[{i}].weight is {weight!r}; use 0 (no loss on this turn) or 1")
        messages.append({"role": roles[role], "content": content})
        weights.append(int(weight))
    return messages, weights


def to_conversation(rec: Any, fmt: str, where: str) -> Conversation:
    """One record in format ``fmt`` (or ``auto``) -> a checked Conversation."""
    fmt = detect_format(rec, where) if fmt == "auto" else fmt
    if not isinstance(rec, dict):
        raise DataError(f"{where}: a {fmt} record must be a JSON object")
    missing = [k for k in _REQUIRED.get(fmt, ()) if k not in rec]
    if missing:
        raise DataError(f"{where}: not a conversation record in this data's format '{fmt}' (no "
                        f"{', '.join(repr(k) for k in missing)}; keys: {', '.join(sorted(rec)) or 'none'})")
    identity = {r: r for r in ROLES}
    if fmt == "messages":
        messages, weights = message_list(rec.get("messages"), where, "role", "content", identity, "messages")
    elif fmt == "sharegpt":
        messages, weights = message_list(rec.get("conversations"), where, "from", "value", _SHAREGPT_ROLES,
                                          "conversations")
    elif fmt == "alpaca":
        instruction = _text(rec.get("instruction"), where, "instruction")
        extra = rec.get("input") or ""
        user = instruction + ("\n\n" + _text(extra, where, "input") if extra else "")
        messages = ([{"role": "system", "content": _text(rec["system"], where, "system")}] if rec.get("system")
                    else []) + [{"role": "user", "content": user},
                                {"role": "assistant", "content": _text(rec.get("output"), where, "output")}]
        weights = [1] * len(messages)
    elif fmt == "prompt_completion":
        messages, weights = [], []
        for field, role in (("prompt", "user"), ("completion", "assistant")):
            value = rec.get(field)
            if isinstance(value, list):
                part, w = message_list(value, where, "role", "content", identity, field)
            else:
                part, w = [{"role": role, "content": _text(value, where, field)}], [1]
            if field == "prompt":
                w = [1] * len(part)
            messages += part
            weights += w
    else:
        raise DataError(f"chat data format {fmt!r} is not one of {', '.join(FORMATS)}")
    check_conversation(messages, weights, where)
    return Conversation(messages, weights, where)


def check_conversation(messages: list[dict[str, str]], weights: list[int], where: str) -> None:
    assistant = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if not assistant:
        raise DataError(f"{where}: the conversation has no assistant turn, so nothing to learn; add one or drop "
                        f"the record")
    for i in assistant:
        if not messages[i]["content"].strip():
            raise DataError(f"{where}: message {i} (assistant) is empty; give the reply or drop the turn")


def _dataset_rows(path: Path, split: str | None) -> Iterator[tuple[str, Any]]:
    try:
        import datasets  # optional: pip install datasets
    except ImportError:
        raise DataError(f"'{path}' is a Hugging Face datasets folder; install the library with "
                        f"'pip install datasets'") from None
    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:  # datasets raises many kinds for broken folders
        raise DataError(f"cannot load datasets folder '{path}' ({str(e).splitlines()[0]}); re-save it with "
                        f"save_to_disk") from None
    if isinstance(ds, datasets.DatasetDict):
        name = split or "train"
        if name not in ds:
            raise DataError(f"datasets folder '{path}' has no split '{name}' (splits: {', '.join(ds)}); "
                            f"pick one with '{path}::SPLIT'")
        ds = ds[name]
    for i, row in enumerate(ds):
        yield str(Where(path, row=i)), row


def is_dataset_dir(path: Path) -> bool:
    return path.is_dir() and any((path / f).is_file() for f in ("dataset_dict.json", "state.json"))


def iter_rows(spec: str, what: str = "chat data") -> Iterator[tuple[Any, Any]]:
    """``(where, record)`` of a file or a ``datasets`` folder (``DIR::SPLIT`` picks a split), in order."""
    name, _, split = str(spec).partition("::")
    path = Path(name)
    if is_dataset_dir(path):
        return _dataset_rows(path, split or None)
    if path.is_file() and record_format(path) is not None:
        return read_records(path)
    if not path.exists():
        raise DataError(f"{what} '{spec}' does not exist; give a .jsonl/.json/.csv/.parquet file or a datasets "
                        f"folder saved with save_to_disk")
    raise DataError(f"{what} '{spec}' is not a .jsonl/.json/.csv/.parquet file or a datasets folder")


def read_conversations(spec: str, fmt: str = "auto") -> Iterator[Conversation]:
    """Conversations of a file or a ``datasets`` folder (``DIR::SPLIT`` picks a split), in order."""
    if fmt not in FORMATS:
        raise DataError(f"chat data format {fmt!r} is not one of {', '.join(FORMATS)}")
    rows = iter_rows(spec)
    chosen = None if fmt == "auto" else fmt
    for where, rec in rows:
        where = str(where)
        if chosen is None:
            chosen = detect_format(rec, where)
        yield to_conversation(rec, chosen, where)
