"""Short stories: one person, a few episodes, every detail taken from the fact store.

A story follows its protagonist from home through two or three episodes (visiting a friend or
sibling where they really live, going to market where an object is really made, a guild meeting at
the guild's real seat, feeding a pet its real diet, meeting the real mayor, watching a creature)
and back home.  Travel distances come from the map, prices from the objects, so the narrative can be
checked against the world like any encyclopedia entry.  A person only "buys" the object they own, so
stories never add a second possession.
"""

from __future__ import annotations

import random

from . import vocab
from .entity import Entity
from .facts import World
from .fields import fields_for
from .text import a, cap, compile_templates, pick, plural_creature, plural_object

_INTRO = compile_templates((
    "{N} was {a_occ} in {home}.",
    "There once was {a_occ} named {N} who lived in {home}.",
    "In the {home_st} of {home} lived {a_occ} called {N}.",
    "This is a story about {N}, {a_occ} from {home}.",
    "{N} lives in {home} and {occ_act} for a living.",
))
_FIRST_TIME = ("One {season} morning", "Early one {season} day", "On a {weather} {season} day",
               "Last {season}", "One {weather} morning")
_NEXT_TIME = ("The next day", "After that", "Later that week", "That afternoon", "A few days later")
_TRAVEL = compile_templates((
    "The road to {dest} is {d} miles long, so {he} {went}.",
    "{S} {went} the {d} miles to {dest}.",
    "It is {d} miles from {loc} to {dest}, and {he} {went} the whole way.",
))
_GREET = ("was waiting at the door", "made a pot of tea", "was glad to see {him}", "cooked a fine supper")
_ENDING_AWAY = compile_templates((
    "In the evening, {s} went back home to {home}.",
    "At last {s} returned home to {home}, tired but happy.",
    "Then {s} made the long trip back to {home}.",
))
_ENDING_HOME = compile_templates((
    "That night {s} slept well.", "It had been a good day in {home}.", "Then {s} went to bed early.",
))


class _Story:
    """Mutable state while telling one story: protagonist fields, location, sentences."""

    def __init__(self, world: World, person: Entity, rng: random.Random) -> None:
        self.world, self.p, self.rng = world, person, rng
        self.f = fields_for(world, person)
        self.loc = str(self.f["home"])
        self.out: list[str] = []
        self.first_time = True
        self.season = rng.choice(vocab.SEASONS)  # the story's season, shared by title and time phrases

    def refs(self) -> dict[str, str]:
        """``S`` to start a sentence and ``s`` mid-sentence: the first name or he/she."""
        if self.rng.random() < 0.5:
            return {"S": str(self.f["first"]), "s": str(self.f["first"])}
        return {"S": str(self.f["He"]), "s": str(self.f["he"])}

    def time(self) -> str:
        rng = self.rng
        table = _FIRST_TIME if self.first_time else _NEXT_TIME
        self.first_time = False
        return rng.choice(table).format(season=self.season, weather=rng.choice(vocab.WEATHER))

    def say(self, text: str, **extra: object) -> None:
        self.out.append(text.format_map(dict(self.f, **self.refs(), **extra)))

    def travel(self, dest: str) -> None:
        """Move to ``dest``, telling the distance (taken from the map) if it is another place."""
        if dest == self.loc:
            return
        d = self.world.distance(self.loc, dest)
        went = "walked" if d <= 12 else self.rng.choice(("rode a cart", "took the coach", "rode a horse"))
        self.out.append(pick(self.rng, _TRAVEL, dict(self.f, **self.refs(), dest=dest, d=d, loc=self.loc, went=went)))
        self.loc = dest


def _visit(st: _Story, other_key: str, word: str) -> bool:
    other = st.world.get(str(st.f.get(other_key, "")))
    if other is None or "home" not in other.attrs:
        return False
    dest = str(other["home"])
    o_first = other["first_name"]
    if dest == st.loc:
        st.say(f"{st.time()}, {{s}} went across {dest} to see {{his}} {word} {other.name}.")
    else:
        st.say(f"{st.time()}, {{s}} set out from {st.loc} to visit {{his}} {word} {other.name} in {dest}.")
        st.travel(dest)
    rng = st.rng
    if rng.random() < 0.5:
        st.say(f"When {{he}} arrived, {o_first} was busy {vocab.OCCUPATIONS[str(other['occupation'])][2]}.")
    else:
        st.say(f"{o_first} {rng.choice(_GREET)}.")
    st.say(f"They talked about {rng.choice(vocab.TALK_TOPICS)} until late.")
    return True


def _friend(st: _Story) -> bool:
    return _visit(st, "friend", "friend")


def _sibling(st: _Story) -> bool:
    return _visit(st, "sib", str(st.f.get("sib_rel", "sibling")))


def _market(st: _Story) -> bool:
    owned = st.world.get(str(st.f.get("owns", "")))
    rng = st.rng
    obj = owned if owned is not None else rng.choice(st.world.objects) if st.world.objects else None
    if obj is None or "made_in" not in obj.attrs:
        return False
    town, price = str(obj["made_in"]), obj["price"]
    st.say(f"{st.time()}, {{s}} went to the market in {town}, where {plural_object(obj)} are made.")
    st.travel(town)
    if owned is not None:
        st.say(f"{{S}} bought {a(obj.name)} for {price} coins.")
        st.say(f"It was made of {obj['material']}, and {{he}} liked its {obj['colour']} colour.")
        st.say(f"That is how {{he}} came to own {a(obj.name)}.")
    else:
        st.say(f"{{S}} asked the price of {a(obj.name)}. It was {price} coins.")
        st.say("{S} thought about it for a long time but did not buy one.")
    return True


def _guild(st: _Story) -> bool:
    if "guild" not in st.f or "guild_seat" not in st.f:
        return False
    guild = st.world[str(st.f["guild"])]
    st.say(f"{st.time()}, {{s}} went to a meeting of the {guild.name} in {guild['seat']}.")
    st.travel(str(guild["seat"]))
    leader = guild.get("leader")
    if leader == st.p.name:
        st.say("As the leader of the guild, {he} spoke first.")
    elif leader is not None:
        st.say(f"{leader}, the leader of the guild, spoke about {st.rng.choice(vocab.TALK_TOPICS)}.")
    st.say(f"The guild has {guild['members']} members, and most of them came.")
    return True


def _pet(st: _Story) -> bool:
    if "pet" not in st.f:
        return False
    st.say(st.rng.choice((
        "{S} saw that {his} {pet} was hungry, so {he} gave it some {pet_diet}.",
        "{S} took {his} {pet} out to look for {pet_diet}.",
    )))
    return True


def _creature(st: _Story) -> bool:
    if not st.world.creatures:
        return False
    c = st.rng.choice(st.world.creatures)
    cf = fields_for(st.world, c)
    st.say(f"{st.time()}, {{s}} walked to the {cf['place']} and saw {a(c.name)} eating {cf['diet']}.")
    legs = "no legs" if c["legs"] == 0 else f"{c['legs']} legs"
    st.say(f"It had {cf['cov_np']} and {legs}.")
    if st.rng.random() < 0.5:
        st.say(f"{{S}} knew that {plural_creature(c.name)} can live for {c['lifespan']} years.")
    return True


def _work(st: _Story) -> bool:
    st.say(f"{st.time()}, {{s}} was busy {{occ_ing}}.")
    if st.rng.random() < 0.5:
        st.say("{S} {occ_past} until the sun went down.")
    return True


def _mayor(st: _Story) -> bool:
    home = st.world.get(str(st.f["home"]))
    mayor = home.get("mayor") if home is not None else None
    if mayor is None or mayor == st.p.name:
        return False
    st.travel(home.name)
    st.say(f"In the square of {home.name}, {{s}} met {mayor}, the mayor of the {home['settlement']}.")
    return True


_EPISODES = (_friend, _sibling, _market, _guild, _pet, _creature, _work, _mayor)


def render_story(world: World, rng: random.Random) -> str | None:
    """A 5-15 sentence story about a random person with a known home (None if there is none)."""
    candidates = [p for p in (rng.choice(world.people) for _ in range(8)) if "home" in p.attrs] if world.people else []
    if not candidates:  # only in heavily restricted worlds
        candidates = [p for p in world.people if "home" in p.attrs]
    if not candidates:
        return None
    st = _Story(world, candidates[0], rng)
    st.out.append(pick(rng, _INTRO, st.f))
    episodes = list(_EPISODES)
    rng.shuffle(episodes)
    told = 0
    for episode in episodes:
        if told >= rng.choice((2, 2, 3)):
            break
        told += episode(st)
    ending = _ENDING_AWAY if st.loc != st.f["home"] else _ENDING_HOME
    st.out.append(pick(rng, ending, dict(st.f, **st.refs())))
    text = " ".join(s for s in st.out if s)
    if rng.random() < 0.3:
        title = rng.choice(("A day in {home}", "{first} and the {season}", "A trip", "A story"))
        text = cap(title.format(home=st.f["home"], first=st.f["first"], season=st.season)) + "\n\n" + text
    return text

