"""scir.py --evaluate: Table 2's GSM8K and MMLU columns, greedy zero-shot exact match of M0..M_T.

The replies are rigged (greedy generation answers from a table written here), so each model's
accuracy is known by hand; the real generation path is exercised by the e2e run without the rig.
"""

import json
import shutil

import pytest

import scir

SMALL = ["--iterations", 1, "--num_prompts", 3, "--num_samples", 2, "--max_new_tokens", 6,
         "--max_length", 700, "--sft_epochs", 1, "--judge_pairs", 2, "--sft_examples", 4,
         "--batch_size", 2, "--grad_accum", 1, "--dtype", "float32"]
TESTS = [  # (task, question, answer, the rigged greedy reply, correct?)
    ("gsm8k", "Tom has 2 apples and buys 3 more. How many now?", "5", "2 + 3 = 5. Answer: 5", True),
    ("gsm8k", "A box holds 4 pens. How many pens in 2 boxes?", "8", "Answer: 6", False),
    ("gsm8k", "What is 10 minus 7?", "3", "#### 3", True),
    ("mmlu", "Which is a primary color?\nA. Green\nB. Red\nC. Pink\nD. Brown", "B", "(B)", True),
    ("mmlu", "Which is a mammal?\nA. Shark\nB. Trout\nC. Bat\nD. Crow", "C", "Answer: A", False),
]


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


@pytest.fixture
def eval_data(tmp_path, data_dir):
    folder = tmp_path / "data"
    shutil.copytree(data_dir, folder)
    with open(folder / "eval.jsonl", "w") as f:
        for task, question, answer, _, _ in TESTS:
            f.write(json.dumps({"task": task, "prompt": question, "answer": answer}) + "\n")
    return folder


def same_answer(extracted, answer):
    if extracted is None:
        return False
    return extracted == answer if answer.isalpha() else float(extracted) == float(answer)


def rig_greedy_replies(monkeypatch, seen):
    """Greedy calls answer from TESTS (by question); sampling stays real."""
    real = scir.sample_responses
    replies = {question: reply for _, question, _, reply, _ in TESTS}

    def rigged(model, tokenizer, prompts, args, num_samples=None, greedy=False):
        if not greedy:
            return real(model, tokenizer, prompts, args, num_samples)
        seen.append(list(prompts))
        return [[{"response": next(r for q, r in replies.items() if p.startswith(q)),
                  "token_ids": [], "finished": True}] for p in prompts]
    monkeypatch.setattr(scir, "sample_responses", rigged)


def test_evaluate_scores_every_model_by_exact_match(monkeypatch, tmp_path, tiny_model_dir,
                                                    eval_data):
    seen = []
    rig_greedy_replies(monkeypatch, seen)
    out = tmp_path / "run"
    scir.main(["--model", tiny_model_dir, "--data_dir", eval_data, "--output_dir", out, *SMALL,
               "--evaluate"])
    expected = {"gsm8k": 2 / 3, "mmlu": 1 / 2}  # from TESTS' last column, by hand
    metrics = read_jsonl(out / "metrics.jsonl")
    assert [row["model"] for row in metrics] == ["M0", "M1"]
    for row in metrics:
        assert row["evaluation"] == pytest.approx(expected)
    assert len(seen) == 2  # M0 and M1, each question once, with the line on how to answer
    for prompts in seen:
        assert len(prompts) == len(TESTS)
        assert prompts[0].endswith("end your reply with 'Answer: N', where N is the final number.")
        assert prompts[3].endswith("where X is the letter of the correct option.")
    rows = read_jsonl(out / "eval" / "M1.jsonl")
    assert [row["correct"] for row in rows] == [t[4] for t in TESTS]
    table = [[cell.strip() for cell in line.strip("|").split("|")]
             for line in (out / "table.md").read_text().splitlines()]
    m1 = next(cells for cells in table if "M1" in cells)
    assert m1[table[0].index("GSM8K")] == "66.67" and m1[table[0].index("MMLU")] == "50.00"


def test_evaluate_added_to_a_finished_run_only_evaluates(monkeypatch, tmp_path, tiny_model_dir,
                                                        eval_data):
    out = tmp_path / "run"
    command = ["--model", tiny_model_dir, "--data_dir", eval_data, "--output_dir", out, *SMALL]
    scir.main(command)
    before = (out / "M1" / "model.safetensors").stat().st_mtime_ns
    seen = []
    rig_greedy_replies(monkeypatch, seen)
    scir.main(command + ["--evaluate", "--eval_limit", "1"])
    assert (out / "M1" / "model.safetensors").stat().st_mtime_ns == before
    assert seen and all(len(prompts) == 2 for prompts in seen)  # the first question of each task
    assert read_jsonl(out / "metrics.jsonl")[1]["evaluation"] == {"gsm8k": 1.0, "mmlu": 1.0}
    assert (out / "eval" / "M0-first1.jsonl").exists()


def test_evaluate_real_generation_end_to_end(tmp_path, tiny_model_dir, eval_data, run_script):
    """Without the rig: the script's own greedy replies are scored as a user would see them."""
    out = tmp_path / "run"
    result = run_script("scir.py", "--model", tiny_model_dir, "--data_dir", eval_data,
                        "--output_dir", out, *SMALL, "--evaluate")
    assert result.returncode == 0, result.stderr[-2000:]
    for k in (0, 1):
        rows = read_jsonl(out / "eval" / f"M{k}.jsonl")
        assert [row["prompt"] for row in rows] == [t[1] for t in TESTS]
        for row in rows:  # the score, recomputed here from the answer read from the reply
            assert row["extracted"] is None or row["extracted"] in row["reply"].replace(",", "")
            assert row["correct"] == same_answer(row["extracted"], row["answer"])


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
