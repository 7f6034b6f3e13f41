"""The report: built from the catalog only, every section present, rendered in a real browser."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from sae_transfer.report.build import build_report
from tests import _synthetic_results as synth

SECTIONS = ["findings", "transfer", "outliers", "segments", "finetune", "weights", "positions", "training", "drift",
            "activation-diff", "diffing"]


def test_report_has_every_section_with_tables_and_figures(tmp_path):
    synth.fill(tmp_path)
    paths = build_report(tmp_path, synth.BASE, synth.CHAT, title="test study")
    page = paths.html.read_text()
    for slug in SECTIONS:
        assert f'id="{slug}"' in page
    assert page.count("<table") >= 6
    assert "no rows yet" not in page
    assert page.count("data:image/png;base64,") >= 9  # the transfer heatmap and the three diffing figures among them
    # a chat-only latent card with its context, tokens shaded by activation
    assert "latent 2</b> (chat-only) rho 0.900" in page and "&lt;|user|&gt;</span>" in page and "rgba(214,39,40,1.00)" in page
    # one sentence per research question, numbers and intervals from the synthetic rows
    assert ("On the chat model (plain text, outliers excluded) the base SAE recovers 93.0 % [92.0, 94.0] of CE loss "
            "vs 97.0 % [96.0, 98.0] for the chat SAE") in page
    assert ("What changed inside: the crosscoder calls 1 of 5 live latents chat-only, 1 base-only, 2 shared and 1 "
            "changed") in page
    assert "the token whose activation moves most from base to chat is &#x27;&lt;|user|&gt;&#x27;" in page
    assert "6.0x the typical token" in page and "chat-sae:abc:1 (0.93)" in page and "&lt;NA&gt;" not in page
    # the changed latent, grounded in the activation difference's top token along its direction
    assert "<td>4</td><td>0.5</td><td>0.1</td><td>1.3</td><td>1</td><td>0.01</td><td>&lt;|user|&gt;</td><td>1</td>" in page
    assert "ablating 1 latents that appear on chat costs KL 0.1 nats/token vs 0.01 for a random set" in page
    assert "the base SAE fine-tuned" not in page and "recovers 96.0 % [95.0, 97.0] on the chat model" in page
    md = paths.markdown.read_text()
    assert "| hook | sae | model | l0 |" in md and "**outlier summary**" in md
    assert all(p.stat().st_size > 1000 for p in paths.figures)


def test_report_on_empty_results_says_so(tmp_path):
    paths = build_report(tmp_path, synth.BASE, synth.CHAT)
    assert "no rows yet" in paths.html.read_text()


@pytest.mark.skipif(not shutil.which("chromium"), reason="needs Debian's chromium (installed by .ci/run)")
def test_report_renders_in_headless_chromium(tmp_path):
    synth.fill(tmp_path)
    paths = build_report(tmp_path, synth.BASE, synth.CHAT)
    args = ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run(args + ["--dump-dom", paths.html.as_uri()], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert dom.stdout.count("<table") >= 6 and "Transfer matrix" in dom.stdout
    # every table fits the page width: no horizontal scroll at a laptop window size
    probe = tmp_path / "probe.html"
    probe.write_text(paths.html.read_text().replace(
        "</body>",
        "<script>document.body.dataset.overflow = document.documentElement.scrollWidth > window.innerWidth;</script></body>"))
    fit = subprocess.run(args + ["--window-size=1280,2000", "--dump-dom", probe.as_uri()], capture_output=True, text=True,
                         timeout=120)
    assert 'data-overflow="false"' in fit.stdout
    shot = tmp_path / "report.png"
    subprocess.run(args + [f"--screenshot={shot}", "--window-size=1280,2400", paths.html.as_uri()],
                   capture_output=True, timeout=120, check=True)
    assert shot.stat().st_size > 20_000
