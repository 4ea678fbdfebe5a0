"""scir.py --evaluate: Table 2's GSM8K and MMLU columns of M0..M_T, zero-shot, each reply read by
the strict and the flexible rule (prompts.py). Replies are sampled as SCIR section 4.1 says
(temperature 0.7, top-p 0.9, seeded) unless --eval_greedy.

The replies are rigged (test questions answer from a table written here), so each model's
accuracy is known by hand; the real generation path is exercised by the e2e run without the rig.
"""

import json
import shutil

import pytest
import torch

import prompts
import scir

SMALL = ["--iterations", 1, "--num_prompts", 3, "--num_samples", 2, "--max_new_tokens", 6,
         "--max_length", 700, "--sft_epochs", 1, "--judge_pairs", 2, "--sft_examples", 4,
         "--batch_size", 2, "--grad_accum", 1, "--dtype", "float32"]
TESTS = [  # (task, question, answer, the rigged reply, right by the strict rule, by the flexible)
    ("gsm8k", "Tom has 2 apples and buys 3 more. How many now?", "5", "2 + 3 = 5. Answer: 5",
     True, True),
    ("gsm8k", "A box holds 4 pens. How many pens in 2 boxes?", "8", "Answer: 6", False, False),
    ("gsm8k", "What is 10 minus 7?", "3", "#### 3", False, True),
    ("gsm8k", "What is 6 times 7?", "42", "Answer: 42. (I checked my answer 3 times.)",
     True, False),
    ("gsm8k", "What is 9 + 9?", "18", "9 + 9 = 18", False, True),
    ("mmlu", "Which is a primary color?\nA. Green\nB. Red\nC. Pink\nD. Brown", "B", "(B)",
     False, True),
    ("mmlu", "Which is a mammal?\nA. Shark\nB. Trout\nC. Bat\nD. Crow", "C", "Answer: A",
     False, False),
    ("mmlu", "Which is a planet?\nA. Moon\nB. Mars\nC. Sun\nD. Comet", "B", "Mars, the red one.",
     False, True),
    ("mmlu", "Which is a metal?\nA. Iron\nB. Wood\nC. Glass\nD. Paper", "A", "Answer: A",
     True, True),
]
# by hand from TESTS' last two columns: {task: {rule: accuracy}}
EXPECTED = {"gsm8k": {"flexible": 3 / 5, "strict": 2 / 5}, "mmlu": {"flexible": 3 / 4, "strict": 1 / 4}}


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


@pytest.fixture
def eval_data(tmp_path, data_dir):
    folder = tmp_path / "data"
    shutil.copytree(data_dir, folder)
    with open(folder / "eval.jsonl", "w") as f:
        for task, question, answer, *_ in TESTS:
            f.write(json.dumps({"task": task, "prompt": question, "answer": answer}) + "\n")
    return folder


def rig_test_replies(monkeypatch, seen):
    """Calls on test questions answer from TESTS, and record how they decode (greedy or not, the
    samples asked for, the seed torch was given); sampling the training prompts stays real."""
    real = scir.sample_responses
    replies = {question: reply for _, question, _, reply, *_ in TESTS}

    def rigged(model, tokenizer, prompts, args, num_samples=None, greedy=False):
        if not any(p.startswith(q) for p in prompts for q in replies):
            return real(model, tokenizer, prompts, args, num_samples, greedy)
        seen.append({"prompts": list(prompts), "greedy": greedy, "num_samples": num_samples,
                     "seed": torch.initial_seed()})
        return [[{"response": next(r for q, r in replies.items() if p.startswith(q)),
                  "token_ids": [], "finished": True}] for p in prompts]
    monkeypatch.setattr(scir, "sample_responses", rigged)


def table_cells(out, model):
    table = [[cell.strip() for cell in line.strip("|").split("|")]
             for line in (out / "table.md").read_text().splitlines() if line.startswith("|")]
    row = next(cells for cells in table if model in cells)
    return dict(zip(table[0], row))


def test_evaluate_scores_every_model_by_both_rules(monkeypatch, tmp_path, tiny_model_dir,
                                                   eval_data):
    seen = []
    rig_test_replies(monkeypatch, seen)
    out = tmp_path / "run"
    scir.main(["--model", tiny_model_dir, "--data_dir", eval_data, "--output_dir", out, *SMALL,
               "--evaluate"])
    metrics = read_jsonl(out / "metrics.jsonl")
    assert [row["model"] for row in metrics] == ["M0", "M1"]
    for row in metrics:
        assert row["evaluation"].keys() == EXPECTED.keys()
        for task, accuracy in EXPECTED.items():
            assert row["evaluation"][task] == pytest.approx(accuracy)
    assert len(seen) == 2  # M0 and M1, each question once, with the line on how to answer
    for call in seen:
        assert len(call["prompts"]) == len(TESTS)
        assert call["prompts"][0].endswith(
            "end your reply with 'Answer: N', where N is the final number.")
        assert call["prompts"][5].endswith("where X is the letter of the correct option.")
    rows = read_jsonl(out / "eval" / "M1-sampled.jsonl")
    assert [row["correct_strict"] for row in rows] == [t[4] for t in TESTS]
    assert [row["correct_flexible"] for row in rows] == [t[5] for t in TESTS]
    assert rows[3]["strict"] == "42" and rows[3]["flexible"] == "3"
    cells = table_cells(out, "M1")  # the flexible figure first, the strict one beside it
    assert list(cells)[-4:] == ["GSM8K", "GSM8K strict", "MMLU", "MMLU strict"]
    assert [cells[name] for name in list(cells)[-4:]] == ["60.00", "40.00", "75.00", "25.00"]


def test_evaluate_samples_as_section_4_1_says_and_eval_greedy_decodes_greedily(
        monkeypatch, tmp_path, tiny_model_dir, eval_data):
    """SCIR 4.1: temperature 0.7 and top-p 0.9 "during both the iterative training and evaluation
    phases": one sampled reply a question, seeded (--seed + 1000 k + 5), in eval/M<k>-sampled;
    --eval_greedy decodes greedily into eval/M<k>-greedy, never reusing the sampled replies."""
    out = tmp_path / "run"
    command = ["--model", tiny_model_dir, "--data_dir", eval_data, "--output_dir", out, *SMALL,
               "--seed", 7]
    scir.main(command)
    seen = []
    rig_test_replies(monkeypatch, seen)
    scir.main(command + ["--evaluate"])
    assert [(call["greedy"], call["num_samples"], call["seed"]) for call in seen] == [
        (False, 1, 7 + 5), (False, 1, 7 + 1000 + 5)]
    args = scir.parse_args(["--evaluate"])
    assert (args.temperature, args.top_p, args.eval_greedy) == (0.7, 0.9, False)
    seen.clear()
    scir.main(command + ["--evaluate", "--eval_greedy"])
    assert [call["greedy"] for call in seen] == [True, True]  # not the sampled files' replies
    for k in (0, 1):
        assert (out / "eval" / f"M{k}-sampled.jsonl").exists()
        assert (out / "eval" / f"M{k}-greedy.jsonl").exists()
    seen.clear()
    scir.main(command + ["--evaluate"])  # a rerun reads its own files back
    assert seen == []


def test_eval_greedy_and_temperature_are_stated_in_help(capsys):
    with pytest.raises(SystemExit):
        scir.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "sampled as section 4.1 says" in text and "--eval_greedy" in text
    assert "decodes greedily" in text


def test_evaluate_added_to_a_finished_run_only_evaluates(monkeypatch, tmp_path, tiny_model_dir,
                                                        eval_data):
    out = tmp_path / "run"
    command = ["--model", tiny_model_dir, "--data_dir", eval_data, "--output_dir", out, *SMALL]
    scir.main(command)
    before = (out / "M1" / "model.safetensors").stat().st_mtime_ns
    seen = []
    rig_test_replies(monkeypatch, seen)
    scir.main(command + ["--evaluate", "--eval_limit", "1"])
    assert (out / "M1" / "model.safetensors").stat().st_mtime_ns == before
    assert seen and all(len(call["prompts"]) == 2 for call in seen)  # each task's first
    assert read_jsonl(out / "metrics.jsonl")[1]["evaluation"] == {
        "gsm8k": {"flexible": 1.0, "strict": 1.0}, "mmlu": {"flexible": 1.0, "strict": 0.0}}
    assert (out / "eval" / "M0-sampled-first1.jsonl").exists()


def test_evaluate_real_generation_end_to_end(tmp_path, tiny_model_dir, eval_data, run_script):
    """Without the rig: the script's own sampled replies, read by both rules; the same replies
    again when the evaluation is done afresh (seeded)."""
    out = tmp_path / "run"
    command = ["--model", tiny_model_dir, "--data_dir", eval_data, "--output_dir", out, *SMALL,
               "--evaluate"]
    result = run_script("scir.py", *command)
    assert result.returncode == 0, result.stderr[-2000:]
    first = {}
    for k in (0, 1):
        rows = read_jsonl(out / "eval" / f"M{k}-sampled.jsonl")
        assert [row["prompt"] for row in rows] == [t[1] for t in TESTS]
        for row in rows:  # the readings, recomputed here from the reply
            assert {key: row[key] for key in ("strict", "flexible", "correct_strict",
                                              "correct_flexible")} == prompts.read_answers(
                row, row["reply"])
        first[k] = [row["reply"] for row in rows]
    shutil.rmtree(out / "eval")
    result = run_script("scir.py", *command)
    assert result.returncode == 0, result.stderr[-2000:]
    for k in (0, 1):
        assert [row["reply"] for row in read_jsonl(out / "eval" / f"M{k}-sampled.jsonl")] == first[k]


@pytest.mark.parametrize("answer", ["five", "", "AB"])
def test_eval_row_without_a_usable_answer_is_refused(tmp_path, tiny_model_dir, eval_data, answer,
                                                     run_script):
    with open(eval_data / "eval.jsonl", "a") as f:
        f.write(json.dumps({"task": "gsm8k", "prompt": "How many?", "answer": answer}) + "\n")
    result = run_script("scir.py", "--model", tiny_model_dir, "--data_dir", eval_data,
                        "--output_dir", tmp_path / "run", *SMALL, "--evaluate")
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert "eval.jsonl" in result.stderr.strip().splitlines()[-1]


def test_hub_questions_are_read_as_the_cards_say(monkeypatch):
    """GSM8K: the gold number after the last '####', commas removed; MMLU: 4 choices, answer 0-3."""
    import datasets

    def fake_load_dataset(repo, name=None, split=None):
        assert split == "test"
        if repo == "openai/gsm8k":
            assert name == "main"
            return [{"question": "How much?", "answer": "2 + 2 = 4\n#### 1,204"}]
        assert (repo, name) == ("cais/mmlu", "all")
        return [{"question": "Pick one.", "subject": "x", "choices": ["w", "x", "y", "z"],
                 "answer": 2}]
    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    args = scir.parse_args(["--evaluate"])
    assert scir.load_eval_data(args) == [
        {"task": "gsm8k", "prompt": "How much?", "answer": "1204"},
        {"task": "mmlu", "prompt": "Pick one.\nA. w\nB. x\nC. y\nD. z", "answer": "C"}]
