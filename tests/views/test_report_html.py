"""Report.save_html: one self-contained page with every layer, the plot and the layer graph."""
from __future__ import annotations

import base64
import dataclasses
import re
import shutil
import subprocess

import pytest
import torch

import ptqat_fx
from ptqat_fx import QuantConfig, Select
from ptqat_fx.views.report_html import selection_threshold
from examples import resnet_small, vit_small

pytest.importorskip("matplotlib")
EXAMPLES = {"resnet": (resnet_small.build, (4, 3, 32, 32)), "vit": (vit_small.build, (4, 1, 28, 28))}
FAST = QuantConfig(w_observer="minmax", a_observer="minmax")


@pytest.fixture(scope="module", params=list(EXAMPLES))
def report(request):
    build, shape = EXAMPLES[request.param]
    data = [torch.randn(shape, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    return ptqat_fx.report(ptqat_fx.quantize(build(), (data[0],), data, FAST, progress=False))


def test_page_has_every_layer_row_the_plot_and_the_graph(report, tmp_path):
    html = report.save_html(tmp_path / "report.html").read_text()
    rows = re.findall(r'<tr class="(selected|)">.*?<td class="name">([^<]*)</td>', html)
    assert [name for _, name in rows] == [row.name for row in report.rows]
    assert [bool(chosen) for chosen, _ in rows] == [bool(row.selected) for row in report.rows]
    png = re.search(r'src="data:image/png;base64,([^"]+)"', html)
    assert base64.b64decode(png.group(1)).startswith(b"\x89PNG\r\n\x1a\n")
    assert html.count("<svg") == 1 and "<script>" in html
    assert "src=\"http" not in html and "href=\"http" not in html  # self-contained
    threshold = selection_threshold(report)
    assert f"<dd>small-discrepancy half by accumulated relative error, theta {threshold:.3g}</dd>" in html
    assert "Select(" not in html


def test_threshold_separates_selected_from_frozen_layers(report):
    threshold = selection_threshold(report)
    assert max(r.discrepancy for r in report.rows if r.selected) < threshold
    assert min(r.discrepancy for r in report.rows if not r.selected) > threshold


def test_threshold_is_theta_when_given_and_absent_for_random(report):
    assert selection_threshold(dataclasses.replace(report, select=Select(theta=0.07))) == 0.07
    assert selection_threshold(dataclasses.replace(report, select=Select(strategy="random"))) is None


@pytest.mark.slow
def test_headless_chromium_renders_the_page(report, tmp_path):
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("chromium is not installed")
    from matplotlib import pyplot as plt

    page = report.save_html(tmp_path / "report.html")
    shot = tmp_path / "shot.png"
    subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
         "--window-size=1100,1400", f"--screenshot={shot}", page.as_uri()],
        capture_output=True, timeout=60, check=True,
    )
    pixels = plt.imread(shot)
    assert pixels.shape[:2] == (1400, 1100)
    green = (abs(pixels[..., 0] - 0x1A / 255) < 0.02) & (abs(pixels[..., 1] - 0x98 / 255) < 0.02)
    assert green.sum() > 500  # the selected bars of the plot were drawn
