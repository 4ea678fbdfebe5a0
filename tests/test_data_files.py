"""Data files a user gets wrong, in both scripts (README, 'Data'): each is named in one line with
what is wrong with it, before any training."""

import json
import re

import pytest

import cream
import scir
from conftest import copy_data_files, one_line_error

SMALL = ["--iterations", 1, "--num_prompts", 2, "--num_samples", 2, "--max_new_tokens", 4,
         "--max_length", 700, "--sft_epochs", 1, "--batch_size", 2, "--grad_accum", 1,
         "--dtype", "float32"]
SCRIPTS = {"scir.py": (scir, ("sft.jsonl", "judge.jsonl", "prompts.jsonl")),
           "cream.py": (cream, ("sft.jsonl", "prompts.jsonl"))}


def run(script, model, data, out, *extra):
    module = SCRIPTS[script][0]
    argv = ["--model", model, "--data_dir", data, "--output_dir", out, *SMALL, *extra]
    return one_line_error(script, lambda: module.main([str(a) for a in argv]))


@pytest.mark.parametrize("script", ["scir.py", "cream.py"])
def test_a_data_file_that_is_a_folder_is_named_as_one(script, tmp_path, tiny_model_dir,
                                                      data_dir):
    data = copy_data_files(data_dir, tmp_path / "data", SCRIPTS[script][1])
    (data / "eval.jsonl").mkdir()
    message = run(script, tiny_model_dir, data, tmp_path / "out", "--evaluate")
    assert message.endswith(f"{data / 'eval.jsonl'} is not a file" + (
        " (--evaluate)" if script == "scir.py" else ""))
    assert not (tmp_path / "out" / "args.json").exists()


@pytest.mark.parametrize("script", ["scir.py", "cream.py"])
def test_a_question_too_long_is_named_with_its_file(script, tmp_path, tiny_model_dir, data_dir):
    long = '{"task": "gsm8k", "prompt": "' + "How many foxes? " * 400 + '", "answer": "3"}\n'
    data = copy_data_files(data_dir, tmp_path / "data", SCRIPTS[script][1],
                           eval='{"task": "gsm8k", "prompt": "1 + 1?", "answer": "2"}\n' + long)
    message = run(script, tiny_model_dir, data, tmp_path / "out", "--evaluate")
    assert f"{data / 'eval.jsonl'}: row 2 (task gsm8k): the question is longer than" in message


def table_cells(line):
    """The cells of a markdown table row, '|' escaped as '\\|' kept inside a cell."""
    return [cell.strip() for cell in re.split(r"(?<!\\)\|", line.strip())[1:-1]]


@pytest.mark.parametrize("script", ["scir.py", "cream.py"])
def test_any_task_name_and_a_limited_evaluation_read_right_in_the_table(script, tmp_path,
                                                                       tiny_model_dir, data_dir):
    """A task named 'a|b' keeps table.md's columns in place, and a limited evaluation says so in
    its column names; --eval_limit 0 is refused by both scripts alike."""
    questions = [{"task": "a|b", "prompt": f"What is {k} + 1?", "answer": str(k + 1)}
                 for k in range(3)]
    data = copy_data_files(data_dir, tmp_path / "data", SCRIPTS[script][1],
                           eval="".join(json.dumps(row) + "\n" for row in questions))
    out = tmp_path / "out"
    SCRIPTS[script][0].main([str(a) for a in ["--model", tiny_model_dir, "--data_dir", data,
                                              "--output_dir", out, *SMALL, "--evaluate",
                                              "--eval_limit", 2]])
    lines = [line for line in (out / "table.md").read_text().splitlines() if line.startswith("|")]
    header = table_cells(lines[0])
    assert "a\\|b (first 2)" in header and "a\\|b (first 2) strict" in header
    assert all(len(table_cells(line)) == len(header) for line in lines[2:])
    assert "--eval_limit" in run(script, tiny_model_dir, data, tmp_path / "zero", "--evaluate",
                                 "--eval_limit", 0)
