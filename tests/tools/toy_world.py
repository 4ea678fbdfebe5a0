"""A toy world with a known answer: watch both self-rewarding loops learn, or fail, on 2 CPU cores.

    python tests/tools/toy_world.py                      # first world, 7 methods x 5 seeds (~8 min)
    python tests/tools/toy_world.py --quick              # 1 seed, 60 prompts an iteration (~2 min)
    python tests/tools/toy_world.py --world 2 --sweep    # 4 levels x 10 methods x 5 seeds
    python tests/tools/toy_world.py --world 2 --judge_accuracy 0.7 --quick
    python tests/tools/toy_world.py --seeds 1 2 3 --out /tmp/toyworld --jobs 2

The first world: single-digit addition (a + b, a and b in 1..9), asked in 4 phrasings and answered
in 6 reply styles; a reply is right when its last number is a + b. 27 of the 81 problems are held
out for the evaluation. A tiny Llama is pretrained from scratch on a "web" of such exchanges in
which a carry is dropped 60% of the time (7 + 5 = 2), and of judgements in the papers' judge
formats (SCIR Table 5 pairwise, Table 6 pointwise) that are right 85% of the time. The seed data
(SFT replies, judge pairs) are clean.

The second world (--world 2) sums three digits (729 problems, 160 held out, each asked once), so
that the oracle keeps gaining in iteration 3, and turns label quality into a knob: at
--judge_accuracy q the web's verdicts, the SFT replies and the judge pairs are each right with
probability q. Each level is a world of its own (its own base, data and runs, in
<out>/judge-<q>); --sweep runs 0.6, 0.7, 0.85 and 0.95 and adds the sweep's tables and plot
(sweep.md, sweep.json, sweep.png). It also runs cream.py's --t1_consistency choices as methods.

Then cream.py (cream, srlm, and an oracle) and scir.py (scir, srlm, irm, and an oracle) run on it
through their command line, unchanged, 3 iterations each, one run per seed. The oracle runs the
script's own main() with the one ranking function replaced by the ground truth (1 for a right
sample, 0 for a wrong one), so it samples, scores the reference and trains with the script's own
code. From the runs' artefacts this script computes, per iteration: greedy and sample accuracy,
the accuracy of the self-labels (of the trained pairs whose two sides differ in correctness, the
share where chosen is the right one), CREAM's C, and SCIR's IRM-GRM agreement and the accuracy of
the agreed pairs; mean ± std over seeds, printed as markdown and written to <world>/results.md
and results.json (and accuracy.png if matplotlib is installed). Every run resumes, so the same
command continues.
"""

import argparse
import concurrent.futures
import importlib
import itertools
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


# --- The task: a sum of 2 or 3 digits, asked in 4 phrasings, answered in 6 styles ---
# The first world (--world 1) adds two digits; the second (the default) three. The truth of a
# reply is its last number.
PHRASINGS = ("What is {expr}?", "Add {listed}.", "Compute {spoken}.", "How much is {expr}?")
STYLES = ("{expr} = {s}.", "The sum is {s}.", "{s}", "It is {s}.", "{spoken} makes {s}.",
          "Result: {s}.")
# what --evaluate appends to a test question (EVAL_SUFFIX["number"] in both scripts); the world's
# prompts end with it too, so a test question reads like the prompts the loops sample on
EVAL_SUFFIX = ("\n\nSolve it step by step and end your reply with 'Answer: N', where N is the "
               "final number.")
NUMBER = re.compile(r"-?\d+")


def all_problems(terms):
    """Every tuple of `terms` digits 1..9, in a fixed order."""
    return list(itertools.product(range(1, 10), repeat=terms))


def held_out_problems(terms):
    """Problems never trained on, a third with no carry-free bias: 2 terms, 27 of 81 (15 of the 45
    with a carry, 12 of the 36 without); 3 terms, 160 of 729 (142 of the 645 with a carry, 18 of
    the 84 without)."""
    rng = random.Random(13)
    problems = all_problems(terms)
    carries = [p for p in problems if sum(p) >= 10]
    others = [p for p in problems if sum(p) < 10]
    counts = (15, 12) if terms == 2 else (142, 18)
    return set(rng.sample(carries, counts[0]) + rng.sample(others, counts[1]))


def split(terms):
    """(training problems, held-out problems), each sorted."""
    test = held_out_problems(terms)
    return [p for p in all_problems(terms) if p not in test], sorted(test)


TRAIN, TEST = split(2)  # the first world's, which the guard test (tests/test_toy_world.py) uses


def words(problem):
    """The ways a problem is written: 3 + 4 + 5, '3, 4 and 5', '3 plus 4 plus 5'."""
    digits = [str(d) for d in problem]
    return dict(expr=" + ".join(digits), listed=", ".join(digits[:-1]) + " and " + digits[-1],
                spoken=" plus ".join(digits))


def question(problem, phrasing):
    return PHRASINGS[phrasing].format(**words(problem))


def prompt_text(problem, phrasing):
    """A prompt of the world: the question, then the line --evaluate writes after a question."""
    return question(problem, phrasing) + EVAL_SUFFIX


def reply(problem, s, style):
    return STYLES[style].format(s=s, **words(problem))


def last_number(text):
    """The ground truth reads the last number of a reply (independent of the scripts' extractor)."""
    found = NUMBER.findall(text)
    return int(found[-1]) if found else None


def is_right(text, problem):
    return last_number(text) == sum(problem)


def problem_of(prompt):
    """The digits of a prompt of the world (its question is the only text with numbers)."""
    return tuple(int(d) for d in NUMBER.findall(prompt.split("\n\n")[0]))


def wrong_sum(problem, rng):
    """What the web writes when it errs: a carry dropped, or else a near miss."""
    s = sum(problem)
    return s - 10 if s >= 10 else max(0, s + rng.choice((-2, -1, 1, 2)))


# --- The web the base model is pretrained on ---
def web_sum(problem, rng, carry_drop):
    """The web's answer to a sum: a carry is dropped with probability carry_drop."""
    s = sum(problem)
    return s - 10 if s >= 10 and rng.random() < carry_drop else s


def pairwise_judgement(rng, problem, phrasing, judge_accuracy):
    """A judge document in SCIR's Table 5 format: a right and a wrong reply (or, one time in five,
    two replies equally right or wrong, where the verdict is a coin), verdict right with
    probability judge_accuracy -> (judge prompt text, 'm' or 'M')."""
    import prompts
    right = reply(problem, sum(problem), rng.randrange(6))
    wrong = reply(problem, wrong_sum(problem, rng), rng.randrange(6))
    if rng.random() < 0.2:
        first, second = (right, reply(problem, sum(problem), rng.randrange(6))) if (
            rng.random() < 0.5) else (wrong, reply(problem, wrong_sum(problem, rng),
                                                   rng.randrange(6)))
        first_wins = rng.random() < 0.5
    else:
        first_wins = rng.random() < 0.5
        first, second = (right, wrong) if first_wins else (wrong, right)
        if rng.random() > judge_accuracy:
            first_wins = not first_wins
    template = rng.randrange(2)  # judge_prompts: template 1 and 2, each in two orders
    text, _ = prompts.judge_prompts(prompt_text(problem, phrasing), first, second)[2 * template]
    return text, "m" if first_wins else "M"


def pointwise_judgement(rng, problem, phrasing, judge_accuracy):
    """A judge document in SCIR's Table 6 format: one reply and 'Score: 5' if right, 'Score: 1' if
    wrong, the verdict right with probability judge_accuracy -> (prompt text, judgement)."""
    import prompts
    right = rng.random() < 0.5
    text = reply(problem, sum(problem) if right else wrong_sum(problem, rng), rng.randrange(6))
    says_right = right if rng.random() < judge_accuracy else not right
    return (prompts.fill_pointwise(prompt_text(problem, phrasing), text),
            "Score: 5" if says_right else "Score: 1")


def web_documents(rng, size, config):
    """(prompt, reply) documents of the web: qa_share questions with answers, pairwise judgements
    (reply '[[m]]' or '[[M]]') up to 85%, pointwise ones the rest; every problem alike."""
    problems, docs = all_problems(config["terms"]), []
    carry_drop, judge_accuracy = config["carry_drop"], config["judge_accuracy"]
    for _ in range(size):
        problem = rng.choice(problems)
        phrasing, kind = rng.randrange(4), rng.random()
        if kind < config.get("qa_share", 0.6):
            docs.append((prompt_text(problem, phrasing),
                         reply(problem, web_sum(problem, rng, carry_drop), rng.randrange(6))))
        elif kind < 0.85:
            text, winner = pairwise_judgement(rng, problem, phrasing, judge_accuracy)
            docs.append((text, f"[[{winner}]]"))
        else:
            docs.append(pointwise_judgement(rng, problem, phrasing, judge_accuracy))
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
# The first world (--world 1): two digits, the seed data (sft.jsonl, judge.jsonl) clean.
BASE = dict(terms=2, hidden=96, layers=3, heads=4, web=12000, steps=1500, batch=32, lr=3e-3,
            carry_drop=0.6, judge_accuracy=0.85)
# The second world (--world 2): three digits, and one knob for the quality of every label a loop
# starts from: the web's verdicts and the seed data's labels are right with probability
# judge_accuracy. CREAM's labels come from the implicit reward that SFT leaves (log pi_1 / pi_0),
# not from a judge, so a knob on the web's verdicts alone would not reach them.
SECOND = dict(BASE, terms=3)
LEVELS = (0.6, 0.7, 0.85, 0.95)  # --sweep: from near chance to near perfect
# the guard test's world (tests/test_toy_world.py): questions and answers only, a carry dropped half
# the time, so that greedy accuracy (78% held out) has room to move either way
GUARD_BASE = dict(terms=2, hidden=64, layers=2, heads=4, web=4000, steps=800, batch=32, lr=3e-3,
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
    docs = web_documents(rng, config["web"], config)
    tokenizer = build_tokenizer([question(p, k) + " " + reply(p, sum(p), style)
                                 for p in all_problems(config["terms"]) for k in range(4)
                                 for style in range(6)])
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


def write_data(data_dir, terms=2, label_accuracy=1.0, sft=100, judge=200,
               prompts_per_iteration=150, iterations=3, seed=0):
    """sft.jsonl (replies right with probability label_accuracy), judge.jsonl (a right reply over a
    wrong one, swapped with probability 1 - label_accuracy), prompts.jsonl (the training problems,
    unlabeled) and eval.jsonl (the held-out problems: 2 terms, each in the 4 phrasings; 3 terms,
    each once, the phrasings in turn)."""
    rng = random.Random(seed)
    data_dir = Path(data_dir)
    train, test = split(terms)

    def some(count):
        return [(rng.choice(train), rng.randrange(4)) for _ in range(count)]

    def mislabelled():
        """True with probability 1 - label_accuracy; clean seed data draw nothing."""
        return label_accuracy < 1 and rng.random() > label_accuracy

    def sft_row(problem, phrasing):
        s = wrong_sum(problem, rng) if mislabelled() else sum(problem)
        return {"prompt": prompt_text(problem, phrasing), "response": reply(problem, s,
                                                                            rng.randrange(6))}

    def judge_row(problem, phrasing):
        right = reply(problem, sum(problem), rng.randrange(6))
        wrong = reply(problem, wrong_sum(problem, rng), rng.randrange(6))
        chosen, rejected = (wrong, right) if mislabelled() else (right, wrong)
        return {"prompt": prompt_text(problem, phrasing), "chosen": chosen, "rejected": rejected}
    write_jsonl(data_dir / "sft.jsonl", [sft_row(p, k) for p, k in some(sft)])
    write_jsonl(data_dir / "judge.jsonl", [judge_row(p, k) for p, k in some(judge)])
    write_jsonl(data_dir / "prompts.jsonl", [
        {"prompt": prompt_text(p, k)} for p, k in some(prompts_per_iteration * iterations)])
    asked = [(p, k) for p in test for k in range(4)] if terms == 2 else [
        (p, j % 4) for j, p in enumerate(test)]
    write_jsonl(data_dir / "eval.jsonl", [
        {"task": "addition", "prompt": question(p, k), "answer": str(sum(p))} for p, k in asked])
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
# cream.py --t1_consistency, beyond the paper: what line 14 does at t = 1 (README: departures);
# the second world runs each as a method of its own
T1_CHOICES = ("mean_logp", "one", "floor")


def world_methods(world):
    """The (script, method) pairs a world runs: the 7, and in the second world CREAM's t = 1
    variants as cream-t1-<choice>."""
    return METHODS + ([("cream", f"cream-t1-{c}") for c in T1_CHOICES] if world == 2 else [])
QUICK = dict(num_prompts=60)  # --quick


def run_command(script, method, seed, base, data_dir, out, quick):
    """The command line of one run: python <script>.py --flag value ..., or the oracle's."""
    flags = dict(SCRIPTS[script], **(QUICK if quick else {}))
    flags.update(model=base, data_dir=data_dir, output_dir=out, seed=seed,
                 method=("srlm" if script == "cream" else "irm") if method == "oracle" else method)
    if method.startswith("cream-t1-"):
        flags.update(method="cream", t1_consistency=method.removeprefix("cream-t1-"))
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
        problem = problem_of(row["prompt"])
        rewards += [float(is_right(s["response"], problem)) for s in row["samples"]]
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
        problem = problem_of(prompt)
        if is_right(chosen, problem) != is_right(rejected, problem):
            hits.append(is_right(chosen, problem))
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
NAMES.update({("cream", f"cream-t1-{c}"): f"CREAM, --t1_consistency {c}" for c in T1_CHOICES})


def markdown(summary, seeds, base, questions):
    """The results as markdown tables: mean ± std over seeds, in percent unless said."""
    lines = [f"Mean ± std over {len(seeds)} seeds ({', '.join(map(str, seeds))}), in percent. "
             f"Base model before SFT: greedy {cell(base)} on the held-out questions.", ""]
    iterations = range(1, SHARED["iterations"] + 1)
    lines += [f"Greedy accuracy on the {questions}:", "",
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
def worlds(out, world, levels):
    """The worlds a command builds -> [(judge accuracy, folder, base config, seed-data label
    accuracy)]: the first world in --out itself; the second, one folder a level."""
    if world == 1:
        return [(BASE["judge_accuracy"], Path(out), BASE, 1.0)]
    return [(q, Path(out) / f"judge-{q:g}", dict(SECOND, judge_accuracy=q), q) for q in levels]


def pretrain_all(bases, jobs):
    """pretrain(path, config) for each (path, config) not built yet, jobs at a time (each one
    thread, 1-2 minutes)."""
    missing = [(path, config) for path, config in bases if not (path / "config.json").exists()]
    if len(missing) < 2 or jobs < 2:
        for path, config in missing:
            pretrain(path, config, log=log)
        return
    with concurrent.futures.ProcessPoolExecutor(min(jobs, len(missing))) as pool:
        for done in pool.map(pretrain, *zip(*missing)):
            log(f"base model: {done}")


def run_all(out, seeds, jobs, quick, world=1, levels=LEVELS):
    """Build each world's base and data, run every (script, method, seed) not finished yet, jobs
    at a time, each on one thread; a run's output goes to <world>/logs/. -> ({world folder:
    {(script, method): {seed: run folder}}}, seconds or None if nothing ran, the names of the
    runs that failed)."""
    start = time.time()
    built = worlds(out, world, levels)
    pretrain_all([(folder / "base", config) for _, folder, config, _ in built], jobs)
    log(f"base models ready ({time.time() - start:.0f} s)")
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    queue, folders = [], {}
    for _, folder, config, label_accuracy in built:
        data_dir = write_data(folder / "data", config["terms"], label_accuracy,
                              prompts_per_iteration=(QUICK if quick else SHARED)["num_prompts"])
        (folder / "logs").mkdir(exist_ok=True)
        runs = folders.setdefault(folder, {})
        for seed in seeds:
            for script, method in world_methods(world):
                run = folder / "runs" / f"{script}-{method}-{seed}"
                runs.setdefault((script, method), {})[seed] = run
                if not (run / "table.md").exists():
                    queue.append((script, method, seed, run, folder, data_dir))
    running, failed, ran = [], [], bool(queue)
    while queue or running:
        while queue and len(running) < jobs:
            script, method, seed, run, folder, data_dir = queue.pop(0)
            name = f"{script}-{method}-{seed}" + ("" if world == 1 else f" ({folder.name})")
            logfile = open(folder / "logs" / f"{script}-{method}-{seed}.log", "w")
            command = run_command(script, method, seed, folder / "base", data_dir, run, quick)
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
        log(f"failed runs (see the logs folders): {', '.join(failed)}")
    return folders, (time.time() - start) if ran else None, failed


COMPARISONS = [(("scir", "scir"), ("scir", "irm")), (("scir", "scir"), ("scir", "srlm")),
               (("cream", "cream"), ("cream", "srlm"))] + [
    (("cream", f"cream-t1-{c}"), ("cream", "srlm")) for c in T1_CHOICES]


def paired_diffs(results, a, b, i):
    """Greedy accuracy at stage i, A minus B, same seed -> ([differences], seeds above, below)."""
    seeds = sorted(set(results.get(a, {})) & set(results.get(b, {})))
    diffs = [results[a][s]["greedy"][i] - results[b][s]["greedy"][i] for s in seeds
             if None not in (results[a][s]["greedy"][i], results[b][s]["greedy"][i])]
    return diffs, sum(d > 0 for d in diffs), sum(d < 0 for d in diffs)


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
            diffs, above, below = paired_diffs(results, a, b, i)
            cells.append(f"{cell(mean_std(diffs))} ({above} / {below} of {len(diffs)})")
        lines.append(f"| {a[0]}.py {NAMES[a]} vs {NAMES[b]} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def report(out, folders, seconds=None, title=""):
    """The figures of every finished run, their means and spreads -> markdown; also results.json
    (every run's figures) and results.md, and accuracy.png when matplotlib is importable. The
    seeds named are those with a finished run; the runs asked for but not finished are listed."""
    out = Path(out)
    results = {key: {seed: analyse_run(*key, folder) for seed, folder in runs.items()}
               for key, runs in finished_runs(folders).items()}
    seeds = sorted({seed for runs in results.values() for seed in runs})
    summary = summarise(results)
    base = mean_std([f.get("base_greedy") for runs in results.values() for f in runs.values()])
    eval_file = out / "data" / "eval.jsonl"
    n = len(read_jsonl(eval_file)) if eval_file.exists() else 108
    questions = ("108 held-out questions (27 problems x 4 phrasings)" if n == 108 else
                 f"{n} held-out questions (as many problems, each asked once)")
    text = markdown(summary, seeds, base, questions) + "\n" + paired(results)
    missing = [f"{s}-{m}-{seed}" for (s, m), runs in folders.items() for seed in runs
               if seed not in results.get((s, m), {})]
    if missing:
        text += f"\nNot finished, so not in the tables: {', '.join(missing)}.\n"
    if seconds is not None:
        text += f"\nMeasured: {seconds / 60:.1f} minutes for the command that ran the runs.\n"
    (out / "results.md").write_text(title + text)
    (out / "results.json").write_text(json.dumps(
        {"seeds": seeds, "runs": {f"{s}-{m}": runs for (s, m), runs in results.items()},
         "summary": {f"{s}-{m}": v for (s, m), v in summary.items()}}, indent=1))
    plot(out / "accuracy.png", summary)
    return text


# --- The sweep: every method at each level of the second world ---
BASELINES = {"cream": ("cream", "srlm"), "scir": ("scir", "srlm")}  # each script's SRLM


def crossings(levels, means):
    """Where a mean difference changes sign between neighbouring levels -> text, or None."""
    found = [f"between {lo:g} and {hi:g}" for (lo, m), (hi, n) in zip(
        zip(levels, means), zip(levels[1:], means[1:])) if None not in (m, n) and m * n < 0]
    return ", ".join(found) or None


def per_iteration(summary, key, field, percent=True):
    """'a / b / c': the mean of one figure at iterations 1..3 (mean over seeds), '-' if absent."""
    stats = summary.get(key, {}).get(field, [])
    values = [stats[i][0] if i < len(stats) else None for i in range(SHARED["iterations"])]
    return " / ".join("-" if v is None else (f"{100 * v:.0f}" if percent else f"{v:.2f}")
                      for v in values)


def sweep_report(out, results, seconds=None):
    """The second world across its levels -> markdown; also <out>/sweep.md, sweep.json and
    sweep.png. results: {level: {(script, method): {seed: figures}}}."""
    levels = sorted(results)
    last = SHARED["iterations"]
    summaries = {q: summarise(results[q]) for q in levels}
    keys = [k for k in world_methods(2) if any(k in results[q] for q in levels)]
    head = "| script | method | " + " | ".join(f"judge {q:g}" for q in levels) + " |"
    rule = "|---|---|" + "---|" * len(levels)

    def row(key, cells):
        return f"| {key[0]}.py | {NAMES[key]} | " + " | ".join(cells) + " |"
    lines = [f"Sweep over the judge accuracy (second world; the web's verdicts and the seed "
             f"data's labels right with that probability), mean ± std over the seeds, in "
             f"percent.", "", f"Greedy accuracy on the held-out questions after iteration "
             f"{last} (after SFT: the first row of each script):", "", head, rule]
    for script in ("cream", "scir"):
        oracle = (script, "oracle")
        lines.append(f"| {script}.py | after SFT | " + " | ".join(
            cell(summaries[q][oracle]["greedy"][0]) if oracle in summaries[q] else "-"
            for q in levels) + " |")
        lines += [row(k, [cell(summaries[q][k]["greedy"][last]) if k in summaries[q] else "-"
                          for q in levels]) for k in keys if k[0] == script]
    lines += ["", "Self-label accuracy at iterations 1 / 2 / 3 (of the trained pairs whose sides "
              "differ in correctness, the share with the right one chosen; SCIR: the pairs its "
              "IRM and GRM agree on):", "", head, rule]
    lines += [row(k, [per_iteration(summaries[q], k, "label_accuracy") for q in levels])
              for k in keys if k[1] != "oracle"]
    lines += ["", "CREAM's consistency at iterations 1 / 2 / 3: C measured (Eq. 3.10), then the "
              "C that line 14 used:", "", head, rule]
    for k in keys:
        if k[0] == "cream" and k[1].startswith("cream"):
            lines.append(row(k, [per_iteration(summaries[q], k, "C", False) + " (used "
                                 + per_iteration(summaries[q], k, "C_used", False) + ")"
                                 for q in levels]))
    scir = ("scir", "scir")
    lines += ["", "SCIR at iterations 1 / 2 / 3: IRM-GRM agreement (all pairs), and the accuracy "
              "of the agreed pairs:", "", head, rule,
              "| scir.py | IRM-GRM agreement | " + " | ".join(
                  per_iteration(summaries[q], scir, "agreement") for q in levels) + " |",
              "| scir.py | accuracy of the agreed pairs | " + " | ".join(
                  per_iteration(summaries[q], scir, "agreed_accuracy") for q in levels) + " |"]
    lines += ["", f"Paired by seed, after iteration {last}: greedy accuracy of the method minus "
              f"its script's SRLM, and minus its script's oracle, in points (seeds above / "
              f"below):", "", head, rule]
    crossing_lines, figures = [], {}
    for k in keys:
        if k[1] == "oracle":
            continue
        for other, label in ((BASELINES[k[0]], "SRLM"), ((k[0], "oracle"), "oracle")):
            if other == k:
                continue
            cells, means = [], []
            for q in levels:
                diffs, above, below = paired_diffs(results[q], k, other, last)
                stat = mean_std(diffs)
                means.append(stat[0])
                cells.append("-" if stat[0] is None else
                             f"{cell(stat)} ({above} / {below})")
            lines.append(f"| {k[0]}.py | {NAMES[k]} - {label} | " + " | ".join(cells) + " |")
            figures[f"{k[0]}-{k[1]} - {label}"] = means
            crossed = crossings(levels, means)
            if label == "SRLM":
                crossing_lines.append(f"- {k[0]}.py {NAMES[k]} against SRLM: "
                                      + (f"the sign changes {crossed}" if crossed else
                                         "no crossing"))
    lines += ["", "Crossing points (the mean paired difference changes sign between levels):",
              *crossing_lines]
    if seconds is not None:
        lines += ["", f"Measured: {seconds / 60:.1f} minutes for the command that ran the runs."]
    text = "\n".join(lines) + "\n"
    out = Path(out)
    (out / "sweep.md").write_text(text)
    (out / "sweep.json").write_text(json.dumps(
        {"levels": levels, "paired_means": figures,
         "summary": {f"{q:g}": {f"{s}-{m}": v for (s, m), v in summaries[q].items()}
                     for q in levels}}, indent=1))
    plot_sweep(out / "sweep.png", levels, summaries, keys)
    return text


def plot_sweep(path, levels, summaries, keys):
    """Final greedy accuracy against the judge accuracy, a line per method, the oracle dashed as
    the ceiling, if matplotlib is there."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    last = SHARED["iterations"]
    figure, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for axis, script in zip(axes, ("cream", "scir")):
        for key in [k for k in keys if k[0] == script]:
            points = [(q, *summaries[q][key]["greedy"][last][:2]) for q in levels
                      if key in summaries[q] and summaries[q][key]["greedy"][last][0] is not None]
            style = dict(color="black", linestyle="--") if key[1] == "oracle" else {}
            axis.errorbar([q for q, _, _ in points], [100 * m for _, m, _ in points],
                          [100 * s for _, _, s in points], label=NAMES[key], capsize=3,
                          marker="o", **style)
        oracle = (script, "oracle")
        sft = [(q, summaries[q][oracle]["greedy"][0][0]) for q in levels if oracle in summaries[q]
               and summaries[q][oracle]["greedy"][0][0] is not None]
        axis.plot([q for q, _ in sft], [100 * m for _, m in sft], color="grey", linestyle=":",
                  label="after SFT")
        axis.set_xticks(levels)
        axis.set_xlabel("judge accuracy (web verdicts and seed labels)")
        axis.set_title(f"{script}.py, after iteration {last}")
        axis.set_ylabel("greedy accuracy, held-out (%)")
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=100)


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
    parser.add_argument("--world", type=int, choices=(1, 2), default=1, help=(
        "1: two digits, clean seed data (the first results); 2: three digits, every label right "
        "with probability --judge_accuracy"))
    parser.add_argument("--judge_accuracy", type=float, nargs="+", default=None, metavar="Q",
                        help="--world 2: the levels, each a world of its own (default 0.85)")
    parser.add_argument("--sweep", action="store_true", help=(
        f"--world 2 at every level ({' '.join(map(str, LEVELS))}), then the sweep's tables"))
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
    if args.world == 1 and (args.sweep or args.judge_accuracy):
        fail("--judge_accuracy and --sweep are settings of --world 2")
    if args.sweep and args.judge_accuracy:
        fail("--sweep runs its own levels: give --sweep or --judge_accuracy, not both")
    args.levels = list(LEVELS) if args.sweep else args.judge_accuracy or [SECOND["judge_accuracy"]]
    for q in args.levels:
        if not 0.5 < q <= 1:  # at 0.5 or below the labels carry no signal, or the reverse one
            fail(f"--judge_accuracy must be in (0.5, 1], got {q:g}")
    if len(set(args.levels)) < len(args.levels):
        fail(f"--judge_accuracy repeats a level: {' '.join(map(str, args.levels))}")
    name = "runs/toy_world" + ("" if args.world == 1 else "-2") + ("-quick" if args.quick else "")
    args.out = args.out or name
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
    built = worlds(args.out, args.world, args.levels)
    if args.report_only:
        folders = {folder: {key: {seed: folder / "runs" / f"{key[0]}-{key[1]}-{seed}"
                                  for seed in args.seeds} for key in world_methods(args.world)}
                   for _, folder, _, _ in built}
        if not any(finished_runs(f) for f in folders.values()):  # would replace the results
            fail(f"--out {args.out} holds no finished run of --seeds "
                 f"{' '.join(map(str, args.seeds))}: nothing to report")
        print(reports(args, built, folders, stored_seconds(args.out)))
        return
    folders, seconds, failed = run_all(args.out, args.seeds, args.jobs, args.quick, args.world,
                                       args.levels)
    if failed:  # the results files stay those of the last complete command
        count = sum(len(runs) for world in folders.values() for runs in world.values())
        fail(f"{len(failed)} of {count} runs failed (see the logs folders in {args.out}): "
             f"results.md and results.json are left as they were; rerun the same command to "
             f"retry them (--report_only writes the tables of the finished runs)")
    if seconds is None:  # every run had finished before: the time of the command that ran them
        seconds = stored_seconds(args.out)
    else:  # the time of the command that ran the runs (and built the world)
        (Path(args.out) / "seconds.txt").write_text(f"{seconds:.0f}\n")
    print(reports(args, built, folders, seconds))
    print(f"runs, logs, results.md and results.json are in {args.out}")


def reports(args, built, folders, seconds):
    """Each world's results.md; with several levels, the sweep's tables too -> markdown."""
    texts, results = [], {}
    for q, folder, _, _ in built:
        if finished_runs(folders[folder]):
            title = "" if args.world == 1 else f"Second world, judge accuracy {q:g}.\n\n"
            texts.append(title + report(folder, folders[folder], seconds if len(built) == 1
                                        else None, title))
            results[q] = {key: {seed: analyse_run(*key, run) for seed, run in runs.items()}
                          for key, runs in finished_runs(folders[folder]).items()}
    if len(built) > 1:
        texts.append(sweep_report(args.out, results, seconds))
    return "\n".join(texts)


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--oracle":  # one oracle run: --oracle SCRIPT -- ARGS
        run_oracle(sys.argv[2], sys.argv[4:])
    else:
        main()
