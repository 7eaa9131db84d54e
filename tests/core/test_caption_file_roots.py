"""phicapctl caption-file under a watched root: the root's prompt, prefix and suffix apply, and the
sidecar is byte for byte the one the watcher writes. Real daemon, fake model that records prompts."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from phicapd.captioner import Caption, CaptionRequest
from phicapd.cli.ctl import main
from phicapd.config import WatchRoot
from phicapd.pipeline.paths import owning_root
from tests.support.daemon import running_daemon, settings_for, wait_for
from tests.support.fakes import FakeCaptioner, image_key, write_unique_png

MODEL_PROMPT = "Model prompt."


class PromptRecorder(FakeCaptioner):
    """The fake model, remembering the prompts each image was captioned with."""

    def __init__(self) -> None:
        super().__init__()
        self.prompts: dict[str, list[str]] = {}

    def caption(self, batch: Sequence[CaptionRequest]) -> list[Caption]:
        for request in batch:
            self.prompts.setdefault(image_key(request.image), []).append(request.prompt)
        return super().caption(batch)


def _config(roots: list[tuple[Path, str]]) -> str:
    """[model] prompt plus one [[watch]] table per (path, extra TOML lines)."""
    text = f'[model]\nprompt = "{MODEL_PROMPT}"\n'
    for path, lines in roots:
        text += f'[[watch]]\npath = "{path}"\n{lines}\n'
    return text


def _ctl(socket: Path, *args: str) -> int:
    return main(["--socket", str(socket), "caption-file", *args])


def _json_line(out: str) -> dict[str, object]:
    (line,) = out.splitlines()
    return json.loads(line)


def test_file_under_a_root_gets_its_prompt_and_the_watchers_exact_sidecar(tmp_path: Path, capsys) -> None:
    root = tmp_path / "in"
    root.mkdir()
    settings = settings_for(
        tmp_path, [], extra=_config([(root, 'prompt = "Root prompt."\nprefix = "PRE: "\nsuffix = " #cat"')])
    )
    fake = PromptRecorder()
    with running_daemon(settings, fake):
        photo = root / "photo.png"
        key = write_unique_png(photo, 1)
        sidecar = root / "photo.txt"
        wait_for(sidecar.exists, 30, "the watcher's sidecar")
        by_watcher = sidecar.read_bytes()
        sidecar.unlink()

        assert _ctl(settings.control.socket, str(photo)) == 0

        printed = capsys.readouterr().out
        by_ctl = sidecar.read_bytes()
    assert by_watcher.startswith(b"PRE: A 8x8 test image") and by_watcher.endswith(b" #cat\n")
    assert by_ctl == by_watcher
    assert printed.encode() == by_watcher  # what is printed is what the sidecar holds
    assert fake.prompts[key] == ["Root prompt.", "Root prompt."]


def test_file_outside_every_root_is_undecorated(tmp_path: Path, capsys) -> None:
    root, elsewhere = tmp_path / "in", tmp_path / "elsewhere"
    root.mkdir()
    elsewhere.mkdir()
    settings = settings_for(tmp_path, [], extra=_config([(root, 'prompt = "Root prompt."\nprefix = "PRE: "')]))
    fake = PromptRecorder()
    with running_daemon(settings, fake):
        # A sibling whose name merely starts with the root's: not under it.
        near = tmp_path / "in-not" / "a.png"
        near.parent.mkdir()
        keys = [write_unique_png(elsewhere / "a.png", 2), write_unique_png(near, 3)]
        for photo in (elsewhere / "a.png", near):
            assert _ctl(settings.control.socket, "--json", str(photo)) == 0
            reply = _json_line(capsys.readouterr().out)
            assert reply["root"] is None
            assert photo.with_suffix(".txt").read_text() == f"{reply['caption']}\n"
            assert str(reply["caption"]).startswith("A 8x8 test image")
    assert [fake.prompts[k] for k in keys] == [[MODEL_PROMPT], [MODEL_PROMPT]]


def test_explicit_prompt_overrides_the_root_prompt_but_not_its_decoration(tmp_path: Path, capsys) -> None:
    root = tmp_path / "in"
    root.mkdir()
    settings = settings_for(
        tmp_path, [], extra=_config([(root, 'prompt = "Root prompt."\nprefix = "PRE: "\nsuffix = "!"')])
    )
    fake = PromptRecorder()
    with running_daemon(settings, fake) as daemon:
        daemon.api.pause()  # keep the watcher's own caption of the file out of the picture
        photo = root / "photo.png"
        key = write_unique_png(photo, 4)
        assert _ctl(settings.control.socket, "--prompt", "Alt text, please.", "--json", str(photo)) == 0
        reply = _json_line(capsys.readouterr().out)
    assert fake.prompts[key] == ["Alt text, please."]
    assert reply["root"] == str(root)
    assert str(reply["caption"]).startswith("PRE: A 8x8 ") and str(reply["caption"]).endswith("!")
    assert (root / "photo.txt").read_text() == f"{reply['caption']}\n"


def test_nested_roots_pick_the_deepest_and_symlinked_directories_count(tmp_path: Path, capsys) -> None:
    outer = tmp_path / "in"
    inner = outer / "sub"
    (outer / "other").mkdir(parents=True)
    inner.mkdir()
    settings = settings_for(
        tmp_path,
        [],
        extra=_config(
            [
                (outer, 'prompt = "Outer."\nprefix = "OUT: "'),
                (inner, 'prompt = "Inner."\nprefix = "IN: "'),
            ]
        ),
    )
    link = tmp_path / "link"
    link.symlink_to(inner, target_is_directory=True)
    fake = PromptRecorder()
    expected = {
        inner / "a.png": ("Inner.", "IN: ", inner),
        outer / "other" / "b.png": ("Outer.", "OUT: ", outer),
        outer / "c.png": ("Outer.", "OUT: ", outer),
        link / "d.png": ("Inner.", "IN: ", inner),  # read through a symlinked directory
    }
    with running_daemon(settings, fake) as daemon:
        daemon.api.pause()
        for i, (photo, (prompt, prefix, root)) in enumerate(expected.items()):
            key = write_unique_png(photo, 10 + i)
            assert _ctl(settings.control.socket, "--stdout", "--json", str(photo)) == 0
            reply = _json_line(capsys.readouterr().out)
            assert (reply["root"], fake.prompts[key]) == (str(root), [prompt]), photo
            assert str(reply["caption"]).startswith(prefix + "A 8x8 "), photo


# -- owning_root on its own: which root's configuration a path gets -------------------------------


def test_owning_root_rules(tmp_path: Path) -> None:
    outer = WatchRoot(path=tmp_path / "a")
    inner = WatchRoot(path=tmp_path / "a" / "b")
    flat = WatchRoot(path=tmp_path / "flat", recursive=False)
    roots = [inner, outer, flat]  # config order must not matter
    assert owning_root(tmp_path / "a" / "x.jpg", roots) is outer
    assert owning_root(tmp_path / "a" / "b" / "c" / "x.jpg", roots) is inner
    assert owning_root(tmp_path / "a" / "b" / "c" / "x.jpg", [outer, inner]) is inner
    assert owning_root(tmp_path / "a" / "bb" / "x.jpg", roots) is outer
    assert owning_root(tmp_path / "ab" / "x.jpg", roots) is None
    assert owning_root(tmp_path / "flat" / "x.jpg", roots) is flat
    assert owning_root(tmp_path / "flat" / "sub" / "x.jpg", roots) is None  # not watched there
    assert owning_root(tmp_path / "a" / ".hidden" / "x.jpg", roots) is None  # nor there
    assert owning_root(tmp_path / "a" / "b" / ".hidden" / "x.jpg", [outer, inner]) is None
    assert owning_root(tmp_path / "x.jpg", roots) is None


def test_owning_root_matches_a_symlinked_root_by_its_target(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "alias").symlink_to(real, target_is_directory=True)
    root = WatchRoot(path=tmp_path / "alias")
    # phicapctl sends the resolved directory; the configured spelling matches as well.
    assert owning_root(real / "x.jpg", [root]) is root
    assert owning_root(tmp_path / "alias" / "x.jpg", [root]) is root


def test_owning_root_survives_a_symlink_loop(tmp_path: Path) -> None:
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    assert owning_root(tmp_path / "x.jpg", [WatchRoot(path=loop)]) is None
