"""Hand-run checks of the built-in world: ``python -m lmforge.data.world [--bytes N] [--seed S]``.

Prints the generation throughput (timings are measured here, never asserted in tests), the genre
mix, the number of distinct words, and with ``--sample`` one document per genre.  ``--out PATH``
also writes the JSONL corpus.
"""

from __future__ import annotations

import argparse
import collections
import re
import time

from .corpus import GENRES, generate_records, write_corpus
from .facts import World


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lmforge.data.world")
    parser.add_argument("--bytes", type=int, default=10_000_000, help="corpus size in bytes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", default="default", help="world size preset")
    parser.add_argument("--sample", action="store_true", help="print one document per genre")
    parser.add_argument("--out", help="also write the JSONL corpus here")
    args = parser.parse_args(argv)

    t0 = time.perf_counter()
    world = World.build(args.seed, args.size)
    t1 = time.perf_counter()
    total = docs = 0
    genres: collections.Counter[str] = collections.Counter()
    words: set[str] = set()
    samples: dict[str, str] = {}
    for genre, text in generate_records(world, args.seed, target_bytes=args.bytes):
        total += len(text.encode("utf-8"))
        docs += 1
        genres[genre] += 1
        samples.setdefault(genre, text)
    t2 = time.perf_counter()
    for genre, text in generate_records(world, args.seed, n_docs=5000):
        words.update(re.findall(r"[A-Za-z]+", text))
    mb = total / 1e6
    print(f"world: {len(world.entities)} entities, {len(world.facts)} facts, built in {t1 - t0:.3f}s")
    print(f"corpus: {mb:.2f} MB, {docs} documents in {t2 - t1:.2f}s = {mb / (t2 - t1):.2f} MB/s (one core)")
    print("genres: " + ", ".join(f"{g} {genres[g]}" for g in GENRES))
    print(f"distinct words in the first 5000 documents: {len(words)}")
    if args.sample:
        for genre in GENRES:
            print(f"\n=== {genre} ===\n{samples.get(genre, '(none)')}")
    if args.out:
        t3 = time.perf_counter()
        write_corpus(args.out, seed=args.seed, target_bytes=args.bytes, size=args.size, world=world)
        print(f"wrote {args.out} in {time.perf_counter() - t3:.2f}s")


if __name__ == "__main__":
    main()
