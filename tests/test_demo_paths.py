"""--demo as a new user runs it (README, 'Quickstart'): a flag written out wins over the demo's own
model and data, the demo folder resumes after a move or under another spelling of its path, and
scir.py's demo evaluates and runs a baseline.

Each command runs the script's main() in this process, as its command line would.
"""

import json
import shutil
from pathlib import Path

import pytest

import cream
import scir

SCRIPTS = {"scir.py": scir, "cream.py": cream}

FIRST_MODEL = {"scir.py": "M0", "cream.py": "M1"}  # the model SFT writes
# the demo, cut to one short iteration: these tests are about paths, not the loop
SHORT = ["--iterations", 1, "--sft_epochs", 1, "--num_prompts", 4, "--num_samples", 2,
         "--max_new_tokens", 8]


def run(script, *argv):
    SCRIPTS[script].main([str(arg) for arg in argv])


def mtimes(folder):
    return {p: p.stat().st_mtime_ns for p in Path(folder).rglob("*") if p.is_file()}


@pytest.mark.parametrize("script", ["scir.py", "cream.py"])
def test_a_moved_demo_resumes_under_another_spelling_of_its_path(script, tmp_path, monkeypatch):
    run(script, "--demo", *SHORT, "--output_dir", tmp_path / "a")
    shutil.move(tmp_path / "a", tmp_path / "b")
    trained = mtimes(tmp_path / "b" / "M1")
    monkeypatch.chdir(tmp_path)
    run(script, "--demo", *SHORT, "--evaluate", "--output_dir", "b")  # a relative path now
    assert mtimes(tmp_path / "b" / "M1") == trained  # resumed: nothing retrained
    evaluated = tmp_path / "b" / ("eval" if script == "scir.py" else "evaluation.jsonl")
    assert evaluated.exists()  # scir.py's demo data has test questions too
    settings = json.loads((tmp_path / "b" / "args.json").read_text())
    assert settings["model"].startswith("<output_dir>/demo-")


@pytest.mark.parametrize("script", ["scir.py", "cream.py"])
def test_a_model_written_out_wins_over_the_demo_model(script, tmp_path, tiny_model_dir):
    out = tmp_path / "run"
    run(script, "--demo", *SHORT, "--model", tiny_model_dir, "--output_dir", out)
    settings = json.loads((out / "args.json").read_text())
    assert settings["model"] == str(Path(tiny_model_dir).resolve())
    trained = json.loads((out / FIRST_MODEL[script] / "config.json").read_text())
    given = json.loads((Path(tiny_model_dir) / "config.json").read_text())
    for key in ("vocab_size", "hidden_size"):
        assert trained[key] == given[key], key


def test_scir_demo_runs_a_baseline(tmp_path):
    """The baselines' Table 6 judge prompt fits the demo's --max_length: its tokenizer learns the
    pointwise template too."""
    run("scir.py", "--demo", *SHORT, "--method", "irm", "--output_dir", tmp_path / "irm")
    assert (tmp_path / "irm" / "M1" / "training_summary.json").exists()
