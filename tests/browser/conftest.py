"""A headless Chromium for the browser tests: the system's ``chromium`` (Debian package) driven by
Playwright (pip ``playwright``; its own browser download is not used). Without either, every test
here is skipped with a reason that says what to install (``.ci/run`` installs both when it can)."""

from __future__ import annotations

import io
import os
import shutil
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "chrome")


def chromium_path() -> str | None:
    """``$ATTNHOOKS_CHROMIUM``, else the first of :data:`CANDIDATES` on the PATH."""
    given = os.environ.get("ATTNHOOKS_CHROMIUM")
    if given:
        return given if os.path.exists(given) else None
    return next((p for p in map(shutil.which, CANDIDATES) if p), None)


@pytest.fixture(scope="module")
def browser():
    """One browser per test module."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("BROWSER TESTS SKIPPED: playwright is not installed (pip install playwright; .ci/run installs it)")
    exe = chromium_path()
    if exe is None:
        pytest.skip(
            "BROWSER TESTS SKIPPED: no chromium executable on the PATH (apt-get install -y chromium, as root; "
            "or set ATTNHOOKS_CHROMIUM)"
        )
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=exe, args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
        yield b
        b.close()


@dataclass
class Watched:
    """A page, every request it made (URLs) and every console error or uncaught exception."""

    page: Any
    requests: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def screenshot_is_not_blank(self) -> np.ndarray:
        from PIL import Image

        pixels = np.asarray(Image.open(io.BytesIO(self.page.screenshot())).convert("RGB"), dtype=float)
        drawn = (pixels < 245).any(axis=-1).mean()  # a blank page, or one showing "loading…", is ~0
        assert drawn > 0.01, f"the page rendered (nearly) blank: {drawn:.2%} of its pixels are not white"
        return pixels


@pytest.fixture
def watched(browser):
    # Playwright's polling wait_for_function evaluates strings, which the pages' CSP forbids (no unsafe-eval);
    # requests are checked by recording them, not by the CSP
    context = browser.new_context(viewport={"width": 1200, "height": 900}, bypass_csp=True)
    page = context.new_page()
    w = Watched(page)
    page.on("request", lambda r: w.requests.append(r.url))
    page.on("console", lambda m: w.errors.append(f"console.{m.type}: {m.text}") if m.type == "error" else None)
    page.on("pageerror", lambda e: w.errors.append(f"uncaught: {e}"))
    yield w
    context.close()
