"""`make docs` renders every notebook to a page, with an index page and working sidebar links."""
import html
import re
from pathlib import Path

import pytest

from conftest import ROOT
from hrda.devtools import build_docs, list_notebooks, page_name


@pytest.fixture(scope="module")
def docs(tmp_path_factory):
    "The HTML docs, built once without Quarto."
    return build_docs(ROOT, out=tmp_path_factory.mktemp("docs") / "docs", use_quarto=False)


def test_docs_build_without_quarto(docs):
    out = docs
    assert (out / "index.html").exists()
    for nb in list_notebooks(ROOT):
        page = out / page_name(nb.relative_to(ROOT / "nbs"))
        assert page.exists(), f"no page for {nb.name}"
    for page in out.rglob("*.html"):
        text = page.read_text()
        sidebar = re.search(r'<nav class="hrda-sidebar">(.*?)</nav>', text, re.S)
        assert sidebar, f"{page.name} has no sidebar"
        for href in re.findall(r'href="([^"#]+)"', sidebar.group(1)):
            assert (page.parent / href).resolve().exists(), f"{page.name}: broken sidebar link {href}"
        assert 'target="_blank" style=' not in re.sub(r"<[^>]+>", "", text), f"{page.name} shows Quarto link attributes as text"
        for src in re.findall(r'<img[^>]+src="([^"]+)"', text):
            if not src.startswith(("data:", "http")):
                assert (page.parent / src).exists(), f"{page.name}: broken image {src}"
    nav = re.search(r'<nav class="hrda-sidebar">(.*?)</nav>', (out / "index.html").read_text(), re.S).group(1)
    assert nav.count("index.html") == 1, "the sidebar lists the index page once"
    assert "coerce_value" in (out / "core.html").read_text() and "atomic_write" in (out / "files.html").read_text()


def page_problems(page_html: str) -> list[str]:
    "What a rendered page shows wrongly: markdown links as text, headings over nothing, a colon followed by nothing."
    main = page_html[page_html.find("</nav>"):]
    text = html.unescape(re.sub(r"<[^>]+>", "", main))
    problems = [f"markdown link shown as text: {m.group(0)}" for m in re.finditer(r"\[`[^`\]]+`\]\([^)\s]*\)", text)]
    heads = list(re.finditer(r"<h([1-6])[^>]*>(.*?)</h\1>", main, re.S))
    for head, after in zip(heads, heads[1:] + [None]):
        between = main[head.end():after.start() if after else len(main)]
        empty = not html.unescape(re.sub(r"<[^>]+>", "", between)).replace("¶", "").strip() and "<img" not in between
        if empty and (after is None or int(after.group(1)) <= int(head.group(1))):
            problems.append("empty section: " + html.unescape(re.sub(r"<[^>]+>", "", head.group(2))).replace("¶", ""))
    for m in re.finditer(r"<p>((?:(?!</p>).)*?):</p>(?:\s|</?div[^>]*>)*(?=<h[1-6]|</main>|</body>)", main, re.S):
        problems.append("a sentence ends in ':' and nothing follows: " + re.sub(r"<[^>]+>", "", m.group(1))[-60:])
    return problems


def test_page_checks_catch_each_artefact():
    nav = '<nav class="hrda-sidebar"></nav>'
    assert page_problems(nav + "<h2>A</h2><p>text</p><h3>B</h3><p>more</p>") == []
    assert page_problems(nav + "<pre># from [`f`](m.html#f)</pre>") == ["markdown link shown as text: [`f`](m.html#f)"]
    assert page_problems(nav + "<h2>A</h2>\n<div></div><h2>B</h2><p>x</p>") == ["empty section: A"]
    assert page_problems(nav + "<p>The keys that must agree:</p>\n</div></div><h2>Next</h2><p>x</p>") == \
        ["a sentence ends in ':' and nothing follows: The keys that must agree"]


def test_docs_show_figures_option_comments_and_no_artefacts(docs):
    from fastcore.docments import docments
    from hrda.config import PARTS
    out = docs
    problems = [f"{page.name}: {p}" for page in sorted(out.rglob("*.html")) for p in page_problems(page.read_text())]
    assert not problems, "\n".join(problems[:20])
    index = (out / "index.html").read_text()
    assert re.search(r'<img[^>]+src="reports/demo/figures/[^"]+\.png"', index), "the index shows the demo's figure"
    for page in ("config.html", "train.html"):  # the options table is a stored output: re-run its cell after a change
        shown = html.unescape(re.sub(r"<[^>]+>", "", (out / page).read_text()))
        missing = [f"{part.__name__}.{name}" for part in PARTS.values()
                   for name, note in docments(part).items() if name != "return" and (not note or note not in shown)]
        assert not missing, f"options whose comment {page} does not show (re-run the table cell of its notebook): {missing}"
    assert 'href="config.html"' in (out / "train.html").read_text(), "the training page links to the config page"
