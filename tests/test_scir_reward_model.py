"""scir.py --method external: a --reward_model that cannot score is refused before SFT, in one line
naming --reward_model (README, 'Quickstart': bad input), and leaves nothing that binds the folder
to it.

Each damaged folder is made here from a working tiny reward model: an embedding smaller than the
tokenizer, weights without the score head, no weights, no config.json, no folder at all.
"""

import shutil
from functools import partial

import pytest
import torch
from safetensors.torch import load_file, save_file

import scir
from conftest import copy_data_files, one_line_error, short_run_argv

SMALL = ["--iterations", 1, "--num_prompts", 2, "--num_samples", 2, "--max_new_tokens", 4,
         "--max_length", 700, "--sft_epochs", 1, "--judge_pairs", 1, "--sft_examples", 2,
         "--batch_size", 2, "--grad_accum", 1, "--dtype", "float32"]
CHAT_TEMPLATE = "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
argv = partial(short_run_argv, SMALL)
error_of = partial(one_line_error, "scir.py")


def reward_model(folder, tiny_model_dir, vocab_size=None):
    """A tiny random Llama reward model (one score) with a chat template, saved in folder."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.chat_template = CHAT_TEMPLATE
    config = LlamaConfig(vocab_size=vocab_size or len(tokenizer), hidden_size=32,
                         intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=1024, num_labels=1)
    torch.manual_seed(1)
    LlamaForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def without_score_head(folder):
    for weights in folder.glob("*.safetensors"):
        tensors = {k: v for k, v in load_file(weights).items() if not k.endswith("score.weight")}
        save_file(tensors, weights, metadata={"format": "pt"})


def without_weights(folder):
    for weights in folder.glob("*.safetensors"):
        weights.unlink()


def without_config(folder):
    (folder / "config.json").unlink()


@pytest.mark.parametrize("damage, culprit", [
    ("small_embedding", "embeds 20 tokens, but its tokenizer has"),
    ("no_score_head", "has no score head (score.weight) among its weights"),
    ("no_weights", "has no weights (*.safetensors or *.bin)"),
    ("no_config", "cannot read the config of --reward_model"),
    ("no_folder", ": no such folder"),
])
def test_a_reward_model_that_cannot_score_is_refused_before_sft(damage, culprit, tmp_path,
                                                                tiny_model_dir, data_dir):
    folder = tmp_path / "reward"
    reward_model(folder, tiny_model_dir, vocab_size=20 if damage == "small_embedding" else None)
    if damage in ("no_score_head", "no_weights", "no_config"):
        {"no_score_head": without_score_head, "no_weights": without_weights,
         "no_config": without_config}[damage](folder)
    elif damage == "no_folder":
        shutil.rmtree(folder)
    data = copy_data_files(data_dir, tmp_path / "data", ("sft.jsonl", "judge.jsonl", "prompts.jsonl"))
    out = tmp_path / "out"
    message = error_of(lambda: scir.main(argv(tiny_model_dir, data, out, "--method", "external",
                                              "--reward_model", folder)))
    assert f"--reward_model '{folder}'" in message and culprit in message, message
    assert not (out / "M0").exists() and not (out / "args.json").exists()  # nothing binds it
