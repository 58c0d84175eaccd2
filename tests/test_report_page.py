"""opticam.report.page: a self-contained page, text from the run never markup, secrets redacted."""

from __future__ import annotations

import base64
import io
import json

from PIL import Image
from report_run import METHODS, _parse, _read

from opticam import store
from opticam.config import RunConfig
from opticam.report import build_report
from opticam.report.gallery import Gallery, GalleryItem
from opticam.report.page import Figure, PageContent, redact, render_index


def test_html_is_self_contained(full_run, full_report) -> None:
    run, _ = full_run
    text = _read(full_report.index_url).decode("utf-8")
    parsed = _parse(text)
    images = [attrs for tag, attrs in parsed.tags if tag == "img"]
    assert len(images) == 6  # five figures and the gallery
    for attrs in images:
        src = attrs["src"] or ""
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1]).startswith(b"\x89PNG\r\n\x1a\n")
    tags = {tag for tag, _ in parsed.tags}
    assert "script" not in tags and "link" not in tags and "iframe" not in tags
    for _, attrs in parsed.tags:
        for name in ("src", "href"):
            value = attrs.get(name) or ""
            assert not value.startswith(("http:", "https:", "//")), value
    links = {attrs.get("href") for tag, attrs in parsed.tags if tag == "a"}
    assert {"summary.md", "summary.parquet"} <= links
    assert parsed.body_rows == len(METHODS)
    assert parsed.headers[:3] == ["method", "images", "AD ↓"]
    assert "AG ↑" in parsed.headers and "Del ↓" in parsed.headers
    # Config shown without secrets; error counts shown.
    assert "do-not-show-me" not in text and "AKIA-not-real" not in text
    shown = "".join(parsed.text)
    assert '"steps": 8' in shown
    assert "bad <jpg>" in shown and "bad <jpg>" not in text  # escaped error message
    assert "error rows" in text


HOSTILE = '<script>alert("x")</script> & \'"><img src=x onerror=alert(1)>'


def _tiny_png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (2, 2)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_text_from_the_run_is_never_markup() -> None:
    # Every place where data from the run reaches the page: method and model names, keys,
    # shard URLs, stages, error messages, notes, config values and package versions.
    png = _tiny_png()
    row = {"model": f"m{HOSTILE}", "method": f"opticam{HOSTILE}", "images": 3}
    row.update(average_drop=1.0, average_drop_ci_low=0.5, average_drop_ci_high=1.5)
    other = {**row, "model": "plain", "method": "gradcam"}
    item = GalleryItem(
        shard=f"s3://b/{HOSTILE}.tar", key=f"k{HOSTILE}", label=1, predicted=1, target=1
    )
    content = PageContent(
        run_id=f"run{HOSTILE}",
        run_url=f"s3://bucket/{HOSTILE}",
        run_json={
            "config": {"model": {"source": f"demo{HOSTILE}"}, "note": HOSTILE},
            "versions": {f"pkg{HOSTILE}": HOSTILE},
        },
        summary=[row, other],
        counts=[(f"count{HOSTILE}", HOSTILE)],
        notes=[f"note{HOSTILE}"],
        figures=[Figure("faithfulness.png", f"title{HOSTILE}", f"caption{HOSTILE}", png)],
        gallery=Gallery(f"model{HOSTILE}", [f"opticam{HOSTILE}"], [item], [HOSTILE], png),
        errors_by_stage={f"stage{HOSTILE}": 1},
        error_rows=[
            {"shard": f"s3://b/{HOSTILE}", "key": HOSTILE, "stage": "decode", "message": HOSTILE}
        ],
    )
    text = render_index(content)
    parsed = _parse(text)
    tags = [tag for tag, _ in parsed.tags]
    assert "script" not in tags
    assert tags.count("img") == 2  # the figure and the gallery, nothing injected
    assert not any(name.startswith("on") for _, attrs in parsed.tags for name in attrs)
    assert "<script>" not in text and 'alert("x")' not in text
    # The text reads exactly as given, once the page's character references are resolved.
    shown = "".join(parsed.text)
    for expected in (
        f"opticam{HOSTILE}",
        f"m{HOSTILE}",
        f"note{HOSTILE}",
        f"count{HOSTILE}",
        f"stage{HOSTILE}",
        f"k{HOSTILE}",
        f"caption{HOSTILE}",
        f"Opti-CAM report — run{HOSTILE}",
        json.dumps(HOSTILE),  # the config, as JSON
        f"pkg{HOSTILE}",
        f"s3://bucket/{HOSTILE}",
    ):
        assert expected in shown, expected
    alts = [attrs.get("alt") for tag, attrs in parsed.tags if tag == "img"]
    assert alts == [f"title{HOSTILE}", f"saliency maps of k{HOSTILE}"]
    titles = [attrs.get("title") for tag, attrs in parsed.tags if tag == "th" and "title" in attrs]
    assert titles == ["Average Drop: lower is better"]


def test_redact_removes_secret_looking_values() -> None:
    config = {
        "data": "s3://user:hunter2@bucket/x.tar",
        "storage_options": {"key": "k"},
        "nested": [{"aws_secret_access_key": "s", "token": "t", "target_layer": "layer4"}],
    }
    public = redact(config)
    assert public["data"] == "s3://user:<redacted>@bucket/x.tar"
    assert public["storage_options"] == "<redacted>"
    assert public["nested"][0] == {
        "aws_secret_access_key": "<redacted>",
        "token": "<redacted>",
        "target_layer": "layer4",
    }


def test_the_page_shows_the_normalization_and_layer_the_model_applied(tmp_path) -> None:
    config = RunConfig(data=f"{tmp_path}/d/shard-0.tar", output=f"{tmp_path}/runs")
    run = store.run_url(config.output, config.run_id)
    applied = {"target_layer": "features.12", "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.2, 1]}
    store.write_run_json(run, config, [], loaded_model=applied)
    text = _read(build_report(run).index_url).decode("utf-8")
    assert "input normalization <code>mean (0.5, 0.5, 0.5), std (0.25, 0.2, 1)</code>" in text
    assert "target layer <code>features.12</code>" in text
    assert "loaded_model" in text  # and in the run configuration shown below
    store.write_run_json(run, config, [], loaded_model={**applied, "mean": None, "std": None})
    text = _read(build_report(run).index_url).decode("utf-8")
    assert "input normalization <code>none applied by opticam" in text


def test_best_mean_is_bold_by_displayed_value() -> None:
    from opticam.names import METRICS_BY_NAME
    from opticam.report.page import _best

    drop, gain = METRICS_BY_NAME["average_drop"], METRICS_BY_NAME["average_gain"]
    rows = [
        {"model": "a", "average_drop": 1.04, "average_gain": 5.0},
        {"model": "a", "average_drop": 1.01, "average_gain": 5.0},
        {"model": "a", "average_drop": 3.0, "average_gain": 5.0},
        {"model": "b", "average_drop": 9.0, "average_gain": None},
    ]
    assert _best(rows, drop) == {0, 1}  # both read 1.0; lower is better
    assert _best(rows, gain) == set()  # all tie: nothing stands out; b has one method
