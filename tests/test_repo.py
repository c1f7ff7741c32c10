"""The repository keeps its promises: notebooks and package in sync, README from the index, pins consistent."""
import ast
import configparser
import json
import re

import nbformat

from conftest import ROOT
from hrda.devtools import (exported_module, list_notebooks, portability_problems, readme_text, sync_problems,
                           tracked_files)


def test_package_notebooks_and_readme_in_sync():
    problems = sync_problems(ROOT)
    assert not problems, "\n".join(problems)


def test_hand_edit_of_generated_module_is_caught(repo_copy):
    core = repo_copy / "hrda" / "core.py"
    core.write_text(core.read_text().replace('"A logger that prints', '"A logger that shouts'))
    problems = sync_problems(repo_copy)
    assert len(problems) == 1 and problems[0].startswith("hrda/core.py is out of sync")
    assert "run `make export`" in problems[0] and "nbdev_update" in problems[0]


def test_unclean_notebook_is_caught(repo_copy):
    path = repo_copy / "nbs" / "00_core.ipynb"
    nb = nbformat.read(path, as_version=4)
    nb.cells[0].execution_count = 7
    nb.metadata["widgets"] = {"state": {}}
    nbformat.write(nb, path)
    problems = sync_problems(repo_copy)
    assert problems == ["nbs/00_core.ipynb is not clean (execution counts, metadata or ids): run `make export` "
                        "(it runs nbdev_clean), or save it from Jupyter with the nbdev hooks installed"]


def test_readme_drift_is_caught(repo_copy):
    readme = repo_copy / "README.md"
    readme.write_text(readme.read_text() + "\nA line added by hand.\n")
    assert sync_problems(repo_copy) == [
        "README.md differs from nbs/index.ipynb: edit the notebook, not README.md, then run `make export`"]


def test_every_notebook_asks_for_the_kernel_of_its_clone():
    notebooks = sorted((ROOT / "nbs").rglob("*.ipynb"))
    wrong = [str(p.relative_to(ROOT)) for p in notebooks
             if json.loads(p.read_text())["metadata"].get("kernelspec", {}).get("name") != "hrda"]
    assert notebooks and not wrong, f"notebooks that do not ask for the hrda kernel: {wrong}"
    make = (ROOT / "Makefile").read_text()
    assert "ipykernel install --sys-prefix --name hrda" in make and "JUPYTER_PATH=" in make  # per clone, not per user


def test_code_map_lists_every_notebook_and_its_module():
    readme = readme_text(ROOT)
    for nb in list_notebooks(ROOT):
        if nb.name == "index.ipynb":
            continue
        rel = nb.relative_to(ROOT).as_posix()
        module = exported_module(nb)
        row = next((l for l in readme.splitlines() if l.startswith(f"| `{rel}` |")), None)
        assert row, f"{rel} is missing from the code map in nbs/index.ipynb"
        expected = f"`hrda.{module}`" if module else "(papermill template)" if nb.parent.name == "runs" else "(method text)"
        assert row.split("|")[2].strip() == expected, f"code map row of {rel} should name {expected}"


def hrda_imports(module_file) -> list[tuple[int, str]]:
    "(line, module) of every `hrda` module a module imports, at the top or inside a function."
    found = []
    for node in ast.walk(ast.parse(module_file.read_text())):
        if isinstance(node, ast.ImportFrom) and (node.level == 1 or (node.module or "").startswith("hrda.")):
            found.append((node.lineno, (node.module or "").removeprefix("hrda.")))
    return found


def test_modules_import_only_modules_of_earlier_notebooks():
    "Notebooks are numbered so that a reader meets every name before it is used: imports flow downward."
    position = {exported_module(nb): i for i, nb in enumerate(list_notebooks(ROOT)) if exported_module(nb)}
    upward = [f"hrda/{m}.py:{line} imports hrda.{dep}" for m, i in position.items()
              for line, dep in hrda_imports(ROOT / "hrda" / f"{m}.py") if position.get(dep, -1) >= i]
    assert len(position) > 20 and not upward, upward


def test_modules_stay_small():
    "One notebook, one idea: every exported module stays under about 400 lines."
    sizes = {m: len((ROOT / "hrda" / f"{m}.py").read_text().splitlines())
             for m in (exported_module(nb) for nb in list_notebooks(ROOT)) if m}
    assert sizes and not {m: n for m, n in sizes.items() if n > 420}, sizes


def test_ci_runs_exactly_the_readme_test_command():
    ci = [l for l in (ROOT / ".ci" / "run").read_text().splitlines() if l.strip() and not l.startswith(("#", "set ", "cd "))]
    assert ci == ["make test"]
    assert "make test" in (ROOT / "README.md").read_text() and "make demo" in (ROOT / "README.md").read_text()


def test_every_package_requirement_is_pinned():
    cfg = configparser.ConfigParser(delimiters=["="])
    cfg.read(ROOT / "settings.ini")
    pins = {}
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"requirements.txt: {line!r} is not pinned with =="
            pins[name.lower()] = version
    for key in ("requirements", "dev_requirements"):
        for req in cfg["DEFAULT"][key].split():
            name = re.split(r"[<>=!~\[]", req)[0].lower()
            assert name in pins, f"settings.ini {key} names {name}, which requirements.txt does not pin"
    assert pins["torch"] == "2.14.1" and pins["torchvision"] == "0.29.1"
    assert (pins["nbdev"], pins["execnb"], pins["fastcore"], pins["ghapi"]) == ("2.4.14", "0.1.18", "1.14.5", "1.1.1")


def test_settings_keep_papermill_tags_and_nbdev_flags():
    cfg = configparser.ConfigParser(delimiters=["="])
    cfg.read(ROOT / "settings.ini")
    d = cfg["DEFAULT"]
    assert d["allowed_cell_metadata_keys"] == "tags" and d["tst_flags"] == "notest slow gpu"
    assert d["cell_number"] == "False" and d["jupyter_hooks"] == "True"


def test_run_templates_export_nothing_and_have_outputs_cleared():
    for nb_path in (ROOT / "nbs" / "runs").glob("*.ipynb"):
        nb = json.loads(nb_path.read_text())
        assert exported_module(nb_path) is None, f"{nb_path.name}: run templates export nothing"
        assert not any(c.get("outputs") for c in nb["cells"] if c["cell_type"] == "code"), \
            f"{nb_path.name}: executed copies belong in reports/, not nbs/"


def _table_rows(text, first_col_names):
    "Rows of markdown tables whose first cell is one of `first_col_names`, as {name: [cells]}."
    rows = {}
    for line in text.splitlines():
        cells = [c.strip().strip("*") for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0] in first_col_names and cells[0] not in rows:
            rows[cells[0]] = cells
    return rows


def test_readme_demo_numbers_match_the_demo_report():
    report = (ROOT / "reports" / "demo" / "README.md").read_text()
    names = ("Source only", "DAFormer (single scale, 0.5×)", "HRDA")
    shown, produced = _table_rows(readme_text(ROOT), names), _table_rows(report, names)
    assert set(shown) == set(names), "the README's demo table lost a method"
    for name in names:  # mIoU and fine mIoU, as written by `make demo`
        assert shown[name][1:3] == produced[name][1:3], f"README demo numbers of {name} differ from reports/demo/README.md"


def test_committed_reports_and_notebooks_travel_to_another_clone():
    "No tracked report, experiment or notebook output holds a machine's absolute path, a traceback or a warning."
    problems = portability_problems(ROOT)
    assert not problems, f"{len(problems)} problems, e.g.:\n" + "\n".join(problems[:15])


def test_portability_check_fails_on_a_planted_absolute_path_and_warning(repo_copy):
    run = repo_copy / "reports" / "demo" / "hrda" / "s0"
    run.mkdir(parents=True)
    (run / "params.yaml").write_text(f"target_root: {repo_copy}/data/synth/target\n")
    (run / "ok.json").write_text(json.dumps({"target_root": "data/synth/target"}))
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("x", outputs=[
        nbformat.v4.new_output("stream", name="stderr", text="/home/me/.venv/lib/x.py:1: FutureWarning: soon\n")])])
    nbformat.write(nb, run / "train.ipynb")
    problems = portability_problems(repo_copy)
    assert any(p.startswith("reports/demo/hrda/s0/params.yaml:1: absolute path") for p in problems), problems
    assert any(p.startswith("reports/demo/hrda/s0/train.ipynb: output of cell 0 shows a warning") for p in problems)
    assert any(p.startswith("reports/demo/hrda/s0/train.ipynb:") and "absolute path '/home/me" in p for p in problems)
    assert not any("ok.json" in p for p in problems)


# Citations of a design document that is not in the repository: "<doc> 3.5", "<doc> §7", "<doc>.md", "(<doc>)",
# "<quirk word> 10.7". The words are split so that this file does not match its own pattern.
_DOC, _QUIRK = "sp" + "ec", "qui" + "rk"
_MISSING_DOC = re.compile(rf"\b{_DOC}\s*§|\b{_DOC}\s+\d|\b{_DOC}\.md\b|\b{_DOC}\s+{_QUIRK}|\b{_QUIRK}s?\s+\d"
                          rf"|(?-i:\({_DOC.upper()}\))", re.IGNORECASE)  # "(<DOC>)" in capitals only: a lower-case one is code
_NOTES_FILE = re.compile(r"\b([A-Z][A-Z0-9_]+\.md)\b")  # a capitalised notes or design file: fine when the clone has one
_TEXT_SUFFIXES = {".ipynb", ".py", ".md", ".yaml", ".yml", ".ini", ".txt", ".cfg", ".toml", ".sh"}


def test_no_tracked_file_cites_a_document_missing_from_the_repository():
    "A clone explains itself: comments and docs cite the papers or state the fact, not an internal document."
    for text in (f"{_DOC.upper()} 3.5", f"({_DOC.upper()} §7)", f"{_DOC.upper()}.md", f"({_DOC.upper()})", f"{_QUIRK} 10.7",
                 f"{_DOC} {_QUIRK} 15", f"{_QUIRK}s 10.3"):
        assert _MISSING_DOC.search(text), text
    notes = "SYNTH_NOTES" + ".md"
    assert _NOTES_FILE.findall(f"see `shared/{notes}` and README.md") == [notes, "README.md"]
    assert not _MISSING_DOC.search(f"for {_DOC} in specs: set({_DOC}), {_DOC}['id']; a {_QUIRK}: on the scaled logits")
    hits = []
    tracked = tracked_files(ROOT, ".")
    names = {path.name for path in tracked}
    for path in tracked:
        rel = path.relative_to(ROOT)
        if (path.suffix not in _TEXT_SUFFIXES and path.name != "Makefile") or \
                any(part.startswith(".") and part != ".ci" for part in rel.parts[:-1]):  # .venv etc. in a copy without git
            continue
        for i, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if m := _MISSING_DOC.search(line):
                hits.append(f"{rel.as_posix()}:{i}: {m.group(0)!r}")
            hits += [f"{rel.as_posix()}:{i}: {name!r}" for name in _NOTES_FILE.findall(line) if name not in names]
    assert not hits, f"{len(hits)} references to a document that is not in the repository, e.g.:\n" + "\n".join(hits[:15])
