"""CREAM: Consistency Regularized Self-Rewarding Language Models (Wang et al., ICLR 2025,
arXiv 2410.12735): Algorithm 1 in one file. README.md maps each equation to its function.

    python cream.py --model meta-llama/Meta-Llama-3-8B-Instruct  # the paper's setup, one 80 GB GPU
    python cream.py --model mistralai/Mistral-7B-v0.3             # any HF causal LM
    python cream.py --method srlm --evaluate --output_dir runs/cream-srlm  # Table 1's SRLM rows
    python cream.py --demo                                        # offline: tiny model, 2 CPU cores
    torchrun --nproc_per_node 8 cream.py --model meta-llama/Meta-Llama-3-8B-Instruct  # 8 GPUs
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
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor
from tqdm import tqdm
from transformers import (AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig,
                          HfArgumentParser)
from transformers.generation.configuration_utils import ContinuousBatchingConfig
from transformers.hf_argparser import HfArg
from transformers.utils import logging as hf_logging

from prompts import (DEMO_DATA, answer_kind, chat_prompt, eval_prompt, fill_pointwise, parse_score,
                     read_answers, reply_format, token_ids)


# ======== The paper: Args, the equations, Algorithm 1 and its steps ========
# --- Settings: every flag, its paper default, its valid values and where the number comes from ---
def flag(default, valid, help):
    """A field of Args: its default, its valid values and what it does. valid ('[1,inf)',
    '(0,1]', '{a,b,c}' or None) is argparse's metavar, so --help shows it, and check_args
    checks it."""
    return HfArg(default=default, help=help, metadata={"metavar": valid} if valid else None)


@dataclass
class Args:
    # Paper hyperparameters: section 4.1, else the official code (README: Departures)
    model: str = flag("meta-llama/Meta-Llama-3-8B-Instruct", None, (
        "M0, a Hub id or folder (4.1: Llama-3 and Llama-2 at 7B/8B; official code: Instruct)"))
    iterations: int = flag(2, "[1,inf)", "T iterations after SFT: M2 and M3 (Table 1)")
    num_prompts: int = flag(10500, "[1,inf)", "prompts an iteration: D_U's 21K over 2 (4.1)")
    num_samples: int = flag(5, "[2,inf)", "N responses a prompt, at least 2 (official code)")
    temperature: float = flag(0.8, "(0,inf)", "sampling temperature (4.1)")
    top_p: float = flag(0.95, "(0,1]", "nucleus sampling (official code)")
    sft_epochs: int = flag(3, "[0,inf)", "SFT epochs (4.1; official: 5); 0 only for p-srlm")
    # a learning rate above 1 is a typo: AdamW moves a weight by ~lr a step
    sft_lr: float = flag(1e-6, "[0,1]", "SFT learning rate (4.1; official code: 5e-6)")
    epochs: int = flag(1, "[1,inf)", "preference-training epochs an iteration (4.1)")
    lr: float = flag(1e-6, "[0,1]", "preference-training learning rate (4.1)")
    beta: float = flag(0.1, "(0,inf)", "DPO beta (4.1)")
    warmup_ratio: float = flag(0.1, "[0,1)", "linear warmup share, then cosine (official)")
    max_grad_norm: float = flag(1.0, "(0,inf)", "gradient clipping (official code)")
    # Data and lengths
    data_dir: str = flag(None, None, "read sft.jsonl, prompts.jsonl here, not the Hub")
    output_dir: str = flag(None, None, "default runs/cream-<model name>; a rerun resumes")
    demo: bool = flag(False, None, "offline: tiny random model, built-in data (flags win)")
    max_new_tokens: int = flag(768, "[1,inf)", "longest sampled response (official code)")
    max_length: int = flag(2048, "[2,inf)", "prompt + response (official code); longer: skipped")
    # Method and ablations
    method: str = flag("cream", "{cream,srlm,p-srlm}", (
        "cream; baselines with C = 1: srlm (Table 1), p-srlm ranks by a judge's scores (Table 6)"))
    consistency_measure: str = flag("kendall", "{kendall,spearman,toporder}", (
        "C from kendall (Eq. 3.10), spearman or toporder (Table 4; chance gives C = 0.5)"))
    consistency_scope: str = flag("dataset", "{dataset,pair}", (
        "dataset: one C (line 11); pair: each pair's own (tau + 1) / 2 (official code's 'dyn')"))
    t1_consistency: str = flag("algorithm1", "{algorithm1,mean_logp,one,floor}", (
        "t = 1, beyond the paper: r' per token (mean_logp), C = 1 (one), C >= 0.5 (floor)"))
    # Analyses and evaluation
    evaluate: bool = flag(False, None, "exact match of M0..M_T+1 on five tasks (Table 1)")
    eval_limit: int = flag(None, "[1,inf)", "score only the first N questions of each task")
    # Hardware and batching
    batch_size: int = flag(2, "[1,inf)", "SFT sequences or DPO pairs a forward pass")
    grad_accum: int = flag(16, "[1,inf)", "micro-batches a step: 2 x 16 = 32 (official code)")
    score_batch_size: int = flag(16, "[1,inf)", "sequences a no-grad scoring pass")
    dtype: str = flag("auto", "{auto,bfloat16,float32}", (
        "auto (bfloat16 on a GPU), bfloat16 or float32"))
    seed: int = flag(42, "[0,inf)", "same seed, same run")


# --- Eq. 3.9, lines 6 and 8: the implicit DPO reward ---
def dpo_rewards(logps_t, logps_prev, logps_0):
    """r = log pi_t - log pi_0 and r' = log pi_{t-1} - log pi_0 (beta and log Z(x) rank nothing);
    at t = 1 (logps_prev None) r' = log pi_0. log pi(y|x) [P, N] each -> r, r' [P, N]."""
    r_prev = logps_0 if logps_prev is None else logps_prev - logps_0
    return logps_t - logps_0, r_prev


# --- Eq. 3.10, lines 7, 9 and 10: how far the two rankings of a prompt's samples agree ---
def kendall_tau(x, y):
    """Kendall tau-a of two score vectors [N], [N] -> float; a pair tied in either counts zero."""
    x, y = torch.as_tensor(x, dtype=torch.float64), torch.as_tensor(y, dtype=torch.float64)
    n = x.numel()
    concordance = torch.sign(x[:, None] - x[None, :]) * torch.sign(y[:, None] - y[None, :])
    return (concordance.triu(1).sum() / (n * (n - 1) / 2)).item()


# --- Algorithm 1 line 11: the consistency rate ---
def consistency_rate(taus):
    """C = mean over prompts of (tau_j + 1) / 2: [P] -> float."""
    return sum((tau + 1) / 2 for tau in taus) / len(taus)


# --- Eq. 3.11-3.12, lines 12-13: best = argmax r, worst = argmin r (3.11's two argmins: a typo) ---
def build_pairs(samples_rows, reward_rows, consistency, scope):
    """One pair a prompt, matched by id: D_DPO, and reversed D_RDPO. All-tie prompts are skipped;
    r None (P-SRLM: no score) is left out. C per pair: scope 'dataset' C, 'pair' (tau + 1) / 2."""
    rewards_by_id = {row["id"]: row for row in reward_rows}
    pairs = []
    for row in samples_rows:
        rewards = rewards_by_id[row["id"]]
        r = rewards["r"]
        scored = [i for i, value in enumerate(r) if value is not None]
        if len(scored) < 2:
            continue
        best, worst = max(scored, key=r.__getitem__), min(scored, key=r.__getitem__)  # first of =
        if r[best] == r[worst]:
            continue
        chosen, rejected = row["samples"][best], row["samples"][worst]
        own = (rewards["tau"] + 1) / 2
        pairs.append({"id": row["id"], "prompt": row["prompt"],
                      "chosen": chosen["response"], "rejected": rejected["response"],
                      "chosen_ids": chosen["token_ids"], "rejected_ids": rejected["token_ids"],
                      "ref_chosen_logp": rewards["logps_t"][best],
                      "ref_rejected_logp": rewards["logps_t"][worst],
                      "consistency": consistency if scope == "dataset" else own})
    return pairs


# --- Eq. 3.7, line 14: C * L_DPO(D_DPO) + (1 - C) * L_DPO(D_RDPO), reference pi_t ---
def soft_dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                  ref_rejected_logps, beta, consistency):
    """Per pair, [B] x4 -> [B]; consistency C a float or [B]. By Theorem 3.3 this is
    L_DPO + lambda * L_Reg up to a factor, with C = (1 + lambda) / (1 + 2 lambda)."""
    h = beta * ((policy_chosen_logps - ref_chosen_logps)
                - (policy_rejected_logps - ref_rejected_logps))
    dpo = -torch.nn.functional.logsigmoid(h)  # the pair as ranked: D_DPO
    reversed_dpo = -torch.nn.functional.logsigmoid(-h)  # chosen and rejected swapped: D_RDPO
    return consistency * dpo + (1 - consistency) * reversed_dpo


# --- Algorithm 1: SFT (line 2), then lines 5-14 for t = 1..T; each finished step is a file ---
def main(argv=None):
    """Parse, lock --output_dir and run Algorithm 1 there; a rerun resumes from what is there."""
    start_processes()
    args = parse_args(argv)
    out = Path(args.output_dir)
    with locked(out):
        tokenizer, sft_rows, pools, tests = prepare(args, out)
        if not model_ready(out / "M1"):
            run_sft(args, tokenizer, sft_rows, out)  # line 2
        metrics = []
        for t, (pool, too_long) in enumerate(pools, 1):  # line 4
            it = out / f"iter{t}"
            it.mkdir(exist_ok=True)
            samples = cached(it / "samples.jsonl", pool, ("id", "prompt"),
                             lambda: run_sampling(args, tokenizer, pool, t, out))  # line 5
            logps = score_samples(args, tokenizer, samples, t, out)  # pi_t, pi_{t-1}, pi_0
            reward_rows = cached(it / "rewards.jsonl", samples, ("id",),
                                 lambda: rewards_and_consistency(samples, *logps))  # lines 6-10
            ranking, unusable = ranking_rewards(args, tokenizer, samples, reward_rows, t, out)
            consistency, scope = training_consistency(args, reward_rows)  # line 11
            expected = build_pairs(samples, ranking, consistency, scope)  # lines 12-13
            consistency, expected = t1_override(args, t, consistency, expected)  # beyond the paper
            pairs = cached(it / "pairs.jsonl", expected, ("id", "chosen", "rejected"),
                           lambda: expected)
            check_pairs(t, pairs, scope, unusable)
            if not model_ready(out / f"M{t + 1}"):
                run_preference_training(args, tokenizer, pairs, t, out)  # line 14
            metrics.append(iteration_metrics(t, consistency, samples, reward_rows, pairs,
                                             too_long, unusable, out))
            write_jsonl(out / "metrics.jsonl", metrics)
        evaluation = evaluate_models(args, tokenizer, tests, out) if args.evaluate else []
        table = final_table(args, metrics, evaluation)
        write_text(out / "table.md", table)
        finish(f"\n{table}\nmodels, samples, rewards, pairs, metrics.jsonl and table.md are in "
               f"{out}")


# --- Algorithm 1's steps, in the order main takes them ---
def run_sft(args, tokenizer, sft_rows, out):
    """Line 2: M0 -> M1 on D_S. With --sft_epochs 0 (P-SRLM only) M1 is M0 as given."""
    if args.sft_epochs == 0:
        save_model(load_model(args.model, args), tokenizer, out / "M1", {"sft": "skipped"})
        return
    examples = []
    for row in sft_rows:
        prompt_ids, response_ids = encode(tokenizer, row["prompt"], row["response"])
        if len(prompt_ids) < args.max_length - 1:
            examples.append(cut_to_fit(prompt_ids, response_ids, args.max_length))
    if not examples:
        fail(f"every SFT prompt is longer than --max_length {args.max_length}")
    batches = [collate(b, tokenizer.pad_token_id) for epoch in range(args.sft_epochs)
               for b in micro_batches(examples, args.batch_size, args.seed + epoch)]
    model = load_model(args.model, args, seed=args.seed)
    summary = train(model, batches, sft_loss, "sft_lr", args, "SFT M0 -> M1")
    summary.update(examples=len(examples), skipped_too_long=len(sft_rows) - len(examples))
    save_model(model, tokenizer, out / "M1", summary)


def run_sampling(args, tokenizer, pool, t, out):
    """Line 5: N responses to each prompt of the pool from M_t -> rows of samples.jsonl."""
    model = load_model(out / f"M{t}", args, seed=args.seed + 1000 * t)
    grouped = data_parallel(partial(sample_responses, model, tokenizer, args=args),
                            [row["prompt"] for row in pool])
    return [{"id": row["id"], "prompt": row["prompt"], "samples": samples}
            for row, samples in zip(pool, grouped)]


def score_samples(args, tokenizer, samples, t, out):
    """log pi(y|x) of each sample under pi_t, pi_{t-1} (None at t = 1) and pi_0 for lines 6 and 8,
    one model at a time, kept in iter<t>/logps_*.jsonl -> [P, N] float64 each, and t1_lengths."""
    sequences = []
    for row in samples:
        prompt_ids = encode(tokenizer, row["prompt"])
        sequences += [cut_to_fit(prompt_ids, s["token_ids"], args.max_length)
                      for s in row["samples"]]
    models = {"t": out / f"M{t}", "0": args.model} | ({"prev": out / f"M{t - 1}"} if t > 1 else {})
    logps = {"prev": None}
    for name, path in models.items():
        values = cached_logps(out / f"iter{t}" / f"logps_{name}.jsonl", path, sequences,
                              tokenizer, args)
        logps[name] = torch.tensor(values, dtype=torch.float64).view(len(samples), -1)
    return logps["t"], logps["prev"], logps["0"], t1_lengths(args, t, sequences, len(samples))


def rewards_and_consistency(samples_rows, logps_t, logps_prev, logps_0, lengths=None):
    """Lines 6-10 -> rows of rewards.jsonl: per prompt r and r' (Eq. 3.9), log pi_t (the DPO
    reference) and the agreement of the two rankings: tau (Eq. 3.10), Spearman and TopOrder."""
    r, r_prev = dpo_rewards(logps_t, logps_prev, logps_0)
    r_prev = r_prev if lengths is None else r_prev / lengths  # --t1_consistency mean_logp
    rows = []
    for row, x, y, ref in zip(samples_rows, r.tolist(), r_prev.tolist(), logps_t.tolist()):
        rows.append({"id": row["id"], "r": x, "r_prev": y, "logps_t": ref, "tau": kendall_tau(x, y),
                     "spearman": spearman_rho(x, y), "top_order": top_order(x, y)})
    return rows


def ranking_rewards(args, tokenizer, samples, reward_rows, t, out):
    """The rewards that rank each prompt's samples: Eq. 3.9's r, or with --method p-srlm the
    judge's scores (iter<t>/judgements.jsonl) -> (rows, judgements without a score)."""
    if args.method != "p-srlm":
        return reward_rows, 0

    def judge():
        model = load_model(out / f"M{t}", args, seed=args.seed + 1000 * t + 2)
        return judge_samples(model, tokenizer, samples, args)
    judged = cached(out / f"iter{t}" / "judgements.jsonl", samples, ("id",), judge)
    unusable = sum(score is None for row in judged for score in row["scores"])
    return [dict(row, r=j["scores"]) for row, j in zip(reward_rows, judged)], unusable


def training_consistency(args, reward_rows):
    """Line 11's C and its scope; the baselines trust every self-label: C = 1, plain DPO."""
    if args.method != "cream":
        return 1.0, "dataset"
    return measured_consistency(reward_rows, args.consistency_measure), args.consistency_scope


def check_pairs(t, pairs, scope, unusable):
    """Stop when iteration t has no pair; warn when C < 0.5 makes line 14 weight the reversed
    pairs more (Theorem 3.3's C is never below 0.5, line 11's can be)."""
    if not pairs:
        fail(f"iteration {t}: no prompt has two responses with different rewards, no pair to "
             f"train on" + (f" ({unusable} judgements gave no score)" if unusable else ""))
    below = [pair["consistency"] for pair in pairs if pair["consistency"] < 0.5]
    if below:
        what = f"C = {below[0]:.4f} < 0.5" if scope == "dataset" else (
            f"{len(below)} of {len(pairs)} pairs have their own C < 0.5")
        say(f"cream.py: warning: iteration {t}: {what}, so line 14 weights the reversed pair "
            f"more: training moves toward the responses M{t} ranks worse (README: 'C below "
            f"0.5')", file=sys.stderr)


def run_preference_training(args, tokenizer, pairs, t, out):
    """Line 14: M_t -> M_{t+1} by Eq. 3.7, reference pi_t, whose log-probs line 6 scored."""
    examples = []
    for pair in pairs:
        prompt_ids = encode(tokenizer, pair["prompt"])  # cut as when the log-probs were scored
        examples.append(dict(pair, **{f"{side}_sequence": cut_to_fit(
            prompt_ids, pair[f"{side}_ids"], args.max_length) for side in ("chosen", "rejected")}))
    batches = [b for epoch in range(args.epochs)
               for b in micro_batches(examples, args.batch_size, args.seed + t + epoch)]
    model = load_model(out / f"M{t}", args, seed=args.seed + 1000 * t + 1)
    summary = train(model, batches, dpo_batch_loss(args, tokenizer), "lr", args,
                    f"CREAM M{t} -> M{t + 1}")
    save_model(model, tokenizer, out / f"M{t + 1}", summary)


def iteration_metrics(t, consistency, samples, reward_rows, pairs, too_long, unusable, out):
    """Iteration t's row of metrics.jsonl: the C used, Table 2's measures (mean and population
    standard deviation over prompts), pairs, prompts left out, and M_{t+1}'s training."""
    row = {"iteration": t, "consistency": consistency}
    for name, key in (("kendall", "tau"), ("spearman", "spearman"), ("top_order", "top_order")):
        values = [rewards[key] for rewards in reward_rows]
        row[name] = sum(values) / len(values)
        row[f"{name}_std"] = math.sqrt(sum((v - row[name]) ** 2 for v in values) / len(values))
    row |= {"pairs": len(pairs), "skipped": len(samples) - len(pairs), "too_long": too_long,
            "unusable_judgements": unusable}
    summary = json.loads((out / f"M{t + 1}" / "training_summary.json").read_text())
    row |= {key: summary[key] for key in ("loss", "reward_accuracy", "reward_margin")}
    lengths = [len(s["token_ids"]) for sampled in samples for s in sampled["samples"]]
    return row | {"response_length": sum(lengths) / len(lengths)}


# --- Model-facing pieces: token ids, log-probs through a float32 head, losses, sampling ---
def encode(tokenizer, prompt, response=None):
    """Ids of the chat-formatted prompt and, for SFT, of the response and the end of turn
    (prompts.reply_format), tokenized after the prompt as the model saw it."""
    text = chat_prompt(tokenizer, prompt)
    prompt_ids = token_ids(tokenizer, text)
    if response is None:
        return prompt_ids
    lead, end = reply_format(tokenizer)
    joint_ids = token_ids(tokenizer, text + lead + response + end)
    if joint_ids[: len(prompt_ids)] == prompt_ids:  # else the tokenizer merged across the boundary
        return prompt_ids, joint_ids[len(prompt_ids):]
    return prompt_ids, token_ids(tokenizer, response + end)


def cut_to_fit(prompt_ids, response_ids, max_length):
    """(prompt_ids, response_ids) in max_length tokens: the prompt whole, the response cut."""
    return prompt_ids, response_ids[: max_length - len(prompt_ids)]


def collate(sequences, pad_id):
    """[(prompt_ids, response_ids)] -> right-padded input_ids, attention_mask, labels [B, L]."""
    width = max(len(p) + len(r) for p, r in sequences)
    input_ids = torch.full((len(sequences), width), pad_id)
    attention_mask = torch.zeros(len(sequences), width, dtype=torch.long)
    labels = torch.full((len(sequences), width), -100)  # -100 off the response
    for row, (p, r) in enumerate(sequences):
        input_ids[row, : len(p) + len(r)] = torch.tensor(p + r)
        attention_mask[row, : len(p) + len(r)] = 1
        labels[row, len(p): len(p) + len(r)] = torch.tensor(r)
    return input_ids, attention_mask, labels


def sequence_logps(model, input_ids, attention_mask, response_mask):
    """Summed log pi(y|x) over the response tokens: [B, L] x3 -> [B] float32. The head runs in
    float32 only where a position predicts a response token: token_logps computes
    log_softmax(hidden @ head.weight.T).gather(targets) in float32, a vocabulary slice at a time
    (plumbing: TokenLogps). Needs get_decoder() and get_output_embeddings() (any transformers
    causal LM; else take output_hidden_states[-1]); logits scaled or capped after the head
    (Gemma 2, Cohere) need that step in token_logps."""
    predicts_response = torch.nn.functional.pad(response_mask[:, 1:].bool(), (0, 1))  # p: p + 1
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # left or right padding
    hidden = decoder_states(model, input_ids=input_ids, attention_mask=attention_mask,
                            position_ids=position_ids)[predicts_response]  # [N, H]
    targets = input_ids[:, 1:][response_mask[:, 1:].bool()]
    logps = token_logps(hidden, targets, model.get_output_embeddings())
    rows = predicts_response.nonzero()[:, 0]
    return torch.zeros(input_ids.shape[0], device=hidden.device).index_add(0, rows, logps)


def decoder_states(model, **inputs):
    """The decoder's last hidden states [B, L, H]."""
    if isinstance(model, FSDPModule):  # torchrun
        return sharded_decoder_states(model, **inputs)
    return model.get_decoder()(**inputs, use_cache=False).last_hidden_state


def response_logps(model, sequences, pad_id):
    """Summed response log-probs of [(prompt_ids, response_ids)], with gradients -> [B] float32."""
    input_ids, attention_mask, labels = (t.to(model.device) for t in collate(sequences, pad_id))
    return sequence_logps(model, input_ids, attention_mask, labels != -100)


@torch.no_grad()
def batched_logps(model, sequences, pad_id, batch_size, desc):
    """response_logps of [(prompt_ids, response_ids)] without gradients -> [float], in batches
    of similar length; under torchrun each process scores its share (data_parallel)."""
    model.eval()

    def score(share):
        order = sorted(range(len(share)), key=lambda i: len(share[i][0]) + len(share[i][1]))
        logps = [0.0] * len(share)
        for start in tqdm(range(0, len(order), batch_size), desc=desc):
            chunk = order[start: start + batch_size]
            values = response_logps(model, [share[i] for i in chunk], pad_id)
            for i, value in zip(chunk, values.tolist()):
                logps[i] = value
        return logps
    return data_parallel(score, sequences)


def sft_loss(model, batch):
    """Line 2 on a collate() batch: mean negative log-likelihood of the response tokens."""
    input_ids, attention_mask, labels = (t.to(model.device) for t in batch)
    response_mask = labels != -100
    logps = sequence_logps(model, input_ids, attention_mask, response_mask)
    return {"loss": -logps.sum() / response_mask.sum()}


def dpo_batch_loss(args, tokenizer):
    """loss_fn(model, pairs) for train: Eq. 3.7, chosen and rejected in one forward pass."""
    def loss_fn(model, batch):
        sequences = [p["chosen_sequence"] for p in batch] + [p["rejected_sequence"] for p in batch]
        logps = response_logps(model, sequences, tokenizer.pad_token_id)
        chosen, rejected = logps.split(len(batch))
        ref_chosen, ref_rejected, consistency = (
            torch.tensor([p[key] for p in batch], device=model.device)
            for key in ("ref_chosen_logp", "ref_rejected_logp", "consistency"))
        losses = soft_dpo_loss(chosen, rejected, ref_chosen, ref_rejected, args.beta, consistency)
        margin = args.beta * ((chosen - ref_chosen) - (rejected - ref_rejected)).detach()
        return {"loss": losses.mean(), "reward_accuracy": (margin > 0).float().mean(),
                "reward_margin": margin.mean()}
    return loss_fn


@torch.no_grad()
def sample_responses(model, tokenizer, prompts, args, num_samples=None, greedy=False):
    """N samples a prompt (or a greedy reply) with generate_batch -> per prompt
    [{"response", "token_ids", "finished"}], the ids as sampled, stop token included."""
    if model.device.type == "cpu":  # it logs that psutil is missing on every CPU call
        logging.getLogger("ContinuousBatchingLogger").setLevel(logging.CRITICAL)
    model_eos = model.generation_config.eos_token_id  # Llama-3-Instruct: two stop tokens
    if not isinstance(model_eos, list):
        model_eos = [model_eos] if model_eos else []
    eos_ids = {tokenizer.eos_token_id, *model_eos}
    num_samples = 1 if greedy else num_samples or args.num_samples
    sampling = dict(do_sample=False) if greedy else dict(
        do_sample=True, temperature=args.temperature, top_p=args.top_p, top_k=0)
    config = GenerationConfig(**sampling, max_new_tokens=args.max_new_tokens,
                              num_return_sequences=num_samples, eos_token_id=sorted(eos_ids),
                              pad_token_id=tokenizer.pad_token_id)
    inputs = [encode(tokenizer, p) for p in prompts]
    longest = max(map(len, inputs)) + args.max_new_tokens
    outputs = model.generate_batch(
        inputs=inputs, generation_config=config, progress_bar=True,
        continuous_batching_config=cache_config(model, len(inputs) * num_samples, longest))
    if len(outputs) != len(prompts) * num_samples:
        fail(f"generation returned {len(outputs)} of {len(prompts) * num_samples} responses")
    grouped = [[] for _ in prompts]
    for request_id, output in outputs.items():  # request ids are req_<prompt index>[__child#k]
        if output.error is not None:
            fail(f"generation failed for request {request_id}: {output.error}")
        tokens = list(output.generated_tokens)
        finished = bool(tokens) and tokens[-1] in eos_ids
        text = tokenizer.decode(tokens[:-1] if finished else tokens, skip_special_tokens=True)
        index = int(request_id.split("__")[0].removeprefix("req_"))
        grouped[index].append({"response": text, "token_ids": tokens, "finished": finished})
    return grouped


# ======== Beyond the paper: Table 2's other measures, P-SRLM, evaluation, the final table ========
# --- Beyond Eq. 3.10: Spearman and TopOrder (Table 2), and C from them (Table 4) ---
def average_ranks(x):
    """[N] -> [N] ranks from 1, ties sharing their mean rank."""
    less = (x[None, :] < x[:, None]).sum(1)
    equal = (x[None, :] == x[:, None]).sum(1)
    return less.double() + (equal + 1) / 2


def spearman_rho(x, y):
    """Spearman correlation of [N], [N] -> float: Pearson on average ranks, 0 if one is constant."""
    rx = average_ranks(torch.as_tensor(x, dtype=torch.float64))
    ry = average_ranks(torch.as_tensor(y, dtype=torch.float64))
    rx, ry = rx - rx.mean(), ry - ry.mean()
    norm = (rx.square().sum() * ry.square().sum()).sqrt()
    return (rx * ry).sum().div(norm).item() if norm > 0 else 0.0


def best_and_worst(x):
    """[N] scores -> [N, N] P(best = i, worst = j) with ties broken uniformly at random (N >= 2):
    uniform over the indices at the max times those at the min, never i = j (all tie)."""
    x = torch.as_tensor(x, dtype=torch.float64)
    joint = (x == x.max()).double()[:, None] * (x == x.min()).double()[None, :]
    joint.fill_diagonal_(0)  # only when all tie: one response is not both best and worst
    return joint / joint.sum()


def top_order(x, y):
    """TopOrder (section 4.3.1) of [N], [N] -> P(both pick the same best and the same worst), ties
    broken at random: 0 or 1 without ties; a ranking that all ties agrees by chance only,
    1 / (N (N - 1)), carrying no ranking information as tau-a's tied pairs carry none."""
    return (best_and_worst(x) * best_and_worst(y)).sum().item()


def top_order_consistency(top_order_rate, n):
    """TopOrder rate T of N responses -> C = (1 + kappa) / 2, kappa = (T - p0) / (1 - p0): chance
    (p0 = 1 / (N (N - 1)), same best and worst) gives C = 0.5, as line 11's (tau + 1) / 2 does."""
    p0 = 1 / (n * (n - 1))
    return (1 + (top_order_rate - p0) / (1 - p0)) / 2


def measured_consistency(reward_rows, measure):
    """Line 11 with Table 4's measures: mean (tau+1)/2, mean (rho+1)/2 or corrected TopOrder."""
    if measure == "toporder":
        values = [top_order_consistency(row["top_order"], len(row["r"])) for row in reward_rows]
        return sum(values) / len(values)
    key = "tau" if measure == "kendall" else "spearman"
    return consistency_rate([row[key] for row in reward_rows])


# --- Beyond Algorithm 1 at t = 1, --t1_consistency: no M_{t-1} there, so r' is log pi_0 itself ---
def t1_lengths(args, t, sequences, num_prompts):
    """With mean_logp at t = 1 the response tokens that score_samples scored, [P, N] float64, so
    that r' is M0's mean log-likelihood a token (the official code's reading: a summed one
    ranks mostly by length); else None, and r' is Algorithm 1's."""
    if t > 1 or args.t1_consistency != "mean_logp":
        return None
    return torch.tensor([len(response) for _, response in sequences],
                        dtype=torch.float64).view(num_prompts, -1)


def t1_override(args, t, consistency, pairs):
    """At t = 1, one: C = 1 (no earlier reward to check the labels against: plain DPO); floor:
    C, or with --consistency_scope pair each pair's own, at least 0.5, where Theorem 3.3's
    regulariser pulls toward a tie instead of reversing the pair -> (the C used, pairs)."""
    if t > 1 or args.t1_consistency not in ("one", "floor"):
        return consistency, pairs
    if args.t1_consistency == "one":
        return 1.0, [dict(pair, consistency=1.0) for pair in pairs]
    floored = [dict(pair, consistency=max(pair["consistency"], 0.5)) for pair in pairs]
    return (max(consistency, 0.5) if args.consistency_scope == "dataset" else consistency), floored


# --- P-SRLM's reward: a judge's scores in place of Eq. 3.9 (Table 6) ---
def judge_samples(model, tokenizer, samples_rows, args):
    """A sampled judgement of each response (pointwise_prompt) and its score, per prompt."""
    prompts = [pointwise_prompt(tokenizer, row["prompt"], s["response"], args.max_length)
               for row in samples_rows for s in row["samples"]]
    replies = data_parallel(partial(sample_responses, model, tokenizer, args=args, num_samples=1),
                            prompts)
    n, rows = len(samples_rows[0]["samples"]), []
    for j, row in enumerate(samples_rows):
        texts = [reply["response"] for (reply,) in replies[j * n: (j + 1) * n]]
        rows.append({"id": row["id"], "scores": [parse_score(text) for text in texts],
                     "judgements": texts})
    return rows


def pointwise_prompt(tokenizer, instruction, response, max_length):
    """Table 6's prompt for one response, cut so the prompt keeps to about max_length tokens."""
    room = max(1, max_length - len(encode(tokenizer, fill_pointwise(instruction, ""))))
    return fill_pointwise(instruction, cut_text(tokenizer, response, room))


def cut_text(tokenizer, text, room):
    """text cut to at most `room` tokens, never inside a character."""
    ids = tokenizer(text, add_special_tokens=False).input_ids
    return text if len(ids) <= room else tokenizer.decode(ids[:room]).rstrip("\ufffd")


# --- Evaluation (Table 1): greedy, zero-shot, on the five tasks' test questions ---
def eval_answers(model, tokenizer, tests, args):
    """A greedy reply to each test question (CREAM section 4.1) -> rows with the reply, the
    answers the strict and the flexible rule read, and if each is right."""
    replies = data_parallel(partial(sample_responses, model, tokenizer, args=args, greedy=True),
                            [eval_prompt(row) for row in tests])
    return [dict(row, reply=reply["response"], **read_answers(row, reply["response"]))
            for row, (reply,) in zip(tests, replies)]


def evaluate_models(args, tokenizer, tests, out):
    """Accuracy of M0, M1 (SFT), ..., M_T+1 on each task by both rules (replies in eval/) ->
    table rows {model, task, flexible, strict, n}."""
    tasks = list(dict.fromkeys(row["task"] for row in tests))
    (out / "eval").mkdir(exist_ok=True)
    limit = f"-first{args.eval_limit}" if args.eval_limit else ""
    table = []
    for k in range(args.iterations + 2):
        path = args.model if k == 0 else out / f"M{k}"
        rows = cached(out / "eval" / f"M{k}-greedy{limit}.jsonl", tests,
                      ("task", "prompt", "answer"),
                      lambda: eval_answers(load_model(path, args), tokenizer, tests, args))
        for task in tasks:
            scored = [row for row in rows if row["task"] == task]
            table.append({"model": f"M{k}", "task": task, "n": len(scored)}
                         | {rule: sum(row[f"correct_{rule}"] for row in scored) / len(scored)
                            for rule in ("flexible", "strict")})
    write_jsonl(out / "evaluation.jsonl", table)
    return table


# --- The final table: Table 1's exact match and Table 2's consistency, a row per model ---
T1_NOTES = {  # what row M1 measures and uses, by --t1_consistency
    "algorithm1": "against log pi_0 itself (Algorithm 1, t = 1)",
    "mean_logp": "against M0's mean log-likelihood a token (--t1_consistency mean_logp)",
    "one": "against log pi_0 itself, and C used is 1 (--t1_consistency one)",
    "floor": "against log pi_0 itself, and C used is at least 0.5 (--t1_consistency floor)"}
METHOD_NAMES = {"cream": "CREAM", "srlm": "SRLM", "p-srlm": "P-SRLM"}
TASK_NAMES = {"arc_easy": "ARC-Easy", "arc_challenge": "ARC-Challenge", "openbookqa": "OpenBookQA",
              "siqa": "SIQA", "gsm8k": "GSM8K"}


def task_title(task, args):
    """A task's column: the paper's name, or the task as eval.jsonl names it ('|' escaped for
    markdown), with the part scored (--eval_limit)."""
    title = TASK_NAMES.get(task, task).replace("|", "\\|")
    return title + (f" (first {args.eval_limit})" if args.eval_limit else "")


def final_table(args, metrics, evaluation):
    """A row per model M_k: accuracy per task by the flexible rule, then the strict (an arrow
    against M_{k-1} from M2 on), and the agreement of M_k's rankings with M_{k-1}'s -> markdown."""
    tasks = list(dict.fromkeys(row["task"] for row in evaluation))
    columns = [(task, rule) for task in tasks for rule in ("flexible", "strict")]
    accuracy = {(row["model"], row["task"], rule): row[rule] for row in evaluation
                for rule in ("flexible", "strict")}
    header = ["Method", "Reward", "Iteration",
              *(task_title(task, args) + (" strict" if rule == "strict" else "")
                for task, rule in columns),
              "Consistency C", "C used", "Kendall tau", "Spearman", "TopOrder", "Pairs",
              "Sample tokens"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    names = {0: ("Initial", "-"), 1: ("SFT", "-"), 2: (METHOD_NAMES[args.method], "Self")}
    per_pair = args.method == "cream" and args.consistency_scope == "pair"
    for k in range(args.iterations + 2):
        cells = [*names.get(k, ("", "")), f"M{k}"]
        for task, rule in columns:
            now = accuracy[f"M{k}", task, rule]
            before = accuracy[f"M{k - 1}", task, rule] if k else None
            arrow = "" if k < 2 else " ↑" if now > before else " ↓" if now < before else " ="
            cells.append(f"{100 * now:.2f}{arrow}")
        row = next((m for m in metrics if m["iteration"] == k), None)  # M_k ranks in iteration k
        if row is None:
            cells += ["-"] * 7
        else:  # the measured C = mean (tau + 1) / 2, then the C training used
            cells.append(f"{(row['kendall'] + 1) / 2:.2f} ± {row['kendall_std'] / 2:.2f}")
            every_pair_one = k == 1 and args.t1_consistency == "one"  # not in Algorithm 1
            cells.append("per pair" if per_pair and not every_pair_one
                         else f"{row['consistency']:.2f}")
            cells += [f"{row[key]:.2f} ± {row[key + '_std']:.2f}"
                      for key in ("kendall", "spearman", "top_order")]
            cells += [str(row["pairs"]), f"{row['response_length']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("\nC, tau, Spearman, TopOrder in row M_k: M_k's rankings of its samples against "
                 "M_{k-1}'s (Table 2's 'M_k vs M_{k-1}'); in row M1 "
                 f"{T1_NOTES[args.t1_consistency]}." + (" Accuracy in percent: a task's column by "
                                                         "the flexible rule, then by the strict."
                                                         if tasks else ""))
    return "\n".join(lines) + "\n"


# ======== Plumbing: files, data, models, optimizer and train, torchrun, flags, the demo ========
# --- Plumbing: one-line errors, files written whole, resume ---
def fail(message):
    """Stop with a one-line error and a non-zero exit, never a traceback (from rank 0 only). Open
    progress bars are closed first: else they close when the exit frees their frames, after the
    message, which is then not the last line."""
    for bar in list(tqdm._instances):
        bar.close()
    sys.exit(f"cream.py: error: {message}" if rank_and_world()[0] == 0 else 1)


def read_jsonl(path, required):
    """A data file's rows: JSON objects with the non-empty string fields `required`."""
    rows = []
    with open(path, "rb") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                row = json.loads(line.decode("utf-8"))
            except UnicodeDecodeError:
                fail(f"{where}: not UTF-8 text")
            except json.JSONDecodeError as e:
                fail(f"{where}: not valid JSON ({e.msg})")
            if not isinstance(row, dict) or any(not isinstance(row.get(k), str) for k in required):
                fail(f"{where}: needs string fields {', '.join(required)}")
            for key in required:
                if not row[key].strip():
                    fail(f"{where}: empty {key}")
                if re.search("[\ud800-\udfff]", row[key]):  # JSON allows a lone \ud800
                    fail(f"{where}: {key} holds a lone surrogate, which no tokenizer encodes")
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
    lies: iter<t>/ by M_t and M_{t-1} (lines 5-8), M_{t+1} by the same (trained on iter<t>),
    eval/M<k>... by M_k; M0, the base, is none of them -> {name: the id save_model gave it}."""
    path = Path(path)
    folder = path if re.fullmatch(r"M\d+", path.name) else path.parent
    out = folder.parent
    numbered = re.fullmatch(r"(M|iter)(\d+)", folder.name)
    if numbered:
        t = int(numbered[2]) - (numbered[1] == "M")
        names = [f"M{k}" for k in (t, t - 1) if k >= 1]
    else:
        names = re.findall(r"^(M[1-9]\d*)(?=[-.])", path.name)
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
    """batched_logps of sequences under the model at model_path, kept in path -> [float]."""
    def compute():
        logps = batched_logps(load_model(model_path, args), sequences, tokenizer.pad_token_id,
                              args.score_batch_size, f"log-probs under {model_path}")
        return [{"logp": value} for value in logps]
    return [row["logp"] for row in cached(path, sequences, (), compute)]


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


# --- Plumbing: D_S, D_U and the test questions from the Hub or --data_dir, checked up front ---
TASKS = {  # Table 1's tasks: Hub id, config, revision, split scored (SIQA: no labelled test)
    "arc_easy": ("allenai/ai2_arc", "ARC-Easy", None, "test"),
    "arc_challenge": ("allenai/ai2_arc", "ARC-Challenge", None, "test"),
    "openbookqa": ("allenai/openbookqa", "main", None, "test"),
    "siqa": ("allenai/social_i_qa", None, "refs/convert/parquet", "validation"),
    "gsm8k": ("openai/gsm8k", "main", None, "test")}


def task_rows(task, rows):
    """Hub rows -> [{"prompt", "answer"}]: options lettered A-E (ARC also uses 1-4), or a number."""
    def multiple_choice(question, options, answer_index):
        lines = [f"{'ABCDE'[i]}. {option}" for i, option in enumerate(options)]
        return {"prompt": "\n".join([question, *lines]), "answer": "ABCDE"[answer_index]}
    if task == "gsm8k":
        return [{"prompt": r["question"],
                 "answer": r["answer"].split("####")[-1].strip().replace(",", "")} for r in rows]
    if task == "siqa":
        return [multiple_choice(f"{r['context']} {r['question']}",
                                [r["answerA"], r["answerB"], r["answerC"]], int(r["label"]) - 1)
                for r in rows]
    return [multiple_choice(r.get("question_stem") or r["question"], r["choices"]["text"],
                            r["choices"]["label"].index(r["answerKey"])) for r in rows]


def load_hub_data(args):
    """D_S: English OASST1 root prompts with their rank-0 reply (~3.4K); D_U: D_S prompts and the
    five tasks' train questions; with --evaluate, the five tasks' test rows."""
    from datasets import load_dataset

    def load(repo, split="train", name=None, revision=None):
        try:
            return load_dataset(repo, name=name, split=split, revision=revision)
        except Exception as e:
            fail(f"cannot load dataset {repo} ({type(e).__name__}); offline, pass --data_dir DIR "
                 f"with sft.jsonl and prompts.jsonl (see README)")

    oasst = load("OpenAssistant/oasst1")
    roots = {m["message_id"]: m["text"] for m in oasst if m["parent_id"] is None
             and m["role"] == "prompter" and m["lang"] == "en" and not m["deleted"]}
    sft = [{"prompt": roots[m["parent_id"]], "response": m["text"]} for m in oasst
           if m["role"] == "assistant" and m["rank"] == 0 and m["parent_id"] in roots
           and not m["deleted"]]
    pool = [{"prompt": row["prompt"]} for row in sft]
    tests = []
    for task, (repo, name, revision, test_split) in TASKS.items():
        pool += [{"prompt": row["prompt"]} for row in task_rows(task, load(repo, "train", name,
                                                                           revision))]
        if args.evaluate:
            tests += [dict(row, task=task)
                      for row in task_rows(task, load(repo, test_split, name, revision))]
    return sft, pool, tests


def load_data(args):
    """(D_S rows, D_U rows, test rows) from --data_dir's JSONL files, else from the Hub."""
    if args.data_dir is None:
        return load_hub_data(args)
    data_dir = Path(args.data_dir)
    if not data_dir.is_dir():
        fail(f"--data_dir {data_dir} is not a folder")
    files = {"sft.jsonl": ["prompt", "response"], "prompts.jsonl": ["prompt"]}
    if args.evaluate:
        files["eval.jsonl"] = ["prompt", "answer", "task"]
    for name in files:
        check_file(data_dir / name)
    rows = {name: read_jsonl(data_dir / name, required) for name, required in files.items()}
    for number, row in enumerate(rows.get("eval.jsonl", []), 1):
        if answer_kind(row["answer"]) is None:
            fail(f"{data_dir / 'eval.jsonl'}: row {number}: answer {row['answer']!r} is neither "
                 f"a letter A-E nor a number")
    return rows["sft.jsonl"], rows["prompts.jsonl"], rows.get("eval.jsonl", [])


def iteration_pools(tokenizer, prompt_rows, args):
    """D_U shuffled by the seed, each iteration's --num_prompts fresh prompts less those too long
    to sample -> [(pool, number left out)]."""
    random.Random(args.seed).shuffle(prompt_rows)
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
    """The test questions to score, in the file's order: each task's first --eval_limit (all
    without it), each checked before SFT to leave room to reply."""
    seen, rows = {}, []
    for number, row in enumerate(tests, 1):
        seen[row["task"]] = seen.get(row["task"], 0) + 1
        if args.eval_limit and seen[row["task"]] > args.eval_limit:
            continue  # not scored in this run
        if len(encode(tokenizer, eval_prompt(row))) > args.max_length - args.max_new_tokens:
            source = Path(args.data_dir) / "eval.jsonl" if args.data_dir else "the test split"
            fail(f"{source}: row {number} (task {row['task']}): the question is longer than "
                 f"--max_length - --max_new_tokens")
        rows.append(row)
    return rows


def prepare(args, out):
    """Every check before a file is written: the data, the tokenizer against the model, each
    iteration's prompts, the test questions, an earlier run's settings -> what main needs."""
    if args.demo:  # the demo's own model and data, where no flag names others
        demo_model, demo_data = build_demo(out)
        args.model, args.data_dir = args.model or demo_model, args.data_dir or demo_data
    sft_rows, prompt_rows, tests = load_data(args)
    # not the test rows: they change no training file, and their cached replies are checked
    data_sha256 = hashlib.sha256(json.dumps([sft_rows, prompt_rows]).encode()).hexdigest()
    tokenizer = load_tokenizer(args.model)
    check_models(args, tokenizer)
    pools = iteration_pools(tokenizer, prompt_rows, args)
    tests = eval_questions(tokenizer, tests, args)
    check_same_settings(out, args, data_sha256)
    return tokenizer, sft_rows, pools, tests


def check_models(args, tokenizer):
    """The tokenizer fits the model, and P-SRLM's judge template fits --max_length."""
    try:
        vocab_size = AutoConfig.from_pretrained(args.model).vocab_size
    except Exception as e:
        fail(f"cannot read the config of --model {args.model!r} ({type(e).__name__})")
    if len(tokenizer) > vocab_size:
        fail(f"--model {args.model!r} embeds {vocab_size} tokens, but its tokenizer has "
             f"{len(tokenizer)}")
    if args.method == "p-srlm":  # Table 6's prompt, answered by a sampled judgement
        overhead = len(encode(tokenizer, fill_pointwise("", "")))
        if args.max_length < overhead + 2:
            fail(f"--max_length {args.max_length} cannot hold the judge prompt: its template "
                 f"alone takes {overhead} tokens")


# --- Plumbing: models, one resident at a time (README: 'One 80 GB GPU') ---
def load_tokenizer(path):
    if str(path).startswith(("/", ".", "~")) and not Path(path).expanduser().exists():
        fail(f"model {path!r}: no such folder")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception as e:
        fail(f"cannot load the tokenizer of {path!r} ({first_line(e)})")
    if tokenizer.eos_token_id is None:
        fail(f"the tokenizer of {path!r} has no EOS token")
    if tokenizer.pad_token_id is None:  # base Llama and Mistral have none; padding is masked out
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(path, args, seed=None):
    """The model at path on the device, in eval mode; then torch is seeded, so that sampling and
    stochastic rounding repeat on a rerun."""
    cpu_dtype = torch.float32 if args.dtype == "auto" else getattr(torch, args.dtype)
    dtype = torch.bfloat16 if args.dtype == "auto" and torch.cuda.is_available() else cpu_dtype
    try:
        model, info = AutoModelForCausalLM.from_pretrained(path, dtype=dtype,
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


def first_line(error):
    return f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"


def model_ready(path):
    """True if a finished model folder is at path (resume), False if none; a damaged one fails."""
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
    A model sharded across ranks is gathered whole for it, and rank 0 writes."""
    state_dict = None
    if isinstance(model, FSDPModule):
        state_dict = get_model_state_dict(model, options=StateDictOptions(
            full_state_dict=True, cpu_offload=True))  # on rank 0; the others get {}
        model.config.architectures = [type(model).__mro__[2].__name__]  # not FSDP<name>
    if rank_and_world()[0] == 0:
        tmp = Path(f"{path}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        model.config.use_cache = True  # training turned it off; a saved model is for generation
        model.save_pretrained(tmp, state_dict=state_dict)
        tokenizer.save_pretrained(tmp)
        (tmp / "training_summary.json").write_text(json.dumps(summary, indent=1))
        (tmp / "provenance.json").write_text(json.dumps(
            {"id": uuid.uuid4().hex, "made_by": made_by(path)}, indent=1))  # see made_by
        os.replace(tmp, path)
    barrier()


# --- Plumbing: log-probs through a float32 LM head, and generate_batch's cache on CPU ---
VOCAB_SLICE = 8192  # LM-head rows a float32 slice: [N, 8192] blocks, never [N, V]


class TokenLogps(torch.autograd.Function):
    """log pi(target) = logit[target] - logsumexp(logits), logits = hidden @ weight^T (+ bias) in
    float32, VOCAB_SLICE head rows at a time, and recomputed so in backward: no [N, V] tensor or
    float32 copy of the head exists (README: 'One 80 GB GPU'). d logp / d logits = onehot - softmax.
    hidden [N, H], weight [V, H], bias [V] or None, targets [N] -> [N] float32."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets):
        h = hidden.float()
        lse = torch.full((h.shape[0],), float("-inf"), device=h.device)
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
    """generate_batch sizes its KV cache from free memory: ~15 GB on CPU, so there, to the work."""
    if model.device.type != "cpu":
        return None
    return ContinuousBatchingConfig(num_blocks=num_requests * math.ceil(longest / 256),
                                    max_batch_tokens=512)


# --- Plumbing: AdamW in float32 on bfloat16 weights, the schedule, the training loop ---
def stochastic_round_to_bf16(x):
    """float32 [...] -> bfloat16 [...], rounded up with probability equal to the distance, so
    E[result] = x: at lr 1e-6, rounding to nearest would undo every update (README)."""
    noise = torch.randint_like(x, 0, 1 << 16, dtype=torch.int32)  # below bfloat16's last bit
    return ((x.view(torch.int32) + noise) >> 16).to(torch.int16).view(torch.bfloat16)


@torch.no_grad()
def adamw_step(params, state, lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
               slice_size=1 << 25):
    """One AdamW step in float32; m and v stored in the parameter's dtype. Flat slices keep the
    float32 temporaries small even for a 128K-row embedding."""
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


def micro_batches(items, batch_size, seed):
    """Shuffled with a fixed seed and cut into micro-batches."""
    items = list(items)
    random.Random(seed).shuffle(items)
    return [items[i: i + batch_size] for i in range(0, len(items), batch_size)]


def train(model, batches, loss_fn, lr_flag, args, desc):
    """Gradient accumulation, clipping, AdamW at args.<lr_flag> -> mean metrics; a non-finite loss,
    gradient or weight stops the run before anything is saved. Under torchrun: FSDP2, and each
    rank takes its share of every step's micro-batches (share_of)."""
    lr = getattr(args, lr_flag)
    stop = (f" with --{lr_flag} {lr}; nothing was saved, and the models before it are intact "
            f"(README)")
    shard_for_training(model)  # torchrun
    model.train()
    model.config.use_cache = False
    model.activation_checkpointing_enable()
    params = [p for p in model.parameters() if p.requires_grad]
    state, totals, count = {}, {}, 0
    # the last step may have fewer micro-batches
    steps = [share_of(batches[i: i + args.grad_accum])
             for i in range(0, len(batches), args.grad_accum)]
    bar = tqdm(total=sum(map(len, steps)), desc=desc, disable=rank_and_world()[0] > 0)
    for step, share in enumerate(steps):
        for j, (batch, weight) in enumerate(share):
            metrics = loss_fn(model, batch)
            loss = summed(metrics["loss"].detach())  # NaN on any rank stops every rank
            if not torch.isfinite(loss):
                fail(f"{desc}: the loss became {loss.item()} at micro-batch "
                     f"{step * args.grad_accum + j}{stop}")
            (metrics["loss"] * weight).backward()
            if weight:  # torchrun's weight-0 repeats count in no metric
                for k, v in metrics.items():
                    totals[k] = totals.get(k, 0.0) + v.item()
                count += 1.0
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


# --- Plumbing: several GPUs under torchrun: FSDP2 to train, data parallel to sample and score ---
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
    """Under torchrun, FSDP2 (ZeRO-3): each decoder layer, then the rest, split across the ranks;
    weights, gradients and AdamW's m and v are each rank's shard. One process: nothing."""
    if rank_and_world()[1] == 1:
        return
    for layer in model.get_decoder().layers:
        fully_shard(layer)
    fully_shard(model)


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


# --- Plumbing: the command line, checked before anything runs, and a folder's settings ---
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


def parse_args(argv=None):
    argv = sys.argv[1:] if argv is None else [str(arg) for arg in argv]
    parser = HfArgumentParser(Args)
    parser.allow_abbrev = False  # --num_sample is a typo, not --num_samples
    args, unknown = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    if unknown:
        fail(f"unknown argument {unknown[0]!r} (see --help)")
    if args.demo:  # a flag written on the command line wins, even when it repeats the default
        given = {arg[2:].split("=")[0] for arg in argv if arg.startswith("--")}
        for name, value in DEMO.items():
            if name not in given:
                setattr(args, name, value)
        if "model" not in given:  # the demo's own model, built in the output folder
            args.model = None
    check_args(args)
    if args.output_dir is None:
        args.output_dir = "runs/cream-demo" if args.demo else f"runs/cream-{Path(args.model).name}"
    elif Path(args.output_dir).exists() and not Path(args.output_dir).is_dir():
        fail(f"--output_dir {args.output_dir} is a file, not a folder")
    return args


def check_args(args):
    """Every flag in its valid range (flag), every number finite, the flags of a method its own,
    and a --grad_accum the processes share evenly."""
    for field in fields(Args):
        value, valid = getattr(args, field.name), field.metadata.get("metavar")
        if value is None or valid is None:
            continue
        what = must_be(value, valid)
        if what:
            fail(f"--{field.name} must be {what}, got {value!r}")
    if args.max_length <= args.max_new_tokens:
        fail(f"--max_length {args.max_length} leaves no room for a prompt with --max_new_tokens "
             f"{args.max_new_tokens}")
    if args.consistency_scope == "pair" and args.consistency_measure != "kendall":
        fail("--consistency_scope pair takes each pair's (tau+1)/2: use it with "
             "--consistency_measure kendall")
    if args.method != "cream" and (args.consistency_measure, args.consistency_scope,
                                   args.t1_consistency) != ("kendall", "dataset", "algorithm1"):
        fail(f"--method {args.method} trains with C = 1: --consistency_measure, "
             f"--consistency_scope and --t1_consistency are CREAM's")
    if args.sft_epochs == 0 and args.method != "p-srlm":
        fail(f"--sft_epochs 0 with --method {args.method}: M1 would be M0, so r = log pi_1 - "
             f"log pi_0 = 0 for every sample (Eq. 3.9), every prompt ties and iteration 1 has "
             f"no pair; use --sft_epochs >= 1")
    world = rank_and_world()[1]
    if args.grad_accum % world:
        fail(f"--grad_accum {args.grad_accum} must be a multiple of the {world} processes (each "
             f"takes the same share of a step)")


AFTER_THE_FACT = ("output_dir", "evaluate", "eval_limit")  # they touch no training file


def check_same_settings(out, args, data_sha256):
    """Resuming is sound only with the settings and data that made the files: a folder holding a
    result made with others is refused; one without a result takes the new settings."""
    path = out / "args.json"
    settings = bound_paths(asdict(args), out)
    current = {k: v for k, v in settings.items() if k not in AFTER_THE_FACT}
    current["data_sha256"] = data_sha256
    results = [f for f in out.iterdir() if re.fullmatch(
        r"(M|iter)\d+|metrics\.jsonl|table\.md|evaluation\.jsonl|eval", f.name)]
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
        saved = bound_paths({f.name: f.default for f in fields(Args)} | saved, out)  # new flags
        changed = [f"--{k} {saved.get(k)!r} (now {v!r})" if k != "data_sha256"
                   else "the data files changed" for k, v in current.items() if saved.get(k) != v]
        if changed:
            fail(f"{out} holds a run made with other settings or data: {', '.join(changed)}; "
                 f"rerun with those or use a new --output_dir")
    write_text(path, json.dumps(settings | {"data_sha256": data_sha256}, indent=1))


def bound_paths(settings, out):
    """settings with each flag that names a local folder or file resolved, and one inside out
    written relative to it ('<output_dir>/demo-M0'): a folder moved, or spelled another way,
    still holds the same run."""
    for name in ("model", "data_dir"):
        value = settings.get(name)
        if isinstance(value, str) and Path(value).expanduser().exists():
            resolved, folder = Path(value).expanduser().resolve(), out.resolve()
            settings[name] = (f"<output_dir>/{resolved.relative_to(folder).as_posix()}"
                              if resolved.is_relative_to(folder) else str(resolved))
    return settings


# --- Plumbing: --demo, a tiny random Llama and a byte-level BPE tokenizer, built offline ---
DEMO = dict(iterations=2, num_prompts=12, num_samples=4, max_new_tokens=24, max_length=160,
            sft_epochs=3, sft_lr=3e-3, lr=3e-4, batch_size=4, grad_accum=2, score_batch_size=16,
            dtype="float32")  # where the command line leaves a flag out: ~1 min on 2 CPU cores
def build_demo(out):
    """The demo's model and data, written into out -> (model folder, data folder)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    model_dir, data_dir = out / "demo-M0", out / "demo-data"
    if not rank_0_sees(model_dir.exists()):
        bpe = Tokenizer(models.BPE())
        bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        bpe.decoder = decoders.ByteLevel()
        corpus = [prompt + " " + good for prompt, good, _ in DEMO_DATA] * 4
        bpe.train_from_iterator(corpus, trainers.BpeTrainer(
            vocab_size=400, special_tokens=["<s>", "</s>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
        tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>")
        config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                             max_position_embeddings=512, bos_token_id=tokenizer.bos_token_id,
                             eos_token_id=tokenizer.eos_token_id)
        torch.manual_seed(0)
        save_model(LlamaForCausalLM(config), tokenizer, model_dir, {"demo": True})
    data_dir.mkdir(parents=True, exist_ok=True)
    write_jsonl(data_dir / "sft.jsonl", [{"prompt": prompt, "response": good}
                                         for prompt, good, _ in DEMO_DATA])
    write_jsonl(data_dir / "prompts.jsonl", [{"prompt": prompt} for prompt, _, _ in DEMO_DATA
                                             for _ in range(2)])
    write_jsonl(data_dir / "eval.jsonl", [  # for --evaluate: a choice question and a GSM8K one
        {"task": "arc_easy", "prompt": "Which one is a color?\nA. red\nB. dog\nC. seven",
         "answer": "A"},
        {"task": "gsm8k", "prompt": "What is 10 minus 4?", "answer": "6"}])
    return str(model_dir), str(data_dir)


if __name__ == "__main__":
    main()
