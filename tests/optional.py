"""Tests that need an optional system package (Debian's Fashion-MNIST, Chromium) skip where it is missing,
except under CI (`SPLINTERP_REQUIRE_OPTIONAL=1`, set by .ci/run, which installs them): there they run and a
missing package fails them, so CI can never go green by skipping them.

    from optional import needs
    @needs(FASHION_AVAILABLE, "Debian package dataset-fashion-mnist")
    def test_...
"""

from __future__ import annotations

import os

import pytest

REQUIRED = os.environ.get("SPLINTERP_REQUIRE_OPTIONAL") == "1"


def needs(available: bool, what: str):
    """A marker: skip when `what` is not available, unless CI requires it."""
    return pytest.mark.skipif(not available and not REQUIRED, reason=f"{what} is not installed")
