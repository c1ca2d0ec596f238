"""Shared test fixtures: the bundle root on sys.path, and ../shared data that skips when absent."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

BUNDLE_ROOT = Path(__file__).resolve().parents[1]
if str(BUNDLE_ROOT) not in sys.path:
    sys.path.insert(0, str(BUNDLE_ROOT))

import scripts  # noqa: E402,F401  (quiet native-library defaults)

SHARED_DIR = Path(os.environ.get("SMILE_SHARED_DIR", BUNDLE_ROOT.parent / "shared"))


@pytest.fixture(scope="session")
def bundle_root() -> Path:
    return BUNDLE_ROOT


@pytest.fixture(scope="session")
def shared_slides() -> Path:
    """../shared/data/slides (real test slides); skips the test when it is absent."""
    path = SHARED_DIR / "data" / "slides"
    if not path.is_dir():
        pytest.skip(f"shared test slides not found at {path} (set SMILE_SHARED_DIR); they are not part of the repository")
    return path


@pytest.fixture(scope="session")
def shared_mil() -> Path:
    """../shared/data/mil (MUSK1/MUSK2 .npz); skips the test when it is absent."""
    path = SHARED_DIR / "data" / "mil"
    if not path.is_dir():
        pytest.skip(f"shared MIL benchmarks not found at {path} (set SMILE_SHARED_DIR); they are not part of the repository")
    return path
