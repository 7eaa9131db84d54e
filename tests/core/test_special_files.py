"""Only regular files, bounded (issue 18, items 2 and 3): a named pipe, a device or a symbolic
link beside an image is refused with a code, never a blocked thread, an endless read or a
followed link; SIGTERM stops the daemon whatever thread is stuck.

A test that would block or read without end on the code before the fix runs the blocking part in
a daemon thread with a deadline (and releases a reader blocked on a pipe at teardown), or runs a
daemon process under a memory cap (``resource.setrlimit`` in the child).
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from phicapd.control.client import ControlClient
from phicapd.errors import SIDECAR_NOT_REGULAR, SIDECAR_TOO_LARGE
from phicapd.outputs import metadata, safe_files
from phicapd.outputs.formats.jsonl import Manifest, read_manifest, update_manifest
from tests.support.daemon import REPO, running_daemon, settings_for, socket_ready, spawn_fake_daemon, wait_for
from tests.support.daemon import write_config as daemon_config
from tests.support.fakes import FakeCaptioner, write_unique_png

# A packet with a property of another tool's and no description: the writer wants to merge into it.
RATED_PACKET = (
    '<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?>\n'
    '<x:xmpmeta xmlns:x="adobe:ns:meta/">\n'
    ' <rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">\n'
    '  <rdf:Description rdf:about="" xmlns:xmp="http://ns.adobe.com/xap/1.0/" xmp:Rating="3"/>\n'
    " </rdf:RDF>\n"
    "</x:xmpmeta>\n"
    '<?xpacket end="w"?>\n'
)


@pytest.fixture
def fifos() -> Iterator[Callable[[Path], Path]]:
    """Make named pipes; at teardown each is opened for writing once, which releases a reader
    blocked in ``open()`` on it (the code before the fix), so no test thread stays stuck."""
    made: list[Path] = []

    def make(path: Path) -> Path:
        os.mkfifo(path)
        made.append(path)
        return path

    yield make
    for path in made:
        with contextlib.suppress(OSError):  # ENXIO: no reader waits on it
            os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))


def within(seconds: float, fn: Callable[[], Any]) -> Any:
    """``fn()``'s result (or exception), failing the test if it takes over ``seconds``."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = fn()
        except BaseException as e:  # re-raised in the test's thread
            box["error"] = e

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still blocked after {seconds} s"
    if "error" in box:
        raise box["error"]
    return box["value"]


# -- the primitives --------------------------------------------------------------------------


def test_reads_refuse_a_pipe_a_device_a_directory_and_an_oversized_file_at_once(tmp_path: Path, fifos) -> None:
    pipe = fifos(tmp_path / "photo.txt")
    zero = tmp_path / "zero.txt"
    zero.symlink_to("/dev/zero")
    big = tmp_path / "big.txt"
    with big.open("wb") as fh:
        fh.truncate(safe_files.TEXT_MAX_BYTES + 1)  # sparse: refused by its size, unread
    for path, kind in ((pipe, "a named pipe"), (zero, "a character device"), (tmp_path, "a directory")):
        with pytest.raises(safe_files.RefusedFile) as refused:
            within(5, lambda p=path: safe_files.read_text(p, safe_files.TEXT_MAX_BYTES))
        assert refused.value.code == SIDECAR_NOT_REGULAR
        assert str(refused.value) == f"{path}: {kind}, not a regular file"
    with pytest.raises(safe_files.RefusedFile) as refused:
        safe_files.read_bytes(big, safe_files.TEXT_MAX_BYTES)
    assert refused.value.code == SIDECAR_TOO_LARGE
    # A link to a regular file is read (a symlinked image is captioned like a file) ...
    (tmp_path / "real.txt").write_text("a caption\n")
    (tmp_path / "link.txt").symlink_to(tmp_path / "real.txt")
    assert safe_files.read_text(tmp_path / "link.txt", safe_files.TEXT_MAX_BYTES) == "a caption\n"
    # ... but never where what is read is to be replaced.
    with pytest.raises(safe_files.RefusedFile, match="a symbolic link, not a regular file"):
        safe_files.read_bytes(tmp_path / "link.txt", safe_files.TEXT_MAX_BYTES, follow=False)
    with pytest.raises(safe_files.RefusedFile, match="a symbolic link"):
        safe_files.check_replaceable(tmp_path / "link.txt")
    safe_files.check_replaceable(tmp_path / "real.txt")
    safe_files.check_replaceable(tmp_path / "missing.txt")


def test_a_read_stops_at_the_cap_when_the_file_grows_after_its_fstat(tmp_path: Path) -> None:
    path = tmp_path / "growing.txt"
    path.write_bytes(b"x" * 10)
    fd, st = safe_files.open_regular(path, 100)
    try:
        assert st.st_size == 10
        with path.open("ab") as fh:
            fh.write(b"y" * 200)  # grows past the cap after the check
        with pytest.raises(safe_files.RefusedFile) as refused:
            safe_files.read_fd(fd, path, 100)
        assert refused.value.code == SIDECAR_TOO_LARGE
    finally:
        os.close(fd)


# -- the manifest, the XMP sidecar and the image's own metadata ---------------------------


def test_a_pipe_as_manifest_lists_nobody_and_is_never_replaced(tmp_path: Path, fifos) -> None:
    fifos(tmp_path / "metadata.jsonl")
    write_unique_png(tmp_path / "a.png", 1)
    with pytest.raises(safe_files.RefusedFile) as refused:
        within(5, lambda: read_manifest(tmp_path))
    assert refused.value.code == SIDECAR_NOT_REGULAR
    assert within(5, lambda: Manifest.read(tmp_path)).names == frozenset()
    with pytest.raises(safe_files.RefusedFile):
        within(5, lambda: update_manifest(tmp_path, {"a.png": "a caption"}))
    assert (tmp_path / "metadata.jsonl").is_fifo()


def test_a_manifest_over_its_cap_is_refused_unread(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png", "text": "x" * 200}) + "\n")
    monkeypatch.setattr(safe_files, "MANIFEST_MAX_BYTES", 100)
    with pytest.raises(safe_files.RefusedFile) as refused:
        read_manifest(tmp_path)
    assert refused.value.code == SIDECAR_TOO_LARGE


def test_the_xmp_writer_refuses_a_symlinked_xmp_and_its_target_stays_untouched(tmp_path: Path) -> None:
    pytest.importorskip("pyexiv2")
    outside = tmp_path / "outside" / "other.xmp"
    outside.parent.mkdir()
    outside.write_text(RATED_PACKET)
    before = outside.read_bytes()
    tree = tmp_path / "tree"
    tree.mkdir()
    link = tree / "photo.xmp"
    link.symlink_to(outside)
    dangling = tree / "gone.xmp"
    dangling.symlink_to(tmp_path / "outside" / "missing.xmp")
    for path in (link, dangling):
        with pytest.raises(safe_files.RefusedFile) as refused:
            metadata.write_xmp_sidecar(path, "a caption")
        assert refused.value.code == SIDECAR_NOT_REGULAR
        assert path.is_symlink()
    assert outside.read_bytes() == before
    assert not (tmp_path / "outside" / "missing.xmp").exists()
    assert sorted(p.name for p in tree.iterdir()) == ["gone.xmp", "photo.xmp"]  # no temp file left


def test_the_exiv2_worker_is_never_handed_a_pipe_or_a_device(tmp_path: Path, fifos) -> None:
    pytest.importorskip("pyexiv2")
    pipe = fifos(tmp_path / "photo.xmp")
    zero = tmp_path / "zero.xmp"
    zero.symlink_to("/dev/zero")
    started = metadata._supervisor.started
    for path in (pipe, zero):
        # Before: the worker blocked in open() on the pipe until its 30 s timeout killed it.
        assert within(5, lambda p=path: metadata.read_description(p)) is None
    assert metadata._supervisor.started - started <= 1  # no worker was killed and replaced
    with pytest.raises(safe_files.RefusedFile):
        within(5, lambda: metadata.write_xmp_sidecar(pipe, "a caption"))
    assert pipe.is_fifo()


def test_a_caption_is_not_embedded_through_a_symlinked_image(tmp_path: Path) -> None:
    pytest.importorskip("pyexiv2")
    from PIL import Image

    target = tmp_path / "elsewhere" / "photo.jpg"
    target.parent.mkdir()
    Image.new("RGB", (8, 8)).save(target)
    before = target.read_bytes()
    link = tmp_path / "photo.jpg"
    link.symlink_to(target)
    with pytest.raises(safe_files.RefusedFile, match="a symbolic link"):
        metadata.embed_caption(link, "a caption")
    assert link.is_symlink() and target.read_bytes() == before


# -- the daemon ----------------------------------------------------------------------------


def _spawn_capped(config: Path, tmp_path: Path, data_bytes: int) -> subprocess.Popen[bytes]:
    """The fake daemon with its data segment capped: an endless read fails fast instead of
    taking the machine's memory (what the code before the fix did on ``/dev/zero``)."""

    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_DATA, (data_bytes, data_bytes))

    env = {**os.environ, "PYTHONPATH": str(REPO), "FAKE_RECORD": str(tmp_path / "calls.log")}
    with (tmp_path / "daemon.log").open("ab") as sink:
        return subprocess.Popen(
            [sys.executable, "-m", "tests.support.fake_daemon", str(config)],
            cwd=REPO,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=sink,
            preexec_fn=cap,
        )


def _stopped_by_sigterm(proc: subprocess.Popen[bytes], log: Path, within_seconds: float) -> float:
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    try:
        rc = proc.wait(within_seconds)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"SIGTERM did not stop the daemon within {within_seconds} s") from None
    assert rc == 0, log.read_text()[-3000:]
    return time.monotonic() - started


def test_a_root_of_special_files_captions_every_image_and_blocks_nothing(tmp_path: Path, fifos) -> None:
    """The acceptance test of issue 18: a pipe as ``metadata.jsonl``, a ``.txt`` linked to
    ``/dev/zero`` and an ``.xmp`` linked outside the tree, beside 10 images."""
    pytest.importorskip("pyexiv2")
    root, other = tmp_path / "special", tmp_path / "plain"
    root.mkdir()
    other.mkdir()
    outside = tmp_path / "outside" / "theirs.xmp"
    outside.parent.mkdir()
    outside.write_text(RATED_PACKET)
    outside_bytes = outside.read_bytes()
    for i in range(10):
        write_unique_png(root / f"img{i:02d}.png", i)
    fifos(root / "metadata.jsonl")
    (root / "img03.txt").symlink_to("/dev/zero")
    (root / "img05.xmp").symlink_to(outside)
    # The extra lines land in the last [[watch]] table: the special root's.
    config = daemon_config(tmp_path, [other, root], extra='formats = ["txt", "json", "xmp", "jsonl"]\n', settle=0.2)
    log = tmp_path / "daemon.log"
    proc = spawn_fake_daemon(config, tmp_path / "calls.log", log)
    try:
        wait_for(lambda: socket_ready(tmp_path / "ctl.sock"), 60, "the daemon")
        client = ControlClient(tmp_path / "ctl.sock", timeout=10)

        def failures() -> dict[str, dict[str, Any]]:
            return {Path(f["path"]).name: f for f in client.failures(100)}

        wait_for(lambda: len(failures()) == 10, 30, "the 10 images reported")
        # No thread is blocked: a new image in the other root and one in this root still go through.
        late_other = write_unique_png(other / "late.png", 100)
        write_unique_png(root / "img10.png", 10)
        wait_for(lambda: (other / "late.txt").exists(), 30, "the other root's new image")
        wait_for(lambda: "img10.png" in failures() and (root / "img10.json").exists(), 30, "this root's new image")
        reported = failures()
        elapsed = _stopped_by_sigterm(proc, log, 20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    print(f"\nspecial files: SIGTERM -> exit 0 in {elapsed:.2f} s")
    assert late_other in (other / "late.txt").read_text()
    images = [f"img{i:02d}" for i in range(11)]
    for name in images:  # every image has its other outputs
        caption = json.loads((root / f"{name}.json").read_text())["caption"]
        assert caption.startswith("A 8x8 test image ")
        if name != "img03":
            assert (root / f"{name}.txt").read_text() == caption + "\n"
        if name != "img05":
            assert metadata.read_description(root / f"{name}.xmp") == caption
    # The three bad files are as they were: refused, never followed, read, merged or replaced.
    assert (root / "metadata.jsonl").is_fifo()
    assert os.readlink(root / "img03.txt") == "/dev/zero"
    assert (root / "img05.xmp").is_symlink() and outside.read_bytes() == outside_bytes
    # ... and each is reported with its code, naming the file, on the image it belongs to.
    assert {f["code"] for f in reported.values()} == {SIDECAR_NOT_REGULAR}
    assert set(reported) == {f"{name}.png" for name in images}
    assert str(root / "img03.txt") in reported["img03.png"]["message"]
    assert str(root / "img05.xmp") in reported["img05.png"]["message"]
    assert str(root / "metadata.jsonl") in reported["img00.png"]["message"]
    assert all(f["state"] == "failed" and f["attempts"] == 1 for f in reported.values())  # parked at once
    assert SIDECAR_NOT_REGULAR in log.read_text()


def test_an_xmp_sidecar_over_its_cap_fails_only_its_own_output(tmp_path: Path, monkeypatch) -> None:
    pytest.importorskip("pyexiv2")
    root = tmp_path / "in"
    root.mkdir()
    write_unique_png(root / "photo.png", 1)
    (root / "photo.xmp").write_text(RATED_PACKET)
    before = (root / "photo.xmp").read_bytes()
    monkeypatch.setattr(safe_files, "XMP_MAX_BYTES", len(before) - 1)
    settings = settings_for(tmp_path, [root], extra='formats = ["txt", "xmp"]\n')
    with running_daemon(settings, FakeCaptioner()) as daemon:
        wait_for(lambda: daemon.store.counts()["failed"] == 1, 30, "the image parked")
        (job,) = daemon.store.failures()
    assert job.error_code == SIDECAR_TOO_LARGE and str(root / "photo.xmp") in (job.error_message or "")
    assert (root / "photo.txt").read_text().startswith("A 8x8 test image ")  # the other output is written
    assert (root / "photo.xmp").read_bytes() == before


def test_stale_answers_promptly_with_a_txt_linked_to_dev_zero(tmp_path: Path) -> None:
    root = tmp_path / "in"
    root.mkdir()
    write_unique_png(root / "photo.png", 1)
    policy = 'existing = "only-missing"\n'  # keeps the link as it is: nothing rewrites it
    with running_daemon(settings_for(tmp_path, [root], extra=policy + 'prompt = "First."\n'), FakeCaptioner()):
        wait_for(lambda: (root / "photo.txt").exists(), 30, "the caption")
    (root / "photo.txt").unlink()
    (root / "photo.txt").symlink_to("/dev/zero")
    config = daemon_config(tmp_path, [root], extra=policy + 'prompt = "Second."\n')  # the caption is stale now
    proc = _spawn_capped(config, tmp_path, 1024 * 1024 * 1024)
    try:
        wait_for(lambda: socket_ready(tmp_path / "ctl.sock"), 60, "the daemon")
        started = time.monotonic()
        reply = ControlClient(tmp_path / "ctl.sock", timeout=10).stale()
        seconds = time.monotonic() - started
        _stopped_by_sigterm(proc, tmp_path / "daemon.log", 20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    print(f"\nGET /v1/stale with photo.txt -> /dev/zero: {seconds * 1000:.0f} ms")
    # The .txt no longer holds the caption the daemon wrote: edited, not redone.
    assert [e.path for e in reply.edited] == [str(root / "photo.png")] and reply.stale == []
    assert seconds < 5
    assert os.readlink(root / "photo.txt") == "/dev/zero"


def test_sigterm_stops_the_daemon_even_with_a_thread_stuck_in_a_system_call(tmp_path: Path, fifos) -> None:
    """Whatever the cause (here a thread blocked in ``open()`` on a pipe, which the interpreter's
    exit waits for), the process is gone within the stop deadline, with the stuck thread named."""
    root = tmp_path / "in"
    root.mkdir()
    pipe = fifos(tmp_path / "stuck")
    config = daemon_config(tmp_path, [root])
    log = tmp_path / "daemon.log"
    env = {"FAKE_STUCK_ON_FIFO": str(pipe), "FAKE_STOP_DEADLINE": "1"}
    proc = spawn_fake_daemon(config, tmp_path / "calls.log", log, env)
    try:
        wait_for(lambda: socket_ready(tmp_path / "ctl.sock"), 60, "the daemon")
        elapsed = _stopped_by_sigterm(proc, log, 20)  # 0: the orderly stop had finished
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert 1 <= elapsed < 10
    lines = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    expired = [line for line in lines if line.get("event") == "the stop took too long; exiting anyway"]
    assert expired and "stuck-on-a-pipe" in expired[0]["threads"] and expired[0]["stopped"] is True


def test_the_stop_deadline_is_under_the_units_stop_timeout() -> None:
    from phicapd import stop_deadline

    unit = (REPO / "systemd" / "phicapd.service").read_text()
    line = next(line for line in unit.splitlines() if line.startswith("TimeoutStopSec="))
    timeout = int(line.removeprefix("TimeoutStopSec=").removesuffix("s"))
    margin = timeout - stop_deadline.SECONDS
    assert margin >= 5  # time left to log and exit before systemd's SIGKILL
