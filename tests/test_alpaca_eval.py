"""scir.py --alpaca_eval: Table 2's AlpacaEval 2.0 column needs an API judge, which this code does
not call; the run writes what that judge reads (README, 'Reproducing the papers' tables').

The file format is checked against the alpaca_eval tool's documented model outputs: a JSON list of
objects with the `instruction` they answer and the `output`, optionally the `generator` (the
model's name) and the `dataset`. The decoding is checked against SCIR section 4.1: temperature
0.7 and top-p 0.9 "during both the iterative training and evaluation phases".
"""

import json
import shutil

import pytest

import scir
from conftest import write_jsonl

FLAGS = ["--iterations", 1, "--num_prompts", 3, "--num_samples", 2, "--max_new_tokens", 6,
         "--max_length", 700, "--sft_epochs", 1, "--judge_pairs", 2, "--sft_examples", 4,
         "--batch_size", 2, "--grad_accum", 1, "--dtype", "float32"]
INSTRUCTIONS = [{"instruction": "Name a primary color.", "dataset": "helpful_base"},
                {"instruction": "What do bees make?", "dataset": "koala"},
                {"instruction": "Who wrote Hamlet?"}]  # a local file may leave dataset out


@pytest.fixture
def alpaca_data(tmp_path, data_dir):
    data = tmp_path / "data"
    shutil.copytree(data_dir, data)
    write_jsonl(data / "alpaca_eval.jsonl", INSTRUCTIONS)
    return data


def test_each_model_answers_every_instruction_as_section_4_1_samples(monkeypatch, tmp_path,
                                                                    tiny_model_dir, alpaca_data):
    original, calls = scir.sample_responses, []

    def recording(model, tokenizer, prompts, args, num_samples=None, greedy=False):
        grouped = original(model, tokenizer, prompts, args, num_samples=num_samples, greedy=greedy)
        calls.append((list(prompts), args.temperature, args.top_p, num_samples, greedy, grouped))
        return grouped
    monkeypatch.setattr(scir, "sample_responses", recording)
    out = tmp_path / "run"
    scir.main(["--model", tiny_model_dir, "--data_dir", str(alpaca_data), "--output_dir", str(out),
               "--alpaca_eval", *map(str, FLAGS)])
    asked = [call for call in calls if call[0] == [row["instruction"] for row in INSTRUCTIONS]]
    assert len(asked) == 2  # M0 and M1
    for k, (_, temperature, top_p, num_samples, greedy, grouped) in enumerate(asked):
        assert (temperature, top_p, num_samples, greedy) == (0.7, 0.9, 1, False)
        answers = json.loads((out / "alpaca_eval" / f"M{k}.json").read_text())
        assert isinstance(answers, list) and len(answers) == len(INSTRUCTIONS)
        for answer, row, (reply,) in zip(answers, INSTRUCTIONS, grouped):
            assert set(answer) == {"instruction", "output", "generator", "dataset"}
            assert answer["instruction"] == row["instruction"]
            assert answer["output"] == reply["response"]
            assert answer["generator"] == f"run-M{k}"
            assert answer["dataset"] == row.get("dataset", "")
    before = {k: (out / "alpaca_eval" / f"M{k}.json").read_bytes() for k in (0, 1)}
    calls.clear()  # a rerun resumes: no model answers again, and the files stay as they are
    scir.main(["--model", tiny_model_dir, "--data_dir", str(alpaca_data), "--output_dir", str(out),
               "--alpaca_eval", *map(str, FLAGS)])
    assert calls == []
    assert before == {k: (out / "alpaca_eval" / f"M{k}.json").read_bytes() for k in (0, 1)}


def test_a_missing_instruction_file_stops_the_run_before_sft(tmp_path, tiny_model_dir, data_dir):
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_info:
        scir.main(["--model", tiny_model_dir, "--data_dir", data_dir, "--output_dir", str(out),
                   "--alpaca_eval", *map(str, FLAGS)])
    assert str(exit_info.value.code).endswith("alpaca_eval.jsonl is missing (--alpaca_eval)")
    assert not (out / "M0").exists()
