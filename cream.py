"""CREAM: Consistency Regularized Self-Rewarding Language Models (Wang et al., ICLR 2025, arXiv 2410.12735).

    python cream.py --model meta-llama/Meta-Llama-3-8B-Instruct   # the paper's setup, one 80 GB GPU
    python cream.py --model mistralai/Mistral-7B-v0.3              # any HF causal LM
    python cream.py --demo                                         # offline: tiny random model, 2 CPU cores

Read it next to the paper's Algorithm 1 (section 3.3): SFT (line 2); then per iteration: sampling (line 5),
DPO rewards under pi_t and pi_{t-1} with pi_0 as reference (Eq. 3.9, lines 6-9), Kendall tau per prompt
(Eq. 3.10, line 10), the consistency rate (line 11), D_DPO and D_RDPO (Eq. 3.11-3.12, lines 12-13), and
the consistency-regularized loss C * L_DPO + (1 - C) * L_RDPO (Eq. 3.7, line 14).
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
from transformers import (AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig,
                          HfArgumentParser)
from transformers.generation.configuration_utils import ContinuousBatchingConfig
from transformers.hf_argparser import HfArg

from prompts import chat_prompt, fill_pointwise, reply_format, token_ids


@dataclass
class Args:
    model: str = HfArg(default="meta-llama/Meta-Llama-3-8B-Instruct", help=(
        "M0: a Hub id or local path (paper: Llama-3 and Llama-2 at ~7B; the official code uses the Instruct model)"))
    data_dir: str = HfArg(default=None, help=(
        "read sft.jsonl {'prompt','response'} and prompts.jsonl {'prompt'} from here instead of the Hub"))
    output_dir: str = HfArg(default=None, help=(
        "default runs/cream-<model name>; rerunning the same command resumes from what is there"))
    demo: bool = HfArg(default=False, help=(
        "offline smoke run: tiny random model, built-in data, small settings (explicit flags still win)"))
    iterations: int = HfArg(default=2, help="T preference iterations after SFT: M2 and M3 as in Table 1")
    num_prompts: int = HfArg(default=10500, help=(
        "prompts per iteration: 21K prompts in D_U shared equally by the iterations (section 4.1)"))
    num_samples: int = HfArg(default=5, help=(
        "N responses per prompt (official code; the paper leaves N open); at least 2"))
    temperature: float = HfArg(default=0.8, help="sampling temperature (section 4.1)")
    top_p: float = HfArg(default=0.95, help="nucleus sampling (official code)")
    max_new_tokens: int = HfArg(default=768, help="longest sampled response (official code)")
    max_length: int = HfArg(default=2048, help=(
        "longest prompt + response in tokens; longer prompts are skipped and counted (official code: 2048)"))
    sft_epochs: int = HfArg(default=3, help=(
        "SFT epochs for M0 -> M1 (section 4.1; official code: 5); 0 only with --method p-srlm"))
    sft_lr: float = HfArg(default=1e-6, help="SFT learning rate (section 4.1; official code: 5e-6)")
    epochs: int = HfArg(default=1, help="preference-training epochs per iteration (section 4.1)")
    lr: float = HfArg(default=1e-6, help="preference-training learning rate (section 4.1)")
    beta: float = HfArg(default=0.1, help="DPO beta (section 4.1)")
    warmup_ratio: float = HfArg(default=0.1, help=(
        "linear warmup share of the steps, then cosine decay (section 4.1; cosine from the official code)"))
    batch_size: int = HfArg(default=2, help="sequences (SFT) or pairs (DPO) per forward pass")
    grad_accum: int = HfArg(default=16, help=(
        "micro-batches per optimizer step: 2 x 16 = 32, the official code's batch"))
    max_grad_norm: float = HfArg(default=1.0, help="gradient clipping (official code)")
    score_batch_size: int = HfArg(default=16, help=(
        "sequences per forward pass when scoring log-probs (inference only)"))
    consistency_scope: str = HfArg(default="dataset", help=(
        "'dataset': one C for every pair (Algorithm 1 line 11); 'pair': each pair its own (tau+1)/2 (official "
        "'dyn')"))
    consistency_measure: str = HfArg(default="kendall", help=(
        "per-prompt agreement averaged into C: 'kendall' (Eq. 3.10), 'spearman' or 'toporder' "
        "(Table 4; chance-corrected, so chance agreement gives C = 0.5 as for the other two)"))
    evaluate: bool = HfArg(default=False, help=(
        "score M0..M_T+1 on the test sets of ARC-Easy/Challenge, OpenBookQA, SIQA, GSM8K: greedy, exact match (Table 1)"))
    eval_limit: int = HfArg(default=None, help="score only the first N questions of each task")
    method: str = HfArg(default="cream", help=(
        "'cream'; baselines: 'srlm' = DPO rewarding without the regularisation, C = 1 (Table 1); 'p-srlm' = "
        "rewards from the Table 6 judge prompt, C = 1 (Table 6)"))
    seed: int = HfArg(default=42, help="same seed, same run")
    dtype: str = HfArg(default="auto", help=(
        "'auto' = bfloat16 on a GPU (with stochastic-rounding AdamW), float32 on CPU; or 'bfloat16' / 'float32'"))


# Settings --demo uses where the command line leaves the default: a 2-core CPU finishes in about a minute.
DEMO = dict(iterations=2, num_prompts=12, num_samples=4, max_new_tokens=24, max_length=160, sft_epochs=3,
            sft_lr=3e-3, lr=3e-4, batch_size=4, grad_accum=2, score_batch_size=16, dtype="float32")


def fail(message):
    """Stop with a one-line error and a non-zero exit, never a traceback."""
    sys.exit(f"cream.py: error: {message}")


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
                except UnicodeEncodeError:  # JSON allows a lone \ud800; no tokenizer does
                    fail(f"{path}:{number}: {key} holds a lone surrogate, which no tokenizer "
                         f"encodes")
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
    """A cached file holds one row per expected row, in order, with the same keys: else stale."""
    if [[row.get(k) for k in keys] for row in rows] != [[row[k] for k in keys] for row in expected]:
        fail(f"{path} does not match this run's data or its earlier steps: delete it to recompute")


# --- Data: D_S (seed SFT) and D_U (unlabeled prompts), section 4.1 ---
# Table 1's five tasks: Hub id, config, revision, and the split scored (SIQA has no labelled test split)
TASKS = {"arc_easy": ("allenai/ai2_arc", "ARC-Easy", None, "test"),
         "arc_challenge": ("allenai/ai2_arc", "ARC-Challenge", None, "test"),
         "openbookqa": ("allenai/openbookqa", "main", None, "test"),
         "siqa": ("allenai/social_i_qa", None, "refs/convert/parquet", "validation"),
         "gsm8k": ("openai/gsm8k", "main", None, "test")}


def task_rows(task, rows):
    """Hub rows -> [{"prompt", "answer"}]: options relabelled A, B, C... (ARC also uses 1-4); GSM8K's number."""
    def multiple_choice(question, options, answer_index):
        text = question + "\n" + "\n".join(f"{'ABCDE'[i]}. {option}" for i, option in enumerate(options))
        return {"prompt": text, "answer": "ABCDE"[answer_index]}
    if task == "gsm8k":
        return [{"prompt": r["question"], "answer": r["answer"].split("####")[-1].strip().replace(",", "")} for r in rows]
    if task == "siqa":
        return [multiple_choice(f"{r['context']} {r['question']}", [r["answerA"], r["answerB"], r["answerC"]],
                                int(r["label"]) - 1) for r in rows]
    return [multiple_choice(r.get("question_stem") or r["question"], r["choices"]["text"],  # OpenBookQA, ARC
                            r["choices"]["label"].index(r["answerKey"])) for r in rows]


def load_hub_data(evaluate):
    """D_S: English OASST1 root prompts with their rank-0 reply (~3.4K); D_U: D_S prompts + five train splits;
    with `evaluate`, the five tasks' test rows."""
    from datasets import load_dataset

    def load(repo, split="train", name=None, revision=None):
        try:
            return load_dataset(repo, name=name, split=split, revision=revision)
        except Exception as e:
            fail(f"cannot load dataset {repo} ({type(e).__name__}); offline, pass --data_dir DIR with "
                 f"sft.jsonl and prompts.jsonl (see README)")

    oasst = load("OpenAssistant/oasst1")
    roots = {m["message_id"]: m["text"] for m in oasst
             if m["parent_id"] is None and m["role"] == "prompter" and m["lang"] == "en" and not m["deleted"]}
    sft = [{"prompt": roots[m["parent_id"]], "response": m["text"]} for m in oasst
           if m["role"] == "assistant" and m["rank"] == 0 and m["parent_id"] in roots and not m["deleted"]]
    pool = [{"prompt": row["prompt"]} for row in sft]
    tests = []
    for task, (repo, name, revision, test_split) in TASKS.items():
        pool += [{"prompt": row["prompt"]} for row in task_rows(task, load(repo, "train", name, revision))]
        if evaluate:
            tests += [dict(row, task=task) for row in task_rows(task, load(repo, test_split, name, revision))]
    return sft, pool, tests


def load_data(args):
    if args.data_dir is None:
        return load_hub_data(args.evaluate)
    data_dir = Path(args.data_dir)
    if not data_dir.is_dir():
        fail(f"--data_dir {data_dir} is not a folder")
    names = ("sft.jsonl", "prompts.jsonl") + (("eval.jsonl",) if args.evaluate else ())
    for name in names:
        if not (data_dir / name).is_file():
            fail(f"{data_dir / name} is missing")
    tests = read_jsonl(data_dir / "eval.jsonl", ["prompt", "answer", "task"]) if args.evaluate else []
    for number, row in enumerate(tests, 1):
        if not re.fullmatch(rf"[A-E]|{NUMBER}", row["answer"]):
            fail(f"{data_dir / 'eval.jsonl'}: row {number}: answer {row['answer']!r} is neither a letter A-E nor a number")
    return read_jsonl(data_dir / "sft.jsonl", ["prompt", "response"]), read_jsonl(data_dir / "prompts.jsonl", ["prompt"]), tests


# --- Models: one resident at a time (memory plan: reference log-probs are precomputed, never a second model) ---
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
    if tokenizer.pad_token_id is None:  # base Llama and Mistral have none; padding is masked out everywhere
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(path, args):
    try:
        model, info = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype(args),
                                                           output_loading_info=True)
    except Exception as e:
        fail(f"cannot load model {path!r} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")
    if info["missing_keys"]:  # transformers would only warn and start them from random values
        missing = sorted(info["missing_keys"])
        fail(f"model {str(path)!r} lacks {len(missing)} weights, {missing[0]} among them: "
             f"a damaged checkpoint")
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
    """True if a finished model folder is at path (resume), False if none; a damaged one fails."""
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


def encode(tokenizer, prompt, response=None):
    """Token ids of the chat-formatted prompt and, for SFT data, of the response and the chat format's end of turn
    (prompts.reply_format: Llama-3-Instruct's <|eot_id|>).

    The response is tokenized together with its prompt, as the model saw it while sampling: tokenizers that add a
    prefix space (SentencePiece) or merge across the boundary would give other ids for the response alone.
    """
    text = chat_prompt(tokenizer, prompt)
    prompt_ids = token_ids(tokenizer, text)
    if response is None:
        return prompt_ids
    lead, end = reply_format(tokenizer)
    joint_ids = token_ids(tokenizer, text + lead + response + end)
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
    """Gradient accumulation over `batches` (lists of micro-batches), clipping, AdamW at the
    learning rate args.<lr_flag>; returns mean metrics. Stops before anything is saved if a loss,
    gradient or weight turns non-finite."""
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
        (metrics["loss"] / min(args.grad_accum, len(batches) - group_start)).backward()
        if (i + 1) % args.grad_accum == 0 or i + 1 == len(batches):
            if not torch.isfinite(torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)):
                fail(f"{desc}: the gradients became non-finite at micro-batch {i}{stop}")
            adamw_step(params, state, learning_rate(i // args.grad_accum, total_steps, lr, args.warmup_ratio))
            model.zero_grad(set_to_none=True)
        for k, v in metrics.items():
            totals[k] = totals.get(k, 0.0) + v.item()
        count += 1
        bar.set_postfix(loss=f"{totals['loss'] / count:.4f}")
    if not all(torch.isfinite(p).all() for p in params):  # no loss sees the last step's update
        fail(f"{desc}: the weights became non-finite{stop}")
    model.eval()
    return {k: v / count for k, v in totals.items()}


def micro_batches(items, batch_size, seed):
    """Shuffle with a fixed seed and cut into micro-batches."""
    items = list(items)
    random.Random(seed).shuffle(items)
    return [items[i: i + batch_size] for i in range(0, len(items), batch_size)]


# --- Algorithm 1 line 2: SFT of M0 on D_S gives M1 ---
def sft_loss(model, batch):
    """Mean negative log-likelihood of the response tokens; prompt and padding are labelled -100."""
    device = model.device
    input_ids, attention_mask, labels = (t.to(device) for t in batch)
    response_mask = labels != -100
    loss = -sequence_logps(model, input_ids, attention_mask, response_mask).sum() / response_mask.sum()
    return {"loss": loss}


def run_sft(args, tokenizer, sft_rows, out):
    examples = []
    for row in sft_rows:
        prompt_ids, response_ids = encode(tokenizer, row["prompt"], row["response"])
        if len(prompt_ids) < args.max_length - 1:  # keep the prompt whole, cut the response to fit
            examples.append((prompt_ids, response_ids[: args.max_length - len(prompt_ids)]))
    if not examples:
        fail(f"every SFT prompt is longer than --max_length {args.max_length}")
    batches = [collate(b, tokenizer.pad_token_id) for epoch in range(args.sft_epochs)
               for b in micro_batches(examples, args.batch_size, args.seed + epoch)]
    model = load_model(args.model, args)
    torch.manual_seed(args.seed)  # stochastic rounding draws from it
    summary = train(model, batches, sft_loss, "sft_lr", args, "SFT M0 -> M1")
    summary.update(examples=len(examples), skipped_too_long=len(sft_rows) - len(examples))
    save_model(model, tokenizer, out / "M1", summary)
    del model


# --- Algorithm 1 line 5: sample N responses per prompt from M_t ---
def cache_config(model, num_requests, longest):
    """generate_batch sizes its paged KV cache from free GPU memory; on CPU (~15 GB) size it to the work instead."""
    if model.device.type != "cpu":
        return None
    return ContinuousBatchingConfig(num_blocks=num_requests * math.ceil(longest / 256), max_batch_tokens=512)


@torch.no_grad()
def sample_responses(model, tokenizer, prompts, args, greedy=False, num_samples=None):
    """N samples per prompt (or one greedy reply) with continuous batching (`generate_batch`: paged KV cache)."""
    if model.device.type == "cpu":  # it logs that psutil is missing on every CPU call
        logging.getLogger("ContinuousBatchingLogger").setLevel(logging.CRITICAL)
    model_eos = model.generation_config.eos_token_id  # Llama-3-Instruct: <|end_of_text|> and <|eot_id|>
    eos_ids = {tokenizer.eos_token_id} | set(model_eos if isinstance(model_eos, list) else [model_eos] if model_eos else [])
    num_samples = 1 if greedy else num_samples or args.num_samples
    sampling = dict(do_sample=False) if greedy else dict(do_sample=True, temperature=args.temperature, top_p=args.top_p,
                                                         top_k=0)
    config = GenerationConfig(**sampling, max_new_tokens=args.max_new_tokens, num_return_sequences=num_samples,
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
    model = load_model(out / f"M{t}", args)
    torch.manual_seed(args.seed + 1000 * t)
    grouped = sample_responses(model, tokenizer, [row["prompt"] for row in pool], args)
    del model
    return [{"id": row["id"], "prompt": row["prompt"], "samples": samples} for row, samples in zip(pool, grouped)]


# --- Algorithm 1 lines 6-9: log pi(y|x) of every sample under pi_t, pi_{t-1} and pi_0, one model at a time ---
def sample_sequences(tokenizer, samples_rows, max_length):
    """Every (prompt_ids, response_ids) of an iteration, in order: the sampled ids, cut to fit max_length."""
    sequences = []
    for row in samples_rows:
        prompt_ids = encode(tokenizer, row["prompt"])
        sequences += [(prompt_ids, s["token_ids"][: max_length - len(prompt_ids)]) for s in row["samples"]]
    return sequences


@torch.no_grad()
def score_logps(model_path, sequences, tokenizer, args, desc):
    """[(prompt_ids, response_ids)] -> list of summed response log-probs under the model at model_path."""
    model = load_model(model_path, args).eval()
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i][0]) + len(sequences[i][1]))
    logps = [0.0] * len(sequences)
    for start in tqdm(range(0, len(order), args.score_batch_size), desc=desc):
        chunk = order[start: start + args.score_batch_size]  # similar lengths together: little padding
        input_ids, attention_mask, labels = collate([sequences[i] for i in chunk], tokenizer.pad_token_id)
        values = sequence_logps(model, input_ids.to(model.device), attention_mask.to(model.device),
                                (labels != -100).to(model.device))
        for i, value in zip(chunk, values.tolist()):
            logps[i] = value
    del model
    return logps


# --- Eq. 3.10 and line 11: ranking consistency between pi_t and pi_{t-1}; TopOrder and Spearman (Table 2) ---
def kendall_tau(x, y):
    """Kendall tau-a of two score vectors [N], [N] -> float (Eq. 3.10); a pair tied in either counts zero."""
    x, y = torch.as_tensor(x, dtype=torch.float64), torch.as_tensor(y, dtype=torch.float64)
    n = x.numel()
    concordance = torch.sign(x[:, None] - x[None, :]) * torch.sign(y[:, None] - y[None, :])  # [N, N]
    return (concordance.triu(1).sum() / (n * (n - 1) / 2)).item()


def average_ranks(x):
    """[N] -> [N] ranks from 1, ties sharing their mean rank."""
    less = (x[None, :] < x[:, None]).sum(1)
    equal = (x[None, :] == x[:, None]).sum(1)
    return less.double() + (equal + 1) / 2


def spearman_rho(x, y):
    """Spearman correlation of two score vectors [N], [N] -> float (Pearson on average ranks; 0 if one is constant)."""
    rx = average_ranks(torch.as_tensor(x, dtype=torch.float64))
    ry = average_ranks(torch.as_tensor(y, dtype=torch.float64))
    rx, ry = rx - rx.mean(), ry - ry.mean()
    norm = (rx.square().sum() * ry.square().sum()).sqrt()
    return (rx * ry).sum().div(norm).item() if norm > 0 else 0.0


def top_order(x, y):
    """TopOrder (section 4.3.1) of [N], [N] -> 1.0 iff both pick the same best AND the same worst response."""
    x, y = torch.as_tensor(x), torch.as_tensor(y)
    return float(x.argmax() == y.argmax() and x.argmin() == y.argmin())


def consistency_rate(taus):
    """Algorithm 1 line 11: C = mean over prompts of (tau_j + 1) / 2."""
    return sum((tau + 1) / 2 for tau in taus) / len(taus)


def top_order_consistency(top_order_rate, n):
    """TopOrder rate T of N responses -> C = (1 + kappa) / 2, kappa = (T - p0) / (1 - p0).

    p0 = 1 / (N (N - 1)) is the chance that unrelated rankings share the best and the worst
    response: chance agreement gives C = 0.5, full agreement C = 1, as line 11's (tau + 1) / 2 does.
    """
    p0 = 1 / (n * (n - 1))
    return (1 + (top_order_rate - p0) / (1 - p0)) / 2


def measured_consistency(reward_rows, measure):
    """Line 11 with Table 4's measures: mean (tau+1)/2, mean (rho+1)/2 or corrected TopOrder."""
    if measure == "toporder":
        values = [top_order_consistency(row["top_order"], len(row["r"])) for row in reward_rows]
        return sum(values) / len(values)
    return consistency_rate([row["tau" if measure == "kendall" else "spearman"] for row in reward_rows])


def reversal_warning(t, pairs, scope):
    """Pairs with C < 0.5 -> a warning line for iteration t, or None (line 14 weights L_RDPO more).

    Theorem 3.3's C = (1 + lambda) / (1 + 2 lambda) is never below 0.5; line 11's C can be.
    """
    below = [pair["consistency"] for pair in pairs if pair["consistency"] < 0.5]
    if not below:
        return None
    what = f"C = {below[0]:.4f} < 0.5" if scope == "dataset" else (
        f"{len(below)} of {len(pairs)} pairs have their own C < 0.5")
    return (f"cream.py: warning: iteration {t}: {what}, so line 14 weights the reversed pair more: "
            f"training moves toward the responses M{t} ranks worse (README: 'C below 0.5')")


def rewards_and_consistency(samples_rows, logps_t, logps_prev, logps_0, t):
    """Lines 6-10 per prompt: r = log pi_t - log pi_0; r' = log pi_{t-1} - log pi_0, or log pi_0 itself at t = 1."""
    rows, n = [], len(samples_rows[0]["samples"])
    for j, row in enumerate(samples_rows):
        span = slice(j * n, (j + 1) * n)
        r = [a - b for a, b in zip(logps_t[span], logps_0[span])]
        r_prev = logps_0[span] if t == 1 else [a - b for a, b in zip(logps_prev[span], logps_0[span])]
        rows.append({"id": row["id"], "r": r, "r_prev": r_prev, "logps_t": logps_t[span],
                     "tau": kendall_tau(r, r_prev), "spearman": spearman_rho(r, r_prev), "top_order": top_order(r, r_prev)})
    return rows


# --- Eq. 3.11-3.12, lines 12-13: best = argmax r, worst = argmin r (the text's "argmin" for the best is a typo) ---
def build_pairs(samples_rows, reward_rows, consistency, scope):
    """One (chosen, rejected) pair per prompt, matched by prompt id; prompts whose rewards all tie are skipped."""
    rewards_by_id = {row["id"]: row for row in reward_rows}
    pairs = []
    for row in samples_rows:
        rewards = rewards_by_id[row["id"]]
        r = rewards["r"]
        usable = [i for i, value in enumerate(r) if value is not None]  # P-SRLM: a judgement without a score
        if len(usable) < 2:
            continue
        best, worst = max(usable, key=r.__getitem__), min(usable, key=r.__getitem__)  # first of equals, as argmax
        if r[best] == r[worst]:
            continue
        chosen, rejected = row["samples"][best], row["samples"][worst]
        pairs.append({"id": row["id"], "prompt": row["prompt"], "chosen": chosen["response"],
                      "rejected": rejected["response"], "chosen_ids": chosen["token_ids"],
                      "rejected_ids": rejected["token_ids"], "ref_chosen_logp": rewards["logps_t"][best],
                      "ref_rejected_logp": rewards["logps_t"][worst],
                      "consistency": consistency if scope == "dataset" else (rewards["tau"] + 1) / 2})
    return pairs


# --- Baseline P-SRLM (Table 6): prompt rewarding, M_t scores each response with the Self-Rewarding judge prompt ---
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


def judge_samples(model_path, tokenizer, samples_rows, args, seed):
    """One sampled judgement per response from M_t (SCIR Table 6 prompt, as Self-Rewarding) -> per-prompt scores."""
    model = load_model(model_path, args).eval()
    torch.manual_seed(seed)  # a resumed run judges as an uninterrupted one
    prompts = [fill_pointwise(row["prompt"], s["response"]) for row in samples_rows for s in row["samples"]]
    judgements = [reply for (reply,) in sample_responses(model, tokenizer, prompts, args, num_samples=1)]
    del model
    rows, n = [], len(samples_rows[0]["samples"])
    for j, row in enumerate(samples_rows):
        texts = [reply["response"] for reply in judgements[j * n: (j + 1) * n]]
        rows.append({"id": row["id"], "scores": [parse_score(text) for text in texts], "judgements": texts})
    return rows


# --- Eq. 3.7, line 14: C * L_DPO(D_DPO) + (1 - C) * L_DPO(D_RDPO), reference pi_t ---
def soft_dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta, consistency):
    """Per-pair consistency-regularized DPO loss, [B] x4 -> [B] (Eq. 3.7); consistency is a float or [B].

    The reversed pair's DPO term is -log sigmoid(-h): by Theorem 3.3 this is L_DPO + lambda * L_Reg up to a factor.
    """
    h = beta * ((policy_chosen_logps - ref_chosen_logps) - (policy_rejected_logps - ref_rejected_logps))
    return -consistency * F.logsigmoid(h) - (1 - consistency) * F.logsigmoid(-h)


def dpo_batch_loss(args, tokenizer):
    def loss_fn(model, batch):
        """Chosen and rejected of a micro-batch stacked into one forward pass (2B sequences)."""
        sequences = [p["chosen_sequence"] for p in batch] + [p["rejected_sequence"] for p in batch]
        input_ids, attention_mask, labels = (t.to(model.device) for t in collate(sequences, tokenizer.pad_token_id))
        logps = sequence_logps(model, input_ids, attention_mask, labels != -100)
        chosen, rejected = logps.split(len(batch))
        ref_chosen = torch.tensor([p["ref_chosen_logp"] for p in batch], device=model.device)
        ref_rejected = torch.tensor([p["ref_rejected_logp"] for p in batch], device=model.device)
        consistency = torch.tensor([p["consistency"] for p in batch], device=model.device)
        losses = soft_dpo_loss(chosen, rejected, ref_chosen, ref_rejected, args.beta, consistency)
        margin = args.beta * ((chosen - ref_chosen) - (rejected - ref_rejected)).detach()
        return {"loss": losses.mean(), "reward_accuracy": (margin > 0).float().mean(), "reward_margin": margin.mean()}
    return loss_fn


def run_preference_training(args, tokenizer, pairs, t, out):
    examples = []
    for pair in pairs:
        prompt_ids = encode(tokenizer, pair["prompt"])
        room = args.max_length - len(prompt_ids)  # the same cut as when the reference log-probs were scored
        examples.append(dict(pair, chosen_sequence=(prompt_ids, pair["chosen_ids"][:room]),
                             rejected_sequence=(prompt_ids, pair["rejected_ids"][:room])))
    batches = [b for epoch in range(args.epochs) for b in micro_batches(examples, args.batch_size, args.seed + t + epoch)]
    model = load_model(out / f"M{t}", args)
    torch.manual_seed(args.seed + 1000 * t + 1)
    summary = train(model, batches, dpo_batch_loss(args, tokenizer), "lr", args,
                    f"CREAM M{t} -> M{t + 1}")
    save_model(model, tokenizer, out / f"M{t + 1}", summary)
    del model


# --- Evaluation (Table 1): greedy, zero-shot, exact match on the five tasks' test sets ---
# Only test questions get this line; the prompt pool D_U keeps the bare questions, as the paper builds it
EVAL_SUFFIX = {"choice": "\n\nEnd your reply with 'Answer: X', where X is the letter of the correct option.",
               "number": "\n\nSolve it step by step and end your reply with 'Answer: N', where N is the final number."}
NUMBER = r"-?(?:\d[\d,]*(?:\.\d+)?|\.\d+)"  # '.5' too
# 'Answer:', 'Answer =', 'Answer -', 'answer is', '**Answer:**'; not 'Answer A would be wrong'
STATED = r"(?i:answer)\**(?:\s*[:=-]|\s+(?i:is)\b)[\s:*]*"
BOXED = r"\$?\\boxed\{"
# '7 + 3 = ' before the number: the answer is the number after the last '='
EXPRESSION = r"(?:[-+*/×÷()\d,$](?:[-+*/×÷()\d,$ \t]|\.(?=\d))*=[ \t]*)*"


def answer_kind(answer):
    return "choice" if re.fullmatch(r"[A-E]", answer) else "number"


def eval_prompt(row):
    """A test question as the model sees it: the question, then how to state the answer."""
    return row["prompt"] + EVAL_SUFFIX[answer_kind(row["answer"])]


def check_eval_rows(tokenizer, tests, args):
    """Before SFT: every question scored (each task's first --eval_limit) leaves room to reply."""
    seen = {}
    for number, row in enumerate(tests, 1):
        seen[row["task"]] = seen.get(row["task"], 0) + 1
        if args.eval_limit and seen[row["task"]] > args.eval_limit:
            continue  # not scored in this run
        if len(encode(tokenizer, eval_prompt(row))) > args.max_length - args.max_new_tokens:
            fail(f"eval row {number} (task {row['task']}): the question is longer than "
                 f"--max_length - --max_new_tokens")


def extract_answer(reply, kind):
    """The answer a reply gives: a letter A-E or a number without commas; None if it gives none.

    Letters from a statement ('Answer: X', 'answer is (X)', '**Answer:** X', 'Answer: [X]',
    'Answer: \\boxed{X}'), then '\\boxed{X}', then '(X)', then a reply that is only 'X' or 'X.'.
    Only upper case: the English word 'a' is never an answer (README: defects). A statement needs a
    separator after 'answer' (':', '=', '-', 'is'): 'Answer A would be wrong' is a mention.
    Numbers from '#### N', then 'Answer: N' ('**Answer:** N', 'Answer = N', 'Answer - N',
    'Answer: \\boxed{N}', and 'Answer: 7 + 3 = N' gives N), then '\\boxed{N}', then the last number.
    """
    if kind == "choice":
        stated = re.findall(STATED + rf"(?:(?i:option)\s*)?[\[(]?\**(?:{BOXED})?([A-E])\b"
                            r"(?![.]?[a-z])(?:[*\])}]*\s+(?:or|and)\s+[\[(]?\**([A-E])\b)?", reply)
        if stated:  # 'Answer: **B**', 'the answer is option C'; 'Answer: B or C' hedges, and answers nothing
            first, alternative = stated[-1]
            return first if not alternative or alternative == first else None
        patterns = [r"\\boxed\{([A-E])\}", r"\(([A-E])\)", r"^\s*\**([A-E])\**[.)]?\s*$"]
    else:  # 'Answer - 18': a dash; 'Answer: -18': a sign
        patterns = [rf"####\s*\$?({NUMBER})",
                    rf"(?i:answer)(?:\s*(?i:is))?[\s:*=]*(?:-\s+)?\$?\**(?:{BOXED})?{EXPRESSION}"
                    rf"\$?({NUMBER})",
                    rf"\\boxed\{{\s*\$?({NUMBER})\s*\}}",
                    rf"({NUMBER})"]
    for pattern in patterns:
        found = re.findall(pattern, reply)
        if found:
            return found[-1].replace(",", "") if kind == "number" else found[-1]
    return None


def is_correct(extracted, answer):
    if extracted is None:
        return False
    if answer_kind(answer) == "choice":
        return extracted == answer
    return math.isclose(float(extracted), float(answer.replace(",", "")), abs_tol=1e-6)


def run_evaluation(model_path, tokenizer, tests, args):
    """One greedy reply per test question -> rows with the extracted answer and whether it matches."""
    model = load_model(model_path, args).eval()
    prompts = [eval_prompt(row) for row in tests]
    replies = sample_responses(model, tokenizer, prompts, args, greedy=True)
    del model
    rows = []
    for row, (reply,) in zip(tests, replies):
        extracted = extract_answer(reply["response"], answer_kind(row["answer"]))
        rows.append(dict(row, reply=reply["response"], extracted=extracted, correct=is_correct(extracted, row["answer"])))
    return rows


# --- Demo: a tiny random Llama and a byte-level BPE tokenizer built here, so the whole loop runs offline ---
DEMO_DATA = [
    ("Name a primary color.", "Red is a primary color."),
    ("What is 2 + 3?", "2 + 3 = 5."),
    ("Give a synonym for happy.", "Glad is a synonym for happy."),
    ("What do bees make?", "Bees make honey."),
    ("Translate 'hola' to English.", "'Hola' means hello."),
    ("What is the capital of France?", "The capital of France is Paris."),
    ("How many legs does a spider have?", "A spider has eight legs."),
    ("What is the opposite of cold?", "The opposite of cold is hot."),
    ("Which planet is called the red planet?", "Mars is called the red planet."),
    ("What gas do plants take in?", "Plants take in carbon dioxide."),
    ("What is 10 minus 4?", "10 minus 4 is 6."),
    ("Name a mammal that can fly.", "The bat is a mammal that can fly."),
    ("What freezes at zero degrees Celsius?", "Water freezes at zero degrees Celsius."),
    ("How many days are in a week?", "A week has seven days."),
    ("What color is the sky on a clear day?", "The sky is blue on a clear day."),
    ("Who wrote Hamlet?", "William Shakespeare wrote Hamlet."),
]


def build_demo(out):
    """Write a tiny Llama (random weights) with its tokenizer and the demo data; return (model_dir, data_dir)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    model_dir, data_dir = out / "demo-M0", out / "demo-data"
    if not model_dir.exists():
        bpe = Tokenizer(models.BPE())
        bpe.pre_tokenizer, bpe.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
        bpe.train_from_iterator([p + " " + r for p, r in DEMO_DATA] * 4, trainers.BpeTrainer(
            vocab_size=400, special_tokens=["<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
        tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>")
        config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                             bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
        torch.manual_seed(0)
        save_model(LlamaForCausalLM(config), tokenizer, model_dir, {"demo": True})
    data_dir.mkdir(parents=True, exist_ok=True)
    write_jsonl(data_dir / "sft.jsonl", [{"prompt": p, "response": r} for p, r in DEMO_DATA])
    write_jsonl(data_dir / "prompts.jsonl", [{"prompt": p} for p, _ in DEMO_DATA for _ in range(2)])
    write_jsonl(data_dir / "eval.jsonl", [  # for --evaluate: one question of a choice task, one of GSM8K
        {"task": "arc_easy", "prompt": "Which one is a color?\nA. red\nB. dog\nC. seven", "answer": "A"},
        {"task": "gsm8k", "prompt": "What is 10 minus 4?", "answer": "6"}])
    return str(model_dir), str(data_dir)


# --- The loop: M0 -SFT-> M1 -CREAM-> M2 -CREAM-> M3 ... ---
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
    if args.demo:  # a flag written out wins, even when it repeats the default
        given = given_flags(argv)
        for name, value in DEMO.items():
            if name not in given:
                setattr(args, name, value)
    check_ranges(args)
    if args.max_length <= args.max_new_tokens:
        fail(f"--max_length {args.max_length} leaves no room for a prompt with --max_new_tokens {args.max_new_tokens}")
    if args.consistency_scope not in ("dataset", "pair"):
        fail(f"--consistency_scope must be 'dataset' or 'pair', got {args.consistency_scope!r}")
    if args.consistency_measure not in ("kendall", "spearman", "toporder"):
        fail(f"--consistency_measure must be kendall, spearman or toporder, got {args.consistency_measure!r}")
    if args.consistency_scope == "pair" and args.consistency_measure != "kendall":
        fail("--consistency_scope pair takes each pair's (tau+1)/2: use it with --consistency_measure kendall")
    if args.method not in ("cream", "srlm", "p-srlm"):
        fail(f"--method must be cream, srlm or p-srlm, got {args.method!r}")
    if args.method != "cream" and (args.consistency_measure, args.consistency_scope) != ("kendall", "dataset"):
        fail(f"--method {args.method} trains with C = 1: --consistency_measure and --consistency_scope are CREAM's")
    if args.dtype not in ("auto", "bfloat16", "float32"):
        fail(f"--dtype must be auto, bfloat16 or float32, got {args.dtype!r}")
    if args.sft_epochs == 0 and args.method != "p-srlm":
        fail(f"--sft_epochs 0 with --method {args.method}: M1 would be M0, so "
             f"r = log pi_1 - log pi_0 = 0 for every sample (Eq. 3.9), every prompt ties and "
             f"iteration 1 has no pair; use --sft_epochs >= 1")
    if args.output_dir is not None and Path(args.output_dir).exists() and not Path(args.output_dir).is_dir():
        fail(f"--output_dir {args.output_dir} is a file, not a folder")
    if args.output_dir is None:
        args.output_dir = "runs/cream-demo" if args.demo else f"runs/cream-{Path(args.model).name}"
    return args


# Allowed ranges, checked before anything runs
AT_LEAST = {"iterations": 1, "num_prompts": 1, "num_samples": 2, "max_new_tokens": 1,
            "max_length": 2, "batch_size": 1, "grad_accum": 1, "epochs": 1, "score_batch_size": 1,
            "sft_epochs": 0, "seed": 0, "sft_lr": 0, "lr": 0}
ABOVE_ZERO = ("temperature", "beta", "max_grad_norm")


def check_ranges(args):
    """Every number finite and within its range, before anything runs; an error names the flag."""
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
    if not 0 <= args.warmup_ratio < 1:
        fail(f"--warmup_ratio must be in [0, 1), got {args.warmup_ratio}")
    if args.eval_limit is not None and args.eval_limit < 1:
        fail(f"--eval_limit must be at least 1, got {args.eval_limit}")


AFTER_THE_FACT = ("output_dir", "evaluate", "eval_limit")  # may change between reruns: they touch no training file


def check_same_settings(out, args, data_sha256):
    """Resuming is only sound with the settings and data that made the files: refuse a folder made
    with other ones.

    A folder that holds no result yet (an earlier run stopped at its checks) takes the new settings.
    """
    path = out / "args.json"
    current = {k: v for k, v in asdict(args).items() if k not in AFTER_THE_FACT}
    current["data_sha256"] = data_sha256
    results = [f for f in out.iterdir()
               if re.fullmatch(r"(M|iter)\d+|metrics\.jsonl|table\.md|evaluation\.jsonl|eval", f.name)]
    if path.exists() and results:
        try:
            saved = json.loads(path.read_text())
        except ValueError:
            saved = None
        if not isinstance(saved, dict):
            fail(f"{path} is damaged: delete it, and rerun the command that made the run to "
                 f"resume it")
        defaults = {f.name: f.default for f in fields(Args)} | {"data_sha256": data_sha256}
        saved = defaults | saved  # a flag added after the run: its default
        changed = [f"--{k} {saved.get(k)!r} (now {v!r})" if k != "data_sha256"
                   else "the data files changed" for k, v in current.items() if saved.get(k) != v]
        if changed:
            fail(f"{out} holds a run made with other settings or data: {', '.join(changed)}; "
                 f"rerun with those or use a new --output_dir")
    record = asdict(args) | {"data_sha256": data_sha256}
    Path(f"{path}.tmp").write_text(json.dumps(record, indent=1))
    os.replace(f"{path}.tmp", path)


METHOD_NAMES = {"cream": "CREAM", "srlm": "SRLM", "p-srlm": "P-SRLM"}
TASK_NAMES = {"arc_easy": "ARC-Easy", "arc_challenge": "ARC-Challenge", "openbookqa": "OpenBookQA", "siqa": "SIQA",
              "gsm8k": "GSM8K"}


def mean_std(values):
    """(mean, population standard deviation): Table 2 reports each measure as mean +- std over prompts."""
    mean = sum(values) / len(values)
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))


def final_table(args, metrics, evaluation):
    """The run laid out like the paper: one row per model M_k with Table 1's exact match per task (arrows against the
    previous iteration, from M2 on) and Table 2's rewarding consistency of M_k against M_{k-1} -> markdown text."""
    tasks = list(dict.fromkeys(row["task"] for row in evaluation))
    accuracy = {(row["model"], row["task"]): row["accuracy"] for row in evaluation}
    header = ["Method", "Reward", "Iteration", *(TASK_NAMES.get(task, task) for task in tasks), "Consistency C",
              "C used", "Kendall tau", "Spearman", "TopOrder", "Pairs", "Sample tokens"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for k in range(args.iterations + 2):
        row = next((m for m in metrics if m["iteration"] == k), None)  # M_k rewards its samples in iteration k
        names = {0: ("Initial", "-"), 1: ("SFT", "-"), 2: (METHOD_NAMES[args.method], "Self")}
        cells = [*names.get(k, ("", "")), f"M{k}"]
        for task in tasks:
            now, before = accuracy[f"M{k}", task], accuracy[f"M{k - 1}", task] if k else None
            arrow = "" if k < 2 else " ↑" if now > before else " ↓" if now < before else " ="
            cells.append(f"{100 * now:.2f}{arrow}")
        if row is None:
            cells += ["-"] * 7
        else:
            cells.append(f"{(row['kendall'] + 1) / 2:.2f} ± {row['kendall_std'] / 2:.2f}")  # C = mean (tau + 1) / 2
            per_pair = args.method == "cream" and args.consistency_scope == "pair"  # each pair's own (tau + 1) / 2
            cells.append("per pair" if per_pair else f"{row['consistency']:.2f}")  # 1 for the baselines
            cells += [f"{row[key]:.2f} ± {row[key + '_std']:.2f}" for key in ("kendall", "spearman", "top_order")]
            cells += [str(row["pairs"]), f"{row['response_length']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("\nC, tau, Spearman, TopOrder in row M_k: M_k's rankings of its samples against M_{k-1}'s (Table 2's "
                 "'M_k vs M_{k-1}'); in row M1 against log pi_0 itself (Algorithm 1, t = 1)."
                 + (" Exact match in percent." if tasks else ""))
    return "\n".join(lines) + "\n"


def evaluate_models(args, tokenizer, tests, out):
    """Table 1: exact match of M0 (the initial model), M1 (SFT) and every later M_k on each task."""
    tasks = list(dict.fromkeys(row["task"] for row in tests))
    if args.eval_limit:
        tests = [row for task in tasks for row in [r for r in tests if r["task"] == task][: args.eval_limit]]
    (out / "eval").mkdir(exist_ok=True)
    table = []
    for k in range(args.iterations + 2):
        model_path = args.model if k == 0 else out / f"M{k}"
        limit = f"-first{args.eval_limit}" if args.eval_limit else ""
        path = out / "eval" / f"M{k}{limit}.jsonl"
        rows = cached_jsonl(path, lambda: run_evaluation(model_path, tokenizer, tests, args))
        check_ids(path, rows, tests, keys=("task", "prompt", "answer"))  # written as dict(row, ...)
        for task in tasks:
            scored = [row["correct"] for row in rows if row["task"] == task]
            table.append({"model": f"M{k}", "task": task, "accuracy": sum(scored) / len(scored), "n": len(scored)})
    write_jsonl(out / "evaluation.jsonl", table)
    return table


def main(argv=None):
    """Parse, lock the output folder, run; Ctrl-C or a full disk ends in one line; rerun resumes."""
    import fcntl  # Unix only, like the lock it takes

    args = parse_args(argv)
    out = Path(args.output_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        with open(out / ".lock", "a") as lock:  # "a": an existing lock file is not even touched
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # freed however the process ends
            except BlockingIOError:
                fail(f"another run is using {out}: wait for it to end, or use another --output_dir")
            run(args, out)
    except KeyboardInterrupt:
        fail("interrupted; rerun the same command to resume where it stopped")
    except OSError as e:
        fail(f"{e.filename or out}: {e.strerror or e}; rerun the same command to resume once that "
             f"is fixed")


def iteration_pools(tokenizer, prompt_rows, per_iteration, args):
    """Each iteration's fresh prompts less those too long to sample -> [(pool, number left out)]."""
    pools = []
    for t in range(1, args.iterations + 1):
        pool, too_long = [], 0
        for j, row in enumerate(prompt_rows[(t - 1) * per_iteration: t * per_iteration]):
            if len(encode(tokenizer, row["prompt"])) > args.max_length - args.max_new_tokens:
                too_long += 1
            else:
                pool.append({"id": f"{t}-{j}", "prompt": row["prompt"]})
        if not pool:
            fail(f"every prompt of iteration {t} is longer than --max_length - --max_new_tokens")
        pools.append((pool, too_long))
    return pools


def run(args, out):
    """Checks, SFT, Algorithm 1's iterations, the evaluation and the final table, in out."""
    if args.demo:
        args.model, args.data_dir = build_demo(out)
    sft_rows, prompt_rows, tests = load_data(args)  # validated before any model is loaded
    # not the test rows: they change no training file, and check_ids checks their cached replies
    data_sha256 = hashlib.sha256(json.dumps([sft_rows, prompt_rows]).encode()).hexdigest()
    random.Random(args.seed).shuffle(prompt_rows)
    if len(prompt_rows) < args.iterations * args.num_prompts:
        print(f"note: {len(prompt_rows)} prompts for {args.iterations} x {args.num_prompts}: "
              f"each iteration gets {len(prompt_rows) // args.iterations}")
    per_iteration = min(args.num_prompts, len(prompt_rows) // args.iterations)
    if per_iteration == 0:
        fail(f"{len(prompt_rows)} prompts cannot be shared by {args.iterations} iterations")
    tokenizer = load_tokenizer(args.model)
    check_vocabulary(args.model, tokenizer, "--model")
    pools = iteration_pools(tokenizer, prompt_rows, per_iteration, args)
    check_eval_rows(tokenizer, tests, args)
    check_same_settings(out, args, data_sha256)  # from here on files are written

    if not model_ready(out / "M1"):  # Algorithm 1 line 2
        if args.sft_epochs == 0:  # p-srlm only (parse_args): M1 is M0 as given
            save_model(load_model(args.model, args), tokenizer, out / "M1", {"sft": "skipped"})
        else:
            run_sft(args, tokenizer, sft_rows, out)

    metrics = []
    for t, (pool, too_long) in enumerate(pools, 1):  # Algorithm 1 line 4
        it = out / f"iter{t}"
        it.mkdir(exist_ok=True)
        samples = cached_jsonl(it / "samples.jsonl", lambda: run_sampling(args, tokenizer, pool, t, out))  # line 5
        check_ids(it / "samples.jsonl", samples, pool, keys=("id", "prompt"))
        sequences = sample_sequences(tokenizer, samples, args.max_length)
        models = {"t": out / f"M{t}", "0": args.model} | ({"prev": out / f"M{t - 1}"} if t > 1 else {})
        logps = {}
        for name, path in models.items():  # one model resident at a time
            rows = cached_jsonl(it / f"logps_{name}.jsonl", lambda: [
                {"logp": v} for v in score_logps(path, sequences, tokenizer, args, f"log-probs under {path}")])
            logps[name] = [row["logp"] for row in rows]
            if len(rows) != len(sequences):
                fail(f"{it / f'logps_{name}.jsonl'} does not match {it / 'samples.jsonl'}: delete {it} to recompute")
        reward_rows = cached_jsonl(it / "rewards.jsonl", lambda: rewards_and_consistency(  # lines 6-10
            samples, logps["t"], logps.get("prev"), logps["0"], t))
        check_ids(it / "rewards.jsonl", reward_rows, samples)
        pair_rewards, unusable = reward_rows, 0
        if args.method == "p-srlm":  # baseline: the judge's scores rank the responses instead of Eq. 3.9
            judged = cached_jsonl(it / "judgements.jsonl", lambda: judge_samples(
                out / f"M{t}", tokenizer, samples, args, args.seed + 1000 * t + 2))
            check_ids(it / "judgements.jsonl", judged, samples)
            pair_rewards = [dict(row, r=j["scores"]) for row, j in zip(reward_rows, judged)]
            unusable = sum(score is None for j in judged for score in j["scores"])
        if args.method in ("srlm", "p-srlm"):  # the baselines trust every self-label: plain DPO
            consistency, scope = 1.0, "dataset"
        else:  # line 11
            consistency, scope = measured_consistency(reward_rows, args.consistency_measure), args.consistency_scope
        expected = build_pairs(samples, pair_rewards, consistency, scope)  # lines 12-13
        pairs = cached_jsonl(it / "pairs.jsonl", lambda: expected)  # a cached one must be the same
        check_ids(it / "pairs.jsonl", pairs, expected, keys=("id", "chosen", "rejected"))
        if not pairs:
            fail(f"iteration {t}: no prompt has two responses with different rewards, no pair to train on"
                 + (f" ({unusable} judgements gave no score)" if unusable else ""))
        warning = reversal_warning(t, pairs, scope)
        if warning:
            print(warning, file=sys.stderr)
        if not model_ready(out / f"M{t + 1}"):  # line 14
            run_preference_training(args, tokenizer, pairs, t, out)
        summary = json.loads((out / f"M{t + 1}" / "training_summary.json").read_text())
        (kendall, kendall_std), (spearman, spearman_std), (top_order, top_order_std) = (
            mean_std([row[key] for row in reward_rows]) for key in ("tau", "spearman", "top_order"))
        metrics.append({"iteration": t, "consistency": consistency, "kendall": kendall, "kendall_std": kendall_std,
                        "spearman": spearman, "spearman_std": spearman_std, "top_order": top_order,
                        "top_order_std": top_order_std, "pairs": len(pairs),
                        "skipped": len(samples) - len(pairs), "too_long": too_long, "unusable_judgements": unusable,
                        "loss": summary["loss"],
                        "reward_accuracy": summary["reward_accuracy"], "reward_margin": summary["reward_margin"],
                        "response_length": sum(len(s["token_ids"]) for row in samples for s in row["samples"])
                        / sum(len(row["samples"]) for row in samples)})
        write_jsonl(out / "metrics.jsonl", metrics)
    table = final_table(args, metrics, evaluate_models(args, tokenizer, tests, out) if args.evaluate else [])
    (out / "table.md.tmp").write_text(table)
    os.replace(out / "table.md.tmp", out / "table.md")
    print("\n" + table)
    print(f"models, samples, rewards, pairs, metrics.jsonl and table.md are in {out}")


if __name__ == "__main__":
    main()
