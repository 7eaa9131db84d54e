"""Fixtures for the remote backend's tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from phicapd.remote.captioner import RemoteCaptioner
from tests.support.openai_server import FakeVLLM


@pytest.fixture
def servers() -> Iterator[list[FakeVLLM]]:
    """Fake vLLM servers a test starts; stopped after it."""
    made: list[FakeVLLM] = []
    yield made
    for s in made:
        s.stop()


@pytest.fixture
def captioners() -> Iterator[list[RemoteCaptioner]]:
    """Remote captioners a test loads; closed after it."""
    made: list[RemoteCaptioner] = []
    yield made
    for c in made:
        c.close()
