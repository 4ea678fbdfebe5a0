"""Tests for cream.py. Every expectation comes from an independent computation: brute-force pair counting,
explicit formulas written out here, hand-worked cases, the paper's Theorem 3.3 / Lemma 3.4, or a plain forward
pass of the model; never from the code's own output.

The CLI tests run `python cream.py ...` on the tiny model of conftest.py (offline, CPU, float32).
"""

import hashlib
import json
import math
import random
import shutil
import statistics
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import cream
import prompts

# --- Independent reference implementations (plain Python) ---


def sign(v):
    return (v > 0) - (v < 0)


def brute_kendall(x, y):
    """Eq. 3.10 by pair counting: concordant minus discordant over N(N-1)/2; a pair tied in either counts 0."""
    n, total = len(x), 0
    for i in range(n):
        for j in range(i + 1, n):
            total += sign(x[i] - x[j]) * sign(y[i] - y[j])
    return total / (n * (n - 1) / 2)


def brute_average_ranks(x):
    """Ranks from 1 by sorting; a run of equal values gets the mean of the positions it occupies."""
    order = sorted(range(len(x)), key=lambda i: x[i])
    ranks, i = [0.0] * len(x), 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and x[order[j + 1]] == x[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + 1 + j + 1) / 2
        i = j + 1
    return ranks


def brute_spearman(x, y):
    """Pearson correlation of the average ranks, with explicit loops."""
    rx, ry = brute_average_ranks(x), brute_average_ranks(y)
    n = len(x)
    mx, my = sum(rx) / n, sum(ry) / n
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    vx = sum((a - mx) ** 2 for a in rx)
    vy = sum((b - my) ** 2 for b in ry)
    return cov / math.sqrt(vx * vy)


def first_argmax(values):
    return max(range(len(values)), key=lambda i: values[i])


def first_argmin(values):
    return min(range(len(values)), key=lambda i: values[i])


def neg_log_sigmoid(h):
    """-log sigma(h) = log(1 + exp(-h)), written out."""
    return torch.log1p(torch.exp(-h))


@torch.no_grad()
def brute_logp(model, prompt_ids, response_ids):
    """log pi(response | prompt): one unpadded full forward, log_softmax over the whole vocabulary, a loop."""
    ids = torch.tensor([list(prompt_ids) + list(response_ids)])
    logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)
    total = 0.0
    for k in range(len(response_ids)):
        position = len(prompt_ids) + k  # the token at `position` is predicted by the logits at position - 1
        total += logp[position - 1, ids[0, position]].item()
    return total


def load_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def error_line(result):
    """The one stderr line of a failed run (asserting there is exactly one, and no traceback)."""
    assert result.returncode != 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr[-3000:]
    assert lines[0].startswith("cream.py: error:"), lines[0]
    return lines[0]


# --- 1-3: Kendall tau (Eq. 3.10), Spearman, TopOrder, consistency rate (Algorithm 1 line 11) ---


@pytest.mark.parametrize("x, y, expected", [
    ([1, 2, 3, 4], [10, 20, 30, 40], 1.0),
    ([1, 2, 3, 4], [4, 3, 2, 1], -1.0),
    ([1, 2, 3], [1, 3, 2], 1 / 3),       # (1,2) and (1,3) concordant, (2,3) discordant
    ([1, 1, 2], [1, 2, 3], 2 / 3),       # tau-a: the tied pair counts 0, denominator stays 3 (tau-b would be 0.816)
    ([1, 1, 1], [1, 2, 3], 0.0),         # every pair tied in x
    ([5, 5, 1, 1], [2, 1, 2, 1], 0.0),   # 4 of 6 pairs tied in one vector, the other 2 cancel
])
def test_kendall_tau_hand_cases(x, y, expected):
    assert brute_kendall(x, y) == pytest.approx(expected, abs=1e-12)
    assert cream.kendall_tau(x, y) == pytest.approx(expected, abs=1e-12)


def test_kendall_tau_matches_pair_counting_on_random_vectors():
    rng = random.Random(0)
    for trial in range(300):
        n = rng.randint(2, 9)
        if trial % 2:  # small integer range: many ties
            x, y = [rng.randint(0, 3) for _ in range(n)], [rng.randint(0, 3) for _ in range(n)]
        else:
            x, y = [rng.gauss(0, 1) for _ in range(n)], [rng.gauss(0, 1) for _ in range(n)]
        assert cream.kendall_tau(x, y) == pytest.approx(brute_kendall(x, y), abs=1e-12), (x, y)
        assert cream.kendall_tau(torch.tensor(x), torch.tensor(y)) == pytest.approx(brute_kendall(x, y), abs=1e-6)


@pytest.mark.parametrize("x, y, expected", [
    ([1, 2, 3, 4], [1, 3, 2, 4], 0.8),                # 1 - 6 * sum d^2 / (n (n^2 - 1)) = 1 - 12 / 60
    ([1, 2, 3, 4, 5], [50, 40, 30, 20, 10], -1.0),
    # ranks [1, 2.5, 2.5, 4] vs [1, 2, 3, 4]: cov 4.5, variances 4.5 and 5 -> 4.5 / sqrt(22.5)
    ([10, 20, 20, 30], [1, 2, 3, 4], 0.9486832980505138),
])
def test_spearman_hand_cases(x, y, expected):
    assert brute_spearman(x, y) == pytest.approx(expected, abs=1e-12)
    assert cream.spearman_rho(x, y) == pytest.approx(expected, abs=1e-6)  # its ranks are float32


def test_spearman_matches_average_rank_pearson_on_random_vectors():
    rng = random.Random(1)
    checked = 0
    for trial in range(300):
        n = rng.randint(2, 9)
        if trial % 2:
            x, y = [rng.randint(0, 3) for _ in range(n)], [rng.randint(0, 3) for _ in range(n)]
        else:
            x, y = [rng.gauss(0, 1) for _ in range(n)], [rng.gauss(0, 1) for _ in range(n)]
        if len(set(x)) == 1 or len(set(y)) == 1:
            continue  # Pearson is undefined: covered by the convention test below
        assert cream.spearman_rho(x, y) == pytest.approx(brute_spearman(x, y), abs=1e-6), (x, y)
        checked += 1
    assert checked > 200


def test_spearman_of_a_constant_vector_is_zero_by_convention():
    assert cream.spearman_rho([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]) == 0.0
    assert cream.spearman_rho([3.0, 1.0, 2.0], [7.0, 7.0, 7.0]) == 0.0


def test_top_order_anchors_example_is_zero():
    """README, 'Defects of public implementations': CREAM #3. Best and worst swapped -> 0 (the
    official code says 1.0), while tau is -0.4."""
    x, y = [3, 1, 5, 2, 4], [3, 5, 1, 2, 4]
    assert brute_kendall(x, y) == pytest.approx(-0.4)
    assert cream.kendall_tau(x, y) == pytest.approx(-0.4)
    assert cream.top_order(x, y) == 0.0


def test_top_order_same_best_and_worst_is_one():
    x = [3, 1, 5, 2, 4]  # best index 2, worst index 1
    assert cream.top_order(x, [2, 0, 9, 4, 3]) == 1.0  # middle order differs, best and worst agree
    assert cream.top_order(x, x) == 1.0
    assert cream.top_order(x, [2, 0, 9, 4, 10]) == 0.0  # same worst, different best
    assert cream.top_order(x, [2, 3, 9, 0, 4]) == 0.0  # same best, different worst
    # first and last response keep their ranks, but best/worst differ: the official code would say 1.0
    assert cream.top_order([1, 5, 3, 2], [1, 3, 5, 2]) == 0.0


def brute_top_order_with_ties(x, y):
    """TopOrder averaged over every tie-break of x and of y: each permutation p ranks x by
    (x[i], p[i]), so tied responses come out in every order equally often."""
    import itertools

    def best_and_worst(values, order):
        keys = list(zip(values, order))
        return first_argmax(keys), first_argmin(keys)
    orders = list(itertools.permutations(range(len(x))))
    hits = [best_and_worst(x, p) == best_and_worst(y, q) for p in orders for q in orders]
    return sum(hits) / len(hits)


@pytest.mark.parametrize("x, y", [
    ([1, 1, 0], [1, 0, 0]),              # a tied best against a tied worst: 1/2 * 1/2
    ([2, 2, 2], [3, 1, 2]),              # all tie: chance, 1 / (3 * 2)
    ([2, 2, 2], [5, 5, 5]),
    ([1, 0, 1, 0], [1, 1, 0, 0]),
    ([0, 3, 3, 1], [0, 3, 2, 1]),
    ([4, 1, 3, 2], [4, 1, 3, 2]),        # no ties: today's 0/1
    ([4, 1, 3, 2], [1, 4, 3, 2]),
    ([7, 7, 7, 7], [1, 2, 3, 4]),
    ([1, 2, 2, 1, 0], [2, 2, 1, 0, 0]),
])
def test_top_order_breaks_ties_uniformly_at_random(x, y):
    """Ties carry no ranking information (as tau-a's tied pairs): TopOrder is its mean over every
    tie-break of both rankings, counted here by brute force."""
    assert cream.top_order(x, y) == pytest.approx(brute_top_order_with_ties(x, y), abs=1e-12)
    assert cream.top_order(y, x) == pytest.approx(brute_top_order_with_ties(y, x), abs=1e-12)


def test_top_order_of_an_all_tie_prompt_is_chance_and_gives_c_one_half():
    """Issue 19: x = [-3.2] * 5 against y = [-1.0] * 5 was full agreement (1.0) while tau says 0;
    it is chance, 1 / (5 * 4), and --consistency_measure toporder makes it C = 0.5, as Kendall's
    (0 + 1) / 2."""
    x, y = [-3.2] * 5, [-1.0] * 5
    assert cream.kendall_tau(x, y) == 0.0
    assert cream.top_order(x, y) == pytest.approx(1 / 20, abs=1e-12)
    row = sample_row("a", ["p", "q", "r", "s", "t"])
    logps_0 = per_prompt([-11.0, -12.0, -13.0, -14.0, -15.0], n=5)
    # t = 1 (r' = log pi_0): M1 = M0 plus a constant makes r all tie
    (rewards,) = cream.rewards_and_consistency([row], logps_0 + 2.0, None, logps_0)
    assert rewards["r"] == [2.0] * 5 and rewards["top_order"] == pytest.approx(1 / 20, abs=1e-12)
    args = cream.parse_args(["--consistency_measure", "toporder"])
    consistency, scope = cream.training_consistency(args, [rewards])
    assert (consistency, scope) == (pytest.approx(0.5, abs=1e-12), "dataset")


def test_consistency_rate_hand_worked():
    # (1+1)/2 = 1, (-1+1)/2 = 0, (0.5+1)/2 = 0.75, (0+1)/2 = 0.5 -> mean 2.25 / 4
    assert cream.consistency_rate([1.0, -1.0, 0.5, 0.0]) == pytest.approx(0.5625)
    assert cream.consistency_rate([1 / 3]) == pytest.approx(2 / 3)
    assert cream.consistency_rate([-1.0, -1.0]) == pytest.approx(0.0)


@pytest.mark.parametrize("rate, n, expected", [
    (1 / 20, 5, 0.5),      # chance: p0 = 1 / (5 * 4), kappa = 0
    (1.0, 5, 1.0),         # every prompt agrees on best and worst
    (1.0, 3, 1.0),
    (0.5, 3, 0.7),         # p0 = 1/6: kappa = (1/2 - 1/6) / (5/6) = 2/5, C = 7/10
    (0.5, 5, 14 / 19),     # kappa = (0.5 - 0.05) / 0.95 = 9/19, C = 14/19
    (0.0, 2, 0.0),         # N = 2: p0 = 1/2, TopOrder is tau's sign, C = (tau + 1) / 2
])
def test_top_order_consistency_hand_values(rate, n, expected):
    assert cream.top_order_consistency(rate, n) == pytest.approx(expected, abs=1e-12)


def test_top_order_consistency_is_one_half_at_chance_by_enumeration():
    """Every pair of rankings of N = 4 responses once, i.e. unrelated rankings. TopOrder agrees in
    1/12 of them (the raw rate would train with C = 0.08); corrected C is 0.5 as tau's.
    (README, 'Departures from the papers and the official code': TopOrder is chance-corrected.)"""
    import itertools

    rows = []
    for x in itertools.permutations(range(4)):
        for y in itertools.permutations(range(4)):
            top = float(first_argmax(x) == first_argmax(y) and first_argmin(x) == first_argmin(y))
            rows.append({"r": list(x), "top_order": top, "tau": brute_kendall(x, y)})
    assert sum(row["top_order"] for row in rows) / len(rows) == pytest.approx(1 / 12)
    assert cream.measured_consistency(rows, "toporder") == pytest.approx(0.5, abs=1e-12)
    assert cream.measured_consistency(rows, "kendall") == pytest.approx(0.5, abs=1e-12)


def test_top_order_consistency_with_two_responses_equals_kendall():
    """N = 2: two rankings agree on best and worst iff tau = 1, so both measures give the same C."""
    rows = [{"r": [1.0, 2.0], "top_order": 1.0, "tau": 1.0},
            {"r": [1.0, 2.0], "top_order": 0.0, "tau": -1.0},
            {"r": [3.0, 2.0], "top_order": 1.0, "tau": 1.0}]
    assert cream.measured_consistency(rows, "toporder") == pytest.approx(2 / 3)
    assert cream.measured_consistency(rows, "kendall") == pytest.approx(2 / 3)


def test_reversal_warning_hand_cases(capsys):
    """C < 0.5 makes line 14 weight the reversed pair more; a warning names the C, or per pair the
    number of pairs below 0.5 (here 0.2 and 0.4 of four); C >= 0.5 warns nothing.
    (README, 'Departures from the papers and the official code': C below 0.5.)"""
    def warning(t, pairs, scope):
        cream.check_pairs(t, pairs, scope, unusable=0)
        captured = capsys.readouterr()
        assert captured.out == ""
        return captured.err

    dataset = warning(1, [{"consistency": 0.43}] * 3, "dataset")
    assert dataset.startswith("cream.py: warning: iteration 1: C = 0.4300 < 0.5")
    assert dataset.count("\n") == 1 and "M1 ranks worse" in dataset and "C below 0.5" in dataset
    per_pair = warning(2, [{"consistency": c} for c in (0.2, 0.6, 0.4, 0.5)], "pair")
    assert per_pair.startswith(
        "cream.py: warning: iteration 2: 2 of 4 pairs have their own C < 0.5")
    assert "M2 ranks worse" in per_pair
    assert warning(1, [{"consistency": 0.5}] * 2, "dataset") == ""
    assert warning(1, [{"consistency": c} for c in (0.5, 0.9, 1.0)], "pair") == ""


def test_no_pair_is_a_one_line_error():
    """An iteration whose prompts all tie has nothing to train on; P-SRLM says why."""
    for unusable, tail in ((0, "no pair to train on"), (7, "(7 judgements gave no score)")):
        with pytest.raises(SystemExit) as exit_info:
            cream.check_pairs(2, [], "dataset", unusable)
        message = str(exit_info.value.code)
        assert message.startswith("cream.py: error: iteration 2: no prompt has two responses")
        assert message.endswith(tail) and "\n" not in message


# --- 4-6: Theorem 3.3, Lemma 3.4, soft DPO loss ---


@pytest.mark.parametrize("lam", [0.0, 0.1, 0.5, 1.0, 4.0])
def test_theorem_3_3_regularized_dpo_equals_soft_dpo(lam):
    """L_DPO(z=1) + lambda * L_Reg (Eq. 3.2, 3.5) = (1 + 2 lambda) * soft DPO with C = (1 + lambda) / (1 + 2 lambda)."""
    g = torch.Generator().manual_seed(int(lam * 100) + 7)
    policy_chosen = (torch.randn(8, generator=g, dtype=torch.float64) * 4 - 40).requires_grad_()
    policy_rejected = (torch.randn(8, generator=g, dtype=torch.float64) * 4 - 40).requires_grad_()
    ref_chosen = torch.randn(8, generator=g, dtype=torch.float64) * 4 - 40
    ref_rejected = torch.randn(8, generator=g, dtype=torch.float64) * 4 - 40
    beta = 0.3
    h = beta * ((policy_chosen - ref_chosen) - (policy_rejected - ref_rejected))
    l_dpo = neg_log_sigmoid(h)
    l_reg = neg_log_sigmoid(h) + neg_log_sigmoid(-h)
    objective = (l_dpo + lam * l_reg).sum()
    grads = torch.autograd.grad(objective, (policy_chosen, policy_rejected))

    c = (1 + lam) / (1 + 2 * lam)
    soft = cream.soft_dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta, c).sum()
    soft_grads = torch.autograd.grad(soft, (policy_chosen, policy_rejected))

    assert objective.item() == pytest.approx((1 + 2 * lam) * soft.item(), rel=1e-10)
    for a, b in zip(grads, soft_grads):
        torch.testing.assert_close(a, (1 + 2 * lam) * b, rtol=1e-10, atol=1e-12)
    if lam > 0:  # the regularizer really changes the gradient: plain DPO would not match
        plain = torch.autograd.grad(cream.soft_dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected,
                                                        beta, 1.0).sum(), policy_chosen)[0]
        assert not torch.allclose(grads[0], (1 + 2 * lam) * plain)


@pytest.mark.parametrize("noise, n", [(0.5, 5), (2.0, 4)])
def test_lemma_3_4_expected_tau_by_monte_carlo(noise, n):
    """E[tau_j] = 1 - 4 P(y > y' under r, y < y' under r') for i.i.d. candidates (two noisy rewards of a latent quality)."""
    g = torch.Generator().manual_seed(1234)
    prompts_count = 2500
    quality = torch.randn(prompts_count, n, generator=g, dtype=torch.float64)
    r = quality + noise * torch.randn(prompts_count, n, generator=g, dtype=torch.float64)
    r_prev = quality + noise * torch.randn(prompts_count, n, generator=g, dtype=torch.float64)
    mean_tau = sum(cream.kendall_tau(r[j], r_prev[j]) for j in range(prompts_count)) / prompts_count

    # Independent estimate over fresh i.i.d. pairs (y, y').
    pairs = 400_000
    q1, q2 = torch.randn(2, pairs, generator=g, dtype=torch.float64)
    r1, r2 = q1 + noise * torch.randn(pairs, generator=g, dtype=torch.float64), \
        q2 + noise * torch.randn(pairs, generator=g, dtype=torch.float64)
    s1, s2 = q1 + noise * torch.randn(pairs, generator=g, dtype=torch.float64), \
        q2 + noise * torch.randn(pairs, generator=g, dtype=torch.float64)
    p_discordant = ((r1 > r2) & (s1 < s2)).double().mean().item()
    lemma = 1 - 4 * p_discordant

    # standard errors: mean tau ~0.55/sqrt(2500) = 0.011; 4 p ~ 4 * 0.0007 = 0.003
    assert mean_tau == pytest.approx(lemma, abs=0.04)
    # and both agree with the closed form for Gaussians: E tau = (2 / pi) asin(rho), rho = 1 / (1 + noise^2)
    closed = 2 / math.pi * math.asin(1 / (1 + noise ** 2))
    assert lemma == pytest.approx(closed, abs=0.012)
    assert mean_tau == pytest.approx(closed, abs=0.04)
    assert abs(mean_tau - (1 - 2 * p_discordant)) > 0.1  # the factor 4 matters at this noise level


def test_soft_dpo_hand_value():
    # h = 0.5 * ((-10 + 11) - (-12 + 11)) = 1: -log sigma(1) = log(1 + e^-1); reversed: log(1 + e)
    args = [torch.tensor([-10.0], dtype=torch.float64), torch.tensor([-12.0], dtype=torch.float64),
            torch.tensor([-11.0], dtype=torch.float64), torch.tensor([-11.0], dtype=torch.float64), 0.5]
    assert cream.soft_dpo_loss(*args, 1.0).item() == pytest.approx(0.31326168751822286, rel=1e-12)
    assert cream.soft_dpo_loss(*args, 0.0).item() == pytest.approx(1.3132616875182228, rel=1e-12)
    assert cream.soft_dpo_loss(*args, 0.25).item() == pytest.approx(
        0.25 * 0.31326168751822286 + 0.75 * 1.3132616875182228, rel=1e-12)


def test_soft_dpo_reduces_to_dpo_and_reversed_dpo():
    g = torch.Generator().manual_seed(3)
    pc, pr, rc, rr = (torch.randn(6, generator=g, dtype=torch.float64) * 3 - 30 for _ in range(4))
    beta = 0.1
    standard = -torch.log(1 / (1 + torch.exp(-beta * ((pc - rc) - (pr - rr)))))
    reversed_ = -torch.log(1 / (1 + torch.exp(-beta * ((pr - rr) - (pc - rc)))))  # chosen and rejected swapped
    torch.testing.assert_close(cream.soft_dpo_loss(pc, pr, rc, rr, beta, 1.0), standard, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(cream.soft_dpo_loss(pc, pr, rc, rr, beta, 0.0), reversed_, rtol=1e-10, atol=1e-12)
    # the C = 0 loss is the C = 1 loss of the swapped pair
    torch.testing.assert_close(cream.soft_dpo_loss(pc, pr, rc, rr, beta, 0.0),
                               cream.soft_dpo_loss(pr, pc, rr, rc, beta, 1.0), rtol=1e-10, atol=1e-12)

    per_pair = torch.tensor([0.0, 0.25, 1.0, 0.6, 0.5, 0.9], dtype=torch.float64)
    expected = per_pair * standard + (1 - per_pair) * reversed_
    torch.testing.assert_close(cream.soft_dpo_loss(pc, pr, rc, rr, beta, per_pair), expected, rtol=1e-10, atol=1e-12)
    for i, c in enumerate(per_pair.tolist()):
        single = cream.soft_dpo_loss(pc[i:i + 1], pr[i:i + 1], rc[i:i + 1], rr[i:i + 1], beta, c)
        assert single.item() == pytest.approx(expected[i].item(), rel=1e-10)


# --- 7-8: sequence log-probs, collate labels (README, 'Defects of public
# implementations': CREAM #2), SFT loss ---

SEQUENCES = [  # (prompt_ids, response_ids) with ids below the tiny vocabulary; 1 is </s>
    ([0, 5, 9, 12], [40, 41, 1]),
    ([0, 7], [50, 51, 52, 1]),
    ([0, 3, 4, 5, 6, 8, 10, 11], [60]),
]
PAD = 1  # cream pads with EOS when the tokenizer has no pad token


def padded_batch(sequences, side):
    """Hand-built input_ids, attention_mask, response_mask, padded on `side`."""
    width = max(len(p) + len(r) for p, r in sequences)
    ids, attention, response = [], [], []
    for p, r in sequences:
        pad = width - len(p) - len(r)
        row, att, res = p + r, [1] * (len(p) + len(r)), [0] * len(p) + [1] * len(r)
        if side == "right":
            ids.append(row + [PAD] * pad), attention.append(att + [0] * pad), response.append(res + [0] * pad)
        else:
            ids.append([PAD] * pad + row), attention.append([0] * pad + att), response.append([0] * pad + res)
    return torch.tensor(ids), torch.tensor(attention), torch.tensor(response)


@pytest.mark.parametrize("side", ["right", "left"])
def test_sequence_logps_matches_token_loop_and_skips_prompt_logits(tiny_model, side, monkeypatch):
    expected = [brute_logp(tiny_model, p, r) for p, r in SEQUENCES]
    input_ids, attention_mask, response_mask = padded_batch(SEQUENCES, side)
    rows_seen, head = [], cream.token_logps

    def spy(hidden, targets, lm_head):  # the LM head is applied in token_logps only
        rows_seen.append(hidden.shape)
        return head(hidden, targets, lm_head)
    monkeypatch.setattr(cream, "token_logps", spy)
    with torch.no_grad():
        got = cream.sequence_logps(tiny_model, input_ids, attention_mask, response_mask)
    assert got.dtype == torch.float32 and got.shape == (3,)
    torch.testing.assert_close(got.double(), torch.tensor(expected, dtype=torch.float64), rtol=1e-5, atol=1e-4)
    # the LM head only sees the positions that predict a response token: 3 + 4 + 1 = 8 rows
    predicted = sum(len(r) for _, r in SEQUENCES)
    assert len(rows_seen) == 1
    assert math.prod(rows_seen[0][:-1]) == predicted == 8


def test_sequence_logps_gradient_matches_full_forward(tiny_model):
    input_ids, attention_mask, response_mask = padded_batch(SEQUENCES, "right")
    tiny_model.zero_grad()
    cream.sequence_logps(tiny_model, input_ids, attention_mask, response_mask).sum().backward()
    got = tiny_model.lm_head.weight.grad.clone()
    tiny_model.zero_grad()
    total = 0
    for p, r in SEQUENCES:  # unpadded, one sequence at a time, full log_softmax
        ids = torch.tensor([p + r])
        logp = torch.log_softmax(tiny_model(input_ids=ids).logits[0], -1)
        total = total + sum(logp[len(p) + k - 1, r[k]] for k in range(len(r)))
    total.backward()
    torch.testing.assert_close(got, tiny_model.lm_head.weight.grad, rtol=1e-4, atol=1e-6)


def test_collate_labels_are_minus_100_off_the_response():
    """README, 'Defects of public implementations': CREAM #2. Prompt and padding are -100 (not the
    pad id), even when pad id == EOS in the response."""
    sequences = [([0, 5, 6], [7, 1]), ([0, 9], [1]), ([0, 2, 3, 4], [8, 9, 1])]
    input_ids, attention_mask, labels = cream.collate(sequences, pad_id=1)
    x = -100
    assert input_ids.tolist() == [[0, 5, 6, 7, 1, 1, 1],
                                  [0, 9, 1, 1, 1, 1, 1],
                                  [0, 2, 3, 4, 8, 9, 1]]
    assert attention_mask.tolist() == [[1, 1, 1, 1, 1, 0, 0],
                                       [1, 1, 1, 0, 0, 0, 0],
                                       [1, 1, 1, 1, 1, 1, 1]]
    assert labels.tolist() == [[x, x, x, 7, 1, x, x],
                               [x, x, 1, x, x, x, x],
                               [x, x, x, x, 8, 9, 1]]


def test_sft_loss_is_mean_nll_of_response_tokens(tiny_model):
    sequences = [([0, 5, 6], [7, 1]), ([0, 9], [1]), ([0, 2, 3, 4], [8, 9, 1])]
    nll = -sum(brute_logp(tiny_model, p, r) for p, r in sequences)
    expected = nll / 6  # 2 + 1 + 3 response tokens; prompt and padding contribute nothing
    batch = cream.collate(sequences, pad_id=1)
    with torch.no_grad():
        got = cream.sft_loss(tiny_model, batch)["loss"].item()
        hf = tiny_model(input_ids=batch[0], attention_mask=batch[1], labels=batch[2]).loss.item()
    assert got == pytest.approx(expected, rel=1e-5)
    assert hf == pytest.approx(expected, rel=1e-5)  # transformers' own shifted cross-entropy agrees


# --- 9-10: pairs (README, 'Defects of public implementations': CREAM #5) and rewards
# (Algorithm 1 lines 6-10) ---


def sample_row(pid, responses):
    return {"id": pid, "prompt": f"prompt {pid}",
            "samples": [{"response": text, "token_ids": [100 + ord(text[0]), 10 * i + len(pid), 1], "finished": True}
                        for i, text in enumerate(responses)]}


def test_build_pairs_argmax_argmin_skip_ties_and_match_by_id():
    samples = [sample_row("1-0", ["a0", "a1", "a2"]), sample_row("1-1", ["b0", "b1", "b2"]),
               sample_row("1-2", ["c0", "c1", "c2"]), sample_row("1-3", ["d0", "d1", "d2"])]
    rewards = [  # deliberately not in the samples' order
        {"id": "1-2", "r": [-3.0, 0.0, 4.0], "logps_t": [-30.0, -31.0, -32.0], "tau": -1 / 3},
        {"id": "1-0", "r": [0.5, 2.0, -1.0], "logps_t": [-10.0, -11.0, -12.0], "tau": 1 / 3},
        {"id": "1-3", "r": [2.0, 2.0, 0.0], "logps_t": [-40.0, -41.0, -42.0], "tau": 1.0},
        {"id": "1-1", "r": [1.5, 1.5, 1.5], "logps_t": [-20.0, -21.0, -22.0], "tau": 0.0},  # all tie: skipped
    ]
    pairs = cream.build_pairs(samples, rewards, consistency=0.7, scope="dataset")
    assert [p["id"] for p in pairs] == ["1-0", "1-2", "1-3"]
    a, c, d = pairs
    assert (a["chosen"], a["rejected"]) == ("a1", "a2")
    assert (a["ref_chosen_logp"], a["ref_rejected_logp"]) == (-11.0, -12.0)
    assert (a["chosen_ids"], a["rejected_ids"]) == (samples[0]["samples"][1]["token_ids"],
                                                    samples[0]["samples"][2]["token_ids"])
    assert (c["chosen"], c["rejected"]) == ("c2", "c0")
    assert (c["ref_chosen_logp"], c["ref_rejected_logp"]) == (-32.0, -30.0)
    assert (c["prompt"], a["prompt"]) == ("prompt 1-2", "prompt 1-0")
    assert d["chosen"] in ("d0", "d1") and d["rejected"] == "d2"  # a tie for the best still gives a pair
    assert all(p["consistency"] == 0.7 for p in pairs)

    per_pair = cream.build_pairs(samples, rewards, consistency=0.7, scope="pair")
    # each pair keeps its own prompt's (tau + 1) / 2, although prompt 1-1 before 1-2 was skipped
    assert [p["consistency"] for p in per_pair] == pytest.approx([2 / 3, 1 / 3, 1.0])


def per_prompt(values, n=3):
    """[P * N] log-probs, prompt by prompt -> the [P, N] float64 tensor the reward functions take."""
    return torch.tensor(values, dtype=torch.float64).view(-1, n)


def test_dpo_rewards_hand_numbers():
    """Eq. 3.9 (lines 6 and 8): r = log pi_t - log pi_0, r' = log pi_{t-1} - log pi_0, and at
    t = 1 r' = log pi_0 itself."""
    logps_t, logps_prev, logps_0 = (per_prompt(v, 2) for v in ([-1.0, -3.0], [-2.0, -2.5],
                                                                [-1.5, -2.0]))
    r, r_prev = cream.dpo_rewards(logps_t, logps_prev, logps_0)
    assert r.tolist() == [[0.5, -1.0]] and r_prev.tolist() == [[-0.5, -0.5]]
    r, r_prev = cream.dpo_rewards(logps_t, None, logps_0)
    assert r.tolist() == [[0.5, -1.0]] and r_prev.tolist() == [[-1.5, -2.0]]


def test_rewards_and_consistency_hand_numbers():
    samples = [sample_row("a", ["x", "y", "z"]), sample_row("b", ["u", "v", "w"])]
    logps_t = per_prompt([-10.0, -12.0, -11.0, -20.0, -21.0, -22.0])
    logps_prev = per_prompt([-10.5, -11.0, -13.0, -20.0, -20.5, -23.0])
    logps_0 = per_prompt([-11.0, -11.0, -11.0, -19.0, -22.0, -20.0])

    first = cream.rewards_and_consistency(samples, logps_t, None, logps_0)  # t = 1
    assert [row["id"] for row in first] == ["a", "b"]
    assert first[0]["r"] == [1.0, -1.0, 0.0] and first[1]["r"] == [-1.0, 1.0, -2.0]  # log pi_t - log pi_0
    assert first[0]["r_prev"] == [-11.0, -11.0, -11.0]  # t = 1: log pi_0 itself
    assert first[1]["r_prev"] == [-19.0, -22.0, -20.0]
    assert first[0]["logps_t"] == [-10.0, -12.0, -11.0]
    assert first[0]["tau"] == pytest.approx(0.0)  # r_prev all tied
    # r = [-1, 1, -2] vs r' = [-19, -22, -20]: (1,2) discordant, (1,3) concordant, (2,3) discordant -> -1/3
    assert first[1]["tau"] == pytest.approx(-1 / 3)

    second = cream.rewards_and_consistency(samples, logps_t, logps_prev, logps_0)  # t = 2
    assert second[0]["r_prev"] == [0.5, 0.0, -2.0] and second[1]["r_prev"] == [-1.0, 1.5, -3.0]  # pi_{t-1} - pi_0
    assert second[0]["r"] == [1.0, -1.0, 0.0]
    # r = [1, -1, 0] vs r' = [0.5, 0, -2]: (1,2) +, (1,3) +, (2,3) - -> 1/3;  r = [-1, 1, -2] vs [-1, 1.5, -3]: same order
    assert second[0]["tau"] == pytest.approx(1 / 3)
    assert second[1]["tau"] == pytest.approx(1.0)
    assert second[0]["top_order"] == 0.0  # best 0 vs 0, worst 1 vs 2
    assert second[1]["top_order"] == 1.0  # best 1 and worst 2 under both
    assert second[0]["spearman"] == pytest.approx(0.5, abs=1e-6)  # ranks [3,1,2] vs [3,2,1]: 1 - 6*2/24


def test_identical_samples_tie_in_both_rankings_and_count_zero():
    """Identical samples get the same log-probs under every model: a tie in both rankings. Tau-a
    (Eq. 3.10) counts that pair 0: r = [1, 1, 0] vs r' = [-11, -11, -12] has (1,2) tied, (1,3)
    and (2,3) concordant -> 2/3, C = 5/6. scipy on ordinal ranks (official code) would say 1.
    (README, 'Departures from the papers and the official code': Kendall tau is tau-a.)"""
    row = sample_row("a", ["same", "same", "other"])
    row["samples"][1]["token_ids"] = row["samples"][0]["token_ids"]
    logps_t, logps_0 = per_prompt([-10.0, -10.0, -12.0]), per_prompt([-11.0, -11.0, -12.0])
    (rewards,) = cream.rewards_and_consistency([row], logps_t, None, logps_0)
    assert rewards["r"] == [1.0, 1.0, 0.0] and rewards["r_prev"] == [-11.0, -11.0, -12.0]
    assert rewards["tau"] == pytest.approx(2 / 3)
    assert cream.measured_consistency([rewards], "kendall") == pytest.approx(5 / 6)


# --- 11-12: stochastic rounding and AdamW (README, 'Defects of public implementations': CREAM #4,
# and 'One 80 GB GPU'), learning-rate schedule ---


@pytest.mark.parametrize("sign_", [1.0, -1.0])
def test_stochastic_rounding_is_unbiased_and_picks_a_neighbour(sign_):
    ulp = 2.0 ** -7  # bf16 spacing in [1, 2)
    lo, hi = sign_ * 1.0, sign_ * (1.0 + ulp)
    value = sign_ * (1.0 + 0.3 * ulp)
    torch.manual_seed(0)
    n = 200_000
    rounded = cream.stochastic_round_to_bf16(torch.full((n,), value, dtype=torch.float32))
    assert rounded.dtype == torch.bfloat16
    as_float = rounded.float()
    assert set(as_float.unique().tolist()) <= {lo, hi}
    assert ((as_float == hi).double().mean().item()) == pytest.approx(0.3, abs=0.005)  # std 0.001
    assert as_float.double().mean().item() == pytest.approx(value, abs=5 * ulp * math.sqrt(0.21 / n))


def test_stochastic_rounding_keeps_bf16_values_and_is_unbiased_near_002():
    torch.manual_seed(1)
    exact = torch.tensor([0.0, 1.0, -2.5, 0.015625, 3.0e-3], dtype=torch.bfloat16).float()
    for _ in range(50):
        assert torch.equal(cream.stochastic_round_to_bf16(exact.clone()).float(), exact)
    # random values around 0.02: each result is one of the two bf16 neighbours, and the mean is unbiased
    x = 0.02 + 1e-3 * torch.rand(100_000)
    down = x.to(torch.bfloat16).float()
    down = torch.where(down > x, down - 2.0 ** -13, down)  # bf16 spacing in [2^-6, 2^-5) is 2^-13
    rounded = cream.stochastic_round_to_bf16(x.clone()).float()
    assert bool(((rounded == down) | (rounded == down + 2.0 ** -13)).all())
    assert (rounded - x).double().mean().item() == pytest.approx(0.0, abs=5 * 2.0 ** -13 * 0.5 / math.sqrt(1e5))


def test_adamw_step_float32_matches_torch_adamw():
    torch.manual_seed(2)
    ours = [torch.randn(5, 7), torch.randn(3)]
    ref = [t.clone().requires_grad_() for t in ours]
    opt = torch.optim.AdamW(ref, lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1)
    state = {}
    for step in range(20):
        grads = [torch.randn_like(t) for t in ours]
        for p, g in zip(ours, grads):
            p.grad = g.clone()
        for p, g in zip(ref, grads):
            p.grad = g.clone()
        cream.adamw_step(ours, state, lr=1e-2, weight_decay=0.1)
        opt.step()
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b.detach(), rtol=1e-5, atol=1e-6)
    assert state["step"] == 20


def test_adamw_bf16_stochastic_rounding_tracks_float32_where_round_to_nearest_stalls():
    """README, 'One 80 GB GPU': bf16 weight 0.02, constant gradient, lr 1e-6, 300 steps -> fp32
    moves ~300 * lr."""
    steps, lr, n = 300, 1e-6, 4096
    w0 = torch.full((n,), 0.02, dtype=torch.bfloat16)
    grad = torch.ones(n)

    fp32 = w0.float().clone().requires_grad_()
    opt32 = torch.optim.AdamW([fp32], lr=lr, weight_decay=0.0)
    rtn = w0.clone().requires_grad_()
    opt_rtn = torch.optim.AdamW([rtn], lr=lr, weight_decay=0.0)
    sr = w0.clone()
    state = {}
    torch.manual_seed(3)
    for _ in range(steps):
        fp32.grad, rtn.grad, sr.grad = grad.clone(), grad.to(torch.bfloat16), grad.to(torch.bfloat16)
        opt32.step()
        opt_rtn.step()
        cream.adamw_step([sr], state, lr=lr)

    moved32 = (w0.double() - fp32.detach().double()).mean().item()
    assert moved32 == pytest.approx(steps * lr, rel=1e-3)  # Adam's step is ~lr for a constant gradient
    assert torch.equal(rtn.detach(), w0)  # round-to-nearest: every update is rounded away
    assert sr.dtype == torch.bfloat16
    moved_sr = (w0.double() - sr.double()).mean().item()
    # per element the walk has std ~1.5 ulp (ulp = 1.2e-4); averaged over 4096 elements ~3e-6
    assert moved_sr == pytest.approx(moved32, abs=0.05 * moved32)
    assert (sr != w0).float().mean().item() > 0.5  # most elements really moved


def test_learning_rate_warmup_then_cosine_hand_values():
    lr = cream.learning_rate
    # 25 steps, warmup 0.2 -> 5 warmup steps: 0.2, 0.4, ..., 1.0; then cosine over 20 steps
    assert [lr(s, 25, 1.0, 0.2) for s in range(5)] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    assert lr(5, 25, 1.0, 0.2) == pytest.approx(1.0)
    assert lr(10, 25, 1.0, 0.2) == pytest.approx(0.8535533905932737)  # (1 + cos(pi/4)) / 2
    assert lr(15, 25, 1.0, 0.2) == pytest.approx(0.5)                 # halfway through the decay
    assert lr(24, 25, 1.0, 0.2) == pytest.approx(0.006155829702431115)  # (1 + cos(19 pi / 20)) / 2
    assert lr(25, 25, 1.0, 0.2) == pytest.approx(0.0, abs=1e-15)
    # peak scales linearly; no warmup share still warms up over one step
    assert lr(15, 25, 1e-6, 0.2) == pytest.approx(5e-7)
    assert lr(0, 10, 2.0, 0.0) == pytest.approx(2.0)
    assert lr(6, 11, 2.0, 0.0) == pytest.approx(1.0)  # warmup 1 step, cosine over 10: step 6 is halfway
    assert lr(5, 11, 2.0, 0.0) == pytest.approx(1.3090169943749475)  # 1 + cos(0.4 pi)


# --- 15 (direct): a non-finite loss stops training with the one-line error ---


def test_train_stops_on_nan_loss_with_one_line_error(tiny_model):
    args = cream.Args(grad_accum=1, max_grad_norm=1.0, warmup_ratio=0.1, lr=1e-3)
    calls = []

    def loss_fn(model, batch):
        calls.append(batch)
        loss = sum(p.float().square().sum() for p in model.parameters()) * 1e-3
        return {"loss": loss * (float("nan") if batch == "bad" else 1.0)}

    with pytest.raises(SystemExit) as exit_info:
        cream.train(tiny_model, ["ok", "bad", "never"], loss_fn, "lr", args, "DPO test")
    message = str(exit_info.value.code)
    assert message.startswith("cream.py: error: ") and "\n" not in message
    assert "DPO test" in message and "nan" in message and "micro-batch 1" in message
    assert message.endswith("with --lr 0.001; nothing was saved, and the models before it are "
                            "intact (README)")
    assert calls == ["ok", "bad"]  # stopped at once


@pytest.mark.parametrize("rank, world, expected", [
    (0, 1, [("a", 1 / 3), ("b", 1 / 3), ("c", 1 / 3)]),  # one process: all, the mean of three
    (0, 2, [("a", 2 / 3), ("c", 2 / 3)]),
    (1, 2, [("b", 2 / 3), ("a", 0.0)]),  # one short: the first again, counting nothing
    (3, 4, [("a", 0.0)])])  # none left: the first again, so each rank runs one forward
def test_share_of_a_step_splits_it_by_rank_with_weights_summing_to_the_mean(rank, world, expected,
                                                                             monkeypatch):
    monkeypatch.setattr(cream, "rank_and_world", lambda: (rank, world))
    assert cream.share_of(["a", "b", "c"]) == expected


# --- 13: end to end through the CLI, resume, and --demo ---

E2E_FLAGS = ["--iterations", 2, "--num_prompts", 4, "--num_samples", 3, "--max_new_tokens", 8, "--max_length", 96,
             "--sft_epochs", 1, "--batch_size", 2, "--grad_accum", 1, "--dtype", "float32",
             "--sft_lr", 3e-3, "--lr", 3e-4]  # learning rates large enough that a random tiny model visibly moves
METRIC_KEYS = {"iteration", "consistency", "kendall", "spearman", "top_order", "pairs", "skipped", "loss",
               "reward_accuracy", "reward_margin", "response_length"}
# progress bars of work: cream's training and scoring, and generate_batch; "Loading weights" too,
# though main turns transformers' own loading bar off (test_e2e_cli_run checks it stays off)
PROGRESS_OF_WORK = ("SFT M0", "CREAM M", "log-probs under", "Loading weights", "Solving")


@pytest.fixture(scope="module")
def e2e(tmp_path_factory, tiny_model_dir, data_dir, run_script):
    out = tmp_path_factory.mktemp("e2e") / "run"
    argv = ["--model", tiny_model_dir, "--data_dir", data_dir, "--output_dir", out, *E2E_FLAGS]
    start = time.monotonic()
    result = run_script("cream.py", *argv)
    return {"out": out, "argv": argv, "result": result, "seconds": time.monotonic() - start}


def snapshot(folder):
    """{relative path: (sha256, mtime_ns)} of every file under folder."""
    return {str(p.relative_to(folder)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def flat_weights(path):
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return model, torch.cat([t.flatten() for t in model.state_dict().values()])


def test_e2e_cli_run(e2e, tiny_model_dir, tiny_tokenizer, data_dir):
    result, out = e2e["result"], e2e["out"]
    assert result.returncode == 0, result.stderr[-4000:]
    assert "Traceback" not in result.stderr
    # quiet model loading: transformers' own bar is off, the script's bars stay
    assert "Loading weights" not in result.stderr and "SFT M0 -> M1" in result.stderr

    # M1, M2, M3 load and differ from M0 and from each other: training happened at every stage
    models, weights = {}, {}
    for name, path in [("M0", tiny_model_dir), ("M1", out / "M1"), ("M2", out / "M2"), ("M3", out / "M3")]:
        models[name], weights[name] = flat_weights(path)
        models[name].eval()
    for a, b in [("M0", "M1"), ("M1", "M2"), ("M2", "M3")]:
        assert weights[a].shape == weights[b].shape
        assert not torch.equal(weights[a], weights[b]), f"{a} and {b} have identical weights"

    metrics = load_jsonl(out / "metrics.jsonl")
    assert [m["iteration"] for m in metrics] == [1, 2]
    all_prompts = {row["prompt"] for row in load_jsonl(Path(data_dir) / "prompts.jsonl")}
    seen_prompts, seen_ids = set(), set()
    for t, m in zip((1, 2), metrics):
        assert METRIC_KEYS <= set(m), METRIC_KEYS - set(m)
        it = out / f"iter{t}"
        samples, rewards, pairs = (load_jsonl(it / f"{name}.jsonl") for name in ("samples", "rewards", "pairs"))

        # samples: 4 prompts of prompts.jsonl, 3 responses each, at most 8 new tokens; iterations use new prompts
        assert len(samples) == 4
        for row in samples:
            assert row["prompt"] in all_prompts and row["prompt"] not in seen_prompts and row["id"] not in seen_ids
            seen_prompts.add(row["prompt"]), seen_ids.add(row["id"])
            assert len(row["samples"]) == 3
            for s in row["samples"]:
                assert 1 <= len(s["token_ids"]) <= 8
                assert s["finished"] == (s["token_ids"][-1] == tiny_tokenizer.eos_token_id)
                text_ids = s["token_ids"][:-1] if s["finished"] else s["token_ids"]
                assert s["response"] == tiny_tokenizer.decode(text_ids, skip_special_tokens=True)

        # log-probs recomputed here by brute force under pi_t, pi_{t-1} (t > 1) and pi_0 from the saved models
        def logp_under(name, row, s):  # the prompt as the model saw it, then the sampled ids (stop token included)
            prompt_ids = tiny_tokenizer(prompts.chat_prompt(tiny_tokenizer, row["prompt"]),
                                        add_special_tokens=False).input_ids
            return brute_logp(models[name], prompt_ids, s["token_ids"][: 96 - len(prompt_ids)])

        rewards_by_id = {row["id"]: row for row in rewards}
        assert [row["id"] for row in rewards] == [row["id"] for row in samples]
        for row in samples:
            rw = rewards_by_id[row["id"]]
            lp_t = [logp_under(f"M{t}", row, s) for s in row["samples"]]
            lp_0 = [logp_under("M0", row, s) for s in row["samples"]]
            assert rw["r"] == pytest.approx([a - b for a, b in zip(lp_t, lp_0)], abs=2e-3)
            if t == 1:
                assert rw["r_prev"] == pytest.approx(lp_0, abs=2e-3)  # log pi_0 itself
            else:
                lp_prev = [logp_under(f"M{t - 1}", row, s) for s in row["samples"]]
                assert rw["r_prev"] == pytest.approx([a - b for a, b in zip(lp_prev, lp_0)], abs=2e-3)

        # consistency and the other metrics, recomputed from rewards.jsonl with the reference functions above
        taus = [brute_kendall(rw["r"], rw["r_prev"]) for rw in rewards]
        assert m["consistency"] == pytest.approx(sum((tau + 1) / 2 for tau in taus) / len(taus), abs=1e-9)
        assert m["kendall"] == pytest.approx(sum(taus) / len(taus), abs=1e-9)
        spearman = [brute_spearman(rw["r"], rw["r_prev"]) if len(set(rw["r"])) > 1 and len(set(rw["r_prev"])) > 1
                    else 0.0 for rw in rewards]
        assert m["spearman"] == pytest.approx(sum(spearman) / len(spearman), abs=1e-6)
        top = [float(first_argmax(rw["r"]) == first_argmax(rw["r_prev"]) and
                     first_argmin(rw["r"]) == first_argmin(rw["r_prev"])) for rw in rewards]
        assert m["top_order"] == pytest.approx(sum(top) / len(top))
        for key, values in (("kendall", taus), ("spearman", spearman), ("top_order", top)):
            assert m[f"{key}_std"] == pytest.approx(statistics.pstdev(values), abs=1e-6)
        # table.md, row M_t (Table 2's "M_t vs M_{t-1}"): C = mean (tau + 1) / 2 +- std / 2
        cells = next(line for line in (out / "table.md").read_text().splitlines() if f"| M{t} |" in line).split(" | ")
        assert f"{statistics.mean(taus) / 2 + 0.5:.2f} ± {statistics.pstdev(taus) / 2:.2f}" in cells
        lengths = [len(s["token_ids"]) for row in samples for s in row["samples"]]
        assert m["response_length"] == pytest.approx(sum(lengths) / len(lengths))

        # pairs: chosen = argmax r, rejected = argmin r; all-tie prompts skipped; reference log-probs are pi_t's
        expected_ids = [row["id"] for row in samples if max(rewards_by_id[row["id"]]["r"]) >
                        min(rewards_by_id[row["id"]]["r"])]
        assert [p["id"] for p in pairs] == expected_ids and expected_ids
        assert m["pairs"] == len(pairs) and m["skipped"] == len(samples) - len(pairs)
        samples_by_id = {row["id"]: row for row in samples}
        for p in pairs:
            rw, row = rewards_by_id[p["id"]], samples_by_id[p["id"]]
            best, worst = first_argmax(rw["r"]), first_argmin(rw["r"])
            assert p["prompt"] == row["prompt"]
            assert p["chosen"] == row["samples"][best]["response"]
            assert p["rejected"] == row["samples"][worst]["response"]
            assert (p["chosen_ids"], p["rejected_ids"]) == (row["samples"][best]["token_ids"],
                                                            row["samples"][worst]["token_ids"])
            assert p["ref_chosen_logp"] == pytest.approx(logp_under(f"M{t}", row, row["samples"][best]), abs=1e-3)
            assert p["ref_rejected_logp"] == pytest.approx(logp_under(f"M{t}", row, row["samples"][worst]), abs=1e-3)
            assert p["consistency"] == pytest.approx(m["consistency"])  # default scope: dataset-level C
        for key in ("loss", "reward_accuracy", "reward_margin"):
            assert math.isfinite(m[key])
        assert 0.0 <= m["reward_accuracy"] <= 1.0


def test_e2e_cli_rerun_resumes_without_work(e2e, run_script):
    assert e2e["result"].returncode == 0, e2e["result"].stderr[-3000:]
    out = e2e["out"]
    before = snapshot(out)
    start = time.monotonic()
    result = run_script("cream.py", *e2e["argv"])
    seconds = time.monotonic() - start
    assert result.returncode == 0, result.stderr[-3000:]
    after = snapshot(out)
    assert sorted(after) == sorted(before)
    for path, (digest, mtime) in before.items():
        assert after[path][0] == digest, f"{path} changed on resume"
        if path not in ("args.json", "metrics.jsonl", "table.md"):  # rewritten with identical content
            assert after[path][1] == mtime, f"{path} was rewritten on resume"
    # fast: no model is loaded, nothing is sampled, scored or trained (the time is Python start-up and imports)
    assert not any(desc in result.stderr for desc in PROGRESS_OF_WORK), result.stderr[-2000:]
    assert any(desc in e2e["result"].stderr for desc in PROGRESS_OF_WORK)  # the markers do show real work
    assert seconds < 30


def test_e2e_rerun_with_other_settings_is_refused(e2e, run_script):
    """Resuming with other settings would mix runs: a one-line error naming the changed flag, nothing written."""
    assert e2e["result"].returncode == 0, e2e["result"].stderr[-3000:]
    before = snapshot(e2e["out"])
    result = run_script("cream.py", *e2e["argv"], "--beta", 0.5)
    line = error_line(result)
    assert "--beta" in line and str(e2e["out"]) in line, line
    assert snapshot(e2e["out"]) == before


def test_e2e_non_finite_loss_stops_and_keeps_saved_models(e2e, tmp_path, monkeypatch):
    """A diverging iteration (the DPO loss turns NaN on its second micro-batch; --lr inf, which
    once made it diverge, is now refused by the flag checks) stops with the one-line error; M1 and
    the finished iteration files stay as they were, no M2 appears."""
    assert e2e["result"].returncode == 0, e2e["result"].stderr[-3000:]
    out = tmp_path / "run"
    shutil.copytree(e2e["out"], out)
    for name in ("M2", "M3", "iter2"):
        shutil.rmtree(out / name)
    (out / "metrics.jsonl").unlink()
    settings = json.loads((out / "args.json").read_text())  # --epochs 2 on purpose: not a refused resume
    (out / "args.json").write_text(json.dumps(dict(settings, epochs=2)))
    before = {k: v[0] for k, v in snapshot(out).items() if k != "args.json"}
    argv = [str(a) for a in e2e["argv"]]
    argv[argv.index("--output_dir") + 1] = str(out)
    real_loss, calls = cream.soft_dpo_loss, []

    def diverging_loss(*inputs):
        calls.append(1)
        return real_loss(*inputs) * (float("nan") if len(calls) == 2 else 1.0)
    monkeypatch.setattr(cream, "soft_dpo_loss", diverging_loss)
    with pytest.raises(SystemExit) as exit_info:
        cream.main([*argv, "--epochs", "2"])  # two epochs: at least two micro-batches
    last = str(exit_info.value.code)
    assert last.startswith("cream.py: error:") and "\n" not in last, last
    assert ("M1 -> M2: the loss became nan at micro-batch 1 with --lr 0.0003; nothing was saved"
            in last), last
    after = {k: v[0] for k, v in snapshot(out).items() if k != "args.json"}
    assert after == before  # M1 and iter1 files untouched, nothing new (no M2, no M2.tmp, no metrics)


def test_demo_runs(tmp_path, run_script):
    result = run_script("cream.py", "--demo", "--output_dir", tmp_path / "demo")
    assert result.returncode == 0, result.stderr[-4000:]
    metrics = load_jsonl(tmp_path / "demo" / "metrics.jsonl")
    assert [m["iteration"] for m in metrics] == [1, 2]
    assert all(METRIC_KEYS <= set(m) for m in metrics)
    assert all((tmp_path / "demo" / name / "config.json").is_file() for name in ("M1", "M2", "M3"))


# --- 14: bad input through the CLI: exit != 0, one stderr line "cream.py: error: ..." naming the culprit ---


def copy_data(data_dir, tmp_path):
    target = tmp_path / "data"
    shutil.copytree(data_dir, target)
    return target


def case_missing_model(tmp_path, model, data):
    path = tmp_path / "no-such-model"
    return ["--model", path, "--data_dir", data], [str(path)], {}


def case_model_without_weights(tmp_path, model, data):
    path = tmp_path / "tokenizer-only"  # a tokenizer loads from here, the model does not
    path.mkdir()
    for name in Path(model).iterdir():
        if name.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(name, path / name.name)
    return ["--model", path, "--data_dir", data], [str(path), "model"], {}


def case_missing_data_dir(tmp_path, model, data):
    path = tmp_path / "no-such-data"
    return ["--model", model, "--data_dir", path], [str(path), "--data_dir"], {}


def case_malformed_jsonl(tmp_path, model, data):
    data = copy_data(data, tmp_path)
    lines = (data / "sft.jsonl").read_text().splitlines()
    lines[2] = '{"prompt": "Name a color.", "response": '  # line 3 is cut off
    (data / "sft.jsonl").write_text("\n".join(lines) + "\n")
    return ["--model", model, "--data_dir", data], [f"{data / 'sft.jsonl'}:3"], {}


def case_missing_field(tmp_path, model, data):
    data = copy_data(data, tmp_path)
    lines = (data / "prompts.jsonl").read_text().splitlines()
    lines[1] = json.dumps({"question": "What is 1 + 1?"})
    (data / "prompts.jsonl").write_text("\n".join(lines) + "\n")
    return ["--model", model, "--data_dir", data], [f"{data / 'prompts.jsonl'}:2", "prompt"], {}


def case_empty_prompts(tmp_path, model, data):
    data = copy_data(data, tmp_path)
    (data / "prompts.jsonl").write_text("\n")
    return ["--model", model, "--data_dir", data], [str(data / "prompts.jsonl"), "empty"], {}


def case_one_sample(tmp_path, model, data):
    return ["--model", model, "--data_dir", data, "--num_samples", 1], ["--num_samples"], {}


def case_offline_without_data_dir(tmp_path, model, data):
    # an empty HF cache, so nothing cached on this machine can be found either
    return ["--model", model], ["oasst1", "--data_dir"], {"HF_HOME": str(tmp_path / "hf-home")}


def case_no_sft(tmp_path, model, data):
    """M1 = M0 makes every reward log pi_1 - log pi_0 zero, so iteration 1 has no pair.
    (README, 'Departures from the papers and the official code': --sft_epochs 0 is refused.)"""
    path = tmp_path / "no-such-model"  # refused before any model is looked for
    argv = ["--model", path, "--data_dir", data, "--sft_epochs", 0]
    return argv, ["--sft_epochs 0", "Eq. 3.9"], {}


BAD_INPUT_CASES = [case_missing_model, case_model_without_weights, case_missing_data_dir,
                   case_malformed_jsonl, case_missing_field, case_empty_prompts, case_one_sample,
                   case_offline_without_data_dir, case_no_sft]


@pytest.fixture(scope="module")
def bad_input_runs(tmp_path_factory, tiny_model_dir, data_dir, start_script):
    """All bad-input runs started at once (each is mostly Python start-up), then collected."""
    started = {}
    for case in BAD_INPUT_CASES:
        base = tmp_path_factory.mktemp(case.__name__)
        argv, culprits, env = case(base, tiny_model_dir, data_dir)
        # small settings first, so the case's own flags win, and a missed error cannot start a long run
        started[case.__name__] = (start_script("cream.py", *E2E_FLAGS, "--output_dir", base / "out", *argv,
                                               timeout=120, env=env), culprits, base / "out")
    return {name: (run.result(), culprits, out) for name, (run, culprits, out) in started.items()}


@pytest.mark.parametrize("case", [case.__name__ for case in BAD_INPUT_CASES], ids=lambda name: name[5:])
def test_bad_input_gives_one_line_error(case, bad_input_runs):
    result, culprits, out = bad_input_runs[case]
    line = error_line(result)
    for culprit in culprits:
        assert culprit in line, (culprit, line)
    assert not (out / "M1").exists()


def test_tokenizer_without_pad_token_is_fine(tiny_tokenizer):
    """The tiny tokenizer has no pad token (covered end to end above); cream pads with EOS and masks padding."""
    assert tiny_tokenizer.pad_token_id is None
    loaded = cream.load_tokenizer(tiny_tokenizer.name_or_path)
    assert loaded.pad_token_id == loaded.eos_token_id == tiny_tokenizer.eos_token_id


# --- Bad input found while writing these tests: each once ended in a traceback ---


def expect_one_line_exit(call, *culprits):
    with pytest.raises(SystemExit) as exit_info:
        call()
    message = str(exit_info.value.code)
    assert message.startswith("cream.py: error:") and "\n" not in message, message
    for culprit in culprits:
        assert culprit in message, (culprit, message)


def test_non_utf8_jsonl_line_is_a_one_line_error(tmp_path):
    path = tmp_path / "sft.jsonl"
    path.write_bytes(b'{"prompt": "a", "response": "b"}\n{"prompt": "\xff\xfe", "response": "c"}\n')
    expect_one_line_exit(lambda: cream.read_jsonl(path, ["prompt", "response"]), f"{path}:2")


def test_unknown_flag_is_a_one_line_error():
    expect_one_line_exit(lambda: cream.parse_args(["--num_samplez", "3"]), "--num_samplez")


def test_output_dir_that_is_a_file_is_a_one_line_error(tmp_path, data_dir, tiny_model_dir):
    target = tmp_path / "not-a-folder"
    target.write_text("x")
    expect_one_line_exit(lambda: cream.main(["--model", tiny_model_dir, "--data_dir", data_dir,
                                             "--output_dir", str(target)]), str(target))


def test_e2e_sampling_memory_is_bounded_for_a_tiny_model(e2e):
    """Regression: generate_batch without a ContinuousBatchingConfig sizes its paged KV cache and attention masks
    from the machine's memory on CPU (60-90% of it): the tiny run then peaked at ~12 GB resident (fixed in 96a888c,
    which sizes the cache to the work; the run now peaks at ~0.4 GB)."""
    assert e2e["result"].returncode == 0, e2e["result"].stderr[-3000:]
    assert e2e["result"].max_rss_mb < 1536, f"peak resident memory {e2e['result'].max_rss_mb:.0f} MiB"


@pytest.mark.parametrize("module", ["cream", "scir"])
def test_sequence_logps_float32_head_on_a_bf16_model(module):
    """On a bf16 model whose logits spread like a real LM's (std ~4 over 32,768 tokens), summed
    log-probs of 300-token responses agree within 0.02 nat with a float64 head and log-softmax applied to the
    same bf16 hidden states. A bf16 head, which rounds each logit before the float32 cast, is off by more.
    (README, 'One 80 GB GPU': logits only where needed, through an fp32 LM head.)"""
    import importlib

    from transformers import LlamaConfig, LlamaForCausalLM

    script = importlib.import_module(module)
    config = LlamaConfig(vocab_size=32768, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16).eval()
    with torch.no_grad():  # the final RMSNorm gives hidden states of unit scale: logits of std ~4
        model.lm_head.weight.normal_(0, 4 / 64 ** 0.5)
    input_ids = torch.randint(0, 32768, (2, 320))
    attention_mask = torch.ones_like(input_ids)
    response_mask = torch.zeros_like(input_ids)
    response_mask[:, 20:] = 1  # 300 response tokens each
    with torch.no_grad():
        got = script.sequence_logps(model, input_ids, attention_mask, response_mask).double()
        hidden = model.model(input_ids=input_ids).last_hidden_state[:, 19:-1]  # [2, 300, H], bf16
        logits = hidden.double() @ model.lm_head.weight.double().T
        exact = logits.log_softmax(-1).gather(-1, input_ids[:, 20:, None]).squeeze(-1).sum(-1)
        rounded = model.lm_head(hidden).float()  # the bf16 head
        bf16_head = (rounded.gather(-1, input_ids[:, 20:, None]).squeeze(-1) - rounded.logsumexp(-1)).sum(-1)
    assert logits.std().item() == pytest.approx(4, rel=0.1)
    assert (got - exact).abs().max().item() < 0.02
    assert (bf16_head.double() - exact).abs().max().item() > 0.02  # the case does tell the two apart
