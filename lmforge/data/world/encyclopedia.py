"""Encyclopedia entries: an intro sentence plus a shuffled selection of fact sentences.

Each relation has several paraphrases; ``{S}``/``{Poss}`` are filled per sentence with the name, a
pronoun or the short name (see :func:`text.ref`), so entries about the same entity read differently
every time while stating the same facts.
"""

from __future__ import annotations

import random

from .entity import Entity
from .facts import World
from .fields import fields_for
from .text import a, cap, compile_templates, join, pick, pick_template, plural_object, ref

PERSON_INTRO = compile_templates((
    "{N} is {a_occ} who lives in {home}.",
    "{N} is {a_occ} living in the {home_st} of {home}.",
    "{N} is {a_occ} in {home}, a {home_st} in the {home_region} region.",
    "{N} is a {age}-year-old {occ} from {home}.",
    "{N} works as {a_occ} in {home}.",
    "{N} ({birth}) is {a_occ}.",
    "{N} is {a_occ} of the {family} family.",
))
PERSON = {
    "birth": compile_templates((
        "{S} was born in {birth}.", "{S} was born in the year {birth}.", "{Poss} year of birth is {birth}.",
    )),
    "age": compile_templates((
        "{S} is {age} years old.", "{S} is now {age} years old.", "{S} turned {age} this year.",
    )),
    "bp_is_home": compile_templates((
        "{S} was born in {home} and has lived there all {his} life.",
        "{S} grew up in {home} and never moved away.",
    )),
    "bp_not_home": compile_templates((
        "{S} was born in {bp} but moved to {home} as a young {man}.",
        "{S} grew up in {bp}, a {bp_st} some way from {home}.",
        "{Poss} birthplace is {bp}.",
    )),
    "home": compile_templates((
        "{S} lives in {home}.", "{S} lives in {home}, a {home_st} in the {home_region} region.",
        "{Poss} home is in {home}.", "{S} makes {his} home in {home}.",
    )),
    "occ": compile_templates((
        "{S} works as {a_occ}.", "By trade, {he} is {a_occ}.", "{S} earns {his} living as {a_occ}.",
        "{S} {occ_act} for a living.", "Most days {he} {occ_act}.",
    )),
    "guild": compile_templates((
        "{S} is a member of the {guild}.", "{S} belongs to the {guild}.",
        "Like many {occs}, {he} joined the {guild}.",
    )),
    "leads": compile_templates(("{S} is the leader of the {leads}.", "{S} leads the {leads}.")),
    "mayor_of": compile_templates(("{S} is the mayor of {mayor_of}.", "{S} serves as the mayor of {mayor_of}.")),
    "sib": compile_templates((
        "{Poss} {sib_rel} is {sib}.", "{S} has a {sib_rel} named {sib}.",
        "{S} has a {sib_rel}, {sib}, who lives in {sib_home}.",
        "{Poss} {sib_rel} {sib_first} works as {a_sib_occ}.",
    )),
    "friend": compile_templates((
        "{Poss} best friend is {friend}.", "{S} and {friend} are old friends.",
        "{Poss} closest friend is {friend}, {a_friend_occ} from {friend_home}.",
    )),
    "pet": compile_templates((
        "{S} keeps {a_pet} as a pet.", "{S} has a pet {pet}.", "At home, {he} keeps {a_pet}.",
        "{S} feeds {his} pet {pet} on {pet_diet}.",
    )),
    "owns": compile_templates((
        "{S} owns {a_owns}.", "Among {his} belongings is {a_owns}, made of {owns_mat}.",
        "{S} is proud of {his} {owns_colour} {owns}.",
    )),
}

PLACE_INTRO = compile_templates((
    "{N} is {a_st} in the {region} region.",
    "{N} is {a_st} {terrain} in the {region} region.",
    "The {st} of {N} lies {terrain}, in the {region} region.",
    "{N}, founded in {founded}, is {a_st} in the {region} region.",
    "{N} is {a_st} of {pop} people.",
))
PLACE = {
    "pop": compile_templates((
        "{S} has a population of {pop}.", "{pop} people live in {N}.", "The {st} is home to {pop} people.",
    )),
    "founded": compile_templates((
        "{S} was founded in {founded}.", "{S} was founded in the year {founded}.",
        "The first houses of {N} were built in {founded}.",
    )),
    "terrain": compile_templates(("{S} lies {terrain}.", "The {st} sits {terrain}.")),
    "region": compile_templates(("{S} is in the {region} region.", "{S} belongs to the {region} region.")),
    "mayor": compile_templates((
        "The mayor of {N} is {mayor}.", "{mayor} is the mayor of {N}.",
        "{S} is led by its mayor, {mayor}, who is {a_mayor_occ} by trade.",
    )),
    "nb": compile_templates((
        "The nearest {nb_st} is {nb}, {dist} miles away.", "{nb} lies {dist} miles from {N}.",
        "From {N} it is {dist} miles to {nb}, the closest {nb_st}.",
    )),
    "seat_of": compile_templates(("{S} is the seat of the {seat_of}.", "The {seat_of} has its hall in {N}.")),
}

CREATURE_INTRO = compile_templates((
    "The {N} is a {size} {cls} that lives in {habitat}.",
    "The {N} is a {size} {cls}.",
    "{A_N} is a {size} {cls} found in {habitat}.",
    "The {N} is a {cls} with {cov_np}.",
))
CREATURE = {
    "habitat": compile_templates((
        "{S} lives in {habitat}.", "{S} is found in {habitat}.", "{S} makes its home in {habitat}.",
    )),
    "diet": compile_templates((
        "{S} eats {diet}.", "{S} feeds on {diet}.", "{S} eats mostly {diet}.", "Its main food is {diet}.",
    )),
    "legs": compile_templates(("{S} has {legs_np}.", "{S} walks on {legs_walk} legs.")),
    "colour": compile_templates(("Its {covering} {cov_verb} {colour}.", "{S} has {cov_np}.")),
    "life": compile_templates(("{S} can live for {life} years.", "A {N} usually lives {life} years.")),
    "when": compile_templates(("{S} is active {when}.", "{S} comes out {when} and rests {sleeps}.")),
    "keeper": compile_templates(("{keeper} keeps one as a pet.", "{keeper} has one as a pet.")),
}

OBJECT_INTRO = compile_templates((
    "The {N} is a {category} made in {made_in}.",
    "The {N} is a kind of {category}.",
    "The {N} is {a_colour} {category} from {made_in}.",
    "The {N} is a {material} {category}.",
))
OBJECT = {
    "material": compile_templates(("{S} is made of {material}.", "{S} is made from {material}.")),
    "colour": compile_templates(("{S} is {colour}.", "{S} is usually {colour}.", "Most {plural} are {colour}.")),
    "made_in": compile_templates(("{S} is made in {made_in}.", "Craftspeople in {made_in} make {plural}.")),
    "price": compile_templates((
        "{S} costs {price} coins.", "One costs {price} coins at the market.",
        "The price of {a_N} is {price} coins.",
    )),
    "purpose": compile_templates(("{S} is used for {purpose}.", "People use {plural} for {purpose}.")),
    "owner": compile_templates(("{owner} owns one.", "{owner} has one at home.")),
}

GUILD_INTRO = compile_templates((
    "The {N} is a guild of {trades}.",
    "The {N} is the guild of the {trades} of the land.",
    "The {N} is a guild of {trades} with its hall in {seat}.",
))
GUILD = {
    "seat": compile_templates(("{S} has its hall in {seat}.", "The {N} meets in {seat}.")),
    "founded": compile_templates((
        "{S} was founded in {founded}.", "The {N} was founded in {seat} in the year {founded}.",
    )),
    "leader": compile_templates(("{S} is led by {leader}.", "{leader} is the leader of the {N}.")),
    "members": compile_templates(("{S} has {members} members.", "The {N} counts {members} members.")),
}

_TABLES = {
    "person": (PERSON_INTRO, PERSON), "place": (PLACE_INTRO, PLACE), "creature": (CREATURE_INTRO, CREATURE),
    "object": (OBJECT_INTRO, OBJECT), "guild": (GUILD_INTRO, GUILD),
}
_PRONOUN_STARTS = ("It ", "Its ", "He ", "His ", "She ", "Her ")
_OPENERS = ("", "", "", "", "Also, ", "In addition, ", "As it happens, ", "Locals say that ")


def render_entry(world: World, entity: Entity, rng: random.Random) -> str:
    """One encyclopedia entry about ``entity`` (3-9 sentences, optional title and paragraphs)."""
    fields = fields_for(world, entity)
    if entity.kind == "place":
        _place_extras(fields, rng)
    if "mayor_occ" in fields:
        fields["a_mayor_occ"] = a(str(fields["mayor_occ"]))
    intro_table, table = _TABLES[entity.kind]
    subj, poss = ref(entity, rng, first=True)
    intro = pick_template(rng, intro_table, fields)
    assert intro is not None, f"no intro template fits {entity.name}"
    sentences = [intro[0].format_map(fields)]
    covered = {f[2:] if f.startswith("a_") else f for f in intro[1]}  # facts the intro already said
    keys = [k for k in table if k not in covered]
    rng.shuffle(keys)
    keep = max(2, round(len(keys) * rng.uniform(0.5, 1.0)))
    for key in keys[:keep]:
        if key not in fields:  # the fact (or the entity it points at) is absent
            continue
        subj, poss = ref(entity, rng, first=False)
        sentence = pick(rng, table[key], dict(fields, S=subj, Poss=poss))
        if sentence is None:
            continue
        opener = rng.choice(_OPENERS)
        if opener and sentence.startswith(_PRONOUN_STARTS):
            sentence = opener + sentence[0].lower() + sentence[1:]
        sentences.append(sentence)
    sentences.extend(_lists(entity, fields, rng))
    body = " ".join(s for s in sentences if s)
    style = rng.random()
    if style < 0.45:
        return body
    title = entity.name if entity.kind in ("person", "place", "guild") else cap(entity.name)
    if style < 0.8 or len(sentences) < 5:
        return f"{title}\n\n{body}"
    cut = len(sentences) // 2
    return f"{title}\n\n" + " ".join(sentences[:cut]) + "\n\n" + " ".join(sentences[cut:])


def _place_extras(fields: dict[str, object], rng: random.Random) -> None:
    """Lists of residents and goods, formatted once per entry."""
    residents = fields.pop("residents", None)
    if residents:
        chosen = residents if len(residents) <= 3 else rng.sample(residents, 3)
        fields["res"] = join([p.name for p in chosen])
    goods = fields.pop("goods", None)
    if goods:
        fields["goods_list"] = join([plural_object(o) for o in goods[:3]])


_PLACE_LISTS = {
    "res": compile_templates(("Notable residents include {res}.", "Among the people of {N} are {res}.")),
    "goods_list": compile_templates(("{N} is known for its {goods_list}.", "Craftspeople in {N} make {goods_list}.")),
}


def _lists(entity: Entity, fields: dict[str, object], rng: random.Random) -> list[str]:
    if entity.kind != "place":
        return []
    out = []
    for key, templates in _PLACE_LISTS.items():
        if key in fields and rng.random() < 0.6:
            out.append(pick(rng, templates, fields))
    return [s for s in out if s]
