"""What a server answers is checked before it is stored (issue 18, item 5): a reply larger than
``max_tokens`` allows is refused unread, and control characters never reach any output."""

from __future__ import annotations

import io
import time
from pathlib import Path

import pytest

from phicapd.captioner import CaptionRequest
from phicapd.config import Settings
from phicapd.errors import PhicapError
from phicapd.outputs.formats.jsonl import read_manifest
from phicapd.outputs.root import RootOutputs
from phicapd.pipeline.journal import State
from phicapd.remote.captioner import load_remote_captioner
from phicapd.service import load_model_captioner
from tests.support.daemon import is_settled, running_daemon, settings_for, wait_for
from tests.support.fakes import image_key, unique_image, write_unique_png
from tests.support.openai_server import FakeVLLM

#: A caption as a broken or hostile server may send it: NUL, BEL, BS, ESC, a CRLF, a tab.
RAW = "A cat\x00 on\x07 a mat\x08.\x1b\r\nA second\t line.  "
CLEAN = "A cat on a mat.\nA second line."


def _server(servers: list[FakeVLLM], **kw: object) -> FakeVLLM:
    kw.setdefault("trust_request_mm_kwargs", True)  # every request as phicapd first sends it
    s = FakeVLLM(**kw).start()  # type: ignore[arg-type]
    servers.append(s)
    return s


def _remote(url: str, formats: str, max_new_tokens: int = 8) -> str:
    return (
        f'[model]\nbackend = "openai"\nmax_new_tokens = {max_new_tokens}\n'
        f'[remote]\nendpoints = ["{url}"]\nimage_format = "png"\nprobe_interval_seconds = 30\n'
        f"[sidecar]\nformats = {formats}\n"
    )


def test_a_20_mib_caption_is_refused_and_nothing_huge_is_written(tmp_path: Path, servers: list[FakeVLLM]) -> None:
    s = _server(servers)
    root = tmp_path / "inbox"
    root.mkdir()
    settings = settings_for(tmp_path, [root], extra=_remote(s.url, '["txt", "json", "xmp", "jsonl"]', 4))
    with running_daemon(settings, factory=load_model_captioner) as daemon:
        huge = write_unique_png(root / "huge.png", 1)
        s.for_image(huge, "huge")  # 20 MiB of caption, though max_tokens = 4
        counted = write_unique_png(root / "counted.png", 2)
        s.captions[counted] = ("A cat.", 50)  # short, but 50 tokens where 4 were asked for
        fine = write_unique_png(root / "fine.png", 3)
        s.captions[fine] = ("A small cat.", 4)
        wait_for(lambda: is_settled(daemon) and (root / "fine.txt").exists(), 20, "the backlog to settle")
        jobs = {name: daemon.store.get(root / f"{name}.png") for name in ("huge", "counted")}
        endpoint = daemon.api.status()["model"]["endpoints"][0]
    for job in jobs.values():
        assert job is not None and job.state is State.FAILED and job.error_code == "caption_too_long"
        assert job.attempts == settings.scheduler.max_attempts
    assert s.answered[huge] == settings.scheduler.max_attempts  # refused each time, from its Content-Length
    written = {p.name: p.stat().st_size for p in root.iterdir() if p.suffix != ".png"}
    assert set(written) == {"fine.txt", "fine.json", "fine.xmp", "metadata.jsonl"}
    assert sum(written.values()) < 64 * 1024
    assert read_manifest(root) == {"fine.png": "A small cat."}
    assert endpoint["up"] and endpoint["errors_by_kind"] == {"too_long": settings.scheduler.max_attempts}


def test_an_endless_reply_is_refused_at_its_byte_cap(servers: list[FakeVLLM]) -> None:
    s = _server(servers)
    settings = Settings(model={"backend": "openai"}, remote={"endpoints": [s.url], "image_format": "png"})
    c = load_remote_captioner(settings)
    try:
        request = CaptionRequest(unique_image(1, (16, 12)), "Describe it.", 40)
        s.for_image(image_key(request.image), "endless")
        started = time.monotonic()
        with pytest.raises(PhicapError) as info:
            c.caption([request])
        assert time.monotonic() - started < 5
        assert info.value.code == "caption_too_long" and "bytes" in str(info.value)
        assert c.pool.endpoints[0].up
    finally:
        c.close()


def test_control_characters_are_cleaned_once_and_every_output_holds_the_same_text(
    tmp_path: Path, servers: list[FakeVLLM]
) -> None:
    s = _server(servers)
    root = tmp_path / "inbox"
    root.mkdir()
    formats = '["txt", "json", "xmp", "jsonl", "embed"]'
    settings = settings_for(tmp_path, [root], extra=_remote(s.url, formats, 40))
    with running_daemon(settings, factory=load_model_captioner) as daemon:
        key = write_unique_png(root / "cat.png", 1)
        s.captions[key] = (RAW, 12)
        wait_for(lambda: is_settled(daemon) and (root / "cat.json").exists(), 20, "the outputs")
        png = io.BytesIO()
        unique_image(1).save(png, format="PNG")
        reply = daemon.api.caption_bytes(png.getvalue(), name="cat.png", prompt=None, max_new_tokens=None, timeout=10)
        outputs = RootOutputs.of(settings, settings.watch[0])
        held = outputs.held(root / "cat.png", "cat")  # the daemon's own readers (XMP through exiv2)
        embedded = outputs.embedded(root / "cat.png")
        job = daemon.store.get(root / "cat.png")
    assert held == {"txt": CLEAN, "json": CLEAN, "xmp": CLEAN}
    assert embedded == CLEAN
    assert read_manifest(root) == {"cat.png": CLEAN}
    assert job is not None and job.caption == CLEAN
    assert reply.text == CLEAN
    assert (root / "cat.txt").read_bytes() == (CLEAN + "\n").encode()
