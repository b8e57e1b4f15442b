"""The graph page in a real browser: headless Chromium loads it offline with no script error, draws every node's
label, shows a node's details on hover and zooms on the wheel (the page's `#selftest` hook drives both)."""
from __future__ import annotations

import html
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

import ember
from ember.optimizer.graph_view import layout_graph, write_graph

BROWSERS = ("chromium", "chromium-browser")
"""Debian's `chromium` package installs /usr/bin/chromium; other distributions call it chromium-browser."""
BROWSER_SECONDS = 90


@pytest.fixture(scope="module")
def browser() -> str:
    found = next((path for path in map(shutil.which, BROWSERS) if path), None)
    if found is None:
        message = "Chromium is not installed (Debian: apt-get install -y chromium); the graph page was not loaded"
        if os.environ.get("CI"):
            pytest.fail(message + ", and CI must run this test")
        pytest.skip(message)
    return found


@pytest.fixture(scope="module")
def report():
    model = torch.nn.Sequential(torch.nn.Linear(16, 33), torch.nn.GELU(), torch.nn.LayerNorm(33),
                                torch.nn.Linear(33, 7), torch.nn.Softmax(-1))
    return ember.inspect(model, (torch.randn(5, 16),), device="h100")


@pytest.fixture(scope="module")
def page(report, tmp_path_factory) -> Path:
    return write_graph(report, tmp_path_factory.mktemp("graph") / "graph.html")


def _chromium(browser: str, profile: Path, *arguments: str) -> subprocess.CompletedProcess:
    """Run headless Chromium with a profile of its own, its console on stderr."""
    command = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
               "--no-first-run", f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0",
               "--virtual-time-budget=5000", *arguments]
    return subprocess.run(command, capture_output=True, text=True, timeout=BROWSER_SECONDS, check=False)


@pytest.fixture(scope="module")
def loaded(browser, page, tmp_path_factory) -> tuple[str, str]:
    """The DOM after the page's script ran its self test, and the browser's log."""
    done = _chromium(browser, tmp_path_factory.mktemp("profile"), "--dump-dom", page.as_uri() + "#selftest")
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout, done.stderr


def test_the_page_loads_without_script_errors(loaded, report):
    dom, log = loaded
    console = [line for line in log.splitlines() if ":CONSOLE" in line]
    assert not console, "\n".join(console)
    assert "Uncaught" not in log
    assert f'data-ember-ready="{len(report.rows)}"' in dom


def test_every_node_is_drawn_with_its_name(loaded, report):
    dom, _ = loaded
    labels = re.findall(r'<text [^>]*class="name"[^>]*>([^<]*)</text>', dom)
    assert sorted(labels) == sorted(row.name for row in report.rows)
    assert len(re.findall(r'<g class="node[^"]*" data-i=', dom)) == len(report.rows)


def test_hover_shows_the_costliest_nodes_details_and_the_wheel_zooms(loaded, report):
    dom, _ = loaded
    found = re.search(r'<pre id="ember-selftest" hidden="">(.*?)</pre>', dom)
    assert found, "the page's self test did not run"
    result = json.loads(html.unescape(found.group(1)))
    costliest = report.costliest(1)[0]
    assert result["focused"] == costliest.index and result["hovering"] == 1 and result["zoomed"]
    edges = layout_graph(report.graph).edges
    assert result["lit"] == sum(costliest.index in edge for edge in edges) > 0
    tooltip = result["tooltip"]
    for expected in (costliest.name, costliest.op, "[5,7] f32", f"{costliest.predicted_us:,.1f} µs", "fusion group"):
        assert expected in tooltip


def test_the_page_fetches_nothing(page):
    text = page.read_text()
    assert not re.search(r"""(src|href)\s*=|@import|<link|url\(\s*['"]?(https?:|//)""", text)


def test_the_screenshot_shows_the_costliest_node_in_its_colour(browser, page, report, tmp_path):
    matplotlib_image = pytest.importorskip("matplotlib.image")
    shot = tmp_path / "graph.png"
    done = _chromium(browser, tmp_path / "profile", f"--screenshot={shot}", "--window-size=1200,900", page.as_uri())
    assert done.returncode == 0 and shot.exists(), done.stderr[-2000:]
    pixels = matplotlib_image.imread(shot)[..., :3]
    fill = re.search(rf"""data-i='{report.costliest(1)[0].index}'[^>]*><rect [^>]*fill='(#[0-9a-f]{{6}})'""",
                     page.read_text()).group(1)
    colour = torch.tensor([int(fill[i:i + 2], 16) / 255 for i in (1, 3, 5)])
    close = (torch.from_numpy(pixels.copy()) - colour).abs().amax(dim=-1) < 0.02
    assert close.sum() > 2000  # a box of about 150 x 34 px, less its label
