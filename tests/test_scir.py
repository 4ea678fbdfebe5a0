"""Tests for scir.py against the SCIR paper (arXiv 2502.08922): Eq. 3-7, section 3.3, Appendix A and C.1.

Every expected value is computed here independently: closed-form derivatives written out by hand, Python `math`
on hand-picked numbers, or brute force on a tiny model (one unpadded forward per judge prompt, log-probs summed
token by token), never with scir.py's own functions.

The tiny model, its tokenizer (trained on the judge templates: ~260 tokens per judge prompt), the data folder
and the subprocess helpers come from conftest.py; the scir-specific pieces (pairs, a judge-SFT table, a tokenizer
that merges '[[m', the bad-input folders) are built here.
"""

import hashlib
import json
import math
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import prompts
import scir

# ------------------------------------------------------------------------------------------------------------------
# Fixtures on top of conftest.py's tiny model (tiny_model_dir, tiny_model) and data folder (data_dir)
# ------------------------------------------------------------------------------------------------------------------
def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def byte_level_tokenizer(corpus, vocab_size, use_regex=True):
    """Byte-level BPE trained on `corpus`; bos <s>, eos </s>, no pad token, no chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=use_regex)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<s>", "</s>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>")


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    """The tiny tokenizer as scir.py uses it: padding with EOS (it has no pad token of its own). A copy of its own,
    so the shared session tokenizer keeps having no pad token."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert tokenizer.pad_token_id is None
    tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


@pytest.fixture
def model(tiny_model):
    return tiny_model


@pytest.fixture(scope="module")
def ids_mM(tok):
    id_m, id_big_m = prompts.identifier_token_ids(tok)
    # in a byte-level vocabulary the single letters are tokens named by themselves
    assert (id_m, id_big_m) == tuple(tok.convert_tokens_to_ids(["m", "M"]))
    return id_m, id_big_m


# ------------------------------------------------------------------------------------------------------------------
# Independent reference computations
# ------------------------------------------------------------------------------------------------------------------
def sigmoid(x):
    return 1 / (1 + math.exp(-x))


def kl(a, b):
    """KL(Bern(a) || Bern(b))"""
    return a * math.log(a / b) + (1 - a) * math.log((1 - a) / (1 - b))


def entropy(a):
    return -(a * math.log(a) + (1 - a) * math.log(1 - a))


def eq6(p, q, tau):
    """Eq. 6 and its gradients by hand. Each bracket is a cross-entropy: KL(Q||P) + H(Q) = -q log p - (1-q) log(1-p).

    With P stopped the first bracket moves only q: d/dq = log(1-p) - log p; the second moves only p:
    d/dp = log(1-q) - log q. Returns (value, d/dp, d/dq).
    """
    p_on = float(max(p, 1 - p) > tau)  # I(P > tau): "the highest probability exceeds tau"
    q_on = float(max(q, 1 - q) > tau)
    value = p_on * (kl(q, p) + entropy(q)) + q_on * (kl(p, q) + entropy(p))
    return value, q_on * math.log((1 - q) / q), p_on * math.log((1 - p) / p)


def judge_texts(tokenizer, instruction, y1, y2):
    """The 4 judge prompts of section 3.3 filled by hand: (text ending in '[[', y1 shown first)."""
    out = []
    for template in prompts.PAIRWISE_JUDGE_TEMPLATES:
        for first, second, y1_first in ((y1, y2, True), (y2, y1, False)):
            text = (template.replace("{instruction}", instruction).replace("{response_1}", first)
                    .replace("{response_2}", second))
            out.append((prompts.chat_prompt(tokenizer, text) + "[[", y1_first))
    return out


def brute_q_prompts(model, tokenizer, instruction, y1, y2, ids, alpha_l=0.0, len_1=None, len_2=None):
    """P_grm(y1 > y2) (Eq. 5) of each of the 4 judge prompts: one unpadded forward per prompt, the two identifier
    logits minus alpha_l |y| renormalised, mapped back to y1. Differentiable."""
    len_1 = len(tokenizer(y1, add_special_tokens=False).input_ids) if len_1 is None else len_1
    len_2 = len(tokenizer(y2, add_special_tokens=False).input_ids) if len_2 is None else len_2
    per_prompt = []
    for text, y1_first in judge_texts(tokenizer, instruction, y1, y2):
        token_ids = tokenizer(text, add_special_tokens=False).input_ids
        last = model(input_ids=torch.tensor([token_ids])).logits[0, -1].double()
        o_m = last[ids[0]] - alpha_l * (len_1 if y1_first else len_2)  # 'm' names the response shown first
        o_big_m = last[ids[1]] - alpha_l * (len_2 if y1_first else len_1)
        p_m = torch.exp(o_m) / (torch.exp(o_m) + torch.exp(o_big_m))
        per_prompt.append(p_m if y1_first else 1 - p_m)
    return per_prompt


def brute_q(model, tokenizer, instruction, y1, y2, ids, alpha_l=0.0, len_1=None, len_2=None):
    """Q = P_grm(y1 > y2) (Eq. 5) averaged over the 4 judge prompts (section 3.3). Differentiable."""
    return sum(brute_q_prompts(model, tokenizer, instruction, y1, y2, ids, alpha_l, len_1, len_2)) / 4


def response_ids(tokenizer, prompt, response, finished=True):
    """(prompt ids, response ids [+ EOS]) of a chat turn; the response tokenized together with its prompt."""
    text = prompts.chat_prompt(tokenizer, prompt)
    p_ids = tokenizer(text, add_special_tokens=False).input_ids
    joint = tokenizer(text + response, add_special_tokens=False).input_ids
    if joint[:len(p_ids)] == p_ids:
        r_ids = joint[len(p_ids):]
    else:
        r_ids = tokenizer(response, add_special_tokens=False).input_ids
    return p_ids, r_ids + ([tokenizer.eos_token_id] if finished else [])


def brute_logp(model, tokenizer, prompt, response, finished=True):
    """log pi(y|x) of a response text (+ EOS)."""
    return brute_logp_ids(model, *response_ids(tokenizer, prompt, response, finished))


def brute_logp_ids(model, p_ids, r_ids):
    """log pi(y|x): one unpadded forward, log-softmax summed token by token over the response. Differentiable."""
    logits = model(input_ids=torch.tensor([p_ids + r_ids])).logits[0].double()
    total = 0
    for k, token in enumerate(r_ids):
        total = total + torch.log_softmax(logits[len(p_ids) - 1 + k], -1)[token]
    return total


class BoostHead(torch.nn.Module):
    """The LM head of a Rigged model: its weight is the inner head's [V, H] next to an identity [V, V], so the
    boost units add to the logits one to one and gradients still reach the inner head."""
    bias = None

    def __init__(self, inner_head):
        super().__init__()
        self.inner_head = inner_head
        self.register_buffer("eye", torch.eye(inner_head.weight.shape[0]))

    @property
    def weight(self):
        return torch.cat([self.inner_head.weight, self.eye.to(self.inner_head.weight.dtype)], 1)

    def forward(self, hidden):
        return torch.nn.functional.linear(hidden, self.weight)


class Rigged(torch.nn.Module):
    """Wraps a causal LM: adds boost(input_ids, attention_mask) [B, V] to the logits of the last position (the
    judge's answer position). The boost rides on V extra hidden units that BoostHead maps one to one onto the
    vocabulary, so a script that applies the head itself (get_decoder, get_output_embeddings) sees logits +
    boost there and the plain logits everywhere else."""

    def __init__(self, inner, boost):
        super().__init__()
        self.inner, self.boost = inner, boost
        self.head = BoostHead(inner.get_output_embeddings())

    @property
    def device(self):
        return self.inner.device

    def get_decoder(self):
        return self

    def get_output_embeddings(self):
        return self.head

    def forward(self, input_ids, attention_mask=None, **kwargs):
        hidden = self.inner.get_decoder()(input_ids=input_ids, attention_mask=attention_mask,
                                          **kwargs).last_hidden_state  # [B, L, H]
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        extra = torch.zeros(*hidden.shape[:2], self.head.eye.shape[0], dtype=hidden.dtype)
        extra[:, -1] = self.boost(input_ids, mask)
        hidden = torch.cat([hidden, extra], -1)
        return SimpleNamespace(last_hidden_state=hidden, logits=self.head(hidden))  # the brute force reads logits


def slot_boost(tokenizer, vocab_size, ids, favourites, size):
    """boost(...) for Rigged: +size on 'm' if the judge prompt shows the favourite of its pair first, else on 'M';
    favourites: [(favourite, other)]. Rows that are no judge prompt get no boost."""
    def boost(input_ids, attention_mask):
        out = torch.zeros(input_ids.shape[0], vocab_size)
        for row in range(input_ids.shape[0]):
            text = tokenizer.decode(input_ids[row][attention_mask[row].bool()])
            if not text.endswith("[["):
                continue
            for favourite, other in favourites:
                if favourite in text and other in text:
                    out[row, ids[0] if text.index(favourite) < text.index(other) else ids[1]] = size
        return out
    return boost


def grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


# ------------------------------------------------------------------------------------------------------------------
# 1. Eq. 6: consistency loss, value and gradients
# ------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("p, q, tau, p_on, q_on", [
    (0.6, 0.9, 0.7, False, True),    # only Q confident: only I(Q>tau)[KL(P||sg Q) + H(P)], gradient on p alone
    (0.9, 0.6, 0.7, True, False),    # only P confident: only I(P>tau)[KL(Q||sg P) + H(Q)], gradient on q alone
    (0.2, 0.85, 0.7, True, True),    # P < 0.5 is confident too: max(P, 1 - P) = 0.8
    (0.95, 0.04, 0.9, True, True),
    (0.55, 0.4, 0.7, False, False),  # neither: no loss, no gradient
    (0.7, 0.5, 0.7, False, False),   # the mask needs max(P, 1-P) strictly above tau
])
def test_consistency_loss_value_and_gradients(p, q, tau, p_on, q_on):
    value, d_p, d_q = eq6(p, q, tau)
    assert (d_q != 0) == p_on and (d_p != 0) == q_on  # the hand formula gates as the case says
    pt = torch.tensor([p], dtype=torch.float64, requires_grad=True)
    qt = torch.tensor([q], dtype=torch.float64, requires_grad=True)
    loss = scir.consistency_loss(pt, qt, tau)
    assert loss.shape == (1,)
    loss.sum().backward()
    assert loss.item() == pytest.approx(value, abs=1e-9)
    assert pt.grad.item() == pytest.approx(d_p, abs=1e-6)
    assert qt.grad.item() == pytest.approx(d_q, abs=1e-6)


def test_consistency_loss_hand_case_and_stop_gradient():
    # p = 0.6, q = 0.9, tau = 0.7: P is not confident, Q is, so only KL(P||Q) + H(P) = -0.6 log 0.9 - 0.4 log 0.1
    p, q = torch.tensor([0.6], dtype=torch.float64), torch.tensor([0.9], dtype=torch.float64)
    loss = scir.consistency_loss(p, q, 0.7)
    assert loss.item() == pytest.approx(-0.6 * math.log(0.9) - 0.4 * math.log(0.1), abs=1e-9)
    # both confident: without the stop-gradient, d/dp would also get d KL(Q||P)/dp = -q/p + (1-q)/(1-p)
    p, q = 0.8, 0.15
    pt = torch.tensor([p], dtype=torch.float64, requires_grad=True)
    qt = torch.tensor([q], dtype=torch.float64, requires_grad=True)
    scir.consistency_loss(pt, qt, 0.7).sum().backward()
    assert pt.grad.item() == pytest.approx(math.log((1 - q) / q), abs=1e-6)
    assert qt.grad.item() == pytest.approx(math.log((1 - p) / p), abs=1e-6)
    assert abs(-q / p + (1 - q) / (1 - p)) > 0.1  # so a missing stop-gradient would show


def test_consistency_loss_batch_is_elementwise():
    cases = [(0.6, 0.9), (0.9, 0.6), (0.2, 0.85), (0.55, 0.4), (0.99, 0.98)]
    pt = torch.tensor([c[0] for c in cases], dtype=torch.float64, requires_grad=True)
    qt = torch.tensor([c[1] for c in cases], dtype=torch.float64, requires_grad=True)
    loss = scir.consistency_loss(pt, qt, 0.7)
    loss.sum().backward()
    for k, (p, q) in enumerate(cases):
        value, d_p, d_q = eq6(p, q, 0.7)
        assert loss[k].item() == pytest.approx(value, abs=1e-9)
        assert pt.grad[k].item() == pytest.approx(d_p, abs=1e-6)
        assert qt.grad[k].item() == pytest.approx(d_q, abs=1e-6)


# ------------------------------------------------------------------------------------------------------------------
# 2. Eq. 4 (implicit reward preference) and Eq. 3 (DPO)
# ------------------------------------------------------------------------------------------------------------------
def test_implicit_preference_eq4():
    pi1, pi2 = torch.tensor([-10.0, -20.0, -5.0]), torch.tensor([-12.0, -15.0, -5.0])
    ref1, ref2 = torch.tensor([-11.0, -18.0, -7.0]), torch.tensor([-11.0, -16.0, -3.0])
    out = scir.implicit_preference(pi1, pi2, ref1, ref2, 0.1)
    expected = [sigmoid(0.1 * ((-10 + 11) - (-12 + 11))),   # sigmoid(0.2)
                sigmoid(0.1 * ((-20 + 18) - (-15 + 16))),   # sigmoid(-0.3)
                sigmoid(0.1 * ((-5 + 7) - (-5 + 3)))]       # sigmoid(0.4)
    assert out.tolist() == pytest.approx(expected, abs=1e-6)
    assert scir.implicit_preference(pi1, pi2, ref1, ref2, 1.0)[1].item() == pytest.approx(sigmoid(-3.0), abs=1e-6)


def test_dpo_loss_eq3_value_and_gradient():
    chosen = torch.tensor([-10.0, -30.0], dtype=torch.float64, requires_grad=True)
    rejected = torch.tensor([-12.0, -25.0], dtype=torch.float64, requires_grad=True)
    ref_c, ref_r = torch.tensor([-11.0, -29.0], dtype=torch.float64), torch.tensor([-11.0, -27.0], dtype=torch.float64)
    beta = 0.5
    loss = scir.dpo_loss(chosen, rejected, ref_c, ref_r, beta)
    z = [beta * ((-10 + 11) - (-12 + 11)), beta * ((-30 + 29) - (-25 + 27))]  # 1.0, -1.5
    assert loss.tolist() == pytest.approx([math.log(1 + math.exp(-zi)) for zi in z], abs=1e-9)
    loss.sum().backward()
    assert chosen.grad.tolist() == pytest.approx([-beta * (1 - sigmoid(zi)) for zi in z], abs=1e-9)
    assert rejected.grad.tolist() == pytest.approx([beta * (1 - sigmoid(zi)) for zi in z], abs=1e-9)


# ------------------------------------------------------------------------------------------------------------------
# 3. Section 3.3: the judge's probability with length regularisation o' = o - alpha_l |y|
# ------------------------------------------------------------------------------------------------------------------
def test_judge_probability_is_softmax_of_two_logits():
    a, b = torch.tensor([2.0, -1.0, 0.3]), torch.tensor([1.0, 0.5, 0.3])
    zeros = torch.zeros(3)
    out = scir.judge_probability(a, b, zeros, zeros, 0.0)
    expected = [math.exp(x) / (math.exp(x) + math.exp(y)) for x, y in zip(a.tolist(), b.tolist())]
    assert out.tolist() == pytest.approx(expected, abs=1e-6)


def test_judge_probability_length_regularisation():
    a, b = torch.tensor([2.0]), torch.tensor([1.0])
    plain = scir.judge_probability(a, b, torch.tensor([50.0]), torch.tensor([10.0]), 0.0).item()
    reg = scir.judge_probability(a, b, torch.tensor([50.0]), torch.tensor([10.0]), 0.02).item()
    # o'_first = 2 - 0.02 * 50 = 1.0, o'_second = 1 - 0.02 * 10 = 0.8
    assert reg == pytest.approx(math.exp(1.0) / (math.exp(1.0) + math.exp(0.8)), abs=1e-6)
    assert plain == pytest.approx(math.exp(2) / (math.exp(2) + math.exp(1)), abs=1e-6)
    assert reg < plain  # the longer first response loses probability
    # the longer second response: the first one gains
    assert scir.judge_probability(a, b, torch.tensor([10.0]), torch.tensor([50.0]), 0.02).item() > plain
    # equal lengths cancel
    same = scir.judge_probability(a, b, torch.tensor([37.0]), torch.tensor([37.0]), 0.5).item()
    assert same == pytest.approx(plain, abs=1e-6)


# ------------------------------------------------------------------------------------------------------------------
# 4. Eq. 5 and section 3.3: Q averaged over 2 templates x 2 orders
# ------------------------------------------------------------------------------------------------------------------
PAIRS = [  # (instruction, y1, y2) with responses of different lengths
    ("What is the capital of France?", "The capital of France is Paris.", "Berlin."),
    ("What do bees make?", "Cars.", "Bees make honey from the nectar of flowers."),
]


def test_generative_preference_position_biased_judge_gives_one_half(model, tok, ids_mM):
    def always_m(input_ids, attention_mask):  # the judge always names the response shown first
        boost = torch.zeros(input_ids.shape[0], model.config.vocab_size)
        boost[:, ids_mM[0]] = 100.0
        return boost

    rigged = Rigged(model, always_m)
    xs, y1s, y2s = zip(*PAIRS)
    with torch.no_grad():
        for alpha_l in (0.0, 0.05):
            q = scir.generative_preference(rigged, tok, list(xs), list(y1s), list(y2s), ids_mM, alpha_l, 700)
            assert q.mean(-1).tolist() == [0.5, 0.5]


def test_generative_preference_judge_that_prefers_one_response(model, tok, ids_mM):
    favourite = "The capital of France is Paris."
    other = "Berlin."

    rigged = Rigged(model, slot_boost(tok, model.config.vocab_size, ids_mM, [(favourite, other)], 30.0))
    with torch.no_grad():
        q = scir.generative_preference(rigged, tok, ["What is the capital of France?"] * 2, [favourite, other],
                                       [other, favourite], ids_mM, 0.0, 700).mean(-1)
    assert q[0].item() > 1 - 1e-6 and q[1].item() < 1e-6


def test_generative_preference_matches_unpadded_brute_force(model, tok, ids_mM):
    xs, y1s, y2s = map(list, zip(*PAIRS))
    with torch.no_grad():
        for alpha_l, lengths in ((0.0, None), (0.05, None), (0.05, ([3, 40], [25, 1]))):
            l1, l2 = lengths or (None, None)
            q = scir.generative_preference(model, tok, xs, y1s, y2s, ids_mM, alpha_l, 700, l1, l2).mean(-1)
            expected = [brute_q(model, tok, x, a, b, ids_mM, alpha_l, l1 and l1[k], l2 and l2[k]).item()
                        for k, (x, a, b) in enumerate(PAIRS)]
            assert q.tolist() == pytest.approx(expected, abs=2e-5)
    # the length regularisation is visible: y2 of pair 0 is shorter, so Q(y1 > y2) falls as alpha_l grows
    q0 = brute_q(model, tok, *PAIRS[0], ids_mM, 0.0).item()
    q5 = brute_q(model, tok, *PAIRS[0], ids_mM, 0.05).item()
    assert q5 < q0 - 0.01


# ------------------------------------------------------------------------------------------------------------------
# 5. Appendix A: adaptive reference
# ------------------------------------------------------------------------------------------------------------------
def test_adaptive_reference_logratio_takes_the_larger():
    # local log pi_ref(y_w)/pi_ref(y_l) = -5 - (-7) = 2, global = -6 - (-6) = 0 -> 2 (local)
    # local = -5 - (-5) = 0, global = -4 - (-9) = 5 -> 5 (global)
    # local = -9 - (-6) = -3, global = -8 - (-7) = -1 -> -1 (global, both negative)
    out = scir.adaptive_reference_logratio(torch.tensor([-5.0, -5.0, -9.0]), torch.tensor([-7.0, -5.0, -6.0]),
                                           torch.tensor([-6.0, -4.0, -8.0]), torch.tensor([-6.0, -9.0, -7.0]))
    assert out.tolist() == [2.0, 5.0, -1.0]


# ------------------------------------------------------------------------------------------------------------------
# 6. Eq. 7: DCPO on agreeing pairs + alpha * consistency
# ------------------------------------------------------------------------------------------------------------------
def hand_scir(pi1, pi2, g1, g2, l1, l2, q, beta, alpha, tau):
    """Eq. 7 for one pair by hand: returns (loss, agree, dpo, d loss/d pi1, d loss/d pi2, d loss/d q)."""
    p = sigmoid(beta * ((pi1 - g1) - (pi2 - g2)))  # Eq. 4, global reference
    agree = (p > 0.5) == (q > 0.5)
    if p > 0.5:   # IRM's winner is the chosen response
        pc, pr, lc, lr, gc, gr, sign = pi1, pi2, l1, l2, g1, g2, 1
    else:
        pc, pr, lc, lr, gc, gr, sign = pi2, pi1, l2, l1, g2, g1, -1
    ref = max(lc - lr, gc - gr)          # Appendix A
    z = beta * ((pc - pr) - ref)         # Eq. 3
    dpo = math.log(1 + math.exp(-z))
    cons, d_p, d_q = eq6(p, q, tau)
    d_dpo_dc = -beta * (1 - sigmoid(z))  # d dpo / d pi_chosen; d / d pi_rejected is the negative
    dp_dpi1 = beta * p * (1 - p)
    d_pi1 = agree * d_dpo_dc * sign + alpha * d_p * dp_dpi1
    d_pi2 = -agree * d_dpo_dc * sign - alpha * d_p * dp_dpi1
    return agree * dpo + alpha * cons, float(agree), dpo, d_pi1, d_pi2, alpha * d_q


def eq7(pi1, pi2, g1, g2, l1, l2, q, beta, alpha, tau):
    """scir_loss with P of Eq. 4 under the global reference, composed as the training step does."""
    p_irm = scir.implicit_preference(pi1, pi2, g1, g2, beta)
    return scir.scir_loss(pi1, pi2, p_irm, q, l1, l2, g1, g2, beta, alpha, tau)


def test_scir_loss_eq7_hand_cases():
    beta, alpha, tau = 0.5, 0.5, 0.7
    cases = [  # pi1, pi2, g1, g2, l1, l2, q
        (-10.0, -12.0, -9.0, -13.0, -10.0, -10.0, 0.8),  # P = sigmoid(-1) < 0.5, Q > 0.5: disagree
        (-12.0, -9.0, -10.0, -10.0, -11.0, -10.5, 0.25),  # both prefer y2; local ratio 0.5 beats global 0
        (-8.0, -11.0, -10.0, -12.0, -9.0, -9.5, 0.9),    # both prefer y1; global ratio 2 beats local 0.5
        (-8.0, -20.0, -10.0, -12.0, -9.0, -9.5, 0.1),    # P confident for y1, Q confident for y2: disagree
    ]
    cols = list(zip(*cases))
    t = lambda k, grad=False: torch.tensor(cols[k], dtype=torch.float64, requires_grad=grad)
    pi1, pi2, q = t(0, True), t(1, True), t(6, True)
    out = eq7(pi1, pi2, t(2), t(3), t(4), t(5), q, beta, alpha, tau)
    out["loss"].sum().backward()
    for k, case in enumerate(cases):
        loss, agree, dpo, d_pi1, d_pi2, d_q = hand_scir(*case, beta, alpha, tau)
        assert out["agree"][k].item() == agree
        assert out["loss"][k].item() == pytest.approx(loss, abs=1e-9)
        if agree:
            assert out["dpo_loss"][k].item() == pytest.approx(dpo, abs=1e-9)
        assert pi1.grad[k].item() == pytest.approx(d_pi1, abs=1e-6)
        assert pi2.grad[k].item() == pytest.approx(d_pi2, abs=1e-6)
        assert q.grad[k].item() == pytest.approx(d_q, abs=1e-6)
    assert [hand_scir(*c, beta, alpha, tau)[1] for c in cases] == [0.0, 1.0, 1.0, 0.0]
    # disagreeing pair: the loss is alpha * consistency only
    p0 = sigmoid(beta * ((-10 + 9) - (-12 + 13)))
    assert out["loss"][0].item() == pytest.approx(alpha * eq6(p0, 0.8, tau)[0], abs=1e-9)
    # agreeing on y2: chosen is y2 and the reference ratio is the local one, 0.5
    assert out["dpo_loss"][1].item() == pytest.approx(math.log(1 + math.exp(-beta * ((-9 + 12) - 0.5))), abs=1e-9)
    # agreeing on y1: chosen is y1 and the reference ratio is the global one, 2
    assert out["dpo_loss"][2].item() == pytest.approx(math.log(1 + math.exp(-beta * ((-8 + 11) - 2))), abs=1e-9)


# ------------------------------------------------------------------------------------------------------------------
# 7. Gradients reach the policy through the DPO term and through the judge (Q)
#    (scir.sequence_logps is checked here and in the e2e test against brute_logp's token-by-token sums)
# ------------------------------------------------------------------------------------------------------------------
TRAIN_PAIRS = [
    ("What is 2 + 3?", "2 + 3 = 5.", "It is 7."),
    ("Name a primary color.", "Red.", "Red is a primary color, and so is blue."),
]


def make_pairs(tok):
    """TRAIN_PAIRS as scir.py's pairs: each response with its ids as if sampled (EOS included)."""
    pairs = []
    for prompt, r1, r2 in TRAIN_PAIRS:
        pair = {"prompt": prompt, **{
            key: {"response": r, "finished": True, "token_ids": response_ids(tok, prompt, r)[1]}
            for key, r in (("response_1", r1), ("response_2", r2))}}
        pair["sequences"] = scir.pair_sequences(tok, pair, 700)
        pairs.append(pair)
    return pairs


def test_judge_path_alone_has_gradient(model, tok, ids_mM):
    xs, y1s, y2s = map(list, zip(*TRAIN_PAIRS))
    q = scir.generative_preference(model, tok, xs, y1s, y2s, ids_mM, 0.02, 700).mean(-1)
    q.sum().backward()
    code = grads(model)
    model.zero_grad(set_to_none=True)
    expected_q = sum(brute_q(model, tok, x, a, b, ids_mM, 0.02) for x, a, b in TRAIN_PAIRS)
    expected_q.backward()
    brute = grads(model)
    assert q.sum().item() == pytest.approx(expected_q.item(), abs=2e-5)
    lm_head = code["lm_head.weight"]
    # only the rows of 'm' and 'M' enter Q
    nonzero_rows = sorted(set(lm_head.abs().sum(-1).nonzero()[:, 0].tolist()))
    assert nonzero_rows == sorted(ids_mM)
    assert code["model.embed_tokens.weight"].abs().sum() > 0
    assert set(code) == set(brute)
    for name in brute:
        torch.testing.assert_close(code[name], brute[name].to(code[name].dtype), rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("term", ["dpo", "dpo_local", "consistency"])
def test_scir_batch_loss_gradients_reach_the_policy(model, tok, ids_mM, term):
    """A micro-batch of 2 pairs through scir_batch_loss (pair_forward + scir_loss), against the same Eq. 7 written
    by hand on brute-force log-probs and Q: loss and every parameter gradient.

    The random judge is nudged (+0.6 on the identifier of a favourite response) so that Q is clearly off 0.5
    (0.65 for y1 in pair 0, 0.35 in pair 1) but not confident (< tau): the pairs' agreement is then decided by P alone.
    "dpo_local" is Table 4's --no_adaptive_reference: the reference ratio is the local one, not the larger.
    """
    beta = 0.1
    dpo_term = term.startswith("dpo")
    args = SimpleNamespace(max_length=700, beta=beta, alpha=0.0 if dpo_term else 1.0, tau=0.7,
                           single_judge_prompt=False, no_consistency_loss=False, no_dcpo=False,
                           no_adaptive_reference=term == "dpo_local")
    favourites = [(TRAIN_PAIRS[0][1], TRAIN_PAIRS[0][2]), (TRAIN_PAIRS[1][2], TRAIN_PAIRS[1][1])]
    judge = Rigged(model, slot_boost(tok, model.config.vocab_size, ids_mM, favourites, 0.6))
    pairs = make_pairs(tok)
    with torch.no_grad():
        logp = [(brute_logp(model, tok, x, a).item(), brute_logp(model, tok, x, b).item()) for x, a, b in TRAIN_PAIRS]
        qs = [brute_q(judge, tok, x, a, b, ids_mM).item() for x, a, b in TRAIN_PAIRS]
    assert 0.6 < qs[0] < 0.7 and 0.3 < qs[1] < 0.4
    targets = []
    for pair, (l1, l2), q in zip(pairs, logp, qs):
        # global reference shifted by 20 nats: P = sigmoid(+-2) = 0.88 or 0.12, confident, on Q's side for the
        # DPO case, against it for the consistency case
        y1_wins = (q > 0.5) == dpo_term
        shift = 20.0 if y1_wins else -20.0
        pair.update(global_logp_1=l1 - shift, global_logp_2=l2, local_logp_1=l1 + 1.0, local_logp_2=l2 - 0.5)
        if term == "dpo_local":  # a local ratio 5 below the global one: Appendix A would take the global
            chosen, rejected = ("1", "2") if y1_wins else ("2", "1")
            pair[f"local_logp_{chosen}"] = pair[f"global_logp_{chosen}"] - 5.0
            pair[f"local_logp_{rejected}"] = pair[f"global_logp_{rejected}"]
        targets.append(y1_wins)

    loss_fn = scir.scir_batch_loss(args, tok, ids_mM, 0.0)
    metrics, detached = loss_fn(judge, pairs)
    scir.backward(judge, metrics["loss"], detached)  # as train does: one backward per forward pass
    code = grads(model)
    model.zero_grad(set_to_none=True)
    assert metrics["dcpo_fraction"].item() == (1.0 if dpo_term else 0.0)

    total = 0
    for pair, (x, a, b), y1_wins in zip(pairs, TRAIN_PAIRS, targets):
        pi1, pi2 = brute_logp(model, tok, x, a), brute_logp(model, tok, x, b)
        g1, g2, l1, l2 = (pair[k] for k in ("global_logp_1", "global_logp_2", "local_logp_1", "local_logp_2"))
        if dpo_term:  # alpha = 0: only the DPO term on the agreed winner with the adaptive reference
            pc, pr, ref = (pi1, pi2, max(l1 - l2, g1 - g2)) if y1_wins else (pi2, pi1, max(l2 - l1, g2 - g1))
            if term == "dpo_local":
                ref = (l1 - l2) if y1_wins else (l2 - l1)
            total = total - torch.nn.functional.logsigmoid(beta * ((pc - pr) - ref))
        else:  # disagreement, no DPO; P confident, Q not: only KL(Q||sg P) + H(Q) = -Q log P - (1-Q) log(1-P),
            # linear in Q, P a constant
            p = sigmoid(beta * ((pi1.item() - g1) - (pi2.item() - g2)))
            assert max(p, 1 - p) > 0.7
            q = brute_q(judge, tok, x, a, b, ids_mM)
            total = total - (q * math.log(p) + (1 - q) * math.log(1 - p))
    total = total / len(pairs)
    assert metrics["loss"].item() == pytest.approx(total.item(), rel=1e-4, abs=1e-6)
    total.backward()
    brute = grads(model)
    assert set(code) == set(brute)
    assert sum(g.abs().sum().item() for g in code.values()) > 0
    for name in brute:
        torch.testing.assert_close(code[name], brute[name].to(code[name].dtype), rtol=2e-3, atol=1e-6)
    rows = sorted(set(code["lm_head.weight"].abs().sum(-1).nonzero()[:, 0].tolist()))
    if term == "consistency":  # only the judge's answer position is read: lm_head rows m and M only
        assert rows == sorted(ids_mM)
    else:  # the DPO term reads the response tokens' log-softmax: every row
        assert len(rows) == model.config.vocab_size


# ------------------------------------------------------------------------------------------------------------------
# 9. judge_inputs: the 4 prompts end in '[[', fit max_length, cut long responses
# ------------------------------------------------------------------------------------------------------------------
def test_judge_inputs_short_responses(tok):
    x, y1, y2 = "What is 2 + 3?", "Five, since 2 + 3 = 5.", "Seven."
    inputs = scir.judge_inputs(tok, x, y1, y2, 700)
    assert [flag for _, flag in inputs] == [True, False, True, False]
    expected = [tok(text, add_special_tokens=False).input_ids for text, _ in judge_texts(tok, x, y1, y2)]
    assert [ids for ids, _ in inputs] == expected
    bracket = tok("[[", add_special_tokens=False).input_ids
    for ids, y1_first in inputs:
        assert ids[-len(bracket):] == bracket
        text = tok.decode(ids)
        assert (text.index(y1) < text.index(y2)) == y1_first


def test_judge_inputs_keep_a_response_that_fits_as_given(tok):
    """A sampled response may end in U+FFFD (half a character decoded): only a cut may drop it, so Q judges the
    text the pair holds."""
    x, y1, y2 = "Say something.", "honey\ufffd", "\ufffdbees \ufffd"
    inputs = scir.judge_inputs(tok, x, y1, y2, 700)
    expected = [tok(text, add_special_tokens=False).input_ids for text, _ in judge_texts(tok, x, y1, y2)]
    assert [ids for ids, _ in inputs] == expected


@pytest.mark.parametrize("max_length", [330, 400, 517])
def test_judge_inputs_cut_long_responses(tok, max_length):
    x = "Describe the fox."
    y1 = " ".join(f"fox{k}" for k in range(400))  # ~1,200 tokens
    y2 = "Short answer."
    bracket = tok("[[", add_special_tokens=False).input_ids
    inputs = scir.judge_inputs(tok, x, y1, y2, max_length)
    assert [flag for _, flag in inputs] == [True, False, True, False]
    for ids, y1_first in inputs:
        assert len(ids) <= max_length
        assert ids[-len(bracket):] == bracket
        text = tok.decode(ids)
        assert ids[0] == tok.bos_token_id  # nothing cut from the front
        assert any(text.startswith(prompts.chat_prompt(tok, t)[:80]) for t in prompts.PAIRWISE_JUDGE_TEMPLATES)
        assert y1 not in text and "fox0 fox1 fox2" in text  # y1 cut, its beginning kept
        assert y2 in text
        assert (text.index("fox0") < text.index(y2)) == y1_first
        assert x in text


def test_judge_inputs_cut_inside_multibyte_characters_keeps_the_prompt_start(tok):
    x = "Translate to Japanese."
    y1, y2 = "日本語のテキスト" * 60, "ß" * 300
    for max_length in range(330, 530, 7):
        for ids, _ in scir.judge_inputs(tok, x, y1, y2, max_length):
            assert len(ids) <= max_length
            assert ids[0] == tok.bos_token_id, f"max_length {max_length}: {tok.decode(ids[:8])!r}"


# ------------------------------------------------------------------------------------------------------------------
# 10. Judge SFT data (Appendix C.1): 4 examples per preference pair, target names the chosen response
# ------------------------------------------------------------------------------------------------------------------
JUDGE_ROWS = [  # (prompt, chosen, rejected)
    ("What is the capital of France?", "The capital of France is Paris.", "Berlin is nice."),
    ("How many legs does a spider have?", "A spider has eight legs.", "Two legs."),
    ("What is the opposite of cold?", "The opposite of cold is hot.", "Cold again."),
]


def test_judge_sft_examples(tok):
    rows = [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in JUDGE_ROWS]
    examples = scir.judge_sft_examples(tok, rows, 2, 3, 700)
    assert len(examples) == 8
    bracket = tok("[[", add_special_tokens=False).input_ids
    used = set()
    for k in range(0, 8, 4):
        group = [(tok.decode(ids), tok.decode(target)) for ids, target in examples[k: k + 4]]
        row = next(r for r in rows if r["prompt"] in group[0][0])
        used.add(row["prompt"])
        for n, (text, target) in enumerate(group):
            ids = examples[k + n][0]
            assert ids[-len(bracket):] == bracket  # the prompt ends where the judge is read
            assert text.startswith(prompts.chat_prompt(tok, prompts.PAIRWISE_JUDGE_TEMPLATES[n // 2][:60])[:60])
            chosen_first = text.index(row["chosen"]) < text.index(row["rejected"])
            assert chosen_first == (n % 2 == 0)  # the order alternates
            assert target == ("m]]" if chosen_first else "M]]") + tok.eos_token  # names the chosen response
            # its first token is the identifier token read at the judge's answer position
            assert examples[k + n][1][0] == prompts.identifier_token_ids(tok)[0 if chosen_first else 1]
    assert len(used) == 2
    assert len(scir.judge_sft_examples(tok, rows, 10, 3, 700)) == 4 * len(rows)  # never more pairs than exist


def test_judge_sft_examples_cut_long_responses_instead_of_dropping_them(tok):
    """A judge pair too long for --max_length was dropped from SFT; it is cut as the judge's own
    prompts are cut, so all 4 examples stay, each within max_length with its target.
    (README, 'Departures from the papers and the official code': responses inside judge
    prompts are cut to fit --max_length.)"""
    chosen = " ".join(f"fox{k}" for k in range(400))  # ~1,200 tokens
    rows = [{"prompt": "Describe the fox.", "chosen": chosen, "rejected": "Short answer."}]
    for max_length in (330, 517):
        examples = scir.judge_sft_examples(tok, rows, 1, 0, max_length)
        assert len(examples) == 4
        for n, (ids, target) in enumerate(examples):
            assert len(ids) + len(target) <= max_length
            text = tok.decode(ids)
            assert "Short answer." in text and "fox0 fox1" in text and chosen not in text
            assert tok.decode(target) == ("m]]" if n % 2 == 0 else "M]]") + tok.eos_token


def test_judge_inputs_give_the_long_response_what_the_short_one_leaves(tok):
    """Each response got half the room even when the other was short. Now the short one is kept
    whole and the long one fills the rest, so the prompt reaches max_length (re-encoding may leave a
    token). (README, 'Departures from the papers and the official code': responses inside judge
    prompts are cut to fit --max_length.)"""
    x, y_short = "Describe the fox.", "Short answer."
    y_long = " ".join(f"fox{k}" for k in range(400))
    overhead = max(len(tok(prompts.chat_prompt(tok, text) + "[[", add_special_tokens=False).input_ids)
                   for text, _ in prompts.judge_prompts(x, "", ""))
    short_tokens = len(tok(y_short, add_special_tokens=False).input_ids)
    for max_length in (330, 400, 517):
        assert (max_length - overhead) // 2 > short_tokens + 20  # the old half split would stop well short
        for y1, y2 in ((y_long, y_short), (y_short, y_long)):
            inputs = scir.judge_inputs(tok, x, y1, y2, max_length)
            assert max(len(ids) for ids, _ in inputs) >= max_length - 3
            for ids, _ in inputs:
                assert len(ids) <= max_length and y_short in tok.decode(ids)


# ------------------------------------------------------------------------------------------------------------------
# 11. End to end through the CLI, resume, and the demo
# ------------------------------------------------------------------------------------------------------------------
def snapshot(folder):
    return {str(p.relative_to(folder)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(Path(folder).rglob("*")) if p.is_file()}


# beta 5 (not 0.1): after one tiny SFT some P are confident (> tau), so every iteration has a consistency loss > 0
# and changes the model
E2E_BETA = 5.0
E2E_FLAGS = ["--iterations", 2, "--num_prompts", 3, "--num_samples", 3, "--max_new_tokens", 8, "--max_length", 700,
             "--sft_epochs", 1, "--judge_pairs", 2, "--sft_examples", 4, "--batch_size", 2, "--grad_accum", 1,
             "--dtype", "float32", "--sft_lr", 1e-3, "--lr", 1e-3, "--length_reg_from", 2, "--length_reg", 0.05,
             "--beta", E2E_BETA]


@pytest.fixture(scope="module")
def e2e(tiny_model_dir, data_dir, run_script, tmp_path_factory):
    out = tmp_path_factory.mktemp("scir-e2e") / "run"
    command = ["--model", tiny_model_dir, "--data_dir", data_dir, "--output_dir", out, *E2E_FLAGS]
    start = time.monotonic()
    first = run_script("scir.py", *command)
    first_s = time.monotonic() - start
    assert first.returncode == 0, first.stderr[-3000:]
    before = snapshot(out)
    start = time.monotonic()
    second = run_script("scir.py", *command)
    second_s = time.monotonic() - start
    return SimpleNamespace(out=out, first=first, second=second, first_s=first_s, second_s=second_s, before=before,
                           after=snapshot(out))


def load(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def test_e2e_models_and_metrics(e2e, tiny_model_dir, data_dir, tok):
    out = e2e.out
    states = {name: load(path).state_dict() for name, path in
              (("base", tiny_model_dir), ("M0", out / "M0"), ("M1", out / "M1"), ("M2", out / "M2"))}
    for a, b in (("base", "M0"), ("M0", "M1"), ("M1", "M2")):
        assert states[a].keys() == states[b].keys()
        assert any(not torch.equal(states[a][k], states[b][k]) for k in states[a]), f"{a} == {b}"
    assert not (out / "M3").exists()
    metrics = read_jsonl(out / "metrics.jsonl")
    assert [(m["model"], m["iteration"]) for m in metrics] == [("M0", 0), ("M1", 1), ("M2", 2)]
    assert metrics[0]["loss"] is None and metrics[0]["consistency_trained"] is None  # M0 was not trained on pairs
    assert metrics[2]["response_length"] is None and metrics[2]["consistency_new"] is None  # M2 sampled nothing

    for t in (1, 2):  # iteration t: M_{t-1} samples D_{t-1} (row t-1), training gives M_t (row t)
        before, after = metrics[t - 1], metrics[t]
        pairs = read_jsonl(out / f"iter{t}" / "pairs.jsonl")
        samples = read_jsonl(out / f"iter{t}" / "samples.jsonl")
        assert len(pairs) == len(samples) == after["pairs"] == 3
        agree = [r["label_irm_end"] == r["label_grm_end"] for r in pairs]
        assert after["consistency_rate"] == pytest.approx(sum(agree) / len(pairs))
        assert 0 <= after["dcpo_fraction"] <= 1
        assert after["loss"] > 0  # so M_t -> M_t+1 had gradients
        lengths = [len(s["token_ids"]) for row in samples for s in row["samples"]]
        assert before["response_length"] == pytest.approx(sum(lengths) / len(lengths))
    # fresh prompts every iteration, each sampled num_samples times
    prompts_seen = [row["prompt"] for t in (1, 2) for row in read_jsonl(out / f"iter{t}" / "samples.jsonl")]
    assert len(set(prompts_seen)) == 6
    assert set(prompts_seen) <= {row["prompt"] for row in read_jsonl(Path(data_dir) / "prompts.jsonl")}
    for t in (1, 2):
        for row in read_jsonl(out / f"iter{t}" / "samples.jsonl"):
            assert len(row["samples"]) == 3
            assert row["response_1"] in row["samples"] and row["response_2"] in row["samples"]
            for s in row["samples"]:
                ids = s["token_ids"]
                assert 1 <= len(ids) <= 8
                assert s["finished"] == (ids[-1] == tok.eos_token_id)
                assert s["response"] == tok.decode(ids[:-1] if s["finished"] else ids, skip_special_tokens=True)


def test_e2e_p_and_q_match_brute_force(e2e, tiny_model_dir, tok, ids_mM):
    """P (Eq. 4, global reference = the base model, log-probs of the sampled ids) and Q (Eq. 5, 4 prompts; length
    regularisation from iteration 2 on, |y| = sampled tokens) recomputed from the saved models M0, M1, M2."""
    out, beta = e2e.out, E2E_BETA
    models = {"base": load(tiny_model_dir), **{f"M{k}": load(out / f"M{k}") for k in range(3)}}
    metrics = read_jsonl(out / "metrics.jsonl")
    with torch.no_grad():
        for t, alpha_l in ((1, 0.0), (2, 0.05)):
            samples = {row["id"]: row for row in read_jsonl(out / f"iter{t}" / "samples.jsonl")}
            new, trained = [], []  # (P, Q per prompt) of M_{t-1} and of M_t on D_{t-1}, each judging with its own alpha_l
            for row in read_jsonl(out / f"iter{t}" / "pairs.jsonl"):
                s = samples[row["id"]]
                y1, y2 = s["response_1"], s["response_2"]
                assert (row["response_1"], row["response_2"]) == (y1["response"], y2["response"])

                p_ids = tok(prompts.chat_prompt(tok, row["prompt"]), add_special_tokens=False).input_ids

                def logps(name):
                    return [brute_logp_ids(models[name], p_ids, y["token_ids"]).item() for y in (y1, y2)]

                g = logps("base")
                for when, name in (("start", f"M{t - 1}"), ("end", f"M{t}")):
                    pi = logps(name)
                    p = sigmoid(beta * ((pi[0] - g[0]) - (pi[1] - g[1])))
                    q = [v.item() for v in brute_q_prompts(models[name], tok, row["prompt"], y1["response"],
                                                           y2["response"], ids_mM, alpha_l, len(y1["token_ids"]),
                                                           len(y2["token_ids"]))]
                    assert row[f"p_{when}"] == pytest.approx(p, abs=1e-4), (t, when)
                    assert row[f"q_prompts_{when}"] == pytest.approx(q, abs=1e-4), (t, when)
                    assert row[f"q_{when}"] == pytest.approx(sum(q) / 4, abs=1e-4), (t, when)
                    own_alpha = 0.05 if int(name[1:]) + 1 >= 2 else 0.0  # --length_reg_from 2: M1 on judges with it
                    (new if when == "start" else trained).append((p, [v.item() for v in brute_q_prompts(
                        models[name], tok, row["prompt"], y1["response"], y2["response"], ids_mM, own_alpha,
                        len(y1["token_ids"]), len(y2["token_ids"]))]))
            # Table 1 / Figure 2 by hand: pairs whose 4 judge prompts all prefer one response, share where P agrees
            for measured, row, key in ((new, metrics[t - 1], "new"), (trained, metrics[t], "trained")):
                counted = [(p, qs) for p, qs in measured if (min(qs) > 0.5 or max(qs) < 0.5) and p != 0.5]
                agreed = [1 for p, qs in counted if (p > 0.5) == (qs[0] > 0.5)]
                assert row[f"counted_{key}"] == len(counted), (t, key)
                assert row[f"consistency_{key}"] == (pytest.approx(len(agreed) / len(counted)) if counted else None)


def test_e2e_rerun_resumes_without_changes(e2e):
    assert e2e.second.returncode == 0, e2e.second.stderr[-3000:]
    # same files, same contents
    assert {k: v[0] for k, v in e2e.after.items()} == {k: v[0] for k, v in e2e.before.items()}
    # models, samples and pairs are not even rewritten
    for name, (digest, mtime) in e2e.before.items():
        if name not in ("metrics.jsonl", "args.json", "table.md"):
            assert e2e.after[name] == (digest, mtime), name
    assert e2e.second_s < e2e.first_s


def test_demo_runs(run_script, tmp_path):
    result = run_script("scir.py", "--demo", "--output_dir", tmp_path / "demo", timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = read_jsonl(tmp_path / "demo" / "metrics.jsonl")
    assert [m["model"] for m in metrics] == ["M0", "M1", "M2", "M3"]
    for k in range(4):
        assert (tmp_path / "demo" / f"M{k}" / "config.json").is_file()


# ------------------------------------------------------------------------------------------------------------------
# 12. Bad inputs: one line on stderr, "scir.py: error: ..." naming the culprit, no traceback
# ------------------------------------------------------------------------------------------------------------------
# no regex split, so the BPE learns '[[m' and '[[M' as tokens: 'm' is no token of its own after '[['
BRACKET_CORPUS = ["[[m" * 50, "[[M" * 20]

# Subprocesses: the cases where a library raises (model, tokenizer, datasets) plus one data error and one flag error,
# so the one-line message is checked as a user sees it. The other data errors go through scir.main in-process:
# sys.exit(message) is what prints that line, and any other exception would fail the test.
SUBPROCESS_CASES = ["broken_model", "missing_model", "offline_hub", "bracket_tokenizer", "bad_line", "one_sample"]
IN_PROCESS_CASES = ["not_a_model", "missing_data_dir", "missing_judge", "empty_prompts", "bad_line", "one_sample"]


@pytest.fixture(scope="module")
def bad_cases(tiny_model_dir, data_dir, tmp_path_factory):
    """name -> (argv, culprits the message must name, extra environment, output folder)."""
    root = tmp_path_factory.mktemp("scir-bad")

    def data_variant(name, edit):
        folder = root / name
        folder.mkdir()
        for f in ("sft.jsonl", "judge.jsonl", "prompts.jsonl"):
            (folder / f).write_bytes((Path(data_dir) / f).read_bytes())
        edit(folder)
        return folder

    broken_model = root / "broken-model"  # tokenizer and config fine, weights not
    broken_model.mkdir()
    for f in Path(tiny_model_dir).iterdir():
        if f.name != "model.safetensors":
            (broken_model / f.name).write_bytes(f.read_bytes())
    (broken_model / "model.safetensors").write_bytes(b"this is not a safetensors file")
    not_a_model = root / "not-a-model"
    not_a_model.mkdir()
    (not_a_model / "config.json").write_text("{ not json")
    merged = root / "bracket-m-tokenizer"
    byte_level_tokenizer(BRACKET_CORPUS, 262, use_regex=False).save_pretrained(merged)
    missing_judge = data_variant("no-judge", lambda d: (d / "judge.jsonl").unlink())
    bad_line = data_variant("bad-line", lambda d: (d / "prompts.jsonl").write_text(
        '{"prompt": "fine"}\n{"prompt": "broken"\n{"prompt": "fine"}\n'))
    empty = data_variant("empty-prompts", lambda d: (d / "prompts.jsonl").write_text(""))
    hf_home = root / "hf-home"  # an empty cache: nothing to fall back on offline

    cases = {
        "broken_model": (["--model", broken_model, "--data_dir", data_dir], [str(broken_model)], {}),
        "not_a_model": (["--model", not_a_model, "--data_dir", data_dir], [str(not_a_model)], {}),
        "missing_model": (["--model", root / "nowhere", "--data_dir", data_dir], [str(root / "nowhere")], {}),
        "missing_data_dir": (["--model", tiny_model_dir, "--data_dir", root / "no-data"], [str(root / "no-data")], {}),
        "missing_judge": (["--model", tiny_model_dir, "--data_dir", missing_judge], [str(missing_judge / "judge.jsonl")],
                          {}),
        "bad_line": (["--model", tiny_model_dir, "--data_dir", bad_line], [f"{bad_line / 'prompts.jsonl'}:2"], {}),
        "empty_prompts": (["--model", tiny_model_dir, "--data_dir", empty], [str(empty / "prompts.jsonl")], {}),
        "one_sample": (["--model", tiny_model_dir, "--data_dir", data_dir, "--num_samples", 1], ["--num_samples"], {}),
        "offline_hub": (["--model", tiny_model_dir], ["tatsu-lab/alpaca", "--data_dir"],
                        {"HF_HOME": str(hf_home), "HF_DATASETS_CACHE": str(hf_home / "datasets")}),
        "bracket_tokenizer": (["--model", merged, "--data_dir", data_dir], [str(merged)], {}),
    }
    small = ["--iterations", 1, "--num_prompts", 2, "--max_new_tokens", 4, "--max_length", 700, "--sft_epochs", 1,
             "--judge_pairs", 1, "--dtype", "float32"]
    return {name: ([*map(str, argv), "--output_dir", str(root / f"out-{name}"), *map(str, small)], culprits, env,
                   root / f"out-{name}") for name, (argv, culprits, env) in cases.items()}


@pytest.fixture(scope="module")
def bad_runs(bad_cases, start_script):
    """The subprocess cases, all started at once (they spend most of their time importing torch)."""
    started = {name: start_script("scir.py", *bad_cases[name][0], timeout=240, env=bad_cases[name][2])
               for name in SUBPROCESS_CASES}
    return {name: run.result() for name, run in started.items()}


def check_error_line(line, culprits, out):
    assert line.startswith("scir.py: error: ")
    for culprit in culprits:
        assert culprit in line
    assert not (out / "M0").exists()


@pytest.mark.parametrize("case", SUBPROCESS_CASES)
def test_bad_input_cli_one_line_error(bad_cases, bad_runs, case):
    result = bad_runs[case]
    returncode, stdout, stderr = result.returncode, result.stdout, result.stderr
    assert returncode != 0
    assert "Traceback" not in stderr + stdout
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    check_error_line(lines[0], bad_cases[case][1], bad_cases[case][3])


@pytest.mark.parametrize("case", IN_PROCESS_CASES)
def test_bad_input_main_exits_with_one_line(bad_cases, case):
    argv, culprits, _, out = bad_cases[case]
    with pytest.raises(SystemExit) as info:
        scir.main(argv)
    message = info.value.code
    assert isinstance(message, str) and "\n" not in message  # printed as one line, exit status 1
    check_error_line(message, culprits, out)


def test_bracket_tokenizer_really_merges():
    """The tokenizer of the 'bracket_tokenizer' case has no 'm' token of its own after '[['."""
    tokenizer = byte_level_tokenizer(BRACKET_CORPUS, 262, use_regex=False)
    assert "[[m" in tokenizer.get_vocab()
    with pytest.raises(ValueError):
        prompts.identifier_token_ids(tokenizer)


def test_a_tie_in_either_reward_model_is_not_agreement():
    """DCPO trains only on pairs both reward models rank the same way; Q = 0.5 exactly (a judge with no
    preference, e.g. one that always names the first slot) ranks nothing, so no DPO term, whatever P says."""
    zeros = torch.zeros(3)
    policy_1 = torch.tensor([-1.0, 1.0, 1.0])  # P < 0.5, P > 0.5, P > 0.5 (global reference 0)
    p_grm = torch.tensor([0.5, 0.5, 0.9])
    terms = eq7(policy_1, zeros, zeros, zeros, zeros, zeros, p_grm, beta=1.0, alpha=1.0, tau=0.7)
    assert terms["agree"].tolist() == [0.0, 0.0, 1.0]
