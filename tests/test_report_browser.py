"""`midtrain report` of a real run of the built-in loop (micro recipe, every default hook), opened
in a real headless browser (Debian's chromium, installed by .ci/run): every image of the page loads,
and a screenshot of it is not blank. Skipped, saying why, only where chromium is not installed. Without a browser: the report shows
exactly what `midtrain recommend` makes for the run.

``screenshot`` is also how docs/img/report.png was made (docs/report.md)."""

import json
import os
import re
import shutil
import subprocess

import numpy as np
import pytest
import torch

CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser")) if p), None)
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed: .ci/run installs Debian's "
                                "(apt-get install -y --no-install-recommends chromium); the report's browser check "
                                "needs it")

MARKER = "midtrain-images"
PROBE = """<script>window.addEventListener("load", function () {
  var out = Array.prototype.map.call(document.images, function (i) {
    return {alt: i.alt, ok: i.complete && i.naturalWidth > 0, width: i.naturalWidth}; });
  var pre = document.createElement("pre"); pre.id = "%s"; pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre); });</script>""" % MARKER


def _chromium(args, profile, timeout=120):
    """Run headless chromium (root needs --no-sandbox; a profile per call keeps parallel runs apart)."""
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
           f"--user-data-dir={profile}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def screenshot(html_path, png_path, width=1280, height=2400, profile=None):
    """A PNG of the top ``width`` x ``height`` pixels of the page as chromium renders it."""
    profile = profile or os.path.join(os.path.dirname(os.path.abspath(png_path)), ".chromium-profile")
    res = _chromium([f"--window-size={width},{height}", f"--screenshot={os.path.abspath(png_path)}",
                     "file://" + os.path.abspath(html_path)], profile)
    assert os.path.exists(png_path), f"chromium wrote no screenshot: {res.stderr[-2000:]}"
    return png_path


def images_loaded(html_path, tmp_path) -> list[dict]:
    """Every <img> of the page as the browser loaded it: a copy of the page with a script that lists
    them (complete and naturalWidth > 0) in a DOM marker once the page has loaded, read with --dump-dom."""
    copy = tmp_path / "probe.html"
    copy.write_text(open(html_path, encoding="utf-8").read().replace("</body>", PROBE + "</body>"), encoding="utf-8")
    res = _chromium(["--dump-dom", copy.as_uri()], tmp_path / "profile")
    m = re.search(rf'<pre id="{MARKER}">(.*?)</pre>', res.stdout, re.S)
    assert m, f"the page's load event never ran in chromium: {res.stderr[-2000:]}"
    import html

    return json.loads(html.unescape(m.group(1)))


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    import matplotlib

    matplotlib.use("Agg")
    from diagnostics.report import write_report
    from midtrain.loop import train
    from tests.midtrain.conftest import micro_config

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = tmp_path_factory.mktemp("report") / "run"
        cfg = micro_config(steps=(16, 10, 6))
        train(cfg, str(out), progress=False, strict_hooks=True)  # every default hook
        branch = out.parent / "branch"   # the same recipe again from step 20: overlaid, and a branch of the run
        train(cfg, str(branch), parent=str(out), parent_step=20, progress=False, strict_hooks=True)
    finally:
        torch.set_num_threads(old)
    return write_report(out, compare=[branch])


@needs_chromium
def test_every_image_of_the_report_loads_in_chromium(report, tmp_path):
    text = report.read_text()
    n = text.count("<img ")
    assert n >= 12  # phases, validation loss, GNS and per layer, representations and information plane,
    # difficulty and data map, LR schedule, the overlays of loss, GNS and LR with the branch (and GNS per
    # domain once the hook writes gns/domain/<d>/b_simple)
    assert "same branch" in text and text.count("runs compared") >= 4
    assert 'class="failed"' not in text
    imgs = images_loaded(report, tmp_path)
    assert len(imgs) == n
    bad = [i["alt"] for i in imgs if not i["ok"]]
    assert not bad, f"images that did not load: {bad}"
    assert min(i["width"] for i in imgs) > 100


@needs_chromium
def test_a_screenshot_of_the_report_is_not_blank(report, tmp_path):
    import matplotlib.image

    png = screenshot(report, tmp_path / "shot.png", profile=tmp_path / "profile")
    img = matplotlib.image.imread(png)[..., :3]
    assert img.shape[:2] == (2400, 1280)
    gray = img.mean(axis=2)
    assert gray.std() > 0.05                                          # not one flat colour
    assert np.mean(np.abs(gray - np.median(gray)) > 0.1) > 0.05       # at least 5% of the pixels are drawn
    assert len(np.unique((img * 255).astype(np.uint8).reshape(-1, 3), axis=0)) > 100   # figures, not just text


def test_the_report_shows_what_midtrain_recommend_makes(report, capsys):
    from midtrain.cli import main

    run_dir = report.parent
    assert main(["recommend", str(run_dir), "--json"]) == 0
    made = json.loads(capsys.readouterr().out)
    text = report.read_text()
    shown = dict(re.findall(r'<div class="rec" id="rec-(\w+)"><h3>\w+: ([^ <]+) ', text))
    assert made["recommendations"] and shown == {r["name"]: f"{r['value']:.4g}" for r in made["recommendations"]}
    for name in made["not_available"]:
        assert f"{name}: not available" in text
