"""Shared fixtures: the real data beside the checkout, temporary outputs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

#: ``../shared/data`` beside the checkout (see its README); override with
#: BAYESFUSE_SHARED_DATA.
SHARED_DATA = Path(os.environ.get("BAYESFUSE_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The folder of real multi-rater data; skips the test where it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data not found at {SHARED_DATA} (set BAYESFUSE_SHARED_DATA to its folder)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def liver_files(shared_data) -> dict:
    """The liver-tumour case: CT image and three radiologists' masks."""
    d = shared_data / "liver-tumor"
    raters = sorted(d.glob("Patient01Homo_Rad0*.nii.gz"))
    if len(raters) != 3:
        pytest.skip(f"liver-tumor data incomplete in {d}")
    return {"image": d / "Patient01Homo.nii.gz", "raters": raters}
