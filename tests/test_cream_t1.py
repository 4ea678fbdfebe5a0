"""cream.py --t1_consistency, beyond the paper (README, 'Departures'): what iteration t = 1 does
where Algorithm 1 has no previous model, so that line 8's r' is log pi_0 itself.

Every expectation is worked out by hand here (the rankings, tau, C) or recomputed from the files a
run wrote with plain Python; never taken from the code's own output.
"""

import hashlib
import json

import pytest
import torch

import cream
import prompts


def sign(v):
    return (v > 0) - (v < 0)


def brute_kendall(x, y):
    """Eq. 3.10 by pair counting; a pair tied in either counts 0."""
    n = len(x)
    total = sum(sign(x[i] - x[j]) * sign(y[i] - y[j]) for i in range(n) for j in range(i + 1, n))
    return total / (n * (n - 1) / 2)


def load_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def sample_row(pid, lengths):
    """A prompt's samples with responses of the given numbers of tokens."""
    return {"id": pid, "prompt": f"prompt {pid}",
            "samples": [{"response": f"{pid}{i}", "token_ids": [7 + i] * n, "finished": True}
                        for i, n in enumerate(lengths)]}


# Prompt "a": log pi_0 = [-6, -9, -4] over 2, 6 and 1 tokens, r = [1, 2, 0].
#   summed r' = [-6, -9, -4]: pairs (0,1) (0,2) (1,2) all discordant with r -> tau = -1
#   mean r' = [-3, -1.5, -4]: all three concordant with r -> tau = +1
# Prompt "b": log pi_0 = [0.5, 0, -2], one token each (sum = mean), r = [1, -1, 0]:
#   (0,1) +, (0,2) +, (1,2) - -> tau = 1/3
SAMPLES = [sample_row("a", [2, 6, 1]), sample_row("b", [1, 1, 1])]
LOGPS_0 = torch.tensor([[-6.0, -9.0, -4.0], [0.5, 0.0, -2.0]], dtype=torch.float64)
R = torch.tensor([[1.0, 2.0, 0.0], [1.0, -1.0, 0.0]], dtype=torch.float64)
SEQUENCES = [([1, 2], s["token_ids"]) for row in SAMPLES for s in row["samples"]]


def t1_rewards(value, t=1):
    """Lines 6-10 at iteration t on the hand-made prompts, with --t1_consistency value."""
    lengths = cream.t1_lengths(cream.Args(t1_consistency=value), t, SEQUENCES, len(SAMPLES))
    logps_prev = None if t == 1 else LOGPS_0 + 1.0  # t = 2: r' = 1 everywhere, all tied
    return cream.rewards_and_consistency(SAMPLES, LOGPS_0 + R, logps_prev, LOGPS_0, lengths)


# --- mean_logp: r' at t = 1 is M0's mean log-likelihood a token ---


def test_mean_logp_ranks_r_prev_by_the_mean_where_the_sum_ranks_by_length():
    summed, mean = t1_rewards("algorithm1"), t1_rewards("mean_logp")
    assert summed[0]["r_prev"] == [-6.0, -9.0, -4.0] and summed[0]["tau"] == pytest.approx(-1.0)
    assert mean[0]["r_prev"] == [-3.0, -1.5, -4.0] and mean[0]["tau"] == pytest.approx(1.0)
    assert mean[0]["spearman"] == pytest.approx(1.0) and mean[0]["top_order"] == 1.0
    assert summed[0]["top_order"] == 0.0  # best 1 vs 2, worst 2 vs 1
    for rows in (summed, mean):  # r stays Eq. 3.9's; one-token responses: mean = sum
        assert [row["r"] for row in rows] == [[1.0, 2.0, 0.0], [1.0, -1.0, 0.0]]
        assert rows[1]["r_prev"] == [0.5, 0.0, -2.0] and rows[1]["tau"] == pytest.approx(1 / 3)
    # line 11: C = mean (tau + 1) / 2
    assert cream.measured_consistency(summed, "kendall") == pytest.approx((0 + 2 / 3) / 2)
    assert cream.measured_consistency(mean, "kendall") == pytest.approx((1 + 2 / 3) / 2)
    # the pairs follow r, so they are the same; only their C differs
    pairs = [cream.build_pairs(SAMPLES, rows, 0.5, "dataset") for rows in (summed, mean)]
    assert [(p["chosen"], p["rejected"]) for p in pairs[0]] == [("a1", "a2"), ("b0", "b1")]
    assert [(p["chosen"], p["rejected"]) for p in pairs[1]] == [("a1", "a2"), ("b0", "b1")]


def test_mean_logp_changes_nothing_after_t_1():
    for value in ("algorithm1", "mean_logp"):
        assert cream.t1_lengths(cream.Args(t1_consistency=value), 2, SEQUENCES, 2) is None
        rows = t1_rewards(value, t=2)
        assert [row["r_prev"] for row in rows] == [[1.0] * 3] * 2
        assert [row["tau"] for row in rows] == [0.0, 0.0]


def test_mean_logp_counts_the_response_tokens_scored_after_the_cut(tiny_tokenizer, monkeypatch,
                                                                   tmp_path):
    """score_samples' lengths are those of the responses as scored: cut to --max_length with the
    prompt whole (here to 3 tokens), counted here from the tokenizer."""
    samples = [dict(sample_row("x", [2, 5, 9]), prompt="What is 2 + 3?"),
               dict(sample_row("y", [1, 9, 3]), prompt="Name a primary color.")]
    prompt_lengths = [len(tiny_tokenizer(prompts.chat_prompt(tiny_tokenizer, row["prompt"]),
                                         add_special_tokens=False).input_ids) for row in samples]
    max_length = max(prompt_lengths) + 3
    room = [max_length - n for n in prompt_lengths]
    expected = [[min(len(s["token_ids"]), room[j]) for s in row["samples"]]
                for j, row in enumerate(samples)]
    assert expected[0][2] < 9 and expected[1][1] < 9  # the long responses are cut

    def fake_logps(path, model_path, sequences, tokenizer, args):  # no model: -1 a token
        return [-1.0 * len(response) for _, response in sequences]
    monkeypatch.setattr(cream, "cached_logps", fake_logps)
    args = cream.Args(t1_consistency="mean_logp", max_length=max_length)
    *logps, lengths = cream.score_samples(args, tiny_tokenizer, samples, 1, tmp_path)
    assert lengths.tolist() == expected
    assert logps[1] is None and logps[2].tolist() == [[-n for n in row] for row in expected]
    rows = cream.rewards_and_consistency(samples, *logps, lengths)
    assert [row["r_prev"] for row in rows] == [[-1.0] * 3] * 2  # the mean: -1 a token
    assert cream.score_samples(cream.Args(max_length=max_length), tiny_tokenizer, samples, 1,
                               tmp_path)[3] is None  # Algorithm 1: the sum


# --- one and floor: the C used at t = 1 ---


def pairs_at(t, value, scope):
    """(C used, pairs) at iteration t for the hand-made prompts: taus -1 and 1/3 (summed r')."""
    args = cream.Args(t1_consistency=value, consistency_scope=scope)
    rows = t1_rewards(value)
    consistency, scope = cream.training_consistency(args, rows)
    return cream.t1_override(args, t, consistency, cream.build_pairs(SAMPLES, rows, consistency,
                                                                     scope))


@pytest.mark.parametrize("scope", ["dataset", "pair"])
def test_one_trains_plain_dpo_at_t_1(scope):
    consistency, pairs = pairs_at(1, "one", scope)
    assert consistency == 1.0 and [p["consistency"] for p in pairs] == [1.0, 1.0]


def test_floor_raises_c_to_one_half_at_t_1():
    # dataset: C = mean((-1 + 1) / 2, (1/3 + 1) / 2) = 1/3 -> 0.5
    consistency, pairs = pairs_at(1, "floor", "dataset")
    assert consistency == 0.5 and [p["consistency"] for p in pairs] == [0.5, 0.5]
    # pair: each pair's own (tau + 1) / 2 = 0 and 2/3 -> 0.5 and 2/3; the recorded C stays the
    # measured 1/3, as with --consistency_scope pair under Algorithm 1 (the table: 'per pair')
    consistency, pairs = pairs_at(1, "floor", "pair")
    assert consistency == pytest.approx(1 / 3)
    assert [p["consistency"] for p in pairs] == pytest.approx([0.5, 2 / 3])


@pytest.mark.parametrize("value", ["algorithm1", "one", "floor"])
@pytest.mark.parametrize("scope", ["dataset", "pair"])
def test_nothing_changes_at_t_2_nor_under_algorithm1(value, scope):
    as_written = pairs_at(1, "algorithm1", scope)
    assert as_written[0] == pytest.approx(1 / 3)  # Algorithm 1's C from the summed log pi_0
    assert [p["consistency"] for p in as_written[1]] == pytest.approx(
        [1 / 3] * 2 if scope == "dataset" else [0.0, 2 / 3])
    assert pairs_at(2, value, scope) == as_written


def test_the_warning_goes_by_the_c_used(capsys):
    """C = 1/3 < 0.5 warns under Algorithm 1 and at t = 2; one and floor raise it at t = 1."""
    for t, value, warns in ((1, "algorithm1", True), (1, "one", False), (1, "floor", False),
                            (2, "one", True), (2, "floor", True)):
        cream.check_pairs(t, pairs_at(t, value, "dataset")[1], "dataset", unusable=0)
        err = capsys.readouterr().err
        assert ("C = 0.3333 < 0.5" in err) == warns, (t, value, err)


# --- the command line: a run, its resume, and the methods the flag does not belong to ---

SHORT = ["--demo", "--iterations", 2, "--sft_epochs", 1, "--num_prompts", 4, "--num_samples", 3,
         "--max_new_tokens", 8]


def snapshot(folder):
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def one_line_error(call):
    with pytest.raises(SystemExit) as info:
        call()
    message = info.value.code
    assert isinstance(message, str) and "\n" not in message  # sys.exit(str): exit status 1
    assert message.startswith("cream.py: error: ")
    return message


def test_one_through_the_command_line_and_a_resume_with_another_value(tmp_path):
    out = tmp_path / "run"
    cream.main([str(a) for a in [*SHORT, "--t1_consistency", "one", "--output_dir", out]])
    metrics = load_jsonl(out / "metrics.jsonl")
    for t, row in enumerate(metrics, 1):
        rewards = load_jsonl(out / f"iter{t}" / "rewards.jsonl")
        taus = [brute_kendall(rw["r"], rw["r_prev"]) for rw in rewards]
        assert row["kendall"] == pytest.approx(sum(taus) / len(taus))  # measured, reported
        measured = sum((tau + 1) / 2 for tau in taus) / len(taus)
        used = 1.0 if t == 1 else measured
        assert row["consistency"] == pytest.approx(used)
        pairs = load_jsonl(out / f"iter{t}" / "pairs.jsonl")
        assert [p["consistency"] for p in pairs] == pytest.approx([used] * len(pairs))
    assert metrics[0]["consistency"] == 1.0
    logps_0 = [row["logp"] for row in load_jsonl(out / "iter1" / "logps_0.jsonl")]
    r_prev = [y for rw in load_jsonl(out / "iter1" / "rewards.jsonl") for y in rw["r_prev"]]
    assert r_prev == pytest.approx(logps_0)  # r' at t = 1 is still the summed log pi_0
    row_m1 = next(line for line in (out / "table.md").read_text().splitlines()
                  if "| M1 |" in line).split(" | ")
    assert row_m1[4] == "1.00"  # C used; column 3 is the measured C
    # resuming the folder under another value would mix runs: refused, nothing written
    before = snapshot(out)
    message = one_line_error(lambda: cream.main([str(a) for a in [
        *SHORT, "--t1_consistency", "floor", "--output_dir", out]]))
    assert "--t1_consistency 'one' (now 'floor')" in message
    assert snapshot(out) == before


def test_mean_logp_through_the_command_line(tmp_path):
    out = tmp_path / "run"
    cream.main([str(a) for a in [*SHORT, "--iterations", 1, "--t1_consistency", "mean_logp",
                                 "--output_dir", out]])
    samples = load_jsonl(out / "iter1" / "samples.jsonl")
    logps_0 = iter(row["logp"] for row in load_jsonl(out / "iter1" / "logps_0.jsonl"))
    # no response is cut here: the demo's prompts leave room for --max_new_tokens
    expected = [next(logps_0) / len(s["token_ids"]) for row in samples for s in row["samples"]]
    rewards = load_jsonl(out / "iter1" / "rewards.jsonl")
    assert [y for rw in rewards for y in rw["r_prev"]] == pytest.approx(expected)
    taus = [brute_kendall(rw["r"], rw["r_prev"]) for rw in rewards]
    (row,) = load_jsonl(out / "metrics.jsonl")
    assert row["kendall"] == pytest.approx(sum(taus) / len(taus))
    assert row["consistency"] == pytest.approx(sum((tau + 1) / 2 for tau in taus) / len(taus))


@pytest.mark.parametrize("method", ["srlm", "p-srlm"])
def test_other_methods_refuse_the_flag(method):
    message = one_line_error(lambda: cream.parse_args(["--method", method,
                                                       "--t1_consistency", "one"]))
    assert f"--method {method} trains with C = 1" in message and "--t1_consistency" in message
    assert cream.parse_args(["--method", method]).t1_consistency == "algorithm1"


def test_a_folder_from_before_the_flag_resumes_as_algorithm1(tmp_path):
    """An args.json written before the flag existed has no t1_consistency: read as the default,
    so the folder resumes as it was made, and another value is refused."""
    out = tmp_path / "run"
    out.mkdir()
    args = cream.parse_args(["--output_dir", str(out)])
    old = {k: v for k, v in vars(args).items() if k != "t1_consistency"} | {"data_sha256": "h"}
    (out / "args.json").write_text(json.dumps(old))
    (out / "M1").mkdir()  # a result
    cream.check_same_settings(out, args, "h")
    assert json.loads((out / "args.json").read_text())["t1_consistency"] == "algorithm1"
    (out / "args.json").write_text(json.dumps(old))
    args.t1_consistency = "mean_logp"
    message = one_line_error(lambda: cream.check_same_settings(out, args, "h"))
    assert "--t1_consistency 'algorithm1' (now 'mean_logp')" in message
