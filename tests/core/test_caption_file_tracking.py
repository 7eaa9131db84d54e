"""phicapctl writes every format of the root (embed, XMP, txt, json; the manifest outside the
roots) and reports its captions under a root (``POST /v1/captioned``), so the daemon's journal
tracks them like its own: the scans leave them alone, ``stale`` lists them after a settings
change, and a hand edit counts as edited. Real daemon, fake model, pyexiv2 to read back."""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import pytest

from phicapd.cli.ctl import main
from phicapd.control.client import ControlClient, RequestRejected
from phicapd.control.protocol import CaptionedRequest
from phicapd.outputs import metadata
from phicapd.outputs.formats.jsonl import read_manifest
from phicapd.outputs.provenance import settings_key
from phicapd.pipeline.journal import State
from tests.support.daemon import is_settled, running_daemon, settings_for, wait_for
from tests.support.fakes import FakeCaptioner, write_unique_png

pyexiv2 = pytest.importorskip("pyexiv2")

ALL = '["txt", "xmp", "embed", "jsonl", "json"]'
EX_UNAVAILABLE = 69


def _config(root: Path, root_lines: str, sidecar_lines: str = "") -> str:
    return f'[sidecar]\n{sidecar_lines}\n[[watch]]\npath = "{root}"\n{root_lines}\n'


def _settings(tmp_path: Path, root: Path, prompt: str = "Describe it.", formats: str = ALL):  # type: ignore[no-untyped-def]
    return settings_for(tmp_path, [], extra=_config(root, f'formats = {formats}\nprompt = "{prompt}"'))


def _ctl(socket: Path, *args: str) -> int:
    return main(["--socket", str(socket), *args])


def _embedded(image: Path) -> str | None:
    return metadata.read_description(image)


def _report(photo: Path, **changes: object) -> dict[str, object]:
    body: dict[str, object] = {
        "path": str(photo),
        "sidecar": "photo.txt",
        "caption": "words",
        "sha256": "0" * 64,
        "model": "fake@test",
        "backend": "native",
        "prompt": "Describe it.",
        "settings_key": "0123456789abcdef",
    }
    body.update(changes)
    return {k: v for k, v in body.items() if v is not None}


def _post(client: ControlClient, body: object) -> tuple[int, dict[str, object]]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    resp = client.request("POST", "/v1/captioned", body=data, content_type="application/json", accept=(400, 422))
    assert resp.content_type == "application/json"
    return resp.status, resp.json()


def test_caption_file_writes_every_format_and_the_daemon_tracks_it(tmp_path: Path, capsys) -> None:
    root = tmp_path / "in"
    root.mkdir()
    settings = _settings(tmp_path, root)
    fake = FakeCaptioner()
    with running_daemon(settings, fake) as daemon:
        daemon.api.pause()  # the watcher must not be the one that writes them
        photo = root / "photo.png"
        write_unique_png(photo, 1)
        original = photo.read_bytes()
        # The watcher queues it first; phicapctl's report makes that pending job done.
        wait_for(lambda: daemon.store.counts()["pending"] == 1, 10, "the watcher to queue the image")
        assert _ctl(settings.control.socket, "caption-file", str(photo)) == 0
        text = (root / "photo.txt").read_text()
        caption = text.rstrip("\n")
        assert caption.startswith("A 8x8 test image ")
        document = json.loads((root / "photo.json").read_text())
        assert document["caption"] == caption and document["prompt"] == "Describe it."
        assert document["image_sha256"] == hashlib.sha256(original).hexdigest()  # the bytes captioned
        assert metadata.read_description(root / "photo.xmp") == caption
        assert _embedded(photo) == caption and photo.read_bytes() != original
        # The manifest is the daemon's writer's: it merges what phicapctl reports.
        wait_for(lambda: read_manifest(root) == {"photo.png": caption}, 10, "the daemon's manifest")
        job = daemon.store.get(photo)
        assert job is not None and job.state == State.DONE
        assert job.caption == caption and job.sidecar == str(root / "photo.txt")
        assert job.settings_key == settings_key(settings, settings.watch[0], fake.identity)
        assert (job.model, job.backend, job.prompt) == ("fake@test", "native", "Describe it.")
        assert job.sha256 == hashlib.sha256(original).hexdigest()
        st = photo.stat()  # after the embed: the daemon stat'ed the new file itself
        assert job.fingerprint is not None and (job.fingerprint.inode, job.fingerprint.size) == (st.st_ino, st.st_size)
        assert daemon.store.claims_in(root) == {"photo.png": "photo"}
        # The watcher saw the image (and the embed's rename): neither it nor a scan captions it again.
        daemon.api.resume()
        daemon.api.rescan()
        wait_for(lambda: is_settled(daemon), 30, "the watcher and the rescan")
        assert sum(fake.calls.values()) == 1
        assert ControlClient(settings.control.socket).stale().model_dump() == {"stale": [], "edited": []}
    assert (root / "photo.txt").read_text() == text
    assert capsys.readouterr().err == ""


def test_prompt_change_lists_them_stale_recaption_redoes_one_and_hand_edits_are_edited(tmp_path: Path, capsys) -> None:
    root = tmp_path / "in"
    root.mkdir()
    fake = FakeCaptioner()
    settings = _settings(tmp_path, root)
    with running_daemon(settings, fake) as daemon:
        daemon.api.pause()
        for i, name in enumerate(("a.png", "b.png")):
            write_unique_png(root / name, 10 + i)
        assert _ctl(settings.control.socket, "caption-dir", str(root)) == 0
        wait_for(lambda: set(read_manifest(root)) == {"a.png", "b.png"}, 10, "the manifest")
    (root / "b.txt").write_text("my own words\n")  # a person's edit after phicapctl wrote it
    settings = _settings(tmp_path, root, prompt="Write alt text.")
    with running_daemon(settings, fake) as daemon:
        wait_for(lambda: is_settled(daemon), 30, "the start-up scans")
        assert sum(fake.calls.values()) == 2
        client = ControlClient(settings.control.socket)
        report = client.stale()
        assert [e.path for e in report.stale] == [str(root / "a.png")]
        assert [e.path for e in report.edited] == [str(root / "b.png")]
        assert report.stale[0].prompt == "Describe it."
        capsys.readouterr()
        assert _ctl(settings.control.socket, "recaption", "--stale") == 0
        assert capsys.readouterr().out.strip() == "re-queued 1 (1 edited by hand kept)"
        wait_for(lambda: is_settled(daemon) and sum(fake.calls.values()) == 3, 30, "one new caption")
        assert client.stale().stale == []
        assert json.loads((root / "a.json").read_text())["prompt"] == "Write alt text."
    assert sum(fake.calls.values()) == 3
    assert (root / "b.txt").read_text() == "my own words\n"


def test_a_caption_made_with_another_prompt_is_stale_against_the_roots(tmp_path: Path) -> None:
    root = tmp_path / "in"
    root.mkdir()
    settings = _settings(tmp_path, root, formats='["txt"]')
    with running_daemon(settings) as daemon:
        daemon.api.pause()
        write_unique_png(root / "own.png", 20)
        write_unique_png(root / "plain.png", 21)
        assert _ctl(settings.control.socket, "caption-file", "--prompt", "Be terse.", str(root / "own.png")) == 0
        assert _ctl(settings.control.socket, "caption-file", str(root / "plain.png")) == 0
        stale = ControlClient(settings.control.socket).stale()
        assert [e.path for e in stale.stale] == [str(root / "own.png")] and stale.stale[0].prompt == "Be terse."


def test_existing_descriptions_follow_the_policy_and_force_replaces_them(tmp_path: Path, capsys) -> None:
    root = tmp_path / "in"
    root.mkdir()
    settings = _settings(tmp_path, root, formats='["txt", "xmp", "embed"]')
    photo = root / "photo.png"
    write_unique_png(photo, 30)
    metadata.embed_caption(photo, "A camera's words")  # someone else's description: kept
    metadata.write_xmp_sidecar(root / "photo.xmp", "My XMP words")  # newer than the image: skip keeps it
    with running_daemon(settings) as daemon:
        daemon.api.pause()
        assert _ctl(settings.control.socket, "caption-file", str(photo)) == 0
        caption = (root / "photo.txt").read_text().rstrip("\n")
        assert _embedded(photo) == "A camera's words"
        assert metadata.read_description(root / "photo.xmp") == "My XMP words"
        # Every format kept now: nothing is sent.
        assert _ctl(settings.control.socket, "caption-file", "--json", str(photo)) == 0
        assert json.loads(capsys.readouterr().out.splitlines()[-1])["state"] == "skipped"
        assert _ctl(settings.control.socket, "caption-file", "--force", str(photo)) == 0
        assert _embedded(photo) == caption
        assert metadata.read_description(root / "photo.xmp") == caption


def test_the_embedded_caption_last_written_is_replaced_with_the_new_one(tmp_path: Path) -> None:
    root = tmp_path / "in"
    root.mkdir()
    settings = _settings(tmp_path, root, formats='["txt", "embed"]')
    photo = root / "photo.png"
    write_unique_png(photo, 31)
    # An earlier caption, in the image and beside it; then the image changes (newer than the txt).
    metadata.embed_caption(photo, "An old caption")
    (root / "photo.txt").write_text("An old caption\n")
    old = photo.stat().st_mtime - 60
    os.utime(root / "photo.txt", (old, old))
    with running_daemon(settings) as daemon:
        daemon.api.pause()
        assert _ctl(settings.control.socket, "caption-file", str(photo)) == 0
    caption = (root / "photo.txt").read_text().rstrip("\n")
    assert caption != "An old caption" and _embedded(photo) == caption


def test_outside_every_root_phicapctl_keeps_the_manifest(tmp_path: Path, capsys) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    settings = settings_for(tmp_path, [], extra='[sidecar]\nformats = ["txt", "xmp", "jsonl"]\n')
    write_unique_png(elsewhere / "kept.png", 40)
    (elsewhere / "kept.txt").write_text("mine\n")  # newer than its image: skip keeps both
    metadata.write_xmp_sidecar(elsewhere / "kept.xmp", "mine")
    lines = [{"file_name": "kept.png", "text": "mine"}, {"file_name": "gone.png", "text": "x"}]
    (elsewhere / "metadata.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    for i in range(5):
        write_unique_png(elsewhere / f"p{i}.png", 41 + i)
    with running_daemon(settings):
        assert _ctl(settings.control.socket, "caption-dir", "--jobs", "4", str(elsewhere)) == 0
    manifest = read_manifest(elsewhere)
    assert manifest == {
        "kept.png": "mine",
        **{f"p{i}.png": (elsewhere / f"p{i}.txt").read_text().rstrip("\n") for i in range(5)},
    }
    assert metadata.read_description(elsewhere / "p0.xmp") == manifest["p0.png"]
    capsys.readouterr()


def test_a_daemon_without_captioned_still_gets_its_caption_written(tmp_path: Path, capsys) -> None:
    root = tmp_path / "in"
    root.mkdir()
    settings = _settings(tmp_path, root, formats='["txt", "jsonl"]')
    fake = FakeCaptioner()
    with running_daemon(settings, fake) as daemon:
        daemon.api.pause()
        del daemon.server._router._routes["/v1/captioned"]  # as a daemon from before it answers: 404
        photo = root / "photo.png"
        write_unique_png(photo, 50)
        assert _ctl(settings.control.socket, "caption-file", str(photo)) == 0
        assert (root / "photo.txt").read_text().startswith("A 8x8 test image ")
        job = daemon.store.get(photo)
        assert job is None or job.caption is None  # not recorded: nothing to record it with
    assert not (root / "metadata.jsonl").exists()  # still the daemon's alone
    assert capsys.readouterr().err == ""  # silently


@pytest.mark.parametrize(
    ("body", "says"),
    [
        (b"{not json", "not valid JSON"),
        (b"[1, 2]", "must be a JSON object"),
        ("missing", "caption: Field required; sha256: Field required"),
        ("relative", "path: Value error, must be an absolute path"),
        ("dotdot", "path: Value error, must be an absolute path"),
        ("slash", "sidecar: Value error, must be a file name"),
        ("sha", "sha256: String should match pattern"),
        ("key", "settings_key: String should match pattern"),
        ("prompt", "prompt: String should have at least 1 character"),
        ("extra", "surprise: Extra inputs are not permitted"),
        ("caption", "caption: Input should be a valid string"),
    ],
)
def test_malformed_captioned_bodies_are_refused(tmp_path: Path, body: object, says: str) -> None:
    root = tmp_path / "in"
    root.mkdir()
    photo = root / "photo.png"
    variants: dict[str, object] = {
        "missing": {"path": str(photo)},
        "relative": _report(photo, path="in/photo.png"),
        "dotdot": _report(photo, path=f"{root}/../in/photo.png"),
        "slash": _report(photo, sidecar="a/photo.txt"),
        "sha": _report(photo, sha256="xyz"),
        "key": _report(photo, settings_key="NOT-HEX"),
        "prompt": _report(photo, prompt=""),
        "extra": {**_report(photo), "surprise": 1},
        "caption": _report(photo, caption=7),
    }
    settings = _settings(tmp_path, root, formats='["txt"]')
    with running_daemon(settings) as daemon:
        daemon.api.pause()
        write_unique_png(photo, 60)
        status, reply = _post(
            ControlClient(settings.control.socket), variants.get(body, body) if isinstance(body, str) else body
        )
        assert status == 400 and reply["error"]["code"] == "bad_request"  # type: ignore[index]
        assert says in reply["error"]["message"]  # type: ignore[index]
        assert daemon.store.get(photo) is None or daemon.store.get(photo).caption is None  # type: ignore[union-attr]


def test_captioned_outside_every_root_for_a_missing_image_or_an_unwritten_caption_is_refused(
    tmp_path: Path,
) -> None:
    root = tmp_path / "in"
    root.mkdir()
    settings = _settings(tmp_path, root, formats='["txt"]')
    with running_daemon(settings):
        client = ControlClient(settings.control.socket)
        status, reply = _post(client, _report(tmp_path / "elsewhere" / "photo.png"))
        assert (status, reply["error"]["code"]) == (422, "not_watched")  # type: ignore[index]
        assert "under no watch root" in reply["error"]["message"]  # type: ignore[index]
        status, reply = _post(client, _report(root / "missing.png", sidecar="missing.txt"))
        assert (status, reply["error"]["code"]) == (422, "image_gone")  # type: ignore[index]
        with pytest.raises(RequestRejected, match="no such image"):  # the client's side of it
            client.captioned(CaptionedRequest.model_validate(_report(root / "x.png", sidecar="x.txt")))
        photo = root / "photo.png"
        write_unique_png(photo, 61)
        status, reply = _post(client, _report(photo, sidecar="photo.json"))
        assert (status, reply["error"]["code"]) == (400, "bad_request")  # type: ignore[index]
        assert "sidecar must name the image's .txt file, got 'photo.json'" in reply["error"]["message"]  # type: ignore[index]
        status, reply = _post(client, _report(photo, sidecar=None))  # the root writes photo.txt: name it
        assert (status, reply["error"]["code"]) == (400, "bad_request")  # type: ignore[index]
        # Only a caption that a file of the image holds goes into the journal (and the manifest).
        (root / "photo.txt").write_text("other words\n")
        status, reply = _post(client, _report(photo))
        assert (status, reply["error"]["code"]) == (422, "caption_not_written")  # type: ignore[index]
        (root / "photo.txt").write_text("words\n")
        assert _post(client, _report(photo)) == (200, {"recorded": True})


def test_without_pyexiv2_only_the_files_that_need_it_fail(
    tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    root, elsewhere = tmp_path / "in", tmp_path / "elsewhere"
    root.mkdir()
    elsewhere.mkdir()
    settings = _settings(tmp_path, root, formats='["txt", "xmp"]')
    fake = FakeCaptioner()
    with running_daemon(settings, fake) as daemon:
        daemon.api.pause()
        write_unique_png(root / "a.png", 70)
        write_unique_png(elsewhere / "b.png", 71)
        monkeypatch.setitem(sys.modules, "pyexiv2", None)  # import pyexiv2 fails from here on
        code = _ctl(settings.control.socket, "caption-file", str(root / "a.png"), str(elsewhere / "b.png"))
        assert code == EX_UNAVAILABLE
        err = capsys.readouterr().err
        assert f"{root / 'a.png'}: its xmp caption needs the pyexiv2 package (pip install 'phicapd[metadata]')" in err
        assert not (root / "a.txt").exists() and not (root / "a.xmp").exists()  # no half caption
        assert (elsewhere / "b.txt").exists()
        assert sum(fake.calls.values()) == 1  # no model time for a caption that could not be written


def test_record_captioned_leaves_a_running_job_alone_and_settles_any_other(tmp_path: Path) -> None:
    from phicapd.pipeline.journal import Fingerprint, Journal, NewWork, Success

    store = Journal(tmp_path / "journal.sqlite3")
    root = tmp_path / "in"
    fp = Fingerprint(10, 20, 30)
    record = Success(
        0, "a" * 64, "m@r", "Prompt.", str(root / "a.txt"), fp, backend="native", caption="A.", settings_key="k"
    )
    store.enqueue_many([NewWork(root / "a.png", root, Fingerprint(1, 2, 3)), NewWork(root / "b.png", root, fp)])
    running = store.claim(10)[1]
    store.mark_running([running.id])
    assert store.record_captioned(root / "a.png", root, record, "a") is True
    assert store.record_captioned(root / "b.png", root, record) is False  # on the model now
    assert store.record_captioned(root / "c.png", root, record) is True  # no job yet
    a, b, c = (store.get(root / n) for n in ("a.png", "b.png", "c.png"))
    assert a is not None and (a.state, a.caption, a.settings_key, a.fingerprint) == (State.DONE, "A.", "k", fp)
    assert (a.sha256, a.model, a.backend, a.prompt, a.sidecar) == (
        "a" * 64,
        "m@r",
        "native",
        "Prompt.",
        str(root / "a.txt"),
    )
    assert b is not None and (b.state, b.caption) == (State.RUNNING, None)
    assert c is not None and c.state == State.DONE and c.root == root
    assert store.claims_in(root) == {"a.png": "a"}
    assert [j.path for j in store.captioned(root)] == [root / "a.png", root / "c.png"]
    store.close()


def test_a_caption_only_the_xmp_sidecar_holds_is_recorded_too(tmp_path: Path, capsys) -> None:
    root = tmp_path / "in"
    root.mkdir()
    settings = _settings(tmp_path, root, formats='["txt", "xmp"]')
    photo = root / "photo.png"
    write_unique_png(photo, 80)
    (root / "photo.txt").write_text("my own words\n")  # newer than the image: skip keeps it
    with running_daemon(settings) as daemon:
        daemon.api.pause()
        assert _ctl(settings.control.socket, "caption-file", str(photo)) == 0
        caption = metadata.read_description(root / "photo.xmp")
        assert caption is not None and caption.startswith("A 8x8 test image ")
        job = daemon.store.get(photo)
        assert job is not None and job.state == State.DONE and job.caption == caption
    assert (root / "photo.txt").read_text() == "my own words\n"
    assert capsys.readouterr().err == ""  # recorded: no warning


def test_a_refused_report_is_a_warning_the_caption_stays_written(
    tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    from phicapd.errors import PhicapError

    root = tmp_path / "in"
    root.mkdir()
    settings = _settings(tmp_path, root, formats='["txt"]')
    with running_daemon(settings) as daemon:
        daemon.api.pause()

        def refuse(path: Path, **_: object) -> bool:
            raise PhicapError(f"{path}: no such image to record", code="image_gone")

        monkeypatch.setattr(daemon.api, "captioned", refuse)  # the image went away before the report
        photo = root / "photo.png"
        write_unique_png(photo, 90)
        assert _ctl(settings.control.socket, "caption-file", "--json", str(photo)) == 0
    out, err = capsys.readouterr()
    assert (root / "photo.txt").exists()
    assert f"{photo}: captioned, but the daemon did not record it" in err and "no such image to record" in err
    assert json.loads(out.splitlines()[-1])["warning"].startswith(f"{photo}: captioned, but")


@pytest.mark.parametrize("formats", [["xmp"], ["embed"], ["embed", "jsonl"], ["jsonl"], ["json", "xmp"]])
def test_any_combination_of_formats_is_written_once_and_tracked(tmp_path: Path, capsys, formats: list[str]) -> None:
    root = tmp_path / "in"
    root.mkdir()
    settings = _settings(tmp_path, root, formats=json.dumps(formats))
    fake = FakeCaptioner()
    with running_daemon(settings, fake) as daemon:
        daemon.api.pause()
        photo = root / "photo.png"
        write_unique_png(photo, 100)
        assert _ctl(settings.control.socket, "caption-file", "--json", str(photo)) == 0
        outcome = json.loads(capsys.readouterr().out.splitlines()[-1])
        caption = outcome["caption"]
        held = {
            "xmp": metadata.read_description(root / "photo.xmp"),
            "embed": _embedded(photo),
            "json": json.loads((root / "photo.json").read_text())["caption"]
            if (root / "photo.json").exists()
            else None,
        }
        assert {k for k, v in held.items() if v is not None} == set(formats) - {"jsonl"}
        assert all(v == caption for v in held.values() if v is not None)
        assert not (root / "photo.txt").exists()
        if "jsonl" in formats:
            wait_for(lambda: read_manifest(root) == {"photo.png": caption}, 10, "the daemon's manifest")
        job = daemon.store.get(photo)
        assert job is not None and job.state == State.DONE and job.caption == caption
        assert job.formats == frozenset(formats) and outcome["sidecar"] == job.sidecar
        # Every output there: a second run sends nothing, and neither the watcher nor a scan redoes it.
        assert _ctl(settings.control.socket, "caption-file", "--json", str(photo)) == 0
        assert json.loads(capsys.readouterr().out.splitlines()[-1])["state"] == "skipped"
        daemon.api.resume()
        daemon.api.rescan()
        wait_for(lambda: is_settled(daemon), 30, "the watcher and the rescan")
        assert sum(fake.calls.values()) == 1
        assert ControlClient(settings.control.socket).stale().model_dump() == {"stale": [], "edited": []}
