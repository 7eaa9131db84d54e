"""The watchdog internals phicapd relies on (all in ``inotify_adapter``) are as tested.

A watchdog release that changes them fails here, naming the version, instead of breaking
watching at run time (as 7.1 did: it added queries to the move grouper that phicapd's
replacement lacked, and moving a watched directory out of a root killed its emitter)."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from watchdog.observers.inotify_move_event_grouper import InotifyMoveEventGrouper

from phicapd.pipeline import inotify_adapter
from phicapd.pipeline.inotify_adapter import TESTED_WATCHDOG, internals_problems, watchdog_version

REPO = Path(__file__).resolve().parents[2]


def test_the_watchdog_internals_phicapd_relies_on_are_as_tested() -> None:
    problems = internals_problems()
    assert not problems, (
        f"watchdog {watchdog_version()} changed internals that phicapd/pipeline/inotify_adapter.py relies on "
        f"(tested: watchdog{TESTED_WATCHDOG}):\n  " + "\n  ".join(problems)
    )


def test_the_installed_watchdog_is_in_the_pinned_range() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    [pin] = [Requirement(d) for d in project["dependencies"] if Requirement(d).name == "watchdog"]
    assert str(pin.specifier) == str(Requirement(f"watchdog{TESTED_WATCHDOG}").specifier)
    assert pin.specifier.contains(watchdog_version()), (
        f"watchdog {watchdog_version()} is installed; phicapd is tested with watchdog{TESTED_WATCHDOG}"
    )


def test_the_check_sees_a_grouper_method_ours_lacks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(InotifyMoveEventGrouper, "peek_event", lambda self: None, raising=False)
    assert internals_problems() == ["InotifyMoveEventGrouper.peek_event is not implemented by CookieIndexedMoveGrouper"]


def test_the_check_sees_a_changed_signature(monkeypatch: pytest.MonkeyPatch) -> None:
    def handle_event(self: object, raw: object, *, overflow: bool) -> None: ...

    monkeypatch.setattr(inotify_adapter.InotifyFD, "handle_event", handle_event)
    [problem] = internals_problems()
    assert problem.startswith("watchdog.observers.inotify_c.InotifyFD.handle_event(")
    assert "does not start with ('self', 'event')" in problem
