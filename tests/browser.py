"""A report page rendered by real headless Debian chromium, checked from its screenshots."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

needs_chromium = pytest.mark.skipif(
    shutil.which("chromium") is None,
    reason="no chromium binary (Debian: apt-get install chromium; `make install` does it as root)",
)


def screenshot(html: Path, png: Path, height: int, profile: Path) -> np.ndarray:
    """The page at width 1200 and this height, as an RGB array."""
    subprocess.run(
        ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
         "--no-first-run", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", f"--user-data-dir={profile}", f"--screenshot={png}",
         f"--window-size=1200,{height}", html.as_uri()],
        check=True, capture_output=True, timeout=180,
    )  # fmt: skip
    return np.asarray(Image.open(png).convert("RGB")).astype(int)


def assert_page_and_plots_render(html: Path, tmp_path: Path) -> None:
    """The top of the page has text (not blank, not all dark), and the whole page shows plot
    pixels: matplotlib's tab10 colours (blue, orange, green) appear only inside the embedded
    PNGs, never in the page's own CSS."""
    top = screenshot(html, tmp_path / "top.png", 2000, tmp_path / "profile")
    assert top.shape[:2] == (2000, 1200)
    dark = (top.sum(axis=2) < 200).mean()  # text
    assert 0.002 < dark < 0.5, f"the page looks blank or broken ({dark:.4f} dark pixels)"
    page = screenshot(html, tmp_path / "page.png", 16000, tmp_path / "profile")
    for rgb in ((31, 119, 180), (255, 127, 14), (44, 160, 44)):
        hits = (np.abs(page - np.array(rgb)).sum(axis=2) <= 6).sum()
        assert hits > 500, f"no plot pixels of colour {rgb} in the rendered page ({hits})"
