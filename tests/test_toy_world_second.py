"""The second toy world (tests/tools/toy_world.py --world 2): three digits, one knob for the quality
of every label, and the sweep's arithmetic. Each case is worked by hand or counted directly from
the files the tool writes; nothing here pretrains (a few seconds in all)."""

import itertools
import json
import random
import re

import pytest

import toy_world


def test_three_digit_problems_are_split_into_disjoint_train_and_held_out_sets():
    train, test = toy_world.split(3)
    assert len(train) + len(test) == 9 ** 3 and not set(train) & set(test)
    assert sum(sum(p) < 10 for p in test) == 18 and sum(sum(p) >= 10 for p in test) == 142
    # C(9, 3) = 84 triples of digits 1..9 sum to 9 or less
    assert sum(sum(p) < 10 for p in itertools.product(range(1, 10), repeat=3)) == 84


def test_the_texts_of_a_three_digit_problem():
    assert toy_world.question((3, 4, 5), 0) == "What is 3 + 4 + 5?"
    assert toy_world.question((3, 4, 5), 1) == "Add 3, 4 and 5."
    assert toy_world.question((3, 4, 5), 2) == "Compute 3 plus 4 plus 5."
    assert toy_world.reply((3, 4, 5), 12, 4) == "3 plus 4 plus 5 makes 12."
    assert toy_world.problem_of(toy_world.prompt_text((3, 4, 5), 3)) == (3, 4, 5)
    assert toy_world.is_right("3 + 4 + 5 = 12.", (3, 4, 5))
    assert not toy_world.is_right("3 + 4 + 5 = 2.", (3, 4, 5))  # the carry dropped
    # the first world's texts are those it always had
    assert toy_world.prompt_text((7, 5), 1).startswith("Add 7 and 5.\n\n")
    assert toy_world.reply((7, 5), 12, 0) == "7 + 5 = 12."


def test_a_dropped_carry_in_a_three_digit_sum_loses_ten():
    rng = random.Random(0)
    assert toy_world.wrong_sum((9, 9, 9), rng) == 17
    assert toy_world.web_sum((9, 9, 9), rng, carry_drop=1.0) == 17
    assert toy_world.web_sum((1, 2, 3), rng, carry_drop=1.0) == 6  # no carry to drop


@pytest.mark.parametrize("label_accuracy", [0.6, 0.95])
def test_seed_data_labels_are_right_at_the_level(tmp_path, label_accuracy):
    """Counted from the written files: right SFT replies and right-chosen judge pairs, each a
    binomial share of 3,000 (std under 0.009), within 0.03 of the level."""
    data = toy_world.write_data(tmp_path, terms=3, label_accuracy=label_accuracy, sft=3000,
                                judge=3000, prompts_per_iteration=10)
    sft = toy_world.read_jsonl(data / "sft.jsonl")
    judge = toy_world.read_jsonl(data / "judge.jsonl")
    right_sft = sum(toy_world.is_right(r["response"], toy_world.problem_of(r["prompt"]))
                    for r in sft) / len(sft)
    right_chosen = sum(toy_world.is_right(r["chosen"], toy_world.problem_of(r["prompt"]))
                       for r in judge) / len(judge)
    assert abs(right_sft - label_accuracy) < 0.03 and abs(right_chosen - label_accuracy) < 0.03
    for row in judge:  # one side right, one wrong, whatever the label
        problem = toy_world.problem_of(row["prompt"])
        assert toy_world.is_right(row["chosen"], problem) != toy_world.is_right(
            row["rejected"], problem)
    train, test = toy_world.split(3)
    assert all(toy_world.problem_of(r["prompt"]) in set(train) for r in sft + judge)
    evaluation = toy_world.read_jsonl(data / "eval.jsonl")
    assert [tuple(map(int, toy_world.NUMBER.findall(r["prompt"]))) for r in evaluation] == test
    assert all(int(r["answer"]) == sum(p) for r, p in zip(evaluation, test))


def test_the_webs_pointwise_verdicts_are_right_at_the_level():
    """The web's Table 6 documents: the verdict (Score 5 or 1) against the truth of the reply
    between the template's <response> tags; a binomial share of 903, within 0.05."""
    rng = random.Random(1)
    config = dict(toy_world.SECOND, judge_accuracy=0.7, qa_share=0.0)
    docs = [d for d in toy_world.web_documents(rng, 6000, config) if d[1].startswith("Score")]
    right = 0
    question = re.compile(r"(?:What is|How much is) (\d) \+ (\d) \+ (\d)\?|Add (\d), (\d) and "
                          r"(\d)\.|Compute (\d) plus (\d) plus (\d)\.")
    for text, verdict in docs:
        problem = tuple(int(d) for d in question.search(text).groups() if d is not None)
        response = re.search(r"<response>(.*?)</response>", text, re.S).group(1)
        right += (verdict == "Score: 5") == toy_world.is_right(response, problem)
    assert len(docs) > 700 and abs(right / len(docs) - 0.7) < 0.05


def test_cream_t1_methods_run_cream_with_the_flag(tmp_path):
    command = toy_world.run_command("cream", "cream-t1-mean_logp", 3, tmp_path / "base",
                                    tmp_path / "data", tmp_path / "run", quick=True)
    flags = dict(zip(command[2::2], command[3::2]))
    assert flags["--method"] == "cream" and flags["--t1_consistency"] == "mean_logp"
    assert ("cream", "cream-t1-floor") in toy_world.world_methods(2)
    assert len(toy_world.world_methods(1)) == 7


@pytest.mark.parametrize("argv, option", [
    (["--judge_accuracy", "0.7"], "--world 2"), (["--sweep"], "--world 2"),
    (["--world", "2", "--judge_accuracy", "0.5"], "--judge_accuracy"),
    (["--world", "2", "--judge_accuracy", "0.7", "0.7"], "--judge_accuracy"),
    (["--world", "2", "--sweep", "--judge_accuracy", "0.7"], "--sweep")])
def test_bad_settings_of_the_second_world_stop_at_once(tmp_path, argv, option):
    with pytest.raises(SystemExit) as stop:
        toy_world.parse_args([*argv, "--out", str(tmp_path)])
    assert stop.value.code.startswith("toy_world.py: error: ") and option in stop.value.code


def test_the_sweep_levels_and_folders(tmp_path):
    args = toy_world.parse_args(["--world", "2", "--sweep", "--out", str(tmp_path)])
    assert args.levels == [0.6, 0.7, 0.85, 0.95]
    folders = [folder.name for _, folder, _, _ in toy_world.worlds(args.out, 2, args.levels)]
    assert folders == ["judge-0.6", "judge-0.7", "judge-0.85", "judge-0.95"]


def test_crossings_are_found_between_levels():
    levels = [0.6, 0.7, 0.85, 0.95]
    assert toy_world.crossings(levels, [-1.0, -0.5, 0.2, 0.3]) == "between 0.7 and 0.85"
    assert toy_world.crossings(levels, [0.1, 0.2, 0.3, None]) is None


def figures(greedy, label=None):
    return {"greedy": greedy, "label_accuracy": label or [None] * 3}


def test_the_sweep_tables_hand_worked(tmp_path):
    """Two levels, two seeds: CREAM 10 and 30 points under SRLM after iteration 3 at 0.6
    (mean -20.0, std 14.1), 10 points over it in both seeds at 0.95."""
    results = {
        0.6: {("cream", "cream"): {1: figures([0.5, 0.4, 0.3, 0.2], [0.9, 0.8, 0.7]),
                                   2: figures([0.5, 0.4, 0.3, 0.1], [0.7, 0.6, 0.5])},
              ("cream", "srlm"): {1: figures([0.5, 0.4, 0.3, 0.3]),
                                  2: figures([0.5, 0.4, 0.3, 0.4])}},
        0.95: {("cream", "cream"): {1: figures([0.5, 0.6, 0.7, 0.8]),
                                    2: figures([0.5, 0.6, 0.7, 0.9])},
               ("cream", "srlm"): {1: figures([0.5, 0.6, 0.7, 0.7]),
                                   2: figures([0.5, 0.6, 0.7, 0.8])}}}
    text = toy_world.sweep_report(tmp_path, results)
    line = next(l for l in text.splitlines() if l.startswith("| cream.py | CREAM - SRLM |"))
    assert line == "| cream.py | CREAM - SRLM | -20.0 ± 14.1 (0 / 2) | 10.0 ± 0.0 (2 / 0) |"
    labels = next(l for l in text.splitlines() if l.startswith("| cream.py | CREAM |")
                  and "/" in l)
    assert "80 / 70 / 60" in labels  # the means of 0.9, 0.7; 0.8, 0.6; 0.7, 0.5
    assert "CREAM against SRLM: the sign changes between 0.6 and 0.95" in text
    saved = json.loads((tmp_path / "sweep.json").read_text())
    assert saved["paired_means"]["cream-cream - SRLM"] == pytest.approx([-0.2, 0.1])
    assert (tmp_path / "sweep.md").read_text() == text


def test_a_fake_sweep_runs_every_method_at_every_level(tmp_path, monkeypatch):
    """The whole command with no pretraining and runs that finish at once: every level's runs,
    the results of each level and the sweep's tables."""
    def no_pretraining(path, config, seed=0, log=toy_world.log):
        return path

    def command(script, method, seed, base, data_dir, out, quick):
        return ["python3", "-c", "import pathlib, sys; p = pathlib.Path(sys.argv[1]); "
                "p.mkdir(parents=True); (p / 'table.md').write_text('')", str(out)]
    monkeypatch.setattr(toy_world, "pretrain", no_pretraining)
    monkeypatch.setattr(toy_world, "run_command", command)
    out = tmp_path / "out"
    for level in ("judge-0.6", "judge-0.9"):  # bases already built: no pretraining pool
        (out / level / "base").mkdir(parents=True)
        (out / level / "base" / "config.json").write_text("{}")
    toy_world.main(["--world", "2", "--judge_accuracy", "0.6", "0.9", "--quick", "--jobs", "20",
                    "--out", str(out)])
    for level in ("judge-0.6", "judge-0.9"):
        assert len(list((out / level / "runs").iterdir())) == 10
        assert "Second world, judge accuracy" in (out / level / "results.md").read_text()
    assert "Crossing points" in (out / "sweep.md").read_text()
