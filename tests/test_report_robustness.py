"""One odd name never breaks the report: text from the data stays text, a bad figure a note.

Sample keys, method and model names here hold what matplotlib (mathtext ``$...$``, LaTeX),
Markdown (tables, emphasis, code, links, HTML) and HTML would interpret. The report must
still be written, show every name as the literal string, keep its Markdown table
rectangular, and hand matplotlib those strings with math parsing and LaTeX off. A figure
whose drawing raises becomes a note on the page and in ``summary.md``; failures while
reading the run or writing the report still raise.

Markdown is checked by rendering it with markdown-it-py (CommonMark plus GitHub's tables
and strikethrough; installed with rich) and reading the HTML back.
"""

from __future__ import annotations

import io
import logging
import os
import re
from html.parser import HTMLParser
from typing import Any

import matplotlib
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from markdown_it import MarkdownIt
from matplotlib.figure import Figure as MplFigure
from matplotlib.text import Text
from PIL import Image
from report_run import _parse, _read, make_synthetic_run

from opticam.report import build_report

#: One sample key per thing an interpreter would act on (each short enough for the
#: gallery to show it whole).
KEYS = (
    "a$\\frac{$b",
    "$x^2$",
    "|pipe|",
    "*bold*",
    "`tick`",
    "<b>x</b>",
    "new\nline",
    "[l](u)_u_",
)
METHODS = ("opticam", "grad$x^2$|cam", "*fake*`cam`<i>\n_x_")
FIGURES = {
    "faithfulness",
    "insertion_deletion",
    "localization",
    "curves",
    "distributions",
    "gallery",
}
#: Tags a literal summary.md may render to; anything else (em, strong, code, a, img, s,
#: b, i, ...) means some text was interpreted.
MARKDOWN_TAGS = {"h1", "p", "blockquote", "table", "thead", "tbody", "tr", "th", "td"}


def _flat(text: str) -> str:
    """How a name reads in Markdown: line breaks become one space (as in HTML)."""
    return re.sub(r"\s*\n\s*", " ", text).strip()


def _markdown_renderer() -> MarkdownIt:
    return MarkdownIt("commonmark").enable(["table", "strikethrough"])


class _MarkdownHtml(HTMLParser):
    """Tags, paragraph texts and table cells of rendered Markdown."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: set[str] = set()
        self.rows: list[list[str]] = []
        self.blocks: list[str] = []  # text of each h1, p, th and td
        self._open: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.add(tag)
        if tag == "tr":
            self.rows.append([])
        if tag in ("h1", "p", "th", "td"):
            self._open = ""

    def handle_endtag(self, tag: str) -> None:
        if tag in ("h1", "p", "th", "td") and self._open is not None:
            if tag in ("th", "td"):
                self.rows[-1].append(self._open)
            self.blocks.append(self._open)
            self._open = None

    def handle_data(self, data: str) -> None:
        if self._open is not None:
            self._open += data


def _render_markdown(text: str) -> _MarkdownHtml:
    parsed = _MarkdownHtml()
    parsed.feed(_markdown_renderer().render(text))
    return parsed


def _tiny_png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (2, 2)).save(buffer, format="PNG")
    return buffer.getvalue()


def _figures_of(result: Any) -> set[str]:
    folder = result.index_url.rsplit("/", 1)[0]
    return {
        url[len(f"{folder}/figures/") : -len(".png")]
        for url in result.files
        if url.startswith(f"{folder}/figures/")
    }


def _hostile_run(root: str, models: tuple[str, ...]) -> str:
    run, _ = make_synthetic_run(
        root, shards=1, per_shard=len(KEYS), keys=KEYS, methods=METHODS, models=models
    )
    return run


@pytest.fixture
def drawn_texts(monkeypatch: pytest.MonkeyPatch) -> list[Text]:
    """Every Text of every figure the report saves, as matplotlib holds it when saving."""
    texts: list[Text] = []
    savefig = MplFigure.savefig

    def recording_savefig(self: MplFigure, *args: Any, **kwargs: Any) -> None:
        texts.extend(self.findobj(Text))
        savefig(self, *args, **kwargs)

    monkeypatch.setattr(MplFigure, "savefig", recording_savefig)
    return texts


def _assert_literal(texts: list[Text], names: list[str]) -> None:
    """Each name reached a figure, and every text holding one is drawn as it is."""
    for name in names:
        assert any(name in t.get_text() for t in texts), f"{name!r} is in no figure"
    from_data = [t for t in texts if any(name in t.get_text() for name in names)]
    for text in from_data:
        assert text.get_parse_math() is False, f"mathtext parses {text.get_text()!r}"
        assert text.get_usetex() is False, f"LaTeX gets {text.get_text()!r}"


@pytest.mark.parametrize(
    "models",
    [("m$\\frac{$1|*m*",), ("demo", "m$\\frac{$2|*m*`<i>\n")],
    ids=["one-model", "two-models"],
)
def test_names_that_markup_would_interpret_are_shown_literally(
    tmp_path, drawn_texts: list[Text], models: tuple[str, ...]
) -> None:
    run = _hostile_run(str(tmp_path), models)
    result = build_report(run, n_boot=20, gallery_size=len(KEYS))

    # Written whole: every figure drawn, none replaced by a note.
    assert _figures_of(result) == FIGURES
    page = _read(result.index_url).decode("utf-8")
    assert "could not be drawn" not in page
    parsed = _parse(page)
    assert [tag for tag, _ in parsed.tags].count("img") == len(FIGURES)
    shown = "".join(parsed.text)
    for name in (*KEYS, *METHODS, *models):
        assert name in shown, name
    assert "<b>x</b>" not in page and "<i>" not in page

    # matplotlib got every key, method (and model, in legends when there are several)
    # as the literal string, with mathtext and LaTeX off.
    names = [*KEYS, *METHODS[1:], *(models if len(models) > 1 else ())]
    _assert_literal(drawn_texts, names)

    # summary.md: one row per (model, method), every row as wide as the header, each name
    # read back as written; nothing rendered as emphasis, code, link, HTML or math.
    markdown = _read(f"{run}/report/summary.md").decode("utf-8")
    assert markdown.endswith(result.summary_markdown)
    rendered = _render_markdown(markdown)
    assert rendered.tags <= MARKDOWN_TAGS, rendered.tags - MARKDOWN_TAGS
    header, *body = rendered.rows
    assert len(body) == len(models) * len(METHODS)
    assert all(len(row) == len(header) for row in body), rendered.rows
    got = {tuple(row[: header.index("images")]) for row in body}
    if len(models) > 1:
        assert got == {(_flat(m), _flat(method)) for m in models for method in METHODS}
    else:
        assert got == {(_flat(method),) for method in METHODS}
        assert f"Model: {_flat(models[0])}" in rendered.blocks
    # GitHub renders $...$ as math: every dollar sign is escaped.
    for line in markdown.splitlines():
        assert "$" not in re.sub(r"\\.", "", line), line


def test_names_never_reach_latex(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    # text.usetex in a user's matplotlibrc would send every label to LaTeX, where
    # `a$\frac{$b` is an error (and LaTeX need not be installed). Saving is replaced by a
    # stub: only which strings matplotlib would send where is checked here.
    texts: list[Text] = []

    def recording_savefig(self: MplFigure, fname: Any, *args: Any, **kwargs: Any) -> None:
        texts.extend(self.findobj(Text))
        fname.write(_tiny_png())

    monkeypatch.setattr(MplFigure, "savefig", recording_savefig)
    models = ("demo", "m$\\frac{$|*m*")
    run = _hostile_run(str(tmp_path), models)
    with matplotlib.rc_context({"text.usetex": True}):
        result = build_report(run, n_boot=20, gallery_size=len(KEYS))
    assert _figures_of(result) == FIGURES
    _assert_literal(texts, [*KEYS, *METHODS[1:], *models])


BOOM = "boom <b>$x$</b> | *y*\nsecond line"


@pytest.mark.parametrize(
    ("figure", "target"),
    [
        ("gallery", "opticam.report.gallery._draw"),
        ("curves", "opticam.report.build.curves_chart"),
        ("faithfulness", "opticam.report.build.bar_chart"),
    ],
)
def test_a_figure_that_cannot_be_drawn_becomes_a_note(
    tmp_path, monkeypatch: pytest.MonkeyPatch, caplog, figure: str, target: str
) -> None:
    run, _ = make_synthetic_run(str(tmp_path), shards=1, per_shard=3)
    before = build_report(run, n_boot=20, gallery_size=2)
    assert _figures_of(before) == FIGURES

    def broken(*args: Any, **kwargs: Any) -> bytes | None:
        raise RuntimeError(BOOM)

    monkeypatch.setattr(target, broken)
    with caplog.at_level(logging.WARNING, logger="opticam.report"):
        result = build_report(run, n_boot=20, gallery_size=2)

    # bar_chart draws the three bar charts: all three fail, each with its own note.
    failed = (
        {"faithfulness", "insertion_deletion", "localization"}
        if figure == "faithfulness"
        else {figure}
    )
    assert _figures_of(result) == FIGURES - failed
    for name in failed:  # the earlier build's picture is gone too
        assert not os.path.exists(f"{run}/report/figures/{name}.png")
    page = _read(result.index_url).decode("utf-8")
    parsed = _parse(page)
    shown = "".join(parsed.text)
    for name in failed:
        assert f"figure '{name}' could not be drawn: RuntimeError: {BOOM}" in shown
    assert "<b>$x$</b>" not in page  # the message is escaped
    assert [tag for tag, _ in parsed.tags].count("img") == len(FIGURES - failed)
    assert "No images to show" not in page

    rendered = _render_markdown(_read(f"{run}/report/summary.md").decode("utf-8"))
    assert rendered.tags <= MARKDOWN_TAGS
    for name in failed:
        assert f"figure '{name}' could not be drawn: RuntimeError: {_flat(BOOM)}" in rendered.blocks

    records = [r for r in caplog.records if r.name == "opticam.report"]
    assert len(records) == len(failed)
    for record in records:
        assert record.levelno == logging.WARNING
        assert record.exc_info is not None and record.exc_info[0] is RuntimeError
    assert "Traceback" in caplog.text and BOOM in caplog.text


@pytest.mark.parametrize(
    ("target", "when"),
    [
        ("opticam.store.atomic_write_bytes", lambda args: True),
        ("opticam.store.read_rows", lambda args: "insertion_curve" in list(args[1])),
    ],
    ids=["writing", "reading-curves"],
)
def test_reading_and_writing_failures_still_raise(
    tmp_path, monkeypatch: pytest.MonkeyPatch, target: str, when: Any
) -> None:
    # Only drawing is forgiven: a report that silently lost its data would be a lie.
    run, _ = make_synthetic_run(str(tmp_path), shards=1, per_shard=3)
    module, name = target.rsplit(".", 1)
    original = getattr(__import__(module, fromlist=[name]), name)

    def failing(*args: Any, **kwargs: Any) -> Any:
        if when(args):
            raise OSError("storage is gone")
        return original(*args, **kwargs)

    monkeypatch.setattr(target, failing)
    with pytest.raises(OSError, match="storage is gone"):
        build_report(run, n_boot=20, gallery_size=2)


# --------------------------------------------------------------------------- markdown_text


LITERALS = [
    "a$\\frac{$b",
    "$x^2$",
    "|pipe|",
    "*bold*",
    "**strong**",
    "_em_ and a_b_c",
    "`tick`",
    "``two``",
    "<b>x</b>",
    "<http://example.com>",
    "[l](http://u)",
    "![i](u)",
    "[ref]",
    "~~gone~~",
    "&lt; &amp;",
    "back\\slash\\",
    "\\*not emphasis\\*",
    "new\nline",
    "crlf\r\nline",
    "# heading",
    "- item",
    "+ item",
    "* item",
    "> quote",
    "1. one",
    "2) two",
    "---",
    "===",
    "    indented",
    "shard-000001.tar",
]


@pytest.mark.parametrize("text", LITERALS)
def test_markdown_text_reads_as_written(text: str) -> None:
    from opticam.report.summary import markdown_text

    escaped = markdown_text(text)
    expected = _flat(text)
    for markdown in (
        escaped,  # a paragraph of its own
        f"> {escaped}",  # a note
        f"| a | b |\n| --- | --- |\n| {escaped} | {escaped} |\n",  # table cells
        f"# Opti-CAM summary — {escaped}",  # a heading
    ):
        rendered = _render_markdown(markdown)
        assert rendered.tags <= MARKDOWN_TAGS, (markdown, rendered.tags)
        if markdown.startswith("|"):
            assert rendered.rows == [["a", "b"], [expected, expected]], markdown
        elif markdown.startswith("#"):
            assert rendered.blocks == [f"Opti-CAM summary — {expected}"], markdown
        else:
            assert rendered.blocks == [expected], markdown


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet="ab 1.-+#>=!*_`~[]()<>&|$\\:/\n\t", max_size=24))
def test_markdown_text_keeps_any_table_cell_literal(text: str) -> None:
    from opticam.report.summary import markdown_text

    row = f"| {markdown_text(text)} | {markdown_text(text)} |"
    rendered = _render_markdown(f"| a | b |\n| --- | --- |\n{row}\n")
    assert rendered.tags <= MARKDOWN_TAGS
    assert rendered.rows == [["a", "b"], [_flat(text), _flat(text)]]
