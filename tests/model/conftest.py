"""Fixtures for the native model tests: the tiny checkpoint on the CPU in fp32."""

from __future__ import annotations

from pathlib import Path

import pytest

from phicapd.model.modeling import Phi3VForCausalLM
from phicapd.model.tokenizer import Phi3VTokenizer
from tests.model.helpers import load_tiny


@pytest.fixture(scope="session")
def tiny_model(tiny_checkpoint: Path) -> Phi3VForCausalLM:
    return load_tiny(tiny_checkpoint)


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_checkpoint: Path) -> Phi3VTokenizer:
    return Phi3VTokenizer.from_dir(tiny_checkpoint)
