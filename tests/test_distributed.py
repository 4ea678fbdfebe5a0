"""Several processes (torchrun, gloo on CPU) against one: the same training step, the same run.

The official CREAM code's DPO never synchronised its gradients across GPUs (README, 'Defects of
public implementations': CREAM #1): the unsynced variant below reproduces that and must fail the
comparison that FSDP2 passes.
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import distributed_step
from conftest import ROOT, TOOLS

STEP = TOOLS / "distributed_step.py"


def torchrun(*args, processes=2, timeout=300):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node", str(processes), *map(str, args)]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env=offline())


def offline():
    import os

    return dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1",
                TOKENIZERS_PARALLELISM="false")


def one_process(*args):
    return subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env=offline())


@pytest.mark.parametrize("script, loss, micro_batches", [
    ("cream", "sft", 4), ("cream", "dpo", 5), ("scir", "scir", 4)])
def test_a_training_step_under_fsdp2_matches_one_process(tmp_path, script, loss, micro_batches):
    """4 micro-batches make one optimizer step (grad_accum 4); 5 make a second step of one
    micro-batch, which rank 1 pads with a zero-weight repeat. SCIR's step runs two backward
    passes per micro-batch (policy, then judge) through the sharded model."""
    flags = ["--script", script, "--loss", loss, "--micro_batches", str(micro_batches),
             "--work", str(tmp_path / "work")]
    distributed_step.main([*flags, "--out", str(tmp_path / "one.pt")])  # one process, here
    two = torchrun(STEP, *flags, "--out", tmp_path / "two.pt")
    assert two.returncode == 0, two.stderr[-3000:]
    if loss == "dpo":  # the official CREAM code's DPO, unsynchronised: it must fail the check
        unsynced = torchrun(STEP, *flags, "--unsynced", "--out", tmp_path / "unsynced.pt")
        assert unsynced.returncode == 0, unsynced.stderr[-3000:]
    if script == "scir":  # the demo model scir.py built in the work folder
        from transformers import AutoModelForCausalLM

        start = AutoModelForCausalLM.from_pretrained(tmp_path / "work" / "demo-base").state_dict()
    else:
        start = distributed_step.tiny_model().state_dict()
    results = {name: torch.load(tmp_path / f"{name}.pt") for name in ("one", "two", "unsynced")
               if (tmp_path / f"{name}.pt").exists()}
    assert set(results["two"]["state"]) == set(results["one"]["state"])
    for name, weight in results["one"]["state"].items():
        assert not torch.equal(weight, start[name]), name  # the step moved every tensor
        torch.testing.assert_close(results["two"]["state"][name], weight, rtol=1e-4, atol=1e-6)
    assert results["two"]["summary"] == pytest.approx(results["one"]["summary"], rel=1e-5)
    if "unsynced" in results:
        differs = [name for name, weight in results["one"]["state"].items()
                   if not torch.allclose(results["unsynced"]["state"][name], weight, rtol=1e-4,
                                         atol=1e-6)]
        assert differs, "without gradient exchange rank 0's weights should differ"


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


DEMO_RESUME = {  # script: (its demo's base model folder, the first model, files to compare)
    "cream.py": ("demo-M0", "M1", ("rewards.jsonl", "pairs.jsonl")),
    "scir.py": ("demo-base", "M0", ("logps_global.jsonl", "start.jsonl", "pairs.jsonl")),
}


@pytest.mark.parametrize("script", DEMO_RESUME)
def test_demo_under_two_processes_resumes_from_one_process_files(tmp_path, script):
    """A 1-process demo iteration; then a 2-process run started from its first model and
    iter1/samples.jsonl gives the same scores, pairs and metrics (up to the order of float sums),
    prints its table once, and saves models that load in transformers."""
    from transformers import AutoModelForCausalLM

    base, first_model, compared = DEMO_RESUME[script]
    one, two = tmp_path / "one", tmp_path / "two"
    first = one_process(script, "--demo", "--iterations", 1, "--output_dir", one)
    assert first.returncode == 0, first.stderr[-3000:]
    two.mkdir()
    for name in (base, "demo-data", first_model):
        shutil.copytree(one / name, two / name)
    (two / "iter1").mkdir()
    shutil.copy(one / "iter1" / "samples.jsonl", two / "iter1" / "samples.jsonl")
    shutil.copy(one / "args.json", two / "args.json")  # the settings that made them, moved along
    second = torchrun(script, "--demo", "--iterations", 1, "--output_dir", two)
    assert second.returncode == 0, second.stderr[-3000:]
    assert second.stdout.count("| M1 |") == 1  # the table, printed by rank 0 only
    for name in compared:
        rows_one, rows_two = read_jsonl(one / "iter1" / name), read_jsonl(two / "iter1" / name)
        assert len(rows_one) == len(rows_two) > 0
        for a, b in zip(rows_one, rows_two):
            assert a.keys() == b.keys()
            for key in a:
                assert b[key] == (pytest.approx(a[key], rel=1e-3, abs=1e-4)
                                  if isinstance(a[key], (float, list)) else a[key]), (name, key)
    metrics_one, metrics_two = read_jsonl(one / "metrics.jsonl"), read_jsonl(two / "metrics.jsonl")
    for row_one, row_two in zip(metrics_one, metrics_two):
        for key, value in row_one.items():
            if isinstance(value, float) and key != "response_length":
                assert row_two[key] == pytest.approx(value, rel=1e-3, abs=1e-4), key
    last = "M2" if script == "cream.py" else "M1"
    assert type(AutoModelForCausalLM.from_pretrained(two / last)).__name__ == "LlamaForCausalLM"
    assert json.loads((two / last / "config.json").read_text())["architectures"] == [
        "LlamaForCausalLM"]


@pytest.mark.parametrize("script", ["cream.py", "scir.py"])
def test_bad_input_under_torchrun_is_one_line_from_rank_0(tmp_path, script):
    """Every rank stops (torchrun's report follows); the script's own error is one line, once."""
    result = torchrun(script, "--demo", "--temperature", "0", "--output_dir", tmp_path / "r")
    assert result.returncode != 0
    ours = [line for line in result.stderr.splitlines() if line.startswith(f"{script}: error:")]
    assert ours == [f"{script}: error: --temperature must be above 0, got 0.0"]


def test_a_killed_two_process_run_resumes(tmp_path):
    """Killed (every process) once iteration 1's pairs are written, the same command finishes
    the run without redoing SFT; its models load, as after a one-process resume."""
    import os
    import signal
    import time

    out = tmp_path / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
               "2", "cream.py", "--demo", "--output_dir", str(out)]
    run = subprocess.Popen(command, cwd=ROOT, env=offline(), start_new_session=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while not (out / "iter1" / "pairs.jsonl").exists() and run.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    os.killpg(run.pid, signal.SIGKILL)
    run.wait()
    assert not (out / "M3").exists(), "killed before the end"
    sft_written = (out / "M1" / "model.safetensors").stat().st_mtime_ns
    rerun = torchrun("cream.py", "--demo", "--output_dir", out)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert (out / "M1" / "model.safetensors").stat().st_mtime_ns == sft_written
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out / "M3")
    assert len(read_jsonl(out / "metrics.jsonl")) == 2
