"""The benchmark runs at the tiny config on CPU, so it never rots (its numbers are not checked: machines are noisy)."""

import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import ROOT


def test_benchmark_tiny_runs_and_reports_every_measurement():
    """Through tests/tools/gpu_check.sh, the one call a GPU session makes, so that script never rots
    either."""
    bin_dir = str(Path(sys.executable).parent)  # the script calls `python3`: this interpreter
    result = subprocess.run(["bash", "tests/tools/gpu_check.sh", "--config", "tiny"], cwd=ROOT,
                            capture_output=True, text=True, timeout=240,
                            env={**os.environ, "HF_HUB_OFFLINE": "1",
                                 "PATH": bin_dir + os.pathsep + os.environ["PATH"]})
    assert result.returncode == 0, result.stderr[-2000:]
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    header, rows = lines[0], lines[1:]
    assert header["config"] == "tiny" and header["device"] == "cpu"
    names = {row["measurement"] for row in rows}
    for kind in ("scir", "cream"):
        steps = [row for row in rows if row["measurement"] == f"{kind} training step"]
        assert sorted(row["length"] for row in steps) == [128, 256]
        pairs = 1 if kind == "scir" else 2  # each script's default micro-batch
        assert all(row["tokens_per_s"] > 0 and row["peak_gib"] > 0 and row["batch"] == pairs for row in steps)
    assert {"reference scoring: sequence_logps", "reference scoring: naive log_softmax",
            "optimizer: stochastic-rounding adamw_step", "sampling: generate_batch", "sampling: padded generate",
            "ratio: naive / sequence_logps memory above the model",
            "ratio: stochastic-rounding / torch AdamW step time"} <= names
    assert sum(row["measurement"] == "ratio: generate_batch / padded generate tokens/s" for row in rows) == 2
    assert "| measurement |" in result.stdout  # the markdown table
