"""The format registry (``outputs.formats``): every format of the config is registered, in the
documented orders, and a format added as one module works through ``RootOutputs`` (files, what
they hold, the policy) and the write plan (``outputs.plan``) without either naming it."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from phicapd.config_roots import AVAILABLE_FORMATS
from phicapd.outputs import formats
from phicapd.outputs.formats import ABSENT, Absent, Existing, Format, Stage
from phicapd.outputs.freshness import policy_keeps
from phicapd.outputs.plan import WritePlan
from phicapd.outputs.root import PRIMARY_ORDER, RootOutputs


def test_every_configurable_format_is_registered_in_both_orders() -> None:
    assert set(PRIMARY_ORDER) == set(AVAILABLE_FORMATS)
    assert PRIMARY_ORDER == ("txt", "json", "xmp", "embed", "jsonl")
    # Embedding changes the image's bytes, so it goes first; the shared manifest last.
    assert formats.in_write_order(AVAILABLE_FORMATS) == ("embed", "xmp", "txt", "json", "jsonl")


class Shout(Format):
    """A made-up format: ``photo.shout`` holds the caption in capitals."""

    name = "shout"  # type: ignore[assignment]
    primary_rank = 5
    stage = Stage.FILE

    def extension(self, outputs: RootOutputs) -> str | None:
        return ".shout"

    def path(self, image: Path, base: str, outputs: RootOutputs) -> Path | None:
        return image.with_name(base + ".shout")

    def held(self, path: Path) -> str | Absent | None:
        return path.read_text().rstrip("\n").lower() if path.exists() else ABSENT

    def text(self, caption: str, document: Callable[[str], str]) -> str:
        return caption.upper()

    def kept(self, e: Existing) -> bool:
        return policy_keeps(e.policy, e.changed_ns, e.files[self.name])

    def present(self, e: Existing) -> bool:
        return e.files[self.name].exists()


def test_a_new_format_is_one_registered_class(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(formats._REGISTRY, "shout", Shout())
    outputs = RootOutputs(("txt", "shout"), "skip", ".txt", "stem")  # type: ignore[arg-type]
    image = tmp_path / "photo.jpg"
    image.write_bytes(b"not really a jpeg")
    changed = os.stat(image).st_mtime_ns
    assert outputs.files(image, "photo") == {"txt": tmp_path / "photo.txt", "shout": tmp_path / "photo.shout"}
    assert outputs.missing(image, changed, "photo", None, lambda: None) == ["txt", "shout"]  # type: ignore[arg-type, return-value]

    plan = WritePlan.of(outputs, image, "photo", ["txt", "shout"], "a cat", lambda c: "{}")
    assert plan.write() is None
    assert (tmp_path / "photo.shout").read_text() == "A CAT\n"
    assert outputs.held(image, "photo") == {"txt": "a cat", "shout": "a cat"}
    assert outputs.missing(image, changed, "photo", None, lambda: None) == []  # type: ignore[arg-type, return-value]
