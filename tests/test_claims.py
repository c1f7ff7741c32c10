"""Every number the README and the report READMEs state comes from a committed file that the same paragraph, bullet
or table row cites (a results JSON, a table, a benchmark file, an experiment file), so that no claim can drift from
the evidence behind it."""
import json
import re
from pathlib import Path

import pytest

from conftest import ROOT

CITED = re.compile(r"(?<![\w/.-])((?:reports|experiments|tests|benchmarks|data_prep)/[\w.*/-]*[\w*])")
NUMBER = re.compile(r"(?<![\w.^])[+−-]?\d+(?:,\d{3})*(?:\.\d+)?(?![\w])")
SCALES = (1, 1000, 0.001, 100, 0.01, 60, 1 / 60)  # the units a text may convert: MB↔GB, ms↔s, fraction↔%, s↔min
UNTRACED_SECTIONS = {"Code map", "Repository layout", "Other commands"}  # names and paths only, no measurements


def blocks(markdown: str, skip_sections=frozenset()) -> list[tuple[str, str]]:
    "(section heading, block, lead-in paragraph): paragraphs, list items and table rows, without code blocks."
    markdown = re.sub(r"```.*?```", "", markdown, flags=re.S)
    out, section, lead = [], "", ""
    for chunk in re.split(r"\n\s*\n", markdown):
        lines = chunk.strip().splitlines()
        if not lines: continue
        if lines[0].startswith("#"):
            section = lines[0].lstrip("#").strip()
            lines = lines[1:]
        if section in skip_sections: continue
        items, current = [], []
        if lines and not (lines[0].startswith("|") or re.match(r"\s*(?:[-*]|\d+\.)\s", lines[0])): lead = ""
        for line in lines:  # a table row or a list item is its own block; a paragraph continues
            if line.startswith("|") or re.match(r"\s*(?:[-*]|\d+\.)\s", line):
                if current: items.append(" ".join(current))
                current = [line]
                if line.startswith("|"): items.append(line); current = []
            else: current.append(line)
        if current: items.append(" ".join(current))
        for item in items:  # a table row or list item also carries the citations of the paragraph that leads into it
            if item.strip() and not re.fullmatch(r"[|\s:-]+", item):
                out.append((section, item, lead))
            if not (item.startswith("|") or re.match(r"\s*(?:[-*]|\d+\.)\s", item)): lead = item
    return out


def numbers_of_text(text: str) -> list[str]:
    "The numbers a reader sees: outside code spans, links' targets and image paths, identifiers and versions."
    text = re.sub(r"`[^`]*`", " ", text)
    text = re.sub(r"\]\([^)]*\)", "]", text)
    text = re.sub(r"\b[\w.-]*\d[\w.-]*\.(?:png|jpg|md|json|yaml|ipynb|py|txt)\b", " ", text)
    text = re.sub(r"\b(?:[A-Za-z]+[-_]?\d[\w.]*|\d+[A-Za-z]\w*)\b", " ", text)  # MiT-B5, mIoU16, 2nd, bf16, H100
    text = re.sub(r"\d+(?:\.\d+)+(?:\.\d+)", " ", text)  # versions such as 2.14.1
    text = re.sub(r"§\s?[\d.]+|\b(?:Table|Tables|Fig\.|Eq\.|section|sections)\s+[\d–-]+", " ", text)
    text = re.sub(r"\b(?:ECCV|CVPR|ICCV|NeurIPS|TPAMI|WACV|arXiv|Python)\s+[\d.]+", " ", text)  # venues' years, versions
    text = re.sub(r"^\s*(?:\d+\.|[-*])\s", " ", text)  # a list item's marker
    return [m.group(0).replace("−", "-").replace(",", "") for m in NUMBER.finditer(text)]


def numbers_of_files(paths) -> set[float]:
    found = set()
    for p in paths:
        text = p.read_text(errors="replace")
        found |= {float(m.replace(",", "")) for m in re.findall(r"-?\d+(?:,\d{3})*(?:\.\d+)?(?:e-?\d+)?", text)}
    return found


def resolve_cited(cited: str, base: Path) -> list[Path]:
    "The files a cited path names, from the repository root or else from `base` (a folder stands for its data files)."
    for root in (ROOT, base):
        matches = sorted(root.glob(cited)) if "*" in cited else [root / cited] if (root / cited).exists() else []
        if matches:
            return [f for m in matches for f in ([m] if m.is_file() else sorted(m.rglob("*")))
                    if f.is_file() and (m.is_file() or f.suffix in (".json", ".md", ".txt", ".yaml", ".csv"))]
    return []


def cited_files(text: str, base: Path) -> list[Path]:
    "Committed files a block names."
    return [f for c in CITED.findall(text) for f in resolve_cited(c, base)]


def traced(number: str, pool: set[float]) -> bool:
    """Whether a file number rounds to `number` as written, directly or in one of the usual unit conversions; a whole
    number of 100 or more (a count, a duration in seconds) must be in a file as it is."""
    decimals = len(number.split(".")[1]) if "." in number else 0
    value = abs(float(number))
    scales = (1,) if decimals == 0 and value >= 100 else SCALES
    return any(round(abs(f) * k, decimals) == value for f in pool for k in scales)


def untraced(markdown: str, base: Path, skip=frozenset(), default_sources=()) -> list[str]:
    "The numbers of `markdown` that no file cited in their block (or the document's default sources) holds."
    problems = []
    default_pool = numbers_of_files(default_sources)
    for section, block, lead in blocks(markdown, skip):
        nums = numbers_of_text(block)
        if not nums: continue
        missing = [c for c in CITED.findall(block)
                   if not c.startswith(("reports/local", "reports/_smoke")) and not resolve_cited(c, base)]
        if missing: problems.append(f"[{section}] cites missing files {missing}: {block[:120]}")
        pool = numbers_of_files(cited_files(block + " " + lead, base)) | default_pool
        bad = [n for n in nums if not traced(n, pool)]
        if bad: problems.append(f"[{section}] {', '.join(bad)} in: {block[:160]}")
    return problems


HAND_WRITTEN_REPORTS = ["reports/README.md", "reports/perf/README.md", "reports/docs/README.md"]  # the others are written by their command


def test_every_readme_number_is_in_a_file_its_paragraph_cites():
    problems = untraced((ROOT / "README.md").read_text(), ROOT, UNTRACED_SECTIONS)
    assert not problems, "numbers no cited file holds (cite the file, or drop the number):\n" + "\n".join(problems)


def test_the_sections_without_tracing_state_no_measurements():
    "Code map, layout and command tables name things; a number with a unit there would escape the check above."
    for section, block, _ in blocks((ROOT / "README.md").read_text()):
        if section in UNTRACED_SECTIONS:
            assert not re.search(r"\d\s?(?:s|ms|min|minutes|GB|MB|%|mIoU)\b", re.sub(r"`[^`]*`", "", block)), block


@pytest.mark.parametrize("report", HAND_WRITTEN_REPORTS)
def test_every_number_of_a_hand_written_report_is_in_its_folders_files(report):
    path = ROOT / report
    sources = [f for f in sorted(path.parent.rglob("*")) if f.is_file() and f.suffix in (".json", ".md", ".txt") and f != path]
    problems = untraced(path.read_text(), path.parent, default_sources=sources)
    assert not problems, f"{report}: numbers none of its folder's files holds:\n" + "\n".join(problems)


def test_the_check_fails_on_an_invented_number():
    text = "## What the demo shows\n\nHRDA reaches 57.4 mIoU (`reports/demo/README.md`).\n\n- and 61.3 on a second look\n"
    assert untraced(text, ROOT) == ["[What the demo shows] 61.3 in: - and 61.3 on a second look"]
    assert untraced(text.replace("61.3", "58.5"), ROOT) == []  # a per-seed number of the cited report
    assert untraced("## X\n\nThe run took 16,000 s (`reports/demo/README.md`).", ROOT)  # 16 is there, 16,000 is not
