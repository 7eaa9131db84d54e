"""Continuous admission on the tiny checkpoint: work that arrives mid-batch joins it, exactly."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from phicapd.captioner import Caption, CaptionRequest
from phicapd.errors import CaptionError, PhicapError
from phicapd.model.captioner import Phi3VCaptioner
from phicapd.model.engine import EngineRequest, GenerationEngine
from tests.model.helpers import make_captioner, noise_image
from tests.model.test_engine import PROMPTS, _engine_requests, _fail_decode_while


class ScriptedFeed:
    """Hands requests to ``run`` at chosen steps; records each take and when each result came."""

    def __init__(self, schedule: dict[int, list[EngineRequest]]) -> None:
        self.schedule = schedule  # step -> requests offered from that step on
        self.offered: list[EngineRequest] = []
        self.step = 0
        self.results: dict[int, list[int]] = {}
        self.finished_at: dict[int, int] = {}
        self.rooms: list[int] = []

    def take(self, room: int, *, idle: bool) -> list[EngineRequest]:
        self.offered += self.schedule.pop(self.step, [])
        self.step += 1
        self.rooms.append(room)
        out, self.offered = self.offered[:room], self.offered[room:]
        return out

    def done(self, request: EngineRequest, tokens: list[int]) -> None:
        self.results[request.tag] = tokens
        self.finished_at[request.tag] = self.step


def _tagged(requests: list[EngineRequest]) -> list[EngineRequest]:
    return [EngineRequest(r.input_ids, r.image, r.max_new_tokens, tag=i) for i, r in enumerate(requests)]


@pytest.fixture(scope="module")
def captioner(tiny_checkpoint: Path) -> Phi3VCaptioner:
    return make_captioner(tiny_checkpoint, strip_openers=[], max_batch=4)


def test_a_request_arriving_mid_batch_joins_it_and_gets_its_own_tokens(captioner: Phi3VCaptioner) -> None:
    requests = _tagged(_engine_requests(captioner, [30, 30, 30, 6]))
    alone = [captioner.engine.generate([r], frozenset())[0] for r in requests]
    feed = ScriptedFeed({0: requests[:3], 8: [requests[3]]})  # the short one arrives at step 8
    engine = GenerationEngine(captioner.model, max_slots=4)
    with torch.inference_mode():
        engine.run(feed, engine.ctx_for(2048), frozenset())
    assert [feed.results[i] for i in range(4)] == alone
    # It was prefilled at once, beside the three running rows, and finished long before them.
    assert feed.finished_at[3] < 8 + 6 + 2 < min(feed.finished_at[i] for i in range(3))
    assert 0 in feed.rooms  # asked even when full: the take doubles as a heartbeat


def test_a_full_engine_admits_the_next_request_when_a_row_frees(captioner: Phi3VCaptioner) -> None:
    requests = _tagged(_engine_requests(captioner, [5, 25, 12]))
    alone = [captioner.engine.generate([r], frozenset())[0] for r in requests]
    feed = ScriptedFeed({0: requests})
    engine = GenerationEngine(captioner.model, max_slots=2)
    with torch.inference_mode():
        engine.run(feed, engine.ctx_for(2048), frozenset())
    assert [feed.results[i] for i in range(3)] == alone
    assert feed.finished_at[2] < feed.finished_at[1]  # took row 0's slot after it finished, not row 1's end


def test_run_refuses_a_request_longer_than_its_rows(captioner: Phi3VCaptioner) -> None:
    request = _tagged(_engine_requests(captioner, [300]))[0]
    engine = GenerationEngine(captioner.model, max_slots=1)
    with torch.inference_mode(), pytest.raises(ValueError, match="does not fit"):
        engine.run(ScriptedFeed({0: [request]}), 256, frozenset())


class Lane:
    """A scheduler lane for ``Phi3VCaptioner.stream``: requests become available at given takes."""

    def __init__(self, arrivals: dict[int, list[CaptionRequest]]) -> None:
        self.arrivals = arrivals
        self.queue: list[CaptionRequest] = []
        self.takes = 0
        self.outcomes: dict[int, Caption | PhicapError] = {}
        self.order: list[int] = []
        self.ids: dict[int, int] = {}

    def take(self, room: int, idle: bool) -> list[CaptionRequest]:
        for req in self.arrivals.pop(self.takes, []):
            self.ids[id(req)] = len(self.ids)
            self.queue.append(req)
        self.takes += 1
        out, self.queue = self.queue[:room], self.queue[room:]
        return out

    def deliver(self, request: CaptionRequest, outcome: Caption | PhicapError) -> None:
        self.outcomes[self.ids[id(request)]] = outcome
        self.order.append(self.ids[id(request)])


def _caption_requests(budgets: list[int], prompts: list[str] | None = None) -> list[CaptionRequest]:
    images = [noise_image(500, 300, 60), noise_image(200, 700, 30), noise_image(336, 336, 7), noise_image(90, 60, 3)]
    prompts = prompts or [PROMPTS[i % 3] for i in range(len(budgets))]
    return [CaptionRequest(images[i % 4], prompts[i], n) for i, n in enumerate(budgets)]


def test_stream_equals_caption_and_answers_each_when_done(captioner: Phi3VCaptioner) -> None:
    requests = _caption_requests([24, 24, 3, 10])
    expected = [captioner.caption([r])[0] for r in requests]
    lane = Lane({0: requests[:2], 4: requests[2:]})
    captioner.stream(lane.take, lane.deliver)
    assert [lane.outcomes[i] for i in range(4)] == expected
    assert lane.order.index(2) < lane.order.index(0)  # the late short one did not wait for the batch


def test_stream_holds_a_request_too_long_for_its_rows_then_runs_it(tiny_checkpoint: Path) -> None:
    short = make_captioner(tiny_checkpoint, strip_openers=[], max_batch=4, max_new_tokens=8)
    ctx = short.engine.ctx_for(short.typical_ctx())  # rows sized for the configured budget
    requests = _caption_requests([8, 0, 8])
    prompt_len = len(short._encode(requests[1], short.prepare(requests[1].image)).input_ids)
    requests[1] = CaptionRequest(requests[1].image, requests[1].prompt, ctx - prompt_len)  # one token too many
    expected = [short.caption([r])[0] for r in requests]
    runs = short.engine.stats["calls"]
    lane = Lane({0: requests})
    short.stream(lane.take, lane.deliver)
    assert [lane.outcomes[i] for i in range(3)] == expected
    assert short.engine.stats["calls"] - runs == 2  # rows of ctx first, then longer rows for the held one


def test_a_bad_prompt_fails_only_its_request(captioner: Phi3VCaptioner) -> None:
    requests = _caption_requests([6, 6, 6], ["Describe.", "Compare with <|image_2|>.", "Describe."])
    lane = Lane({0: requests})
    captioner.stream(lane.take, lane.deliver)
    bad = lane.outcomes[1]
    assert isinstance(bad, CaptionError) and bad.code == "caption_bad_prompt"
    assert isinstance(lane.outcomes[0], Caption) and isinstance(lane.outcomes[2], Caption)


def test_out_of_memory_mid_stream_restarts_the_rows_in_flight_with_fewer(tiny_checkpoint: Path) -> None:
    fresh = make_captioner(tiny_checkpoint, strip_openers=[], max_batch=4)
    requests = _caption_requests([12, 12, 12, 12])
    expected = [fresh.caption([r])[0] for r in requests]
    calls = _fail_decode_while(fresh.engine, lambda rows, _: rows > 2)
    lane = Lane({0: requests})
    fresh.stream(lane.take, lane.deliver)
    assert [lane.outcomes[i] for i in range(4)] == expected
    assert max(calls) > 2 and fresh.engine.max_slots == 2
    assert "at most 2 rows" in fresh.describe()["engine"]["last_oom"]["action"]

    # Nothing left to shrink: the stream raises and leaves its requests to the caller.
    _fail_decode_while(fresh.engine, lambda rows, _: True)
    lane = Lane({0: requests[:1]})
    with pytest.raises(CaptionError) as err:
        fresh.stream(lane.take, lane.deliver)
    assert err.value.code == "model_out_of_memory" and lane.outcomes == {}


def test_a_busy_stream_gets_its_rows_back_after_a_quiet_period(tiny_checkpoint: Path) -> None:
    fresh = make_captioner(tiny_checkpoint, strip_openers=[], max_batch=4)
    requests = _caption_requests([12, 12, 12, 12, 12, 12, 12, 12])
    expected = [fresh.caption([r])[0] for r in requests]
    _fail_decode_while(fresh.engine, lambda rows, _: rows > 2 and fresh.engine.last_oom is None)
    lane = Lane({0: requests[:4], 12: requests[4:]})  # more work arrives while it drains
    take = lane.take

    def take_and_age(room: int, idle: bool) -> list[CaptionRequest]:
        if lane.takes == 10:  # mid-stream, ten quiet minutes have passed
            fresh.engine.last_oom.when -= 3600
        return take(room, idle)

    fresh.stream(take_and_age, lane.deliver)
    assert [lane.outcomes[i] for i in range(8)] == expected
    assert fresh.engine.max_slots == 4  # restored within the same stream, after its rows drained
