"""The scheduler's rules, one part at a time and without threads where the rule has none:
which images the model's free rows get (``Lanes.pick``), the crash-isolation gate in front of
the decode pool (``DecodeGate``) and the breaker (``Breaker``)."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from concurrent.futures import Future
from pathlib import Path

import pytest

from phicapd.captioner import Caption, CaptionRequest
from phicapd.errors import INTERRUPTED_DECODING, CaptionError, PhicapError
from phicapd.pipeline.breaker import BREAKER, Breaker, probe_image
from phicapd.pipeline.decode_gate import DecodeGate, GateClosed, decode_suspect
from phicapd.pipeline.journal import Job
from phicapd.pipeline.lanes import Item, Lanes
from tests.support.daemon import wait_for
from tests.support.fakes import FakeCaptioner, image_key, unique_image

# -- Lanes.pick ----------------------------------------------------------------------------------

_ids = iter(range(1, 1_000_000))


def _request(index: int = 0) -> CaptionRequest:
    return CaptionRequest(unique_image(index), "Describe it.", 40)


def _background(error_code: str | None = None) -> Item:
    n = next(_ids)
    job = Job(n, Path(f"/in/{n}.png"), Path("/in"), "pending", 0, False, None, error_code=error_code)
    return Item(_request(n), job=job)


def _interactive() -> Item:
    return Item(_request(next(_ids)), future=Future())


def _lanes(*, interactive: int = 0, background: int = 0, suspects: int = 0) -> Lanes:
    lanes = Lanes()
    lanes.interactive.extend(_interactive() for _ in range(interactive))
    lanes.background.extend(_background() for _ in range(background))
    lanes.suspects.extend(_background("interrupted") for _ in range(suspects))
    return lanes


def _pick(lanes: Lanes, room: int, idle: bool = False, **kw: object) -> list[Item]:
    options: dict[str, object] = {"reserve": 0, "writer_room": 100, "paused": False, "alone": False, **kw}
    with lanes.cond:
        return lanes.pick(room, idle, **options)  # type: ignore[arg-type]


def _kinds(items: list[Item]) -> list[str]:
    return ["suspect" if i.job and i.job.error_code else "bg" if i.job else "rq" for i in items]


def test_interactive_requests_are_taken_before_the_backlog() -> None:
    lanes = _lanes(background=5)
    lanes.interactive.extend(_interactive() for _ in range(2))  # queued after the backlog
    assert _kinds(_pick(lanes, 3, idle=True)) == ["rq", "rq", "bg"]
    assert _kinds(_pick(_lanes(interactive=4, background=5), 3)) == ["rq", "rq", "rq"]


def test_a_cancelled_request_takes_no_row() -> None:
    lanes = _lanes(interactive=2, background=1)
    lanes.interactive[0].future.cancel()  # type: ignore[union-attr]
    assert _kinds(_pick(lanes, 2)) == ["rq", "bg"]


def test_the_interactive_slots_stay_free_of_background_rows() -> None:
    lanes = _lanes(background=10)
    assert len(_pick(lanes, 4, reserve=1)) == 3  # one row of four kept for a socket request
    lanes.in_flight.clear()
    lanes.on_model.clear()
    # A socket request on the model within the reserved rows: no background prefill beside it.
    request = _interactive()
    lanes.in_flight[id(request.request)] = request
    assert _pick(lanes, 3, reserve=1) == []
    # More socket requests than reserved rows is bulk work: the background fills in beside them.
    lanes.interactive.extend([_interactive(), _interactive()])
    assert _kinds(_pick(lanes, 4, reserve=1)) == ["rq", "rq", "bg"]


def test_a_lone_background_image_may_use_a_reserved_row_when_the_model_is_idle() -> None:
    assert _kinds(_pick(_lanes(background=3), 1, idle=True, reserve=1)) == ["bg"]
    assert _pick(_lanes(background=3), 1, idle=False, reserve=1) == []


def test_the_writers_back_pressure_bounds_the_background_rows() -> None:
    assert len(_pick(_lanes(background=10), 8, writer_room=2)) == 2
    assert _pick(_lanes(background=10), 8, idle=True, writer_room=0) == []
    # A writer a batch behind holds back an interrupted image too, but never a socket request.
    assert _kinds(_pick(_lanes(interactive=1, suspects=1), 8, idle=True, writer_room=0)) == ["rq"]


def test_the_rows_taken_are_in_flight_and_their_jobs_on_the_model() -> None:
    lanes = _lanes(interactive=1, background=2)
    items = _pick(lanes, 3, idle=True)
    assert set(lanes.in_flight) == {id(i.request) for i in items}
    assert lanes.on_model == {i.job.id for i in items if i.job}
    assert [i.batch_size for i in items] == [3, 3, 3]
    assert lanes.background_on_model() == 2


def test_an_interrupted_image_runs_alone() -> None:
    lanes = _lanes(background=3, suspects=1)
    running = _background()
    lanes.in_flight[id(running.request)] = running
    assert _pick(lanes, 4) == []  # the model drains first: no background row starts
    del lanes.in_flight[id(running.request)]
    taken = _pick(lanes, 4, idle=True)
    assert _kinds(taken) == ["suspect"]  # then it, and nothing beside it
    assert _pick(lanes, 3) == []  # still nothing beside it while it runs
    lanes.interactive.append(_interactive())
    assert _kinds(_pick(lanes, 3)) == ["rq"]  # socket requests are never held back
    del lanes.in_flight[id(taken[0].request)]
    assert _kinds(_pick(lanes, 3)) == ["bg", "bg", "bg"]  # done: the backlog goes on


def test_no_background_row_starts_while_an_image_is_decoded_alone_or_paused() -> None:
    assert _kinds(_pick(_lanes(interactive=1, background=3), 4, idle=True, alone=True)) == ["rq"]
    assert _pick(_lanes(background=3, suspects=1), 4, idle=True, paused=True) == []


def test_has_work_says_when_the_worker_may_start() -> None:
    assert not Lanes().has_work(paused=False, alone=False, writer_room=4)
    assert _lanes(background=1).has_work(paused=False, alone=False, writer_room=4)
    for held in ({"paused": True}, {"alone": True}, {"writer_room": 0}):
        options = {"paused": False, "alone": False, "writer_room": 4, **held}
        assert not _lanes(background=1).has_work(**options)  # type: ignore[arg-type]
        assert _lanes(interactive=1).has_work(**options)  # type: ignore[arg-type]


def test_drain_hands_back_what_is_claimed_but_not_what_broke_the_model() -> None:
    lanes = _lanes(background=1)
    on_model, queued = _background(), lanes.background[0]
    assert on_model.job is not None and queued.job is not None
    lanes.claimed.update({on_model.job.id, queued.job.id})
    lanes.in_flight[id(on_model.request)] = on_model
    assert lanes.drain(broken=False)[1] == {on_model.job.id, queued.job.id}
    lanes.claimed.update({on_model.job.id, queued.job.id})
    assert lanes.drain(broken=True)[1] == {queued.job.id}  # left "running": the restart counts it
    assert lanes.counts() == {
        "interactive": 0,
        "background_ready": 0,
        "interrupted_ready": 0,
        "decoding": 0,
        "claimed": 0,
    }


# -- DecodeGate ----------------------------------------------------------------------------------


def _in_thread(target: object) -> threading.Thread:
    thread = threading.Thread(target=target, daemon=True)  # type: ignore[arg-type]
    thread.start()
    return thread


def test_a_decode_suspect_is_decoded_alone() -> None:
    lanes, stopping = Lanes(), threading.Event()
    gate = DecodeGate(lanes, stopping)
    inside, release, others_inside = threading.Event(), threading.Event(), threading.Event()

    def alone() -> None:
        with gate.slot(alone=True):
            inside.set()
            assert release.wait(10)

    def other() -> None:
        with gate.slot(alone=False):
            others_inside.set()

    with gate.slot(alone=False):
        lanes.on_model.add(7)  # a background job on the model, not yet recorded
        thread = _in_thread(alone)
        wait_for(lambda: gate.alone, 10, "the suspect at the gate")
        assert not gate.may_enter(alone=False)  # later decodes wait behind it
        assert not gate.may_enter(alone=True)
    assert not inside.is_set() and not gate.may_enter(alone=True)  # the model still holds a job
    with lanes.cond:
        lanes.settled([7])
    assert inside.wait(10)
    waiting = _in_thread(other)
    assert not gate.may_enter(alone=False)
    release.set()
    thread.join(10)
    assert others_inside.wait(10)
    waiting.join(10)
    assert gate.active == 0 and not gate.alone


def test_a_stop_releases_a_decode_waiting_at_the_gate() -> None:
    lanes, stopping = Lanes(), threading.Event()
    gate = DecodeGate(lanes, stopping)
    lanes.on_model.add(1)
    stopping.set()
    with pytest.raises(GateClosed), gate.slot(alone=True):
        pass
    assert not gate.alone and gate.active == 0


def test_only_an_image_interrupted_while_decoding_is_a_decode_suspect() -> None:
    def job(code: str | None) -> Job:
        return Job(1, Path("/in/a.png"), Path("/in"), "pending", 1, False, None, error_code=code)

    assert decode_suspect(job(INTERRUPTED_DECODING))
    assert not decode_suspect(job("interrupted")) and not decode_suspect(job(None))


# -- Breaker -------------------------------------------------------------------------------------


class Failing(FakeCaptioner):
    """Fails every image but the probe's (unless ``probe_fails``), as ``error`` says."""

    def __init__(self, error: Exception, *, probe_fails: bool) -> None:
        super().__init__()
        self.error, self.probe_fails = error, probe_fails
        self.probes = 0

    def caption(self, batch: Sequence[CaptionRequest]) -> list[Caption]:
        if image_key(batch[0].image) == image_key(probe_image()):
            self.probes += 1
            if not self.probe_fails:
                return super().caption(batch)
        raise self.error


def _breaker(captioner: FakeCaptioner) -> tuple[Breaker, list[int]]:
    trips: list[int] = []
    probe = CaptionRequest(probe_image(), "Describe it.", 2)
    return Breaker(captioner, lambda: probe, lambda: trips.append(1)), trips


def test_the_breaker_trips_when_the_probe_fails_too() -> None:
    captioner = Failing(RuntimeError("device lost"), probe_fails=True)
    breaker, trips = _breaker(captioner)
    for n in range(1, BREAKER):
        error = breaker.caption_one(_request(n), f"img{n}.png")
        assert isinstance(error, CaptionError) and f"img{n}.png" in str(error)
        assert breaker.failures_in_a_row == n and breaker.broken is None
    breaker.caption_one(_request(BREAKER), "last.png")
    assert captioner.probes == 1
    assert breaker.broken is not None and breaker.broken.code == "model_broken" and breaker.broken.retryable
    assert trips == [1]
    breaker.trip(CaptionError("again", code="model_broken"))
    assert trips == [1]  # tripped once


def test_a_probe_that_is_captioned_blames_the_images() -> None:
    breaker, trips = _breaker(Failing(RuntimeError("bad pixels"), probe_fails=False))
    for n in range(BREAKER):
        breaker.caption_one(_request(n), "img.png")
    assert breaker.broken is None and trips == [] and breaker.failures_in_a_row == 0


def test_a_success_resets_the_count_and_a_request_error_does_not_count() -> None:
    breaker, _ = _breaker(Failing(RuntimeError("bad pixels"), probe_fails=True))
    breaker.caption_one(_request(1), "a.png")
    breaker.succeeded()
    assert breaker.failures_in_a_row == 0
    own, _ = _breaker(Failing(PhicapError("bad prompt", code="bad_request", retryable=False), probe_fails=True))
    for n in range(BREAKER * 2):
        assert own.caption_one(_request(n), "a.png").code == "bad_request"  # type: ignore[union-attr]
    assert own.failures_in_a_row == 0 and own.broken is None


def test_a_model_fault_trips_the_breaker_at_once() -> None:
    captioner = Failing(CaptionError("CUDA error: illegal memory access", code="model_broken"), probe_fails=True)
    breaker, trips = _breaker(captioner)
    breaker.caption_one(_request(1), "a.png")
    assert breaker.broken is not None and trips == [1] and captioner.probes == 0
