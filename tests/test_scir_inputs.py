"""scir.py against bad input and damaged resume state (README, 'Quickstart'), the documented
commands, and Table 2's external-reward-model baseline.

Every bad input must end in one line naming the culprit and a non-zero exit, before any training; a damaged
file of an earlier run must be named together with what to delete. Expected rewards of the external reward model
are recomputed here from its saved weights, one unpadded sequence at a time, with the chat text written by hand.
"""

import errno
import fcntl
import json
import re
import signal
from functools import partial
from pathlib import Path

import pytest
import torch

import prompts
import scir
from conftest import ctrl_c_after_the_closing_line, ROOT, copy_data_files, one_line_error, short_run_argv, tiny_llama

SMALL = ["--iterations", 1, "--num_prompts", 2, "--num_samples", 2, "--max_new_tokens", 4, "--max_length", 700,
         "--sft_epochs", 1, "--judge_pairs", 1, "--sft_examples", 2, "--batch_size", 2, "--grad_accum", 1,
         "--dtype", "float32"]


argv = partial(short_run_argv, SMALL)  # --model, --data_dir, --output_dir (argv[5]), SMALL, extra
error_of = partial(one_line_error, "scir.py")
copy_data = partial(copy_data_files, names=("sft.jsonl", "judge.jsonl", "prompts.jsonl",
                                             "rewardbench.jsonl"))


# ------------------------------------------------------------------------------------------------------------------
# 1. The documented commands: the Instruct run names the paper's global reference (section 4.1: Mistral-7B)
# ------------------------------------------------------------------------------------------------------------------
def documented_commands(text):
    """Lines that run scir.py, with shell continuations joined."""
    return [line for line in text.replace("\\\n", " ").splitlines() if "scir.py" in line and "--model" in line]


def test_documented_instruct_command_names_the_base_model_as_global_reference():
    readme = (ROOT / "README.md").read_text()
    for text in (scir.__doc__, readme):
        instruct = [c for c in documented_commands(text) if "Mistral-7B-Instruct-v0.3 --judge_sft_only" in c]
        assert instruct, "the Instruct command is documented"
        for command in instruct:
            assert re.search(r"--global_reference mistralai/Mistral-7B-v0\.3\b", command), command


def test_instruct_run_against_itself_is_warned_about(capsys):
    scir.parse_args(["--model", "mistralai/Mistral-7B-Instruct-v0.3", "--judge_sft_only"])
    warning = capsys.readouterr().err
    assert "warning" in warning and "--global_reference mistralai/Mistral-7B-v0.3" in warning
    scir.parse_args(["--model", "mistralai/Mistral-7B-Instruct-v0.3", "--judge_sft_only",
                     "--global_reference", "mistralai/Mistral-7B-v0.3"])
    assert capsys.readouterr().err == ""


# ------------------------------------------------------------------------------------------------------------------
# 2. Every flag within its range, checked before anything runs
# ------------------------------------------------------------------------------------------------------------------
BAD_FLAGS = [("--temperature", "0"), ("--temperature", "-1"), ("--top_p", "0"), ("--top_p", "1.5"),
             ("--num_prompts", "0"), ("--batch_size", "-1"), ("--judge_pairs", "0"), ("--lr", "-0.000001"),
             ("--sft_lr", "-1"), ("--lr", "2"), ("--sft_lr", "1e39"), ("--max_grad_norm", "0"), ("--beta", "0"), ("--alpha", "-1"), ("--tau", "1.0"),
             ("--tau", "0.4"), ("--warmup_ratio", "1.0"), ("--warmup_ratio", "-0.1"), ("--lr", "nan"),
             ("--beta", "inf"), ("--seed", "-1"), ("--length_reg", "-0.1"), ("--length_reg_from", "0"),
             ("--max_length", "1"), ("--sft_examples", "-5"), ("--method", "ppo"),
             ("--reward_model", "Skywork/other")]


@pytest.mark.parametrize("flag,value", BAD_FLAGS)
def test_flag_out_of_range_is_refused_naming_it(flag, value, tmp_path):
    message = error_of(lambda: scir.parse_args(["--output_dir", str(tmp_path / "out"), flag, value]))
    assert flag in message


def test_a_baseline_never_shares_the_default_folder_of_scir():
    assert scir.parse_args([]).output_dir == "runs/scir-Mistral-7B-v0.3"
    assert scir.parse_args(["--method", "external"]).output_dir == "runs/scir-external-Mistral-7B-v0.3"
    assert scir.parse_args(["--method", "irm", "--demo"]).output_dir == "runs/scir-irm-demo"


def test_max_length_that_cannot_hold_the_judge_prompt(tiny_model_dir, data_dir, tmp_path):
    message = error_of(lambda: scir.main(argv(tiny_model_dir, data_dir, tmp_path / "out", "--max_length", 120)))
    assert "--max_length 120 cannot hold the judge prompt" in message


def test_a_failed_check_leaves_nothing_that_blocks_the_corrected_rerun(tiny_model_dir, tiny_tokenizer, data_dir,
                                                                      tmp_path):
    """A --max_length that no prompt fits fails before files are written; args.json left by a run that stopped
    before any result does not refuse other settings; one next to a result does."""
    out = tmp_path / "out"
    pointwise = prompts.chat_prompt(tiny_tokenizer, prompts.fill_pointwise("", ""))  # the baselines' judge
    message = error_of(lambda: scir.main(argv(tiny_model_dir, data_dir, out, "--max_length", 20,
                                              "--max_new_tokens", 4, "--method", "irm")))
    assert message.endswith("--max_length 20 cannot hold the judge prompt: its template alone takes "
                            f"{len(tiny_tokenizer(pointwise, add_special_tokens=False).input_ids)} tokens")
    assert not (out / "args.json").exists()
    args = scir.parse_args(argv(tiny_model_dir, data_dir, out))
    (out / "args.json").write_text(json.dumps({"max_length": 20}))
    scir.check_same_settings(out, args, "hash")  # no result yet: takes the new settings
    assert json.loads((out / "args.json").read_text())["max_length"] == 700
    (out / "log.txt").write_text("a user's own notes are no result")
    scir.check_same_settings(out, args, "hash")
    (out / "M0").mkdir()
    args.max_length = 20
    assert "--max_length 700 (now 20)" in error_of(lambda: scir.check_same_settings(out, args, "hash"))


# ------------------------------------------------------------------------------------------------------------------
# 3. Every data file checked before SFT
# ------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,text,culprit", [
    ("sft", '{"prompt": "ok", "response": "ok"}\n{"prompt": "bad \\ud800 text", "response": "ok"}\n',
     "sft.jsonl:2: prompt holds a lone surrogate"),
    ("judge", '{"prompt": "p", "chosen": "same", "rejected": "same"}\n', "judge.jsonl: row 1: chosen and rejected"),
    ("judge", '{"prompt": "p", "chosen": "a", "rejected": " "}\n', "judge.jsonl:1: empty rejected"),
    ("sft", '{"prompt": "p", "response": ""}\n', "sft.jsonl:1: empty response"),
])
def test_bad_data_rows_are_named(name, text, culprit, tiny_model_dir, data_dir, tmp_path):
    data = copy_data(data_dir, tmp_path / "data", **{name: text})
    message = error_of(lambda: scir.main(argv(tiny_model_dir, data, tmp_path / "out")))
    assert culprit in message
    assert not (tmp_path / "out" / "M0").exists()


def test_reward_bench_row_with_an_empty_side_is_named(tiny_model_dir, data_dir, tmp_path):
    data = copy_data(data_dir, tmp_path / "data",
                     rewardbench='{"prompt": "p", "chosen": "", "rejected": "b", "subset": "math-prm"}\n')
    message = error_of(lambda: scir.main(argv(tiny_model_dir, data, tmp_path / "out", "--eval_reward_bench")))
    assert "rewardbench.jsonl:1: empty chosen" in message


# ------------------------------------------------------------------------------------------------------------------
# 4. Model and tokenizer checked before SFT
# ------------------------------------------------------------------------------------------------------------------
def test_tokenizer_larger_than_the_embedding_is_refused(tiny_tokenizer, data_dir, tmp_path):
    small = tiny_llama(tiny_tokenizer, tmp_path / "small", vocab_size=len(tiny_tokenizer) - 10)
    message = error_of(lambda: scir.main(argv(small, data_dir, tmp_path / "out")))
    assert f"--model '{small}' embeds {len(tiny_tokenizer) - 10} tokens" in message


def test_global_reference_checked_before_sft(tiny_model_dir, tiny_tokenizer, data_dir, tmp_path):
    small = tiny_llama(tiny_tokenizer, tmp_path / "small", vocab_size=len(tiny_tokenizer) - 10)
    message = error_of(lambda: scir.main(argv(tiny_model_dir, data_dir, tmp_path / "a", "--global_reference", small)))
    assert "--global_reference" in message and "embeds" in message
    damaged = tiny_llama(tiny_tokenizer, tmp_path / "damaged", drop="model.layers.1.mlp.up_proj.weight")
    message = error_of(lambda: scir.main(argv(tiny_model_dir, data_dir, tmp_path / "b", "--global_reference",
                                              damaged)))
    assert "lacks 1 weights, model.layers.1.mlp.up_proj.weight" in message
    assert not (tmp_path / "b" / "M0").exists()  # stopped before SFT


def test_checkpoint_with_missing_weights_is_refused(tiny_tokenizer, data_dir, tmp_path):
    damaged = tiny_llama(tiny_tokenizer, tmp_path / "damaged", drop="model.norm.weight")
    message = error_of(lambda: scir.main(argv(damaged, data_dir, tmp_path / "out")))
    assert str(damaged) in message and "lacks 1 weights, model.norm.weight" in message
    assert not (tmp_path / "out" / "M0").exists()


# ------------------------------------------------------------------------------------------------------------------
# 5. NaN never saved
# ------------------------------------------------------------------------------------------------------------------
def test_weights_made_non_finite_by_the_only_step_are_not_saved(monkeypatch, tiny_model_dir, data_dir, tmp_path):
    """An update that overflows one weight in the last (here the only) optimizer step is seen by no loss; the
    check of the weights before save_pretrained stops the run."""
    real_step = scir.adamw_step

    def overflowing_step(params, state, lr, **kwargs):
        real_step(params, state, lr, **kwargs)
        with torch.no_grad():
            params[-1].view(-1)[0] = float("inf")
    monkeypatch.setattr(scir, "adamw_step", overflowing_step)
    out = tmp_path / "out"
    message = error_of(lambda: scir.main(argv(tiny_model_dir, data_dir, out, "--grad_accum", 100)))
    assert "SFT -> M0: the weights became non-finite with --sft_lr 1e-06; nothing was saved" in message
    assert not (out / "M0").exists() and not (out / "M0.tmp").exists()


def test_non_finite_loss_and_gradients_stop_training(monkeypatch, tiny_model_dir, data_dir, tmp_path):
    real_loss = scir.sft_loss

    def nan_loss(model, batch):
        return {"loss": real_loss(model, batch)[0]["loss"] * float("nan")}, []

    def nan_gradient(model, batch):  # sqrt at 0: the value stays finite, its derivative does not
        weight = model.lm_head.weight.view(-1)[0]
        return {"loss": real_loss(model, batch)[0]["loss"] + (weight * 0).abs().sqrt()}, []
    for loss_fn, what, out in ((nan_loss, "the loss became nan at micro-batch 0", "a"),
                               (nan_gradient, "the gradients became non-finite at micro-batch 0", "b")):
        monkeypatch.setattr(scir, "sft_loss", loss_fn)
        message = error_of(lambda: scir.main(argv(tiny_model_dir, data_dir, tmp_path / out)))
        assert f"SFT -> M0: {what} with --sft_lr 1e-06; nothing was saved" in message
        assert not (tmp_path / out / "M0").exists()


# ------------------------------------------------------------------------------------------------------------------
# 6. Damaged resume state: the error names the file and what to delete
# ------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def finished(tiny_model_dir, data_dir, tmp_path_factory):
    """A finished one-iteration run, and its command (run in-process)."""
    root = tmp_path_factory.mktemp("resume")
    data = copy_data(data_dir, root / "data")
    command = argv(tiny_model_dir, data, root / "run")
    scir.main(command)
    return root / "run", data, command


def damaged_copy(finished, tmp_path, edit):
    """The finished run copied, then edited: the same command resumes it (the output folder is argv[5])."""
    import shutil

    out, data, command = finished
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    edit(copy, data)
    return copy, [*command[:5], str(copy), *command[6:]]


@pytest.mark.parametrize("case,culprit", [
    ("cut_jsonl", "iter1/samples.jsonl:2 is damaged (not a JSON object): delete it"),
    ("emptied_model", "M1 is incomplete or damaged: delete it"),
    ("args_cut", "args.json is damaged, so the settings that made the results"),
    ("args_not_object", "args.json is damaged, so the settings that made the results"),
    ("args_deleted", "args.json is missing, and"),
    ("samples_of_other_prompts", "iter1/samples.jsonl does not match this run's data or its earlier steps: delete"),
])
def test_damaged_resume_state_is_named(case, culprit, finished, tmp_path):
    def edit(run, data):
        if case == "cut_jsonl":
            text = (run / "iter1" / "samples.jsonl").read_text()
            (run / "iter1" / "samples.jsonl").write_text(text[: len(text.splitlines()[0]) + 30])
        elif case == "emptied_model":
            for f in (run / "M1").iterdir():
                f.unlink()
        elif case == "args_deleted":  # deleting it is no fresh start: other settings would mix in
            (run / "args.json").unlink()
        elif case == "args_cut":
            (run / "args.json").write_text((run / "args.json").read_text()[:40])
        elif case == "args_not_object":
            (run / "args.json").write_text("[1, 2]")
        else:
            rows = [json.loads(line) for line in (run / "iter1" / "samples.jsonl").read_text().splitlines()]
            rows[0]["prompt"] = "a prompt this run never drew"
            (run / "iter1" / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    run, command = damaged_copy(finished, tmp_path, edit)
    message = error_of(lambda: scir.main(command))
    assert str(run / culprit.split(" ")[0]) in message and culprit.split(" ", 1)[1] in message


def test_rerun_on_edited_data_is_refused(finished, tmp_path):
    out, data, command = finished
    edited = copy_data(data, tmp_path / "data")
    with open(edited / "prompts.jsonl", "a") as f:
        f.write('{"prompt": "A prompt added after the run."}\n')
    message = error_of(lambda: scir.main([*command[:3], str(edited), *command[4:]]))
    assert "the data files changed" in message


def test_unchanged_rerun_resumes(finished):
    out, _, command = finished
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    scir.main(command)
    after = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    assert {p for p in before if before[p] != after[p]} <= {out / "args.json", out / "metrics.jsonl",
                                                              out / "table.md"}


# ------------------------------------------------------------------------------------------------------------------
# 7. The output folder: not a folder, a full disk, a second run at the same time, Ctrl-C
# ------------------------------------------------------------------------------------------------------------------
def test_output_dir_inside_a_file(tiny_model_dir, data_dir, tmp_path):
    (tmp_path / "file").write_text("x")
    message = error_of(lambda: scir.main(argv(tiny_model_dir, data_dir, tmp_path / "file" / "out")))
    assert str(tmp_path / "file") in message


def test_full_disk_is_one_line(monkeypatch, tiny_model_dir, data_dir, tmp_path):
    def no_space(path, rows):
        raise OSError(errno.ENOSPC, "No space left on device", f"{path}.tmp")
    monkeypatch.setattr(scir, "write_jsonl", no_space)
    message = error_of(lambda: scir.main(argv(tiny_model_dir, data_dir, tmp_path / "out")))
    assert "samples.jsonl.tmp: No space left on device" in message and "resume" in message


def test_second_run_on_the_same_folder_is_refused(tiny_model_dir, data_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    with open(out / ".lock", "w") as lock:  # what a running scir.py holds
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        message = error_of(lambda: scir.main(argv(tiny_model_dir, data_dir, out)))
    assert f"another run is using {out}" in message
    assert not (out / "args.json").exists()


def test_ctrl_c_ends_in_one_line(start_script, tiny_model_dir, data_dir, tmp_path):
    """Ctrl-C mid-run: the message is the last line, after the progress bar it cut short (a bar
    left open would close when the exit frees its frames, after the message)."""
    out = tmp_path / "out"
    run = start_script("scir.py", *argv(tiny_model_dir, data_dir, out, "--sft_epochs", 200), timeout=240)
    assert run.wait_for("SFT -> M0:")  # SFT is under way, its bar drawn
    run.proc.send_signal(signal.SIGINT)
    result = run.result()
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last == "scir.py: error: interrupted; rerun the same command to resume where it stopped"


def test_ctrl_c_after_the_last_file_is_written_is_ignored(start_script, tiny_model_dir, data_dir, tmp_path):
    ctrl_c_after_the_closing_line(start_script, "scir.py", argv(tiny_model_dir, data_dir, tmp_path / "out"),
                                  "models, samples, pairs, metrics.jsonl and table.md are in")


# ------------------------------------------------------------------------------------------------------------------
# 8. Table 2's external reward model: its own chat template, best vs worst of its rewards
# ------------------------------------------------------------------------------------------------------------------
CHAT_TEMPLATE = "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"


@pytest.fixture(scope="module")
def reward_model_dir(tiny_model_dir, tmp_path_factory):
    """A tiny random Llama reward model (one score) with a chat template of its own."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    folder = tmp_path_factory.mktemp("reward-model")
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.chat_template = CHAT_TEMPLATE
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, num_labels=1)
    torch.manual_seed(1)
    LlamaForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_external_baseline_pairs_best_and_worst_reward(reward_model_dir, tiny_model_dir, data_dir, tmp_path,
                                                      run_script):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    out = tmp_path / "out"
    result = run_script("scir.py", *argv(tiny_model_dir, data_dir, out, "--method", "external", "--reward_model",
                                         reward_model_dir, "--num_prompts", 3, "--num_samples", 3,
                                         "--max_new_tokens", 8, "--score_batch_size", 4))
    assert result.returncode == 0, result.stderr[-3000:]
    samples = [json.loads(line) for line in (out / "iter1" / "samples.jsonl").read_text().splitlines()]
    stored = [json.loads(line) for line in (out / "iter1" / "rewards_external.jsonl").read_text().splitlines()]
    pairs = {p["id"]: p for p in map(json.loads, (out / "iter1" / "pairs.jsonl").read_text().splitlines())}
    tokenizer = AutoTokenizer.from_pretrained(reward_model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(reward_model_dir, dtype=torch.float32).eval()
    lengths = set()
    for row, scored in zip(samples, stored):
        expected = []
        for s in row["samples"]:  # the chat text by hand, one unpadded sequence, the score head on its last token
            text = f"<s>user: {row['prompt']}</s><s>assistant: {s['response']}</s>"
            ids = torch.tensor([tokenizer(text, add_special_tokens=False).input_ids])
            lengths.add(ids.shape[1])
            with torch.no_grad():
                expected.append(model.score(model.model(ids).last_hidden_state[0, -1]).item())
        assert scored["rewards"] == pytest.approx(expected, abs=1e-4)
        best, worst = max(range(3), key=expected.__getitem__), min(range(3), key=expected.__getitem__)
        assert pairs[row["id"]]["chosen"] == row["samples"][best]["response"]
        assert pairs[row["id"]]["rejected"] == row["samples"][worst]["response"]
    assert len(lengths) > 1  # the batches were padded
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert metrics[1]["pairs"] == 3 and "External Reward Model" in (out / "table.md").read_text()


def test_causal_lm_as_reward_model_is_refused_before_sft(tiny_model_dir, data_dir, tmp_path):
    from transformers import AutoTokenizer

    folder = tmp_path / "causal-lm"
    folder.mkdir()
    for f in Path(tiny_model_dir).iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(folder)
    message = error_of(lambda: scir.main(argv(tiny_model_dir, data_dir, tmp_path / "out", "--method", "external",
                                              "--reward_model", folder)))
    assert f"--reward_model '{folder}' is not a reward model" in message
    assert not (tmp_path / "out" / "M0").exists()


def test_reward_model_without_a_chat_template_is_refused_before_sft(tiny_model_dir, data_dir, tmp_path):
    message = error_of(lambda: scir.main(argv(tiny_model_dir, data_dir, tmp_path / "out", "--method", "external",
                                              "--reward_model", tiny_model_dir)))
    assert "--reward_model" in message and "no chat template" in message
    assert not (tmp_path / "out" / "M0").exists()


def test_a_flag_written_out_wins_even_when_it_repeats_the_default():
    """--judge_sft_only sets 1 epoch at lr 1e-7 (section 4.1) unless the command line says otherwise, also when
    it says the plain default: --sft_epochs 5 trains 5 epochs."""
    args = scir.parse_args(["--judge_sft_only", "--global_reference", "base", "--sft_epochs", "5",
                            "--sft_lr=1e-6"])
    assert (args.sft_epochs, args.sft_lr, args.length_reg_from) == (5, 1e-6, 2)
    args = scir.parse_args(["--demo", "--iterations", "3", "--lr", "5e-7"])
    assert (args.iterations, args.lr, args.num_prompts) == (3, 5e-7, 8)
    error_of(lambda: scir.parse_args(["--reward_model", "Skywork/Skywork-Reward-Llama-3.1-8B"]))
