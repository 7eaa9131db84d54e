"""Output formats: ``[sidecar] formats`` / ``[[watch]] formats``, the JSON sidecar with its
provenance, the ``metadata.jsonl`` manifest, and a crash between two formats' writes."""

from __future__ import annotations

import collections
import json
import signal
import sqlite3
from pathlib import Path

import pytest

from phicapd import __version__
from phicapd.config import load_settings
from phicapd.errors import ConfigError
from phicapd.outputs.formats.jsonl import read_manifest, update_manifest
from phicapd.outputs.root import RootOutputs
from tests.support.daemon import (
    is_settled,
    running_daemon,
    settings_for,
    socket_ready,
    spawn_fake_daemon,
    wait_for,
    write_config,
)
from tests.support.fakes import FakeCaptioner, write_unique_png

JSON_KEYS = {
    "caption",
    "model",
    "revision",
    "backend",
    "prompt",
    "generation",
    "image_sha256",
    "phicapd_version",
    "created_at",
}


def _config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "c.toml"
    path.write_text(f'[state]\ndir = "{tmp_path / "s"}"\n' + text)
    return path


def test_formats_default_to_txt_and_a_root_overrides_the_sidecar_default(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    settings = load_settings(
        _config(
            tmp_path,
            f'[sidecar]\nformats = ["txt", "json"]\n[[watch]]\npath = "{tmp_path / "a"}"\n'
            f'[[watch]]\npath = "{tmp_path / "b"}"\nformats = ["json", "jsonl"]\n',
        )
    )
    a, b = settings.watch
    assert settings.formats_for(a) == ["txt", "json"]
    assert settings.formats_for(b) == ["json", "jsonl"]
    assert RootOutputs.of(settings, a).named_extension == ".txt"
    assert RootOutputs.of(settings, b).named_extension == ".json"
    # Our own files never trigger work, whatever a root includes.
    assert "*.[jJ][sS][oO][nN]" in a.ignore and "metadata.jsonl" in b.ignore
    assert load_settings(_config(tmp_path, "")).sidecar.formats == ["txt"]


@pytest.mark.parametrize(
    ("formats", "message"),
    [
        ('["txt", "gif"]', "sidecar.formats[1]: Input should be 'txt', 'xmp', 'embed', 'json' or 'jsonl' (got 'gif')"),
        ('["txt", "json", "txt"]', "format 'txt' is listed twice"),
        ("[]", "at least one format"),
        ('"txt"', "sidecar.formats: Input should be a valid list"),
    ],
)
def test_bad_formats_are_a_config_error_naming_the_key(tmp_path: Path, formats: str, message: str) -> None:
    with pytest.raises(ConfigError) as e:
        load_settings(_config(tmp_path, f"[sidecar]\nformats = {formats}\n"))
    assert message in str(e.value)


def test_a_bad_format_on_a_root_names_the_root(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"watch\[0\]\.formats: Value error, format 'json' is listed twice"):
        load_settings(_config(tmp_path, f'[[watch]]\npath = "{tmp_path}"\nformats = ["json", "json"]\n'))


def _manifest(directory: Path) -> list[dict[str, str]]:
    """metadata.jsonl read as its documented format: one JSON object per line."""
    return [json.loads(line) for line in (directory / "metadata.jsonl").read_text().splitlines()]


def test_every_format_is_written_from_one_caption_and_reads_back(tmp_path: Path) -> None:
    root = tmp_path / "in"
    (root / "sub").mkdir(parents=True)
    extra = 'formats = ["txt", "json", "jsonl"]\nprefix = "photo: "\n'
    settings = settings_for(tmp_path, [root], extra=extra)
    fake = FakeCaptioner()
    with running_daemon(settings, fake) as daemon:
        write_unique_png(root / "a.png", 1)
        write_unique_png(root / "b.png", 2)
        write_unique_png(root / "sub" / "c.png", 3)
        wait_for(lambda: is_settled(daemon) and daemon.store.counts()["done"] == 3, 30, "three captions")
        (root / "b.png").unlink()
        write_unique_png(root / "d.png", 4)
        wait_for(lambda: is_settled(daemon) and (root / "d.json").exists(), 30, "the fourth caption")
    assert sum(fake.calls.values()) == 4
    for image in (root / "a.png", root / "d.png", root / "sub" / "c.png"):
        text = image.with_suffix(".txt").read_text()
        assert text.startswith("photo: A 8x8 test image ")
        document = json.loads(image.with_suffix(".json").read_text())
        assert set(document) == JSON_KEYS
        assert document["caption"] + "\n" == text
        assert document["model"] == "fake" and document["revision"] == "test"
        assert document["backend"] == "native"
        assert document["prompt"] == settings.model.prompt
        assert document["generation"]["max_new_tokens"] == settings.model.max_new_tokens
        assert document["phicapd_version"] == __version__
        assert document["created_at"].endswith("+00:00")
        import hashlib

        assert document["image_sha256"] == hashlib.sha256(image.read_bytes()).hexdigest()
    # The manifest lists exactly the directory's captioned images; the deleted b.png dropped out.
    assert _manifest(root) == [
        {"file_name": "a.png", "text": (root / "a.txt").read_text().rstrip("\n")},
        {"file_name": "d.png", "text": (root / "d.txt").read_text().rstrip("\n")},
    ]
    assert _manifest(root / "sub") == [{"file_name": "c.png", "text": (root / "sub" / "c.txt").read_text().rstrip()}]
    assert not list(root.rglob(".*"))  # no temp files left


def test_imagefolder_loads_the_manifest(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Its caches go to tmp_path, and it must not reach for the hub (read at import).
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    datasets = pytest.importorskip("datasets")
    root = tmp_path / "in"
    root.mkdir()
    settings = settings_for(tmp_path, [root], extra='formats = ["txt", "jsonl"]\n')
    with running_daemon(settings, FakeCaptioner()) as daemon:
        for i in range(3):
            write_unique_png(root / f"p{i}.png", i)
        wait_for(lambda: is_settled(daemon) and daemon.store.counts()["done"] == 3, 30, "three captions")
    loaded = datasets.load_dataset("imagefolder", data_dir=str(root), split="train")
    assert sorted(loaded["text"]) == sorted((root / f"p{i}.txt").read_text().rstrip("\n") for i in range(3))


def test_json_only_root_judges_images_by_their_json_sidecar(tmp_path: Path) -> None:
    root = tmp_path / "in"
    root.mkdir()
    settings = settings_for(tmp_path, [root], extra='formats = ["json"]\n')
    fake = FakeCaptioner()
    write_unique_png(root / "a.png", 1)
    with running_daemon(settings, fake) as daemon:
        wait_for(lambda: is_settled(daemon) and (root / "a.json").exists(), 30, "the caption")
    assert not (root / "a.txt").exists()
    with running_daemon(settings, fake) as daemon:  # the catch-up scan keeps the up-to-date JSON
        wait_for(lambda: is_settled(daemon), 30, "the scan")
    assert sum(fake.calls.values()) == 1


def test_a_missing_format_is_added_without_replacing_a_kept_one(tmp_path: Path) -> None:
    """`skip`, per format: a hand-kept photo.txt stays; the missing photo.json is written."""
    root = tmp_path / "in"
    root.mkdir()
    write_unique_png(root / "a.png", 1)
    (root / "a.txt").write_text("my own caption\n")
    settings = settings_for(tmp_path, [root], extra='formats = ["txt", "json"]\n')
    fake = FakeCaptioner()
    with running_daemon(settings, fake) as daemon:
        wait_for(lambda: is_settled(daemon) and (root / "a.json").exists(), 30, "the JSON sidecar")
    assert (root / "a.txt").read_text() == "my own caption\n"
    assert json.loads((root / "a.json").read_text())["caption"].startswith("A 8x8 test image ")


def test_update_manifest_merges_drops_and_survives_junk(tmp_path: Path) -> None:
    (tmp_path / "a.png").write_bytes(b"x")
    (tmp_path / "b.png").write_bytes(b"x")
    (tmp_path / "metadata.jsonl").write_text(
        '{"file_name": "b.png", "text": "old b"}\nnot json\n{"file_name": "gone.png", "text": "g"}\n[1]\n'
    )
    update_manifest(tmp_path, {"a.png": "new a"})
    assert read_manifest(tmp_path) == {"a.png": "new a", "b.png": "old b"}
    update_manifest(tmp_path, {"b.png": None})
    assert _manifest(tmp_path) == [{"file_name": "a.png", "text": "new a"}]
    before = (tmp_path / "metadata.jsonl").stat()
    update_manifest(tmp_path, {"notes.png": None})  # a removal it never listed: not rewritten
    assert (tmp_path / "metadata.jsonl").stat().st_ino == before.st_ino
    empty = tmp_path / "empty"
    empty.mkdir()
    update_manifest(empty, {"nothing.png": "x"})  # no image, no manifest to keep in step: none made
    assert not (empty / "metadata.jsonl").exists()


@pytest.mark.slow
@pytest.mark.parametrize("formats", ['["txt", "json", "jsonl"]', '["txt", "embed", "json", "jsonl"]'])
def test_kill_dash_nine_between_two_formats_is_finished_from_the_journal(tmp_path: Path, formats: str) -> None:
    """The kill lands after the group's .txt files (and embeds, which come first) and before
    its .json files and manifest. An embedded image has new bytes by then: its staged caption,
    found in the image, still says the change was ours."""
    if "embed" in formats:
        pytest.importorskip("pyexiv2")
    root = tmp_path / "in"
    root.mkdir()
    record = tmp_path / "calls.log"
    marker = tmp_path / "killed"
    config = write_config(tmp_path, [root], extra=f"formats = {formats}\n", settle=0.2)
    n = 12
    keys = {f"f{i:02d}.png": write_unique_png(root / f"f{i:02d}.png", i) for i in range(n)}
    env = {"FAKE_KILL_BETWEEN_FORMATS": str(marker)}
    proc = spawn_fake_daemon(config, record, tmp_path / "daemon.log", env)
    assert proc.wait(60) == -signal.SIGKILL, (tmp_path / "daemon.log").read_text()[-3000:]
    assert marker.exists()
    half = [p for p in root.glob("*.txt") if not p.with_suffix(".json").exists()]
    assert half, "the kill should land between a .txt and its .json"
    calls_at_kill = len(record.read_text().split())
    proc = spawn_fake_daemon(config, record, tmp_path / "daemon.log", env)
    try:
        wait_for(lambda: socket_ready(tmp_path / "ctl.sock"), 60, "the restarted daemon")
        db = tmp_path / "state" / "journal.sqlite3"

        def drained() -> bool:
            with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
                return conn.execute("SELECT COUNT(*) FROM jobs WHERE state = 'done'").fetchone()[0] == n

        wait_for(drained, 60, "every job done")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0, (tmp_path / "daemon.log").read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    calls = collections.Counter(record.read_text().split())
    assert set(calls) == set(keys.values())
    # The half-written group was finished from the journal, not captioned again. (Captions still
    # on their way to the writer when the process died were never staged: they are made again,
    # as without formats.)
    assert [calls[keys[p.with_suffix(".png").name]] for p in half] == [1] * len(half)
    assert max(calls.values()) <= 2
    assert calls_at_kill >= len(half)
    manifest = {e["file_name"]: e["text"] for e in _manifest(root)}
    assert set(manifest) == {f"f{i:02d}.png" for i in range(n)}
    for i in range(n):
        image = root / f"f{i:02d}.png"
        text = image.with_suffix(".txt").read_text()
        assert json.loads(image.with_suffix(".json").read_text())["caption"] + "\n" == text
        assert manifest[image.name] + "\n" == text
        if "embed" in formats:
            from phicapd.outputs.metadata import read_description

            assert read_description(image) + "\n" == text


def test_a_removed_image_drops_out_of_the_manifest_by_itself(tmp_path: Path) -> None:
    root = tmp_path / "in"
    root.mkdir()
    settings = settings_for(tmp_path, [root], extra='formats = ["txt", "jsonl"]\n')
    with running_daemon(settings, FakeCaptioner()) as daemon:
        for i in range(3):
            write_unique_png(root / f"p{i}.png", i)
        wait_for(lambda: is_settled(daemon) and daemon.store.counts()["done"] == 3, 30, "three captions")
        assert [e["file_name"] for e in _manifest(root)] == ["p0.png", "p1.png", "p2.png"]
        (root / "p1.png").unlink()
        (root / "p2.png").rename(tmp_path / "moved-away.png")
        wait_for(lambda: [e["file_name"] for e in _manifest(root)] == ["p0.png"], 30, "the manifest to drop them")
