"""Naming: which sidecar base each image of a directory gets (``photo`` for ``photo.txt``).

Naming rule (shared by the daemon and ``phicapctl``; it needs nothing but the directory):

* ``photo.jpg`` -> ``photo.txt`` (the stem, the name without its last extension);
* when several images in one directory share a stem (``photo.jpg``, ``photo.png``), the one
  whose file name sorts first (plain code-point order) keeps ``photo.txt`` and every other one
  uses its full name: ``photo.png.txt``;
* an image whose stem is the full name of another image that uses its full name uses its full
  name too: with ``a.jpg``, ``a.png`` and ``a.png.jpg``, ``a.png`` takes ``a.png.txt``, so
  ``a.png.jpg`` takes ``a.png.jpg.txt`` (and ``a.png.jpg.gif``, if there is one, its full name).

No two images ever map to the same sidecar: two full names differ because the names do; two
plain names would need the same stem, where only the first image is plain; and a plain
``stem.txt`` equal to a full ``other.txt`` would need ``other`` to be the stem, which the last
rule turns into a full name. The last rule changes nothing in a directory where the first two
alone give distinct names.

Names are kept (``Claims``, stored in the journal): once a sidecar is an image's, because we or
phicapctl wrote it or a scan found it beside the image, it stays that image's. The rule above
names only images without a claim, and skips names other images hold: ``photo.png`` captioned
into ``photo.txt``, a later ``photo.jpg`` gets ``photo.jpg.txt`` though it sorts first, so a
caption (perhaps edited by hand) never changes hands.

Every per-image output (``txt``, ``json``, ``xmp`` under ``xmp_naming = "stem"``) takes the
image's base, so its files stay together. Whether an output is kept is ``outputs.freshness``;
how it is written, ``outputs.atomic``.
"""

from __future__ import annotations

import collections
import os
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any


class Claims:
    """Sidecar names the journal has given to images of one directory: image name -> base.

    A *base* is a sidecar name without the extension (``photo`` for ``photo.txt``), so a changed
    ``[sidecar] extension`` keeps every image's name. A claim binds only while its image exists:
    one listed by the caller's ``SiblingIndex``, or, for an image the listing leaves out (a file
    the root's patterns skip, captioned with phicapctl), one still on disk in ``directory``.
    """

    def __init__(self, by_image: Mapping[str, str] | None = None, directory: Path | None = None) -> None:
        self.by_image: dict[str, str] = dict(by_image or {})
        self.by_base: dict[str, str] = {base: image for image, base in self.by_image.items()}
        self._directory = directory
        self._on_disk: dict[str, bool] = {}

    def add(self, image: str, base: str) -> None:
        self.by_image[image] = base
        self.by_base[base] = image

    def holder(self, base: str, listed: Collection[str]) -> str | None:
        """The image whose claim on ``base`` binds, if any."""
        image = self.by_base.get(base)
        if image is None or image in listed:
            return image
        if self._directory is None:
            return None
        alive = self._on_disk.get(image)
        if alive is None:
            alive = self._on_disk[image] = os.path.lexists(self._directory / image)
        return image if alive else None


NO_CLAIMS = Claims()


class SiblingIndex:
    """The naming rule over one directory listing: which sidecar each image gets.

    Built once per listing (O(n)); each lookup walks only the image's own stem chain. Claims are
    passed per lookup, since the journal's change while a listing stays valid. Without claims the
    result is the plain rule of the module docstring. With claims, an image that has one keeps
    it; every other image takes the rule's name unless a claim holds it, then its full name, then
    the first free ``name.N`` (N = 2, 3, ...), a base no listed image's plain or full name can be.
    An image missing from the listing is named as if it were listed.
    """

    def __init__(self, names: Iterable[str]) -> None:
        self._listed = frozenset(names)
        by_stem: dict[str, list[str]] = {}
        for name in self._listed:
            by_stem.setdefault(_stem(name), []).append(name)
        for group in by_stem.values():
            group.sort()
        self._by_stem = by_stem

    def same_stem(self, stem: str) -> Sequence[str]:
        """The listed images whose stem is ``stem``, sorted."""
        return self._by_stem.get(stem, ())

    def sidecar_for(self, image: Path, extension: str = ".txt", claims: Claims = NO_CLAIMS) -> Path:
        return image.with_name(self.base_for(image.name, claims) + extension)

    def base_for(self, name: str, claims: Claims = NO_CLAIMS) -> str:
        """The sidecar base of the image ``name``: its claim, else the rule's name, free of claims."""
        own = claims.by_image.get(name)
        if own is not None:
            return own
        stem = _stem(name)
        if stem != name and self._takes_stem(name, stem, claims):
            return stem
        if self._free(name, name, claims):
            return name
        n = 2
        while True:
            base = f"{name}.{n}"
            if base not in self._listed and base not in self._by_stem and self._free(base, name, claims):
                return base
            n += 1

    def _free(self, base: str, name: str, claims: Claims) -> bool:
        holder = claims.holder(base, self._listed)
        return holder is None or holder == name

    def _takes_stem(self, name: str, stem: str, claims: Claims) -> bool:
        """Whether ``name`` gets the plain base ``stem``: it is free, ``name`` is the first of the
        stem's unclaimed images, and no image named ``stem`` holds it in its full form."""
        if not self._free(stem, name, claims):
            return False
        for other in self._by_stem.get(stem, ()):
            if other >= name:
                break
            if other not in claims.by_image:
                return False
        # The chain rule: an unclaimed image named ``stem`` in its full form holds the base.
        return not (stem in self._listed and stem not in claims.by_image and self.base_for(stem, claims) == stem)


def is_rule_base(name: str, base: str) -> bool:
    """Whether the naming rule can give the image ``name`` the sidecar base ``base``: its stem,
    its full name, or ``name.N`` (N >= 2)."""
    if base in (_stem(name), name):
        return True
    head, _, n = base.rpartition(".")
    return head == name and n.isascii() and n.isdigit() and n[0] != "0" and int(n) >= 2


def _stem(name: str) -> str:
    return os.path.splitext(name)[0]


class SiblingCache:
    """The writer's naming index per directory, reused while the directory is unchanged.

    Listing a directory of 100,000 images for every batch would cost more than captioning it on
    a fast GPU. A directory's mtime changes whenever an entry is added, removed or renamed; the
    cached listing stays valid as long as the only such changes were our own sidecar writes.
    """

    def __init__(self, list_images: Callable[[Path, Any], list[str]], size: int = 1024) -> None:
        self._list_images = list_images
        self._size = size
        self._entries: collections.OrderedDict[Path, tuple[int, SiblingIndex]] = collections.OrderedDict()

    def get(self, directory: Path, root: Any) -> SiblingIndex:
        mtime = _mtime_ns(directory)
        cached = self._entries.get(directory)
        if cached is not None and mtime is not None and cached[0] == mtime:
            self._entries.move_to_end(directory)
            return cached[1]
        index = SiblingIndex(self._list_images(directory, root))
        if mtime is not None:
            self._entries[directory] = (mtime, index)
            if len(self._entries) > self._size:
                self._entries.popitem(last=False)
        return index

    def unchanged(self, directory: Path) -> bool:
        cached = self._entries.get(directory)
        return cached is not None and cached[0] == _mtime_ns(directory)

    def wrote(self, directory: Path, *, unchanged_before: bool) -> None:
        """We just wrote sidecars (not images) in ``directory``. If nothing else had changed it
        since it was listed, the listing of its images is still right; otherwise forget it."""
        cached = self._entries.get(directory)
        mtime = _mtime_ns(directory)
        if cached is not None and unchanged_before and mtime is not None:
            self._entries[directory] = (mtime, cached[1])
        else:
            self._entries.pop(directory, None)


def _mtime_ns(path: Path) -> int | None:
    try:
        return path.stat().st_mtime_ns
    except OSError:
        return None


def sidecar_for(image: Path, siblings: Iterable[str], extension: str = ".txt") -> Path:
    """The sidecar path of ``image``, given the names of the images in its directory.

    ``siblings`` may or may not include ``image`` itself; only names with the same stem matter.
    """
    return SiblingIndex(siblings).sidecar_for(image, extension)


def sidecar_may_exist(image: Path, extension: str) -> bool:
    """Whether a file stands under either name the naming rule can give ``image``'s sidecar.

    When neither exists the sidecar is missing whatever the rule picks, which is known without
    listing the directory (the usual case for a new image).
    """
    return os.path.exists(image.with_name(_stem(image.name) + extension)) or os.path.exists(
        image.with_name(image.name + extension)
    )
