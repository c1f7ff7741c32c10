#!/usr/bin/env bash
# How a new user meets the repository: a fresh clone of HEAD in a new folder (no data/, no .venv), then `make demo`
# (set-up included) and `make test`, each timed. Writes reports/timing/fresh_clone.{json,md}: the commit, the machine,
# the seconds of each command, the demo's verdict line against the committed reference and the test summary.
# Usage: bash benchmarks/fresh_clone.sh [WORKDIR]   (about 15 minutes on 2 cores; WORKDIR is kept for the logs)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
WORK=${1:-$(mktemp -d)}
git clone -q "$ROOT" "$WORK/hrda"
cd "$WORK/hrda"
t0=$SECONDS; make demo >"$WORK/demo.log" 2>&1; demo_s=$((SECONDS - t0))
t0=$SECONDS; make test >"$WORK/test.log" 2>&1; test_s=$((SECONDS - t0))
.venv/bin/python - "$ROOT" "$demo_s" "$test_s" "$WORK/test.log" <<'PY'
import json, os, platform, re, subprocess, sys
from pathlib import Path
from hrda.demo import machine_class
from hrda.files import write_json, write_text
root, demo_s, test_s, test_log = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4])
readme = Path("reports/local/demo/README.md").read_text().splitlines()
verdict = next((l.strip("* ") for l in readme if l.startswith("**")), "")
stages = {m.group(1): float(m.group(2)) for l in readme if (m := re.match(r"\| (.+) \| (\d+) \|$", l))}
summary = [l.strip("= ") for l in test_log.read_text().splitlines() if re.search(r"\d+ passed", l)][-1:]
record = {"command": "bash benchmarks/fresh_clone.sh", "commit": subprocess.run(["git", "rev-parse", "HEAD"],
          capture_output=True, text=True).stdout.strip(), "machine": {**machine_class(), "cores": os.cpu_count()},
          "make_demo_s": demo_s, "demo_stages_s": stages.get("total"), "make_test_s": test_s,
          "demo_verdict": verdict, "test_summary": summary[0] if summary else None}
write_json(root / "reports/timing/fresh_clone.json", record)
m = record["machine"]
write_text(root / "reports/timing/fresh_clone.md", "\n".join([
    "# A fresh clone, as a new user meets it", "",
    f"Commit `{record['commit'][:7]}`, a new folder without `data/` or `.venv`, on {m.get('cpu')} ({record['machine']['cores']} "
    f"cores), written by `{record['command']}`.", "",
    "| command | seconds |", "|---|---:|", f"| `make demo` (set-up included) | {demo_s} |",
    f"| its stages (benchmark, training, evaluation, figures, report) | {stages.get('total', 0):.0f} |",
    f"| `make test` (after `make demo`: `.venv` ready) | {test_s} |", "",
    f"Demo: {verdict}", "", f"Tests: {record['test_summary']}", ""]))
print(Path(root / "reports/timing/fresh_clone.md").read_text())
PY
