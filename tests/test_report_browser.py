"""The report opens in a real browser, offline: every image decodes, the summary table is there.

Headless Chromium (Debian's ``chromium``; ``.ci/install-chromium`` installs it) loads a
copy of ``index.html`` to which a small inline script is appended. On the page's ``load``
event the script writes what it finds (each ``<img>``'s ``complete`` and
``naturalWidth``, the rows of ``table#summary``, the resources the page fetched) as JSON
into a ``<pre>``; ``--dump-dom`` prints the DOM after loading and the test reads the
JSON back. Name resolution is mapped to nothing, so a page that needed the network would
show broken images here.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
from report_run import METHODS, make_synthetic_run

from opticam.report import build_report

pytestmark = pytest.mark.e2e

CHROMIUM = os.environ.get("OPTICAM_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",  # runs as root in CI containers
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--host-resolver-rules=MAP * ~NOTFOUND",  # no network, whatever the page asks for
    "--virtual-time-budget=10000",  # wait until the page is idle (images decoded)
)

# Appended before </body>: collects the checks into <pre id="opticam-check">.
CHECK_SCRIPT = """
<script>
window.addEventListener("load", () => {
  const table = document.querySelector("table#summary");
  const result = {
    images: Array.from(document.images).map((img) => ({
      complete: img.complete,
      width: img.naturalWidth,
      height: img.naturalHeight,
      scheme: img.getAttribute("src").split(":", 1)[0],
    })),
    summaryRows: table && table.tBodies.length ? table.tBodies[0].rows.length : -1,
    headers: table ? Array.from(table.tHead.rows[0].cells).map((c) => c.textContent) : [],
    resources: performance.getEntriesByType("resource").map((e) => e.name),
  };
  const out = document.createElement("pre");
  out.id = "opticam-check";
  out.textContent = JSON.stringify(result);
  document.body.appendChild(out);
});
</script>
"""


def _chromium() -> str:
    if not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)):
        pytest.fail(
            f"headless Chromium not found at {CHROMIUM}: run `.ci/install-chromium` "
            "(installs Debian's chromium with apt-get), or set OPTICAM_CHROMIUM to a "
            "Chromium/Chrome binary",
            pytrace=False,
        )
    return CHROMIUM


def _check_in_browser(index_html: Path) -> dict:
    """Load a copy of ``index_html`` with :data:`CHECK_SCRIPT` and return its findings."""
    browser = _chromium()
    page = index_html.read_text(encoding="utf-8")
    assert page.count("</body>") == 1
    probe = index_html.with_name("browser-check.html")
    probe.write_text(page.replace("</body>", CHECK_SCRIPT + "</body>"), encoding="utf-8")
    profile = tempfile.mkdtemp(prefix="opticam-chromium-")
    try:
        done = subprocess.run(
            [browser, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--dump-dom", probe.as_uri()],
            capture_output=True,
            text=True,
            timeout=90,
            check=False,
        )
    finally:
        shutil.rmtree(profile, ignore_errors=True)
    match = re.search(r'<pre id="opticam-check">(.*?)</pre>', done.stdout, re.S)
    assert match, (
        f"the check script left no result (chromium exit {done.returncode}); "
        f"stderr tail:\n{done.stderr[-2000:]}"
    )
    # The JSON sits in a text node: the DOM dump escapes &, < and >.
    text = match.group(1).replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&")
    return json.loads(text)


def test_report_renders_offline_in_chromium(tmp_path: Path) -> None:
    run, _ = make_synthetic_run(str(tmp_path), shards=2, per_shard=3)
    result = build_report(run, n_boot=50, gallery_size=2)
    found = _check_in_browser(Path(result.index_url))

    assert len(found["images"]) == 6  # five metric figures and the gallery
    for image in found["images"]:
        assert image["scheme"] == "data"
        assert image["complete"] and image["width"] > 0 and image["height"] > 0, image
    assert found["summaryRows"] == len(result.summary) == len(METHODS)
    assert found["headers"][:3] == ["method", "images", "AD ↓"]
    assert "AG ↑" in found["headers"]
    assert found["resources"] == []  # nothing fetched: the page is self-contained


def test_empty_report_renders_in_chromium(tmp_path: Path) -> None:
    run, _ = make_synthetic_run(str(tmp_path), shards=1, per_shard=2, finished=0)
    result = build_report(run)
    found = _check_in_browser(Path(result.index_url))
    assert found["images"] == []
    assert found["summaryRows"] == 0
    assert found["resources"] == []
