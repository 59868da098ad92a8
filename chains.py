"""Chains: a built-in task family whose difficulty is composition (issue 15, the reasoning-boundary
experiment).

A problem is five digits and a chain of list operations; the completion writes the list after each
operation, one step per operation, the last step being the answer:

    prompt      "31415:rev inc asc="
    completion  "51413 62524 22456"      rev → 5 1 4 1 3, inc → 6 2 5 2 4, asc → 2 2 4 5 6

The five operations are the atoms; a level is the chain's depth (1..MAX_DEPTH). Every level's answer
is one of 10^5 digit strings, written out at every step, so at k = 256 guessing is worth nothing
(Cover@τ, arXiv 2510.08325). An operation never follows itself (asc asc, rev rev, swp swp would be
no-ops), so depth d has 5·4^(d−1) chains.

Two held-out splits, both fixed for every run and seed:
  compositions  at depth ≥ 2, a chain is held out iff crc32("rev inc asc") % 100 < 20: shown
                neither by the warm-start nor by RL, only evaluated, to test composing atoms in
                orders never trained
  problems      tasks.is_heldout (crc32 of the prompt), as for every built-in family

The warm-start's coverage is one number (`coverage`): every trainable chain of depth ≤ ⌊coverage⌋
plus the first fraction (coverage − ⌊coverage⌋) of those of the next depth, in a fixed hashed order.
So coverage 1.0 teaches the atoms only, 1.5 half the depth-2 chains; the edge sits at the first
depth not fully shown. Pure Python with no project imports: rewards.py (verifier) and tasks.py
(generator) both import it.
"""

import math
import random
import zlib
from itertools import pairwise, product

OPERATIONS = {
    "asc": lambda digits: sorted(digits),                          # sort ascending
    "rev": lambda digits: digits[::-1],                            # reverse
    "inc": lambda digits: [(d + 1) % 10 for d in digits],          # add one to each digit, mod 10
    "rot": lambda digits: digits[1:] + digits[:1],                 # rotate left by one
    # swap pairs (0↔1, 2↔3)
    "swp": lambda digits: [digits[i ^ 1] if (i ^ 1) < len(digits) else digits[i]
                           for i in range(len(digits))],
}
LENGTH = 5  # digits per list: 10^5 possible answers
# prompt + completion of a depth-5 chain is 57 tokens, inside the tiny base's 64 positions
MAX_DEPTH = 5
HELDOUT_COMPOSITION_PERCENT = 20


def compositions(depth: int) -> list[tuple[str, ...]]:
    """Every chain of `depth` operations in which no operation follows itself, in a fixed order."""
    return [ops for ops in product(OPERATIONS, repeat=depth)
            if all(a != b for a, b in pairwise(ops))]


def is_heldout_composition(ops: tuple[str, ...]) -> bool:
    """Atoms are never held out (nothing could be composed from them); deeper chains by a fixed
    hash."""
    return len(ops) >= 2 and zlib.crc32(" ".join(ops).encode()) % 100 < HELDOUT_COMPOSITION_PERCENT


def split(depth: int) -> tuple[list[tuple[str, ...]], list[tuple[str, ...]]]:
    """(trainable, held-out) chains of one depth."""
    chains = compositions(depth)
    heldout = [ops for ops in chains if is_heldout_composition(ops)]
    return [ops for ops in chains if ops not in heldout], heldout


def shown_compositions(coverage: float) -> list[tuple[str, ...]]:
    """The chains the warm-start shows at this coverage (see the top of this file); never a held-out
    one."""
    if not 1 <= coverage <= MAX_DEPTH:
        raise ValueError(f"chain coverage must be in [1, {MAX_DEPTH}] (1 = atoms only), not "
                         f"{coverage}")
    full = math.floor(coverage)
    shown = [ops for depth in range(1, full + 1) for ops in split(depth)[0]]
    if full < MAX_DEPTH:
        # a hashed order, so the shown part of a depth is not all the chains starting with "asc"
        partial = sorted(split(full + 1)[0],
                         key=lambda ops: zlib.crc32(("shown " + " ".join(ops)).encode()))
        shown += partial[:round((coverage - full) * len(partial))]
    return shown


def edge_compositions(coverage: float) -> list[tuple[str, ...]]:
    """Every trainable chain of the first depth the coverage does not show in full: the edge, which
    a warm-start may show rarely (models.WARMSTART's chain_edge_share) rather than never."""
    depth = math.floor(coverage) + 1
    return split(depth)[0] if depth <= MAX_DEPTH else []


def apply_chain(digits: list[int], ops: tuple[str, ...]) -> list[list[int]]:
    """The list after each operation: [after ops[0], after ops[1], ...]."""
    steps = []
    for op in ops:
        digits = OPERATIONS[op](digits)
        steps.append(digits)
    return steps


def written(digits: list[int]) -> str:
    return "".join(map(str, digits))


def make_chain(rng: random.Random, ops: tuple[str, ...]) -> dict:
    """One problem of a given chain: random digits, the prompt, the written steps (solution), the
    final answer."""
    digits = [rng.randrange(10) for _ in range(LENGTH)]
    steps = apply_chain(digits, ops)
    solution = " ".join(map(written, steps))
    return {"task": "chains", "prompt": f"{written(digits)}:{' '.join(ops)}=", "digits": digits,
            "ops": list(ops), "answer": written(steps[-1]), "solution": solution, "level": len(ops)}


def make_chains(rng: random.Random, level: int) -> dict:
    """tasks.BUILTIN's generator: a problem of a trainable chain of depth `level`."""
    if not 1 <= level <= MAX_DEPTH:
        raise ValueError(f"chains levels are chain depths 1..{MAX_DEPTH}, not {level}")
    return make_chain(rng, rng.choice(split(level)[0]))


def heldout_composition_problems(depth: int, count: int, seed: int = 1234) -> list[dict]:
    """`count` problems of the held-out chains of one depth, cycling through the chains (same on
    every run)."""
    rng, chains = random.Random(seed), split(depth)[1]
    return [make_chain(rng, chains[i % len(chains)]) for i in range(count)]


def score_chains(example: dict, completion: str) -> float:
    """1 iff the completion writes every step right (recomputed from the digits and the operations,
    not read from the example's solution) and nothing else; surrounding whitespace is ignored."""
    steps = apply_chain(list(example["digits"]), tuple(example["ops"]))
    return float(completion.strip() == " ".join(map(written, steps)))
