"""tests/tools/toy_world.py's options, checked before its 2 minutes of pretraining.

Each bad option stops the tool at once with one line naming it and a non-zero exit, never a
traceback, and leaves no pretrained base behind. A command whose runs fail exits non-zero and
leaves the results of the last complete command (results.md, results.json, seconds.txt) as they
were. The cases are those a probe found (issue 20, item 6): --jobs 0 hung; --out at a file
pretrained for 2 minutes, then gave a traceback; --report_only on a missing folder gave a
traceback; --quick --seeds -1 exited 0 and replaced good results with empty tables; --seeds=3 ran
seed 1. Every test here runs in a few seconds: toy_world.py imports no torch before pretraining.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

import toy_world

TOOL = Path(toy_world.__file__).resolve()
GOOD = {"results.md": "the good tables\n", "results.json": '{"good": true}\n',
        "seconds.txt": "1000\n"}


def run_tool(cwd, *args):
    """toy_world.py as a new user runs it, from cwd (so its default --out lies there); a timeout,
    since a hang is one of the failures."""
    return subprocess.run([sys.executable, str(TOOL), *map(str, args)], cwd=cwd, text=True,
                          capture_output=True, timeout=60)


def one_line_error(result, option):
    """The tool stopped with one line naming the option, a non-zero exit and no traceback."""
    assert result.returncode != 0, result.stdout
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("toy_world.py: error: ") and option in lines[0], lines[0]
    return lines[0]


def good_results(folder):
    """A folder holding the results of an earlier complete command."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in GOOD.items():
        (folder / name).write_text(text)
    return folder


def untouched(folder):
    """The earlier results are still there, and nothing was pretrained."""
    assert {name: (folder / name).read_text() for name in GOOD} == GOOD
    assert not (folder / "base").exists() and not Path(f"{folder / 'base'}.tmp").exists()
    return True


def bad_options(tmp):
    """(the command line, the option its error names) of each bad option, in the folder tmp."""
    (tmp / "a-file").write_text("not a folder\n")
    return {
        "jobs 0": (["--jobs", "0", "--out", tmp / "out"], "--jobs"),
        "jobs not a number": (["--jobs", "two", "--out", tmp / "out"], "--jobs"),
        "negative seed": (["--quick", "--seeds", "-1"], "--seeds"),
        "repeated seed": (["--seeds", "3", "3", "--out", tmp / "out"], "--seeds"),
        "seed, not seeds": (["--seed", "3", "--out", tmp / "out"], "--seed"),
        "seeds without a value": (["--out", tmp / "out", "--seeds"], "--seeds"),
        "out at a file": (["--out", tmp / "a-file"], "--out"),
        "out under a file": (["--out", tmp / "a-file" / "out"], "--out"),
        "out empty": (["--out", ""], "--out"),
        "report_only on a missing folder": (["--report_only", "--out", tmp / "missing"], "--out"),
        "report_only without a finished run": (["--quick", "--report_only"], "--out"),
    }


@pytest.mark.parametrize("case", [
    "jobs 0", "jobs not a number", "negative seed", "repeated seed", "seed, not seeds",
    "seeds without a value", "out at a file", "out under a file", "out empty",
    "report_only on a missing folder", "report_only without a finished run"])
def test_a_bad_option_stops_at_once_with_one_line_and_keeps_the_results(tmp_path, case):
    argv, option = bad_options(tmp_path)[case]
    quick = good_results(tmp_path / "runs" / "toy_world-quick")  # --quick's default --out
    one_line_error(run_tool(tmp_path, *argv), option)
    assert untouched(quick)
    assert not (tmp_path / "out").exists()  # a bad option is refused before --out is made


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes in a read-only folder")
def test_an_out_that_cannot_be_written_stops_at_once(tmp_path):
    locked = good_results(tmp_path / "locked")
    locked.chmod(0o500)
    try:
        one_line_error(run_tool(tmp_path, "--out", locked, "--quick"), "--out")
        assert untouched(locked)
    finally:
        locked.chmod(0o700)


def finished(out, seeds):
    """Runs of every method for the seeds, finished as far as toy_world.py reads (table.md)."""
    for seed in seeds:
        for script, method in toy_world.METHODS:
            folder = out / "runs" / f"{script}-{method}-{seed}"
            folder.mkdir(parents=True)
            (folder / "table.md").write_text("")
    return out


@pytest.mark.parametrize("spelling, seeds", [
    (["--seeds=3"], [3]), (["--seeds", "3"], [3]), (["--seeds", "3", "4"], [3, 4]),
    (["--seeds", "3", "--seeds", "4"], [3, 4]), (["--seeds=0"], [0])])
def test_every_spelling_of_seeds_is_read(tmp_path, spelling, seeds):
    assert toy_world.parse_args(["--quick", *spelling, "--out", str(tmp_path)]).seeds == seeds


def test_the_default_seeds(tmp_path):
    assert toy_world.parse_args(["--out", str(tmp_path)]).seeds == [1, 2, 3, 4, 5]
    assert toy_world.parse_args(["--quick", "--out", str(tmp_path)]).seeds == [1]


def test_report_only_with_seeds_equals_reports_that_seed(tmp_path):
    """The probe's --seeds=3 ran seed 1; here --report_only tables seed 3, the one finished."""
    out = finished(tmp_path / "out", [3])
    result = run_tool(tmp_path, "--quick", "--seeds=3", "--report_only", "--out", out)
    assert result.returncode == 0, result.stderr
    assert "Mean ± std over 1 seeds (3)" in (out / "results.md").read_text()


def fake_runs(monkeypatch, succeeding):
    """toy_world.py with no pretraining, and each run a subprocess that fails at once, except the
    names in succeeding, which finish (table.md) as a real run does."""
    def no_pretraining(path, config, seed=0, log=toy_world.log):
        return Path(path)

    def command(script, method, seed, base, data_dir, out, quick):
        if f"{script}-{method}-{seed}" in succeeding:
            return [sys.executable, "-c", "import pathlib, sys; p = pathlib.Path(sys.argv[1]); "
                    "p.mkdir(parents=True); (p / 'table.md').write_text('')", str(out)]
        return [sys.executable, "-c", "raise SystemExit('scir.py: error: a failed run')"]
    monkeypatch.setattr(toy_world, "pretrain", no_pretraining)
    monkeypatch.setattr(toy_world, "run_command", command)


@pytest.mark.parametrize("succeeding", [set(), {"cream-cream-1"}], ids=["all fail", "one finishes"])
def test_failed_runs_exit_non_zero_and_keep_the_results(tmp_path, monkeypatch, succeeding):
    out = good_results(tmp_path / "out")
    fake_runs(monkeypatch, succeeding)
    with pytest.raises(SystemExit) as stop:
        toy_world.main(["--quick", "--jobs", "7", "--out", str(out)])
    message = stop.value.code
    assert isinstance(message, str) and "\n" not in message
    assert message.startswith(f"toy_world.py: error: {7 - len(succeeding)} of 7 runs failed")
    assert {name: (out / name).read_text() for name in GOOD} == GOOD


def test_a_command_whose_runs_all_finish_writes_the_results(tmp_path, monkeypatch):
    """The other side of the test above: the same fake runs, all finishing, replace the results."""
    out = good_results(tmp_path / "out")
    fake_runs(monkeypatch, {f"{s}-{m}-1" for s, m in toy_world.METHODS})
    toy_world.main(["--quick", "--jobs", "7", "--out", str(out)])
    assert "Mean ± std over 1 seeds (1)" in (out / "results.md").read_text()
    assert (out / "seconds.txt").read_text() != GOOD["seconds.txt"]
