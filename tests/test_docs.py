"""`make docs` renders every notebook to a page, with an index page and working sidebar links."""
import re
from pathlib import Path

from conftest import ROOT
from hrda.devtools import build_docs, list_notebooks, page_name


def test_docs_build_without_quarto(tmp_path):
    out = build_docs(ROOT, out=tmp_path / "docs", use_quarto=False)
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
