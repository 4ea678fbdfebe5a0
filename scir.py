"""SCIR: Self-Consistent Internal Rewards (Zhou et al., arXiv 2502.08922) on one GPU, or several.

    python scir.py --model mistralai/Mistral-7B-v0.3                # the paper's setup, 80 GB
    python scir.py --model mistralai/Mistral-7B-Instruct-v0.3 --judge_sft_only \\
        --global_reference mistralai/Mistral-7B-v0.3                # strong SFT (Table 3)
    python scir.py --method external                                # Table 2's Skywork baseline
    python scir.py --demo                                           # offline, tiny model, CPU
    torchrun --nproc_per_node 8 scir.py --model mistralai/Mistral-7B-v0.3  # 8 GPUs (README)

SFT gives M0 (section 4.1, Appendix C.1). Each iteration, M_t samples 4 responses per fresh
prompt and two of them form an unlabeled pair. Training M_t -> M_{t+1} computes at every step the
implicit reward's P (Eq. 4) and the judge's Q (Eq. 5, section 3.3), the consistency loss between
them (Eq. 6), and DPO on the pairs both agree on (Eq. 7) with the adaptive reference (App. A).

The file reads top-down in three parts: the paper (Args, the equations, the loop of section 4.1
and its steps), beyond the paper (Table 1's analyses, Table 2's baselines and evaluation,
Figure 3, the final table), and plumbing (files, data, models, the optimizer, torchrun, flags).
"""

import contextlib
import hashlib
import json
import logging
import math
import os
import random
import re
import shutil
import signal
import sys
import uuid
from dataclasses import asdict, dataclass, fields
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor
from tqdm import tqdm
from transformers import (AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification,
                          AutoTokenizer, GenerationConfig, HfArgumentParser)
from transformers.generation.configuration_utils import ContinuousBatchingConfig
from transformers.hf_argparser import HfArg
from transformers.utils import logging as hf_logging

from prompts import (ANSWER_PREFIX, DEMO_DATA, JUDGE_IDS, answer_kind, chat_prompt, eval_prompt,
                     fill_pointwise, identifier_token_ids, judge_prompts, parse_score,
                     read_answers, reply_format, token_ids)


# ======== The paper: Args, Eq. 3-7, the loop of section 4.1 and its steps ========
def flag(default, valid, help):
    """A field of Args: its default, its valid values and what it does. valid ('[1,inf)',
    '(0,1]', '{a,b,c}' or None) is argparse's metavar, so --help shows it, and check_args
    checks it."""
    return HfArg(default=default, help=help, metadata={"metavar": valid} if valid else None)


@dataclass
class Args:
    # the paper's hyperparameters (section 4.1 unless noted)
    iterations: int = flag(3, "[1,inf)", "iterations M0 -> M1 -> M2 -> M3")
    num_prompts: int = flag(4000, "[1,inf)", "fresh Alpaca prompts per iteration")
    num_samples: int = flag(4, "[2,inf)", "responses per prompt; two at random form the pair")
    temperature: float = flag(0.7, "(0,inf)", "sampling temperature")
    top_p: float = flag(0.9, "(0,1]", "nucleus sampling")
    sft_epochs: int = flag(5, "[0,inf)", "SFT epochs (1 with --judge_sft_only)")
    sft_lr: float = flag(1e-6, "[0,1]", "SFT learning rate (1e-7 with --judge_sft_only)")
    epochs: int = flag(2, "[1,inf)", "training epochs per iteration")
    lr: float = flag(5e-7, "[0,1]", "learning rate of each iteration's training")
    beta: float = flag(0.1, "(0,inf)", "beta of DPO (Eq. 3) and of the implicit reward (Eq. 4)")
    alpha: float = flag(1.0, "[0,inf)", "weight of the consistency loss in Eq. 7")
    tau: float = flag(0.7, "[0.5,1)", "confidence threshold of Eq. 6")
    length_reg: float = flag(0.02, "[0,inf)", "alpha_l of o' = o - alpha_l |y|, |y| in tokens")
    length_reg_from: int = flag(3, "[1,inf)", (
        "first iteration (1 = M0 -> M1) with alpha_l: 3 for Mistral-7B, 2 for the -Instruct model"))
    warmup_ratio: float = flag(0.1, "[0,1)", (
        "linear warmup share, then cosine decay (cosine: 4.1; the warmup is not given)"))
    # models, data and lengths (Appendix C.1)
    model: str = flag("mistralai/Mistral-7B-v0.3", None, (
        "the base model: SFT starts here, and it is the global reference of Eq. 4"))
    global_reference: str = flag(None, None, (
        "pi_ref^g of Eq. 4 and App. A; default --model (the -Instruct run names Mistral-7B)"))
    data_dir: str = flag(None, None, (
        "read sft.jsonl, judge.jsonl and prompts.jsonl here instead of the Hub (README)"))
    output_dir: str = flag(None, None, (
        "default runs/scir-<model name>; rerunning the same command resumes"))
    sft_examples: int = flag(5000, "[0,inf)", "Alpaca examples in SFT, besides LIMA's 1,030")
    judge_pairs: int = flag(500, "[1,inf)", (
        "oasst2 pairs, each giving 4 judge examples: 2 templates x 2 orders"))
    pointwise_examples: int = flag(2000, "[0,inf)", (
        "--method srlm: Table 6 judgements in SFT, from pointwise.jsonl in --data_dir (README)"))
    prompt_offset: int = flag(0, "[0,inf)", (
        "skip this many shuffled prompts: 8000 gives a run from M2 iteration 3's (Table 4)"))
    max_new_tokens: int = flag(1024, "[1,inf)", (
        "longest sampled response (not in the paper; M3's AlpacaEval answers: ~1,900 chars)"))
    max_length: int = flag(2048, "[2,inf)", (
        "longest prompt + response, and judge prompt (its responses are cut to fit)"))
    # method and ablations (Tables 2-4)
    method: str = flag("scir", "{scir,srlm,irm,external}", (
        "'scir', or a Table 2 baseline that ranks the samples once, then DPO on best vs worst "
        "against M_t: 'srlm' (Table 6 judge), 'irm' (implicit reward), 'external' "
        "(--reward_model)"))
    reward_model: str = flag("Skywork/Skywork-Reward-Llama-3.1-8B", None, (
        "--method external: a sequence-classification reward model with a chat template (README)"))
    judge_sft_only: bool = flag(False, None, (
        "SFT on the judge examples only, lr 1e-7, 1 epoch: for an instruction-tuned model"))
    no_consistency_loss: bool = flag(False, None, "Table 4: drop Eq. 6 from Eq. 7")
    no_dcpo: bool = flag(False, None, "Table 4: drop Eq. 7's DPO term, keep Eq. 6")
    single_judge_prompt: bool = flag(False, None, "Table 4: Q from template 1, one order")
    no_adaptive_reference: bool = flag(False, None, (
        "Table 4: DPO against the local reference M_t only, not the larger ratio of App. A"))
    # analyses
    eval_reward_bench: bool = flag(False, None, (
        "Figure 3: IRM, GRM and their agreeing subset of each M_k on RewardBench"))
    evaluate: bool = flag(False, None, (
        "Table 2's GSM8K and MMLU, zero-shot, of each M_k: one reply a question, sampled as "
        "section 4.1 says (--temperature, --top_p, seeded), read by the flexible and the strict "
        "rule (README; offline: eval.jsonl)"))
    eval_greedy: bool = flag(False, None, (
        "--evaluate decodes greedily instead (CREAM's protocol; not SCIR's), in eval/M<k>-greedy"))
    eval_limit: int = flag(None, "[1,inf)", "score only the first N questions of each task")
    alpaca_eval: bool = flag(False, None, (
        "Table 2's AlpacaEval 2.0: each M_k's sampled answers, for the alpaca_eval tool (README)"))
    # hardware and batching (not in the paper)
    batch_size: int = flag(1, "[1,inf)", (
        "pairs (SFT sequences) per forward pass: 1 keeps Llama-3-8B under 65 GiB (README)"))
    grad_accum: int = flag(32, "[1,inf)", (
        "micro-batches per step: 32 pairs, CREAM's batch; torchrun: a multiple of the processes"))
    max_grad_norm: float = flag(1.0, "(0,inf)", "gradient clipping (a common default)")
    score_batch_size: int = flag(16, "[2,inf)", "sequences per forward pass without gradients")
    seed: int = flag(42, "[0,inf)", "same seed, same run")
    dtype: str = flag("auto", "{auto,bfloat16,float32}", (
        "'auto': bfloat16 (stochastic-rounding AdamW) on a GPU, float32 on CPU; or either name"))
    demo: bool = flag(False, None, (
        "offline smoke run: tiny random model, built-in data, small settings (flags still win)"))


# --judge_sft_only changes these defaults the same way (section 4.1)
JUDGE_SFT_ONLY = dict(sft_epochs=1, sft_lr=1e-7, length_reg_from=2)


# --- Eq. 3: the DPO loss ---
def dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
             beta):
    """-log sigmoid(beta log pi/pi_ref (y_w) - beta log pi/pi_ref (y_l)): [B] x4 -> [B] (Eq. 3)."""
    chosen_logratio = policy_chosen_logps - ref_chosen_logps
    rejected_logratio = policy_rejected_logps - ref_rejected_logps
    return -F.logsigmoid(beta * (chosen_logratio - rejected_logratio))


# --- Eq. 4: the implicit reward model (IRM), P(y1 > y2) under the global reference ---
def implicit_preference(policy_logps_1, policy_logps_2, ref_logps_1, ref_logps_2, beta):
    """P = sigmoid(beta log pi/pi_ref(y1) - beta log pi/pi_ref(y2)): [B] x4 -> [B] (Eq. 4)."""
    return torch.sigmoid(beta * ((policy_logps_1 - ref_logps_1) - (policy_logps_2 - ref_logps_2)))


# --- Eq. 5 and section 3.3: the generative reward model (GRM), length-regularised ---
def judge_probability(logit_first, logit_second, len_first, len_second, alpha_l):
    """P(the response shown first wins), each identifier's logit minus alpha_l |y|: [B] x4 -> [B].

    Renormalised over {m, M}, P and Q are two Bernoulli distributions for Eq. 6; a softmax over two
    logits is the sigmoid of their difference.
    """
    first, second = logit_first - alpha_l * len_first, logit_second - alpha_l * len_second
    return torch.sigmoid(first - second)


# --- Eq. 6: the consistency loss between P (IRM) and Q (GRM) ---
def bernoulli_kl(q, p):
    """KL(Bern(q) || Bern(p)) elementwise, [B] x2 -> [B]."""
    return q * (q.log() - p.log()) + (1 - q) * ((1 - q).log() - (1 - p).log())


def bernoulli_entropy(q):
    """H(Bern(q)) elementwise, [B] -> [B]."""
    return -(q * q.log() + (1 - q) * (1 - q).log())


def consistency_loss(p_irm, p_grm, tau):
    """Eq. 6 per pair, [B] x2 -> [B]; P and Q are probabilities that y1 wins.

    1[max(P, 1-P) > tau] [KL(Q || sg(P)) + H(Q)] + 1[max(Q, 1-Q) > tau] [KL(P || sg(Q)) + H(P)]
    """
    eps = 1e-6  # keeps the logs finite when a probability saturates
    p, q = p_irm.clamp(eps, 1 - eps), p_grm.clamp(eps, 1 - eps)
    p_confident = (torch.maximum(p, 1 - p) > tau).float().detach()
    q_confident = (torch.maximum(q, 1 - q) > tau).float().detach()
    return (p_confident * (bernoulli_kl(q, p.detach()) + bernoulli_entropy(q))
            + q_confident * (bernoulli_kl(p, q.detach()) + bernoulli_entropy(p)))


# --- Appendix A: the adaptive reference, the larger of the local and global reference ratios ---
def adaptive_reference_logratio(local_ref_chosen, local_ref_rejected, global_ref_chosen,
                                global_ref_rejected):
    """log pi_ref(y_w)/pi_ref(y_l) of whichever reference makes it larger: [B] x4 -> [B]."""
    return torch.maximum(local_ref_chosen - local_ref_rejected,
                         global_ref_chosen - global_ref_rejected)


# --- Eq. 7: DPO on the pairs the IRM and the GRM agree on (DCPO), plus alpha times Eq. 6 ---
def agree(p, q):
    """P and Q pick the same response (floats or tensors); 0.5 picks none, agrees with none."""
    return ((p > 0.5) & (q > 0.5)) | ((p < 0.5) & (q < 0.5))


def chosen_and_rejected(values_1, values_2, y1_chosen):
    """Each pair's values ordered (chosen, rejected): [B] x2, bool [B] -> [B] x2."""
    return torch.where(y1_chosen, values_1, values_2), torch.where(y1_chosen, values_2, values_1)


def scir_loss(policy_logps_1, policy_logps_2, p_irm, p_grm, local_ref_logps_1, local_ref_logps_2,
              global_ref_logps_1, global_ref_logps_2, beta, alpha, tau, adaptive_reference=True):
    """Eq. 7 per pair: 1[IRM and GRM agree] L_DPO + alpha L_consistency. [B] x8 -> dict of [B].

    p_irm is Eq. 4's P(y1 > y2) of these policy log-probs; the response it prefers is chosen.
    DPO's reference is Appendix A's adaptive one, or M_t alone without adaptive_reference
    (Table 4).
    """
    y1_chosen = p_irm.detach() > 0.5
    policy_chosen, policy_rejected = chosen_and_rejected(policy_logps_1, policy_logps_2, y1_chosen)
    local_chosen, local_rejected = chosen_and_rejected(local_ref_logps_1, local_ref_logps_2,
                                                       y1_chosen)
    ref_logratio = local_chosen - local_rejected
    if adaptive_reference:
        global_chosen, global_rejected = chosen_and_rejected(global_ref_logps_1,
                                                             global_ref_logps_2, y1_chosen)
        ref_logratio = adaptive_reference_logratio(local_chosen, local_rejected, global_chosen,
                                                   global_rejected)
    # Eq. 3, which sees the reference only through its log-ratio log pi_ref(y_w)/pi_ref(y_l)
    dpo = -F.logsigmoid(beta * ((policy_chosen - ref_logratio) - policy_rejected))
    consistency = consistency_loss(p_irm, p_grm, tau)
    agreed = agree(p_irm.detach(), p_grm.detach()).float()
    return {"loss": agreed * dpo + alpha * consistency, "dpo_loss": dpo,
            "consistency_loss": consistency, "agree": agreed}


# --- Section 4.1: base -SFT-> M0 -SCIR-> M1 -SCIR-> M2 -SCIR-> M3 ---
def main(argv=None):
    """Section 4.1's loop in --output_dir, then the analyses and the final table; each finished
    step is a file, so rerunning the same command resumes."""
    start_processes()
    args = parse_args(argv)
    out = Path(args.output_dir)
    with locked(out):
        (tokenizer, identifier_ids, sft_rows, judge_rows, pools, bench, tests,
         instructions) = prepare(args, out)
        if not model_ready(out / "M0"):
            run_sft(args, tokenizer, sft_rows, judge_rows, out)
        rows = [metrics_row(0, {})]  # one row per model M_k, as in the paper's tables
        for t, (pool, too_long) in enumerate(pools):  # iteration t + 1 trains M_t into M_{t+1}
            it = out / f"iter{t + 1}"
            it.mkdir(exist_ok=True)
            samples = cached(it / "samples.jsonl", pool, ("id", "prompt"),
                             partial(run_sampling, args, tokenizer, pool, t, out))
            if not model_ready(out / f"M{t + 1}"):
                if args.method == "scir":
                    scir_iteration(args, tokenizer, samples, t, out, identifier_ids)
                else:  # Table 2's baselines, beyond the paper's method
                    baseline_iteration(args, tokenizer, samples, t, out)
            summary = json.loads((out / f"M{t + 1}" / "training_summary.json").read_text())
            rows[t].update(sample_metrics(samples, too_long, summary))
            rows.append(metrics_row(t + 1, summary))
            write_jsonl(out / "metrics.jsonl", rows)
        if args.eval_reward_bench:
            for k, scores in evaluate_reward_bench(args, tokenizer, bench, out,
                                                   identifier_ids).items():
                rows[k]["reward_bench"] = scores
        if args.evaluate:
            for k, accuracy in evaluate_models(args, tokenizer, tests, out).items():
                rows[k]["evaluation"] = accuracy
        if args.alpaca_eval:
            alpaca_eval_answers(args, tokenizer, instructions, out)
        write_jsonl(out / "metrics.jsonl", rows)
        table = final_table(args, rows)
        write_text(out / "table.md", table)
        finish(f"\n{table}\nmodels, samples, pairs, metrics.jsonl and table.md are in {out}")


# --- Section 4.1, Appendix C.1: SFT on instructions and pairwise judge examples gives M0 ---
def run_sft(args, tokenizer, sft_rows, judge_rows, out):
    """M0: the base model after SFT, or as given with --sft_epochs 0. judge_rows: the pairs of
    the pairwise judge examples (scir), or the pointwise judgements (srlm)."""
    if args.global_reference not in (None, args.model):  # a damaged one stops the run before SFT
        load_model(args.global_reference, args)
    if args.sft_epochs == 0:
        save_model(load_model(args.model, args), tokenizer, out / "M0", {"sft": "skipped"})
        return
    instruction = []
    for row in sft_rows:
        prompt_ids, response_ids = encode(tokenizer, row["prompt"], row["response"])
        if len(prompt_ids) < args.max_length - 1:  # keep the prompt whole, cut the response
            instruction.append((prompt_ids, response_ids[: args.max_length - len(prompt_ids)]))
    if args.method == "scir":
        judge = judge_sft_examples(tokenizer, judge_rows, args.judge_pairs, args.seed,
                                   args.max_length)
    elif args.method == "srlm":  # App. C.1: Table 6 judgements, where the data has them
        judge = pointwise_sft_examples(tokenizer, judge_rows, args.pointwise_examples, args.seed,
                                       args.max_length)
    else:
        judge = []
    # only an instruction longer than max_length on its own leaves a judge example out
    judge_fit = [(ids, target) for ids, target in judge
                 if len(ids) + len(target) <= args.max_length]
    examples = instruction + judge_fit
    if not examples:
        fail(f"every SFT prompt is longer than --max_length {args.max_length}")
    batches = [collate(b, tokenizer.pad_token_id) for epoch in range(args.sft_epochs)
               for b in micro_batches(examples, args.batch_size, args.seed + epoch)]
    model, summary = load_and_train(args, args.model, batches, sft_loss, "sft_lr", args.seed,
                                    "SFT -> M0")
    summary.update(examples=len(examples), judge_examples=len(judge_fit),
                   skipped_too_long=len(sft_rows) - len(instruction) + len(judge) - len(judge_fit))
    save_model(model, tokenizer, out / "M0", summary)


def judge_sft_examples(tokenizer, judge_rows, count, seed, max_length):
    """Each preference pair gives 4 examples (2 templates x 2 orders) whose target names the better
    response -> [(prompt_ids, target_ids)].

    The prompt ends in '[[' and the target is 'm]]' or 'M]]' (+ end of turn): the tokens at the
    judge's answer position. Responses are cut as the judge's own prompts cut them (judge_inputs).
    """
    targets = {name: encode(tokenizer, "", f"{name}]]", ANSWER_PREFIX)[1] for name in JUDGE_IDS}
    room = max_length - max(map(len, targets.values()))
    examples = []
    for row in random.Random(seed).sample(judge_rows, min(count, len(judge_rows))):
        for ids, chosen_first in judge_inputs(tokenizer, row["prompt"], row["chosen"],
                                              row["rejected"], room):
            examples.append((ids, targets["m" if chosen_first else "M"]))
    return examples


# --- Section 4.1: M_t samples 4 responses per prompt; two at random form the unlabeled pair ---
def run_sampling(args, tokenizer, pool, t, out):
    """Rows {id, prompt, samples, response_1, response_2}: M_t's samples and the pair (y1, y2)."""
    model = load_model(out / f"M{t}", args, seed=args.seed + 1000 * t)
    grouped = data_parallel(partial(sample_responses, model, tokenizer, args=args),
                            [row["prompt"] for row in pool])
    del model
    rng = random.Random(args.seed + t)
    rows = []
    for row, samples in zip(pool, grouped):
        first, second = rng.sample(range(len(samples)), 2)
        rows.append({"id": row["id"], "prompt": row["prompt"], "samples": samples,
                     "response_1": samples[first], "response_2": samples[second]})
    return rows


# --- One SCIR iteration (section 4.1): precompute the references, train with Eq. 7, measure ---
def scir_iteration(args, tokenizer, samples, t, out, identifier_ids):
    """M_t -> M_{t+1}: precompute the references, train on Eq. 7, measure P and Q again, save."""
    alpha_l = judge_length_reg(args, t)
    pairs, start, global_ref = reference_scores(args, tokenizer, samples, t, out, identifier_ids,
                                                alpha_l)
    model, summary = load_and_train(args, out / f"M{t}", epoch_batches(pairs, args, t),
                                    scir_batch_loss(args, tokenizer, identifier_ids, alpha_l), "lr",
                                    args.seed + 1000 * t + 1, f"SCIR M{t} -> M{t + 1}")
    end = score_pairs(model, tokenizer, pairs, args, identifier_ids, alpha_l,
                      f"IRM and GRM of M{t + 1}")
    next_alpha_l = judge_length_reg(args, t + 1)  # M_{t+1} judges D_t as it will judge
    trained = end if next_alpha_l == alpha_l else score_pairs(
        model, tokenizer, pairs, args, identifier_ids, next_alpha_l, f"GRM of M{t + 1}, alpha_l on")
    p_end = irm_preferences(end, global_ref, args.beta)
    summary.update(pairs=len(pairs),
                   consistency_rate=sum(agree(p, e["q"]) for p, e in zip(p_end, end)) / len(pairs),
                   **consistency_figures(start, trained, global_ref, args.beta))
    write_jsonl(out / f"iter{t + 1}" / "pairs.jsonl",
                scir_pair_rows(pairs, start, end, global_ref, args.beta))
    save_model(model, tokenizer, out / f"M{t + 1}", summary)


def judge_length_reg(args, t):
    """alpha_l of M_t's judge: on from iteration --length_reg_from, where M_{from-1} judges."""
    return args.length_reg if t + 1 >= args.length_reg_from else 0.0


def reference_scores(args, tokenizer, samples, t, out, identifier_ids, alpha_l):
    """The pairs with their references: pi_ref^g (Eq. 4) and pi_ref^l = M_t (App. A), whose Q is
    kept for the analysis -> (pairs, M_t's scores, pi_ref^g's log-probs); cached."""
    it = out / f"iter{t + 1}"
    pairs = [dict(row, sequences=pair_sequences(tokenizer, row, args.max_length))
             for row in samples]
    global_ref = global_reference_logps(args, tokenizer, pairs, it / "logps_global.jsonl")

    def score_start():
        return score_pairs(load_model(out / f"M{t}", args), tokenizer, pairs, args,
                           identifier_ids, alpha_l, f"IRM and GRM of M{t}")
    start = cached(it / "start.jsonl", pairs, (), score_start)
    for pair, g, s in zip(pairs, global_ref, start):
        pair.update(global_logp_1=g["logp_1"], global_logp_2=g["logp_2"], local_logp_1=s["logp_1"],
                    local_logp_2=s["logp_2"])
    return pairs, start, global_ref


def global_reference_logps(args, tokenizer, pairs, path):
    """log pi_ref^g(y1|x) and log pi_ref^g(y2|x) of every pair, cached in path."""
    logps = cached_logps(path, args.global_reference or args.model,
                         [s for pair in pairs for s in pair["sequences"]], tokenizer, args)
    return [{"logp_1": a, "logp_2": b} for a, b in zip(logps[::2], logps[1::2])]


def scir_batch_loss(args, tokenizer, identifier_ids, alpha_l):
    """train's loss_fn: Eq. 7 on a micro-batch of pairs with precomputed reference log-probs ->
    (metrics, detached). Eq. 7 is taken on detached copies of the policy pass's and the judge
    pass's outputs, and train's backward then runs one backward per pass (detached: [(outputs,
    copies)]): one backward through both would hold the judge pass's weight gradients (13.5 GiB
    at 7B) until the policy pass's backward reached each layer (README: memory)."""
    alpha = 0.0 if args.no_consistency_loss else args.alpha

    def loss_fn(model, batch):
        sequences = [s for pair in batch for s in pair["sequences"]]  # y1, y2, y1, y2, ...
        policy = response_logps(model, sequences, tokenizer.pad_token_id).view(-1, 2)
        with torch.set_grad_enabled(not args.no_consistency_loss):  # else Q only masks DPO
            p_grm = generative_preference(model, tokenizer, identifier_ids=identifier_ids,
                                          alpha_l=alpha_l, **judge_fields(args, batch)).mean(-1)
        policy_copy, p_grm_copy = (x.detach().requires_grad_() for x in (policy, p_grm))

        def ref(key):
            return torch.tensor([pair[key] for pair in batch], device=model.device)
        policy_1, policy_2 = policy_copy.unbind(1)
        p_irm = implicit_preference(policy_1, policy_2, ref("global_logp_1"),
                                    ref("global_logp_2"), args.beta)
        terms = scir_loss(policy_1, policy_2, p_irm, p_grm_copy, ref("local_logp_1"),
                          ref("local_logp_2"), ref("global_logp_1"), ref("global_logp_2"),
                          args.beta, alpha, args.tau,
                          adaptive_reference=not args.no_adaptive_reference)
        loss = alpha * terms["consistency_loss"] if args.no_dcpo else terms["loss"]
        agreed = terms["agree"]
        metrics = {"loss": loss.mean()}  # and only the terms trained: an ablated one is left out
        if not args.no_consistency_loss:
            metrics["consistency_loss"] = terms["consistency_loss"].mean().detach()
        if not args.no_dcpo:
            metrics["dpo_loss"] = (agreed * terms["dpo_loss"]).mean().detach()  # 0: disagreement
            metrics["dcpo_fraction"] = agreed.mean()
        return metrics, [((policy,), (policy_copy,)), ((p_grm,), (p_grm_copy,))]
    return loss_fn


@torch.no_grad()
def score_pairs(model, tokenizer, pairs, args, identifier_ids, alpha_l, desc):
    """log pi(y1|x), log pi(y2|x) and the judge's Q (mean, and per prompt) of every pair -> rows;
    under torchrun each rank scores its share."""
    model.eval()

    def score(share):
        rows, size = [], args.score_batch_size // 2
        for start in tqdm(range(0, len(share), size), desc=desc):
            batch = share[start: start + size]
            sequences = [s for pair in batch for s in pair["sequences"]]
            logps = response_logps(model, sequences, tokenizer.pad_token_id).view(-1, 2)
            q = generative_preference(model, tokenizer, identifier_ids=identifier_ids,
                                      alpha_l=alpha_l, **judge_fields(args, batch))
            rows += [{"logp_1": a, "logp_2": b, "q": mean, "q_prompts": q_prompts} for (a, b), mean,
                     q_prompts in zip(logps.tolist(), q.mean(-1).tolist(), q.tolist())]
        return rows
    return data_parallel(score, pairs)


# --- The model's side: chat-formatted token ids, response log-probs through a float32 head ---
def encode(tokenizer, prompt, response=None, answer_prefix=""):
    """Token ids of the chat-formatted prompt (+ answer_prefix where the reply starts) and, given a
    response, of the response and the end of turn (prompts.reply_format).

    The response is tokenized after its prompt, as the model sees it when generating: a prefix
    space (SentencePiece) or a merge across the boundary would give the response alone other ids.
    """
    text = chat_prompt(tokenizer, prompt)
    if answer_prefix:
        text += reply_format(tokenizer)[0] + answer_prefix
    prompt_ids = token_ids(tokenizer, text)
    if response is None:
        return prompt_ids
    lead, end = reply_format(tokenizer)
    joint_ids = token_ids(tokenizer, text + ("" if answer_prefix else lead) + response + end)
    if joint_ids[: len(prompt_ids)] == prompt_ids:
        return prompt_ids, joint_ids[len(prompt_ids):]
    return prompt_ids, token_ids(tokenizer, response + end)


def collate(sequences, pad_id):
    """[(prompt_ids, response_ids)] -> right-padded input_ids, attention_mask, labels (-100 off the
    response)."""
    width = max(len(p) + len(r) for p, r in sequences)
    input_ids = torch.full((len(sequences), width), pad_id)
    attention_mask = torch.zeros(len(sequences), width, dtype=torch.long)
    labels = torch.full((len(sequences), width), -100)
    for row, (p, r) in enumerate(sequences):
        input_ids[row, : len(p) + len(r)] = torch.tensor(p + r)
        attention_mask[row, : len(p) + len(r)] = 1
        labels[row, len(p): len(p) + len(r)] = torch.tensor(r)
    return input_ids, attention_mask, labels


def sequence_logps(model, input_ids, attention_mask, response_mask):
    """Summed log pi(y|x) over response tokens: [B, L] x3 -> [B] float32.

    token_logps is log_softmax(hidden @ head.weight.T).gather(targets) in float32 (a bfloat16 head
    rounds a logit near 20 by up to 0.06: README), a vocabulary slice at a time (TokenLogps, in
    the plumbing), and only where a response token is predicted. Any transformers causal LM works
    (get_decoder, get_output_embeddings); one that scales or caps its logits after the head
    (Gemma 2, Cohere) needs that step added to token_logps.
    """
    predicts_response = F.pad(response_mask[:, 1:].bool(), (0, 1), value=False)  # p predicts p+1
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # left or right padding
    hidden = decoder_states(model, input_ids=input_ids, attention_mask=attention_mask,
                            position_ids=position_ids)
    targets = input_ids[:, 1:][response_mask[:, 1:].bool()]
    logps = token_logps(hidden[predicts_response], targets, model.get_output_embeddings())
    rows = predicts_response.nonzero()[:, 0]
    return torch.zeros(input_ids.shape[0], device=hidden.device).index_add(0, rows, logps)


def decoder_states(model, **inputs):
    """The decoder's last hidden states [B, L, H], without the LM head."""
    if isinstance(model, FSDPModule):  # several GPUs (torchrun)
        return sharded_decoder_states(model, **inputs)
    return model.get_decoder()(**inputs, use_cache=False).last_hidden_state


def response_logps(model, sequences, pad_id):
    """Summed log pi(response | prompt) of [(prompt_ids, response_ids)] -> [len(sequences)]."""
    input_ids, attention_mask, labels = (t.to(model.device) for t in collate(sequences, pad_id))
    return sequence_logps(model, input_ids, attention_mask, labels != -100)


@torch.no_grad()
def batched_logps(model, sequences, pad_id, batch_size, desc):
    """response_logps without gradients, batch_size sequences at a time -> list of floats;
    under torchrun each rank scores its share."""
    model.eval()

    def score(share):
        logps = []
        for start in tqdm(range(0, len(share), batch_size), desc=desc):
            logps += response_logps(model, share[start: start + batch_size], pad_id).tolist()
        return logps
    return data_parallel(score, sequences)


def sft_loss(model, batch):
    """Mean negative log-likelihood of the response tokens (collate's labels; -100 elsewhere) ->
    (metrics, no detached pass)."""
    input_ids, attention_mask, labels = (t.to(model.device) for t in batch)
    response_mask = labels != -100
    logps = sequence_logps(model, input_ids, attention_mask, response_mask)
    return {"loss": -logps.sum() / response_mask.sum()}, []


def pair_sequences(tokenizer, pair, max_length):
    """(prompt_ids, sampled ids) of y1 and y2, cut to max_length alike for scoring and training."""
    prompt_ids = encode(tokenizer, pair["prompt"])
    return [(prompt_ids, pair[key]["token_ids"][: max_length - len(prompt_ids)])
            for key in ("response_1", "response_2")]


# --- The judge (Eq. 5, section 3.3): 2 templates x 2 orders, read at the identifier after '[[' ---
def cut_text(tokenizer, text, room):
    """text cut to at most `room` tokens, never inside a character."""
    ids = tokenizer(text, add_special_tokens=False).input_ids
    return text if len(ids) <= room else tokenizer.decode(ids[:room]).rstrip("\ufffd")


def judge_inputs(tokenizer, instruction, response_1, response_2, max_length):
    """The 4 judge prompts of a pair as token ids ending in '[[', responses cut to fit max_length.

    A response that fits is kept whole and the other gets the room it leaves; two long ones get half
    each. Returns [(ids, y1_shown_first)] (2 templates x 2 orders, prompts.judge_prompts).
    """
    empty = judge_prompts(instruction, "", "")
    budget = max_length - max(len(encode(tokenizer, text, answer_prefix=ANSWER_PREFIX))
                              for text, _ in empty)
    texts = (response_1, response_2)
    lengths = [len(tokenizer(text, add_special_tokens=False).input_ids) for text in texts]
    rooms = [max(0, min(own, max(budget // 2, budget - other)))
             for own, other in zip(lengths, lengths[::-1])]
    while True:  # re-encoding a cut text can take a few more tokens: shrink the larger room
        cut = [cut_text(tokenizer, text, room) for text, room in zip(texts, rooms)]
        inputs = [(encode(tokenizer, text, answer_prefix=ANSWER_PREFIX), id_of_response_1 == "m")
                  for text, id_of_response_1 in judge_prompts(instruction, *cut)]
        excess = max(len(ids) for ids, _ in inputs) - max_length
        if excess <= 0 or max(rooms) == 0:
            return inputs
        larger = rooms.index(max(rooms))
        rooms[larger] = max(0, rooms[larger] - excess)


def identifier_logits(model, sequences, identifier_ids, pad_id):
    """Logits of the identifiers m and M at the answer position: [S] token lists -> [S, 2].

    Left padding puts every answer position last; only the head's two identifier rows are applied
    there, in float32, since Q renormalises over the two (judge_probability).
    """
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, device=model.device)
    attention_mask = torch.zeros(len(sequences), width, dtype=torch.long, device=model.device)
    for row, s in enumerate(sequences):
        input_ids[row, width - len(s):] = torch.tensor(s, device=model.device)
        attention_mask[row, width - len(s):] = 1
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    hidden = decoder_states(model, input_ids=input_ids, attention_mask=attention_mask,
                            position_ids=position_ids)
    head = model.get_output_embeddings()
    rows = list(identifier_ids)
    bias = None if head.bias is None else head.bias[rows].float()
    return F.linear(hidden[:, -1].float(), head.weight[rows].float(), bias)


def generative_preference(model, tokenizer, instructions, responses_1, responses_2, identifier_ids,
                          alpha_l, max_length, lengths_1=None, lengths_2=None, num_prompts=4):
    """Q = P_grm(y1 > y2 | x) of each judge prompt (Eq. 5): B pairs -> [B, num_prompts].

    Section 3.3 averages the 4 prompts (2 templates x 2 orders); num_prompts=1 keeps template 1 in
    one order (Table 4). |y| in tokens defaults to the length of each response as given.
    """
    def token_count(text):
        return len(tokenizer(text, add_special_tokens=False).input_ids)
    lengths_1 = lengths_1 or [token_count(r) for r in responses_1]
    lengths_2 = lengths_2 or [token_count(r) for r in responses_2]
    sequences, first_is_y1 = [], []
    for x, y1, y2 in zip(instructions, responses_1, responses_2):
        for ids, y1_first in judge_inputs(tokenizer, x, y1, y2, max_length)[:num_prompts]:
            sequences.append(ids)
            first_is_y1.append(y1_first)
    logits = identifier_logits(model, sequences, identifier_ids, tokenizer.pad_token_id)
    first_is_y1 = torch.tensor(first_is_y1, device=logits.device)

    def per_prompt(lengths):
        return torch.tensor(lengths, device=logits.device, dtype=torch.float32).repeat_interleave(
            num_prompts)
    len_1, len_2 = per_prompt(lengths_1), per_prompt(lengths_2)
    p_first = judge_probability(logits[:, 0], logits[:, 1], torch.where(first_is_y1, len_1, len_2),
                                torch.where(first_is_y1, len_2, len_1), alpha_l)
    return torch.where(first_is_y1, p_first, 1 - p_first).view(-1, num_prompts)


def judge_fields(args, pairs):
    """generative_preference's inputs for rows of sampled pairs, |y| counted as sampled."""
    def texts(key):
        return [pair[key]["response"] for pair in pairs]

    def lengths(key):
        return [len(pair[key]["token_ids"]) for pair in pairs]
    return dict(instructions=[pair["prompt"] for pair in pairs], responses_1=texts("response_1"),
                responses_2=texts("response_2"), lengths_1=lengths("response_1"),
                lengths_2=lengths("response_2"), max_length=args.max_length,
                num_prompts=1 if args.single_judge_prompt else 4)


# --- Section 4.1: M_t samples with continuous batching ---
@torch.no_grad()
def sample_responses(model, tokenizer, prompts, args, num_samples=None, greedy=False):
    """N samples (or one greedy reply) per prompt with continuous batching (generate_batch: paged
    KV cache, no padding) -> per prompt [{response, token_ids (stop token included), finished}]."""
    if model.device.type == "cpu":  # it logs that psutil is missing on every CPU call
        logging.getLogger("ContinuousBatchingLogger").setLevel(logging.CRITICAL)
    model_eos = model.generation_config.eos_token_id
    eos_ids = {tokenizer.eos_token_id} | set(model_eos if isinstance(model_eos, list)
                                             else [model_eos] if model_eos else [])
    num_samples = 1 if greedy else num_samples or args.num_samples
    sampling = dict(do_sample=False) if greedy else dict(
        do_sample=True, temperature=args.temperature, top_p=args.top_p, top_k=0)
    config = GenerationConfig(**sampling, max_new_tokens=args.max_new_tokens,
                              num_return_sequences=num_samples, eos_token_id=sorted(eos_ids),
                              pad_token_id=tokenizer.pad_token_id)
    inputs = [encode(tokenizer, p) for p in prompts]
    longest = max(map(len, inputs)) + args.max_new_tokens
    cache = cache_config(model, len(inputs) * num_samples, longest)
    outputs = model.generate_batch(inputs=inputs, generation_config=config,
                                   continuous_batching_config=cache, progress_bar=True)
    if len(outputs) != len(prompts) * num_samples:
        fail(f"generation returned {len(outputs)} of {len(prompts) * num_samples} responses")
    grouped = [[] for _ in prompts]  # request ids are req_<prompt index>[__child#k]
    for request_id, output in outputs.items():
        if output.error is not None:
            fail(f"generation failed for request {request_id}: {output.error}")
        tokens = list(output.generated_tokens)
        finished = bool(tokens) and tokens[-1] in eos_ids
        text = tokenizer.decode(tokens[:-1] if finished else tokens, skip_special_tokens=True)
        grouped[int(request_id.split("__")[0].removeprefix("req_"))].append(
            {"response": text, "token_ids": tokens, "finished": finished})
    return grouped


# ======== Beyond the paper: Table 1's analyses, Table 2's baselines, Figure 3, evaluation ========
# --- Table 1, Figure 2, section 4.3: how often the IRM and the GRM of a model agree ---
def judge_label(q_prompts):
    """The GRM's label, True if y1 wins, where all its judge prompts agree (4.3); else None."""
    if all(q > 0.5 for q in q_prompts):
        return True
    return False if all(q < 0.5 for q in q_prompts) else None


def pointwise_label(scores):
    """The Table 6 judge's label of (y1, y2), True if y1 scores higher; a tie or no score: None."""
    return None if None in scores or scores[0] == scores[1] else scores[0] > scores[1]


def internal_consistency(p_irm, grm_labels):
    """Share of the pairs both label on which IRM and GRM agree: [P], [label] -> (rate, count)."""
    counted = [(p, label) for p, label in zip(p_irm, grm_labels) if label is not None and p != 0.5]
    rate = sum(agree(p, float(label)) for p, label in counted) / len(counted) if counted else None
    return rate, len(counted)


def irm_preferences(scored, global_ref, beta):
    """Eq. 4's P from stored log-probs: rows {logp_1, logp_2} of a model and of pi_ref^g -> [P]."""
    def column(rows, key):
        return torch.tensor([row[key] for row in rows], dtype=torch.float64)
    return implicit_preference(column(scored, "logp_1"), column(scored, "logp_2"),
                               column(global_ref, "logp_1"), column(global_ref, "logp_2"),
                               beta).tolist()


def grm_label(scored):
    """The judge's label of a scored pair: SCIR's 4 prompts (q_prompts) or Table 6's 2 scores."""
    return judge_label(scored["q_prompts"]) if "q_prompts" in scored else pointwise_label(
        scored["scores"])


def consistency_figures(start, trained, global_ref, beta):
    """Table 1 / Figure 2 on one iteration's pairs D_t: the IRM-GRM consistency of M_t (new pairs)
    and of M_{t+1} (trained pairs), from rows {logp_1, logp_2, the judge's verdict}."""
    figures = {}
    for key, scored in (("new", start), ("trained", trained)):
        p_irm = irm_preferences(scored, global_ref, beta)
        rate, counted = internal_consistency(p_irm, [grm_label(row) for row in scored])
        figures |= {f"consistency_{key}": rate, f"counted_{key}": counted}
    return figures


def scir_pair_rows(pairs, start, end, global_ref, beta):
    """pairs.jsonl: each pair with P and Q (and their labels) of M_t and of M_{t+1}."""
    rows = []
    for pair, s, e, p_s, p_e in zip(pairs, start, end, irm_preferences(start, global_ref, beta),
                                    irm_preferences(end, global_ref, beta)):
        rows.append({"id": pair["id"], "prompt": pair["prompt"],
                     "response_1": pair["response_1"]["response"],
                     "response_2": pair["response_2"]["response"]}
                    | {"p_start": p_s, "q_start": s["q"], "q_prompts_start": s["q_prompts"],
                       "label_irm_start": int(p_s > 0.5), "label_grm_start": int(s["q"] > 0.5)}
                    | {"p_end": p_e, "q_end": e["q"], "q_prompts_end": e["q_prompts"],
                       "label_irm_end": int(p_e > 0.5), "label_grm_end": int(e["q"] > 0.5)})
    return rows


# --- Table 2's baselines: rank each prompt's samples once, DPO on best vs worst against M_t ---
def baseline_iteration(args, tokenizer, samples, t, out):
    """M_t -> M_{t+1} for srlm, irm or external: rank, pair best vs worst, DPO, measure, save."""
    it = out / f"iter{t + 1}"
    sequences = []
    for row in samples:
        prompt_ids = encode(tokenizer, row["prompt"])
        sequences += [(prompt_ids, s["token_ids"][: args.max_length - len(prompt_ids)])
                      for s in row["samples"]]
    local = cached_logps(it / "logps_local.jsonl", out / f"M{t}", sequences, tokenizer, args)
    if args.method == "irm":
        rewards = implicit_rewards(args, tokenizer, sequences, local, it)
    elif args.method == "external":
        rewards = reward_model_rewards(args, samples, it)
    else:
        rewards = judge_rewards(args, tokenizer, samples, t, out)
    unusable = sum(r is None for r in rewards) if args.method == "srlm" else None
    n = len(samples[0]["samples"])
    pairs = best_vs_worst(samples, by_prompt(rewards, n), by_prompt(sequences, n),
                          by_prompt(local, n))
    if not pairs:
        fail(f"iteration {t + 1}: no prompt has two responses with different rewards"
             + (f" ({unusable} judgements gave no score)" if unusable else ""))
    global_ref = global_reference_logps(args, tokenizer, pairs, it / "logps_global_pairs.jsonl")
    if args.method == "srlm":  # M_t's judge on a pair: the scores that ranked it
        start_scores = [ranking_scores(pair) for pair in pairs]
    else:  # M_t's judge has not seen the pairs: it judges them for the analysis
        start_scores = [row["scores"] for row in judge_pairs(args, tokenizer, pairs, t, out)]
    model, summary = load_and_train(args, out / f"M{t}", epoch_batches(pairs, args, t),
                                    dpo_batch_loss(args, tokenizer), "lr", args.seed + 1000 * t + 1,
                                    f"{args.method} M{t} -> M{t + 1}")
    rows, figures = baseline_analysis(args, tokenizer, model, pairs, start_scores, global_ref, t)
    summary.update(pairs=len(pairs), unusable_judgements=unusable, **figures)
    write_jsonl(it / "pairs.jsonl", rows)
    save_model(model, tokenizer, out / f"M{t + 1}", summary)


def implicit_rewards(args, tokenizer, sequences, local, it):
    """IRM's ranking: log pi_t(y|x) - log pi_ref^g(y|x) of every sample (Eq. 4's reward / beta)."""
    global_ = cached_logps(it / "logps_global.jsonl", args.global_reference or args.model,
                           sequences, tokenizer, args)
    return [a - b for a, b in zip(local, global_)]


def reward_model_rewards(args, samples, it):
    """The external ranking: --reward_model's score of every sample, resident alone; cached."""
    def score():
        return data_parallel(partial(external_rewards, args.reward_model, args=args), samples)
    scored = cached(it / "rewards_external.jsonl", samples, ("id",), score)
    return [value for row in scored for value in row["rewards"]]


def judge_rewards(args, tokenizer, samples, t, out):
    """SRLM's ranking: M_t's Table 6 score of every sample (None where it gives none); cached."""
    def judge():
        return judge_samples(load_model(out / f"M{t}", args, seed=args.seed + 1000 * t + 2),
                             tokenizer, samples, args)
    judged = cached(out / f"iter{t + 1}" / "judgements.jsonl", samples, ("id",), judge)
    return [score for row in judged for score in row["scores"]]


def judge_samples(model, tokenizer, samples_rows, args):
    """Self-Rewarding: one sampled Table 6 judgement of each of a row's samples -> per-row scores
    (None: no score) and judgements."""
    model.eval()
    prompts = [pointwise_prompt(tokenizer, row["prompt"], s["response"], args.max_length)
               for row in samples_rows for s in row["samples"]]
    judgements = [reply["response"] for (reply,) in
                  data_parallel(partial(sample_responses, model, tokenizer, args=args,
                                        num_samples=1), prompts)]
    rows, n = [], len(samples_rows[0]["samples"])
    for j, row in enumerate(samples_rows):
        texts = judgements[j * n: (j + 1) * n]
        rows.append({"id": row["id"], "scores": [parse_score(text) for text in texts],
                     "judgements": texts})
    return rows


def pointwise_prompt(tokenizer, instruction, response, max_length):
    """Table 6's prompt for one response, cut so the prompt keeps to about max_length tokens."""
    room = max(1, max_length - len(encode(tokenizer, fill_pointwise(instruction, ""))))
    return fill_pointwise(instruction, cut_text(tokenizer, response, room))


def pointwise_sft_examples(tokenizer, pointwise_rows, count, seed, max_length):
    """SRLM's judge SFT (App. C.1): Table 6's prompt for a response, with its judgement (ending in
    'Score: N') as the target -> [(prompt_ids, target_ids)]; the response is cut to leave the
    judgement room."""
    if not pointwise_rows:
        say("note: --method srlm without pointwise.jsonl in --data_dir: M0 learns no Table 6 "
            "judgements, so it may rarely write 'Score: N' (README: Departures)")
    examples = []
    for row in random.Random(seed).sample(pointwise_rows, min(count, len(pointwise_rows))):
        room = max_length - len(tokenizer(row["judgement"], add_special_tokens=False).input_ids)
        prompt = pointwise_prompt(tokenizer, row["prompt"], row["response"], room - 1)
        examples.append(encode(tokenizer, prompt, row["judgement"]))
    return examples


def reward_model_tokenizer(path):
    """The external reward model's tokenizer, with the chat template it scores in."""
    tokenizer = load_tokenizer(path)
    if not tokenizer.chat_template:
        fail(f"--reward_model {path!r} has no chat template to put a prompt and a response in")
    return tokenizer


@torch.no_grad()
def external_rewards(path, samples_rows, args):
    """The reward model's score of every sample, each (prompt, response) in its chat template.

    Left padding puts each sequence's last token at the end, where a sequence classifier reads;
    transformers finds it as the last token that is not pad_token_id, so no sequence may end in it.
    """
    tokenizer = reward_model_tokenizer(path)
    model = load_model(path, args, model_class=AutoModelForSequenceClassification)
    sequences = [token_ids(tokenizer, tokenizer.apply_chat_template(
        [{"role": "user", "content": row["prompt"]},
         {"role": "assistant", "content": s["response"]}], tokenize=False))
        for row in samples_rows for s in row["samples"]]
    rewards = []
    for start in tqdm(range(0, len(sequences), args.score_batch_size), desc=f"rewards of {path}"):
        batch = sequences[start: start + args.score_batch_size]
        pad_id = min(set(range(len(batch) + 1)) - {ids[-1] for ids in batch})
        model.config.get_text_config().pad_token_id = pad_id
        width = max(map(len, batch))
        input_ids = torch.tensor([[pad_id] * (width - len(ids)) + ids for ids in batch])
        attention_mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in batch])
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        logits = model(input_ids=input_ids.to(model.device),
                       attention_mask=attention_mask.to(model.device),
                       position_ids=position_ids.to(model.device)).logits
        rewards += logits[:, 0].float().tolist()
    n = len(samples_rows[0]["samples"])
    return [{"id": row["id"], "rewards": rewards[j * n: (j + 1) * n]}
            for j, row in enumerate(samples_rows)]


def by_prompt(values, n):
    """A flat list of every sample's values -> one list of n per prompt."""
    return [values[j: j + n] for j in range(0, len(values), n)]


def best_vs_worst(samples, rewards, sequences, local):
    """Per prompt, its highest-rewarded sample as chosen and its lowest as rejected, with M_t's
    log-probs as the reference; rewards, sequences and local hold one list per prompt, a value
    per sample. A prompt without two different rewards gives no pair."""
    pairs = []
    for row, r, row_sequences, row_local in zip(samples, rewards, sequences, local):
        usable = [i for i, value in enumerate(r) if value is not None]
        if len(usable) < 2 or max(r[i] for i in usable) == min(r[i] for i in usable):
            continue
        best, worst = max(usable, key=r.__getitem__), min(usable, key=r.__getitem__)
        chosen, rejected = row["samples"][best], row["samples"][worst]
        pairs.append({"id": row["id"], "prompt": row["prompt"], "chosen": chosen["response"],
                      "rejected": rejected["response"], "rewards": r, "samples": [chosen, rejected],
                      "sequences": [row_sequences[best], row_sequences[worst]],
                      "ref_chosen_logp": row_local[best], "ref_rejected_logp": row_local[worst]})
    return pairs


def ranking_scores(pair):
    """The two scores that made a pair: its best and its worst reward."""
    usable = [value for value in pair["rewards"] if value is not None]
    return [max(usable), min(usable)]


def judge_pairs(args, tokenizer, pairs, t, out):
    """M_t's Table 6 scores of each pair's chosen and rejected response (analysis); cached."""
    def judge():
        judged = judge_samples(load_model(out / f"M{t}", args, seed=args.seed + 1000 * t + 2),
                               tokenizer, pairs, args)
        return [dict(row, chosen=pair["chosen"]) for row, pair in zip(judged, pairs)]
    return cached(out / f"iter{t + 1}" / "judgements_pairs.jsonl", pairs, ("id", "chosen"), judge)


def dpo_batch_loss(args, tokenizer):
    """train's loss_fn: Eq. 3 against M_t, chosen and rejected stacked into one forward pass."""
    def loss_fn(model, batch):
        sequences = [p["sequences"][0] for p in batch] + [p["sequences"][1] for p in batch]
        logps = response_logps(model, sequences, tokenizer.pad_token_id)
        chosen, rejected = logps.split(len(batch))

        def ref(key):
            return torch.tensor([p[key] for p in batch], device=model.device)
        losses = dpo_loss(chosen, rejected, ref("ref_chosen_logp"), ref("ref_rejected_logp"),
                          args.beta)
        return {"loss": losses.mean(), "dpo_loss": losses.mean().detach()}, []
    return loss_fn


def baseline_analysis(args, tokenizer, model, pairs, start_scores, global_ref, t):
    """Table 1 / Figure 2 of a baseline: the IRM and the Table 6 judge of M_t and of M_{t+1} (the
    trained model) on the pairs -> (pairs.jsonl rows, figures)."""
    end_logps = batched_logps(model, [s for p in pairs for s in p["sequences"]],
                              tokenizer.pad_token_id, args.score_batch_size, f"IRM of M{t + 1}")
    torch.manual_seed(args.seed + 1000 * t + 3)
    end_judged = judge_samples(model, tokenizer, pairs, args)
    start = [{"logp_1": p["ref_chosen_logp"], "logp_2": p["ref_rejected_logp"], "scores": s}
             for p, s in zip(pairs, start_scores)]
    end = [{"logp_1": a, "logp_2": b, "scores": j["scores"]}
           for a, b, j in zip(end_logps[::2], end_logps[1::2], end_judged)]
    p_start, p_end = (irm_preferences(scored, global_ref, args.beta) for scored in (start, end))
    rows = [{k: v for k, v in p.items() if k not in ("samples", "sequences")}
            | {"p_start": ps, "scores_start": s["scores"], "p_end": pe, "scores_end": e["scores"],
               "judgements_end": j["judgements"]}
            for p, ps, s, pe, e, j in zip(pairs, p_start, start, p_end, end, end_judged)]
    return rows, consistency_figures(start, end, global_ref, args.beta)


# --- Figure 3, section 4.4: the IRM, the GRM and the pairs they agree on, scored on RewardBench ---
REWARD_BENCH_SECTIONS = {
    "Chat": ["alpacaeval-easy", "alpacaeval-length", "alpacaeval-hard", "mt-bench-easy",
             "mt-bench-med"],
    "Chat Hard": ["mt-bench-hard", "llmbar-natural", "llmbar-adver-neighbor",
                  "llmbar-adver-GPTInst", "llmbar-adver-GPTOut", "llmbar-adver-manual"],
    "Safety": ["refusals-dangerous", "refusals-offensive", "xstest-should-refuse",
               "xstest-should-respond", "donotanswer"],
    "Reasoning": ["math-prm", "hep-cpp", "hep-go", "hep-java", "hep-js", "hep-python", "hep-rust"],
}


def evaluate_reward_bench(args, tokenizer, pairs, out, identifier_ids):
    """Figure 3: M_0..M_T label each pair by IRM and GRM -> {k: {irm|grm|consistency: scores}}."""
    (out / "reward_bench").mkdir(exist_ok=True)
    global_ref = global_reference_logps(args, tokenizer, pairs,
                                        out / "reward_bench" / "logps_global.jsonl")
    subsets = [pair["subset"] for pair in pairs]
    results = {}
    for k in range(args.iterations + 1):
        irm, grm = reward_bench_labels(args, tokenizer, pairs, global_ref, k, out, identifier_ids)
        both = [i if i == g else None for i, g in zip(irm, grm)]  # where IRM and GRM give one label
        results[k] = {name: reward_bench_scores(subsets, labels)
                      for name, labels in (("irm", irm), ("grm", grm), ("consistency", both))}
    return results


def reward_bench_labels(args, tokenizer, pairs, global_ref, k, out, identifier_ids):
    """M_k's labels (True: chosen wins) of every pair by its IRM (Eq. 4) and its GRM; cached."""
    def score():
        model = load_model(out / f"M{k}", args)
        if args.method == "scir":
            rows = score_pairs(model, tokenizer, pairs, args, identifier_ids,
                               judge_length_reg(args, k), f"RewardBench: IRM and GRM of M{k}")
        else:
            logps = batched_logps(model, [s for p in pairs for s in p["sequences"]],
                                  tokenizer.pad_token_id, args.score_batch_size,
                                  f"RewardBench M{k}")
            torch.manual_seed(args.seed + 1000 * k + 4)
            judged = judge_samples(model, tokenizer, pairs, args)
            rows = [{"logp_1": a, "logp_2": b, "scores": j["scores"],
                     "judgements": j["judgements"]}
                    for a, b, j in zip(logps[::2], logps[1::2], judged)]
        return [dict(row, id=pair["id"]) for pair, row in zip(pairs, rows)]
    scored = cached(out / "reward_bench" / f"M{k}.jsonl", pairs, ("id",), score)
    irm = [None if p == 0.5 else p > 0.5 for p in irm_preferences(scored, global_ref, args.beta)]
    if args.method == "scir":  # the mean over the 4 prompts (3.3), as DCPO uses it
        return irm, [None if s["q"] == 0.5 else s["q"] > 0.5 for s in scored]
    return irm, [pointwise_label(s["scores"]) for s in scored]  # a tie or no score: no label


def reward_bench_scores(subsets, correct):
    """Section accuracies of one reward model: [subset], [True/False/None (no label)] -> dict.

    Only labelled pairs count (4.4). A section pools its subsets' pairs (RewardBench's
    example-weighted mean), except Reasoning, where math-prm weighs as much as the code subsets.
    """
    labelled = [(s, c) for s, c in zip(subsets, correct) if c is not None]

    def accuracy(names):
        hits = [c for s, c in labelled if s in names]
        return sum(hits) / len(hits) if hits else None
    scores = {}
    for section, names in REWARD_BENCH_SECTIONS.items():
        parts = [accuracy(names[:1]), accuracy(names[1:])] if section == "Reasoning" else [
            accuracy(names)]
        parts = [a for a in parts if a is not None]
        scores[section] = sum(parts) / len(parts) if parts else None
    sections = [v for v in scores.values() if v is not None]
    average = sum(sections) / len(sections) if sections else None
    return scores | {"average": average, "labelled": len(labelled), "pairs": len(subsets)}


def reward_bench_pairs(tokenizer, rows, args):
    """RewardBench rows -> pairs shaped like the sampled ones, y1 = chosen, y2 = rejected."""
    pairs = []
    for row in rows:
        if len(encode(tokenizer, row["prompt"])) > args.max_length - args.max_new_tokens:
            continue  # the same rule as for the prompt pools
        responses = [{"response": text, "token_ids": encode(tokenizer, row["prompt"], text)[1]}
                     for text in (row["chosen"], row["rejected"])]
        content = json.dumps([row[k] for k in ("prompt", "chosen", "rejected")]).encode()
        pair = {"id": hashlib.sha1(content).hexdigest()[:16], "prompt": row["prompt"],
                "subset": row["subset"], "response_1": responses[0], "response_2": responses[1],
                "samples": responses}
        pairs.append(dict(pair, sequences=pair_sequences(tokenizer, pair, args.max_length)))
    if not pairs:
        fail("every RewardBench prompt is longer than --max_length - --max_new_tokens")
    if len(pairs) < len(rows):
        say(f"note: {len(rows) - len(pairs)} of {len(rows)} RewardBench prompts are longer than "
            f"--max_length - --max_new_tokens and left out")
    return pairs


# --- Table 2's GSM8K and MMLU columns: zero-shot, read by prompts.py's two rules ---
def evaluate_models(args, tokenizer, tests, out):
    """Accuracy of M0 (SFT) .. M_T on each task by both rules -> {k: {task: {"flexible": a,
    "strict": a}}}; replies in eval/, a file per decoding, so neither reuses the other's."""
    (out / "eval").mkdir(exist_ok=True)
    decoding = "greedy" if args.eval_greedy else "sampled"
    limit = f"-first{args.eval_limit}" if args.eval_limit else ""
    results = {}

    def answers_of(k):  # seeded apart from training's sampling, so a rerun samples the same
        model = load_model(out / f"M{k}", args, seed=args.seed + 1000 * k + 5)
        return eval_answers(model, tokenizer, tests, args)
    for k in range(args.iterations + 1):
        rows = cached(out / "eval" / f"M{k}-{decoding}{limit}.jsonl", tests,
                      ("task", "prompt", "answer"), partial(answers_of, k))
        results[k] = {}
        for task in dict.fromkeys(row["task"] for row in rows):
            scored = [row for row in rows if row["task"] == task]
            results[k][task] = {rule: sum(row[f"correct_{rule}"] for row in scored) / len(scored)
                                for rule in ("flexible", "strict")}
    return results


def eval_answers(model, tokenizer, tests, args):
    """One reply per test question, sampled as section 4.1 says (greedy with --eval_greedy) ->
    rows with the reply, the answers the strict and the flexible rule read, and if each is right."""
    replies = data_parallel(partial(sample_responses, model.eval(), tokenizer, args=args,
                                    num_samples=1, greedy=args.eval_greedy),
                            [eval_prompt(row) for row in tests])
    return [dict(row, reply=reply["response"], **read_answers(row, reply["response"]))
            for row, (reply,) in zip(tests, replies)]


# --- Table 2's AlpacaEval 2.0 column: each M_k's answers, for the alpaca_eval tool to judge ---
def alpaca_eval_answers(args, tokenizer, instructions, out):
    """Each M_k's answer to every AlpacaEval instruction, sampled as section 4.1 decodes
    (--temperature 0.7, --top_p 0.9) and seeded -> alpaca_eval/M<k>.json: a list of
    {instruction, output, generator, dataset}, the model outputs alpaca_eval reads (README)."""
    folder = out / "alpaca_eval"
    folder.mkdir(exist_ok=True)

    def answers_of(k):
        model = load_model(out / f"M{k}", args, seed=args.seed + 1000 * k + 6)
        replies = data_parallel(partial(sample_responses, model, tokenizer, args=args,
                                        num_samples=1),
                                [row["instruction"] for row in instructions])
        return [{"instruction": row["instruction"], "output": reply["response"],
                 "generator": f"{Path(args.output_dir).name}-M{k}", "dataset": row["dataset"]}
                for row, (reply,) in zip(instructions, replies)]
    for k in range(args.iterations + 1):
        rows = cached(folder / f"M{k}.jsonl", instructions, ("instruction",),
                      partial(answers_of, k))
        write_text(folder / f"M{k}.json", json.dumps(rows, ensure_ascii=False, indent=1) + "\n")


# --- The final table: one row per model M_k, as in the paper's tables ---
METHOD_NAMES = {"scir": "Self-Consistent Internal Rewards",
                "srlm": "Self-Rewarding (LLM-as-a-Judge)",
                "irm": "Self-Rewarding (Implicit Reward Model)",
                "external": "External Reward Model"}


TASK_NAMES = {"gsm8k": "GSM8K", "mmlu": "MMLU"}


SAMPLING_KEYS = ("response_length", "too_long", "consistency_new", "counted_new")  # M_k's samples


TRAINING_KEYS = ("pairs", "loss", "consistency_loss", "dpo_loss", "dcpo_fraction",
                 "consistency_rate", "unusable_judgements", "consistency_trained",
                 "counted_trained")  # the training that made M_k, on D_{k-1}


def metrics_row(k, summary):
    """M_k's row: what its samples add (None until sampled) and how it was trained (summary)."""
    return ({"model": f"M{k}", "iteration": k} | dict.fromkeys(SAMPLING_KEYS)
            | {key: summary.get(key) for key in TRAINING_KEYS})


def sample_metrics(samples, too_long, summary):
    """What M_k's samples add to its row: their mean length in tokens, the prompts left out as
    too long, and Table 1's consistency of M_k on them (measured when M_{k+1} was trained)."""
    lengths = [len(s["token_ids"]) for row in samples for s in row["samples"]]
    return {"response_length": sum(lengths) / len(lengths), "too_long": too_long,
            "consistency_new": summary.get("consistency_new"),
            "counted_new": summary.get("counted_new")}


def task_title(task, args):
    """A task's column: the paper's name, or the task as eval.jsonl names it ('|' escaped for
    markdown), with the part scored (--eval_limit)."""
    title = TASK_NAMES.get(task, task).replace("|", "\\|")
    return title + (f" (first {args.eval_limit})" if args.eval_limit else "")


def final_table(args, rows):
    """Table 2's rows (GSM8K and MMLU by the flexible rule, then the strict), Table 1 / Figure 2's
    consistency on D_{t-1} and D_t, Figure 3's RewardBench accuracy (percentages) -> markdown."""
    def cell(value, spec):
        return "-" if value is None else format(100 * value if spec == "%" else value,
                                                ".2f" if spec == "%" else spec)
    header = ["Method", "Model", "Sample tokens", "Consistency D_t-1", "Consistency D_t", "Pairs",
              "DCPO %", "Loss"]
    with_reward_bench = any("reward_bench" in row for row in rows)
    if with_reward_bench:
        header += ["RewardBench IRM", "RewardBench GRM", "RewardBench IRM = GRM"]
    tasks = list(rows[0].get("evaluation", {}))
    header += [f"{task_title(task, args)}{suffix}"  # the flexible rule first, as the harness
               for task in tasks for suffix in ("", " strict")]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for k, row in enumerate(rows):
        cells = [METHOD_NAMES[args.method] if k == 0 else "", row["model"],
                 cell(row["response_length"], ".0f"), cell(row["consistency_trained"], "%"),
                 cell(row["consistency_new"], "%"), cell(row["pairs"], "d"),
                 cell(row["dcpo_fraction"], "%"), cell(row["loss"], ".4f")]
        if with_reward_bench:
            cells += [cell(row["reward_bench"][name]["average"], "%")
                      for name in ("irm", "grm", "consistency")]
        cells += [cell(row["evaluation"][task][rule], "%")
                  for task in tasks for rule in ("flexible", "strict")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# ======== Plumbing: files, data, models, optimizer and train, torchrun, flags, the demo ========
# --- Files, written to a temporary name and renamed: a crash leaves no half file; resume ---
def fail(message):
    """Stop with a one-line error and a non-zero exit, never a traceback (from rank 0 only). Open
    progress bars are closed first: else they close when the exit frees their frames, after the
    message, which is then not the last line."""
    for bar in list(tqdm._instances):
        bar.close()
    sys.exit(f"scir.py: error: {message}" if rank_and_world()[0] == 0 else 1)


def read_jsonl(path, required):
    """Rows of a data file, each with the non-empty string fields `required`."""
    rows = []
    with open(path, "rb") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line.decode("utf-8"))
            except UnicodeDecodeError:
                fail(f"{path}:{number}: not UTF-8 text")
            except json.JSONDecodeError as e:
                fail(f"{path}:{number}: not valid JSON ({e.msg})")
            if not isinstance(row, dict) or any(not isinstance(row.get(k), str) for k in required):
                fail(f"{path}:{number}: needs string fields {', '.join(required)}")
            for key in required:
                if not row[key].strip():
                    fail(f"{path}:{number}: empty {key}")
                try:
                    row[key].encode("utf-8")
                except UnicodeEncodeError:  # JSON allows a lone surrogate such as \ud800
                    fail(f"{path}:{number}: {key} holds a lone surrogate, which no tokenizer "
                         f"encodes")
            rows.append(row)
    if not rows:
        fail(f"{path} is empty")
    return rows


def write_text(path, text):
    """Written under a temporary name, then renamed: a crash never leaves half a file. Under
    torchrun rank 0 writes, and the other ranks wait for it."""
    if rank_and_world()[0] == 0:
        Path(f"{path}.tmp").write_text(text, encoding="utf-8")
        os.replace(f"{path}.tmp", path)
    barrier()


def write_jsonl(path, rows):
    write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def check_file(path, what=""):
    """A data file the run needs: one line if it is missing, or is not a file."""
    if not path.is_file():
        fail(f"{path} {'is not a file' if path.exists() else 'is missing'}{what}")


def cached(path, expected, keys, compute):
    """The rows of path if an earlier run wrote it (resume), else compute() written there; they
    must match `expected` row for row on `keys` (no keys: in number), or the file is stale. A
    file made by an earlier model than the one of that name now (deleted and redone: README) is
    made again."""
    exists = rank_0_sees(path.exists())
    recorded = makers_record(path.parent).get(path.name)  # None: made before records were kept
    if exists and rank_0_sees(recorded not in (None, made_by(path))):
        say(f"note: {path} was made by an earlier {' or '.join(made_by(path))}: made again")
        exists = False
    if not exists:
        rows = compute()
        write_jsonl(path, rows)
    else:
        rows = []
        with open(path, encoding="utf-8", errors="replace") as f:
            for number, line in enumerate(f, 1):
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    rows.append(None)
                if not isinstance(rows[-1], dict):
                    fail(f"{path}:{number} is damaged (not a JSON object): delete it to "
                         f"recompute it")
    check_ids(path, rows, expected, keys)
    record_makers(path)
    return rows


def made_by(path):
    """The models of this run that a file or model folder under out was made from, by where it
    lies: iter<k>/ and M<k> by M_{k-1} (an iteration samples and trains from it), eval/,
    reward_bench/ and alpaca_eval/ M<k>... by M_k -> {name: the id save_model gave it}."""
    path = Path(path)
    folder = path if re.fullmatch(r"M\d+", path.name) else path.parent
    out = folder.parent
    numbered = re.fullmatch(r"(?:M|iter)(\d+)", folder.name)
    if numbered:
        names = [f"M{int(numbered[1]) - 1}"] if int(numbered[1]) > 0 else []
    else:
        names = re.findall(r"^(M\d+)(?=[-.])", path.name)
    return {name: model_id(out / name) for name in names}


def model_id(path):
    """The id save_model gave the model folder at path; None for one without (a base model, or
    one saved before ids were kept)."""
    return provenance(path)["id"]


def provenance(path):
    """A model folder's provenance.json, {id, made_by}; empty for a folder without one."""
    try:
        return json.loads((Path(path) / "provenance.json").read_text())
    except (OSError, ValueError):
        return {"id": None, "made_by": {}}


def makers_record(folder):
    """A folder's made_by.json: {cached file's name: its made_by when written}; {} if none."""
    try:
        return json.loads((folder / "made_by.json").read_text())
    except (OSError, ValueError):
        return {}


def record_makers(path):
    """Record made_by(path) for the cached file at path in its folder's made_by.json."""
    record = makers_record(path.parent)
    if rank_0_sees(record.get(path.name) != made_by(path)):  # every rank reaches write_text
        write_text(path.parent / "made_by.json",
                   json.dumps(record | {path.name: made_by(path)}, indent=1))


def check_ids(path, rows, expected, keys=("id",)):
    """A cached file holds one row per expected row, in order, with the same keys: else stale."""
    if [[row.get(k) for k in keys] for row in rows] != [[row[k] for k in keys] for row in expected]:
        fail(f"{path} does not match this run's data or its earlier steps: delete it to recompute")


def cached_logps(path, model_path, sequences, tokenizer, args):
    """batched_logps under the model at model_path, cached in path -> [float]."""
    def score():
        return [{"logp": v} for v in batched_logps(
            load_model(model_path, args), sequences, tokenizer.pad_token_id, args.score_batch_size,
            f"log-probs under {model_path}")]
    return [row["logp"] for row in cached(path, sequences, (), score)]


@contextlib.contextmanager
def locked(out):
    """out, created and locked for this run; Ctrl-C or an OSError (a full disk) ends in one line."""
    import fcntl  # Unix only, like the lock it takes

    try:
        out.mkdir(parents=True, exist_ok=True)
        with open(out / ".lock", "a") as lock:  # "a": an existing lock file is not even touched
            try:  # rank 0 holds it for all the ranks of a torchrun
                if rank_and_world()[0] == 0:
                    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # freed however it ends
            except BlockingIOError:
                fail(f"another run is using {out}: wait for it to end, or use another --output_dir")
            yield
    except KeyboardInterrupt:
        fail("interrupted; rerun the same command to resume where it stopped")
    except OSError as e:
        fail(f"{e.filename or out}: {e.strerror or e}; rerun the same command to resume once "
             f"that is fixed")


def finish(text):
    """The run's last steps, once every file is written: say text and leave torchrun's group. A
    Ctrl-C from here on, the interpreter's teardown included, is ignored: nothing is left to do,
    so the run ends with exit 0 and text as its last line (README: Ctrl-C). Only when this file
    is the program: a caller of main keeps its own Ctrl-C."""
    if __name__ == "__main__":
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # kept through teardown, unlike a handler
    say(text)
    if dist.is_initialized():
        dist.destroy_process_group()


# --- Data (Appendix C.1): Alpaca + LIMA + oasst2 pairs, RewardBench, GSM8K and MMLU ---
def load_hub_data(args):
    """(SFT rows, judge pairs, prompts, no pointwise judgements): Alpaca prompts not used in SFT
    are the prompt pool."""
    from datasets import load_dataset

    def load(repo, **kwargs):
        try:
            return load_dataset(repo, split="train", **kwargs)
        except Exception as e:
            fail(f"cannot load dataset {repo} ({type(e).__name__}; LIMA is gated: accept its terms "
                 f"and log in); offline, pass --data_dir DIR with sft.jsonl, judge.jsonl and "
                 f"prompts.jsonl (see README)")

    alpaca = [{"prompt": r["instruction"] + (f"\n\n{r['input']}" if r["input"].strip() else ""),
               "response": r["output"]} for r in load("tatsu-lab/alpaca")]
    random.Random(args.seed).shuffle(alpaca)
    sft = []  # --judge_sft_only: the judge examples alone (section 4.1)
    if not args.judge_sft_only:  # Alpaca, and LIMA's first exchange (30 of 1,030 have more)
        lima = load("GAIR/lima", revision="refs/convert/parquet")
        sft = alpaca[: args.sft_examples] + [
            {"prompt": r["conversations"][0], "response": r["conversations"][1]}
            for r in lima if len(r["conversations"]) >= 2]
    judge = [{"prompt": r["prompt"].removeprefix("prompter: ").strip(), "chosen": r["chosen"],
              "rejected": r["rejected"]} for r in load("monology/oasst2_dpo")
             if r["lang"] == "en" and "\nassistant: " not in r["prompt"] and r["rejected"].strip()
             and r["chosen"].strip() != r["rejected"].strip()]  # single-turn, a side to prefer
    return sft, judge, [{"prompt": row["prompt"]} for row in alpaca[args.sft_examples:]], []


def load_data(args):
    """(SFT rows, judge pairs, prompts, pointwise judgements) from the Hub or from --data_dir,
    checked; the Hub has no pointwise judgements (README: Data)."""
    if args.data_dir is None:
        return load_hub_data(args)
    data_dir = Path(args.data_dir)
    if not data_dir.is_dir():
        fail(f"--data_dir {data_dir} is not a folder")
    needed = {"sft.jsonl": ["prompt", "response"], "judge.jsonl": ["prompt", "chosen", "rejected"],
              "prompts.jsonl": ["prompt"]}
    if args.judge_sft_only:
        del needed["sft.jsonl"]
    for name in needed:
        check_file(data_dir / name)
    if args.method == "srlm" and (data_dir / "pointwise.jsonl").is_file():
        needed["pointwise.jsonl"] = ["prompt", "response", "judgement"]
    rows = {name: read_jsonl(data_dir / name, keys) for name, keys in needed.items()}
    for number, row in enumerate(rows["judge.jsonl"], 1):  # such a pair has nothing to prefer
        if row["chosen"].strip() == row["rejected"].strip():
            fail(f"{data_dir / 'judge.jsonl'}: row {number}: chosen and rejected are the same text")
    for number, row in enumerate(rows.get("pointwise.jsonl", []), 1):
        if parse_score(row["judgement"]) is None:
            fail(f"{data_dir / 'pointwise.jsonl'}: row {number}: the judgement gives no score "
                 f"'Score: N' (N in 0..5)")
    return (rows.get("sft.jsonl", []), rows["judge.jsonl"], rows["prompts.jsonl"],
            rows.get("pointwise.jsonl", []))


def load_reward_bench(args):
    """RewardBench's filtered split, or rewardbench.jsonl in --data_dir: pairs with a gold label."""
    if args.data_dir is None:
        from datasets import load_dataset
        try:
            rows = list(load_dataset("allenai/reward-bench", split="filtered"))
        except Exception as e:
            fail(f"cannot load dataset allenai/reward-bench ({type(e).__name__}); offline, put "
                 f"rewardbench.jsonl in --data_dir (see README)")
        source = "allenai/reward-bench"
    else:
        source = Path(args.data_dir) / "rewardbench.jsonl"
        check_file(source, " (--eval_reward_bench)")
        rows = read_jsonl(source, ["prompt", "chosen", "rejected", "subset"])
    known = {name for names in REWARD_BENCH_SECTIONS.values() for name in names}
    for number, row in enumerate(rows, 1):
        if row["subset"] not in known:
            fail(f"{source}: row {number}: subset {row['subset']!r} is in none of Chat, Chat Hard, "
                 f"Safety, Reasoning")
    usable = [row for row in rows if row["chosen"].strip() and row["rejected"].strip()
              and row["chosen"] != row["rejected"]]
    if len(usable) < len(rows):
        say(f"note: {len(rows) - len(usable)} RewardBench pairs with an empty side or the same "
            f"text on both sides are left out: no reward model can label them")
    return usable


def load_eval_data(args):
    """Table 2's GSM8K and MMLU test questions, or eval.jsonl in --data_dir -> [{task, prompt,
    answer}]: a letter (options written 'A. ...' in the prompt) or a number."""
    if args.data_dir is not None:
        path = Path(args.data_dir) / "eval.jsonl"
        check_file(path, " (--evaluate)")
        tests = read_jsonl(path, ["task", "prompt", "answer"])
        for number, row in enumerate(tests, 1):
            if answer_kind(row["answer"]) is None:
                fail(f"{path}: row {number}: answer {row['answer']!r} is neither a letter A-E "
                     f"nor a number")
        return tests
    from datasets import load_dataset
    try:
        gsm8k = load_dataset("openai/gsm8k", "main", split="test")
        mmlu = load_dataset("cais/mmlu", "all", split="test")
    except Exception as e:
        fail(f"cannot load GSM8K or MMLU ({type(e).__name__}); offline, put eval.jsonl in "
             f"--data_dir (see README)")
    tests = [{"task": "gsm8k", "prompt": r["question"],
              "answer": r["answer"].split("####")[-1].strip().replace(",", "")} for r in gsm8k]
    return tests + [{"task": "mmlu", "prompt": r["question"] + "".join(
        f"\n{'ABCD'[i]}. {choice}" for i, choice in enumerate(r["choices"])),
        "answer": "ABCD"[r["answer"]]} for r in mmlu]


def alpaca_eval_instructions(tokenizer, args):
    """AlpacaEval's 805 instructions (tatsu-lab/alpaca_eval), or alpaca_eval.jsonl in --data_dir
    -> [{instruction, dataset}], each leaving room to answer."""
    if args.data_dir is not None:
        source = Path(args.data_dir) / "alpaca_eval.jsonl"
        check_file(source, " (--alpaca_eval)")
        rows = read_jsonl(source, ["instruction"])
    else:
        from datasets import load_dataset
        source = "tatsu-lab/alpaca_eval"
        try:
            rows = list(load_dataset("json", split="train", data_files=(
                "hf://datasets/tatsu-lab/alpaca_eval/alpaca_eval.json")))
        except Exception as e:
            fail(f"cannot load dataset {source} ({type(e).__name__}); offline, put "
                 f"alpaca_eval.jsonl in --data_dir (see README)")
    for number, row in enumerate(rows, 1):
        if len(encode(tokenizer, row["instruction"])) > args.max_length - args.max_new_tokens:
            fail(f"{source}: row {number}: the instruction is longer than --max_length - "
                 f"--max_new_tokens")
    return [{"instruction": row["instruction"], "dataset": str(row.get("dataset") or "")}
            for row in rows]


# --- Everything checked before the first file is written ---
def prepare(args, out):
    """Data, tokenizer and models checked, the prompt pool of each iteration, then args.json ->
    (tokenizer, identifier ids, SFT rows, judge rows, [(pool, too long)], RewardBench pairs,
    test questions)."""
    if args.demo:  # the demo's own model and data, where no flag names others
        demo_model, demo_data = build_demo(out)
        args.model, args.data_dir = args.model or demo_model, args.data_dir or demo_data
    sft_rows, judge_rows, prompt_rows, pointwise_rows = load_data(args)
    # pointwise rows only where given: a run made before they existed keeps its hash
    data = json.dumps([sft_rows, judge_rows, prompt_rows] + [pointwise_rows] * bool(
        pointwise_rows)).encode()
    bench_rows = load_reward_bench(args) if args.eval_reward_bench else None
    tokenizer = load_tokenizer(args.model)
    try:
        identifier_ids = identifier_token_ids(tokenizer)
    except ValueError as e:
        fail(str(e))
    check_models(args, tokenizer)
    pools = iteration_pools(tokenizer, prompt_rows, args)
    bench = reward_bench_pairs(tokenizer, bench_rows, args) if args.eval_reward_bench else None
    tests = eval_questions(tokenizer, load_eval_data(args), args) if args.evaluate else None
    instructions = alpaca_eval_instructions(tokenizer, args) if args.alpaca_eval else None
    check_same_settings(out, args, hashlib.sha256(data).hexdigest())  # from here on, files
    if args.method == "srlm":  # SRLM's judge learns from pointwise judgements (App. C.1)
        judge_rows = pointwise_rows
    return tokenizer, identifier_ids, sft_rows, judge_rows, pools, bench, tests, instructions


def iteration_pools(tokenizer, prompt_rows, args):
    """The prompts shuffled by the seed, less the first --prompt_offset, then each iteration's
    --num_prompts fresh ones, less those too long to sample -> [(pool, number left out)]."""
    random.Random(args.seed).shuffle(prompt_rows)  # the same for every run with this --seed
    prompt_rows = prompt_rows[args.prompt_offset:]
    if len(prompt_rows) < args.iterations * args.num_prompts:
        say(f"note: {len(prompt_rows)} prompts for {args.iterations} x {args.num_prompts}: "
            f"each iteration gets {len(prompt_rows) // args.iterations}")
    size = min(args.num_prompts, len(prompt_rows) // args.iterations)
    if size == 0:
        fail(f"{len(prompt_rows)} prompts cannot be shared by {args.iterations} iterations")
    pools = []
    for t in range(1, args.iterations + 1):
        rows = prompt_rows[(t - 1) * size: t * size]
        pool = [{"id": f"{t}-{j}", "prompt": row["prompt"]} for j, row in enumerate(rows)
                if len(encode(tokenizer, row["prompt"])) <= args.max_length - args.max_new_tokens]
        if not pool:
            fail(f"every prompt of iteration {t} is longer than --max_length - --max_new_tokens")
        pools.append((pool, len(rows) - len(pool)))
    return pools


def eval_questions(tokenizer, tests, args):
    """The test questions scored (each task's first --eval_limit), each leaving room to reply."""
    scored, seen = [], {}
    for number, row in enumerate(tests, 1):
        seen[row["task"]] = seen.get(row["task"], 0) + 1
        if args.eval_limit and seen[row["task"]] > args.eval_limit:
            continue
        if len(encode(tokenizer, eval_prompt(row))) > args.max_length - args.max_new_tokens:
            source = Path(args.data_dir) / "eval.jsonl" if args.data_dir else "the test split"
            fail(f"{source}: row {number} (task {row['task']}): the question is longer than "
                 f"--max_length - --max_new_tokens")
        scored.append(row)
    return scored


def check_models(args, tokenizer):
    """The tokenizer fits every model of the run, and the judge's template fits --max_length."""
    check_vocabulary(args.model, tokenizer, "--model")
    if args.global_reference not in (None, args.model):
        check_vocabulary(args.global_reference, tokenizer, "--global_reference")
        probe = chat_prompt(tokenizer, judge_prompts("Any question?", "One answer.",
                                                     "Another one.")[0][0])
        reference = load_tokenizer(args.global_reference)
        if (len(reference) != len(tokenizer)
                or reference(probe).input_ids != tokenizer(probe).input_ids):
            fail(f"--global_reference {args.global_reference!r} has another tokenizer than "
                 f"--model: Eq. 4 needs both to give the same token ids")
    if args.method == "external":
        check_reward_model(args.reward_model)
    if args.method == "scir":  # the pairwise prompts, read after '[['
        templates, prefix = [text for text, _ in judge_prompts("", "", "")], ANSWER_PREFIX
    else:  # Table 6's prompt, answered by a sampled judgement
        templates, prefix = [fill_pointwise("", "")], ""
    overhead = max(len(encode(tokenizer, text, answer_prefix=prefix)) for text in templates)
    if args.max_length < overhead + 2:
        fail(f"--max_length {args.max_length} cannot hold the judge prompt: its template alone "
             f"takes {overhead} tokens")


# --- Models, one resident at a time (reference log-probs are precomputed) ---
def torch_dtype(args):
    if args.dtype == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return {"bfloat16": torch.bfloat16, "float32": torch.float32}[args.dtype]


def first_line(error):
    return f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"


def load_tokenizer(path):
    if str(path).startswith(("/", ".", "~")) and not Path(path).expanduser().exists():
        fail(f"model {path!r}: no such folder")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception as e:
        fail(f"cannot load the tokenizer of {path!r} ({first_line(e)})")
    if tokenizer.eos_token_id is None:
        fail(f"the tokenizer of {path!r} has no EOS token")
    if tokenizer.pad_token_id is None:  # base Mistral has none; padding is masked out everywhere
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(path, args, seed=None, model_class=AutoModelForCausalLM):
    """The model at path on the device, in eval mode; then torch is seeded, so that sampling and
    stochastic rounding repeat on a rerun."""
    try:
        model, info = model_class.from_pretrained(path, dtype=torch_dtype(args),
                                                  output_loading_info=True)
    except Exception as e:
        fail(f"cannot load model {path!r} ({first_line(e)})")
    if info["missing_keys"]:  # transformers would only warn and start them from random values
        missing = sorted(info["missing_keys"])
        fail(f"model {str(path)!r} lacks {len(missing)} weights, {missing[0]} among them: "
             f"a damaged checkpoint")
    model = model.to("cuda" if torch.cuda.is_available() else "cpu").eval()
    if seed is not None:
        torch.manual_seed(seed)
    return model


def no_transformers_bars(factory, args, kwargs):
    """transformers' own progress bars ('Loading weights' at every model load, 'Writing model
    shards' at every save) off: they would bury the run's bars. The Hub's download bars stay."""
    return factory(*args, **(kwargs | {"disable": True}))


hf_logging.set_tqdm_hook(no_transformers_bars)  # on import: before the first load or save


def check_reward_model(path):
    """Before SFT, --reward_model as Table 2's external baseline loads it, read cheaply: config,
    chat template, an embedding for every token of its tokenizer, and, in a local folder,
    weights, the score head among them (read from the safetensors headers)."""
    flag = f"--reward_model {str(path)!r}"
    if str(path).startswith(("/", ".", "~")) and not Path(path).expanduser().is_dir():
        fail(f"{flag}: no such folder")
    tokenizer = reward_model_tokenizer(path)
    try:
        config = AutoConfig.from_pretrained(path)
    except Exception as e:
        fail(f"cannot read the config of {flag} ({first_line(e)})")
    if config.num_labels != 1 or not any(a.endswith("ForSequenceClassification")
                                         for a in config.architectures or []):
        fail(f"{flag} is not a reward model (a sequence classifier with one output)")
    if len(tokenizer) > config.get_text_config().vocab_size:
        fail(f"{flag} embeds {config.get_text_config().vocab_size} tokens, but its tokenizer has "
             f"{len(tokenizer)}")
    folder = Path(path).expanduser()
    if folder.is_dir():  # a Hub id is checked when it loads
        names = set()
        for weights in folder.glob("*.safetensors"):
            with open(weights, "rb") as f:
                header_size = int.from_bytes(f.read(8), "little")
                names |= set(json.loads(f.read(header_size)))
        if not names and not any(folder.glob("*.bin")):
            fail(f"{flag} has no weights (*.safetensors or *.bin)")
        if names and not any(name.split(".")[-2:] == ["score", "weight"] for name in names):
            fail(f"{flag} has no score head (score.weight) among its weights")


def check_vocabulary(path, tokenizer, flag):
    """Before any training: the model at path must embed every token of the run's tokenizer."""
    try:
        vocab_size = AutoConfig.from_pretrained(path).vocab_size
    except Exception as e:
        fail(f"cannot read the config of {flag} {path!r} ({type(e).__name__})")
    if len(tokenizer) > vocab_size:
        fail(f"{flag} {path!r} embeds {vocab_size} tokens, but its tokenizer has {len(tokenizer)}")


def model_ready(path):
    """True if a finished model folder is at path (resume), False if none; a damaged one stops."""
    path = Path(path)
    if not rank_0_sees(path.exists()):
        return False
    weights = list(path.glob("*.safetensors")) + list(path.glob("*.bin"))
    try:
        json.loads((path / "training_summary.json").read_text())
        json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        weights = []
    if not weights:
        fail(f"{path} is incomplete or damaged: delete it, and rerun to redo it")
    stale = [name for name, made in provenance(path)["made_by"].items()
             if made != model_id(path.parent / name)]
    if rank_0_sees(stale):
        fail(f"{path} was trained on data of an earlier {stale[0]}: delete it and the models "
             f"after it, and rerun to redo them")
    return True


def save_model(model, tokenizer, path, summary):
    """save_pretrained into a temporary folder, then rename: a folder M<k> is always complete.
    Under torchrun rank 0 writes, and the other ranks wait for it."""
    if rank_and_world()[0] == 0:
        tmp = Path(f"{path}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        model.config.use_cache = True  # training turned it off; a saved model is for generation
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "training_summary.json").write_text(json.dumps(summary, indent=1))
        (tmp / "provenance.json").write_text(json.dumps(
            {"id": uuid.uuid4().hex, "made_by": made_by(path)}, indent=1))  # see made_by
        os.replace(tmp, path)
    barrier()


# --- The float32 LM head, a vocabulary slice at a time, and the KV cache on CPU ---
VOCAB_SLICE = 8192  # LM-head rows per float32 slice: [N, 8192] float32 blocks, never [N, V]


class TokenLogps(torch.autograd.Function):
    """log pi(target) = logit[target] - logsumexp(logits), logits = hidden @ weight^T (+ bias) in
    float32, VOCAB_SLICE head rows at a time: no [N, V] tensor, no float32 copy of the head (at
    Llama-3's 128K vocabulary that keeps a training step under 65 GiB: README). The backward pass
    recomputes each slice; d logp / d logits = onehot(target) - softmax.
    hidden [N, H], weight [V, H], bias [V] or None, targets [N] -> [N] float32.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets):
        h = hidden.float()
        lse = torch.full((h.shape[0],), -math.inf, device=h.device)
        target_logits = torch.zeros_like(lse)
        for start in range(0, weight.shape[0], VOCAB_SLICE):
            rows = slice(start, start + VOCAB_SLICE)
            logits = h @ weight[rows].float().T  # [N, VOCAB_SLICE]
            if bias is not None:
                logits += bias[rows].float()
            lse = torch.logaddexp(lse, logits.logsumexp(-1))
            inside = (targets >= start) & (targets < start + logits.shape[1])
            column = (targets - start).clamp(0, logits.shape[1] - 1)[:, None]
            target_logits += logits.gather(1, column).squeeze(1) * inside
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        return target_logits - lse

    @staticmethod
    def backward(ctx, grad):  # grad [N]
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        h = hidden.float()
        grad_hidden, grad_weight = torch.zeros_like(h), torch.empty_like(weight)
        grad_bias = None if bias is None else torch.empty_like(bias)
        for start in range(0, weight.shape[0], VOCAB_SLICE):
            rows = slice(start, start + VOCAB_SLICE)
            w = weight[rows].float()
            logits = h @ w.T
            if bias is not None:
                logits += bias[rows].float()
            grad_logits = (logits - lse[:, None]).exp_().mul_(-grad[:, None])  # -softmax * grad
            inside = (targets >= start) & (targets < start + w.shape[0])
            column = (targets - start).clamp(0, w.shape[0] - 1)[:, None]
            grad_logits.scatter_add_(1, column, (grad * inside)[:, None])  # + onehot * grad
            grad_hidden.addmm_(grad_logits, w)
            grad_weight[rows] = grad_logits.T @ h
            if bias is not None:
                grad_bias[rows] = grad_logits.sum(0)
        return grad_hidden.to(hidden.dtype), grad_weight, grad_bias, None


def token_logps(hidden, targets, head):
    """log pi(target) through a float32 LM head: hidden [N, H], targets [N] -> [N] float32."""
    return TokenLogps.apply(hidden, head.weight, head.bias, targets)


def cache_config(model, num_requests, longest):
    """generate_batch sizes its paged KV cache from free GPU memory; on CPU (~15 GB) size it to the
    work instead."""
    if model.device.type != "cpu":
        return None
    return ContinuousBatchingConfig(num_blocks=num_requests * math.ceil(longest / 256),
                                    max_batch_tokens=512)


# --- AdamW in float32, written back to bfloat16 with stochastic rounding (README) ---
def stochastic_round_to_bf16(x):
    """float32 -> bfloat16, rounded up with probability equal to the distance: E[result] = x."""
    noise = torch.randint_like(x, 0, 1 << 16, dtype=torch.int32)  # below bfloat16's last bit
    bits = x.view(torch.int32) + noise
    return (bits >> 16).to(torch.int16).view(torch.bfloat16)  # a float32's high 16 bits


@torch.no_grad()
def adamw_step(params, state, lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
               slice_size=1 << 25):
    """One AdamW step (Loshchilov & Hutter) in float32; m and v are kept in the parameter's dtype.

    Each tensor is updated in flat slices: the float32 temporaries stay small even for a 128K-row
    embedding.
    """
    state["step"] = step = state.get("step", 0) + 1
    for p in params:
        if p.grad is None:
            continue
        local, local_grad = (t.to_local() if isinstance(t, DTensor) else t for t in (p, p.grad))
        if p not in state:  # under FSDP2, each rank steps its own shard
            state[p] = (torch.zeros_like(local), torch.zeros_like(local))
        flat = [t.view(-1) for t in (local, local_grad, *state[p])]
        for start in range(0, local.numel(), slice_size):
            weight, grad, m, v = (t[start: start + slice_size] for t in flat)
            grad = grad.float()
            m32 = m.float().lerp_(grad, 1 - betas[0])
            v32 = v.float().mul_(betas[1]).addcmul_(grad, grad, value=1 - betas[1])
            weight32 = weight.float().mul_(1 - lr * weight_decay)
            denom = (v32 / (1 - betas[1] ** step)).sqrt_().add_(eps)
            weight32.addcdiv_(m32, denom, value=-lr / (1 - betas[0] ** step))
            for stored, result in ((weight, weight32), (m, m32), (v, v32)):
                bf16 = stored.dtype == torch.bfloat16  # else float32 (CPU): a plain copy
                stored.copy_(stochastic_round_to_bf16(result) if bf16 else result)


def learning_rate(step, total_steps, peak, warmup_ratio):
    """1) linear warmup over warmup_ratio of the steps, 2) cosine decay to zero."""
    warmup = max(1, int(warmup_ratio * total_steps))
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total_steps - warmup)))


# --- The training loop ---
def train(model, batches, loss_fn, lr_flag, args, desc):
    """Gradient accumulation, clipping, AdamW at args.<lr_flag> -> mean metrics; a non-finite loss,
    gradient or weight stops the run before anything is saved. loss_fn(model, batch) -> (metrics,
    detached passes: see backward)."""
    lr = getattr(args, lr_flag)
    stop = (f" with --{lr_flag} {lr}; nothing was saved, and the models before it are intact "
            f"(README)")
    shard_for_training(model)  # torchrun: FSDP2; one process: nothing
    model.train()
    model.config.use_cache = False
    model.activation_checkpointing_enable()
    params = [p for p in model.parameters() if p.requires_grad]
    state, totals, count = {}, {}, 0
    steps = [share_of(batches[i: i + args.grad_accum])  # one process: all, at 1 / len(step)
             for i in range(0, len(batches), args.grad_accum)]
    bar = tqdm(total=sum(map(len, steps)), desc=desc, disable=rank_and_world()[0] > 0)
    for step, share in enumerate(steps):  # the last step may have fewer micro-batches
        for j, (batch, weight) in enumerate(share):
            metrics, detached = loss_fn(model, batch)
            loss = summed(metrics["loss"].detach())  # torchrun: a NaN on one rank stops them all
            if not torch.isfinite(loss):
                fail(f"{desc}: the loss became {loss.item()} at micro-batch "
                     f"{step * args.grad_accum + j}{stop}")
            backward(model, metrics["loss"] * weight, detached)
            if weight:  # torchrun's weight-0 repeats count in no metric
                count += 1
                for k, v in metrics.items():
                    totals[k] = totals.get(k, 0.0) + v.item()
            bar.update()
            bar.set_postfix(loss=f"{totals['loss'] / max(count, 1):.4f}")
        norm = torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
        if not torch.isfinite(norm.full_tensor() if isinstance(norm, DTensor) else norm):
            fail(f"{desc}: the gradients became non-finite at micro-batch "
                 f"{step * args.grad_accum + len(share) - 1}{stop}")
        adamw_step(params, state, learning_rate(step, len(steps), lr, args.warmup_ratio))
        model.zero_grad(set_to_none=True)
    if not all_finite(params, model.device):  # the last update is seen by no loss
        fail(f"{desc}: the weights became non-finite{stop}")
    model.eval()
    return mean_metrics(totals, count, model.device)


def backward(model, loss, detached):
    """loss.backward(); then, for a loss taken on detached copies of forward outputs (detached:
    [(outputs, copies)], scir_batch_loss), each forward pass's own backward with the gradients
    its copies received."""
    loss.backward()
    passes = [(outputs, copies) for outputs, copies in detached
              if any(output.requires_grad for output in outputs)]
    for k, (outputs, copies) in enumerate(passes):
        before_backward_pass(model, last=k == len(passes) - 1)  # torchrun: FSDP2's resharding
        torch.autograd.backward(outputs, [copy.grad for copy in copies])


def micro_batches(items, batch_size, seed):
    """Shuffle with a fixed seed and cut into micro-batches."""
    items = list(items)
    random.Random(seed).shuffle(items)
    return [items[i: i + batch_size] for i in range(0, len(items), batch_size)]


def epoch_batches(pairs, args, t):
    """Iteration t + 1's micro-batches of pairs, reshuffled each epoch."""
    return [batch for epoch in range(args.epochs)
            for batch in micro_batches(pairs, args.batch_size, args.seed + t + epoch)]


def load_and_train(args, path, batches, loss_fn, lr_flag, seed, desc):
    """train the model at path; the seed fixes stochastic rounding -> (the trained model, whole
    on every rank, and its mean metrics)."""
    model = load_model(path, args, seed=seed)
    metrics = train(model, batches, loss_fn, lr_flag, args, desc)
    return whole(model), metrics


# --- Several GPUs under torchrun: FSDP2 to train, data parallel to sample and score ---
def start_processes():
    """Under torchrun, join the other processes: one GPU each (NCCL), or CPU cores (gloo, tests)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")


def say(text, file=None):
    """print, from rank 0 only under torchrun."""
    if rank_and_world()[0] == 0:
        print(text, file=file or sys.stdout)


def rank_and_world():
    """(this process's rank, number of processes): (0, 1) without torchrun."""
    if not dist.is_initialized():
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def barrier():
    if dist.is_initialized():
        dist.barrier()


def rank_0_sees(value):
    """Rank 0's value on every rank, such as whether a file exists: the ranks skip work alike."""
    if not dist.is_initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def summed(tensor):
    """A tensor summed over the ranks (a NaN on one rank is seen by all)."""
    if dist.is_initialized():
        tensor = tensor.clone()
        dist.all_reduce(tensor)
    return tensor


def data_parallel(work, items):
    """work(items) shared out: rank r takes every world-th item from the r-th, and every rank
    gets all the results back in the items' order."""
    rank, world = rank_and_world()
    if world == 1:
        return work(items)
    share = items[rank::world]
    shares = [None] * world
    dist.all_gather_object(shares, work(share) if share else [])
    results = [None] * len(items)
    for r, part in enumerate(shares):
        results[r::world] = part
    return results


def share_of(group):
    """This process's micro-batches of one optimizer step, each with its loss weight: one
    process takes all at 1 / len(group); under torchrun rank r takes group[r::world] at
    world / len(group), and where a short last step leaves a rank fewer than the others (or
    none), it repeats the first at weight 0, so FSDP2's collectives stay in step."""
    rank, world = rank_and_world()
    share = [(batch, world / len(group)) for batch in group[rank::world]]
    repeats = math.ceil(len(group) / world) - len(share)
    return share + [(group[0], 0.0)] * repeats


def sharded_decoder_states(model, **inputs):
    """decoder_states of a model sharded by FSDP2: it gathers its embedding and head only in its
    own forward, so that runs, with the head at one position, and a hook keeps the states."""
    states = []

    def keep(module, args, output):
        states.append(output.last_hidden_state)
    hook = model.get_decoder().register_forward_hook(keep)
    model(**inputs, use_cache=False, logits_to_keep=1)
    hook.remove()
    return states[0]


def before_backward_pass(model, last):
    """Under FSDP2 the root module (embedding, head) stays gathered until the last of a
    micro-batch's backward passes, whose head the later ones saved; each layer is gathered again
    when activation checkpointing recomputes it. One process: nothing."""
    if isinstance(model, FSDPModule):
        model.set_reshard_after_backward(last, recurse=False)
        model.set_is_last_backward(last)


def all_finite(tensors, device):
    """True if every tensor (under FSDP2, every rank's shard of it) is finite on every rank."""
    bad = sum(not torch.isfinite(t.to_local() if isinstance(t, DTensor) else t).all()
              for t in tensors)
    return summed(torch.tensor(float(bad), device=device)).item() == 0


def mean_metrics(totals, count, device):
    """Metrics summed over count micro-batches on each rank -> their means over all ranks."""
    sums = summed(torch.tensor([count, *totals.values()], dtype=torch.float64, device=device))
    return {k: v / sums[0].item() for k, v in zip(totals, sums[1:].tolist())}


def shard_for_training(model):
    """FSDP2 (ZeRO-3) under torchrun: each decoder layer, then the rest, split across the ranks;
    weights, gradients and AdamW's m and v are each rank's shard. One process: nothing."""
    if rank_and_world()[1] == 1:
        return
    for layer in model.get_decoder().layers:
        fully_shard(layer)
    fully_shard(model)


def whole(model):
    """A model trained under FSDP2, whole again on every rank, to score and sample in data
    parallel and to be saved; in one process, the model as it is."""
    if not isinstance(model, FSDPModule):
        return model
    state_dict = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    model.config.architectures = [type(model).__mro__[2].__name__]  # not FSDP<name>
    weight = next(iter(state_dict.values()))
    with torch.device(weight.device):
        copy = AutoModelForCausalLM.from_config(model.config, dtype=weight.dtype)
    copy.load_state_dict(state_dict)
    copy.generation_config = model.generation_config
    return copy.eval()


# --- Flags, checked before anything runs, and a folder's settings ---
def given_flags(argv):
    """Names of the flags written on the command line ('--name value' or '--name=value')."""
    return {arg[2:].split("=")[0] for arg in argv if arg.startswith("--")}


def parse_args(argv=None):
    """Args from the command line: --demo's and --judge_sft_only's settings where no flag is
    written, then every check that needs no file."""
    argv = sys.argv[1:] if argv is None else [str(arg) for arg in argv]
    parser = HfArgumentParser(Args)
    parser.allow_abbrev = False  # --num_sample is a typo, not --num_samples
    args, unknown = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    if unknown:
        fail(f"unknown argument {unknown[0]!r} (see --help)")
    given = given_flags(argv)  # a flag written out wins, even when it repeats the default
    for enabled, overrides in ((args.demo, DEMO), (args.judge_sft_only, JUDGE_SFT_ONLY)):
        for name, value in overrides.items():
            if enabled and name not in given:
                setattr(args, name, value)
    if args.demo and "model" not in given:  # the demo's own model, built in the output folder
        args.model = None
    check_args(args)
    check_method(args, given)
    if args.output_dir is not None and Path(args.output_dir).exists() and not Path(
            args.output_dir).is_dir():
        fail(f"--output_dir {args.output_dir} is a file, not a folder")
    if args.output_dir is None:  # a baseline never shares SCIR's folder
        method = "" if args.method == "scir" else f"{args.method}-"
        args.output_dir = f"runs/scir-{method}{'demo' if args.demo else Path(args.model).name}"
    return args


def must_be(value, valid):
    """What value must be to lie in valid ('[1,inf)', '(0,1]', '{a,b}'), None if it does."""
    if valid.startswith("{"):
        choices = valid[1:-1].split(",")
        return None if value in choices else f"{', '.join(choices[:-1])} or {choices[-1]}"
    if not math.isfinite(value):
        return "a finite number"
    low, high = valid[1:-1].split(",")
    above = value > float(low) if valid[0] == "(" else value >= float(low)
    below = value < float(high) if valid[-1] == ")" else value <= float(high)
    if above and below:
        return None
    if high == "inf":
        return f"{'above' if valid[0] == '(' else 'at least'} {low}"
    return f"in {valid[0]}{low}, {high}{valid[-1]}"


def check_args(args):
    """Every flag within the values Args gives it, and the flags that bound each other."""
    for f in fields(Args):
        value, valid = getattr(args, f.name), f.metadata.get("metavar")
        what = None if value is None or valid is None else must_be(value, valid)
        if what:
            shown = repr(value) if isinstance(value, str) else value
            fail(f"--{f.name} must be {what}, got {shown}")
    if args.max_length <= args.max_new_tokens:
        fail(f"--max_length {args.max_length} leaves no room for a prompt with --max_new_tokens "
             f"{args.max_new_tokens}")
    world = rank_and_world()[1]
    if args.grad_accum % world:
        fail(f"--grad_accum {args.grad_accum} must be a multiple of the {world} processes (each "
             f"takes the same share of a step)")


def check_method(args, given):
    """The method's flags: ablations belong to SCIR, --reward_model to external, and Eq. 4 needs a
    reference that M0 is not."""
    if args.method not in ("scir", "srlm", "irm", "external"):
        fail(f"--method must be scir, srlm, irm or external, got {args.method!r}")
    if args.no_consistency_loss and args.no_dcpo:
        fail("--no_consistency_loss with --no_dcpo leaves Eq. 7 empty: nothing would be trained")
    ablations = [f"--{name}" for name in ("no_consistency_loss", "no_dcpo", "single_judge_prompt",
                                          "no_adaptive_reference", "judge_sft_only")
                 if getattr(args, name)]
    if args.method != "scir" and ablations:  # the baselines' SFT has no pairwise judge examples
        if ablations[0] == "--judge_sft_only":
            fail("--judge_sft_only belongs to --method scir; for an instruction-tuned model the "
                 "baselines take --sft_epochs 0")
        fail(f"{ablations[0]} is an ablation of SCIR, not of --method {args.method}")
    if args.method != "external" and "reward_model" in given:
        fail(f"--reward_model belongs to --method external, not to --method {args.method}")
    if args.method != "srlm" and "pointwise_examples" in given:
        fail(f"--pointwise_examples belongs to --method srlm, not to --method {args.method}")
    self_reference = (args.global_reference or args.model) == args.model
    if args.sft_epochs == 0 and self_reference:
        fail("--sft_epochs 0 makes M0 the global reference itself, so P = 0.5 for every pair: "
             "pass --global_reference (the base model of Eq. 4)")
    if args.judge_sft_only and self_reference:
        say(f"scir.py: warning: the global reference of Eq. 4 is --model itself, and "
            f"--judge_sft_only moves M0 only {args.sft_epochs} epoch(s) at lr {args.sft_lr} away "
            f"from it: P stays near 0.5 and Eq. 6's mask rarely fires; section 4.1 uses the base "
            f"model, --global_reference mistralai/Mistral-7B-v0.3", file=sys.stderr)


AFTER_THE_FACT = ("output_dir", "eval_reward_bench", "evaluate", "eval_limit",
                  "eval_greedy", "alpaca_eval")  # they change no training file


def check_same_settings(out, args, data_sha256):
    """Resuming is only sound with the settings and data that made the files: refuse a folder of
    results made with other ones. A folder without results takes the new settings."""
    path = out / "args.json"
    settings = bound_paths(asdict(args), out)
    current = {k: v for k, v in settings.items() if k not in AFTER_THE_FACT}
    current["data_sha256"] = data_sha256
    results = [f for f in out.iterdir()
               if re.fullmatch(r"(M|iter)\d+|metrics\.jsonl|table\.md|reward_bench", f.name)]
    if results and not path.exists():  # deleting it is no fresh start: the results stay
        fail(f"{path} is missing, and {out} holds results made with the settings it held: put "
             f"it back, or use a new --output_dir")
    if results:
        try:
            saved = json.loads(path.read_text())
        except ValueError:
            saved = None
        if not isinstance(saved, dict):
            fail(f"{path} is damaged, so the settings that made the results in {out} are "
                 f"unknown: repair it, or use a new --output_dir")
        # fields added since that run have their defaults
        saved = bound_paths({f.name: f.default for f in fields(Args)}
                            | {"data_sha256": data_sha256} | saved, out)
        changed = [f"--{k} {saved.get(k)!r} (now {v!r})" if k != "data_sha256"
                   else "the data files changed" for k, v in current.items() if saved.get(k) != v]
        if changed:
            fail(f"{out} holds a run made with other settings or data: {', '.join(changed)}; "
                 f"rerun with those or use a new --output_dir")
    write_text(path, json.dumps(settings | {"data_sha256": data_sha256}, indent=1))


def bound_paths(settings, out):
    """settings with each flag that names a local folder or file resolved, and one inside out
    written relative to it ('<output_dir>/demo-base'): a folder moved, or spelled another way,
    still holds the same run."""
    for name in ("model", "global_reference", "data_dir", "reward_model"):
        value = settings.get(name)
        if isinstance(value, str) and Path(value).expanduser().exists():
            resolved, folder = Path(value).expanduser().resolve(), out.resolve()
            settings[name] = (f"<output_dir>/{resolved.relative_to(folder).as_posix()}"
                              if resolved.is_relative_to(folder) else str(resolved))
    return settings


# --- The demo: a tiny random Llama and a byte-level BPE built here, offline ---
# --demo's settings where the command line gives none: a 2-core CPU finishes in about a minute
DEMO = dict(iterations=3, num_prompts=8, num_samples=4, sft_examples=16, judge_pairs=8,
            max_new_tokens=24, max_length=640, sft_epochs=3, sft_lr=3e-3, lr=3e-4, epochs=1,
            length_reg_from=3, batch_size=2, grad_accum=2, score_batch_size=16, dtype="float32")


def build_demo(out):
    """Write a tiny Llama (random weights), its tokenizer and the demo data -> (model, data dir)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    import prompts

    model_dir, data_dir = out / "demo-base", out / "demo-data"
    if not rank_0_sees(model_dir.exists()):
        bpe = Tokenizer(models.BPE())
        bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        bpe.decoder = decoders.ByteLevel()
        # trained on the judge templates too, so judge prompts (the baselines' too) compress
        corpus = [" ".join(row) for row in DEMO_DATA] + list(prompts.PAIRWISE_JUDGE_TEMPLATES) + [
            prompts.POINTWISE_JUDGE_TEMPLATE]
        bpe.train_from_iterator(corpus * 4, trainers.BpeTrainer(
            vocab_size=1000, special_tokens=["<s>", "</s>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
        tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>")
        config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                             max_position_embeddings=1024, bos_token_id=tokenizer.bos_token_id,
                             eos_token_id=tokenizer.eos_token_id)
        torch.manual_seed(0)
        save_model(LlamaForCausalLM(config), tokenizer, model_dir, {"demo": True})
    data_dir.mkdir(parents=True, exist_ok=True)
    write_jsonl(data_dir / "sft.jsonl", [{"prompt": p, "response": good}
                                         for p, good, _ in DEMO_DATA])
    write_jsonl(data_dir / "judge.jsonl", [{"prompt": p, "chosen": good, "rejected": bad}
                                           for p, good, bad in DEMO_DATA])
    write_jsonl(data_dir / "prompts.jsonl", [{"prompt": p} for p, _, _ in DEMO_DATA
                                             for _ in range(2)])
    subsets = ["alpacaeval-easy", "llmbar-natural", "donotanswer", "math-prm", "hep-python"]
    write_jsonl(data_dir / "rewardbench.jsonl", [  # one subset of each kind
        {"prompt": p, "chosen": good, "rejected": bad, "subset": subsets[j % 5]}
        for j, (p, good, bad) in enumerate(DEMO_DATA)])
    write_jsonl(data_dir / "pointwise.jsonl", [  # --method srlm's judge examples
        {"prompt": p, "response": response, "judgement": f"Score: {score}"}
        for p, good, bad in DEMO_DATA for response, score in ((good, 5), (bad, 1))])
    write_jsonl(data_dir / "alpaca_eval.jsonl", [{"instruction": p} for p, _, _ in DEMO_DATA])
    write_jsonl(data_dir / "eval.jsonl", [  # for --evaluate: an MMLU-style and a GSM8K question
        {"task": "mmlu", "prompt": "Which one is a color?\nA. red\nB. dog\nC. seven",
         "answer": "A"},
        {"task": "gsm8k", "prompt": "What is 10 minus 4?", "answer": "6"}])
    return str(model_dir), str(data_dir)


if __name__ == "__main__":
    main()
