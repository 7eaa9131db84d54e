"""Fixtures shared by every test area. Area-specific fixtures live in tests/<area>/conftest.py."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

#: Real photos kept in the repository (licences in its README.md).
TEST_IMAGES = Path(__file__).resolve().parent / "data" / "images"


@pytest.fixture(scope="session")
def test_images_dir() -> Path:
    """The real test photos; copy before writing anything next to them."""
    return TEST_IMAGES


@pytest.fixture
def photos(tmp_path: Path, test_images_dir: Path) -> Path:
    """A writable copy of the real test photos."""
    out = tmp_path / "photos"
    shutil.copytree(test_images_dir, out, ignore=shutil.ignore_patterns("*.md"))
    return out


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Phi-3.5-vision checkpoint in Microsoft's on-disk layout (made once per run)."""
    from phicapd.model.testmodel import make_test_model

    return make_test_model(tmp_path_factory.mktemp("tiny-phi3v"))
