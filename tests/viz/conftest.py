"""A headless Chromium for the viewer's browser tests (skipped, with the reason, where none is
installed), and the few actions they take on a page."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Callable

import pytest


def _driver() -> Any:
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.skip("selenium is not installed (pip install -e '.[test]')")
    binary = next((shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)
    driver = shutil.which("chromedriver")
    if binary is None or driver is None:
        pytest.skip("no headless Chromium here: apt-get install chromium chromium-driver (.ci/run does)")
    o = webdriver.ChromeOptions()
    o.binary_location = binary
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1280,800"):
        o.add_argument(a)
    o.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(options=o, service=Service(driver))


@pytest.fixture(scope="session")
def browser():
    d = _driver()
    yield d
    d.quit()


class UI:
    """What the tests do on a viewer page: open it, point at and click screen positions, read
    the browser's error log."""

    def __init__(self, driver: Any) -> None:
        self.driver = driver

    def open(self, path: Path, ready: bool = True) -> Callable[..., Any]:
        """Load ``path``; returns ``V(js, *args)``, which evaluates ``window.connectomeViewer.<js>``."""
        self.severe()  # drop what earlier pages logged
        self.driver.get(path.as_uri())
        if ready:
            assert self.driver.execute_script("return !!(window.connectomeViewer && window.connectomeViewer.ready)")
        return lambda js, *a: self.driver.execute_script("return window.connectomeViewer." + js, *a)

    def _pointer(self, xy: Any, click: bool) -> None:
        from selenium.webdriver.common.actions.action_builder import ActionBuilder

        ab = ActionBuilder(self.driver)
        act = ab.pointer_action.move_to_location(int(round(xy[0])), int(round(xy[1])))
        if click:
            act.click()
        ab.perform()

    def move(self, xy: Any) -> None:
        self._pointer(xy, click=False)

    def click(self, xy: Any) -> None:
        self._pointer(xy, click=True)

    def severe(self) -> list[dict[str, Any]]:
        """The browser log's errors since the last call (script errors, refused resources)."""
        return [e for e in self.driver.get_log("browser") if e["level"] == "SEVERE"]


@pytest.fixture
def ui(browser) -> UI:
    return UI(browser)


MODEL = """
import torch
import torch.nn as nn


class Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, stride=2, padding=1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        h = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.fc(torch.flatten(torch.nn.functional.adaptive_avg_pool2d(h, 1), 1))


def make():
    torch.manual_seed(0)
    return Small()
"""


@pytest.fixture
def model_file() -> Callable[[Path], str]:
    """``write(folder)`` writes a small CNN's model file ``folder/m.py``; returns its spec ``.../m.py:make``."""

    def write(folder: Path) -> str:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "m.py").write_text(MODEL)
        return f"{folder / 'm.py'}:make"

    return write
