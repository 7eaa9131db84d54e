"""Any combination of formats, and outputs backfilled from the journal's caption.

A root may write any of ``txt``, ``json``, ``jsonl``, ``xmp`` and ``embed``, alone or together:
the scans, the watcher and a restart judge an image by exactly those outputs, so each image is
captioned once. An image that lacks an output its journal caption can supply (a format added to
the root, a deleted sidecar) gets it from that caption, with no model call. Real daemon, fake
model; results read back with pyexiv2, ``json`` and the manifest's documented format.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from pathlib import Path

import pytest

from phicapd.cli import ctl
from phicapd.config import load_settings
from phicapd.control.client import ControlClient
from phicapd.outputs.formats.jsonl import Manifest
from phicapd.outputs.root import Known, RootOutputs
from phicapd.pipeline.journal import Fingerprint, Journal, NewWork, Success
from phicapd.pipeline.staleness import find_stale
from tests.support.daemon import is_settled, running_daemon, settings_for, wait_for
from tests.support.fakes import FakeCaptioner, write_unique_png

pyexiv2 = pytest.importorskip("pyexiv2")


def _description(path: Path) -> str | None:
    image = pyexiv2.Image(str(path))
    try:
        value = image.read_xmp().get("Xmp.dc.description")
    finally:
        image.close()
    return value['lang="x-default"'] if isinstance(value, dict) else None


def _manifest(directory: Path) -> dict[str, str]:
    """metadata.jsonl read as its documented format: one JSON object per line."""
    path = directory / "metadata.jsonl"
    if not path.exists():
        return {}
    entries = [json.loads(line) for line in path.read_text().splitlines()]
    return {e["file_name"]: e["text"] for e in entries}


def _outputs(image: Path, formats: list[str]) -> dict[str, str | None]:
    """What each format holds for ``image``, read back independently of phicapd."""
    out: dict[str, str | None] = {}
    for fmt in formats:
        if fmt == "txt":
            txt = image.with_suffix(".txt")
            out[fmt] = txt.read_text().rstrip("\n") if txt.exists() else None
        elif fmt == "json":
            doc = image.with_suffix(".json")
            out[fmt] = json.loads(doc.read_text())["caption"] if doc.exists() else None
        elif fmt == "xmp":
            xmp = image.with_suffix(".xmp")
            out[fmt] = _description(xmp) if xmp.exists() else None
        elif fmt == "embed":
            out[fmt] = _description(image)
        else:
            out[fmt] = _manifest(image.parent).get(image.name)
    return out


def _images(root: Path, count: int, start: int = 0) -> list[Path]:
    paths = [root / f"img{i}.png" for i in range(start, start + count)]
    for i, path in enumerate(paths):
        write_unique_png(path, start + i)
    return paths


@pytest.mark.parametrize(
    "formats", [["xmp"], ["embed"], ["jsonl"], ["xmp", "jsonl"], ["embed", "json"], ["jsonl", "embed", "xmp"]]
)
def test_any_combination_is_written_and_each_image_captioned_once(tmp_path: Path, formats: list[str]) -> None:
    root = tmp_path / "in"
    root.mkdir()
    before = _images(root, 2)  # there before the start: the catch-up scan finds them
    settings = settings_for(tmp_path, [root], extra=f"formats = {json.dumps(formats)}\n", settle=0.2)
    fake = FakeCaptioner()
    with running_daemon(settings, fake) as daemon:
        after = _images(root, 2, start=2)  # the watcher's
        wait_for(lambda: is_settled(daemon) and daemon.store.counts()["done"] == 4, 60, "four captions")
        time.sleep(0.5)  # an embed rewrote the image: let the watcher see it, then a full scan
        daemon.api.rescan()
        wait_for(lambda: is_settled(daemon), 30, "the rescan")
    with running_daemon(settings, fake) as daemon:  # and a restart's catch-up scan
        wait_for(lambda: is_settled(daemon), 30, "the catch-up scan")
    assert sum(fake.calls.values()) == 4 and set(fake.calls.values()) == {1}
    for image in before + after:
        held = _outputs(image, formats)
        assert None not in held.values(), f"{image.name}: {held}"
        assert len(set(held.values())) == 1, f"{image.name}: formats disagree: {held}"
        assert next(iter(held.values())).startswith("A 8x8 test image ")
    written = {p.name for p in root.iterdir()} - {p.name for p in before + after}
    expected = {f"img{i}{ext}" for i in range(4) for ext in (".xmp", ".json") if ext[1:] in formats}
    assert written == expected | ({"metadata.jsonl"} if "jsonl" in formats else set())


ALL = ["txt", "json", "jsonl", "xmp", "embed"]


def test_a_format_added_to_a_root_is_backfilled_from_the_journal_without_the_model(tmp_path: Path) -> None:
    root = tmp_path / "in"
    root.mkdir()
    images = _images(root, 3)
    fake = FakeCaptioner()
    with running_daemon(settings_for(tmp_path, [root], extra='formats = ["txt"]\n'), fake) as daemon:
        wait_for(lambda: is_settled(daemon) and daemon.store.counts()["done"] == 3, 30, "three captions")
    first = {image: image.with_suffix(".txt").read_text() for image in images}
    (root / "img2.txt").write_text("my own words\n")  # a person's edit: never replaced
    settings = settings_for(tmp_path, [root], extra=f"formats = {json.dumps(ALL)}\n", settle=0.2)
    with running_daemon(settings, fake) as daemon:
        wait_for(lambda: is_settled(daemon) and (root / "img1.json").exists(), 30, "the backfill")
        assert sum(fake.calls.values()) == 3, "a backfill asked the model"
        for image in images[:2]:
            assert set(_outputs(image, ALL).values()) == {first[image].rstrip("\n")}
        # The new formats hold the caption the daemon made; the edited .txt stays as it is.
        assert (root / "img2.txt").read_text() == "my own words\n"
        assert set(_outputs(images[2], ALL[1:]).values()) == {first[images[2]].rstrip("\n")}
        document = json.loads((root / "img0.json").read_text())
        assert (document["model"], document["revision"]) == ("fake", "test")
        # A deleted output comes back from the journal too; an image with new bytes goes to the model.
        (root / "img0.xmp").unlink()
        (root / "img1.json").unlink()
        write_unique_png(root / "img2.png", 99)
        daemon.api.rescan()
        wait_for(
            lambda: is_settled(daemon) and (root / "img0.xmp").exists() and (root / "img1.json").exists(),
            30,
            "the second backfill",
        )
        wait_for(lambda: is_settled(daemon) and sum(fake.calls.values()) == 4, 30, "img2's new caption")
    assert sum(fake.calls.values()) == 4
    for image in images[:2]:
        assert set(_outputs(image, ALL).values()) == {first[image].rstrip("\n")}
    new = _outputs(images[2], ALL)
    assert new["txt"] is not None and new["txt"] != first[images[2]].rstrip("\n")
    assert len(set(new.values())) == 1, new


def test_a_format_added_to_a_root_of_an_older_journal_goes_to_the_model_once(tmp_path: Path) -> None:
    """Without a caption in the journal (a sidecar found on disk) there is nothing to copy from:
    the model captions it once, and the kept file stays as it is."""
    root = tmp_path / "in"
    root.mkdir()
    (image,) = _images(root, 1)
    time.sleep(0.01)
    image.with_suffix(".txt").write_text("written by another tool\n")
    fake = FakeCaptioner()
    settings = settings_for(tmp_path, [root], extra='formats = ["txt", "xmp"]\n')
    with running_daemon(settings, fake) as daemon:
        wait_for(lambda: is_settled(daemon) and image.with_suffix(".xmp").exists(), 30, "the xmp")
    with running_daemon(settings, fake) as daemon:
        wait_for(lambda: is_settled(daemon), 30, "the catch-up scan")
    assert sum(fake.calls.values()) == 1
    assert image.with_suffix(".txt").read_text() == "written by another tool\n"
    assert (_description(image.with_suffix(".xmp")) or "").startswith("A 8x8 test image ")


def test_stale_and_edited_are_judged_by_the_formats_a_root_writes(tmp_path: Path) -> None:
    root = tmp_path / "in"
    root.mkdir()
    images = _images(root, 3)
    fake = FakeCaptioner()
    extra = 'formats = ["xmp", "embed", "jsonl"]\nprompt = "{}"\n'
    with running_daemon(settings_for(tmp_path, [root], extra=extra.format("One.")), fake) as daemon:
        wait_for(lambda: is_settled(daemon) and daemon.store.counts()["done"] == 3, 30, "three captions")
    # digiKam edits one XMP description, another tool one embedded description.
    sidecar = pyexiv2.Image(str(images[0].with_suffix(".xmp")))
    sidecar.modify_xmp({"Xmp.dc.description": {'lang="x-default"': "corrected by hand"}})
    sidecar.close()
    kept = images[1].stat()
    embedded = pyexiv2.Image(str(images[1]))
    embedded.modify_xmp({"Xmp.dc.description": {'lang="x-default"': "typed in a photo app"}})
    embedded.close()
    os.utime(images[1], ns=(kept.st_atime_ns, kept.st_mtime_ns))  # a metadata edit that keeps the time
    settings = settings_for(tmp_path, [root], extra=extra.format("Two."))
    with running_daemon(settings, fake) as daemon:
        wait_for(lambda: is_settled(daemon), 30, "the start-up scan")
        assert daemon.captioner is not None
        report = find_stale(settings, daemon.store, daemon.captioner.identity, None)
        assert [job.path for job, _ in report.stale] == [images[2]]
        assert sorted(job.path for job, _ in report.edited) == images[:2]


def _store_with(tmp_path: Path, rows: list[tuple[str, str, str, float]]) -> Journal:
    """A journal whose captions predate keys (schema 3): (name, model, prompt, recorded at)."""
    store = Journal(tmp_path / "journal.db")
    for name, model, prompt, _ in rows:
        path = tmp_path / "in" / name
        store.enqueue_many([NewWork(path, tmp_path / "in", Fingerprint(1, 1, 1))])
        job = store.get(path)
        assert job is not None
        store.finish_many([Success(job.id, "sha", model, prompt, str(path.with_suffix(".txt")), Fingerprint(1, 1, 1))])
    db = sqlite3.connect(tmp_path / "journal.db")
    db.executemany("UPDATE jobs SET updated_at = ? WHERE path = ?", [(r[3], str(tmp_path / "in" / r[0])) for r in rows])
    db.commit()
    db.close()
    return store


def test_captions_from_before_keys_are_judged_by_their_model_and_prompt(tmp_path: Path) -> None:
    root = tmp_path / "in"
    root.mkdir()
    config = tmp_path / "c.toml"
    config.write_text(f'[state]\ndir = "{tmp_path}"\n[model]\nprompt = "Now."\n[[watch]]\npath = "{root}"\n')
    settings = load_settings(config)
    long_ago = time.time() - 3600
    store = _store_with(
        tmp_path,
        [
            ("same.png", "m@r", "Now.", long_ago),
            ("prompt.png", "m@r", "Before.", long_ago),
            ("model.png", "older@r", "Now.", long_ago),
            ("edited.png", "m@r", "Before.", long_ago),
        ],
    )
    for name in ("same", "prompt", "model", "edited"):
        (root / f"{name}.txt").write_text("a caption\n")
    os.utime(root / "prompt.txt", (long_ago - 10, long_ago - 10))
    os.utime(root / "model.txt", (long_ago - 10, long_ago - 10))
    report = find_stale(settings, store, "m@r", None)
    assert sorted(job.path.name for job, _ in report.stale) == ["model.png", "prompt.png"]
    assert [job.path.name for job, _ in report.edited] == ["edited.png"]
    store.close()


def _judge(tmp_path: Path, formats: list[str], policy: str, known: Known | None) -> list[str]:
    config = tmp_path / "c.toml"
    root = tmp_path / "in"
    config.write_text(
        f'[state]\ndir = "{tmp_path}"\n[[watch]]\npath = "{root}"\nformats = {json.dumps(formats)}\n'
        f'existing = "{policy}"\n'
    )
    settings = load_settings(config)
    outputs = RootOutputs.of(settings, settings.watch[0])
    image = root / "a.png"
    changed = image.stat().st_mtime_ns
    return list(outputs.missing(image, changed, "a", known, lambda: Manifest.read(root)))


def test_the_manifest_entry_is_judged_by_the_policy(tmp_path: Path) -> None:
    root = tmp_path / "in"
    root.mkdir()
    write_unique_png(root / "a.png", 1)
    assert _judge(tmp_path, ["jsonl"], "skip", None) == ["jsonl"]
    (root / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "theirs"}\n')
    old = (root / "a.png").stat().st_mtime - 60
    os.utime(root / "metadata.jsonl", (old, old))
    assert _judge(tmp_path, ["jsonl"], "skip", None) == ["jsonl"]  # older than the image
    assert _judge(tmp_path, ["jsonl"], "only-missing", None) == []  # listed is enough
    assert _judge(tmp_path, ["jsonl"], "overwrite", None) == ["jsonl"]  # not ours
    ours = Known("theirs", True, frozenset(["jsonl"]), str(root / "metadata.jsonl"), time.time())
    assert _judge(tmp_path, ["jsonl"], "overwrite", ours) == []
    os.utime(root / "metadata.jsonl")
    assert _judge(tmp_path, ["jsonl", "xmp"], "skip", None) == ["xmp"]


def test_status_shows_what_each_root_writes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    extra = 'formats = ["xmp", "jsonl"]\nexisting = "only-missing"\n'  # the last root's
    settings = settings_for(tmp_path, [a, b], extra=extra)
    with running_daemon(settings) as daemon:
        status = ControlClient(settings.control.socket, timeout=10).status().model_dump()
        assert daemon.is_ready()
        capsys.readouterr()
        assert ctl.main(["--socket", str(settings.control.socket), "status"]) == 0
        printed = capsys.readouterr().out
    assert f"root={b}  formats=xmp,jsonl  existing=only-missing  restale=manual" in printed
    assert status["sidecar"]["formats"] == ["txt"] and status["sidecar"]["restale"] == "manual"
    assert status["outputs"] == [
        {"root": str(a), "formats": ["txt"], "existing": "skip", "restale": "manual"},
        {"root": str(b), "formats": ["xmp", "jsonl"], "existing": "only-missing", "restale": "manual"},
    ]
