"""A blank caption from the model is a failure (``caption_empty``), never a sidecar (issue 13, item 3)."""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import pytest
from PIL import Image

from phicapd.captioner import Caption, CaptionRequest
from phicapd.control.client import ControlClient, RequestFailed
from phicapd.pipeline.journal import State
from tests.core.test_daemon_socket import _ImageServer
from tests.support.daemon import running_daemon, settings_for, wait_for
from tests.support.fakes import FakeCaptioner, StreamingFakeCaptioner, image_key, unique_image, write_unique_png

MAX_ATTEMPTS = 3


class _Blank:
    """Answers ``text`` (empty or whitespace) for the images in ``blank_keys``; the fake's caption otherwise."""

    blank_keys: set[str]
    text: str

    def caption(self, batch: Sequence[CaptionRequest]) -> list[Caption]:
        out = super().caption(batch)  # type: ignore[misc]
        return [
            Caption(self.text, 1) if image_key(r.image) in self.blank_keys else c
            for r, c in zip(batch, out, strict=True)
        ]


class BlankFake(_Blank, FakeCaptioner):
    pass


class BlankStreamingFake(_Blank, StreamingFakeCaptioner):
    pass


def blank_captioner(kind: type[_Blank], text: str, keys: set[str]) -> _Blank:
    fake = kind(steps=2) if kind is BlankStreamingFake else kind()  # type: ignore[call-arg]
    fake.text, fake.blank_keys = text, keys
    return fake


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("kind", [BlankFake, BlankStreamingFake])
@pytest.mark.parametrize("text", ["", "  \n", "\x00\x1b\x07\x08 "])  # the last: blank once cleaned
def test_a_blank_caption_is_retried_then_parked_and_never_a_sidecar(
    tmp_path: Path, kind: type[_Blank], text: str
) -> None:
    root = tmp_path / "in"
    root.mkdir()
    blank_key = write_unique_png(root / "blank.png", 1)
    write_unique_png(root / "fine.png", 2)
    fake = blank_captioner(kind, text, {blank_key})
    settings = settings_for(tmp_path, [root])
    assert settings.scheduler.max_attempts == MAX_ATTEMPTS  # the default; back-off 0.2 s in tests
    with running_daemon(settings, fake) as daemon:

        def parked() -> bool:
            job = daemon.store.get(root / "blank.png")
            return job is not None and job.state is State.FAILED

        wait_for(parked, 20, "the blank image to be parked")
        # Under load the other image's decode worker may start later than three quick attempts.
        wait_for((root / "fine.txt").exists, 20, "the other image's caption")
        job = daemon.store.get(root / "blank.png")
        failures = ControlClient(settings.control.socket, timeout=10).failures()
    assert job is not None and job.error_code == "caption_empty" and job.attempts == MAX_ATTEMPTS
    assert fake.calls[blank_key] == MAX_ATTEMPTS  # type: ignore[attr-defined]
    assert not (root / "blank.txt").exists() and not (root / "blank.png.txt").exists()
    assert (root / "fine.txt").read_text().startswith("A 8x8 ")
    (listed,) = failures
    assert listed["path"] == str(root / "blank.png") and listed["code"] == "caption_empty"
    assert listed["state"] == "failed"


@pytest.mark.parametrize("text", ["", " \n\t"])
def test_a_blank_caption_over_the_socket_is_a_retryable_error(tmp_path: Path, text: str) -> None:
    image = unique_image(3, (24, 16))
    server = _ImageServer(_png(image))
    root = tmp_path / "in"
    root.mkdir()
    # A root's prefix/suffix would make the reply non-blank: the model's text is what must not be.
    extra = 'prefix = "Photo: "\n[fetch]\nallow_networks = ["127.0.0.1/32"]\n'  # the prefix is the root's
    settings = settings_for(tmp_path, [root], extra=extra)
    assert settings.watch[0].prefix == "Photo: "
    try:
        with running_daemon(settings, blank_captioner(BlankFake, text, {image_key(image)})):
            client = ControlClient(settings.control.socket, timeout=30)
            with pytest.raises(RequestFailed) as upload:
                client.caption_bytes(_png(image), name="blank.png", path=str(root / "blank.png"))
            with pytest.raises(RequestFailed) as fetched:
                client.caption_url(server.url)
            ok = client.caption_bytes(_png(unique_image(4, (24, 16))), name="fine.png")
    finally:
        server.close()
    for err in (upload.value, fetched.value):
        assert err.code == "caption_empty" and err.retryable
        assert err.status == 503  # type: ignore[attr-defined]
    assert ok.caption.startswith("A 24x16 ")
