"""Made-up but pronounceable names from syllables.

Names are built as (onset + vowel) syllables, an optional coda and a kind-specific ending, drawn from
one ``random.Random`` so a seed always gives the same names.  Every generated name is unique
(case-insensitively) across the whole world and never equals a vocabulary word, which is what lets a
test (or a later task) search the corpus for a held-out entity's name with plain word boundaries.
"""

from __future__ import annotations

import random

_ONSETS = (
    "b", "br", "d", "dr", "f", "g", "gr", "h", "k", "kr", "l", "m", "n", "p", "r", "s", "st",
    "t", "th", "tr", "v", "z", "sh", "w", "c", "j", "m", "fl", "gl", "l", "r", "n", "d",
)
_VOWELS = ("a", "e", "i", "o", "u", "a", "e", "o", "i", "a", "ai", "ei", "ou")
_CODAS = ("", "", "", "", "n", "r", "l", "s", "m", "nd", "rn", "th", "k", "ld")

_FEMALE_ENDINGS = ("a", "ia", "ella", "ine", "wen", "ra", "lis", "na", "ette", "ys")
_MALE_ENDINGS = ("o", "an", "ric", "en", "dor", "us", "im", "ald", "ek", "win")
_FAMILY_ENDINGS = ("well", "wood", "stone", "ley", "dal", "more", "ton", "ard", "by", "rick", "")
_TOWN_ENDINGS = ("ford", "wick", "holm", "dale", "mere", "by", "ton", "haven", "moor", "brook", "gate", "field", "")


class NameMaker:
    """Deterministic generator of unique names; ``taken`` holds lower-cased names already used."""

    def __init__(self, rng: random.Random, reserved: tuple[str, ...] = ()) -> None:
        self.rng = rng
        self.taken: set[str] = {w.lower() for w in reserved}  # membership only, never iterated

    def _root(self, syllables: int, coda: bool = True) -> str:
        rng = self.rng
        parts = [rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(syllables)]
        if coda:
            parts.append(rng.choice(_CODAS))
        return "".join(parts)

    def _unique(self, make, min_len: int = 4, max_len: int = 11, keep_tail: int = 0) -> str:
        """Draw until a fresh, pronounceable name comes up (``keep_tail`` letters are not checked)."""
        for _ in range(10_000):
            name = make()
            key = name.lower()
            probe = key[: len(key) - keep_tail] if keep_tail else key
            if min_len <= len(name) <= max_len and key not in self.taken and _pronounceable(probe):
                self.taken.add(key)
                return name
        raise RuntimeError("name space exhausted; use a smaller world size")

    def first_name(self, gender: str) -> str:
        endings = _FEMALE_ENDINGS if gender == "female" else _MALE_ENDINGS

        def make() -> str:
            root = self._root(self.rng.choice((1, 1, 2)), coda=False)
            return _join(root, self.rng.choice(endings)).capitalize()

        return self._unique(make)

    def _suffixed(self, endings: tuple[str, ...]) -> str:
        return _join(self._root(self.rng.choice((1, 2))), self.rng.choice(endings)).capitalize()

    def family_name(self) -> str:
        return self._unique(lambda: self._suffixed(_FAMILY_ENDINGS))

    def town_name(self) -> str:
        return self._unique(lambda: self._suffixed(_TOWN_ENDINGS))

    def brand_name(self) -> str:
        """Capitalised word naming an object kind ("Orlen" in "the Orlen lamp") or a guild."""
        return self._unique(lambda: self._root(2).capitalize(), min_len=4, max_len=8)

    def creature_name(self, suffix: str) -> str:
        def make() -> str:
            root = self._root(self.rng.choice((1, 2)), coda=False)
            if suffix[0] in "aeiou":  # "tav" + "owl", never "tao" + "owl"
                root += self.rng.choice(("n", "r", "l", "s", "m", "v", "d"))
            return root + suffix

        return self._unique(make, max_len=13, keep_tail=len(suffix) - 2)


def _join(root: str, ending: str) -> str:
    """Glue an ending on without doubling vowels ("Tave" + "ia" -> "Tavia")."""
    if ending and root and root[-1] in "aeiouy" and ending[0] in "aeiouy":
        root = root[:-1]
    return root + ending


def _pronounceable(name: str) -> bool:
    """Reject runs of three vowels or consonants, doubled letters other than ee/oo/ll/ss/nn/rr."""
    for a, b in zip(name, name[1:]):
        if a == b and a not in "eolsnr":
            return False
    vowels = consonants = 0
    for ch in name:
        if ch in "aeiouy":
            vowels += 1
            consonants = 0
        else:
            consonants += 1
            vowels = 0
        if vowels >= 3 or consonants >= 3 and ch not in "hlr" or consonants >= 4:
            return False
    return True
