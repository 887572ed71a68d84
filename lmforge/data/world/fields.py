"""Template fields for one entity: every fact about it, pre-rendered as the words templates use.

A field exists only when its fact exists in the (possibly restricted) world, so a template that
needs ``{sib_home}`` is simply not chosen for a person whose sibling, or the sibling's home, was held
out.  That is the whole mechanism that keeps held-out names out of the text.
"""

from __future__ import annotations

from . import vocab
from .entity import Entity
from .facts import World
from .text import a, cap, plural_creature, plural_object, pronouns, sibling_word


def fields_for(world: World, e: Entity) -> dict[str, object]:
    kind_fields = {"person": _person, "place": _place, "creature": _creature, "object": _object,
                   "guild": _guild}
    f: dict[str, object] = {"N": e.name}
    he, him, his = pronouns(e)
    f.update(he=he, him=him, his=his, He=he.capitalize(), His=his.capitalize())
    kind_fields[e.kind](world, e, f)
    return f


def _person(world: World, e: Entity, f: dict[str, object]) -> None:
    occ = str(e["occupation"])
    f.update(first=e["first_name"], family=e["family_name"], occ=occ, a_occ=a(occ), occs=occ + "s",
             occ_act=vocab.OCCUPATIONS[occ][0], occ_past=vocab.OCCUPATIONS[occ][1],
             occ_ing=vocab.OCCUPATIONS[occ][2], birth=e["birth_year"], age=e["age"],
             man=vocab.PRONOUNS[str(e["gender"])][4])
    home = world.get(str(e.get("home", "")))
    if home is not None:
        f.update(home=home.name, home_st=home["settlement"], home_region=home["region"])
    bp = world.get(str(e.get("birthplace", "")))
    if bp is not None:
        f.update(bp=bp.name, bp_st=bp["settlement"])
        if home is not None and bp is home:
            f["bp_is_home"] = True
        elif home is not None:
            f["bp_not_home"] = True
    guild = world.get(str(e.get("guild", "")))
    if guild is not None:
        f["guild"] = guild.name
        if "seat" in guild.attrs:
            f["guild_seat"] = guild["seat"]
    if "leads" in e.attrs:
        f["leads"] = e["leads"]
    if "mayor_of" in e.attrs:
        f["mayor_of"] = e["mayor_of"]
    sib = world.get(str(e.get("sibling", "")))
    if sib is not None:
        f.update(sib=sib.name, sib_first=sib["first_name"], sib_rel=sibling_word(sib),
                 sib_occ=sib["occupation"], a_sib_occ=a(str(sib["occupation"])))
        if "home" in sib.attrs:
            f["sib_home"] = sib["home"]
    friend = world.get(str(e.get("friend", "")))
    if friend is not None:
        f.update(friend=friend.name, friend_first=friend["first_name"],
                 a_friend_occ=a(str(friend["occupation"])))
        if "home" in friend.attrs:
            f["friend_home"] = friend["home"]
    pet = world.get(str(e.get("pet", "")))
    if pet is not None:
        f.update(pet=pet.name, a_pet=a(pet.name), pet_diet=pet["diet"])
    owns = world.get(str(e.get("owns", "")))
    if owns is not None:
        f.update(owns=owns.name, a_owns=a(owns.name), owns_mat=owns["material"],
                 owns_colour=owns["colour"], owns_price=owns["price"])


def _place(world: World, e: Entity, f: dict[str, object]) -> None:
    f.update(region=e["region"], st=e["settlement"], pop=e["population"], founded=e["founded"],
             terrain=vocab.TERRAINS[str(e["terrain"])], a_st=a(str(e["settlement"])))
    if "mayor" in e.attrs:
        mayor = world[str(e["mayor"])]
        f.update(mayor=mayor.name, mayor_occ=mayor["occupation"])
    if "neighbor" in e.attrs:
        nb = world[str(e["neighbor"])]
        f.update(nb=nb.name, nb_st=nb["settlement"], dist=e["neighbor_distance"])
    residents = world.referrers("home", e.name)
    if residents:
        f["residents"] = residents
    goods = world.referrers("made_in", e.name)
    if goods:
        f["goods"] = goods
    seats = world.referrers("seat", e.name)
    if seats:
        f["seat_of"] = seats[0].name


def _creature(world: World, e: Entity, f: dict[str, object]) -> None:
    spec = vocab.CREATURE_CLASSES[str(e["class"])]
    f.update(cls=e["class"], size=e["size"], habitat=e["habitat"], diet=e["diet"], colour=e["colour"],
             legs=e["legs"], life=e["lifespan"], covering=spec["covering"], cov_verb=spec["verb"],
             plural=plural_creature(e.name), a_N=a(e.name), A_N=cap(a(e.name)),
             place=vocab.HABITAT_SINGULAR[str(e["habitat"])],
             when="at night" if e["active"] == "night" else "during the day",
             sleeps="during the day" if e["active"] == "night" else "at night")
    cov = f"{e['colour']} {spec['covering']}"
    f["cov_np"] = a(cov) if spec["covering"] in ("shell", "body") else cov  # "a red shell", "red fur"
    if int(e["legs"]) > 0:
        f["legs_walk"] = e["legs"]
    f["legs_np"] = "no legs" if int(e["legs"]) == 0 else f"{e['legs']} legs"
    owners = world.referrers("pet", e.name)
    if owners:
        f["keeper"] = owners[0].name


def _object(world: World, e: Entity, f: dict[str, object]) -> None:
    category = str(e["category"])
    plural, _materials, purpose, _prices = vocab.OBJECT_CATEGORIES[category]
    f.update(category=category, categories=plural, material=e["material"], colour=e["colour"],
             a_colour=a(str(e["colour"])),
             price=e["price"], purpose=purpose, plural=plural_object(e), a_N=a(e.name), A_N=cap(a(e.name)),
             brand=e.name.split()[0])
    if "made_in" in e.attrs:
        f["made_in"] = e["made_in"]
    owners = world.referrers("owns", e.name)
    if owners:
        f["owner"] = owners[0].name


def _guild(world: World, e: Entity, f: dict[str, object]) -> None:
    f.update(trade=e["trade"], trades=str(e["trade"]) + "s", founded=e["founded"], members=e["members"])
    if "seat" in e.attrs:
        f["seat"] = e["seat"]
    if "leader" in e.attrs:
        leader = world[str(e["leader"])]
        f.update(leader=leader.name, leader_first=leader["first_name"])
