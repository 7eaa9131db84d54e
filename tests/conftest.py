"""Fixtures shared by every test area. Area-specific fixtures live in tests/<area>/conftest.py."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

SHARED_IMAGES = Path(__file__).resolve().parents[1].parent / "shared" / "testdata" / "images"


@pytest.fixture(scope="session")
def shared_images_dir() -> Path:
    """The read-only real photos; copy before writing anything next to them."""
    if not SHARED_IMAGES.is_dir():
        pytest.skip(f"shared test images not found at {SHARED_IMAGES}")
    return SHARED_IMAGES


@pytest.fixture
def photos(tmp_path: Path, shared_images_dir: Path) -> Path:
    """A writable copy of the real test photos."""
    out = tmp_path / "photos"
    shutil.copytree(shared_images_dir, out, ignore=shutil.ignore_patterns("*.md"))
    return out


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Phi-3.5-vision checkpoint in Microsoft's on-disk layout (made once per run)."""
    from phicapd.model.testmodel import make_test_model

    return make_test_model(tmp_path_factory.mktemp("tiny-phi3v"))
