"""The papers' baselines, ablations and analyses (README, 'Reproducing the papers' tables'):
scir.py's Table 2 baselines, Table 4 ablations, Table 1 consistency and Figure 3 RewardBench
accuracy; cream.py's consistency measures (Table 4), SRLM and P-SRLM baselines and downstream
evaluation (Table 1); both final tables. Against hand-worked cases and brute force, and through
the CLI."""

import itertools
import json
import shutil
from pathlib import Path
import math
from types import SimpleNamespace

import pytest
import torch
from conftest import read_jsonl, write_jsonl

import cream
import prompts
import scir


def bernoulli_terms(q, p):
    """KL(Bern(q) || Bern(p)) + H(Bern(q)) written out."""
    kl = q * math.log(q / p) + (1 - q) * math.log((1 - q) / (1 - p))
    entropy = -(q * math.log(q) + (1 - q) * math.log(1 - q))
    return kl + entropy


def eq7(pi1, pi2, g1, g2, l1, l2, q, beta, alpha, tau):
    """scir_loss with P of Eq. 4 under the global reference, composed as the training step does."""
    p_irm = scir.implicit_preference(pi1, pi2, g1, g2, beta)
    return scir.scir_loss(pi1, pi2, p_irm, q, l1, l2, g1, g2, beta, alpha, tau)


def test_no_dcpo_keeps_only_the_consistency_loss():
    # P = sigmoid(beta * 2) with beta 1 -> 0.881 (confident), Q = 0.9 (confident, agrees)
    policy_1, zero = torch.tensor([2.0]), torch.zeros(1)
    p = 1 / (1 + math.exp(-2.0))
    q = 0.9
    expected = bernoulli_terms(q, p) + bernoulli_terms(p, q)
    terms = eq7(policy_1, zero, zero, zero, zero, zero, torch.tensor([q]), beta=1.0, alpha=1.0, tau=0.7)
    assert terms["agree"].item() == 1.0
    assert terms["consistency_loss"].item() == pytest.approx(expected, rel=1e-5)  # what --no_dcpo trains
    with_dcpo = terms
    dpo = math.log(1 + math.exp(-2.0))  # -log sigmoid(2): chosen y1, reference ratio 0
    assert with_dcpo["loss"].item() == pytest.approx(expected + dpo, rel=1e-5)


def test_no_adaptive_reference_uses_the_local_reference_only():
    """IRM prefers y2 (global reference) and so does Q: chosen y2. Reference ratios log pi_ref(y2)/pi_ref(y1):
    local -5, global -3. Appendix A takes the larger (-3); the ablation keeps the local one (-5)."""
    beta = 1.0
    policy_1, policy_2 = torch.tensor([1.0]), torch.tensor([0.0])
    global_1, global_2 = torch.tensor([-3.0]), torch.tensor([-6.0])  # P = sigmoid((1 + 3) - (0 + 6)) < 0.5
    local_1, local_2 = torch.tensor([0.0]), torch.tensor([-5.0])
    q = torch.tensor([0.2])
    policy_margin = 0.0 - 1.0  # log pi(y2) - log pi(y1)
    p_irm = scir.implicit_preference(policy_1, policy_2, global_1, global_2, beta)
    # the ablation: the global log-probs are given but not used as a reference
    only_local = scir.scir_loss(policy_1, policy_2, p_irm, q, local_1, local_2, global_1, global_2, beta, 0.0, 0.7,
                                adaptive_reference=False)
    adaptive = eq7(policy_1, policy_2, global_1, global_2, local_1, local_2, q, beta, 0.0, 0.7)
    assert only_local["agree"].item() == adaptive["agree"].item() == 1.0
    assert only_local["loss"].item() == pytest.approx(math.log(1 + math.exp(-beta * (policy_margin + 5.0))), rel=1e-6)
    assert adaptive["loss"].item() == pytest.approx(math.log(1 + math.exp(-beta * (policy_margin + 3.0))), rel=1e-6)


def test_single_judge_prompt_reads_one_prompt_only(monkeypatch, tiny_tokenizer):
    """A judge that always names the first slot gives Q = 0.5 over 2 orders, but sigmoid(a - b) from one prompt."""
    tokenizer = scir.load_tokenizer(tiny_tokenizer.name_or_path)
    seen = []

    def first_slot_logits(model, sequences, identifier_ids, pad_id):
        seen.append(len(sequences))
        return torch.tensor([[2.0, 0.5]] * len(sequences))  # logit of m (first slot), of M

    monkeypatch.setattr(scir, "identifier_logits", first_slot_logits)
    args = ("What is 2 + 3?",), ("5",), ("6",), (0, 1), 0.0, 700
    one = scir.generative_preference(None, tokenizer, *args, num_prompts=1)
    four = scir.generative_preference(None, tokenizer, *args).mean(-1)
    assert seen == [1, 4]
    assert one.item() == pytest.approx(1 / (1 + math.exp(-1.5)), rel=1e-6)
    assert four.item() == pytest.approx(0.5, abs=1e-7)


@pytest.mark.parametrize("measure, expected", [
    ("kendall", ((0.5 + 1) / 2 + (-1 + 1) / 2) / 2),
    ("spearman", ((0.8 + 1) / 2 + (-1 + 1) / 2) / 2),
    ("toporder", (1.0 + 0.4) / 2),  # N = 3, chance 1/6: T = 1 -> 1; T = 0 -> kappa = -1/5, C = 0.4
])
def test_measured_consistency_hand_worked(measure, expected):
    rows = [{"tau": 0.5, "spearman": 0.8, "top_order": 1.0, "r": [1.0, 2.0, 3.0]},
            {"tau": -1.0, "spearman": -1.0, "top_order": 0.0, "r": [1.0, 2.0, 3.0]}]
    assert cream.measured_consistency(rows, measure) == pytest.approx(expected)


CREAM_SMALL = ["--iterations", 1, "--num_prompts", 4, "--num_samples", 3, "--max_new_tokens", 6, "--max_length", 96,
               "--sft_epochs", 1, "--batch_size", 2, "--grad_accum", 1, "--dtype", "float32"]


def brute_spearman(x, y):
    def ranks(v):
        return [sum(b < a for b in v) + (sum(b == a for b in v) + 1) / 2 for a in v]
    rx, ry = ranks(x), ranks(y)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    num = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    den = math.sqrt(sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry))
    return num / den if den else 0.0


def brute_top_order(x, y):
    """TopOrder with ties broken every way: the mean over every tie-break order of x and of y
    (identical samples tie in both rankings)."""
    orders = list(itertools.permutations(range(len(x))))

    def best_and_worst(values, order):
        keys = list(zip(values, order))
        return keys.index(max(keys)), keys.index(min(keys))
    hits = [best_and_worst(x, p) == best_and_worst(y, q) for p in orders for q in orders]
    return sum(hits) / len(hits)


@pytest.mark.parametrize("flags, expected", [
    (["--method", "srlm"], lambda rows: 1.0),
    (["--consistency_measure", "spearman"],
     lambda rows: sum((brute_spearman(r["r"], r["r_prev"]) + 1) / 2 for r in rows) / len(rows)),
    (["--consistency_measure", "toporder"],  # N = 3: chance agreement 1/6 maps to 0.5, full to 1
     lambda rows: sum(1 + (brute_top_order(r["r"], r["r_prev"]) - 1 / 6) / (5 / 6) for r in rows)
     / len(rows) / 2),
])
def test_cream_variants_through_the_cli(flags, expected, tmp_path, tiny_model_dir, data_dir, run_script):
    out = tmp_path / "run"
    result = run_script("cream.py", "--model", tiny_model_dir, "--data_dir", data_dir, "--output_dir", out,
                        *CREAM_SMALL, *flags)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = read_jsonl(out / "iter1" / "rewards.jsonl")
    consistency = expected(rows)
    (metrics,) = read_jsonl(out / "metrics.jsonl")
    assert metrics["consistency"] == pytest.approx(consistency, abs=1e-9)
    assert all(pair["consistency"] == pytest.approx(consistency, abs=1e-9) for pair in read_jsonl(out / "iter1" / "pairs.jsonl"))
    table = (out / "table.md").read_text().splitlines()
    column = table[0].split(" | ").index("C used")
    assert next(line for line in table if "| M1 |" in line).split(" | ")[column] == f"{consistency:.2f}"


SCIR_SMALL = ["--iterations", 1, "--num_prompts", 3, "--num_samples", 2, "--max_new_tokens", 6, "--max_length", 700,
              "--sft_epochs", 1, "--judge_pairs", 2, "--sft_examples", 4, "--batch_size", 2, "--grad_accum", 1,
              "--dtype", "float32", "--beta", 5.0]


@pytest.mark.parametrize("flag", ["--no_consistency_loss", "--no_dcpo", "--single_judge_prompt",
                                  "--no_adaptive_reference"])
def test_scir_ablations_through_the_cli(flag, tmp_path, tiny_model_dir, data_dir, run_script):
    out = tmp_path / "run"
    result = run_script("scir.py", "--model", tiny_model_dir, "--data_dir", data_dir, "--output_dir", out,
                        *SCIR_SMALL, flag)
    assert result.returncode == 0, result.stderr[-3000:]
    _, metrics = read_jsonl(out / "metrics.jsonl")  # rows M0, M1
    assert (out / "M1" / "config.json").exists()
    summary = json.loads((out / "M1" / "training_summary.json").read_text())
    table = (out / "table.md").read_text().splitlines()
    dcpo_cell = next(line for line in table if "| M1 |" in line).split(" | ")[table[0].split(" | ").index("DCPO %")]
    if flag == "--no_consistency_loss":  # Eq. 7 without its second term: the loss is the DPO term alone
        assert metrics["loss"] == pytest.approx(metrics["dpo_loss"], rel=1e-5, abs=1e-7)
        # only what is trained is logged: alpha = 0 trains no Eq. 6
        assert "consistency_loss" not in summary and metrics["consistency_loss"] is None
    if flag == "--no_dcpo":  # Eq. 7 without its first term (alpha = 1): the loss is the consistency loss alone
        assert metrics["loss"] == pytest.approx(metrics["consistency_loss"], rel=1e-5, abs=1e-7)
        # no DPO is trained, so no DPO figure is logged, and the table's DCPO % is empty
        assert not {"dpo_loss", "dcpo_fraction"} & set(summary)
        assert metrics["dpo_loss"] is None and metrics["dcpo_fraction"] is None
        assert dcpo_cell == "-"
    else:
        assert dcpo_cell != "-" and 0 <= summary["dcpo_fraction"] <= 1
    if flag == "--single_judge_prompt":  # Q from one judge prompt, before and after training
        pairs = read_jsonl(out / "iter1" / "pairs.jsonl")
        assert all(len(p["q_prompts_start"]) == len(p["q_prompts_end"]) == 1 for p in pairs)
        assert all(p["q_start"] == p["q_prompts_start"][0] for p in pairs)


def test_ablation_from_a_later_model_samples_that_iterations_prompts(tmp_path, tiny_model_dir, data_dir):
    """Table 4's recipe: a run from M1 with --sft_epochs 0 --prompt_offset <one iteration's prompts> samples the
    prompts of the main run's second iteration, not its first."""
    common = ["--data_dir", data_dir, *map(str, SCIR_SMALL[2:])]  # SCIR_SMALL without its --iterations
    main_run, ablation = tmp_path / "main", tmp_path / "ablation"
    scir.main(["--model", tiny_model_dir, "--output_dir", str(main_run), *common, "--iterations", "2"])
    scir.main(["--model", str(main_run / "M1"), "--output_dir", str(ablation), *common, "--global_reference",
               tiny_model_dir, "--sft_epochs", "0", "--iterations", "1", "--prompt_offset", "3"])
    assert json.loads((ablation / "M0" / "training_summary.json").read_text()) == {"sft": "skipped"}
    prompts_of = lambda path: [row["prompt"] for row in read_jsonl(path / "samples.jsonl")]
    assert prompts_of(ablation / "iter1") == prompts_of(main_run / "iter2") != prompts_of(main_run / "iter1")


def test_no_adaptive_reference_reaches_the_loss(monkeypatch, tmp_path, tiny_model_dir, data_dir):
    """With the flag, Appendix A's maximum is never taken (DPO keeps M_t's ratio); without it, it
    sees the global reference's log-probs, which differ from M0's."""
    original, calls = scir.adaptive_reference_logratio, []

    def recording(local_chosen, local_rejected, global_chosen, global_rejected):
        calls.append(torch.equal(local_chosen, global_chosen) and torch.equal(local_rejected, global_rejected))
        return original(local_chosen, local_rejected, global_chosen, global_rejected)
    monkeypatch.setattr(scir, "adaptive_reference_logratio", recording)
    command = ["--model", tiny_model_dir, "--data_dir", data_dir, *map(str, SCIR_SMALL)]
    scir.main(command + ["--output_dir", str(tmp_path / "ablation"), "--no_adaptive_reference"])
    assert calls == []
    scir.main(command + ["--output_dir", str(tmp_path / "full")])
    assert calls and not any(calls)


def test_task_rows_relabel_options_and_read_gold_answers():
    arc = {"question": "Which?", "choices": {"label": ["1", "2", "3", "4"], "text": ["w", "x", "y", "z"]}, "answerKey": "3"}
    assert cream.task_rows("arc_easy", [arc]) == [{"prompt": "Which?\nA. w\nB. x\nC. y\nD. z", "answer": "C"}]
    obqa = {"question_stem": "Stem?", "choices": {"label": ["A", "B"], "text": ["p", "q"]}, "answerKey": "B"}
    assert cream.task_rows("openbookqa", [obqa]) == [{"prompt": "Stem?\nA. p\nB. q", "answer": "B"}]
    siqa = {"context": "Ctx.", "question": "Why?", "answerA": "u", "answerB": "v", "answerC": "w", "label": "2"}
    assert cream.task_rows("siqa", [siqa]) == [{"prompt": "Ctx. Why?\nA. u\nB. v\nC. w", "answer": "B"}]
    gsm = {"question": "How many?", "answer": "3 * 4 = 12\n#### 1,234"}
    assert cream.task_rows("gsm8k", [gsm]) == [{"prompt": "How many?", "answer": "1234"}]


def test_evaluate_through_the_cli(tmp_path, tiny_model_dir, data_dir, run_script):
    import shutil

    local = tmp_path / "data"
    shutil.copytree(data_dir, local)
    eval_rows = [{"task": "arc_easy", "prompt": "Which is a planet?\nA. Mars\nB. Moon", "answer": "A"},
                 {"task": "arc_easy", "prompt": "Which is hot?\nA. ice\nB. fire", "answer": "B"},
                 {"task": "arc_easy", "prompt": "Which is wet?\nA. water\nB. sand", "answer": "A"},
                 {"task": "gsm8k", "prompt": "What is 2 + 3?", "answer": "5"}]
    (local / "eval.jsonl").write_text("".join(json.dumps(row) + "\n" for row in eval_rows))
    out = tmp_path / "run"
    result = run_script("cream.py", "--model", tiny_model_dir, "--data_dir", local, "--output_dir", out,
                        *CREAM_SMALL, "--evaluate", "--eval_limit", 2)
    assert result.returncode == 0, result.stderr[-3000:]
    table = read_jsonl(out / "evaluation.jsonl")
    assert [(row["model"], row["task"], row["n"]) for row in table] == [
        (f"M{k}", task, n) for k in range(3) for task, n in (("arc_easy", 2), ("gsm8k", 1))]
    for k in range(3):  # each model's greedy replies are kept, one per question within the limit
        rows = read_jsonl(out / "eval" / f"M{k}-greedy-first2.jsonl")
        assert [row["prompt"] for row in rows] == [r["prompt"] for r in eval_rows[:2] + eval_rows[3:]]
        for row in rows:  # both rules' readings, recomputed here from the reply
            assert {key: row[key] for key in ("strict", "flexible", "correct_strict", "correct_flexible")} == \
                prompts.read_answers(row, row["reply"])
        for task in ("arc_easy", "gsm8k"):
            scores = next(row for row in table if row["model"] == f"M{k}" and row["task"] == task)
            for rule in ("flexible", "strict"):
                assert scores[rule] == pytest.approx(sum(r[f"correct_{rule}"] for r in rows if r["task"] == task)
                                                     / sum(r["task"] == task for r in rows))
    # table.md as Table 1: percentages, each task by the flexible rule then the strict, and from
    # M2 on an arrow against the previous iteration
    lines = (out / "table.md").read_text().splitlines()
    assert lines[0].startswith("| Method | Reward | Iteration | ARC-Easy (first 2) | ARC-Easy (first 2) strict | "
                               "GSM8K (first 2) | GSM8K (first 2) strict |")  # --eval_limit 2, named
    percent = {(row["model"], row["task"], rule): 100 * row[rule] for row in table for rule in ("flexible", "strict")}
    for k in range(3):
        cells = next(line for line in lines if f"| M{k} |" in line).split(" | ")
        for column, (task, rule) in enumerate([("arc_easy", "flexible"), ("arc_easy", "strict"),
                                                ("gsm8k", "flexible"), ("gsm8k", "strict")], 3):
            now = percent[f"M{k}", task, rule]
            before = percent.get((f"M{k - 1}", task, rule))
            arrow = "" if k < 2 else {1: " ↑", -1: " ↓", 0: " ="}[(now > before) - (now < before)]
            assert cells[column] == f"{now:.2f}{arrow}"


def test_evaluate_needs_eval_jsonl(tmp_path, tiny_model_dir, data_dir):
    with pytest.raises(SystemExit) as exit_info:
        cream.main(["--model", tiny_model_dir, "--data_dir", data_dir, "--output_dir", str(tmp_path / "run"),
                    "--evaluate"])
    assert str(exit_info.value.code).startswith("cream.py: error:") and "eval.jsonl is missing" in str(exit_info.value.code)


def test_internal_consistency_counts_only_unanimous_judge_prompts():
    p_irm = [0.8, 0.3, 0.9, 0.2]
    q_prompts = [[0.6, 0.7, 0.9, 0.8],   # judge unanimous for y1, IRM y1: agree
                 [0.4, 0.6, 0.3, 0.2],   # judge prompts split: not counted
                 [0.2, 0.1, 0.3, 0.4],   # judge unanimous for y2, IRM y1: disagree
                 [0.3, 0.2, 0.1, 0.4]]   # both y2: agree
    rate, counted = scir.internal_consistency(p_irm, map(scir.judge_label, q_prompts))
    assert counted == 3 and rate == pytest.approx(2 / 3)
    assert scir.internal_consistency([0.9], [scir.judge_label([0.6, 0.4, 0.6, 0.6])]) == (None, 0)
    assert scir.internal_consistency([0.5, 0.7], [True, True]) == (1.0, 1)  # P = 0.5 labels nothing


def test_pointwise_label_and_the_baselines_consistency():
    """The Table 6 judge labels a pair by its two scores; a tie or an unreadable score labels nothing."""
    scores = [[4.0, 2.0], [1.0, 3.0], [3.0, 3.0], [None, 5.0], [5.0, 0.0]]
    assert [scir.pointwise_label(s) for s in scores] == [True, False, None, None, True]
    p_irm = [0.7, 0.6, 0.9, 0.1, 0.2]  # agree, disagree, (tie), (unreadable), disagree
    assert scir.internal_consistency(p_irm, map(scir.pointwise_label, scores)) == (pytest.approx(1 / 3), 3)


def test_per_prompt_judge_probabilities(monkeypatch, tiny_tokenizer):
    """A judge that always names the first slot: y1 wins in the two prompts that show it first, loses in the others."""
    tokenizer = scir.load_tokenizer(tiny_tokenizer.name_or_path)
    monkeypatch.setattr(scir, "identifier_logits", lambda model, sequences, ids, pad: torch.tensor([[2.0, 0.5]] * len(sequences)))
    per_prompt = scir.generative_preference(None, tokenizer, ("Q?",), ("5",), ("6",), (0, 1), 0.0, 700)
    first = 1 / (1 + math.exp(-1.5))
    assert per_prompt.shape == (1, 4)
    assert per_prompt[0].tolist() == pytest.approx([first, 1 - first, first, 1 - first])


@pytest.mark.parametrize("judgement, expected", [
    ("The response is relevant and helpful.\nScore: 4", 4.0),
    ("**Score:** 3", 3.0),
    ("Total score of 5 points.", 5.0),
    ("Score: 4/5", 4.0),
    ("Score: 2 ... on reflection, Score: 5", 5.0),       # the conclusion is the last one
    ("score is 1.5", 1.5),
    ("Score: 7", None),                                 # outside the additive 0-5 scale
    ("I would give it four points.", None),
    ("", None),
    ("Score:\n", None),
])
@pytest.mark.parametrize("module", [cream, scir])
def test_parse_score(module, judgement, expected):
    assert module.parse_score(judgement) == expected


def test_build_pairs_leaves_out_unusable_scores():
    samples = [{"id": "a", "prompt": "p", "samples": [{"response": str(i), "token_ids": [i]} for i in range(4)]},
               {"id": "b", "prompt": "q", "samples": [{"response": str(i), "token_ids": [i]} for i in range(4)]}]
    rewards = [{"id": "a", "r": [None, 2.0, 5.0, None], "logps_t": [0.0, -1.0, -2.0, -3.0], "tau": 0.0},
               {"id": "b", "r": [None, 3.0, None, None], "logps_t": [0.0] * 4, "tau": 0.0}]
    (pair,) = cream.build_pairs(samples, rewards, 1.0, "dataset")
    assert (pair["id"], pair["chosen"], pair["rejected"]) == ("a", "2", "1")
    assert (pair["ref_chosen_logp"], pair["ref_rejected_logp"]) == (-2.0, -1.0)


def test_p_srlm_pairs_follow_the_judge_scores(monkeypatch, tmp_path, tiny_model_dir, data_dir):
    """A random tiny model writes no 'Score: N', so the scores are patched: the judgement's length mod 5."""
    monkeypatch.setattr(cream, "parse_score", lambda text: float(len(text) % 5))
    out = tmp_path / "run"
    cream.main(["--model", tiny_model_dir, "--data_dir", data_dir, "--output_dir", str(out), "--method", "p-srlm",
                *map(str, CREAM_SMALL), "--max_new_tokens", "12", "--max_length", "600"])  # the judge's template
    pairs = assert_pairs_follow_patched_scores(out)
    assert all(pair["consistency"] == 1.0 for pair in pairs)
    (metrics,) = read_jsonl(out / "metrics.jsonl")  # cream.py: one row per iteration
    assert metrics["unusable_judgements"] == 0 and metrics["pairs"] == len(pairs)


@pytest.mark.parametrize("module", [cream, scir])
def test_pointwise_judge_prompt_keeps_to_max_length(module, tiny_tokenizer, monkeypatch):
    """Table 6's prompt for one response: a response that fits is kept whole; a long one is cut
    so the prompt keeps to about max_length (a cut text may re-encode a token or two longer).
    cream.py's P-SRLM judge builds its prompts so, as scir.py's SRLM judge does."""
    instruction, short, long = "What do bees make?", "Bees make honey.", "Bees make honey. " * 200
    assert module.pointwise_prompt(tiny_tokenizer, instruction, short, 500) == prompts.fill_pointwise(instruction,
                                                                                                       short)
    cut = module.pointwise_prompt(tiny_tokenizer, instruction, long, 500)
    assert cut.startswith(prompts.fill_pointwise(instruction, "")[:40]) and "Bees make honey." in cut
    assert 480 <= len(module.encode(tiny_tokenizer, cut)) <= 503
    seen = []

    def judge(model, tokenizer, texts, args, num_samples=None, greedy=False):
        seen.extend(texts)
        return [[{"response": "Score: 4", "token_ids": [1], "finished": True}] for _ in texts]
    monkeypatch.setattr(module, "sample_responses", judge)
    rows = [{"id": "a", "prompt": instruction, "samples": [{"response": short}, {"response": long}]}]
    args = SimpleNamespace(max_length=500, num_samples=2)
    (judged,) = module.judge_samples(torch.nn.Linear(1, 1), tiny_tokenizer, rows, args)
    assert judged["scores"] == [4.0, 4.0]
    assert seen == [module.pointwise_prompt(tiny_tokenizer, instruction, text, 500) for text in (short, long)]


@pytest.mark.parametrize("judgement, expected", [
    ("Score: 5/10", None), ("Score: 1 out of 10", None),   # another scale
    ("Score: 4 + 1 = 5", 5.0), ("Score: 1+1+1", 3.0),     # additive tallies
    ("Score = 4", 4.0), ("Score: [4]", 4.0), ("Score: <4>", 4.0),
])
@pytest.mark.parametrize("module", [cream, scir])
def test_parse_score_scales_and_tallies(module, judgement, expected):
    assert module.parse_score(judgement) == expected


def test_agreement_needs_both_to_pick_a_side():
    assert scir.agree(0.7, 0.6) and scir.agree(0.2, 0.4)
    assert not scir.agree(0.5, 0.3) and not scir.agree(0.7, 0.5) and not scir.agree(0.7, 0.3)


def test_both_loss_terms_ablated_is_refused():
    with pytest.raises(SystemExit) as exit_info:
        scir.parse_args(["--no_consistency_loss", "--no_dcpo"])
    assert str(exit_info.value.code).startswith("scir.py: error:")


@pytest.mark.parametrize("module, argv, culprit", [
    (scir, ["--method", "srlm", "--no_dcpo"], "--no_dcpo is an ablation of SCIR"),
    (scir, ["--method", "irm", "--single_judge_prompt"], "--single_judge_prompt is an ablation of SCIR"),
    (scir, ["--method", "srlm", "--judge_sft_only"], "--judge_sft_only belongs to --method scir"),
    (scir, ["--sft_epochs", "0"], "--sft_epochs 0 makes M0 the global reference itself"),
    (scir, ["--sft_epochs", "0", "--global_reference", "mistralai/Mistral-7B-v0.3"], "M0 the global reference"),
    (cream, ["--method", "srlm", "--consistency_measure", "spearman"], "--method srlm trains with C = 1"),
    (cream, ["--method", "p-srlm", "--consistency_scope", "pair"], "--method p-srlm trains with C = 1"),
])
def test_flags_that_do_not_belong_together_are_refused(module, argv, culprit):
    with pytest.raises(SystemExit) as exit_info:
        module.parse_args(argv)
    assert culprit in str(exit_info.value.code) and "\n" not in str(exit_info.value.code)


def test_eval_answers_are_checked_before_any_model_runs(tmp_path, data_dir):
    import shutil

    local = tmp_path / "data"
    shutil.copytree(data_dir, local)
    (local / "eval.jsonl").write_text(json.dumps({"task": "arc_easy", "prompt": "Q?", "answer": "b"}) + "\n")
    with pytest.raises(SystemExit) as exit_info:
        cream.main(["--model", "/no/such/model", "--data_dir", str(local), "--output_dir", str(tmp_path / "run"),
                    "--evaluate"])
    assert "eval.jsonl: row 1: answer 'b'" in str(exit_info.value.code)


def test_scir_irm_baseline_pairs_best_and_worst_implicit_reward(tmp_path, tiny_model_dir, data_dir, run_script):
    out = tmp_path / "run"
    result = run_script("scir.py", "--model", tiny_model_dir, "--data_dir", data_dir, "--output_dir", out,
                        *SCIR_SMALL, "--num_samples", 3, "--method", "irm")
    assert result.returncode == 0, result.stderr[-3000:]
    local = [row["logp"] for row in read_jsonl(out / "iter1" / "logps_local.jsonl")]
    global_ = [row["logp"] for row in read_jsonl(out / "iter1" / "logps_global.jsonl")]
    samples = read_jsonl(out / "iter1" / "samples.jsonl")
    by_id = {row["id"]: (j, [s["response"] for s in row["samples"]]) for j, row in enumerate(samples)}
    pairs = read_jsonl(out / "iter1" / "pairs.jsonl")
    assert pairs
    for pair in pairs:
        j, responses = by_id[pair["id"]]
        reward = [local[3 * j + i] - global_[3 * j + i] for i in range(3)]  # log pi_t - log pi_ref^g
        assert pair["rewards"] == pytest.approx(reward)
        assert reward[responses.index(pair["chosen"])] == max(reward)
        assert reward[responses.index(pair["rejected"])] == min(reward)
    _, metrics = read_jsonl(out / "metrics.jsonl")  # rows M0, M1
    assert metrics["pairs"] == len(pairs) and metrics["consistency_rate"] is None
    assert metrics["loss"] == pytest.approx(metrics["dpo_loss"])
    # Table 1's analysis: P (Eq. 4, global reference) of chosen vs rejected under M0 and M1, token by token
    from test_scir import brute_logp_ids
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    models = {name: AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
              for name, path in (("base", tiny_model_dir), ("M0", out / "M0"), ("M1", out / "M1"))}
    ids_of = {row["id"]: {s["response"]: s["token_ids"] for s in row["samples"]} for row in samples}
    with torch.no_grad():
        for pair in pairs:
            p_ids = tok(prompts.chat_prompt(tok, pair["prompt"]), add_special_tokens=False).input_ids
            y = [ids_of[pair["id"]][pair[key]] for key in ("chosen", "rejected")]
            logp = {name: [brute_logp_ids(model, p_ids, ids).item() for ids in y] for name, model in models.items()}
            for when, name in (("start", "M0"), ("end", "M1")):
                ratio = (logp[name][0] - logp["base"][0]) - (logp[name][1] - logp["base"][1])
                assert pair[f"p_{when}"] == pytest.approx(1 / (1 + math.exp(-5.0 * ratio)), abs=1e-4)
    # the GRM of the analysis is M0's Table 6 judge on each pair (chosen, rejected), judged for it alone
    judged = read_jsonl(out / "iter1" / "judgements_pairs.jsonl")
    assert [row["id"] for row in judged] == [pair["id"] for pair in pairs]
    assert [row["scores"] for row in judged] == [pair["scores_start"] for pair in pairs]
    assert all(len(row["judgements"]) == 2 for row in judged)
    labelled = [s for s in (pair["scores_start"] for pair in pairs) if None not in s and s[0] != s[1]]
    m0 = read_jsonl(out / "metrics.jsonl")[0]
    assert m0["counted_new"] == len(labelled)  # a random model writes no score: usually none


def test_scir_srlm_baseline_follows_the_judge_scores(monkeypatch, tmp_path, tiny_model_dir, data_dir):
    """A random tiny model writes no 'Score: N', so the scores are patched: the judgement's length mod 5.

    Table 1's analysis of SRLM uses SRLM's own judge: on D_0, M0's scores that made the pairs (chosen always wins);
    on the trained pairs, M1's judgements of chosen and rejected, where a tie labels nothing."""
    monkeypatch.setattr(scir, "parse_score", lambda text: float(len(text) % 5))
    original, judges = scir.judge_samples, []  # the weights of the model behind each call, and what it judged

    def recording(model, tokenizer, rows, args):
        judges.append((model.get_input_embeddings().weight.detach().clone(), len(rows[0]["samples"])))
        return original(model, tokenizer, rows, args)
    monkeypatch.setattr(scir, "judge_samples", recording)
    out = tmp_path / "run"
    scir.main(["--model", tiny_model_dir, "--data_dir", data_dir, "--output_dir", str(out), "--method", "srlm",
               *map(str, SCIR_SMALL), "--num_samples", "3"])
    from transformers import AutoModelForCausalLM

    weights = {k: AutoModelForCausalLM.from_pretrained(out / f"M{k}").get_input_embeddings().weight for k in (0, 1)}
    (ranking, samples_per_row), (analysis, responses_per_pair) = judges
    assert samples_per_row == 3 and torch.equal(ranking, weights[0])  # M0 ranks its 3 samples
    assert responses_per_pair == 2 and torch.equal(analysis, weights[1])  # M1 judges the pairs it was trained on
    pairs = assert_pairs_follow_patched_scores(out)
    m0, m1 = read_jsonl(out / "metrics.jsonl")
    # the judge prefers the chosen response (y1); P = 0.5 (say, chosen and rejected the same text) labels nothing
    labelled = [p["p_start"] > 0.5 for p in pairs if p["p_start"] != 0.5]
    assert (m0["consistency_new"], m0["counted_new"]) == (pytest.approx(sum(labelled) / len(labelled)),
                                                          len(labelled))
    trained = []  # (P of M1, M1's judge label) where the two patched scores differ
    for pair in pairs:
        chosen, rejected = (len(text) % 5 for text in pair["judgements_end"])
        assert pair["scores_end"] == [chosen, rejected]
        if chosen != rejected:
            if pair["p_end"] != 0.5:
                trained.append((pair["p_end"] > 0.5) == (chosen > rejected))
    assert trained and (m1["consistency_trained"], m1["counted_trained"]) == (
        pytest.approx(sum(trained) / len(trained)), len(trained))


def test_scir_irm_baseline_analysis_uses_the_pointwise_judge(monkeypatch, tmp_path, tiny_model_dir, data_dir):
    """IRM's Table 1 analysis: M0 judges each pair (chosen, rejected) with the Table 6 prompt before training, M1
    after; a pair counts where the two (patched) scores differ, and agrees where the IRM picks the higher one."""
    monkeypatch.setattr(scir, "parse_score", lambda text: float(len(text) % 3))
    out = tmp_path / "run"
    scir.main(["--model", tiny_model_dir, "--data_dir", data_dir, "--output_dir", str(out), "--method", "irm",
               *map(str, SCIR_SMALL), "--num_samples", "3"])
    pairs = read_jsonl(out / "iter1" / "pairs.jsonl")
    judged = read_jsonl(out / "iter1" / "judgements_pairs.jsonl")
    assert [(row["id"], row["chosen"]) for row in judged] == [(p["id"], p["chosen"]) for p in pairs]
    counted = 0
    for metrics, when, key in ((read_jsonl(out / "metrics.jsonl")[0], "start", "new"),
                               (read_jsonl(out / "metrics.jsonl")[1], "end", "trained")):
        agreements = []
        for pair, row in zip(pairs, judged):
            chosen, rejected = (len(text) % 3 for text in (row["judgements"] if when == "start" else
                                                           pair["judgements_end"]))
            if chosen != rejected:
                agreements.append((pair[f"p_{when}"] > 0.5) == (chosen > rejected))
        assert metrics[f"counted_{key}"] == len(agreements)
        assert metrics[f"consistency_{key}"] == (pytest.approx(sum(agreements) / len(agreements)) if agreements
                                                 else None)
        counted += len(agreements)
    assert counted  # the patched scores label some pairs
    # a cached judgement of other pairs (say, best and worst swapped on a rerun) is refused, not reused
    import shutil

    (out / "iter1" / "judgements_pairs.jsonl").write_text("".join(
        json.dumps(dict(row, chosen=pair["rejected"])) + "\n" for row, pair in zip(judged, pairs)))
    shutil.rmtree(out / "M1")
    with pytest.raises(SystemExit) as exit_info:
        scir.main(["--model", tiny_model_dir, "--data_dir", data_dir, "--output_dir", str(out), "--method", "irm",
                   *map(str, SCIR_SMALL), "--num_samples", "3"])
    assert "judgements_pairs.jsonl does not match this run's data or its earlier steps" in str(exit_info.value.code)


def assert_pairs_follow_patched_scores(out):
    """Each pair is the best against the worst response by the patched score (judgement length mod 5)."""
    judged = {row["id"]: [len(text) % 5 for text in row["judgements"]] for row in read_jsonl(out / "iter1" / "judgements.jsonl")}
    samples = {row["id"]: [s["response"] for s in row["samples"]] for row in read_jsonl(out / "iter1" / "samples.jsonl")}
    pairs = read_jsonl(out / "iter1" / "pairs.jsonl")
    assert pairs
    for pair in pairs:
        scores, responses = judged[pair["id"]], samples[pair["id"]]
        assert scores[responses.index(pair["chosen"])] == max(scores)
        assert scores[responses.index(pair["rejected"])] == min(scores)
    return pairs


# ------------------------------------------------------------------------------------------------------------------
# SCIR Figure 3: RewardBench accuracy of the IRM, the GRM and the pairs they agree on
# ------------------------------------------------------------------------------------------------------------------
def test_reward_bench_sections_hand_worked():
    subsets = ["alpacaeval-easy", "mt-bench-med", "mt-bench-med", "llmbar-natural", "donotanswer",
               "math-prm", "hep-go", "hep-go", "hep-rust", "hep-cpp"]
    correct = [True, False, None, None, True, True, False, False, True, None]
    scores = scir.reward_bench_scores(subsets, correct)
    assert scores["Chat"] == pytest.approx(1 / 2)  # pooled: 2 labelled pairs, 1 right; the None is left out
    assert scores["Chat Hard"] is None  # its only pair has no label
    assert scores["Safety"] == 1.0
    # math-prm (1/1) weighs as much as the code subsets together (1 of 3): (1 + 1/3) / 2, not the pooled 2/4
    assert scores["Reasoning"] == pytest.approx((1 + 1 / 3) / 2)
    assert scores["average"] == pytest.approx((1 / 2 + 1 + (1 + 1 / 3) / 2) / 3)
    assert (scores["labelled"], scores["pairs"]) == (7, 10)
    only_code = scir.reward_bench_scores(["hep-js", "hep-js"], [True, False])
    assert only_code["Reasoning"] == 0.5 and only_code["average"] == 0.5
    nothing = scir.reward_bench_scores(["hep-js"], [None])
    assert nothing["average"] is None and nothing["labelled"] == 0


def test_reward_bench_file_errors(tmp_path, data_dir):
    base = ["--model", "unused", "--output_dir", str(tmp_path / "run"), "--eval_reward_bench"]
    for name in ("sft.jsonl", "judge.jsonl", "prompts.jsonl"):
        (tmp_path / name).write_bytes((Path(data_dir) / name).read_bytes())
    with pytest.raises(SystemExit) as exit_info:
        scir.main([*base, "--data_dir", str(tmp_path)])
    assert str(exit_info.value.code) == f"scir.py: error: {tmp_path / 'rewardbench.jsonl'} is missing (--eval_reward_bench)"
    (tmp_path / "rewardbench.jsonl").write_text(json.dumps(
        {"prompt": "p", "chosen": "a", "rejected": "b", "subset": "alpacaeval-easy"}) + "\n" + json.dumps(
        {"prompt": "p", "chosen": "a", "rejected": "b", "subset": "anthropic_helpful"}) + "\n")
    with pytest.raises(SystemExit) as exit_info:
        scir.main([*base, "--data_dir", str(tmp_path)])
    assert "rewardbench.jsonl: row 2: subset 'anthropic_helpful' is in none of Chat" in str(exit_info.value.code)
    (tmp_path / "rewardbench.jsonl").write_text(json.dumps({"prompt": "p", "chosen": "a", "subset": "hep-go"}) + "\n")
    with pytest.raises(SystemExit) as exit_info:
        scir.main([*base, "--data_dir", str(tmp_path)])
    assert "rewardbench.jsonl:1: needs string fields prompt, chosen, rejected, subset" in str(exit_info.value.code)
    assert not (tmp_path / "run" / "args.json").exists()  # refused before anything was written


def by_hand_sections(subsets, labels):
    """RewardBench's section scores written out: Chat, Chat Hard, Safety pool their pairs; Reasoning is the mean of
    math-prm and the pooled code subsets; the average is over the sections that have a labelled pair."""
    def accuracy(keep):
        hits = [label for subset, label in zip(subsets, labels) if keep(subset) and label is not None]
        return sum(hits) / len(hits) if hits else None
    chat = accuracy(lambda s: s.startswith(("alpacaeval", "mt-bench-easy", "mt-bench-med")))
    chat_hard = accuracy(lambda s: s.startswith(("llmbar", "mt-bench-hard")))
    safety = accuracy(lambda s: s.startswith(("refusals", "xstest", "donotanswer")))
    parts = [a for a in (accuracy(lambda s: s == "math-prm"), accuracy(lambda s: s.startswith("hep-"))) if a is not None]
    reasoning = sum(parts) / len(parts) if parts else None
    present = [a for a in (chat, chat_hard, safety, reasoning) if a is not None]
    return {"Chat": chat, "Chat Hard": chat_hard, "Safety": safety, "Reasoning": reasoning,
            "average": sum(present) / len(present) if present else None}


def test_reward_bench_through_the_cli_matches_brute_force(tmp_path, tiny_model_dir, data_dir, run_script):
    """Added to a finished run (no retraining); every P and Q recomputed from the saved models token by token."""
    from test_scir import brute_logp, brute_q_prompts
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, beta, alpha_l = tmp_path / "run", 5.0, 0.05
    command = ["--model", tiny_model_dir, "--data_dir", data_dir, "--output_dir", out, *SCIR_SMALL,
               "--length_reg", alpha_l, "--length_reg_from", 2]  # M0 judges without, M1 with length regularisation
    assert run_script("scir.py", *command).returncode == 0
    trained = (out / "M1" / "model.safetensors").stat().st_mtime_ns
    result = run_script("scir.py", *command, "--eval_reward_bench")
    assert result.returncode == 0, result.stderr[-3000:]
    assert (out / "M1" / "model.safetensors").stat().st_mtime_ns == trained

    rows = [r for r in read_jsonl(Path(data_dir) / "rewardbench.jsonl") if r["chosen"] != r["rejected"]]
    subsets = [r["subset"] for r in rows]
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    ids = prompts.identifier_token_ids(tok)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    metrics = read_jsonl(out / "metrics.jsonl")
    with torch.no_grad():
        ref = [(brute_logp(base, tok, r["prompt"], r["chosen"]), brute_logp(base, tok, r["prompt"], r["rejected"]))
               for r in rows]
        for k, alpha in ((0, 0.0), (1, alpha_l)):
            model = AutoModelForCausalLM.from_pretrained(out / f"M{k}", dtype=torch.float32).eval()
            irm, grm = [], []
            for r, (ref_c, ref_r), stored in zip(rows, ref, read_jsonl(out / "reward_bench" / f"M{k}.jsonl")):
                pi_c, pi_r = brute_logp(model, tok, r["prompt"], r["chosen"]), brute_logp(model, tok, r["prompt"], r["rejected"])
                p = torch.sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r))).item()
                lengths = [len(tok(r[key], add_special_tokens=False).input_ids) + 1 for key in ("chosen", "rejected")]
                qs = [q.item() for q in brute_q_prompts(model, tok, r["prompt"], r["chosen"], r["rejected"], ids, alpha,
                                                        *lengths)]
                assert (stored["logp_1"], stored["logp_2"]) == pytest.approx((pi_c.item(), pi_r.item()), abs=1e-4)
                assert stored["q_prompts"] == pytest.approx(qs, abs=1e-5)  # alpha_l of M_k's judge
                irm.append(p > 0.5)  # a tiny float P is never exactly 0.5
                grm.append(sum(qs) / 4 > 0.5)  # section 3.3: the mean of the 4 prompts is the GRM's prediction
            both = [i if i == g else None for i, g in zip(irm, grm)]
            stored = metrics[k]["reward_bench"]
            for name, labels in (("irm", irm), ("grm", grm), ("consistency", both)):
                for key, value in by_hand_sections(subsets, labels).items():
                    assert stored[name][key] == (None if value is None else pytest.approx(value, abs=1e-9)), (k, name, key)
                assert stored[name]["labelled"] == sum(label is not None for label in labels)
                assert stored[name]["pairs"] == len(rows) == 5
    table = (out / "table.md").read_text()
    assert "RewardBench IRM" in table and table in result.stdout
    m1_cells = next(line for line in table.splitlines() if "| M1 |" in line).split("|")
    irm_average = metrics[1]["reward_bench"]["irm"]["average"]
    assert m1_cells[-4].strip() == f"{100 * irm_average:.2f}"


def test_scir_srlm_reward_bench_uses_the_pointwise_judge(monkeypatch, tmp_path, tiny_model_dir, data_dir):
    """The baselines' GRM on RewardBench is the Table 6 judge: chosen wins where its (patched) score is higher, and a
    tie or an unreadable judgement labels nothing."""
    from test_scir import brute_logp
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.setattr(scir, "parse_score", lambda text: None if len(text) % 7 == 0 else float(len(text) % 3))
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    out = tmp_path / "run"
    scir.main(["--model", tiny_model_dir, "--data_dir", data_dir, "--output_dir", str(out), "--method", "srlm",
               *map(str, SCIR_SMALL), "--eval_reward_bench"])
    rows = [r for r in read_jsonl(Path(data_dir) / "rewardbench.jsonl") if r["chosen"] != r["rejected"]]
    metrics = read_jsonl(out / "metrics.jsonl")
    for k in (0, 1):
        scored = read_jsonl(out / "reward_bench" / f"M{k}.jsonl")
        assert len(scored) == len(rows)
        model = AutoModelForCausalLM.from_pretrained(out / f"M{k}", dtype=torch.float32).eval()
        with torch.no_grad():  # y1 is the chosen response, y2 the rejected one, under M_k
            for s, r in zip(scored, rows):
                expected = [brute_logp(model, tok, r["prompt"], r[key]).item() for key in ("chosen", "rejected")]
                assert [s["logp_1"], s["logp_2"]] == pytest.approx(expected, abs=1e-4)
        grm = []
        for s in scored:
            chosen, rejected = (None if len(text) % 7 == 0 else len(text) % 3 for text in s["judgements"])
            grm.append(None if chosen is None or rejected is None or chosen == rejected else chosen > rejected)
        for key, value in by_hand_sections([r["subset"] for r in rows], grm).items():
            assert metrics[k]["reward_bench"]["grm"][key] == (None if value is None else pytest.approx(value)), (k, key)


def test_table_1_consistency_uses_each_models_own_judge(monkeypatch, tmp_path, tiny_model_dir, data_dir):
    """Table 1 / Figure 2 rows: M_k on its new pairs D_k and on the pairs it was trained on, D_{k-1}, each judged
    with M_k's own length regularisation (on from --length_reg_from 2, i.e. for M1 and M2). A patched judge is
    unanimous (Q = 0.9) only when length regularisation is on, and split across its prompts otherwise."""
    def patched_judge(model, tokenizer, instructions, responses_1, responses_2, identifier_ids, alpha_l, max_length,
                      lengths_1=None, lengths_2=None, num_prompts=4):
        return torch.tensor([[0.9] * 4 if alpha_l > 0 else [0.6, 0.4, 0.6, 0.4]] * len(instructions),
                            device=model.device)
    monkeypatch.setattr(scir, "generative_preference", patched_judge)
    out = tmp_path / "run"
    scir.main(["--model", tiny_model_dir, "--data_dir", data_dir, "--output_dir", str(out), *map(str, SCIR_SMALL),
               "--iterations", "2", "--length_reg_from", "2", "--length_reg", "0.05"])
    metrics = read_jsonl(out / "metrics.jsonl")
    pairs = {t: read_jsonl(out / f"iter{t}" / "pairs.jsonl") for t in (1, 2)}
    share_y1 = lambda rows, key: sum(row[key] > 0.5 for row in rows) / len(rows)  # Q = 0.9: the judge picks y1
    assert (metrics[0]["consistency_new"], metrics[0]["counted_new"]) == (None, 0)  # M0 judges without: split
    assert metrics[1]["counted_trained"] == metrics[1]["counted_new"] == metrics[2]["counted_trained"] == 3
    assert metrics[1]["consistency_trained"] == pytest.approx(share_y1(pairs[1], "p_end"))  # M1 on D_0
    assert metrics[1]["consistency_new"] == pytest.approx(share_y1(pairs[2], "p_start"))  # M1 on D_1
    assert metrics[2]["consistency_trained"] == pytest.approx(share_y1(pairs[2], "p_end"))  # M2 on D_1


def test_pointwise_prompt_cuts_only_a_response_that_does_not_fit(tiny_tokenizer):
    short = scir.pointwise_prompt(tiny_tokenizer, "Describe the fox.", "A quick brown fox.", 700)
    assert short == prompts.fill_pointwise("Describe the fox.", "A quick brown fox.")
    long_response = " ".join(f"fox{k}" for k in range(400))  # ~1,200 tokens
    text = scir.pointwise_prompt(tiny_tokenizer, "Describe the fox.", long_response, 700)
    tokens = len(tiny_tokenizer(prompts.chat_prompt(tiny_tokenizer, text), add_special_tokens=False).input_ids)
    assert 650 < tokens <= 705  # re-encoding a cut text may take a few more tokens
    assert "fox0 fox1 fox2" in text and long_response not in text
    assert text.startswith(prompts.fill_pointwise("Describe the fox.", "")[:40])


def test_scir_hub_loaders_on_rows_shaped_like_the_hub(monkeypatch):
    """load_hub_data and load_reward_bench with datasets.load_dataset answering rows shaped as the cards say
    (README, 'Data'): Alpaca's input joined to its instruction, LIMA's first exchange, English single-turn
    oasst2 prompts without the 'prompter: ' prefix, RewardBench pairs without a gold label dropped."""
    import datasets

    hub = {
        "tatsu-lab/alpaca": [{"instruction": f"Task {k}.", "input": "some input" if k % 2 else " ", "output": f"Done {k}.",
                              "text": "never used"} for k in range(6)],
        "GAIR/lima": [{"conversations": ["Hi?", "Hello.", "More?", "No."], "source": "x"},
                      {"conversations": ["Alone"], "source": "y"}],
        "monology/oasst2_dpo": [
            {"lang": "en", "parent_id": "a", "prompt": "prompter: Why?", "chosen": "Because.", "rejected": "No."},
            {"lang": "de", "parent_id": "b", "prompt": "prompter: Warum?", "chosen": "Darum.", "rejected": "Nein."},
            {"lang": "en", "parent_id": "c", "prompt": "prompter: A\nassistant: B\nprompter: C", "chosen": "D",
             "rejected": "E"}],
        "allenai/reward-bench": [
            {"prompt": "p1", "chosen": "good", "chosen_model": "m", "rejected": "bad", "rejected_model": "n",
             "subset": "hep-go", "id": 1},
            {"prompt": "p2", "chosen": "same", "chosen_model": "m", "rejected": "same", "rejected_model": "n",
             "subset": "donotanswer", "id": 2}],
    }
    calls = []

    def fake_load_dataset(repo, split, **kwargs):
        calls.append((repo, split, kwargs))
        return datasets.Dataset.from_list(hub[repo])
    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    args = scir.parse_args(["--model", "m", "--sft_examples", "2", "--eval_reward_bench"])
    sft, judge, prompt_rows, pointwise = scir.load_hub_data(args)
    alpaca_prompts = {f"Task {k}." + ("\n\nsome input" if k % 2 else "") for k in range(6)}
    assert len(sft) == 3 and {row["prompt"] for row in sft[:2]} <= alpaca_prompts
    assert sft[2] == {"prompt": "Hi?", "response": "Hello."}  # LIMA: the first exchange; a lone turn is skipped
    assert judge == [{"prompt": "Why?", "chosen": "Because.", "rejected": "No."}]
    assert pointwise == []  # no public pointwise judgements: SRLM's would need a 70B judge
    assert len(prompt_rows) == 4 and {row["prompt"] for row in prompt_rows} | {row["prompt"] for row in sft[:2]} \
        == alpaca_prompts  # the pools hold the Alpaca rows SFT did not use
    assert scir.load_reward_bench(args) == [dict(hub["allenai/reward-bench"][0])]
    assert ("allenai/reward-bench", "filtered", {}) in calls and ("GAIR/lima", "train", {"revision": "refs/convert/parquet"}) in calls


def test_cream_hub_loader_on_rows_shaped_like_the_hub(monkeypatch):
    """cream.load_hub_data with datasets.load_dataset answering rows shaped as the cards say (README, 'Data'): D_S is
    English oasst1 root prompts joined to their rank-0 reply; D_U adds the five tasks' train questions; --evaluate
    scores ARC, OpenBookQA and GSM8K on test and SIQA on validation (from its parquet revision)."""
    import datasets

    def message(message_id, parent_id, role, text, lang="en", rank=None, deleted=False):
        return {"message_id": message_id, "parent_id": parent_id, "role": role, "text": text, "lang": lang,
                "rank": rank, "deleted": deleted, "review_result": True, "message_tree_id": "t"}
    oasst = [message("r1", None, "prompter", "Why is the sky blue?"),
             message("a1", "r1", "assistant", "Rayleigh scattering.", rank=0),
             message("a2", "r1", "assistant", "Because.", rank=1),
             message("p2", "a1", "prompter", "And at sunset?"),  # not a root: a later turn
             message("a3", "p2", "assistant", "Longer path.", rank=0),
             message("r2", None, "prompter", "Warum?", lang="de"),
             message("a4", "r2", "assistant", "Darum.", rank=0, lang="de"),
             message("r3", None, "prompter", "Deleted answer?"),
             message("a5", "r3", "assistant", "Gone.", rank=0, deleted=True)]
    arc = lambda q: {"id": q, "question": q, "choices": {"text": ["w", "x"], "label": ["1", "2"]}, "answerKey": "2"}
    tasks = {
        ("allenai/ai2_arc", "ARC-Easy"): arc,
        ("allenai/ai2_arc", "ARC-Challenge"): arc,
        ("allenai/openbookqa", "main"): lambda q: {"id": q, "question_stem": q, "answerKey": "A",
                                                   "choices": {"text": ["p", "q"], "label": ["A", "B"]}},
        ("allenai/social_i_qa", None): lambda q: {"context": "Ctx.", "question": q, "answerA": "u", "answerB": "v",
                                                  "answerC": "w", "label": "3"},
        ("openai/gsm8k", "main"): lambda q: {"question": q, "answer": "2 * 3 = 6\n#### 6"},
    }
    calls = []

    def fake_load_dataset(repo, name=None, split="train", revision=None):
        calls.append((repo, name, split, revision))
        rows = oasst if repo == "OpenAssistant/oasst1" else [tasks[repo, name](f"{repo} {name} {split}?")]
        return datasets.Dataset.from_list(rows)
    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    sft, pool, tests = cream.load_hub_data(cream.parse_args(["--evaluate"]))
    assert sft == [{"prompt": "Why is the sky blue?", "response": "Rayleigh scattering."}]
    questions = [row["prompt"].splitlines()[0] for row in pool[1:]]
    assert pool[0] == {"prompt": "Why is the sky blue?"} and len(pool) == 6
    assert all(q.endswith(" train?") for q in questions)  # the pool never holds a test question
    assert {row["task"]: row["answer"] for row in tests} == {"arc_easy": "B", "arc_challenge": "B", "openbookqa": "A",
                                                             "siqa": "C", "gsm8k": "6"}
    assert ("allenai/social_i_qa", None, "validation", "refs/convert/parquet") in calls
    assert {split for repo, _, split, _ in calls if repo not in ("OpenAssistant/oasst1", "allenai/social_i_qa")} \
        == {"train", "test"}


def test_length_reg_0_ablation_turns_the_judges_length_penalty_off(monkeypatch, tmp_path, tiny_model_dir, data_dir):
    """Table 4's '--length_reg 0' from an iteration where length regularisation is on (--length_reg_from 1): every
    Q of the run is computed with alpha_l = 0; the control run uses the default 0.02 throughout."""
    original, seen = scir.generative_preference, []

    def recording(*args, **kwargs):
        seen.append(kwargs["alpha_l"] if "alpha_l" in kwargs else args[6])
        return original(*args, **kwargs)
    monkeypatch.setattr(scir, "generative_preference", recording)
    for flags, expected in ((["--length_reg", "0"], 0.0), ([], 0.02)):
        seen.clear()
        scir.main(["--model", tiny_model_dir, "--data_dir", data_dir, "--output_dir", str(tmp_path / str(expected)),
                   *map(str, SCIR_SMALL), "--length_reg_from", "1", *flags])
        assert seen and set(seen) == {expected}


def test_a_run_made_before_a_flag_existed_resumes_with_its_default(tmp_path):
    """args.json of an older run lacks --prompt_offset: read as its default (0), so the run resumes; a real
    difference is still refused."""
    from dataclasses import asdict

    args = scir.parse_args(["--model", "m", "--output_dir", str(tmp_path)])
    older = {k: v for k, v in asdict(args).items() if k != "prompt_offset"}  # and no data_sha256 either
    (tmp_path / "args.json").write_text(json.dumps(older))
    (tmp_path / "M0").mkdir()  # a result: the settings are compared
    scir.check_same_settings(tmp_path, args, "hash")
    assert json.loads((tmp_path / "args.json").read_text())["prompt_offset"] == 0
    (tmp_path / "args.json").write_text(json.dumps(dict(older, beta=0.5)))
    with pytest.raises(SystemExit) as exit_info:
        scir.check_same_settings(tmp_path, args, "hash")
    assert "--beta 0.5 (now 0.1)" in str(exit_info.value.code)


# --- C below 0.5, --sft_epochs 0 (README, 'Departures from the papers and the official code'),
# and more answers the extractor reads (README, 'Reproducing the papers' tables') ---


@pytest.mark.parametrize("scope, taus", [("dataset", [-0.2]), ("pair", [-0.5, 0.5, -1.0, 1.0])])
def test_cream_warns_when_c_is_below_one_half(scope, taus, monkeypatch, capsys, tmp_path,
                                              tiny_model_dir, data_dir):
    """Kendall tau patched (prompt k gets taus[k % len]): dataset C = (1 - 0.2) / 2 = 0.4, or per
    pair (tau + 1) / 2 = 0.25, 0.75, 0, 1. Line 14 then trains toward the worse response: warn."""
    calls = []

    def patched_tau(x, y):
        calls.append(None)
        return taus[(len(calls) - 1) % len(taus)]
    monkeypatch.setattr(cream, "kendall_tau", patched_tau)
    out = tmp_path / "run"
    cream.main(["--model", tiny_model_dir, "--data_dir", data_dir, "--output_dir", str(out),
                *map(str, CREAM_SMALL), "--consistency_scope", scope])
    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if "cream.py: warning:" in line]
    pairs = read_jsonl(out / "iter1" / "pairs.jsonl")
    assert len(warnings) == 1, warnings
    if scope == "dataset":
        assert all(pair["consistency"] == pytest.approx(0.4) for pair in pairs)
        assert warnings[0].startswith("cream.py: warning: iteration 1: C = 0.4000 < 0.5")
    else:
        below = sum(pair["consistency"] < 0.5 for pair in pairs)
        assert below >= 1
        assert f"iteration 1: {below} of {len(pairs)} pairs have their own C < 0.5" in warnings[0]


@pytest.mark.parametrize("method", ["cream", "srlm"])
def test_cream_sft_epochs_0_is_refused_for_dpo_rewards(method):
    with pytest.raises(SystemExit) as exit_info:
        cream.parse_args(["--method", method, "--sft_epochs", "0"])
    message = str(exit_info.value.code)
    assert message.startswith("cream.py: error: --sft_epochs 0") and "\n" not in message
    assert f"--method {method}" in message and "no pair" in message


def test_cream_sft_epochs_0_is_allowed_for_p_srlm():
    """P-SRLM ranks by the judge's scores, which do not vanish when M1 is M0."""
    assert cream.parse_args(["--method", "p-srlm", "--sft_epochs", "0"]).sft_epochs == 0


# ------------------------------------------------------------------------------------------------------------------
# SRLM's SFT (SCIR Appendix C.1): pointwise Table 6 judgements, from pointwise.jsonl in --data_dir
# ------------------------------------------------------------------------------------------------------------------
POINTWISE_ROWS = [
    {"prompt": "What is 2 + 3?", "response": "2 + 3 = 5.", "judgement": "It is right and clear. Score: 5"},
    {"prompt": "What is 2 + 3?", "response": "2 + 3 = 6.", "judgement": "Wrong sum. Score: 1"},
    {"prompt": "Who wrote Hamlet?", "response": "Hamlet wrote itself.", "judgement": "No. Score: 0"},
]


def srlm_sft_batches(monkeypatch, tmp_path, tiny_model_dir, data, *extra):
    """Run an srlm M0 and return the SFT micro-batches train saw, decoded: [(whole text, target text)]."""
    original, seen = scir.train, []

    def recording(model, batches, loss_fn, lr_flag, args, desc):
        if desc.startswith("SFT"):
            seen.extend(batches)
        return original(model, batches, loss_fn, lr_flag, args, desc)
    monkeypatch.setattr(scir, "train", recording)
    argv = ["--model", tiny_model_dir, "--data_dir", str(data), "--output_dir", str(tmp_path / "run"),
            "--method", "srlm", *map(str, SCIR_SMALL), *extra]
    try:
        scir.main(argv)
    except SystemExit:  # the tiny random M0 may write no score, and iteration 1 has no pair
        pass
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    texts = []
    for input_ids, attention_mask, labels in seen:
        for ids, mask, target in zip(input_ids, attention_mask, labels):
            texts.append((tokenizer.decode(ids[mask.bool()]), tokenizer.decode(target[target != -100])))
    return texts, json.loads((tmp_path / "run" / "M0" / "training_summary.json").read_text())


def test_srlm_sft_learns_the_pointwise_judgements(monkeypatch, tmp_path, tiny_model_dir, data_dir, capsys):
    """Each pointwise row becomes one SFT example: Table 6's prompt with the response in it, and the judgement,
    ending in its score, as the only trained tokens."""
    data = tmp_path / "data"
    shutil.copytree(data_dir, data)
    write_jsonl(data / "pointwise.jsonl", POINTWISE_ROWS)
    texts, summary = srlm_sft_batches(monkeypatch, tmp_path, tiny_model_dir, data)
    assert summary["judge_examples"] == len(POINTWISE_ROWS)
    assert summary["examples"] == len(read_jsonl(data / "sft.jsonl")) + len(POINTWISE_ROWS)
    template_start = prompts.POINTWISE_JUDGE_TEMPLATE.split("{")[0].strip()[:40]
    for row in POINTWISE_ROWS:
        matches = [(whole, target) for whole, target in texts
                   if row["response"] in whole and template_start in whole and row["judgement"] in target]
        assert matches, row
        assert all(target.strip().startswith(row["judgement"]) for _, target in matches)
    assert "pointwise.jsonl" not in capsys.readouterr().out


def test_srlm_without_pointwise_judgements_says_so(monkeypatch, tmp_path, tiny_model_dir, data_dir, capsys):
    texts, summary = srlm_sft_batches(monkeypatch, tmp_path, tiny_model_dir, data_dir)
    assert summary["judge_examples"] == 0
    notes = [line for line in capsys.readouterr().out.splitlines() if "pointwise.jsonl" in line]
    assert len(notes) == 1 and notes[0].startswith("note: --method srlm without pointwise.jsonl")


def test_a_pointwise_judgement_without_a_score_is_refused(tmp_path, tiny_model_dir, data_dir):
    data = tmp_path / "data"
    shutil.copytree(data_dir, data)
    write_jsonl(data / "pointwise.jsonl", POINTWISE_ROWS[:1] + [dict(POINTWISE_ROWS[1], judgement="Bad answer.")])
    with pytest.raises(SystemExit) as exit_info:
        scir.main(["--model", tiny_model_dir, "--data_dir", str(data), "--output_dir", str(tmp_path / "run"),
                   "--method", "srlm", *map(str, SCIR_SMALL)])
    assert str(exit_info.value.code) == (f"scir.py: error: {data / 'pointwise.jsonl'}: row 2: the judgement gives "
                                         f"no score 'Score: N' (N in 0..5)")
    assert not (tmp_path / "run" / "M0").exists()
