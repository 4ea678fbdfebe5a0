"""SCIR: Self-Consistent Internal Rewards for self-rewarding language models (Zhou et al., arXiv 2502.08922).

    python scir.py --model mistralai/Mistral-7B-v0.3                              # the paper's setup, one 80 GB GPU
    python scir.py --model mistralai/Mistral-7B-Instruct-v0.3 --judge_sft_only \\
        --global_reference mistralai/Mistral-7B-v0.3                              # strong SFT (Table 3)
    python scir.py --method external                                              # Table 2's Skywork baseline
    python scir.py --demo                                                         # offline: tiny random model, 2 CPU cores

Read it next to the paper: SFT gives M0 (section 4.1, Appendix C.1); then per iteration M_t samples 4 responses
for fresh Alpaca prompts and two of them form an unlabeled pair; training M_t -> M_{t+1} computes, every step,
the implicit reward P (Eq. 4, global reference) and the judge's probability Q (Eq. 5, 2 templates x 2 orders,
section 3.3, length-regularised), the consistency loss (Eq. 6) and DPO on the pairs both agree on (DCPO, Eq. 7)
with the adaptive reference of Appendix A.
"""

import hashlib
import json
import logging
import math
import os
import random
import re
import shutil
import sys
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm
from transformers import (AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification,
                          AutoTokenizer, GenerationConfig, HfArgumentParser)
from transformers.generation.configuration_utils import ContinuousBatchingConfig
from transformers.hf_argparser import HfArg

from prompts import (ANSWER_PREFIX, JUDGE_IDS, chat_prompt, fill_pointwise, identifier_token_ids,
                     judge_prompts, reply_format, token_ids)


@dataclass
class Args:
    model: str = HfArg(default="mistralai/Mistral-7B-v0.3", help=(
        "the base model: SFT starts here, and it is the global reference pi_ref^g of Eq. 4 (section 4.1)"))
    global_reference: str = HfArg(default=None, help=(
        "pi_ref^g of Eq. 4 and Appendix A; default --model (for the -Instruct run the paper names Mistral-7B)"))
    data_dir: str = HfArg(default=None, help=(
        "read sft.jsonl, judge.jsonl and prompts.jsonl from here instead of the Hub (see README)"))
    output_dir: str = HfArg(default=None, help=(
        "default runs/scir-<model name>; rerunning the same command resumes from what is there"))
    demo: bool = HfArg(default=False, help=(
        "offline smoke run: tiny random model, built-in data, small settings (explicit flags still win)"))
    judge_sft_only: bool = HfArg(default=False, help=(
        "SFT on the judge examples only, lr 1e-7, 1 epoch: the paper's path for an instruction-tuned model (4.1)"))
    iterations: int = HfArg(default=3, help="iterations M0 -> M1 -> M2 -> M3 (section 4.1)")
    num_prompts: int = HfArg(default=4000, help="fresh Alpaca prompts per iteration (section 4.1)")
    prompt_offset: int = HfArg(default=0, help=(
        "skip this many prompts of the shuffled pool: 8000 gives a run from M2 the third iteration's prompts (Table 4)"))
    num_samples: int = HfArg(default=4, help=(
        "responses sampled per prompt; two picked at random form the unlabeled pair (section 4.1)"))
    sft_examples: int = HfArg(default=5000, help=(
        "Alpaca examples in the SFT data, besides LIMA's 1,030 (Appendix C.1)"))
    judge_pairs: int = HfArg(default=500, help=(
        "oasst2 preference pairs, each giving 4 judge examples: 2 templates x 2 orders (Appendix C.1)"))
    temperature: float = HfArg(default=0.7, help="sampling temperature (section 4.1)")
    top_p: float = HfArg(default=0.9, help="nucleus sampling (section 4.1)")
    max_new_tokens: int = HfArg(default=1024, help=(
        "longest sampled response (not in the paper; M3's AlpacaEval answers average ~1,900 characters)"))
    max_length: int = HfArg(default=2048, help=(
        "longest sequence: prompt + response, and every judge prompt (responses inside it are cut to fit)"))
    sft_epochs: int = HfArg(default=5, help="SFT epochs (section 4.1; 1 with --judge_sft_only)")
    sft_lr: float = HfArg(default=1e-6, help="SFT learning rate (section 4.1; 1e-7 with --judge_sft_only)")
    epochs: int = HfArg(default=2, help="SCIR training epochs per iteration (section 4.1)")
    lr: float = HfArg(default=5e-7, help="SCIR training learning rate (section 4.1)")
    beta: float = HfArg(default=0.1, help="DPO and implicit-reward beta (section 4.1)")
    alpha: float = HfArg(default=1.0, help="weight of the consistency loss in Eq. 7 (section 4.1)")
    tau: float = HfArg(default=0.7, help="confidence threshold of Eq. 6 (section 4.1)")
    length_reg: float = HfArg(default=0.02, help=(
        "alpha_l of the judge's length regularisation o' = o - alpha_l |y|, |y| in tokens (section 3.3, 4.1)"))
    length_reg_from: int = HfArg(default=3, help=(
        "first iteration (1 = M0 -> M1) that uses it: the third for Mistral-7B, the second for -Instruct (4.1)"))
    method: str = HfArg(default="scir", help=(
        "'scir'; Table 2 baselines ranking the 4 responses once, best vs worst, DPO with reference M_t: "
        "'srlm' by the pointwise Table 6 judge, 'irm' by the implicit reward (global reference), "
        "'external' by --reward_model"))
    reward_model: str = HfArg(default="Skywork/Skywork-Reward-Llama-3.1-8B", help=(
        "--method external: a sequence-classification reward model with its own chat template "
        "(section 4.1: Skywork-Reward, Liu et al. 2024; README: which one)"))
    no_consistency_loss: bool = HfArg(default=False, help="ablation (Table 4): drop Eq. 6 from Eq. 7")
    no_dcpo: bool = HfArg(default=False, help="ablation (Table 4): drop the DPO term of Eq. 7, keep consistency training")
    single_judge_prompt: bool = HfArg(default=False, help="ablation (Table 4): Q from template 1 in one order only")
    no_adaptive_reference: bool = HfArg(default=False, help=(
        "ablation (Table 4): DPO with the local reference M_t only, not the larger ratio of Appendix A"))
    eval_reward_bench: bool = HfArg(default=False, help=(
        "analysis (Figure 3): IRM, GRM and their agreeing subset of each M_k on RewardBench; can be added to a finished run"))
    warmup_ratio: float = HfArg(default=0.1, help=(
        "linear warmup share of the steps, then cosine decay (cosine: section 4.1; the warmup is not given)"))
    batch_size: int = HfArg(default=1, help=(
        "pairs (or SFT sequences) per forward pass; a pair costs 2 policy sequences + 4 judge prompts, "
        "so 1 keeps a Llama-3-8B step under 65 GiB (README)"))
    grad_accum: int = HfArg(default=32, help=(
        "micro-batches per optimizer step: 1 x 32 = 32 pairs (not in the paper; CREAM's official batch)"))
    max_grad_norm: float = HfArg(default=1.0, help="gradient clipping (not in the paper; a common default)")
    score_batch_size: int = HfArg(default=16, help="sequences per forward pass when scoring without gradients")
    seed: int = HfArg(default=42, help="same seed, same run")
    dtype: str = HfArg(default="auto", help=(
        "'auto' = bfloat16 on a GPU (with stochastic-rounding AdamW), float32 on CPU; or 'bfloat16' / 'float32'"))


# Settings --demo uses where the command line leaves the default: a 2-core CPU finishes in about a minute.
DEMO = dict(iterations=3, num_prompts=8, num_samples=4, sft_examples=16, judge_pairs=8, max_new_tokens=24,
            max_length=640, sft_epochs=3, sft_lr=3e-3, lr=3e-4, epochs=1, length_reg_from=3, batch_size=2,
            grad_accum=2, score_batch_size=16, dtype="float32")
# --judge_sft_only changes these defaults the same way (section 4.1)
JUDGE_SFT_ONLY = dict(sft_epochs=1, sft_lr=1e-7, length_reg_from=2)


def fail(message):
    """Stop with a one-line error and a non-zero exit, never a traceback."""
    sys.exit(f"scir.py: error: {message}")


# --- Files: JSONL in and out, written to a temporary name and renamed, so a crash never leaves half a file ---
def read_jsonl(path, required):
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
                except UnicodeEncodeError:  # JSON allows a lone surrogate such as \ud800, no tokenizer does
                    fail(f"{path}:{number}: {key} holds a lone surrogate, which no tokenizer encodes")
            rows.append(row)
    if not rows:
        fail(f"{path} is empty")
    return rows


def write_jsonl(path, rows):
    tmp = Path(f"{path}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def cached_jsonl(path, compute):
    """Rows of `path` if an earlier run finished it, else compute them and write the file (resume)."""
    if not Path(path).exists():
        rows = compute()
        write_jsonl(path, rows)
        return rows
    rows = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, 1):
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                rows.append(None)
            if not isinstance(rows[-1], dict):
                fail(f"{path}:{number} is damaged (not a JSON object): delete it to recompute it")
    return rows


def check_ids(path, rows, expected, keys=("id",)):
    """A cached file holds one row per expected row, in order, with the same keys; else it is stale."""
    if [[row.get(k) for k in keys] for row in rows] != [[row[k] for k in keys] for row in expected]:
        fail(f"{path} does not match this run's data or its earlier steps: delete it to recompute")


# --- Data (Appendix C.1): Alpaca + LIMA + pairwise judge examples from oasst2; Alpaca prompts not used in SFT ---
def load_hub_data(args):
    from datasets import load_dataset

    def load(repo, **kwargs):
        try:
            return load_dataset(repo, split="train", **kwargs)
        except Exception as e:
            fail(f"cannot load dataset {repo} ({type(e).__name__}; LIMA is gated: accept its terms and log in); "
                 f"offline, pass --data_dir DIR with sft.jsonl, judge.jsonl and prompts.jsonl (see README)")

    alpaca = [{"prompt": r["instruction"] + (f"\n\n{r['input']}" if r["input"].strip() else ""),
               "response": r["output"]} for r in load("tatsu-lab/alpaca")]
    random.Random(args.seed).shuffle(alpaca)
    sft = []  # --judge_sft_only: the judge examples alone (section 4.1)
    if not args.judge_sft_only:  # Alpaca, and LIMA's first exchange (30 of 1,030 rows have more turns)
        sft = alpaca[: args.sft_examples] + [{"prompt": r["conversations"][0], "response": r["conversations"][1]}
                for r in load("GAIR/lima", revision="refs/convert/parquet") if len(r["conversations"]) >= 2]
    judge = [{"prompt": r["prompt"].removeprefix("prompter: ").strip(), "chosen": r["chosen"], "rejected": r["rejected"]}
             for r in load("monology/oasst2_dpo") if r["lang"] == "en" and "\nassistant: " not in r["prompt"]
             and r["rejected"].strip() and r["chosen"].strip() != r["rejected"].strip()]  # a side to prefer
    return sft, judge, [{"prompt": row["prompt"]} for row in alpaca[args.sft_examples:]]


def load_data(args):
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
        if not (data_dir / name).is_file():
            fail(f"{data_dir / name} is missing")
    rows = {name: read_jsonl(data_dir / name, keys) for name, keys in needed.items()}
    check_pairs_differ(data_dir / "judge.jsonl", rows["judge.jsonl"])
    return rows.get("sft.jsonl", []), rows["judge.jsonl"], rows["prompts.jsonl"]


def check_pairs_differ(path, rows):
    """A preference pair whose two sides are the same text has nothing to prefer: refuse it."""
    for number, row in enumerate(rows, 1):
        if row["chosen"].strip() == row["rejected"].strip():
            fail(f"{path}: row {number}: chosen and rejected are the same text")


def judge_sft_examples(tokenizer, judge_rows, count, seed, max_length):
    """Each preference pair gives 4 examples (2 templates x 2 orders) whose target names the better response.

    The prompt ends in '[[' and the target is 'm]]' or 'M]]' (+ EOS): the same tokens as at the judge's answer
    position. Responses too long for max_length are cut as the judge's own prompts cut them (judge_inputs).
    Returns [(prompt_ids, target_ids)].
    """
    targets = {name: encode(tokenizer, "", f"{name}]]", ANSWER_PREFIX)[1] for name in JUDGE_IDS}
    room = max_length - max(map(len, targets.values()))
    examples = []
    for row in random.Random(seed).sample(judge_rows, min(count, len(judge_rows))):
        for ids, chosen_first in judge_inputs(tokenizer, row["prompt"], row["chosen"], row["rejected"], room):
            examples.append((ids, targets["m" if chosen_first else "M"]))
    return examples


# --- Models: one resident at a time (reference log-probs are precomputed, never a second model) ---
def torch_dtype(args):
    if args.dtype == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return {"bfloat16": torch.bfloat16, "float32": torch.float32}[args.dtype]


def load_tokenizer(path):
    if str(path).startswith(("/", ".", "~")) and not Path(path).expanduser().exists():
        fail(f"model {path!r}: no such folder")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception as e:
        fail(f"cannot load the tokenizer of {path!r} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")
    if tokenizer.eos_token_id is None:
        fail(f"the tokenizer of {path!r} has no EOS token")
    if tokenizer.pad_token_id is None:  # base Mistral has none; padding is masked out everywhere
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(path, args, model_class=AutoModelForCausalLM):
    try:
        model, info = model_class.from_pretrained(path, dtype=torch_dtype(args), output_loading_info=True)
    except Exception as e:
        fail(f"cannot load model {path!r} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")
    if info["missing_keys"]:  # transformers would only warn and start them from random values
        missing = sorted(info["missing_keys"])
        fail(f"model {str(path)!r} lacks {len(missing)} weights, {missing[0]} among them: a damaged checkpoint")
    return model.to("cuda" if torch.cuda.is_available() else "cpu")


def check_vocabulary(path, tokenizer, flag):
    """Before any training: the model at path must embed every token of the run's tokenizer."""
    try:
        vocab_size = AutoConfig.from_pretrained(path).vocab_size
    except Exception as e:
        fail(f"cannot read the config of {flag} {path!r} ({type(e).__name__})")
    if len(tokenizer) > vocab_size:
        fail(f"{flag} {path!r} embeds {vocab_size} tokens, but its tokenizer has {len(tokenizer)}")


def model_ready(path):
    """True if a finished model folder is at path (resume), False if none; a damaged one stops the run."""
    path = Path(path)
    if not path.exists():
        return False
    weights = list(path.glob("*.safetensors")) + list(path.glob("*.bin"))
    try:
        json.loads((path / "training_summary.json").read_text())
        json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        weights = []
    if not weights:
        fail(f"{path} is incomplete or damaged: delete it, and rerun to redo it")
    return True


def save_model(model, tokenizer, path, summary):
    """save_pretrained into a temporary folder, then rename: a folder M<k> is always complete."""
    tmp = Path(f"{path}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.config.use_cache = True  # training turned it off; a saved model is for generation
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "training_summary.json").write_text(json.dumps(summary, indent=1))
    os.replace(tmp, path)


def encode(tokenizer, prompt, response=None, answer_prefix=""):
    """Token ids of the chat-formatted prompt (+ answer_prefix where the reply starts) and, for SFT data, of the
    response and the chat format's end of turn (prompts.reply_format: Llama-3-Instruct's <|eot_id|>).

    The response is tokenized together with its prompt, as the model sees it when generating: tokenizers that add
    a prefix space (SentencePiece) or merge across the boundary would give other ids for the response alone.
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
    """[(prompt_ids, response_ids)] -> right-padded input_ids, attention_mask, labels (-100 off the response)."""
    width = max(len(p) + len(r) for p, r in sequences)
    input_ids = torch.full((len(sequences), width), pad_id)
    attention_mask = torch.zeros(len(sequences), width, dtype=torch.long)
    labels = torch.full((len(sequences), width), -100)
    for row, (p, r) in enumerate(sequences):
        input_ids[row, : len(p) + len(r)] = torch.tensor(p + r)
        attention_mask[row, : len(p) + len(r)] = 1
        labels[row, len(p): len(p) + len(r)] = torch.tensor(r)
    return input_ids, attention_mask, labels


VOCAB_SLICE = 8192  # LM-head rows per float32 slice: [N, 8192] float32 blocks, never [N, V]


class TokenLogps(torch.autograd.Function):
    """log pi(target) = logit[target] - logsumexp(logits), logits = hidden @ weight^T (+ bias) in float32,
    VOCAB_SLICE head rows at a time: no pass holds an [N, V] tensor or a float32 copy of the whole head
    (at Llama-3's 128K vocabulary that keeps every training step under 65 GiB: README). The backward
    pass recomputes each slice; d logp / d logits = onehot(target) - softmax.
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


def sequence_logps(model, input_ids, attention_mask, response_mask):
    """Summed log pi(y|x) over response tokens: [B, L] x3 -> [B] float32.

    The LM head runs only at the positions that predict a response token, in float32 (a bfloat16
    head rounds a logit near 20 by up to 0.06: README), a slice of the vocabulary at a time
    (TokenLogps). Any transformers causal LM works (it has get_decoder and get_output_embeddings);
    one that scales or caps its logits after the head (Gemma 2, Cohere) needs that step added.
    """
    predicts_response = F.pad(response_mask[:, 1:].bool(), (0, 1), value=False)  # p predicts token p+1
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # left or right padding alike
    hidden = model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                 use_cache=False).last_hidden_state[predicts_response]  # [N, H]
    targets = input_ids[:, 1:][response_mask[:, 1:].bool()]
    logps = token_logps(hidden, targets, model.get_output_embeddings())
    rows = predicts_response.nonzero()[:, 0]
    return torch.zeros(input_ids.shape[0], device=hidden.device).index_add(0, rows, logps)


@torch.no_grad()
def batched_logps(model, sequences, pad_id, batch_size, desc):
    """Summed response log-probs of [(prompt_ids, response_ids)] without gradients -> list of floats."""
    model.eval()
    logps = []
    for start in tqdm(range(0, len(sequences), batch_size), desc=desc):
        input_ids, attention_mask, labels = (t.to(model.device) for t in collate(sequences[start: start + batch_size],
                                                                                   pad_id))
        logps += sequence_logps(model, input_ids, attention_mask, labels != -100).tolist()
    return logps


def score_logps(path, model_path, sequences, tokenizer, args):
    """batched_logps under the model at model_path, cached in path (resume)."""
    rows = cached_jsonl(path, lambda: [{"logp": v} for v in batched_logps(
        load_model(model_path, args), sequences, tokenizer.pad_token_id, args.score_batch_size,
        f"log-probs under {model_path}")])
    if len(rows) != len(sequences):
        fail(f"{path} holds log-probs of other sequences: delete it to recompute")
    return [row["logp"] for row in rows]


# --- Optimizer: AdamW in float32, written back to bfloat16 with stochastic rounding (README: one GPU) ---
def stochastic_round_to_bf16(x):
    """float32 [...] -> bfloat16 [...], rounded up with probability equal to the distance, so E[result] = x."""
    bits = x.view(torch.int32) + torch.randint_like(x, 0, 1 << 16, dtype=torch.int32)  # noise below bf16's last bit
    return (bits >> 16).to(torch.int16).view(torch.bfloat16)  # the high 16 bits of a float32 are a bfloat16


@torch.no_grad()
def adamw_step(params, state, lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, slice_size=1 << 25):
    """One AdamW step (Loshchilov & Hutter) in float32; m and v are stored in the parameter's dtype.

    Each tensor is updated in flat slices, so the float32 temporaries stay small even for a 128K-row embedding.
    """
    state["step"] = step = state.get("step", 0) + 1
    for p in params:
        if p.grad is None:
            continue
        if p not in state:
            state[p] = (torch.zeros_like(p), torch.zeros_like(p))
        flat = [t.view(-1) for t in (p, p.grad, *state[p])]
        for start in range(0, p.numel(), slice_size):
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


def train(model, batches, loss_fn, lr_flag, args, desc):
    """Gradient accumulation over `batches` (lists of micro-batches), clipping, AdamW at the learning rate
    args.<lr_flag>; returns mean metrics. Stops before anything is saved if a loss, gradient or weight turns
    non-finite."""
    lr = getattr(args, lr_flag)
    stop = f" with --{lr_flag} {lr}; nothing was saved, and the models before it are intact (README)"
    model.train()
    model.config.use_cache = False
    model.activation_checkpointing_enable()
    params = [p for p in model.parameters() if p.requires_grad]
    state, totals, count = {}, {}, 0
    total_steps = math.ceil(len(batches) / args.grad_accum)
    bar = tqdm(range(len(batches)), desc=desc)
    for i in bar:
        metrics = loss_fn(model, batches[i])
        if not torch.isfinite(metrics["loss"]):
            fail(f"{desc}: the loss became {metrics['loss'].item()} at micro-batch {i}{stop}")
        group_start = i - i % args.grad_accum  # the last step may have fewer micro-batches
        backward(metrics, 1 / min(args.grad_accum, len(batches) - group_start))
        if (i + 1) % args.grad_accum == 0 or i + 1 == len(batches):
            if not torch.isfinite(torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)):
                fail(f"{desc}: the gradients became non-finite at micro-batch {i}{stop}")
            adamw_step(params, state, learning_rate(i // args.grad_accum, total_steps, lr, args.warmup_ratio))
            model.zero_grad(set_to_none=True)
        for k, v in metrics.items():
            totals[k] = totals.get(k, 0.0) + v.item()
        count += 1
        bar.set_postfix(loss=f"{totals['loss'] / count:.4f}")
    if not all(torch.isfinite(p).all() for p in params):  # the last step's update is seen by no loss
        fail(f"{desc}: the weights became non-finite{stop}")
    model.eval()
    return {k: v / count for k, v in totals.items()}


def backward(metrics, scale):
    """Gradients of metrics["loss"] * scale. A loss computed on detached copies of forward outputs
    (metrics["detached"]: [(outputs, copies)], scir_batch_loss) then sends its gradient through each
    forward pass in a backward of its own."""
    (metrics["loss"] * scale).backward()
    for outputs, copies in metrics.pop("detached", []):
        if any(output.requires_grad for output in outputs):
            torch.autograd.backward(outputs, [copy.grad for copy in copies])


def micro_batches(items, batch_size, seed):
    """Shuffle with a fixed seed and cut into micro-batches."""
    items = list(items)
    random.Random(seed).shuffle(items)
    return [items[i: i + batch_size] for i in range(0, len(items), batch_size)]


# --- Section 4.1: SFT of the base model on instructions + pairwise judge examples gives M0 ---
def sft_loss(model, batch):
    """Mean negative log-likelihood of the response tokens; prompt and padding are labelled -100."""
    input_ids, attention_mask, labels = (t.to(model.device) for t in batch)
    response_mask = labels != -100
    loss = -sequence_logps(model, input_ids, attention_mask, response_mask).sum() / response_mask.sum()
    return {"loss": loss}


def run_sft(args, tokenizer, sft_rows, judge_rows, out):
    instruction = []
    for row in sft_rows:
        prompt_ids, response_ids = encode(tokenizer, row["prompt"], row["response"])
        if len(prompt_ids) < args.max_length - 1:  # keep the prompt whole, cut the response to fit
            instruction.append((prompt_ids, response_ids[: args.max_length - len(prompt_ids)]))
    # the judge examples' responses are cut inside the prompt, as the judge sees them; only an instruction
    # longer than max_length on its own leaves an example out
    judge = judge_sft_examples(tokenizer, judge_rows, args.judge_pairs, args.seed, args.max_length) \
        if args.method == "scir" else []
    judge_fit = [(ids, target) for ids, target in judge if len(ids) + len(target) <= args.max_length]
    examples = instruction + judge_fit
    skipped = len(sft_rows) - len(instruction) + len(judge) - len(judge_fit)
    if not examples:
        fail(f"every SFT prompt is longer than --max_length {args.max_length}")
    batches = [collate(b, tokenizer.pad_token_id) for epoch in range(args.sft_epochs)
               for b in micro_batches(examples, args.batch_size, args.seed + epoch)]
    model = load_model(args.model, args)
    torch.manual_seed(args.seed)  # stochastic rounding draws from it
    summary = train(model, batches, sft_loss, "sft_lr", args, "SFT -> M0")
    summary.update(examples=len(examples), skipped_too_long=skipped)
    save_model(model, tokenizer, out / "M0", summary)
    del model


# --- Section 4.1: M_t samples 4 responses per prompt; two picked at random form an unlabeled pair ---
def cache_config(model, num_requests, longest):
    """generate_batch sizes its paged KV cache from free GPU memory; on CPU (~15 GB) size it to the work instead."""
    if model.device.type != "cpu":
        return None
    return ContinuousBatchingConfig(num_blocks=num_requests * math.ceil(longest / 256), max_batch_tokens=512)


@torch.no_grad()
def sample_responses(model, tokenizer, prompts, args, num_samples=None):
    """N samples per prompt with continuous batching (`generate_batch`: a paged KV cache, no padding)."""
    if model.device.type == "cpu":  # it logs that psutil is missing on every CPU call
        logging.getLogger("ContinuousBatchingLogger").setLevel(logging.CRITICAL)
    model_eos = model.generation_config.eos_token_id
    eos_ids = {tokenizer.eos_token_id} | set(model_eos if isinstance(model_eos, list) else [model_eos] if model_eos else [])
    num_samples = num_samples or args.num_samples
    config = GenerationConfig(do_sample=True, temperature=args.temperature, top_p=args.top_p, top_k=0,
                              max_new_tokens=args.max_new_tokens, num_return_sequences=num_samples,
                              eos_token_id=sorted(eos_ids), pad_token_id=tokenizer.pad_token_id)
    inputs = [encode(tokenizer, p) for p in prompts]
    cache = cache_config(model, len(inputs) * num_samples, max(map(len, inputs)) + args.max_new_tokens)
    outputs = model.generate_batch(inputs=inputs, generation_config=config, continuous_batching_config=cache,
                                   progress_bar=True)
    if len(outputs) != len(prompts) * num_samples:
        fail(f"generation returned {len(outputs)} of {len(prompts) * num_samples} responses")
    grouped = [[] for _ in prompts]  # request ids are req_<prompt index>[__child#k]
    for request_id, output in outputs.items():
        if output.error is not None:
            fail(f"generation failed for request {request_id}: {output.error}")
        tokens = list(output.generated_tokens)
        finished = bool(tokens) and tokens[-1] in eos_ids
        grouped[int(request_id.split("__")[0].removeprefix("req_"))].append(
            {"response": tokenizer.decode(tokens[:-1] if finished else tokens, skip_special_tokens=True),
             "token_ids": tokens, "finished": finished})  # the ids as sampled, stop token included
    return grouped


def run_sampling(args, tokenizer, pool, t, out):
    """Sample from M_t, then pick two of each prompt's responses at random: the unlabeled pair (y1, y2)."""
    model = load_model(out / f"M{t}", args)
    torch.manual_seed(args.seed + 1000 * t)
    grouped = sample_responses(model, tokenizer, [row["prompt"] for row in pool], args)
    del model
    rng = random.Random(args.seed + t)
    rows = []
    for row, samples in zip(pool, grouped):
        first, second = rng.sample(range(len(samples)), 2)
        rows.append({"id": row["id"], "prompt": row["prompt"], "samples": samples,
                     "response_1": samples[first], "response_2": samples[second]})
    return rows


# --- Eq. 4: the implicit reward model (IRM), P(y1 > y2) under the global reference ---
def implicit_preference(policy_logps_1, policy_logps_2, ref_logps_1, ref_logps_2, beta):
    """P_irm(y1 > y2 | x) = sigmoid(beta log pi/pi_ref (y1) - beta log pi/pi_ref (y2)): [B] x4 -> [B] (Eq. 4)."""
    return torch.sigmoid(beta * ((policy_logps_1 - ref_logps_1) - (policy_logps_2 - ref_logps_2)))


# --- Eq. 5 and section 3.3: the generative reward model (GRM), the judge's probability of y1's identifier ---
def judge_probability(logit_first, logit_second, len_first, len_second, alpha_l):
    """P(the response shown first wins): the two identifiers' logits renormalised, each minus alpha_l |y| (3.3).

    [B] x4 -> [B]. Renormalising over {m, M} makes P and Q two Bernoulli distributions for Eq. 6; a softmax over
    two logits is the sigmoid of their difference.
    """
    return torch.sigmoid((logit_first - alpha_l * len_first) - (logit_second - alpha_l * len_second))


def judge_inputs(tokenizer, instruction, response_1, response_2, max_length):
    """The 4 judge prompts of a pair as token ids ending in '[[', responses cut so each fits max_length.

    A response that fits is kept whole and the other gets the room it leaves; two long ones get half each.
    Returns [(ids, y1_shown_first)] for the 4 prompts (2 templates x 2 orders, prompts.judge_prompts).
    """
    empty = judge_prompts(instruction, "", "")
    budget = max_length - max(len(encode(tokenizer, text, answer_prefix=ANSWER_PREFIX)) for text, _ in empty)
    texts = (response_1, response_2)
    response_ids = [tokenizer(r, add_special_tokens=False).input_ids for r in texts]
    rooms = [max(0, min(len(ids), max(budget // 2, budget - len(other))))
             for ids, other in zip(response_ids, response_ids[::-1])]
    while True:  # re-encoding a cut text can take a few more tokens: shrink the larger room until it fits
        cut = [tokenizer.decode(ids[:room]).rstrip("\ufffd") if len(ids) > room else text  # a cut splits a character
               for ids, room, text in zip(response_ids, rooms, texts)]
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
    hidden = model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                 use_cache=False).last_hidden_state[:, -1]  # [S, H]
    head = model.get_output_embeddings()
    rows = list(identifier_ids)
    bias = None if head.bias is None else head.bias[rows].float()
    return F.linear(hidden.float(), head.weight[rows].float(), bias)


def generative_preference(model, tokenizer, instructions, responses_1, responses_2, identifier_ids, alpha_l,
                          max_length, lengths_1=None, lengths_2=None, num_prompts=4, per_prompt=False):
    """P_grm(y1 > y2 | x) (Eq. 5) averaged over 2 templates x 2 orders (section 3.3): B pairs -> [B].

    With gradients when called under autograd; lengths |y| (tokens) default to those of the responses given.
    num_prompts=1 keeps template 1 in one order (the Table 4 ablation); per_prompt=True returns [B, num_prompts].
    """
    def token_count(r):
        return len(tokenizer(r, add_special_tokens=False).input_ids)
    lengths_1 = lengths_1 or [token_count(r) for r in responses_1]
    lengths_2 = lengths_2 or [token_count(r) for r in responses_2]
    sequences, first_is_y1 = [], []
    for x, y1, y2 in zip(instructions, responses_1, responses_2):
        for ids, y1_first in judge_inputs(tokenizer, x, y1, y2, max_length)[:num_prompts]:
            sequences.append(ids)
            first_is_y1.append(y1_first)
    logits = identifier_logits(model, sequences, identifier_ids, tokenizer.pad_token_id)  # [num_prompts * B, 2]
    first_is_y1 = torch.tensor(first_is_y1, device=logits.device)
    len_1 = torch.tensor(lengths_1, device=logits.device, dtype=torch.float32).repeat_interleave(num_prompts)
    len_2 = torch.tensor(lengths_2, device=logits.device, dtype=torch.float32).repeat_interleave(num_prompts)
    p_first = judge_probability(logits[:, 0], logits[:, 1], torch.where(first_is_y1, len_1, len_2),
                                torch.where(first_is_y1, len_2, len_1), alpha_l)
    p_y1 = torch.where(first_is_y1, p_first, 1 - p_first)
    p_y1 = p_y1.view(-1, num_prompts)
    return p_y1 if per_prompt else p_y1.mean(-1)


# --- Eq. 6: consistency loss between P (IRM) and Q (GRM): KL to a stopped target, entropy, confidence mask ---
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


# --- Eq. 3 and Appendix A: DPO with the adaptive reference (the larger local or global reference ratio) ---
def dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta):
    """-log sigmoid(beta log pi/pi_ref (y_w) - beta log pi/pi_ref (y_l)): [B] x4 -> [B] (Eq. 3)."""
    return -F.logsigmoid(beta * ((policy_chosen_logps - ref_chosen_logps) - (policy_rejected_logps - ref_rejected_logps)))


def adaptive_reference_logratio(local_ref_chosen, local_ref_rejected, global_ref_chosen, global_ref_rejected):
    """log pi_ref(y_w)/pi_ref(y_l) of whichever reference makes it larger (Appendix A): [B] x4 -> [B]."""
    return torch.maximum(local_ref_chosen - local_ref_rejected, global_ref_chosen - global_ref_rejected)


# --- Eq. 7: DCPO on the pairs IRM and GRM agree on, plus alpha times the consistency loss ---
def scir_loss(policy_logps_1, policy_logps_2, global_ref_logps_1, global_ref_logps_2, local_ref_logps_1,
              local_ref_logps_2, p_grm, beta, alpha, tau, dcpo=True, adaptive_reference=True):
    """Eq. 7 per pair: 1[IRM and GRM agree] L_DPO + alpha L_consistency. [B] x7 -> dict of [B] tensors.

    The agreed winner is chosen; only the difference of the reference log-probs enters Eq. 3, so the adaptive
    reference is passed as that difference. dcpo=False and adaptive_reference=False are Table 4's ablations.
    """
    p_irm = implicit_preference(policy_logps_1, policy_logps_2, global_ref_logps_1, global_ref_logps_2, beta)
    consistency = consistency_loss(p_irm, p_grm, tau)
    p, q = p_irm.detach(), p_grm.detach()
    agreed = (((p > 0.5) & (q > 0.5)) | ((p < 0.5) & (q < 0.5))).float()  # a tie (0.5) agrees with nothing

    def chosen(logps_1, logps_2):  # y1 if the IRM prefers it, else y2
        return torch.where(p > 0.5, logps_1, logps_2)

    def rejected(logps_1, logps_2):
        return torch.where(p > 0.5, logps_2, logps_1)
    local = (chosen(local_ref_logps_1, local_ref_logps_2), rejected(local_ref_logps_1, local_ref_logps_2))
    global_ = (chosen(global_ref_logps_1, global_ref_logps_2), rejected(global_ref_logps_1, global_ref_logps_2))
    ref_logratio = adaptive_reference_logratio(*local, *global_) if adaptive_reference else local[0] - local[1]
    dpo = dpo_loss(chosen(policy_logps_1, policy_logps_2), rejected(policy_logps_1, policy_logps_2),
                   ref_logratio, torch.zeros_like(ref_logratio), beta)
    return {"loss": (agreed * dpo if dcpo else 0) + alpha * consistency, "dpo_loss": dpo,
            "consistency_loss": consistency, "agree": agreed, "p_irm": p_irm, "p_grm": p_grm}


def pair_sequences(tokenizer, pair, max_length):
    """(prompt_ids, sampled response ids) of y1 and y2, cut to max_length the same way for scoring and training."""
    prompt_ids = encode(tokenizer, pair["prompt"])
    return [(prompt_ids, pair[key]["token_ids"][: max_length - len(prompt_ids)]) for key in ("response_1", "response_2")]


def pair_forward(model, tokenizer, batch, args, identifier_ids, alpha_l, per_prompt=False):
    """Policy log-probs of y1 and y2 (one stacked forward) and the judge's Q for a micro-batch of pairs."""
    sequences = [s for pair in batch for s in pair["sequences"]]  # y1, y2, y1, y2, ...
    input_ids, attention_mask, labels = (t.to(model.device) for t in collate(sequences, tokenizer.pad_token_id))
    logps = sequence_logps(model, input_ids, attention_mask, labels != -100).view(-1, 2)
    with torch.set_grad_enabled(torch.is_grad_enabled() and not args.no_consistency_loss):  # Q then only masks DPO

        def texts(key):
            return [p[key]["response"] for p in batch]

        def lengths(key):  # |y| as sampled, for the length penalty
            return [len(p[key]["token_ids"]) for p in batch]
        p_grm = generative_preference(model, tokenizer, [p["prompt"] for p in batch], texts("response_1"),
                                      texts("response_2"), identifier_ids, alpha_l, args.max_length,
                                      lengths("response_1"), lengths("response_2"),
                                      num_prompts=1 if args.single_judge_prompt else 4, per_prompt=per_prompt)
    return logps[:, 0], logps[:, 1], p_grm


def scir_batch_loss(args, tokenizer, identifier_ids, alpha_l):
    def loss_fn(model, batch):
        policy_1, policy_2, p_grm = pair_forward(model, tokenizer, batch, args, identifier_ids, alpha_l)
        # Eq. 7 on detached copies, then one backward per forward pass (train's backward): a single
        # backward through both would hold the judge pass's weight gradients, 13.5 GiB at 7B, until
        # the policy pass's backward reached each layer (README: memory)
        copies = [x.detach().requires_grad_() for x in (policy_1, policy_2, p_grm)]

        def ref(key):
            return torch.tensor([p[key] for p in batch], device=model.device)
        terms = scir_loss(copies[0], copies[1], ref("global_logp_1"), ref("global_logp_2"), ref("local_logp_1"),
                          ref("local_logp_2"), copies[2], args.beta, 0.0 if args.no_consistency_loss else args.alpha,
                          args.tau, dcpo=not args.no_dcpo, adaptive_reference=not args.no_adaptive_reference)
        agreed = terms["agree"]
        return {"loss": terms["loss"].mean(), "consistency_loss": terms["consistency_loss"].mean().detach(),
                "dpo_loss": (agreed * terms["dpo_loss"]).mean().detach(),  # Eq. 7's DPO term, 0 where they disagree
                "dcpo_fraction": agreed.mean(),
                "detached": [((policy_1, policy_2), copies[:2]), ((p_grm,), copies[2:])]}
    return loss_fn


# --- Scoring pairs without gradients: reference log-probs, P and Q of a model before or after an iteration ---
def judge_length_reg(args, t):
    """alpha_l of M_t's judge: length regularisation is on from iteration --length_reg_from, where M_{from-1} judges."""
    return args.length_reg if t + 1 >= args.length_reg_from else 0.0


def global_reference_logps(args, tokenizer, pairs, path):
    """log pi_ref^g(y1|x) and log pi_ref^g(y2|x) of every pair, cached in path."""
    logps = score_logps(path, args.global_reference or args.model, [s for pair in pairs for s in pair["sequences"]],
                         tokenizer, args)
    return [{"logp_1": a, "logp_2": b} for a, b in zip(logps[::2], logps[1::2])]


@torch.no_grad()
def score_pairs(model_path_or_model, tokenizer, pairs, args, identifier_ids, alpha_l, desc):
    """Without gradients: log pi(y1|x), log pi(y2|x), Q and Q of each judge prompt for every pair -> list of dicts."""
    model = load_model(model_path_or_model, args) if isinstance(model_path_or_model, (str, Path)) else model_path_or_model
    model.eval()
    results = []
    for start in tqdm(range(0, len(pairs), args.score_batch_size // 2), desc=desc):
        batch = pairs[start: start + args.score_batch_size // 2]
        logps_1, logps_2, q = pair_forward(model, tokenizer, batch, args, identifier_ids, alpha_l, per_prompt=True)
        for k in range(len(batch)):
            results.append({"logp_1": logps_1[k].item(), "logp_2": logps_2[k].item(), "q": q[k].mean().item(),
                            "q_prompts": q[k].tolist()})
    return results


def irm_preferences(scored, global_ref, beta):
    """P of Eq. 4 from stored log-probs: rows {logp_1, logp_2} of a model and of pi_ref^g -> list of P."""
    def column(rows, key):
        return torch.tensor([row[key] for row in rows], dtype=torch.float64)
    return implicit_preference(column(scored, "logp_1"), column(scored, "logp_2"), column(global_ref, "logp_1"),
                               column(global_ref, "logp_2"), beta).tolist()


# --- Analysis (Table 1, Figure 2, 4.3): how often the IRM and the GRM of a model pick the same response ---
def agree(p, q):
    """IRM and GRM pick the same response; a probability of exactly 0.5 picks none, so it agrees with nothing."""
    return (p > 0.5 and q > 0.5) or (p < 0.5 and q < 0.5)


def judge_label(q_prompts):
    """The GRM's label, True if y1 wins, where all its judge prompts agree (section 4.3); else None."""
    return True if all(q > 0.5 for q in q_prompts) else False if all(q < 0.5 for q in q_prompts) else None


def pointwise_label(scores):
    """The Table 6 judge's label of (y1, y2) from its two scores, True if y1 scores higher; a tie or an unreadable
    judgement gives None."""
    return None if None in scores or scores[0] == scores[1] else scores[0] > scores[1]


def internal_consistency(p_irm, grm_labels):
    """Analysis (Table 1, Figure 2): share of pairs on which IRM and GRM agree, counting the pairs the GRM labels
    (judge_label, pointwise_label) and the IRM labels (P != 0.5). [P], [True/False/None] -> (rate, counted)."""
    counted = [(p, label) for p, label in zip(p_irm, grm_labels) if label is not None and p != 0.5]
    return (sum(agree(p, float(label)) for p, label in counted) / len(counted) if counted else None), len(counted)


def consistency_figures(start, trained, global_ref, beta, grm_label):
    """Analysis (Table 1, Figure 2) of one iteration's pairs D_t: M_t's IRM-GRM consistency on them (new pairs) and
    M_{t+1}'s (trained pairs), each from rows {logp_1, logp_2, the judge's verdict} -> metrics."""
    figures = {}
    for key, scored in (("new", start), ("trained", trained)):
        rate, counted = internal_consistency(irm_preferences(scored, global_ref, beta), map(grm_label, scored))
        figures |= {f"consistency_{key}": rate, f"counted_{key}": counted}
    return figures


# --- One iteration (section 4.1): precompute the references, train M_t -> M_{t+1} with Eq. 7, measure again ---
def run_scir_training(args, tokenizer, samples, t, out, identifier_ids):
    """Precompute pi_ref^g and pi_ref^l = M_t log-probs (and P, Q of M_t), train M_t -> M_{t+1}, measure P, Q again."""
    it = out / f"iter{t + 1}"
    alpha_l = judge_length_reg(args, t)
    pairs = [dict(row, sequences=pair_sequences(tokenizer, row, args.max_length)) for row in samples]
    global_ref = global_reference_logps(args, tokenizer, pairs, it / "logps_global.jsonl")
    start = cached_jsonl(it / "start.jsonl", lambda: score_pairs(
        out / f"M{t}", tokenizer, pairs, args, identifier_ids, alpha_l, f"IRM and GRM of M{t}"))
    if len(start) != len(pairs):
        fail(f"{it / 'start.jsonl'} holds scores of other pairs than the iteration's samples: delete it to recompute")
    for pair, g, s in zip(pairs, global_ref, start):
        pair.update(global_logp_1=g["logp_1"], global_logp_2=g["logp_2"], local_logp_1=s["logp_1"],
                    local_logp_2=s["logp_2"])
    batches = [b for epoch in range(args.epochs) for b in micro_batches(pairs, args.batch_size, args.seed + t + epoch)]
    model = load_model(out / f"M{t}", args)
    torch.manual_seed(args.seed + 1000 * t + 1)
    summary = train(model, batches, scir_batch_loss(args, tokenizer, identifier_ids, alpha_l), "lr", args,
                    f"SCIR M{t} -> M{t + 1}")
    end = score_pairs(model, tokenizer, pairs, args, identifier_ids, alpha_l, f"IRM and GRM of M{t + 1}")
    trained = end if judge_length_reg(args, t + 1) == alpha_l else score_pairs(  # M_{t+1} judges with its own alpha_l
        model, tokenizer, pairs, args, identifier_ids, judge_length_reg(args, t + 1), f"GRM of M{t + 1}, alpha_l on")
    p_start, p_end = irm_preferences(start, global_ref, args.beta), irm_preferences(end, global_ref, args.beta)
    rows = []
    for pair, ps, s, pe, e in zip(pairs, p_start, start, p_end, end):
        rows.append({"id": pair["id"], "prompt": pair["prompt"], "response_1": pair["response_1"]["response"],
                     "response_2": pair["response_2"]["response"], "p_start": ps, "q_start": s["q"],
                     "q_prompts_start": s["q_prompts"], "label_irm_start": int(ps > 0.5),
                     "label_grm_start": int(s["q"] > 0.5), "p_end": pe, "q_end": e["q"], "q_prompts_end": e["q_prompts"],
                     "label_irm_end": int(pe > 0.5), "label_grm_end": int(e["q"] > 0.5)})
    summary.update(pairs=len(pairs), consistency_rate=sum(agree(p, e["q"]) for p, e in zip(p_end, end)) / len(pairs),
                   **consistency_figures(start, trained, global_ref, args.beta,
                                         lambda scored: judge_label(scored["q_prompts"])))
    write_jsonl(it / "pairs.jsonl", rows)
    save_model(model, tokenizer, out / f"M{t + 1}", summary)
    del model


# --- Baselines (Table 2): rank the 4 responses once, before training, then DPO on best vs worst ---
SCORE = re.compile(r"(?i:score)\**(?:\s*[:：=]|\s+of|\s+is)?[\s*\[<]*"
                   r"(\d+(?:\.\d+)?(?:\s*\+\s*\d+(?:\.\d+)?)*(?:\s*=\s*\d+(?:\.\d+)?)?)"  # N, or a tally 1 + 1 = 2
                   r"[\]>*]*(?:\s*(?:/|out of)\s*(\d+))?")                              # an optional denominator


def parse_score(judgement):
    """The last 'Score: N' of a judgement, N in 0..5 ('**Score:** 4', 'score of 4', 'Score: 4/5', 'Score: 3 + 1 = 4'
    too; 'Score: 5/10' is on another scale and not read), else None."""
    scores = []
    for tally, denominator in SCORE.findall(judgement):
        if denominator and denominator != "5":
            continue
        total = float(tally.split("=")[-1]) if "=" in tally else sum(float(term) for term in tally.split("+"))
        if 0 <= total <= 5:
            scores.append(total)
    return scores[-1] if scores else None


def pointwise_prompt(tokenizer, instruction, response, max_length):
    """Table 6's prompt for one response, cut (like judge_inputs) so the prompt keeps to about max_length tokens."""
    room = max(1, max_length - len(encode(tokenizer, fill_pointwise(instruction, ""))))
    ids = tokenizer(response, add_special_tokens=False).input_ids
    return fill_pointwise(instruction, response if len(ids) <= room else tokenizer.decode(ids[:room]).rstrip("\ufffd"))


def judge_samples(model, tokenizer, samples_rows, args, seed):
    """Self-Rewarding: one sampled Table 6 judgement per response in each row's samples -> per-row scores (None: no
    score)."""
    model.eval()
    torch.manual_seed(seed)
    prompts = [pointwise_prompt(tokenizer, row["prompt"], s["response"], args.max_length)
               for row in samples_rows for s in row["samples"]]
    judgements = [reply for (reply,) in sample_responses(model, tokenizer, prompts, args, num_samples=1)]
    rows, n = [], len(samples_rows[0]["samples"])
    for j, row in enumerate(samples_rows):
        texts = [reply["response"] for reply in judgements[j * n: (j + 1) * n]]
        rows.append({"id": row["id"], "scores": [parse_score(text) for text in texts], "judgements": texts})
    return rows


def reward_model_tokenizer(path):
    """The external reward model's tokenizer; it needs a chat template to put a prompt and a response in."""
    tokenizer = load_tokenizer(path)
    if not tokenizer.chat_template:
        fail(f"--reward_model {path!r} has no chat template to put a prompt and a response in")
    return tokenizer


@torch.no_grad()
def external_rewards(path, samples_rows, args):
    """The external reward model's score of every sample, each (prompt, response) in its own chat template.

    Left padding puts every sequence's last token at the end, where a sequence classifier reads its score;
    transformers finds that token as the last one that is not pad_token_id, so the padding id must end none.
    """
    tokenizer = reward_model_tokenizer(path)
    model = load_model(path, args, AutoModelForSequenceClassification).eval()
    sequences = [token_ids(tokenizer, tokenizer.apply_chat_template(
        [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": s["response"]}],
        tokenize=False)) for row in samples_rows for s in row["samples"]]
    rewards = []
    for start in tqdm(range(0, len(sequences), args.score_batch_size), desc=f"rewards of {path}"):
        batch = sequences[start: start + args.score_batch_size]
        pad_id = min(set(range(len(batch) + 1)) - {ids[-1] for ids in batch})
        model.config.get_text_config().pad_token_id = pad_id
        width = max(map(len, batch))
        input_ids = torch.tensor([[pad_id] * (width - len(ids)) + ids for ids in batch])
        attention_mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in batch])
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        logits = model(input_ids=input_ids.to(model.device), attention_mask=attention_mask.to(model.device),
                       position_ids=position_ids.to(model.device)).logits
        rewards += logits[:, 0].float().tolist()
    del model
    n = len(samples_rows[0]["samples"])
    return [{"id": row["id"], "rewards": rewards[j * n: (j + 1) * n]} for j, row in enumerate(samples_rows)]


def dpo_batch_loss(args, tokenizer):
    def loss_fn(model, batch):
        """Chosen and rejected of a micro-batch stacked into one forward pass; Eq. 3 against M_t."""
        sequences = [p["sequences"][0] for p in batch] + [p["sequences"][1] for p in batch]  # chosen, rejected
        input_ids, attention_mask, labels = (t.to(model.device) for t in collate(sequences, tokenizer.pad_token_id))
        chosen, rejected = sequence_logps(model, input_ids, attention_mask, labels != -100).split(len(batch))

        def ref(key):
            return torch.tensor([p[key] for p in batch], device=model.device)
        losses = dpo_loss(chosen, rejected, ref("ref_chosen_logp"), ref("ref_rejected_logp"), args.beta)
        return {"loss": losses.mean(), "dpo_loss": losses.mean().detach()}
    return loss_fn


def run_baseline_training(args, tokenizer, samples, t, out):
    """SRLM (judge scores) or IRM (log pi_t - log pi_ref^g) ranks each prompt's responses; DPO on best vs worst.

    Analysis (Table 1 is SRLM's): the pairs are also labelled by the IRM and by the Table 6 judge, of M_t before
    and of M_{t+1} after training; M_t's judge labels SRLM's pairs by the scores that ranked them."""
    it = out / f"iter{t + 1}"
    sequences = []
    for row in samples:
        prompt_ids = encode(tokenizer, row["prompt"])
        sequences += [(prompt_ids, s["token_ids"][: args.max_length - len(prompt_ids)]) for s in row["samples"]]
    local = score_logps(it / "logps_local.jsonl", out / f"M{t}", sequences, tokenizer, args)
    unusable = None  # judgements without a score (srlm)
    if args.method == "irm":
        global_ = score_logps(it / "logps_global.jsonl", args.global_reference or args.model, sequences, tokenizer, args)
        rewards = [a - b for a, b in zip(local, global_)]
    elif args.method == "external":  # the reward model is resident alone, before M_t is loaded again
        path = it / "rewards_external.jsonl"
        scored = cached_jsonl(path, lambda: external_rewards(args.reward_model, samples, args))
        check_ids(path, scored, samples)
        rewards = [value for row in scored for value in row["rewards"]]
    else:
        judged = cached_jsonl(it / "judgements.jsonl", lambda: judge_samples(
            load_model(out / f"M{t}", args), tokenizer, samples, args, args.seed + 1000 * t + 2))
        check_ids(it / "judgements.jsonl", judged, samples)
        rewards = [score for row in judged for score in row["scores"]]
        unusable = sum(score is None for score in rewards)
    pairs, judge_scores, n = [], [], len(samples[0]["samples"])
    for j, row in enumerate(samples):
        r = rewards[j * n: (j + 1) * n]
        usable = [i for i, value in enumerate(r) if value is not None]
        if len(usable) < 2 or max(r[i] for i in usable) == min(r[i] for i in usable):
            continue  # no score, or all tie: no pair
        best, worst = max(usable, key=r.__getitem__), min(usable, key=r.__getitem__)
        pairs.append({"id": row["id"], "prompt": row["prompt"], "chosen": row["samples"][best]["response"],
                      "rejected": row["samples"][worst]["response"], "rewards": r,
                      "samples": [row["samples"][best], row["samples"][worst]],
                      "sequences": [sequences[j * n + best], sequences[j * n + worst]],
                      "ref_chosen_logp": local[j * n + best], "ref_rejected_logp": local[j * n + worst]})
        judge_scores.append([r[best], r[worst]])  # srlm: M_t's judge on the pair, the scores that ranked it
    if not pairs:
        fail(f"iteration {t + 1}: no prompt has two responses with different rewards"
             + (f" ({unusable} judgements gave no score)" if unusable else ""))
    global_ref = global_reference_logps(args, tokenizer, pairs, it / "logps_global_pairs.jsonl")
    batches = [b for epoch in range(args.epochs) for b in micro_batches(pairs, args.batch_size, args.seed + t + epoch)]
    model = load_model(out / f"M{t}", args)
    if args.method != "srlm":  # M_t's judge has not seen the pairs: it judges them for the analysis
        path = it / "judgements_pairs.jsonl"
        judged = cached_jsonl(path, lambda: [dict(row, chosen=p["chosen"]) for row, p in zip(
            judge_samples(model, tokenizer, pairs, args, args.seed + 1000 * t + 2), pairs)])
        check_ids(path, judged, pairs, keys=("id", "chosen"))
        judge_scores = [row["scores"] for row in judged]
    torch.manual_seed(args.seed + 1000 * t + 1)
    summary = train(model, batches, dpo_batch_loss(args, tokenizer), "lr", args, f"{args.method} M{t} -> M{t + 1}")
    end_logps = batched_logps(model, [s for p in pairs for s in p["sequences"]], tokenizer.pad_token_id,
                              args.score_batch_size, f"IRM of M{t + 1}")
    end_judged = judge_samples(model, tokenizer, pairs, args, args.seed + 1000 * t + 3)
    start = [{"logp_1": p["ref_chosen_logp"], "logp_2": p["ref_rejected_logp"], "scores": s}
             for p, s in zip(pairs, judge_scores)]
    end = [{"logp_1": a, "logp_2": b, "scores": j["scores"]}
           for a, b, j in zip(end_logps[::2], end_logps[1::2], end_judged)]
    summary.update(pairs=len(pairs), unusable_judgements=unusable, **consistency_figures(
        start, end, global_ref, args.beta, lambda scored: pointwise_label(scored["scores"])))
    p_start, p_end = (irm_preferences(scored, global_ref, args.beta) for scored in (start, end))
    write_jsonl(it / "pairs.jsonl", [{k: v for k, v in p.items() if k not in ("samples", "sequences")}
                                     | {"p_start": ps, "scores_start": s["scores"], "p_end": pe,
                                        "scores_end": e["scores"], "judgements_end": j["judgements"]}
                                     for p, ps, s, pe, e, j in zip(pairs, p_start, start, p_end, end, end_judged)])
    save_model(model, tokenizer, out / f"M{t + 1}", summary)
    del model


# --- Analysis (Figure 3, section 4.4): IRM, GRM and the pairs they agree on, scored on RewardBench ---
REWARD_BENCH_SECTIONS = {
    "Chat": ["alpacaeval-easy", "alpacaeval-length", "alpacaeval-hard", "mt-bench-easy", "mt-bench-med"],
    "Chat Hard": ["mt-bench-hard", "llmbar-natural", "llmbar-adver-neighbor", "llmbar-adver-GPTInst",
                  "llmbar-adver-GPTOut", "llmbar-adver-manual"],
    "Safety": ["refusals-dangerous", "refusals-offensive", "xstest-should-refuse", "xstest-should-respond",
               "donotanswer"],
    "Reasoning": ["math-prm", "hep-cpp", "hep-go", "hep-java", "hep-js", "hep-python", "hep-rust"],
}


def load_reward_bench(args):
    """Figure 3's data: RewardBench's filtered split, or rewardbench.jsonl in --data_dir; pairs with a gold label."""
    if args.data_dir is None:
        from datasets import load_dataset
        try:
            rows = list(load_dataset("allenai/reward-bench", split="filtered"))
        except Exception as e:
            fail(f"cannot load dataset allenai/reward-bench ({type(e).__name__}); offline, put rewardbench.jsonl "
                 f"in --data_dir (see README)")
        source = "allenai/reward-bench"
    else:
        source = Path(args.data_dir) / "rewardbench.jsonl"
        if not source.is_file():
            fail(f"{source} is missing (--eval_reward_bench)")
        rows = read_jsonl(source, ["prompt", "chosen", "rejected", "subset"])
    known = {name for names in REWARD_BENCH_SECTIONS.values() for name in names}
    for number, row in enumerate(rows, 1):
        if row["subset"] not in known:
            fail(f"{source}: row {number}: subset {row['subset']!r} is in none of Chat, Chat Hard, Safety, Reasoning")
    usable = [row for row in rows if row["chosen"].strip() and row["rejected"].strip()
              and row["chosen"] != row["rejected"]]
    if len(usable) < len(rows):
        print(f"note: {len(rows) - len(usable)} RewardBench pairs with an empty side or the same text on both "
              f"sides are left out: no reward model can label them")
    return usable


def reward_bench_scores(subsets, correct):
    """Section accuracies of one reward model: [subset], [True/False, None where it gives no label] -> dict.

    Only labelled pairs count (section 4.4). A section pools its subsets' pairs (RewardBench's example-weighted
    mean), except Reasoning, where math-prm weighs as much as the six code subsets together.
    """
    labelled = [(s, c) for s, c in zip(subsets, correct) if c is not None]

    def accuracy(names):
        hits = [c for s, c in labelled if s in names]
        return sum(hits) / len(hits) if hits else None
    scores = {}
    for section, names in REWARD_BENCH_SECTIONS.items():
        parts = [accuracy(names[:1]), accuracy(names[1:])] if section == "Reasoning" else [accuracy(names)]
        parts = [a for a in parts if a is not None]
        scores[section] = sum(parts) / len(parts) if parts else None
    sections = [v for v in scores.values() if v is not None]
    return scores | {"average": sum(sections) / len(sections) if sections else None, "labelled": len(labelled),
                     "pairs": len(subsets)}


def reward_bench_pairs(tokenizer, rows, args):
    """RewardBench rows -> pairs shaped like the sampled ones, y1 = chosen, y2 = rejected (with EOS, as sampled)."""
    pairs = []
    for row in rows:
        if len(encode(tokenizer, row["prompt"])) > args.max_length - args.max_new_tokens:
            continue  # the same rule as for the prompt pools
        responses = [{"response": text, "token_ids": encode(tokenizer, row["prompt"], text)[1]}
                     for text in (row["chosen"], row["rejected"])]
        content_id = hashlib.sha1(json.dumps([row[k] for k in ("prompt", "chosen", "rejected")]).encode()).hexdigest()
        pairs.append({"id": content_id[:16], "prompt": row["prompt"], "subset": row["subset"], "response_1": responses[0],
                      "response_2": responses[1], "samples": responses})
    if not pairs:
        fail("every RewardBench prompt is longer than --max_length - --max_new_tokens")
    if len(pairs) < len(rows):
        print(f"note: {len(rows) - len(pairs)} of {len(rows)} RewardBench prompts are longer than --max_length - "
              f"--max_new_tokens and left out")
    return [dict(pair, sequences=pair_sequences(tokenizer, pair, args.max_length)) for pair in pairs]


def score_model_on_pairs(args, tokenizer, pairs, k, out, identifier_ids):
    """M_k's log-probs of y1 and y2 and its judge's verdicts: Q per judge prompt (SCIR) or Table 6 scores (baselines)."""
    if args.method == "scir":
        return score_pairs(out / f"M{k}", tokenizer, pairs, args, identifier_ids, judge_length_reg(args, k),
                           f"RewardBench: IRM and GRM of M{k}")
    logps = score_logps(out / "reward_bench" / f"logps_M{k}.jsonl", out / f"M{k}",
                        [s for p in pairs for s in p["sequences"]], tokenizer, args)
    judged = judge_samples(load_model(out / f"M{k}", args), tokenizer, pairs, args, args.seed + 1000 * k + 4)
    return [{"logp_1": a, "logp_2": b, "scores": j["scores"], "judgements": j["judgements"]}
            for a, b, j in zip(logps[::2], logps[1::2], judged)]


def evaluate_reward_bench(args, tokenizer, pairs, out, identifier_ids):
    """Figure 3: M_0..M_T label each pair with the IRM (Eq. 4) and the GRM -> {k: {"irm"|"grm"|"consistency": scores}}."""
    folder = out / "reward_bench"
    folder.mkdir(exist_ok=True)
    global_ref = global_reference_logps(args, tokenizer, pairs, folder / "logps_global.jsonl")
    results = {}
    for k in range(args.iterations + 1):
        scored = cached_jsonl(folder / f"M{k}.jsonl", lambda: [dict(row, id=pair["id"]) for pair, row in zip(
            pairs, score_model_on_pairs(args, tokenizer, pairs, k, out, identifier_ids))])
        if [row["id"] for row in scored] != [pair["id"] for pair in pairs]:
            fail(f"{folder / f'M{k}.jsonl'} scores other pairs than the RewardBench data now: delete {folder} to recompute")
        irm = [None if p == 0.5 else p > 0.5 for p in irm_preferences(scored, global_ref, args.beta)]
        if args.method == "scir":  # the GRM's prediction is the mean over its 4 prompts (3.3), as DCPO uses it
            grm = [None if s["q"] == 0.5 else s["q"] > 0.5 for s in scored]
        else:  # the Table 6 judge: a tie or an unreadable judgement labels nothing
            grm = [pointwise_label(s["scores"]) for s in scored]
        both = [i if i == g else None for i, g in zip(irm, grm)]  # "Consistency": where IRM and GRM give one label
        subsets = [pair["subset"] for pair in pairs]
        results[k] = {name: reward_bench_scores(subsets, labels) for name, labels in
                      (("irm", irm), ("grm", grm), ("consistency", both))}
    return results


# --- Demo: a tiny random Llama and a byte-level BPE tokenizer built here, so the whole loop runs offline ---
DEMO_DATA = [
    ("Name a primary color.", "Red is a primary color.", "Cats like milk."),
    ("What is 2 + 3?", "2 + 3 = 5.", "2 + 3 = 7."),
    ("Give a synonym for happy.", "Glad is a synonym for happy.", "Sad."),
    ("What do bees make?", "Bees make honey.", "Bees make cars."),
    ("Translate 'hola' to English.", "'Hola' means hello.", "'Hola' means goodbye."),
    ("What is the capital of France?", "The capital of France is Paris.", "Berlin."),
    ("How many legs does a spider have?", "A spider has eight legs.", "Two."),
    ("What is the opposite of cold?", "The opposite of cold is hot.", "Cold."),
    ("Which planet is called the red planet?", "Mars is called the red planet.", "The Moon."),
    ("What gas do plants take in?", "Plants take in carbon dioxide.", "Plants take in gold."),
    ("What is 10 minus 4?", "10 minus 4 is 6.", "10 minus 4 is 9."),
    ("Name a mammal that can fly.", "The bat is a mammal that can fly.", "The fish."),
    ("What freezes at zero degrees Celsius?", "Water freezes at zero degrees Celsius.", "Fire."),
    ("How many days are in a week?", "A week has seven days.", "A week has ten days."),
    ("What color is the sky on a clear day?", "The sky is blue on a clear day.", "Green."),
    ("Who wrote Hamlet?", "William Shakespeare wrote Hamlet.", "Nobody."),
]


def build_demo(out):
    """Write a tiny Llama (random weights) with its tokenizer and the demo data; return (model_dir, data_dir)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    import prompts

    model_dir, data_dir = out / "demo-base", out / "demo-data"
    if not model_dir.exists():
        bpe = Tokenizer(models.BPE())
        bpe.pre_tokenizer, bpe.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
        corpus = [" ".join(row) for row in DEMO_DATA] + list(prompts.PAIRWISE_JUDGE_TEMPLATES)  # judge prompts compress
        bpe.train_from_iterator(corpus * 4, trainers.BpeTrainer(
            vocab_size=1000, special_tokens=["<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
        tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>")
        config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                             bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
        torch.manual_seed(0)
        save_model(LlamaForCausalLM(config), tokenizer, model_dir, {"demo": True})
    data_dir.mkdir(parents=True, exist_ok=True)
    write_jsonl(data_dir / "sft.jsonl", [{"prompt": p, "response": good} for p, good, _ in DEMO_DATA])
    write_jsonl(data_dir / "judge.jsonl", [{"prompt": p, "chosen": good, "rejected": bad} for p, good, bad in DEMO_DATA])
    write_jsonl(data_dir / "prompts.jsonl", [{"prompt": p} for p, _, _ in DEMO_DATA for _ in range(2)])
    subsets = ["alpacaeval-easy", "llmbar-natural", "donotanswer", "math-prm", "hep-python"]  # one of each kind
    write_jsonl(data_dir / "rewardbench.jsonl", [{"prompt": p, "chosen": good, "rejected": bad, "subset": subsets[j % 5]}
                                                 for j, (p, good, bad) in enumerate(DEMO_DATA)])
    return str(model_dir), str(data_dir)


# --- The loop: base -SFT-> M0 -SCIR-> M1 -SCIR-> M2 -SCIR-> M3 ---
def given_flags(argv):
    """Names of the flags written on the command line ('--name value' or '--name=value')."""
    return {arg[2:].split("=")[0] for arg in argv if arg.startswith("--")}


def parse_args(argv=None):
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
    check_ranges(args)
    if args.max_length <= args.max_new_tokens:
        fail(f"--max_length {args.max_length} leaves no room for a prompt with --max_new_tokens {args.max_new_tokens}")
    if args.method not in ("scir", "srlm", "irm", "external"):
        fail(f"--method must be scir, srlm, irm or external, got {args.method!r}")
    if args.no_consistency_loss and args.no_dcpo:
        fail("--no_consistency_loss with --no_dcpo leaves Eq. 7 empty: nothing would be trained")
    ablations = [f"--{name}" for name in ("no_consistency_loss", "no_dcpo", "single_judge_prompt", "no_adaptive_reference",
                                          "judge_sft_only") if getattr(args, name)]
    if args.method != "scir" and ablations:  # the baselines' SFT has no pairwise judge examples (README)
        fail(f"{ablations[0]} belongs to --method scir; for an instruction-tuned model the baselines take --sft_epochs 0"
             if ablations[0] == "--judge_sft_only" else f"{ablations[0]} is an ablation of SCIR, not of --method {args.method}")
    if args.method != "external" and "reward_model" in given:
        fail(f"--reward_model belongs to --method external, not to --method {args.method}")
    if args.sft_epochs == 0 and (args.global_reference or args.model) == args.model:
        fail("--sft_epochs 0 makes M0 the global reference itself, so P = 0.5 for every pair: pass --global_reference "
             "(the base model of Eq. 4)")
    if args.judge_sft_only and (args.global_reference or args.model) == args.model:
        print(f"scir.py: warning: the global reference of Eq. 4 is --model itself, and --judge_sft_only moves M0 "
              f"only {args.sft_epochs} epoch(s) at lr {args.sft_lr} away from it: P stays near 0.5 and Eq. 6's mask "
              f"rarely fires; section 4.1 uses the base model, --global_reference mistralai/Mistral-7B-v0.3",
              file=sys.stderr)
    if args.dtype not in ("auto", "bfloat16", "float32"):
        fail(f"--dtype must be auto, bfloat16 or float32, got {args.dtype!r}")
    if args.output_dir is not None and Path(args.output_dir).exists() and not Path(args.output_dir).is_dir():
        fail(f"--output_dir {args.output_dir} is a file, not a folder")
    if args.output_dir is None:
        method = "" if args.method == "scir" else f"{args.method}-"  # a baseline never shares SCIR's folder
        args.output_dir = f"runs/scir-{method}{'demo' if args.demo else Path(args.model).name}"
    return args


# Allowed ranges, checked before anything runs
AT_LEAST = {"iterations": 1, "num_prompts": 1, "num_samples": 2, "max_new_tokens": 1, "max_length": 2,
            "batch_size": 1, "grad_accum": 1, "epochs": 1, "score_batch_size": 2, "judge_pairs": 1,
            "length_reg_from": 1, "sft_epochs": 0, "sft_examples": 0, "prompt_offset": 0, "seed": 0,
            "sft_lr": 0, "lr": 0, "alpha": 0, "length_reg": 0}
ABOVE_ZERO = ("temperature", "beta", "max_grad_norm")


def check_ranges(args):
    """Every number within its range, finite, before anything runs: a one-line error names the flag."""
    for f in fields(args):
        value = getattr(args, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            fail(f"--{f.name} must be a finite number, got {value}")
    for name, low in AT_LEAST.items():
        if getattr(args, name) < low:
            fail(f"--{name} must be at least {low}, got {getattr(args, name)}")
    for name in ABOVE_ZERO:
        if getattr(args, name) <= 0:
            fail(f"--{name} must be above 0, got {getattr(args, name)}")
    for name in ("sft_lr", "lr"):  # AdamW moves each weight by about lr a step: above 1 is a typo
        if getattr(args, name) > 1:
            fail(f"--{name} must be at most 1, got {getattr(args, name)}")
    if not 0 < args.top_p <= 1:
        fail(f"--top_p must be in (0, 1], got {args.top_p}")
    if not 0.5 <= args.tau < 1:
        fail(f"--tau must be in [0.5, 1), got {args.tau}")
    if not 0 <= args.warmup_ratio < 1:
        fail(f"--warmup_ratio must be in [0, 1), got {args.warmup_ratio}")


AFTER_THE_FACT = ("output_dir", "eval_reward_bench")  # may change between reruns: they touch no training file


def check_same_settings(out, args, data_sha256):
    """Resuming is only sound with the settings and data that made the files: refuse a folder made with other ones.

    A folder that holds no result yet (an earlier run stopped at its checks) takes the new settings.
    """
    path = out / "args.json"
    current = {k: v for k, v in asdict(args).items() if k not in AFTER_THE_FACT} | {"data_sha256": data_sha256}
    results = [f for f in out.iterdir()
               if re.fullmatch(r"(M|iter)\d+|metrics\.jsonl|table\.md|reward_bench", f.name)]
    if path.exists() and results:
        try:
            saved = json.loads(path.read_text())
        except ValueError:
            saved = None
        if not isinstance(saved, dict):
            fail(f"{path} is damaged: delete it, and rerun the command that made the run to resume it")
        saved = {f.name: f.default for f in fields(Args)} | {"data_sha256": data_sha256} | saved  # added later
        changed = [f"--{k} {saved.get(k)!r} (now {v!r})" if k != "data_sha256" else "the data files changed"
                   for k, v in current.items() if saved.get(k) != v]
        if changed:
            fail(f"{out} holds a run made with other settings or data: {', '.join(changed)}; "
                 f"rerun with those or use a new --output_dir")
    Path(f"{path}.tmp").write_text(json.dumps(asdict(args) | {"data_sha256": data_sha256}, indent=1))
    os.replace(f"{path}.tmp", path)


METHOD_NAMES = {"scir": "Self-Consistent Internal Rewards", "srlm": "Self-Rewarding (LLM-as-a-Judge)",
                "irm": "Self-Rewarding (Implicit Reward Model)", "external": "External Reward Model"}
SAMPLING_KEYS = ("response_length", "too_long", "consistency_new", "counted_new")  # of M_k's samples D_k
TRAINING_KEYS = ("pairs", "loss", "consistency_loss", "dpo_loss", "dcpo_fraction", "consistency_rate",
                 "unusable_judgements", "consistency_trained", "counted_trained")  # how M_k was trained, on D_{k-1}


def metrics_row(k, summary):
    """The row of model M_k: what its own samples will add (None until then) and how it was trained (summary of
    its training_summary.json; the baselines have no P/Q analysis)."""
    return ({"model": f"M{k}", "iteration": k} | dict.fromkeys(SAMPLING_KEYS)
            | {key: summary.get(key) for key in TRAINING_KEYS})


def final_table(args, rows):
    """The run laid out like the paper: one row per model M_k (Table 2's rows; Table 1 and Figure 2's consistency on
    D_{t-1} and D_t; Figure 3's RewardBench accuracy), percentages -> markdown text."""

    def pct(v):
        return "-" if v is None else f"{100 * v:.2f}"

    def number(v, spec):
        return "-" if v is None else format(v, spec)
    header = ["Method", "Model", "Sample tokens", "Consistency D_t-1", "Consistency D_t", "Pairs", "DCPO %", "Loss"]
    with_reward_bench = any("reward_bench" in row for row in rows)
    header += ["RewardBench IRM", "RewardBench GRM", "RewardBench IRM = GRM"] if with_reward_bench else []
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for k, row in enumerate(rows):
        cells = [METHOD_NAMES[args.method] if k == 0 else "", row["model"], number(row["response_length"], ".0f"),
                 pct(row["consistency_trained"]), pct(row["consistency_new"]), number(row["pairs"], "d"),
                 pct(row["dcpo_fraction"]), number(row["loss"], ".4f")]
        if with_reward_bench:
            cells += [pct(row["reward_bench"][name]["average"]) for name in ("irm", "grm", "consistency")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    """Parse, lock the output folder, run; an interruption or a full disk ends in one line, and a rerun resumes."""
    args = parse_args(argv)
    out = Path(args.output_dir)
    import fcntl  # Unix only, like the lock it takes

    try:
        out.mkdir(parents=True, exist_ok=True)
        with open(out / ".lock", "a") as lock:  # "a": an existing lock file is not even touched
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released when this process ends, however
            except BlockingIOError:
                fail(f"another run is using {out}: wait for it to end, or use another --output_dir")
            run(args, out)
    except KeyboardInterrupt:
        fail("interrupted; rerun the same command to resume where it stopped")
    except OSError as e:
        fail(f"{e.filename or out}: {e.strerror or e}; rerun the same command to resume once that is fixed")


def iteration_pools(tokenizer, prompt_rows, per_iteration, args):
    """Each iteration's fresh prompts, without those too long to sample -> [(pool, number left out)]."""
    pools = []
    for t in range(args.iterations):
        pool, too_long = [], 0
        for j, row in enumerate(prompt_rows[t * per_iteration: (t + 1) * per_iteration]):
            if len(encode(tokenizer, row["prompt"])) > args.max_length - args.max_new_tokens:
                too_long += 1
            else:
                pool.append({"id": f"{t + 1}-{j}", "prompt": row["prompt"]})
        if not pool:
            fail(f"every prompt of iteration {t + 1} is longer than --max_length - --max_new_tokens")
        pools.append((pool, too_long))
    return pools


def check_models(args, tokenizer):
    """Before SFT: the tokenizer fits every model of the run, and the judge's template fits --max_length."""
    check_vocabulary(args.model, tokenizer, "--model")
    if args.global_reference not in (None, args.model):
        check_vocabulary(args.global_reference, tokenizer, "--global_reference")
        probe = chat_prompt(tokenizer, judge_prompts("Any question?", "One answer.", "Another one.")[0][0])
        reference = load_tokenizer(args.global_reference)
        if len(reference) != len(tokenizer) or reference(probe).input_ids != tokenizer(probe).input_ids:
            fail(f"--global_reference {args.global_reference!r} has another tokenizer than --model: Eq. 4 "
                 f"needs both to give the same token ids")
    if args.method == "external":
        reward_model_tokenizer(args.reward_model)
        config = AutoConfig.from_pretrained(args.reward_model)
        if config.num_labels != 1 or not any(a.endswith("ForSequenceClassification")
                                             for a in config.architectures or []):
            fail(f"--reward_model {args.reward_model!r} is not a reward model (a sequence classifier with "
                 f"one output)")
    if args.method == "scir":  # the pairwise prompts, read after '[['
        templates, prefix = [text for text, _ in judge_prompts("", "", "")], ANSWER_PREFIX
    else:  # Table 6's prompt, answered by a sampled judgement
        templates, prefix = [fill_pointwise("", "")], ""
    overhead = max(len(encode(tokenizer, text, answer_prefix=prefix)) for text in templates)
    if args.max_length < overhead + 2:
        fail(f"--max_length {args.max_length} cannot hold the judge prompt: its template alone takes {overhead} "
             f"tokens")


def run(args, out):
    """Checks, SFT, the iterations, the analyses and the final table, in out."""
    if args.demo:
        args.model, args.data_dir = build_demo(out)
    sft_rows, judge_rows, prompt_rows = load_data(args)  # validated before any model is loaded
    data_sha256 = hashlib.sha256(json.dumps([sft_rows, judge_rows, prompt_rows]).encode()).hexdigest()
    bench_rows = load_reward_bench(args) if args.eval_reward_bench else None
    random.Random(args.seed).shuffle(prompt_rows)
    prompt_rows = prompt_rows[args.prompt_offset:]  # the shuffle is the same for every run with this --seed
    if len(prompt_rows) < args.iterations * args.num_prompts:
        print(f"note: {len(prompt_rows)} prompts for {args.iterations} x {args.num_prompts}: "
              f"each iteration gets {len(prompt_rows) // args.iterations}")
    per_iteration = min(args.num_prompts, len(prompt_rows) // args.iterations)
    if per_iteration == 0:
        fail(f"{len(prompt_rows)} prompts cannot be shared by {args.iterations} iterations")
    tokenizer = load_tokenizer(args.model)
    try:
        identifier_ids = identifier_token_ids(tokenizer)
    except ValueError as e:
        fail(str(e))
    check_models(args, tokenizer)
    pools = iteration_pools(tokenizer, prompt_rows, per_iteration, args)
    bench = reward_bench_pairs(tokenizer, bench_rows, args) if args.eval_reward_bench else None
    check_same_settings(out, args, data_sha256)  # from here on files are written

    if not model_ready(out / "M0"):
        if args.global_reference not in (None, args.model):  # loaded and freed: a damaged one stops us before SFT
            load_model(args.global_reference, args)
        if args.sft_epochs == 0:  # no SFT: M0 is the model as given
            save_model(load_model(args.model, args), tokenizer, out / "M0", {"sft": "skipped"})
        else:
            run_sft(args, tokenizer, sft_rows, judge_rows, out)

    rows = [metrics_row(0, {})]  # one row per model M_k, as in the paper's tables
    for t, (pool, too_long) in enumerate(pools):  # iteration t + 1 trains M_t into M_{t+1}
        it = out / f"iter{t + 1}"
        it.mkdir(exist_ok=True)
        samples = cached_jsonl(it / "samples.jsonl", lambda: run_sampling(args, tokenizer, pool, t, out))
        check_ids(it / "samples.jsonl", samples, pool, keys=("id", "prompt"))
        if not model_ready(out / f"M{t + 1}"):
            if args.method == "scir":
                run_scir_training(args, tokenizer, samples, t, out, identifier_ids)
            else:
                run_baseline_training(args, tokenizer, samples, t, out)
        summary = json.loads((out / f"M{t + 1}" / "training_summary.json").read_text())
        lengths = [len(s["token_ids"]) for row in samples for s in row["samples"]]
        rows[t].update(response_length=sum(lengths) / len(lengths), too_long=too_long,
                       consistency_new=summary.get("consistency_new"), counted_new=summary.get("counted_new"))
        rows.append(metrics_row(t + 1, summary))
        write_jsonl(out / "metrics.jsonl", rows)
    if args.eval_reward_bench:
        for k, scores in evaluate_reward_bench(args, tokenizer, bench, out, identifier_ids).items():
            rows[k]["reward_bench"] = scores
    write_jsonl(out / "metrics.jsonl", rows)
    table = final_table(args, rows)
    (out / "table.md.tmp").write_text(table)
    os.replace(out / "table.md.tmp", out / "table.md")
    print("\n" + table)
    print(f"models, samples, pairs, metrics.jsonl and table.md are in {out}")


if __name__ == "__main__":
    main()
