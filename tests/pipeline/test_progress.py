"""The ETA (issue 21, item 2): over the images that can run now, at the rate while busy, and none
while paused, waiting or only retrying, saying why."""

from __future__ import annotations

import pytest

from phicapd.pipeline.progress import Backlog, BusyRate, progress_report


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_burst_then_idle_keeps_the_burst_rate() -> None:
    """54 images in 15 s, then minutes idle: 3.6 images/s, not 54 over 5 minutes (0.18)."""
    clock = Clock()
    rate = BusyRate(300.0, clock)
    rate.busy()
    for _ in range(54):
        clock.now += 15 / 54
        rate.add()
    rate.idle()
    clock.now += 200.0
    per_second, busy = rate.recent()
    assert per_second == pytest.approx(3.6) and busy == pytest.approx(15.0)


def test_only_busy_time_inside_the_window_counts() -> None:
    clock = Clock()
    rate = BusyRate(100.0, clock)
    rate.busy()
    clock.now += 80.0
    rate.add(8)  # 8 captions at t=80
    clock.now += 40.0  # still busy at t=120: the window is [20, 120]
    rate.add(2)
    per_second, busy = rate.recent()
    assert busy == pytest.approx(100.0) and per_second == pytest.approx(0.1)
    rate.idle()
    clock.now += 150.0  # everything has left the window
    assert rate.recent() == (0.0, 0.0)


def test_before_any_busy_time_there_is_no_rate() -> None:
    rate = BusyRate(300.0, Clock())
    rate.add(3)  # recorded with no busy span: no rate to divide by
    assert rate.recent() == (0.0, 0.0)


def test_the_estimate_is_over_the_images_that_can_run_now() -> None:
    report = progress_report(Backlog(runnable=30, retrying=5, next_retry_in=40.0), 3.0, 15.0, "ready")
    assert report["backlog"] == 35 and report["eta_seconds"] == 10.0 and report["no_eta"] is None
    assert report["retrying"] == 5 and report["next_retry_in_seconds"] == 40.0


@pytest.mark.parametrize(
    ("backlog", "rate", "state", "why"),
    [
        (Backlog(1, 0, None), 0.0, "ready", "no_rate"),
        (Backlog(0, 1, 60.0), 2.0, "ready", "retrying"),  # "left 1 images, done in about 2 s" for a minute
        (Backlog(10, 0, None), 2.0, "paused", "paused"),
        (Backlog(10, 0, None), 2.0, "waiting", "waiting"),
    ],
)
def test_no_estimate_and_why(backlog: Backlog, rate: float, state: str, why: str) -> None:
    report = progress_report(backlog, rate, 10.0, state)
    assert report["eta_seconds"] is None and report["no_eta"] == why


def test_nothing_left_is_done_now() -> None:
    report = progress_report(Backlog(0, 0, None), 0.0, 0.0, "paused")
    assert report["eta_seconds"] == 0.0 and report["no_eta"] is None
