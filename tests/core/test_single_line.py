"""Per-root ``single_line``: every output of such a root holds its caption on one line (kohya-style
datasets), other roots keep the model's lines, phicapctl caption-file honours it, and turning it
on re-forms existing captions from the journal with no model call (turning it off cannot: those
go back to the model). Real daemon, a fake model whose captions span lines."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import pytest

from phicapd.caption_form import one_line, root_form
from phicapd.captioner import Caption, CaptionRequest
from phicapd.cli import ctl
from phicapd.config import WatchRoot
from phicapd.control.client import ControlClient
from tests.support.daemon import is_settled, running_daemon, settings_for, wait_for
from tests.support.fakes import FakeCaptioner, write_unique_png


class LinesCaptioner(FakeCaptioner):
    """The fake model, answering in two paragraphs."""

    def caption(self, batch: Sequence[CaptionRequest]) -> list[Caption]:
        return [
            replace(c, text=c.text.replace(" test image ", " test image.\n\nIts key is "))
            for c in super().caption(batch)
        ]


def _calls(fake: FakeCaptioner) -> int:
    return sum(fake.calls.values())


def test_one_line_joins_every_kind_of_line_break_and_drops_blank_lines() -> None:
    assert one_line("A cat.\n\nOn a mat.\r\nAsleep.\u2028Done. ") == "A cat. On a mat. Asleep. Done."
    assert one_line("one line") == "one line"
    root = WatchRoot(path=Path("/r"), prefix="sks, \n", suffix="\n#tag", single_line=True)
    assert root_form("A cat.\n\nOn a mat.", root) == "sks, A cat. On a mat. #tag"
    assert root_form("A cat.\n\nOn a mat.", root.model_copy(update={"single_line": False})) == (
        "sks, \nA cat.\n\nOn a mat.\n#tag"
    )


def _roots(tmp_path: Path) -> tuple[Path, Path]:
    flat, lined = tmp_path / "dataset", tmp_path / "photos"
    for root in (flat, lined):
        root.mkdir()
    for i in range(2):
        write_unique_png(flat / f"d{i}.png", i)
        write_unique_png(lined / f"p{i}.png", 10 + i)
    return flat, lined


def test_a_single_line_root_writes_one_line_everywhere_and_others_keep_the_lines(tmp_path: Path) -> None:
    flat, lined = _roots(tmp_path)
    extra = (
        f'[[watch]]\npath = "{flat}"\nsingle_line = true\nprefix = "sks\\n"\nformats = ["txt", "json", "jsonl"]\n'
        f'[[watch]]\npath = "{lined}"\nformats = ["txt", "json"]\n'
    )
    fake = LinesCaptioner()
    with running_daemon(settings_for(tmp_path, [], extra=extra), fake) as daemon:
        wait_for(lambda: is_settled(daemon) and daemon.store.counts()["done"] == 4, 30, "four captions")
        journal = {job.path.name: job.caption for job in daemon.store.captioned(flat, None)}
    for i in range(2):
        text = (flat / f"d{i}.txt").read_text().rstrip("\n")
        assert "\n" not in text and text.startswith("sks A 8x8 test image. Its key is ")
        assert json.loads((flat / f"d{i}.json").read_text())["caption"] == text
        assert journal[f"d{i}.png"] == text  # the journal holds what was written
        assert "\n\nIts key is " in (lined / f"p{i}.txt").read_text()
    manifest = [json.loads(line) for line in (flat / "metadata.jsonl").read_text().splitlines()]
    assert [e["text"] for e in manifest] == [(flat / f"d{i}.txt").read_text().rstrip("\n") for i in range(2)]


def test_phicapctl_caption_file_under_a_single_line_root_writes_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "dataset"
    root.mkdir()
    extra = f'[[watch]]\npath = "{root}"\nsingle_line = true\n'
    with running_daemon(settings_for(tmp_path, [], extra=extra), LinesCaptioner()) as daemon:
        wait_for(lambda: is_settled(daemon), 30, "the start-up scan")
        outside = tmp_path / "loose"
        outside.mkdir()
        write_unique_png(root / "late.png", 5)
        write_unique_png(outside / "loose.png", 6)
        sock = str(tmp_path / "ctl.sock")
        assert ctl.main(["--socket", sock, "caption-file", str(root / "late.png")]) == 0
        assert ctl.main(["--socket", sock, "caption-dir", str(outside)]) == 0
        capsys.readouterr()
    text = (root / "late.txt").read_text()
    assert text.count("\n") == 1 and "test image. Its key is " in text
    assert "\n\nIts key is " in (outside / "loose.txt").read_text()  # under no root: the model's lines


def _flip_config(tmp_path: Path, root: Path, single_line: bool, restale: str) -> str:
    return (
        f'[[watch]]\npath = "{root}"\nformats = ["txt", "json"]\nrestale = "{restale}"\n'
        f"single_line = {str(single_line).lower()}\n"
    )


def test_turning_single_line_on_reforms_captions_from_the_journal_without_the_model(tmp_path: Path) -> None:
    root = tmp_path / "photos"
    root.mkdir()
    for i in range(3):
        write_unique_png(root / f"p{i}.png", i)
    fake = LinesCaptioner()
    with running_daemon(settings_for(tmp_path, [], extra=_flip_config(tmp_path, root, False, "manual")), fake) as d:
        wait_for(lambda: is_settled(d) and d.store.counts()["done"] == 3, 30, "three captions")
    assert _calls(fake) == 3
    before = (root / "p0.txt").read_text()
    assert "\n\n" in before
    (root / "p2.txt").write_text("my own\nwords\n")  # a hand edit is never re-formed
    with running_daemon(settings_for(tmp_path, [], extra=_flip_config(tmp_path, root, True, "manual")), fake) as d:
        wait_for(lambda: is_settled(d), 30, "the start-up scan")
        client = ControlClient(tmp_path / "ctl.sock", timeout=10)
        report = client.stale()
        assert sorted(e.path for e in report.stale) == [str(root / "p0.png"), str(root / "p1.png")]
        assert [e.path for e in report.edited] == [str(root / "p2.png")]
        assert client.recaption_stale(str(root)).requeued == 2
        wait_for(lambda: is_settled(d) and client.stale().stale == [], 30, "the re-forms")
    assert _calls(fake) == 3  # no model call
    assert (root / "p0.txt").read_text() == one_line(before) + "\n"
    assert json.loads((root / "p1.json").read_text())["caption"] == (root / "p1.txt").read_text().rstrip("\n")
    assert "\n" not in (root / "p1.txt").read_text().rstrip("\n")
    assert (root / "p2.txt").read_text() == "my own\nwords\n"


def test_restale_auto_reforms_at_start_and_turning_single_line_off_goes_back_to_the_model(tmp_path: Path) -> None:
    root = tmp_path / "photos"
    root.mkdir()
    for i in range(2):
        write_unique_png(root / f"p{i}.png", i)
    fake = LinesCaptioner()
    for single_line, calls in ((False, 2), (True, 2), (False, 4)):
        extra = _flip_config(tmp_path, root, single_line, "auto")
        with running_daemon(settings_for(tmp_path, [], extra=extra), fake) as d:
            wait_for(
                lambda d=d, calls=calls: (
                    is_settled(d)
                    and _calls(fake) == calls
                    and ControlClient(d.settings.control.socket).stale().stale == []
                ),
                30,
                f"single_line = {single_line}",
            )
        text = (root / "p0.txt").read_text().rstrip("\n")
        assert ("\n\nIts key is " in text) is not single_line, text
    assert _calls(fake) == 4
