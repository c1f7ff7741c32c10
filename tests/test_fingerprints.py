"""Today's code trains as the committed fingerprints say (tests/fingerprints.json), and as the code that built the
committed references did (reports/demo*/fingerprints.json). See nbs/06c_fingerprint.ipynb."""
import json

import pytest

from conftest import ROOT
from hrda.fingerprint import FINGERPRINT_FILE, bitwise_equal, compare_fingerprints, fingerprints


@pytest.fixture(scope="module")
def today():
    return fingerprints()


def test_training_matches_the_committed_fingerprints(today):
    committed = json.loads((ROOT / FINGERPRINT_FILE).read_text())
    problems = compare_fingerprints(today, committed["runs"])
    assert not problems, (f"training changed ({len(problems)} numbers): " + "; ".join(problems[:6]) + ". If the change is "
                          "meant to change training, run `hrda fingerprint --update --why '...'` and commit "
                          f"{FINGERPRINT_FILE} with it")
    print("bit for bit" if bitwise_equal(today, committed["runs"]) else "to rounding (another processor's kernels)")


@pytest.mark.parametrize("report", ["demo", "demo_mic"])
def test_committed_reference_was_built_by_code_that_trains_as_todays(today, report):
    ref = json.loads((ROOT / "reports" / report / "fingerprints.json").read_text())
    trained_by = {r["git_commit"] for r in json.loads((ROOT / "reports" / report / "sources.json").read_text())["runs"]}
    assert trained_by <= set(ref["commits"]), f"reports/{report}: runs of commits {trained_by - set(ref['commits'])} have no fingerprint"
    problems = compare_fingerprints(today, ref["runs"])
    assert not problems, (f"reports/{report} was built by code that trains differently from today's: " + "; ".join(problems[:6])
                          + f". Rebuild it (README.md names the command) so that its numbers describe today's code")


def test_a_changed_step_is_caught(today):
    "The comparison fails on a change of behaviour (a loss 0.1 % off) and passes a last-bit difference of the weights."
    changed = json.loads(json.dumps(today))
    changed["hrda"]["logs"][1]["mix.decode.loss_seg"] *= 1.001
    changed["daformer"]["student_sums"][0] *= 1 + 1e-7
    assert [p.split(":")[0] for p in compare_fingerprints(changed, today)] == ["hrda logs[1].mix.decode.loss_seg"]
