"""The exiv2 worker and its supervisor: answers, errors, and a worker that crashes or hangs on a
file is replaced, with the call failing in the way ``metadata`` promises (reads: no description;
writes: ``MetadataCrashed``, no temp file left)."""

from __future__ import annotations

import io
import json
import os
import shutil
import sys
import time
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from phicapd.outputs import exiv2_worker, metadata
from phicapd.outputs.exiv2_supervisor import Supervisor, WorkerDied
from tests.support.fakes import write_unique_png

pyexiv2 = pytest.importorskip("pyexiv2")

CRASHING = Path(__file__).resolve().parents[1] / "support" / "crashing_exiv2_worker.py"
IMAGES = Path(__file__).resolve().parents[1] / "data" / "images"


def _command(mode: str) -> list[str]:
    return [sys.executable, str(CRASHING), mode]


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


@pytest.fixture
def supervisor() -> object:
    sup = Supervisor()
    yield sup
    sup.close()


def test_serve_answers_each_line_in_order_and_a_bad_line_with_an_error(tmp_path: Path) -> None:
    image = tmp_path / "a.png"
    write_unique_png(image, 1)
    exiv2_worker.modify_in_process(image, ("xmp",), "a caption")
    missing = str(tmp_path / "missing.png")
    requests = b"\n".join(
        [
            json.dumps({"op": "read", "path": str(image)}).encode(),
            b"not json",
            json.dumps({"op": "read", "path": missing}).encode(),
            json.dumps({"op": "modify", "path": missing, "kinds": ["xmp"], "caption": "x"}).encode(),
            json.dumps({"op": "rename", "path": str(image)}).encode(),
        ]
    )
    answers = io.BytesIO()
    exiv2_worker.serve(io.BytesIO(requests + b"\n"), answers)
    lines = [json.loads(line) for line in answers.getvalue().splitlines()]
    assert lines[0] == {"value": "a caption", "values": ["a caption"]}
    assert lines[1]["error"] == "ValueError"
    assert lines[2] == {"value": None, "values": []}  # a file exiv2 cannot open holds no description
    assert lines[3]["error"] in ("OSError", "RuntimeError")
    assert lines[4] == {"error": "ValueError", "message": "unknown op 'rename'"}


def test_a_crash_fails_that_call_and_the_next_one_gets_a_fresh_worker(tmp_path: Path, supervisor: Supervisor) -> None:
    image = tmp_path / "fine.png"
    write_unique_png(image, 1)
    read = {"op": "read", "path": str(image)}
    command = _command("abort")
    assert supervisor.call(command, read, 10) == {"value": None, "values": []}
    first = supervisor._proc
    assert first is not None and supervisor.started == 1
    with pytest.raises(WorkerDied, match="killed by SIGABRT"):
        supervisor.call(command, {"op": "read", "path": str(tmp_path / "hostile.png")}, 10)
    assert first.poll() is not None
    assert supervisor.call(command, read, 10) == {"value": None, "values": []}
    assert supervisor.started == 2 and supervisor._proc is not first


def test_a_hang_is_killed_at_the_timeout_and_the_next_call_works(tmp_path: Path, supervisor: Supervisor) -> None:
    image = tmp_path / "fine.png"
    write_unique_png(image, 1)
    command = _command("hang")
    supervisor.call(command, {"op": "read", "path": str(image)}, 10)
    assert supervisor._proc is not None
    pid = supervisor._proc.pid
    started = time.monotonic()
    with pytest.raises(WorkerDied, match=r"no answer within 0\.5 s and was killed"):
        supervisor.call(command, {"op": "read", "path": str(tmp_path / "hostile.png")}, 0.5)
    assert 0.5 <= time.monotonic() - started < 5
    assert _gone(pid)  # killed and reaped, not left looping
    assert supervisor.call(command, {"op": "read", "path": str(image)}, 10) == {"value": None, "values": []}
    assert supervisor.started == 2


def test_a_worker_that_exits_between_calls_is_replaced(tmp_path: Path, supervisor: Supervisor) -> None:
    image = tmp_path / "fine.png"
    write_unique_png(image, 1)
    read = {"op": "read", "path": str(image)}
    supervisor.call(metadata.WORKER_COMMAND, read, 10)
    assert supervisor._proc is not None
    supervisor._proc.kill()
    supervisor._proc.wait()
    assert supervisor.call(metadata.WORKER_COMMAND, read, 10) == {"value": None, "values": []}
    assert supervisor.started == 2


def test_a_worker_that_prints_garbage_is_killed(tmp_path: Path, supervisor: Supervisor) -> None:
    command = [sys.executable, "-c", "import sys; sys.stdin.readline(); print('hello', flush=True); input()"]
    with pytest.raises(WorkerDied, match="not the protocol"):
        supervisor.call(command, {"op": "read", "path": str(tmp_path)}, 10)
    assert supervisor._proc is None


def test_a_worker_that_cannot_start_its_module_is_a_died_call(tmp_path: Path, supervisor: Supervisor) -> None:
    command = [sys.executable, "-c", "raise SystemExit(3)"]
    with pytest.raises(WorkerDied, match="exited with status 3"):
        supervisor.call(command, {"op": "read", "path": str(tmp_path)}, 10)


def test_metadata_reads_none_and_writes_raise_metadata_crashed_naming_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(metadata, "WORKER_COMMAND", _command("abort"))
    hostile = tmp_path / "hostile.jpg"
    shutil.copyfile(IMAGES / "rocket.jpg", hostile)
    before = hostile.read_bytes()
    with capture_logs() as logs:
        assert metadata.read_description(hostile) is None
    (warning,) = [e for e in logs if e["log_level"] == "warning"]
    assert warning["path"] == str(hostile) and "SIGABRT" in warning["reason"]
    with pytest.raises(metadata.MetadataCrashed, match=rf"^exiv2 crashed on {hostile} \(killed by SIGABRT\)$"):
        metadata.embed_caption(hostile, "a caption")
    with pytest.raises(metadata.MetadataCrashed, match=str(tmp_path / "hostile.xmp")):
        metadata.write_xmp_sidecar(tmp_path / "hostile.xmp", "a caption")
    assert hostile.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hostile.jpg"]  # no temp file, no sidecar
    # The next file goes through a fresh worker.
    fine = tmp_path / "fine.jpg"
    shutil.copyfile(IMAGES / "rocket.jpg", fine)
    metadata.embed_caption(fine, "a caption")
    assert metadata.read_description(fine) == "a caption"


def test_a_write_that_hangs_times_out_as_metadata_crashed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(metadata, "WORKER_COMMAND", _command("hang"))
    monkeypatch.setattr(metadata, "TIMEOUT_SECONDS", 0.5)
    hostile = tmp_path / "hostile.png"
    write_unique_png(hostile, 1)
    with pytest.raises(metadata.MetadataCrashed, match=r"no answer within 0\.5 s"):
        metadata.embed_caption(hostile, "a caption")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hostile.png"]


def test_errors_the_worker_reports_are_raised_as_before(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        metadata.embed_caption(tmp_path / "missing.png", "x")  # the parent's copy fails first
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not a png at all")
    assert metadata.read_description(broken) is None
    with pytest.raises(RuntimeError) as raised:
        metadata.embed_caption(broken, "x")
    assert not isinstance(raised.value, metadata.MetadataCrashed)  # an error, retryable: not a crash
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.png"]


@pytest.mark.parametrize(
    ("answer", "raised", "text"),
    [
        (
            {"error": "OSError", "message": "m", "errno": 13, "strerror": "Permission denied", "filename": "/x"},
            PermissionError,
            "[Errno 13] Permission denied: '/x'",
        ),
        ({"error": "OSError", "message": "no errno"}, OSError, "no errno"),
        ({"error": "RuntimeError", "message": "Failed to read input data"}, RuntimeError, "Failed to read input data"),
        ({"error": "MetadataUnavailable", "message": "needs pyexiv2"}, metadata.MetadataUnavailable, "needs pyexiv2"),
        ({"error": "KeyError", "message": "'path'"}, RuntimeError, "KeyError: 'path'"),
    ],
)
def test_an_error_answer_is_raised_as_its_exception(
    monkeypatch: pytest.MonkeyPatch, answer: dict[str, object], raised: type[Exception], text: str
) -> None:
    # A worker that answers each request with the answer the request carries.
    echo = "import json, sys\nfor line in sys.stdin: print(json.dumps(json.loads(line)['answer']), flush=True)"
    monkeypatch.setattr(metadata, "WORKER_COMMAND", [sys.executable, "-c", echo])
    with pytest.raises(raised) as e:
        metadata._call({"op": "read", "path": "/x", "answer": answer}, Path("/x"))
    assert type(e.value) is raised and str(e.value) == text
