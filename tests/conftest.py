"""Shared fixtures: a tiny random Llama with a byte-level BPE tokenizer, a small local data folder, and a
helper that runs a script of the repository as a subprocess (offline, CPU). Also the helpers
that both input tests use (test_scir_inputs.py, test_cream_inputs.py), given their script's name
and settings.

Everything is built in a session-scoped tmp folder, so every test file (cream.py, scir.py) reuses the same
model and tokenizer, loadable by path with AutoModelForCausalLM / AutoTokenizer like a Hub checkpoint.
"""

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TOOLS = ROOT / "tests" / "tools"
# The one place where the tests' imports are set up (pytest loads this file before any test module):
# the repository root for cream, scir and prompts, and tests/tools for the tools the tests run
# (toy_world, memory, distributed_step).
for folder in (TOOLS, ROOT):
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))

import prompts  # noqa: E402  (the repository's judge templates and chat format)

# Tiny models and many small tensor ops: one intra-op thread. With OpenMP's default (one thread per core) a busy
# 2-core machine makes every small op spin-wait; measured here: 0.1 s -> 14 s for 2500 Kendall taus, and
# 7 s -> 22 s for `cream.py --demo` while another process used the CPU. Subprocesses get OMP_NUM_THREADS=1 too.
torch.set_num_threads(1)

# Instruction / reply pairs used for sft.jsonl; their prompts (and a few more) make prompts.jsonl.
SFT_ROWS = [
    ("Name a primary color.", "Red is a primary color."),
    ("What is 2 + 3?", "2 + 3 = 5."),
    ("What do bees make?", "Bees make honey."),
    ("How many legs does a spider have?", "A spider has eight legs."),
    ("What is the opposite of cold?", "The opposite of cold is hot."),
    ("Who wrote Hamlet?", "William Shakespeare wrote Hamlet."),
]
EXTRA_PROMPTS = [
    "What is the capital of France?",
    "How many days are in a week?",
    "What color is the sky on a clear day?",
    "Which planet is called the red planet?",
]
# Pairwise preference rows for judge-style scripts: the better reply first.
JUDGE_ROWS = [
    ("Name a primary color.", "Red is a primary color.", "Colors are nice."),
    ("What is 2 + 3?", "2 + 3 = 5.", "2 + 3 = 6."),
    ("What do bees make?", "Bees make honey.", "Bees make milk."),
    ("Who wrote Hamlet?", "William Shakespeare wrote Hamlet.", "Hamlet wrote itself."),
]
# rewardbench.jsonl: JUDGE_ROWS (and the first again) spread over the four sections, Reasoning both math and code
REWARD_BENCH_SUBSETS = ["alpacaeval-easy", "llmbar-natural", "math-prm", "hep-python", "refusals-dangerous"]
# Text the tokenizer is trained on: the judge templates, the data and the fallback chat format of prompts.py, so
# that a filled judge prompt is ~260 tokens (the model has 1024 positions).
CORPUS = (
    list(prompts.PAIRWISE_JUDGE_TEMPLATES) + [prompts.POINTWISE_JUDGE_TEMPLATE]
    + [f"### Instruction:\n{p}\n\n### Response:\n{r}" for p, r in SFT_ROWS]
    + [f"### Instruction:\n{p}\n\n### Response:\n" for p in EXTRA_PROMPTS]
    + [f"{p} {c} {r}" for p, c, r in JUDGE_ROWS]
    + ["The quick brown fox jumps over the lazy dog. Which is better? Answer with one letter."]
)


def write_jsonl(path, rows):
    """Write dicts as JSON lines (UTF-8)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


def read_jsonl(path):
    """Parse every non-empty line of a JSONL file (fails the test on invalid JSON)."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def build_tokenizer():
    """Byte-level BPE trained here; bos <s>, eos </s>, and deliberately no pad token, no chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1000, special_tokens=["<s>", "</s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(CORPUS * 4, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>")
    assert tokenizer.pad_token is None and tokenizer.pad_token_id is None
    return tokenizer


def build_model(tokenizer, seed=0):
    """A random 2-layer Llama (hidden 32, 1024 positions) sized to the tokenizer; the global RNG is left untouched."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=None, tie_word_embeddings=False)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return LlamaForCausalLM(config)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """Path (str) of a folder with a tiny random LlamaForCausalLM and its tokenizer, saved with save_pretrained."""
    path = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = build_tokenizer()
    model = build_model(tokenizer)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir):
    """The tiny tokenizer as loaded from disk (AutoTokenizer); it has no pad token."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture
def tiny_model(tiny_model_dir):
    """A fresh float32 copy of the tiny model in eval mode (function-scoped: tests may train or hook it)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """Path (str) of a local data folder: sft.jsonl {"prompt","response"}, prompts.jsonl {"prompt"},
    judge.jsonl {"prompt","chosen","rejected"}, rewardbench.jsonl {"prompt","chosen","rejected","subset"}."""
    path = tmp_path_factory.mktemp("tiny-data")
    write_jsonl(path / "sft.jsonl", [{"prompt": p, "response": r} for p, r in SFT_ROWS])
    write_jsonl(path / "prompts.jsonl", [{"prompt": p} for p, _ in SFT_ROWS] + [{"prompt": p} for p in EXTRA_PROMPTS])
    write_jsonl(path / "judge.jsonl", [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in JUDGE_ROWS])
    write_jsonl(path / "rewardbench.jsonl", [{"prompt": p, "chosen": c, "rejected": r, "subset": s} for (p, c, r), s in
                                             zip(JUDGE_ROWS + JUDGE_ROWS[:1], REWARD_BENCH_SUBSETS)]
                + [{"prompt": "Same twice?", "chosen": "Yes.", "rejected": "Yes.", "subset": "donotanswer"}])  # no label
    return str(path)


def offline_env(**extra):
    """Environment for subprocesses: no network access to the Hub, one OpenMP thread, quiet tokenizers."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    env.setdefault("OMP_NUM_THREADS", "1")  # see torch.set_num_threads above
    env.update(extra)
    return env


class Started:
    """A script started in the background; result() waits for it and returns a CompletedProcess."""

    def __init__(self, argv, timeout, env):
        self.argv, self.timeout = argv, timeout
        self.stdout, self.stderr = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")  # no pipe can fill up
        self.proc = subprocess.Popen(argv, cwd=ROOT, stdout=self.stdout, stderr=self.stderr, text=True, env=env)

    def wait_for(self, text, stream="stderr", timeout=200):
        """Wait until the script has written text to stream ("stdout" or "stderr"), or has ended.
        Read with pread: a read of the shared file would move the offset the child writes at."""
        file = getattr(self, stream)
        deadline = time.monotonic() + timeout
        while text.encode() not in os.pread(file.fileno(), 1 << 24, 0):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                return False
            time.sleep(0.01)
        return True

    def result(self):
        """Wait (reaping with wait4 to read the child's peak memory), then return a CompletedProcess with an extra
        attribute max_rss_mb: the script's peak resident memory in MiB."""
        if self.proc.returncode is None:
            deadline = time.monotonic() + self.timeout
            while True:
                pid, status, usage = os.wait4(self.proc.pid, os.WNOHANG)
                if pid:
                    self.proc.returncode = os.waitstatus_to_exitcode(status)
                    self.max_rss_mb = usage.ru_maxrss / 1024  # Linux: kilobytes
                    break
                if time.monotonic() > deadline:
                    self.proc.kill()
                    self.proc.wait()
                    raise subprocess.TimeoutExpired(self.argv, self.timeout)
                time.sleep(0.02)
        self.stdout.seek(0), self.stderr.seek(0)
        result = subprocess.CompletedProcess(self.argv, self.proc.returncode, self.stdout.read(), self.stderr.read())
        self.stdout.close(), self.stderr.close()
        result.max_rss_mb = self.max_rss_mb
        return result


@pytest.fixture(scope="session")
def start_script():
    """start_script("cream.py", *args, timeout=..., env=...) -> Started: run several scripts at once."""
    def start(script, *args, timeout=300, env=None):
        return Started([sys.executable, str(ROOT / script), *map(str, args)], timeout, offline_env(**(env or {})))
    return start


@pytest.fixture(scope="session")
def run_script(start_script):
    """run_script("cream.py", *args, timeout=..., env=...) -> CompletedProcess, run from the repository root."""
    def run(script, *args, timeout=300, env=None):
        return start_script(script, *args, timeout=timeout, env=env).result()
    return run


# ------------------------------------------------------------------------------------------------
# The input tests' helpers; each file binds its script's name, small settings and data files
# (functools.partial)
# ------------------------------------------------------------------------------------------------
def short_run_argv(small, model, data, out, *extra):
    """A short run's command line, as strings: --model, --data_dir, --output_dir (argv[5]), the
    test file's small settings, then extra flags."""
    return [str(a) for a in ["--model", model, "--data_dir", data, "--output_dir", out, *small,
                             *extra]]


def one_line_error(script, call):
    """The one-line message of a failure of `script` (sys.exit(message)); any other exception
    fails the test."""
    with pytest.raises(SystemExit) as info:
        call()
    message = info.value.code
    assert isinstance(message, str) and "\n" not in message, message
    assert message.startswith(f"{script}: error: ")
    return message


def copy_data_files(data_dir, folder, names, **replace):
    """A copy of the named files of the tiny data folder; name=text then writes <name>.jsonl with
    that text (a file replaced or added)."""
    folder.mkdir(parents=True)
    for name in names:
        (folder / name).write_bytes((Path(data_dir) / name).read_bytes())
    for name, text in replace.items():
        (folder / f"{name}.jsonl").write_text(text, encoding="utf-8")
    return folder


def tiny_llama(tokenizer, folder, vocab_size=None, drop=None):
    """A random tiny Llama saved with the tokenizer; vocab_size smaller than the tokenizer's, or
    one weight dropped from the file, make a broken checkpoint."""
    from safetensors.torch import load_file, save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab_size or len(tokenizer), hidden_size=32,
                         intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=1024,
                         tie_word_embeddings=False)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    if drop:
        weights = load_file(folder / "model.safetensors")
        del weights[drop]
        save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def ctrl_c_after_the_closing_line(start_script, script, argv, closing):
    """Ctrl-C once a run's closing line is out (the interpreter's teardown: about a second):
    nothing was left unfinished, so the run exits 0 with that line last, no traceback."""
    import signal

    run = start_script(script, *argv, timeout=240)
    assert run.wait_for(closing, stream="stdout")
    run.proc.send_signal(signal.SIGINT)
    result = run.result()
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Traceback" not in result.stderr and "KeyboardInterrupt" not in result.stderr
    assert result.stdout.strip().splitlines()[-1].startswith(closing)
