"""A toy world with a known answer: watch both self-rewarding loops learn, or fail, on 2 CPU cores.

    python tests/tools/toy_world.py          # base, 7 methods x 5 seeds, the tables (~18 min)
    python tests/tools/toy_world.py --quick  # 1 seed, 60 prompts an iteration (2-4.5 min)
    python tests/tools/toy_world.py --seeds 1 2 3 --out /tmp/toyworld --jobs 2

The world: single-digit addition (a + b, a and b in 1..9), asked in 4 phrasings and answered in 6
reply styles; a reply is right when its last number is a + b. 27 of the 81 problems are held out
for the evaluation. A tiny Llama is pretrained from scratch on a "web" of such exchanges in which
a carry is dropped 60% of the time (7 + 5 = 2), and of judgements in the papers' judge formats
(SCIR Table 5 pairwise, Table 6 pointwise) that are right 85% of the time. Then cream.py (cream,
srlm, and an oracle) and scir.py (scir, srlm, irm, and an oracle) run on it through their command
line, unchanged, 3 iterations each, one run per seed. The oracle runs the script's own main() with
the one ranking function replaced by the ground truth (1 for a right sample, 0 for a wrong one),
so it samples, scores the reference and trains with the script's own code. From the runs'
artefacts this script computes, per iteration: greedy and sample accuracy, the accuracy of the
self-labels (of the trained pairs whose two sides differ in correctness, the share where chosen is
the right one), CREAM's C, and SCIR's IRM-GRM agreement and the accuracy of the agreed pairs; mean
± std over seeds, printed as markdown and written to <out>/results.md and results.json (and
accuracy.png if matplotlib is installed). Every run resumes, so the same command continues.
"""

import argparse
import importlib
import json
import math
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # prompts.py, and the scripts for the oracle
    sys.path.insert(0, str(ROOT))

def log(*parts):
    print(*parts, flush=True)


# --- The task: a + b, asked in 4 phrasings, answered in 6 styles; the truth is the last number ---
PHRASINGS = ("What is {a} + {b}?", "Add {a} and {b}.", "Compute {a} plus {b}.",
             "How much is {a} + {b}?")
STYLES = ("{a} + {b} = {s}.", "The sum is {s}.", "{s}", "It is {s}.", "{a} plus {b} makes {s}.",
          "Result: {s}.")
# what --evaluate appends to a test question (EVAL_SUFFIX["number"] in both scripts); the world's
# prompts end with it too, so a test question reads like the prompts the loops sample on
EVAL_SUFFIX = ("\n\nSolve it step by step and end your reply with 'Answer: N', where N is the "
               "final number.")
PROBLEMS = [(a, b) for a in range(1, 10) for b in range(1, 10)]
NUMBER = re.compile(r"-?\d+")


def held_out_problems():
    """27 of the 81 problems, never trained on: 15 of the 45 with a carry, 12 of the 36 without."""
    rng = random.Random(13)
    carries = [p for p in PROBLEMS if sum(p) >= 10]
    others = [p for p in PROBLEMS if sum(p) < 10]
    return set(rng.sample(carries, 15) + rng.sample(others, 12))


TEST = sorted(held_out_problems())
TRAIN = [p for p in PROBLEMS if p not in TEST]


def question(a, b, phrasing):
    return PHRASINGS[phrasing].format(a=a, b=b)


def prompt_text(a, b, phrasing):
    """A prompt of the world: the question, then the line --evaluate writes after a question."""
    return question(a, b, phrasing) + EVAL_SUFFIX


def reply(a, b, s, style):
    return STYLES[style].format(a=a, b=b, s=s)


def last_number(text):
    """The ground truth reads the last number of a reply (independent of the scripts' extractor)."""
    found = NUMBER.findall(text)
    return int(found[-1]) if found else None


def is_right(text, a, b):
    return last_number(text) == a + b


PROMPT = re.compile(r"(?:What is|How much is) (\d) \+ (\d)\?|Add (\d) and (\d)\.|Compute (\d) plus "
                    r"(\d)\.")


def problem_of(prompt):
    """(a, b) of a prompt of the world."""
    digits = [int(d) for d in PROMPT.search(prompt).groups() if d is not None]
    return digits[0], digits[1]


def wrong_sum(a, b, rng):
    """What the web writes when it errs: the carry dropped, or else a near miss."""
    s = a + b
    return s - 10 if s >= 10 else max(0, s + rng.choice((-2, -1, 1, 2)))


# --- The web the base model is pretrained on ---
def web_sum(a, b, rng, carry_drop):
    """The web's answer to a + b: a carry is dropped with probability carry_drop."""
    return a + b - 10 if a + b >= 10 and rng.random() < carry_drop else a + b


def pairwise_judgement(rng, a, b, phrasing, judge_accuracy):
    """A judge document in SCIR's Table 5 format: a right and a wrong reply (or, one time in five,
    two replies equally right or wrong, where the verdict is a coin), verdict right with
    probability judge_accuracy -> (judge prompt text, 'm' or 'M')."""
    import prompts
    right = reply(a, b, a + b, rng.randrange(6))
    wrong = reply(a, b, wrong_sum(a, b, rng), rng.randrange(6))
    if rng.random() < 0.2:
        first, second = (right, reply(a, b, a + b, rng.randrange(6))) if rng.random() < 0.5 else (
            wrong, reply(a, b, wrong_sum(a, b, rng), rng.randrange(6)))
        first_wins = rng.random() < 0.5
    else:
        first_wins = rng.random() < 0.5
        first, second = (right, wrong) if first_wins else (wrong, right)
        if rng.random() > judge_accuracy:
            first_wins = not first_wins
    template = rng.randrange(2)  # judge_prompts: template 1 and 2, each in two orders
    text, _ = prompts.judge_prompts(prompt_text(a, b, phrasing), first, second)[2 * template]
    return text, "m" if first_wins else "M"


def pointwise_judgement(rng, a, b, phrasing, judge_accuracy):
    """A judge document in SCIR's Table 6 format: one reply and 'Score: 5' if right, 'Score: 1' if
    wrong, the verdict right with probability judge_accuracy -> (prompt text, judgement)."""
    import prompts
    right = rng.random() < 0.5
    text = reply(a, b, a + b if right else wrong_sum(a, b, rng), rng.randrange(6))
    says_right = right if rng.random() < judge_accuracy else not right
    return (prompts.fill_pointwise(prompt_text(a, b, phrasing), text),
            "Score: 5" if says_right else "Score: 1")


def web_documents(rng, size, carry_drop, judge_accuracy, qa_share=0.6):
    """(prompt, reply) documents of the web: qa_share questions with answers, pairwise judgements
    (reply '[[m]]' or '[[M]]') up to 85%, pointwise ones the rest; the 81 problems alike."""
    docs = []
    for _ in range(size):
        a, b = rng.choice(PROBLEMS)
        phrasing, kind = rng.randrange(4), rng.random()
        if kind < qa_share:
            docs.append((prompt_text(a, b, phrasing),
                         reply(a, b, web_sum(a, b, rng, carry_drop), rng.randrange(6))))
        elif kind < 0.85:
            text, winner = pairwise_judgement(rng, a, b, phrasing, judge_accuracy)
            docs.append((text, f"[[{winner}]]"))
        else:
            docs.append(pointwise_judgement(rng, a, b, phrasing, judge_accuracy))
    return docs


# --- The tokenizer: byte-level BPE, digits split, every fixed chunk of the formats one token ---
def fixed_chunks():
    """The text around the placeholders of the chat format and the judge templates, and the eval
    line."""
    import prompts
    chunks = set()
    for template in (*prompts.PAIRWISE_JUDGE_TEMPLATES, prompts.POINTWISE_JUDGE_TEMPLATE,
                     prompts.FALLBACK_CHAT_FORMAT):
        chunks.update(re.split(r"\{(?:instruction|response_1|response_2|response|user_text)\}",
                               template))
    chunks.update({EVAL_SUFFIX, prompts.ANSWER_PREFIX, "]]", "Score: "})
    return sorted(c for c in chunks if c)


def build_tokenizer(corpus_texts):
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False)])
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(corpus_texts, trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    bpe.add_tokens([AddedToken(c, normalized=False, single_word=False) for c in fixed_chunks()])
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>")


# --- The base model: a tiny Llama pretrained from scratch on the web ---
BASE = dict(hidden=96, layers=3, heads=4, web=12000, steps=1500, batch=32, lr=3e-3,
            carry_drop=0.6, judge_accuracy=0.85)
# the guard test's world (tests/test_toy_world.py): questions and answers only, a carry dropped half
# the time, so that greedy accuracy (78% held out) has room to move either way
GUARD_BASE = dict(hidden=64, layers=2, heads=4, web=4000, steps=800, batch=32, lr=3e-3,
                  carry_drop=0.5, judge_accuracy=0.85, qa_share=1.0)


def pretrain(path, config, seed=0, log=log):
    """Build the tokenizer and the model, pretrain it on the web (loss on every token but padding),
    save both at path (written whole: a temporary folder, then renamed)."""
    import prompts
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    path = Path(path)
    if (path / "config.json").exists():
        return path
    torch.set_num_threads(1)  # a tiny model: one thread beats two on a busy 2-core machine
    start = time.time()
    rng = random.Random(seed)
    docs = web_documents(rng, config["web"], config["carry_drop"], config["judge_accuracy"],
                         config.get("qa_share", 0.6))
    tokenizer = build_tokenizer([question(a, b, k) + " " + reply(a, b, a + b, style)
                                 for a, b in PROBLEMS for k in range(4) for style in range(6)])
    sequences = [prompts.token_ids(tokenizer, prompts.chat_prompt(tokenizer, p) + r
                                   + tokenizer.eos_token) for p, r in docs]  # as the scripts read
    model_config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=config["hidden"],
        intermediate_size=2 * config["hidden"], num_hidden_layers=config["layers"],
        num_attention_heads=config["heads"], num_key_value_heads=config["heads"],
        max_position_embeddings=256, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(model_config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config["lr"], weight_decay=0.0)
    steps, batch = config["steps"], config["batch"]
    model.train()
    for step in range(steps):
        lr = config["lr"] * min(1.0, (step + 1) / 50) * 0.5 * (1 + math.cos(math.pi * step / steps))
        for group in optimizer.param_groups:
            group["lr"] = lr
        chosen = [sequences[rng.randrange(len(sequences))] for _ in range(batch)]
        width = max(map(len, chosen))
        ids = torch.full((batch, width), tokenizer.eos_token_id)
        mask = torch.zeros(batch, width, dtype=torch.long)
        for row, s in enumerate(chosen):
            ids[row, : len(s)], mask[row, : len(s)] = torch.tensor(s), 1
        labels = ids.masked_fill(mask == 0, -100)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if step % 250 == 0 or step == steps - 1:
            log(f"pretraining step {step}: loss {loss.item():.3f} ({time.time() - start:.0f} s)")
    model.eval()
    tmp = Path(f"{path}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "training_summary.json").write_text(json.dumps(
        {"world": config, "seconds": round(time.time() - start, 1),
         "parameters": sum(p.numel() for p in model.parameters())}))
    os.replace(tmp, path)
    return path


# --- The data each script reads (README: Data) ---
def write_jsonl(path, rows):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(f"{path}.tmp")
    tmp.write_text("".join(json.dumps(row) + "\n" for row in rows))
    os.replace(tmp, path)


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def write_data(data_dir, sft=100, judge=200, prompts_per_iteration=150, iterations=3, seed=0):
    """sft.jsonl (clean replies), judge.jsonl (a right reply over a wrong one), prompts.jsonl (the
    training problems, unlabeled) and eval.jsonl (the 27 held-out problems x 4 phrasings)."""
    rng = random.Random(seed)
    data_dir = Path(data_dir)

    def some(count):
        return [(*rng.choice(TRAIN), rng.randrange(4)) for _ in range(count)]
    write_jsonl(data_dir / "sft.jsonl", [
        {"prompt": prompt_text(a, b, k), "response": reply(a, b, a + b, rng.randrange(6))}
        for a, b, k in some(sft)])
    write_jsonl(data_dir / "judge.jsonl", [
        {"prompt": prompt_text(a, b, k), "chosen": reply(a, b, a + b, rng.randrange(6)),
         "rejected": reply(a, b, wrong_sum(a, b, rng), rng.randrange(6))}
        for a, b, k in some(judge)])
    write_jsonl(data_dir / "prompts.jsonl", [
        {"prompt": prompt_text(a, b, k)} for a, b, k in some(prompts_per_iteration * iterations)])
    write_jsonl(data_dir / "eval.jsonl", [
        {"task": "addition", "prompt": question(a, b, k), "answer": str(a + b)}
        for a, b in TEST for k in range(4)])
    return data_dir


# --- The runs: each script through its command line, 3 iterations, a folder per method and seed ---
# Sizes for 2 CPU cores. Gentle SFT (3e-5, 2 epochs) leaves headroom: 1e-4 x 3 epochs took M0 to
# 100% on the held-out questions. DPO at 3e-5: at 1e-4 the implicit reward (IRM, and SCIR with it)
# turned to new errors (a + b + 1, which the base model rarely writes: log pi_t / pi_0 is large)
# from iteration 2 on. 50 judge pairs: with 200, SCIR's SFT alone reached 100% (the judge examples
# teach the sums too). Everything else is the paper's default.
SHARED = dict(iterations=3, num_prompts=150, max_new_tokens=16, max_length=80, sft_epochs=2,
              sft_lr=3e-5, lr=3e-5, batch_size=8, grad_accum=1, score_batch_size=64,
              dtype="float32")
SCRIPTS = {"cream": dict(SHARED), "scir": dict(SHARED, judge_pairs=50)}
METHODS = [("cream", "cream"), ("cream", "srlm"), ("cream", "oracle"),
           ("scir", "scir"), ("scir", "srlm"), ("scir", "irm"), ("scir", "oracle")]
QUICK = dict(num_prompts=60)  # --quick


def run_command(script, method, seed, base, data_dir, out, quick):
    """The command line of one run: python <script>.py --flag value ..., or the oracle's."""
    flags = dict(SCRIPTS[script], **(QUICK if quick else {}))
    flags.update(model=base, data_dir=data_dir, output_dir=out, seed=seed,
                 method=("srlm" if script == "cream" else "irm") if method == "oracle" else method)
    argv = [item for name, value in flags.items() for item in (f"--{name}", str(value))]
    argv.append("--evaluate")
    if script == "scir":  # scir.py samples its evaluation as SCIR says; the world compares greedily
        argv.append("--eval_greedy")
    if method == "oracle":
        return [sys.executable, str(Path(__file__).resolve()), "--oracle", script, "--", *argv]
    return [sys.executable, str(ROOT / f"{script}.py"), *argv]


def truth_of_samples(samples_rows):
    """1.0 for each right sample, 0.0 for each wrong one, in sample order (flat)."""
    rewards = []
    for row in samples_rows:
        a, b = problem_of(row["prompt"])
        rewards += [float(is_right(s["response"], a, b)) for s in row["samples"]]
    return rewards


# the function each oracle run replaces, and its parameters (tests/test_toy_world.py checks them)
ORACLE_HOOKS = {"scir": ("implicit_rewards", ["args", "tokenizer", "sequences", "local", "it"]),
                "cream": ("ranking_rewards",
                          ["args", "tokenizer", "samples", "reward_rows", "t", "out"])}


def run_oracle(script, argv):
    """The script's own main() with its one ranking function returning the ground truth: a right
    sample 1, a wrong one 0. Sampling, the reference log-probs, best-vs-worst pairs and the
    trainer are the script's.

    scir.py --method irm ranks by implicit_rewards(...), one value per sample in the order of
    iter<t>/samples.jsonl; cream.py --method srlm (C = 1) ranks by the r of the rows that
    ranking_rewards(...) returns, with the number of judgements without a score.
    """
    module = importlib.import_module(script)
    hook = ORACLE_HOOKS[script][0]
    if not callable(getattr(module, hook, None)):  # else the run would silently be irm or srlm
        sys.exit(f"toy_world.py: {script}.py has no {hook}() to replace: update ORACLE_HOOKS")

    def scir_oracle(args, tokenizer, sequences, local, it):
        truth = truth_of_samples(read_jsonl(Path(it) / "samples.jsonl"))
        assert len(truth) == len(sequences)
        return truth

    def cream_oracle(args, tokenizer, samples, reward_rows, t, out):
        truth, n = truth_of_samples(samples), len(samples[0]["samples"])
        return [dict(row, r=truth[j * n: (j + 1) * n]) for j, row in enumerate(reward_rows)], 0
    setattr(module, hook, scir_oracle if script == "scir" else cream_oracle)
    module.main(argv)


# --- What the runs' artefacts say, against the ground truth ---
def greedy_accuracy(path):
    """Share of right greedy replies in eval/M<k>-greedy.jsonl, by this file's own reading of the
    reply, and how many rows the scripts' flexible rule (also the last number) scored otherwise
    -> (accuracy, disagreements)."""
    rows = read_jsonl(path)
    right = [last_number(row["reply"]) == int(row["answer"]) for row in rows]
    return sum(right) / len(rows), sum(r != row["correct_flexible"] for r, row in zip(right, rows))


def sample_accuracy(samples_rows):
    truth = truth_of_samples(samples_rows)
    return sum(truth) / len(truth)


def label_accuracy(pairs):
    """Of the (prompt, chosen, rejected) whose two sides differ in correctness, the share where
    chosen is the right one -> (accuracy or None, how many such pairs)."""
    hits = []
    for prompt, chosen, rejected in pairs:
        a, b = problem_of(prompt)
        if is_right(chosen, a, b) != is_right(rejected, a, b):
            hits.append(is_right(chosen, a, b))
    return (sum(hits) / len(hits) if hits else None), len(hits)


def scir_pair_figures(rows):
    """SCIR's pairs at the start of an iteration (M_t's P and Q): how often the IRM and the GRM
    agree, and how right each is, and their agreed subset (the pairs DCPO trains on first)."""
    def side(row, first):
        return row["response_1"] if first else row["response_2"]
    irm = [(r["prompt"], side(r, r["p_start"] > 0.5), side(r, r["p_start"] <= 0.5)) for r in rows
           if r["p_start"] != 0.5]
    grm = [(r["prompt"], side(r, r["q_start"] > 0.5), side(r, r["q_start"] <= 0.5)) for r in rows
           if r["q_start"] != 0.5]
    agreed_rows = [r for r in rows if (r["p_start"] - 0.5) * (r["q_start"] - 0.5) > 0]
    agreed = [(r["prompt"], side(r, r["p_start"] > 0.5), side(r, r["p_start"] < 0.5))
              for r in agreed_rows]
    agreed_accuracy, decisive = label_accuracy(agreed)
    return {"irm_accuracy": label_accuracy(irm)[0], "grm_accuracy": label_accuracy(grm)[0],
            "agreement": len(agreed_rows) / len(rows), "agreed_accuracy": agreed_accuracy,
            "label_accuracy": agreed_accuracy, "decisive_pairs": decisive}


def analyse_run(script, method, folder):
    """Per stage (SFT, iterations 1-3) the figures of one run -> dict of lists (None where absent).

    Iteration i trains the model after SFT (scir.py M0, cream.py M1) i - 1 times further on its own
    samples; the base model is cream.py's M0.
    """
    folder = Path(folder)
    first = 1 if script == "cream" else 0  # the model after SFT
    figures = {"greedy": [], "extractor_disagreements": 0}
    for k in range(first, first + SHARED["iterations"] + 1):
        path = folder / "eval" / f"M{k}-greedy.jsonl"
        accuracy, disagreements = greedy_accuracy(path) if path.exists() else (None, 0)
        figures["greedy"].append(accuracy)
        figures["extractor_disagreements"] += disagreements
    if script == "cream" and (folder / "eval" / "M0-greedy.jsonl").exists():
        figures["base_greedy"] = greedy_accuracy(folder / "eval" / "M0-greedy.jsonl")[0]
    metrics = read_jsonl(folder / "metrics.jsonl") if (folder / "metrics.jsonl").exists() else []
    for i in range(1, SHARED["iterations"] + 1):
        it = folder / f"iter{i}"
        row = {}
        if (it / "samples.jsonl").exists():
            row["sample"] = sample_accuracy(read_jsonl(it / "samples.jsonl"))
        if (it / "pairs.jsonl").exists():
            pairs = read_jsonl(it / "pairs.jsonl")
            row["pairs"] = len(pairs)
            if script == "scir" and method == "scir":
                row.update(scir_pair_figures(pairs))
            else:
                row["label_accuracy"], row["decisive_pairs"] = label_accuracy(
                    [(p["prompt"], p["chosen"], p["rejected"]) for p in pairs])
        if script == "cream":
            m = next((m for m in metrics if m["iteration"] == i), None)
            if m:
                row["C_used"], row["C"] = m["consistency"], (m["kendall"] + 1) / 2
                row["reward_accuracy"] = m["reward_accuracy"]
        else:
            m = next((m for m in metrics if m["iteration"] == i), None)
            if m and method == "scir":
                row["dcpo_fraction"], row["consistency_loss"] = m["dcpo_fraction"], m[
                    "consistency_loss"]
        for key, value in row.items():
            figures.setdefault(key, [None] * (i - 1)).append(value)
        for key in figures:
            if isinstance(figures[key], list) and key != "greedy" and len(figures[key]) < i:
                figures[key].append(None)
    return figures


def mean_std(values):
    values = [v for v in values if v is not None]
    if not values:
        return None, None, 0
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(
        values) > 1 else 0.0
    return mean, std, len(values)


def summarise(results):
    """{(script, method): {seed: figures}} -> {(script, method): {key: [(mean, std, n)]}}."""
    summary = {}
    for key, runs in results.items():
        keys = sorted({k for figures in runs.values() for k, v in figures.items()
                       if isinstance(v, list)})
        summary[key] = {}
        for k in keys:
            columns = [figures.get(k, []) for figures in runs.values()]
            width = max(map(len, columns))
            summary[key][k] = [mean_std([c[j] if j < len(c) else None for c in columns])
                               for j in range(width)]
        summary[key]["base_greedy"] = [mean_std([f.get("base_greedy") for f in runs.values()])]
    return summary


def cell(stat, percent=True):
    mean, std, n = stat
    if mean is None:
        return "-"
    scale = 100 if percent else 1
    return f"{scale * mean:.1f} ± {scale * std:.1f}" if percent else f"{mean:.2f} ± {std:.2f}"


NAMES = {("cream", "cream"): "CREAM", ("cream", "srlm"): "SRLM (C = 1)",
         ("cream", "oracle"): "oracle labels", ("scir", "scir"): "SCIR",
         ("scir", "srlm"): "SRLM (Table 6 judge)", ("scir", "irm"): "IRM",
         ("scir", "oracle"): "oracle labels"}


def markdown(summary, seeds, base):
    """The results as markdown tables: mean ± std over seeds, in percent unless said."""
    lines = [f"Mean ± std over {len(seeds)} seeds ({', '.join(map(str, seeds))}), in percent. "
             f"Base model before SFT: greedy {cell(base)} on the held-out questions.", ""]
    iterations = range(1, SHARED["iterations"] + 1)
    lines += ["Greedy accuracy on the 108 held-out questions (27 problems x 4 phrasings):", "",
              "| script | method | after SFT | " + " | ".join(f"iteration {i}" for i in iterations)
              + " |", "|---|---|---|" + "---|" * len(iterations)]
    for (script, method), figures in summary.items():
        lines.append(f"| {script}.py | {NAMES[script, method]} | "
                     + " | ".join(cell(s) for s in figures["greedy"]) + " |")
    lines += ["", "Per iteration i (trained on the samples of the model after i - 1 iterations): "
              "accuracy of those samples, and of the self-labels (of the trained pairs whose two "
              "sides differ in correctness, n of them on average, the share with the right one "
              "as chosen; SCIR: the pairs its IRM and GRM agree on at the start):", "",
              "| script | method | " + " | ".join(f"sample acc. {i}" for i in iterations) + " | "
              + " | ".join(f"label acc. {i}" for i in iterations) + " |",
              "|---|---|" + "---|" * (2 * len(iterations))]
    for (script, method), figures in summary.items():
        empty = [(None, None, 0)] * len(iterations)
        labels = [cell(s) + ("" if n[0] is None else f" (n {n[0]:.0f})") for s, n in zip(
            figures.get("label_accuracy", empty), figures.get("decisive_pairs", empty))]
        lines.append(f"| {script}.py | {NAMES[script, method]} | "
                     + " | ".join(cell(s) for s in figures.get("sample", empty)) + " | "
                     + " | ".join(labels) + " |")
    cream = summary.get(("cream", "cream"))
    if cream:
        lines += ["", "CREAM: the consistency rate C = mean (tau + 1) / 2 that line 14 used "
                  "(iteration 1 compares r with log pi_0 itself, as Algorithm 1 does), and the "
                  "training's reward accuracy (cream.py's metric: the share of pairs, averaged "
                  "over the training's micro-batches, whose DPO margin was positive, that is, "
                  "where the policy had moved toward chosen), both as fractions:", "",
                  "| | " + " | ".join(f"iteration {i}" for i in iterations) + " |",
                  "|---|" + "---|" * len(iterations),
                  "| C | " + " | ".join(cell(s, False) for s in cream.get("C", [])) + " |",
                  "| reward accuracy | " + " | ".join(cell(s, False) for s in cream.get(
                      "reward_accuracy", [])) + " |"]
    scir = summary.get(("scir", "scir"))
    if scir:
        rows = [("IRM label accuracy", "irm_accuracy"), ("GRM label accuracy", "grm_accuracy"),
                ("IRM-GRM agreement (all pairs)", "agreement"),
                ("accuracy of the agreed pairs", "agreed_accuracy"),
                ("DCPO share during training", "dcpo_fraction")]
        lines += ["", "SCIR: on each iteration's unlabeled pairs, as M_t scores them before "
                  "training (P of Eq. 4, Q of Eq. 5 averaged over the 4 judge prompts); accuracy "
                  "counts the pairs whose sides differ in correctness:", "",
                  "| | " + " | ".join(f"iteration {i}" for i in iterations) + " |",
                  "|---|" + "---|" * len(iterations)]
        lines += [f"| {name} | " + " | ".join(cell(s) for s in scir.get(key, [])) + " |"
                  for name, key in rows]
    return "\n".join(lines) + "\n"


# --- One command: the world, the runs (two at a time), the tables ---
def run_all(out, seeds, jobs, quick):
    """Build the base and the data, run every (script, method, seed) not finished yet, jobs at a
    time, each on one thread; a run's output goes to <out>/logs/. -> ({(script, method): {seed:
    run folder}}, seconds or None if nothing ran, the names of the runs that failed)."""
    out = Path(out)
    start = time.time()
    base = pretrain(out / "base", BASE, log=log)
    log(f"base model: {base} ({time.time() - start:.0f} s)")
    data_dir = write_data(out / "data", prompts_per_iteration=(QUICK if quick else SHARED)[
        "num_prompts"])
    (out / "logs").mkdir(exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    queue, folders = [], {}
    for seed in seeds:
        for script, method in METHODS:
            folder = out / "runs" / f"{script}-{method}-{seed}"
            folders.setdefault((script, method), {})[seed] = folder
            if not (folder / "table.md").exists():
                queue.append((script, method, seed, folder))
    running, failed, ran = [], [], bool(queue)
    while queue or running:
        while queue and len(running) < jobs:
            script, method, seed, folder = queue.pop(0)
            name = f"{script}-{method}-{seed}"
            logfile = open(out / "logs" / f"{name}.log", "w")
            command = run_command(script, method, seed, base, data_dir, folder, quick)
            running.append((name, subprocess.Popen(command, stdout=logfile,
                                                   stderr=subprocess.STDOUT, env=env,
                                                   cwd=ROOT), time.time()))
        time.sleep(1)
        for item in list(running):
            name, process, began = item
            if process.poll() is not None:
                running.remove(item)
                status = "done" if process.returncode == 0 else f"FAILED ({process.returncode})"
                if process.returncode:
                    failed.append(name)
                log(f"{name}: {status} in {time.time() - began:.0f} s "
                    f"({time.time() - start:.0f} s in all)")
    if failed:
        log(f"failed runs (see {out / 'logs'}): {', '.join(failed)}")
    return folders, (time.time() - start) if ran else None, failed


COMPARISONS = [(("scir", "scir"), ("scir", "irm")), (("scir", "scir"), ("scir", "srlm")),
               (("cream", "cream"), ("cream", "srlm"))]


def paired(results):
    """Does SCIR beat irm and srlm, and CREAM srlm? Greedy accuracy of the two runs with the same
    seed, per iteration -> markdown: mean ± std of the difference, and in how many seeds A > B."""
    iterations = range(1, SHARED["iterations"] + 1)
    lines = ["Paired by seed (same seed, same data and base): greedy accuracy of A minus B, in "
             "points, and the seeds where A is above / below B:", "",
             "| A vs B | " + " | ".join(f"iteration {i}" for i in iterations) + " |",
             "|---|" + "---|" * len(iterations)]
    for a, b in COMPARISONS:
        seeds = sorted(set(results.get(a, {})) & set(results.get(b, {})))
        if not seeds:
            continue
        cells = []
        for i in iterations:
            diffs = [results[a][s]["greedy"][i] - results[b][s]["greedy"][i] for s in seeds
                     if None not in (results[a][s]["greedy"][i], results[b][s]["greedy"][i])]
            above, below = sum(d > 0 for d in diffs), sum(d < 0 for d in diffs)
            cells.append(f"{cell(mean_std(diffs))} ({above} / {below} of {len(diffs)})")
        lines.append(f"| {a[0]}.py {NAMES[a]} vs {NAMES[b]} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def report(out, folders, seconds=None):
    """The figures of every finished run, their means and spreads -> markdown; also results.json
    (every run's figures) and results.md, and accuracy.png when matplotlib is importable. The
    seeds named are those with a finished run; the runs asked for but not finished are listed."""
    out = Path(out)
    results = {key: {seed: analyse_run(*key, folder) for seed, folder in runs.items()}
               for key, runs in finished_runs(folders).items()}
    seeds = sorted({seed for runs in results.values() for seed in runs})
    summary = summarise(results)
    base = mean_std([f.get("base_greedy") for runs in results.values() for f in runs.values()])
    text = markdown(summary, seeds, base) + "\n" + paired(results)
    missing = [f"{s}-{m}-{seed}" for (s, m), runs in folders.items() for seed in runs
               if seed not in results.get((s, m), {})]
    if missing:
        text += f"\nNot finished, so not in the tables: {', '.join(missing)}.\n"
    if seconds is not None:
        text += f"\nMeasured: {seconds / 60:.1f} minutes for the command that ran the runs.\n"
    (out / "results.md").write_text(text)
    (out / "results.json").write_text(json.dumps(
        {"seeds": seeds, "runs": {f"{s}-{m}": runs for (s, m), runs in results.items()},
         "summary": {f"{s}-{m}": v for (s, m), v in summary.items()}}, indent=1))
    plot(out / "accuracy.png", summary)
    return text


def plot(path, summary):
    """Greedy accuracy per iteration per method, mean ± std over seeds, if matplotlib is there."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    figure, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for axis, script in zip(axes, ("cream", "scir")):
        for (name, method), figures in summary.items():
            if name != script:
                continue
            points = [(j, m, s) for j, (m, s, n) in enumerate(figures["greedy"]) if m is not None]
            xs = [j for j, _, _ in points]
            style = dict(color="black", linestyle="--") if method == "oracle" else {}
            axis.errorbar(xs, [100 * m for _, m, _ in points], [100 * s for _, _, s in points],
                          label=NAMES[name, method], capsize=3, marker="o", **style)
        axis.set_xticks(range(SHARED["iterations"] + 1),
                        ["SFT"] + [f"it. {i}" for i in range(1, SHARED["iterations"] + 1)])
        axis.set_title(f"{script}.py")
        axis.set_ylabel("greedy accuracy, held-out (%)")
        axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def fail(message):
    """Stop with one line and a non-zero exit, never a traceback, as cream.py and scir.py do."""
    sys.exit(f"toy_world.py: error: {message}")


class Parser(argparse.ArgumentParser):
    """argparse whose errors are the tool's one line (argparse's own adds a usage block)."""

    def error(self, message):
        fail(f"{message} (see --help)")


def parse_args(argv=None):
    """The options, every one checked before anything slow (the pretraining takes 2 minutes)."""
    parser = Parser(description=__doc__.split("\n\n")[0], allow_abbrev=False)  # --seed is a typo
    parser.add_argument("--seeds", type=int, nargs="+", action="extend", default=None,
                        metavar="SEED", help=(
                            "the scripts' --seed (0 or more): a run of every method for each "
                            "(default 1 2 3 4 5; --quick: 1)"))
    parser.add_argument("--out", default=None, help=(
        "the world and every run (default runs/toy_world, or runs/toy_world-quick)"))
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time, one thread each")
    parser.add_argument("--quick", action="store_true", help=(
        "1 seed unless --seeds, 60 prompts an iteration: a check of the pipeline"))
    parser.add_argument("--report_only", action="store_true", help="tables of the finished runs")
    args = parser.parse_args(argv)
    # None, not a list, as the default: --seeds given in any spelling (--seeds 3, --seeds=3) is kept
    if args.seeds is None:
        args.seeds = [1] if args.quick else [1, 2, 3, 4, 5]
    for seed in args.seeds:
        if seed < 0:  # the scripts refuse it, so every run would fail after the pretraining
            fail(f"--seeds must be at least 0 (each is a script's --seed), got {seed}")
    if len(set(args.seeds)) < len(args.seeds):  # two runs would share one folder
        fail(f"--seeds repeats a seed: {' '.join(map(str, args.seeds))}")
    if args.jobs < 1:  # 0 would wait forever for a run that never starts
        fail(f"--jobs must be at least 1, got {args.jobs}")
    if args.out is not None and not args.out.strip():
        fail("--out must name a folder, got ''")
    args.out = args.out or ("runs/toy_world-quick" if args.quick else "runs/toy_world")
    check_out(Path(args.out), args.report_only)
    return args


def check_out(out, report_only):
    """--out is a folder this user can write in (made here if need be), whose parts are folders:
    else the pretraining would run for 2 minutes and then fail on saving."""
    if out.exists() and not out.is_dir():
        fail(f"--out {out} is a file, not a folder")
    if report_only and not out.is_dir():
        fail(f"--out {out} does not exist: --report_only reads the runs of an earlier command")
    for name in ("base", "data", "logs", "runs"):
        if (out / name).exists() and not (out / name).is_dir():
            fail(f"--out {out}: {out / name} is a file, not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):  # os.access says yes to root on a read-only disk
            pass
    except OSError as error:
        fail(f"--out {out} cannot be written: {error.strerror or error}")


def finished_runs(folders):
    """{(script, method): {seed: folder}} -> the same, only the runs that finished."""
    finished = {key: {seed: folder for seed, folder in runs.items()
                      if (Path(folder) / "table.md").exists()} for key, runs in folders.items()}
    return {key: runs for key, runs in finished.items() if runs}


def stored_seconds(out):
    """The time of the last command whose runs all succeeded (seconds.txt), or None."""
    try:
        return float((Path(out) / "seconds.txt").read_text())
    except (OSError, ValueError):  # none yet, or damaged: the tables go without a time
        return None


def main(argv=None):
    args = parse_args(argv)
    if args.report_only:
        folders = {key: {seed: Path(args.out) / "runs" / f"{key[0]}-{key[1]}-{seed}"
                         for seed in args.seeds} for key in METHODS}
        if not finished_runs(folders):  # an empty table would replace the results there
            fail(f"--out {args.out} holds no finished run of --seeds "
                 f"{' '.join(map(str, args.seeds))}: nothing to report")
        print(report(args.out, folders, stored_seconds(args.out)))
        return
    folders, seconds, failed = run_all(args.out, args.seeds, args.jobs, args.quick)
    if failed:  # the results files stay those of the last complete command
        count = sum(len(runs) for runs in folders.values())
        fail(f"{len(failed)} of {count} runs failed (see {Path(args.out) / 'logs'}): results.md "
             f"and results.json are left as they were; rerun the same command to retry them "
             f"(--report_only writes the tables of the finished runs)")
    if seconds is None:  # every run had finished before: the time of the command that ran them
        seconds = stored_seconds(args.out)
    else:  # the time of the command that ran the runs (and built the world)
        (Path(args.out) / "seconds.txt").write_text(f"{seconds:.0f}\n")
    print(report(args.out, folders, seconds))
    print(f"runs, logs, results.md and results.json are in {args.out}")


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--oracle":  # one oracle run: --oracle SCRIPT -- ARGS
        run_oracle(sys.argv[2], sys.argv[4:])
    else:
        main()
