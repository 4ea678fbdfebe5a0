"""--demo as a new user runs it (README, 'Quickstart'): a flag written out wins over the demo's own
model and data, the demo folder resumes after a move or under another spelling of its path, and
scir.py's demo evaluates and runs a baseline.

Each command runs the script as a subprocess, from the repository root.
"""

import json
import os
import shutil
from pathlib import Path

import pytest

from conftest import ROOT

FIRST_MODEL = {"scir.py": "M0", "cream.py": "M1"}  # the model SFT writes


def mtimes(folder):
    return {p: p.stat().st_mtime_ns for p in Path(folder).rglob("*") if p.is_file()}


@pytest.mark.parametrize("script", ["scir.py", "cream.py"])
def test_a_moved_demo_resumes_under_another_spelling_of_its_path(script, run_script, tmp_path):
    first = run_script(script, "--demo", "--iterations", 1, "--output_dir", tmp_path / "a")
    assert first.returncode == 0, first.stderr[-2000:]
    shutil.move(tmp_path / "a", tmp_path / "b")
    trained = mtimes(tmp_path / "b" / "M1")
    relative = os.path.relpath(tmp_path / "b", ROOT)  # the scripts run from the repository root
    again = run_script(script, "--demo", "--iterations", 1, "--evaluate", "--output_dir", relative)
    assert again.returncode == 0, again.stderr[-2000:]
    assert mtimes(tmp_path / "b" / "M1") == trained  # resumed: nothing retrained
    evaluated = tmp_path / "b" / ("eval" if script == "scir.py" else "evaluation.jsonl")
    assert evaluated.exists()  # scir.py's demo data has test questions too
    settings = json.loads((tmp_path / "b" / "args.json").read_text())
    assert settings["model"].startswith("<output_dir>/demo-")


@pytest.mark.parametrize("script", ["scir.py", "cream.py"])
def test_a_model_written_out_wins_over_the_demo_model(script, run_script, tmp_path,
                                                      tiny_model_dir):
    out = tmp_path / "run"
    result = run_script(script, "--demo", "--iterations", 1, "--model", tiny_model_dir,
                        "--output_dir", out)
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads((out / "args.json").read_text())["model"] == str(Path(tiny_model_dir).resolve())
    trained = json.loads((out / FIRST_MODEL[script] / "config.json").read_text())
    given = json.loads((Path(tiny_model_dir) / "config.json").read_text())
    assert (trained["vocab_size"], trained["hidden_size"]) == (given["vocab_size"], given["hidden_size"])


def test_scir_demo_runs_a_baseline(run_script, tmp_path):
    """The baselines' Table 6 judge prompt fits the demo's --max_length: its tokenizer learns the
    pointwise template too."""
    result = run_script("scir.py", "--demo", "--iterations", 1, "--method", "irm",
                        "--output_dir", tmp_path / "irm")
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "irm" / "M1" / "training_summary.json").exists()
