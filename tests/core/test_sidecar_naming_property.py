"""The sidecar naming rule over many small listings: injective, and the same as the plain
first-of-stem rule wherever that rule had no collision."""

from __future__ import annotations

import itertools
import os
import random
from pathlib import Path

from phicapd.outputs.naming import Claims, SiblingIndex, sidecar_for

D = Path("/d")
_EXTENSIONS = (".jpg", ".png", ".JPG")


def _universe() -> list[str]:
    names = ["a", "a.", "A.jpg", "b.jpg", "b.jpg.png", "a.jpg.png.gif"]
    for n in range(1, 3):
        for exts in itertools.product(_EXTENSIONS, repeat=n):
            names.append("a" + "".join(exts))
    return sorted(set(names))


UNIVERSE = _universe()


def _listings() -> list[tuple[str, ...]]:
    small = [c for k in range(1, 5) for c in itertools.combinations(UNIVERSE, k)]
    rng = random.Random(1234)
    large = [tuple(rng.sample(UNIVERSE, rng.randint(5, len(UNIVERSE)))) for _ in range(1500)]
    return small + large


def _old_rule(name: str, names: set[str]) -> str:
    """The rule before chains were handled: only the first name of a stem is plain."""
    stem = os.path.splitext(name)[0]
    first = min(n for n in names if os.path.splitext(n)[0] == stem)
    return name + ".txt" if first < name else stem + ".txt"


def _full(name: str, names: set[str]) -> bool:
    """The rule as the module docstring states it, recursively."""
    stem = os.path.splitext(name)[0]
    if min(n for n in names if os.path.splitext(n)[0] == stem) < name:
        return True
    return stem != name and stem in names and _full(stem, names)


def test_the_universe_has_chains_and_shared_stems() -> None:
    assert {"a.jpg", "a.png", "a.png.jpg", "a.jpg.png.gif", "a", "A.jpg"} <= set(UNIVERSE)


def test_naming_is_injective_and_matches_the_stated_rule() -> None:
    listings = _listings()
    assert len(listings) > 3000
    for listing in listings:
        names = set(listing)
        index = SiblingIndex(listing)
        targets = {n: index.sidecar_for(D / n).name for n in listing}
        assert len(set(targets.values())) == len(names), (listing, targets)
        for n, target in targets.items():
            stem = os.path.splitext(n)[0]
            assert target == (n + ".txt" if _full(n, names) else stem + ".txt"), (listing, n)
        old = {n: _old_rule(n, names) for n in listing}
        if len(set(old.values())) == len(names):
            assert targets == old, listing  # nothing changes where nothing collided


def test_an_unlisted_image_is_named_as_if_it_were_listed() -> None:
    for listing in _listings()[:4000]:
        for n in listing:
            others = [m for m in listing if m != n]
            assert sidecar_for(D / n, others) == sidecar_for(D / n, listing), (listing, n)


def test_listing_order_and_duplicates_do_not_matter() -> None:
    rng = random.Random(99)
    for listing in _listings()[-300:]:
        shuffled = [*listing, *listing[:2]]
        rng.shuffle(shuffled)
        a, b = SiblingIndex(listing), SiblingIndex(shuffled)
        assert all(a.sidecar_for(D / n) == b.sidecar_for(D / n) for n in listing)


def _random_claims(rng: random.Random, listing: tuple[str, ...]) -> dict[str, str]:
    """Claims as the journal can hold them: each on a base the rule can give its image (plain,
    full or ``name.N``), no base twice; some for images that have gone (not listed)."""
    claims: dict[str, str] = {}
    taken: set[str] = set()
    for name in rng.sample(UNIVERSE, rng.randint(0, 4)):
        base = rng.choice([os.path.splitext(name)[0], name, f"{name}.2"])
        if base not in taken and name not in claims:
            claims[name] = base
            taken.add(base)
    return claims


def test_with_claims_naming_stays_injective_and_keeps_every_live_claim() -> None:
    rng = random.Random(7)
    checked = 0
    for listing in _listings():
        names = set(listing)
        claims = Claims(_random_claims(rng, listing))
        index = SiblingIndex(listing)
        targets = {n: index.base_for(n, claims) for n in listing}
        live_claims = {b for i, b in claims.by_image.items() if i in names}
        assert len(set(targets.values())) == len(names), (listing, claims.by_image, targets)
        for n, base in targets.items():
            if n in claims.by_image:
                assert base == claims.by_image[n]
            else:
                assert base not in live_claims, (listing, claims.by_image, n)
        checked += bool(claims.by_image)
    assert checked > 1000


def test_a_claim_of_an_image_that_is_gone_binds_nothing() -> None:
    index = SiblingIndex(["photo.jpg"])
    assert index.base_for("photo.jpg", Claims({"photo.png": "photo"})) == "photo"
    # ... unless the image is still on disk, left out of the listing by the root's patterns.
    assert index.base_for("photo.jpg", Claims({"photo.png": "photo"}, D)) == "photo"  # /d/photo.png: none


def test_a_newcomer_that_sorts_first_takes_the_other_name() -> None:
    index = SiblingIndex(["photo.jpg", "photo.png"])
    claims = Claims({"photo.png": "photo"})
    assert index.base_for("photo.png", claims) == "photo"
    assert index.base_for("photo.jpg", claims) == "photo.jpg"
    # Both of the newcomer's names held: the first free name.N, which no plain or full name is.
    index = SiblingIndex(["a.jpg", "a.png", "a.png.jpg", "a.png.2.gif"])
    claims = Claims({"a.jpg": "a", "a.png.jpg": "a.png"})
    assert index.base_for("a.png", claims) == "a.png.3"
