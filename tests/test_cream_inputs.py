"""cream.py against bad input and damaged resume state (README, 'Quickstart'; scir.py's:
test_scir_inputs.py).

Every bad input must end in one line naming the culprit and a non-zero exit, before any training;
a damaged file of an earlier run must be named together with what to delete.
"""

import errno
import fcntl
import json
import random
import shutil
import signal
from dataclasses import fields
from functools import partial

import pytest
import torch

import cream
from conftest import ctrl_c_after_the_closing_line, copy_data_files, one_line_error, short_run_argv, tiny_llama

# learning rates large enough that the tiny model moves: distinct rewards, so iteration 1 has pairs
SMALL = ["--iterations", 1, "--num_prompts", 2, "--num_samples", 2, "--max_new_tokens", 4,
         "--max_length", 160, "--sft_epochs", 1, "--batch_size", 2, "--grad_accum", 1,
         "--dtype", "float32", "--sft_lr", 3e-3, "--lr", 3e-4]
# eval.jsonl for --evaluate: one question of a choice task, one of GSM8K
EVAL_ROWS = [{"task": "arc_easy", "prompt": "Which one is a color?\nA. red\nB. dog\nC. seven",
              "answer": "A"},
             {"task": "gsm8k", "prompt": "What is 10 minus 4?", "answer": "6"}]


argv = partial(short_run_argv, SMALL)  # --model, --data_dir, --output_dir (argv[5]), SMALL, extra
error_of = partial(one_line_error, "cream.py")
# the tiny data folder's sft.jsonl and prompts.jsonl, and eval.jsonl of EVAL_ROWS
copy_data = partial(copy_data_files, names=("sft.jsonl", "prompts.jsonl"),
                    eval="".join(json.dumps(row) + "\n" for row in EVAL_ROWS))


# ------------------------------------------------------------------------------------------------
# 2. Every flag within its range, checked before anything runs
# ------------------------------------------------------------------------------------------------
BAD_FLAGS = [("--temperature", "0"), ("--temperature", "-1"), ("--top_p", "0"), ("--top_p", "1.5"),
             ("--iterations", "0"), ("--num_prompts", "0"), ("--num_samples", "1"),
             ("--max_new_tokens", "0"), ("--batch_size", "-1"), ("--grad_accum", "0"),
             ("--epochs", "0"), ("--score_batch_size", "0"), ("--sft_epochs", "-1"),
             ("--lr", "-0.000001"), ("--sft_lr", "-1"), ("--lr", "2"), ("--sft_lr", "1e39"),
             ("--max_grad_norm", "0"), ("--beta", "0"), ("--warmup_ratio", "1.0"),
             ("--warmup_ratio", "-0.1"), ("--lr", "nan"), ("--beta", "inf"), ("--seed", "-1"),
             ("--max_length", "1"), ("--eval_limit", "0"), ("--method", "ppo")]


@pytest.mark.parametrize("flag,value", BAD_FLAGS)
def test_flag_out_of_range_is_refused_naming_it(flag, value, tmp_path):
    out = tmp_path / "out"
    message = error_of(lambda: cream.parse_args(["--output_dir", str(out), flag, value]))
    assert flag in message
    assert not out.exists()


def test_range_edges_are_accepted():
    args = cream.parse_args(["--top_p", "1", "--warmup_ratio", "0", "--sft_lr", "1", "--lr", "0",
                             "--seed", "0", "--num_samples", "2", "--eval_limit", "1",
                             "--max_length", "2", "--max_new_tokens", "1"])
    assert (args.top_p, args.warmup_ratio, args.sft_lr, args.lr, args.max_length) == (1, 0, 1, 0, 2)


@pytest.mark.parametrize("value,valid,expected", [
    (0, "[1,inf)", "at least 1"), (1, "[1,inf)", None), (0.0, "(0,inf)", "above 0"),
    (1e-9, "(0,inf)", None), (1.5, "(0,1]", "in (0, 1]"), (1.0, "(0,1]", None),
    (0.0, "(0,1]", "in (0, 1]"), (1.0, "[0,1)", "in [0, 1)"), (0.0, "[0,1)", None),
    (float("nan"), "[0,1]", "a finite number"), (float("inf"), "(0,inf)", "a finite number"),
    ("ppo", "{cream,srlm,p-srlm}", "cream, srlm or p-srlm"), ("srlm", "{cream,srlm,p-srlm}", None),
    ("x", "{dataset,pair}", "dataset or pair")])
def test_must_be_names_the_valid_values(value, valid, expected):
    assert cream.must_be(value, valid) == expected


@pytest.mark.parametrize("flag,value,expected", [
    ("--method", "ppo", "--method must be cream, srlm or p-srlm, got 'ppo'"),
    ("--num_samples", "1", "--num_samples must be at least 2, got 1"),
    ("--temperature", "0", "--temperature must be above 0, got 0.0"),
    ("--lr", "2", "--lr must be in [0, 1], got 2.0"),
    ("--top_p", "1.5", "--top_p must be in (0, 1], got 1.5"),
    ("--beta", "inf", "--beta must be a finite number, got inf")])
def test_flag_errors_say_what_the_flag_must_be(flag, value, expected):
    assert error_of(lambda: cream.parse_args([flag, value])) == f"cream.py: error: {expected}"


def test_every_range_is_shown_by_help(capsys):
    with pytest.raises(SystemExit):
        cream.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for field in fields(cream.Args):
        valid = field.metadata.get("metavar")
        assert valid is None or f"--{field.name} {valid}" in text


def test_grad_accum_must_split_evenly_over_the_processes(monkeypatch):
    monkeypatch.setattr(cream, "rank_and_world", lambda: (0, 2))  # rank 0 of a torchrun of 2
    assert cream.parse_args(["--grad_accum", "4"]).grad_accum == 4
    message = error_of(lambda: cream.parse_args(["--grad_accum", "3"]))
    assert message == ("cream.py: error: --grad_accum 3 must be a multiple of the 2 processes "
                       "(each takes the same share of a step)")


def test_a_failed_check_leaves_nothing_that_blocks_the_corrected_rerun(tiny_model_dir, data_dir,
                                                                        tmp_path, capsys):
    """A --max_length that no prompt fits fails before files are written; args.json left by a run
    that stopped before any result does not refuse other settings; one next to a result does."""
    out = tmp_path / "out"
    message = error_of(lambda: cream.main(argv(tiny_model_dir, data_dir, out, "--max_length", 14,
                                               "--num_prompts", 100)))
    assert "every prompt of iteration 1 is longer than --max_length - --max_new_tokens" in message
    note = "note: 10 prompts for 1 x 100: each iteration gets 10"  # conftest's 10 prompts
    assert note in capsys.readouterr().out
    assert not (out / "args.json").exists()
    args = cream.parse_args(argv(tiny_model_dir, data_dir, out))
    (out / "args.json").write_text(json.dumps({"max_length": 14}))
    cream.check_same_settings(out, args, "hash")  # no result yet: takes the new settings
    assert json.loads((out / "args.json").read_text())["max_length"] == 160
    (out / "M1").mkdir()
    args.max_length = 14
    message = error_of(lambda: cream.check_same_settings(out, args, "hash"))
    assert "--max_length 160 (now 14)" in message


def test_a_later_iteration_without_a_usable_prompt_fails_before_sft(tiny_model_dir, data_dir,
                                                                    tmp_path):
    """Every iteration's pool is built before args.json: a long prompt that the shuffle gives to
    iteration 2 stops the run before M1 is trained."""
    short, long = "What is 2 + 3?", "Describe the fox. " * 40

    def shuffled(seed):  # as --seed shuffles prompts.jsonl
        rows = [short, long]
        random.Random(seed).shuffle(rows)
        return rows
    seed = next(s for s in range(100) if shuffled(s) == [short, long])  # 1 prompt per iteration
    prompts = json.dumps({"prompt": short}) + "\n" + json.dumps({"prompt": long}) + "\n"
    data = copy_data(data_dir, tmp_path / "data", prompts=prompts)
    out = tmp_path / "out"
    message = error_of(lambda: cream.main(argv(tiny_model_dir, data, out, "--iterations", 2,
                                               "--num_prompts", 1, "--seed", seed)))
    assert "every prompt of iteration 2 is longer than --max_length - --max_new_tokens" in message
    assert not (out / "args.json").exists() and not (out / "M1").exists()


# ------------------------------------------------------------------------------------------------
# 3. Every data file checked before SFT
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,text,culprit", [
    ("sft", '{"prompt": "ok", "response": "ok"}\n{"prompt": "bad \\ud800", "response": "ok"}\n',
     "sft.jsonl:2: prompt holds a lone surrogate"),
    ("prompts", '{"prompt": "ok"}\n{"prompt": "\\udfff"}\n',
     "prompts.jsonl:2: prompt holds a lone surrogate"),
    ("sft", '{"prompt": "p", "response": ""}\n', "sft.jsonl:1: empty response"),
    ("prompts", '{"prompt": " "}\n', "prompts.jsonl:1: empty prompt"),
    ("eval", '{"task": "gsm8k", "prompt": "What is 1 + 1?", "answer": " "}\n',
     "eval.jsonl:1: empty answer"),
    ("eval", '{"task": "", "prompt": "What is 1 + 1?", "answer": "2"}\n',
     "eval.jsonl:1: empty task"),
])
def test_bad_data_rows_are_named(name, text, culprit, tiny_model_dir, data_dir, tmp_path):
    data = copy_data(data_dir, tmp_path / "data", **{name: text})
    out = tmp_path / "out"
    message = error_of(lambda: cream.main(argv(tiny_model_dir, data, out, "--evaluate")))
    assert culprit in message
    assert not (out / "M1").exists()


def test_eval_question_too_long_is_named_before_sft(tiny_model_dir, tiny_tokenizer, data_dir,
                                                    tmp_path):
    rows = [*EVAL_ROWS, {"task": "gsm8k", "prompt": "How many foxes? " * 60, "answer": "3"}]
    text = "".join(json.dumps(row) + "\n" for row in rows)
    data = copy_data(data_dir, tmp_path / "data", eval=text)
    out = tmp_path / "out"
    message = error_of(lambda: cream.main(argv(tiny_model_dir, data, out, "--evaluate")))
    assert ("eval.jsonl: row 3 (task gsm8k): the question is longer than --max_length - --max_new_tokens"
            in message)
    assert not (out / "args.json").exists() and not (out / "M1").exists()
    # with --eval_limit 1 the long question, the second of its task, is never scored: no error
    args = cream.parse_args(argv(tiny_model_dir, data, out, "--evaluate", "--eval_limit", 1))
    assert cream.eval_questions(tiny_tokenizer, rows, args) == EVAL_ROWS  # each task's first


# ------------------------------------------------------------------------------------------------
# 4. Model and tokenizer checked before SFT
# ------------------------------------------------------------------------------------------------
def test_tokenizer_larger_than_the_embedding_is_refused(tiny_tokenizer, data_dir, tmp_path):
    small = tiny_llama(tiny_tokenizer, tmp_path / "small", vocab_size=len(tiny_tokenizer) - 10)
    message = error_of(lambda: cream.main(argv(small, data_dir, tmp_path / "out")))
    assert f"--model '{small}' embeds {len(tiny_tokenizer) - 10} tokens" in message
    assert not (tmp_path / "out" / "args.json").exists()


def test_checkpoint_with_missing_weights_is_refused(tiny_tokenizer, data_dir, tmp_path):
    damaged = tiny_llama(tiny_tokenizer, tmp_path / "damaged", drop="model.norm.weight")
    message = error_of(lambda: cream.main(argv(damaged, data_dir, tmp_path / "out")))
    assert str(damaged) in message and "lacks 1 weights, model.norm.weight among them" in message
    assert not (tmp_path / "out" / "M1").exists()


# ------------------------------------------------------------------------------------------------
# 5. NaN never saved
# ------------------------------------------------------------------------------------------------
def test_weights_made_non_finite_by_the_only_step_are_not_saved(monkeypatch, tiny_model_dir,
                                                                data_dir, tmp_path):
    """An update that overflows one weight in the last (here the only) optimizer step is seen by
    no loss; the check of the weights before save_pretrained stops the run."""
    real_step = cream.adamw_step

    def overflowing_step(params, state, lr, **kwargs):
        real_step(params, state, lr, **kwargs)
        with torch.no_grad():
            params[-1].view(-1)[0] = float("inf")
    monkeypatch.setattr(cream, "adamw_step", overflowing_step)
    out = tmp_path / "out"
    message = error_of(lambda: cream.main(argv(tiny_model_dir, data_dir, out, "--grad_accum", 100)))
    assert ("SFT M0 -> M1: the weights became non-finite with --sft_lr 0.003; nothing was saved, "
            "and the models before it are intact") in message
    assert not (out / "M1").exists() and not (out / "M1.tmp").exists()


def test_train_stops_on_non_finite_gradients_before_the_step(tiny_model):
    """d sqrt(u)/du at u = 0 is inf, times du/dw = 0: NaN gradients from a finite loss (0), so
    no weight may move."""
    args = cream.Args(grad_accum=1, sft_lr=0.5)
    before = [p.detach().clone() for p in tiny_model.parameters()]

    def loss_fn(model, batch):
        return {"loss": (next(model.parameters()) * 0).square().sum().sqrt()}
    message = error_of(lambda: cream.train(tiny_model, ["only"], loss_fn, "sft_lr", args, "SFT x"))
    assert message.endswith("SFT x: the gradients became non-finite at micro-batch 0 with --sft_lr "
                            "0.5; nothing was saved, and the models before it are intact (README)")
    assert all(torch.equal(a, b) for a, b in zip(before, tiny_model.parameters()))


def test_check_ids_hand_cases():
    expected = [{"id": "1-0", "prompt": "a"}, {"id": "1-1", "prompt": "b"}]
    cream.check_ids("f.jsonl", [{"id": "1-0", "x": 1}, {"id": "1-1"}], expected)
    cream.check_ids("f.jsonl", [dict(row) for row in expected], expected, keys=("id", "prompt"))
    stale = ([{"id": "1-1"}, {"id": "1-0"}], [{"id": "1-0"}], [{"prompt": "a"}, {"id": "1-1"}],
             [{"id": "1-0"}, {"id": "1-1"}, {"id": "1-2"}])
    for rows in stale:
        message = error_of(lambda: cream.check_ids("f.jsonl", rows, expected))
        assert message.endswith("f.jsonl does not match this run's data or its earlier steps: "
                                "delete it to recompute")
    other = [{"id": "1-0", "prompt": "a"}, {"id": "1-1", "prompt": "c"}]
    error_of(lambda: cream.check_ids("f.jsonl", other, expected, keys=("id", "prompt")))


# ------------------------------------------------------------------------------------------------
# 6. Damaged resume state: the error names the file and what to delete
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def finished(tiny_model_dir, data_dir, tmp_path_factory):
    """A finished one-iteration run with --evaluate, and its command (run in-process)."""
    root = tmp_path_factory.mktemp("resume")
    data = copy_data(data_dir, root / "data")
    command = argv(tiny_model_dir, data, root / "run", "--evaluate")
    cream.main(command)
    return root / "run", data, command


def edit_rows(path, change):
    """Rewrite a JSONL file with change(rows) applied."""
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    change(rows)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def damage(case, run):
    """Damage the copy of a finished run as `case` says."""
    samples = run / "iter1" / "samples.jsonl"
    if case == "cut_jsonl":
        text = samples.read_text()
        samples.write_text(text[: len(text.splitlines()[0]) + 30])
    elif case == "emptied_model":
        for f in (run / "M2").iterdir():
            f.unlink()
    elif case == "args_deleted":  # deleting it is no fresh start: other settings would mix in
        (run / "args.json").unlink()
    elif case == "args_cut":
        (run / "args.json").write_text((run / "args.json").read_text()[:40])
    elif case == "args_not_object":
        (run / "args.json").write_text("[1, 2]")
    elif case == "samples_of_other_prompts":
        edit_rows(samples, lambda rows: rows[0].update(prompt="a prompt this run never drew"))
    elif case == "rewards_of_other_samples":
        edit_rows(run / "iter1" / "rewards.jsonl", lambda rows: rows.reverse())
    elif case == "other_pairs":
        edit_rows(run / "iter1" / "pairs.jsonl", lambda rows: rows[0].update(chosen="other"))
    else:  # M1's replies to other questions
        edit_rows(run / "eval" / "M1-greedy.jsonl", lambda rows: rows[1].update(prompt="What is 9 - 4?"))


STALE = "does not match this run's data or its earlier steps: delete it to recompute"


@pytest.mark.parametrize("case,culprit", [
    ("cut_jsonl", "iter1/samples.jsonl:2 is damaged (not a JSON object): delete it to recompute"),
    ("emptied_model", "M2 is incomplete or damaged: delete it, and rerun to redo it"),
    ("args_cut", "args.json is damaged, so the settings that made the results"),
    ("args_not_object", "args.json is damaged, so the settings that made the results"),
    ("args_deleted", "args.json is missing, and"),
    ("samples_of_other_prompts", f"iter1/samples.jsonl {STALE}"),
    ("rewards_of_other_samples", f"iter1/rewards.jsonl {STALE}"),
    ("other_pairs", f"iter1/pairs.jsonl {STALE}"),
    ("eval_of_other_questions", f"eval/M1-greedy.jsonl {STALE}"),
])
def test_damaged_resume_state_is_named(case, culprit, finished, tmp_path):
    out, _, command = finished
    run = tmp_path / "run"
    shutil.copytree(out, run)
    damage(case, run)
    message = error_of(lambda: cream.main([*command[:5], str(run), *command[6:]]))  # argv[5]: out
    assert str(run / culprit.split(" ")[0]) in message and culprit.split(" ", 1)[1] in message


def test_rerun_on_edited_data_is_refused(finished, tmp_path):
    out, data, command = finished
    edited = tmp_path / "data"
    shutil.copytree(data, edited)
    with open(edited / "prompts.jsonl", "a") as f:
        f.write('{"prompt": "A prompt added after the run."}\n')
    message = error_of(lambda: cream.main([*command[:3], str(edited), *command[4:]]))
    assert "the data files changed" in message


def test_unchanged_rerun_resumes(finished):
    out, _, command = finished
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    cream.main(command)
    after = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    assert set(after) == set(before)
    rewritten = {out / name for name in ("args.json", "metrics.jsonl", "table.md",
                                         "evaluation.jsonl")}
    assert {p for p in before if before[p] != after[p]} <= rewritten


# ------------------------------------------------------------------------------------------------
# 7. The output folder: not a folder, a full disk, a second run at the same time, Ctrl-C
# ------------------------------------------------------------------------------------------------
def test_output_dir_inside_a_file(tiny_model_dir, data_dir, tmp_path):
    (tmp_path / "file").write_text("x")
    out = tmp_path / "file" / "out"
    message = error_of(lambda: cream.main(argv(tiny_model_dir, data_dir, out)))
    assert str(tmp_path / "file") in message


def test_full_disk_is_one_line(monkeypatch, tiny_model_dir, data_dir, tmp_path):
    def no_space(path, rows):
        raise OSError(errno.ENOSPC, "No space left on device", f"{path}.tmp")
    monkeypatch.setattr(cream, "write_jsonl", no_space)
    message = error_of(lambda: cream.main(argv(tiny_model_dir, data_dir, tmp_path / "out")))
    assert "samples.jsonl.tmp: No space left on device" in message and "resume" in message


def test_second_run_on_the_same_folder_is_refused(tiny_model_dir, data_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    with open(out / ".lock", "w") as lock:  # what a running cream.py holds
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        message = error_of(lambda: cream.main(argv(tiny_model_dir, data_dir, out)))
    assert f"another run is using {out}" in message
    assert not (out / "args.json").exists()


def test_p_srlm_judge_template_longer_than_max_length_is_refused(tiny_model_dir, data_dir, tmp_path):
    """P-SRLM's Table 6 template (about 420 tokens with the tiny tokenizer) cannot fit
    --max_length 160: one line before any training, as scir.py's check_models says it."""
    out = tmp_path / "out"
    message = error_of(lambda: cream.main(argv(tiny_model_dir, data_dir, out, "--method", "p-srlm")))
    assert "--max_length 160 cannot hold the judge prompt" in message
    assert not (out / "M1").exists()


def test_ctrl_c_ends_in_one_line(start_script, tiny_model_dir, data_dir, tmp_path):
    """Ctrl-C mid-run: the message is the last line, after the progress bar it cut short (a bar
    left open would close when the exit frees its frames, after the message)."""
    out = tmp_path / "out"
    run = start_script("cream.py", *argv(tiny_model_dir, data_dir, out, "--sft_epochs", 200), timeout=240)
    assert run.wait_for("SFT M0 -> M1:")  # SFT is under way, its bar drawn
    run.proc.send_signal(signal.SIGINT)
    result = run.result()
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last == "cream.py: error: interrupted; rerun the same command to resume where it stopped"
    assert not (out / "M1").exists()


def test_ctrl_c_after_the_last_file_is_written_is_ignored(start_script, tiny_model_dir, data_dir, tmp_path):
    ctrl_c_after_the_closing_line(start_script, "cream.py", argv(tiny_model_dir, data_dir, tmp_path / "out"),
                                  "models, samples, rewards, pairs, metrics.jsonl and table.md are in")


def test_a_flag_written_out_wins_even_when_it_repeats_the_default():
    """--demo's settings fill in only what the command line leaves out, also when it writes the default."""
    args = cream.parse_args(["--demo", "--lr", "1e-6", "--sft_lr=1e-6"])
    assert (args.lr, args.sft_lr, args.num_prompts) == (1e-6, 1e-6, 12)
