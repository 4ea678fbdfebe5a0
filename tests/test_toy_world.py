"""The training direction, guarded on a toy world with a known answer (tests/tools/toy_world.py).

A tiny Llama is pretrained here on single-digit addition in which a carry is dropped half the
time. One iteration of DPO through each script's own functions (its sampler, its reference
log-probs, its best-vs-worst pairs, its DPO loss and its trainer with adamw_step) on pairs
labelled by the ground truth must raise greedy accuracy on held-out problems, and the same
iteration with the labels swapped must lower it. A copy of the DPO loss with one sign flipped,
made here, makes that check fail: a sign error anywhere between the pairs and the optimizer shows.
CPU, fixed seeds: the same numbers every run (measured with torch 2.13: 0.79 -> 1.00 with oracle
labels and 0.79 -> 0.55 with swapped ones, both scripts; about 40 s on 2 cores, pretraining
included). The learning rate, 3e-5 for 2 epochs, is below where DPO overshoots on this world: at
1e-4 the oracle labels first raise accuracy (0.91 after 1 epoch) and then lower it (0.76 after 2).
"""

import copy
import inspect

import pytest
import torch
import torch.nn.functional as F

import cream
import scir
import toy_world

FLAGS = ["--num_samples", "4", "--max_new_tokens", "16", "--max_length", "64", "--lr", "3e-5",
         "--epochs", "2", "--batch_size", "8", "--grad_accum", "1", "--score_batch_size", "64",
         "--dtype", "float32", "--seed", "0"]
MARGIN = 0.10  # greedy accuracy must move at least this much either way; measured: 0.21 to 0.24
SCRIPTS = {"scir": (scir, ["--method", "irm"]), "cream": (cream, ["--method", "srlm"])}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    torch.set_num_threads(1)
    return toy_world.pretrain(tmp_path_factory.mktemp("toy") / "base", toy_world.GUARD_BASE,
                              log=lambda line: None)


def world(base, name):
    """The base model loaded by the script, its samples of the training prompts (the script's
    sampler) and their reference log-probs under it (the script's scoring)."""
    module, method = SCRIPTS[name]
    args = module.parse_args(["--model", str(base), *method, *FLAGS])
    tokenizer = module.load_tokenizer(base)
    model = module.load_model(base, args)
    prompts = [toy_world.prompt_text(p, k) for p in toy_world.TRAIN for k in range(4)]
    torch.manual_seed(0)
    grouped = module.sample_responses(model, tokenizer, prompts, args)
    samples = [{"id": str(j), "prompt": p, "samples": s}
               for j, (p, s) in enumerate(zip(prompts, grouped))]
    sequences = [(module.encode(tokenizer, row["prompt"]), s["token_ids"])
                 for row in samples for s in row["samples"]]
    local = module.batched_logps(model, sequences, tokenizer.pad_token_id, args.score_batch_size,
                                 "reference")
    return dict(name=name, model=model, tokenizer=tokenizer, args=args, samples=samples,
                sequences=sequences, local=local)


def greedy_accuracy(w, model):
    """Greedy replies (the script's sampler) to the 108 held-out questions, read by the truth."""
    module = SCRIPTS[w["name"]][0]
    tests = [(p, k) for p in toy_world.TEST for k in range(4)]
    replies = module.sample_responses(model, w["tokenizer"], [
        toy_world.prompt_text(p, k) for p, k in tests], w["args"], greedy=True)
    return sum(toy_world.is_right(r["response"], p)
               for (r,), (p, _) in zip(replies, tests)) / len(tests)


def pairs_and_batches(w, rewards):
    """Best vs worst by `rewards` through the script's pair builder, and its micro-batches."""
    args, n = w["args"], len(w["samples"][0]["samples"])
    if w["name"] == "scir":
        pairs = scir.best_vs_worst(w["samples"], *(scir.by_prompt(values, n) for values in (
            rewards, w["sequences"], w["local"])))
        return pairs, scir.epoch_batches(pairs, args, 0)
    reward_rows = [{"id": row["id"], "r": rewards[j * n: (j + 1) * n], "tau": 1.0,
                    "logps_t": w["local"][j * n: (j + 1) * n]}
                   for j, row in enumerate(w["samples"])]
    pairs = cream.build_pairs(w["samples"], reward_rows, 1.0, "dataset")  # srlm: C = 1
    examples = [dict(pair, **{f"{side}_sequence": (cream.encode(w["tokenizer"], pair["prompt"]),
                                                   pair[f"{side}_ids"])
                              for side in ("chosen", "rejected")}) for pair in pairs]
    return pairs, [b for epoch in range(args.epochs)
                   for b in cream.micro_batches(examples, args.batch_size, args.seed + epoch)]


def one_iteration(w, swapped, loss_factory):
    """DPO of a copy of the base model on best vs worst by the truth (or its reverse) -> greedy
    accuracy after it."""
    truth = toy_world.truth_of_samples(w["samples"])
    pairs, batches = pairs_and_batches(w, [1.0 - r for r in truth] if swapped else truth)
    assert len(pairs) > 50
    for pair in pairs:  # independent of the pair builder: chosen is right exactly when not swapped
        problem = toy_world.problem_of(pair["prompt"])
        assert toy_world.is_right(pair["chosen"], problem) != swapped
        assert toy_world.is_right(pair["rejected"], problem) == swapped
    model, module = copy.deepcopy(w["model"]), SCRIPTS[w["name"]][0]
    torch.manual_seed(1)
    module.train(model, batches, loss_factory(w["args"], w["tokenizer"]), "lr", w["args"], "DPO")
    return greedy_accuracy(w, model)


def direction_holds(w, loss_factory):
    """Oracle labels raise greedy accuracy and swapped labels lower it, each by MARGIN."""
    before = greedy_accuracy(w, w["model"])
    up = one_iteration(w, False, loss_factory)
    down = one_iteration(w, True, loss_factory)
    print(f"{w['name']}: greedy accuracy {before:.3f}: oracle labels -> {up:.3f}, "
          f"swapped -> {down:.3f}")
    return up >= before + MARGIN and down <= before - MARGIN


def sign_flipped_loss(name):
    """The script's dpo_batch_loss, copied here with one sign flipped: -log sigmoid(-h) in place of
    -log sigmoid(h), h = beta (log ratio of chosen - log ratio of rejected)."""
    def factory(args, tokenizer):
        def loss_fn(model, batch):
            if name == "scir":
                sequences = ([p["sequences"][0] for p in batch]
                             + [p["sequences"][1] for p in batch])
                logps = scir.response_logps(model, sequences, tokenizer.pad_token_id)
            else:
                sequences = ([p["chosen_sequence"] for p in batch]
                             + [p["rejected_sequence"] for p in batch])
                logps = cream.response_logps(model, sequences, tokenizer.pad_token_id)
            chosen, rejected = logps.split(len(batch))
            ref_chosen = torch.tensor([p["ref_chosen_logp"] for p in batch])
            ref_rejected = torch.tensor([p["ref_rejected_logp"] for p in batch])
            h = args.beta * ((chosen - ref_chosen) - (rejected - ref_rejected))
            metrics = {"loss": -F.logsigmoid(-h).mean()}  # the flipped sign
            return (metrics, []) if name == "scir" else metrics  # scir: no detached pass
        return loss_fn
    return factory


@pytest.mark.parametrize("name", ["scir", "cream"])
def test_oracle_labels_raise_accuracy_swapped_labels_lower_it_and_a_sign_flip_is_caught(base,
                                                                                       name):
    w = world(base, name)
    assert direction_holds(w, SCRIPTS[name][0].dpo_batch_loss)
    assert not direction_holds(w, sign_flipped_loss(name))


def test_the_functions_the_oracle_runs_replace_exist_with_these_parameters():
    """tests/tools/toy_world.py's oracle control replaces one ranking function of each script:
    renamed or changed, the oracle run would rank by the method's own reward instead, silently."""
    for name, (hook, parameters) in toy_world.ORACLE_HOOKS.items():
        function = getattr(SCRIPTS[name][0], hook)
        assert list(inspect.signature(function).parameters) == parameters
