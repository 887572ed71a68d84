"""One thing in the world (:class:`Entity`): a kind, a name and its single-valued attributes and relations.

Its own module so that the entity generator (:mod:`.build`) and the fact store (:mod:`.facts`), which builds
its world with it, both import it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Union

Value = Union[str, int]


@dataclass
class Entity:
    """One thing in the world.  ``attrs`` maps relation -> value in a fixed (insertion) order."""

    kind: str
    name: str
    attrs: dict[str, Value] = field(default_factory=dict)
    pos: tuple[float, float] | None = None  # map coordinates of places (not a stated fact)

    def __getitem__(self, relation: str) -> Value:
        return self.attrs[relation]

    def get(self, relation: str, default: Value | None = None) -> Value | None:
        return self.attrs.get(relation, default)

    @property
    def key(self) -> str:
        """The distinctive word of the name (a person's unique first name, an object's brand)."""
        if self.kind == "person":
            return str(self.attrs["first_name"])
        return self.name.split()[0]
