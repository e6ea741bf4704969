"""CI-only: report.html in headless Debian chromium, every image decoded (``make test-browser``).

Installs nothing itself; where /usr/bin/chromium is absent the test is skipped with a note.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from deconcnn_cli.export.report import build_report
from tests.browser import CHROMIUM, chromium
from tests.export.synthetic import write_grid

DOCS = Path(__file__).parents[2] / "docs" / "report.md"

# Run after the load event: one line listing every <img> with its decoded size.
_PROBE = """<script>
window.addEventListener("load", function () {
  var rows = Array.from(document.images).map(function (im) {
    return [im.alt, im.complete, im.naturalWidth, im.naturalHeight];
  });
  var pre = document.createElement("pre");
  pre.id = "img-check";
  pre.textContent = "IMG" + "CHECK:" + JSON.stringify(rows) + ":END" + "CHECK";
  document.body.appendChild(pre);
});
</script>"""


@pytest.mark.browser
def test_report_html_loads_with_every_image(tmp_path: Path):
    if not CHROMIUM.exists():
        pytest.skip("no /usr/bin/chromium: the browser suite runs in CI (make test-browser)")
    root = tmp_path / "sweep"
    write_grid(root, seeds=1, steps=200, steps_per_epoch=10, curvature_every=50, lr_fits=True)
    report = build_report(root, tmp_path / "report")
    page = report.html.read_text()
    probe_page = tmp_path / "report" / "probe.html"
    probe_page.write_text(page.replace("</body>", _PROBE + "</body>"))
    proc = chromium(probe_page.as_uri(), tmp_path / "chrome-profile", "--dump-dom")
    match = re.search(r"IMGCHECK:(\[.*?\]):ENDCHECK", proc.stdout, flags=re.S)
    assert match, f"no probe output; stderr: {proc.stderr[-2000:]}"
    images = json.loads(match.group(1))
    assert [alt for alt, *_ in images] == list(report.figures)
    documented = re.findall(r"^\| `([a-z_0-9]+)\.png` \|", DOCS.read_text(), flags=re.M)
    assert sorted(alt for alt, *_ in images) == sorted(documented)  # every figure the docs list
    for alt, complete, width, height in images:
        assert complete and width > 200 and height > 100, (alt, width, height)
    # the report itself, unmodified, renders to a screenshot
    shot = tmp_path / "shot.png"
    chromium(report.html.as_uri(), tmp_path / "chrome-profile2", f"--screenshot={shot}",
              "--window-size=1280,2000")  # fmt: skip
    assert shot.read_bytes().startswith(b"\x89PNG")
