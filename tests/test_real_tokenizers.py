"""The papers' own tokenizers (README, 'Tests'): Mistral-7B-v0.3's SentencePiece vocabulary and
Llama-3's tiktoken vocabulary, both shipped in PyPI packages (mistral-common, llama-models), so no
Hub download is needed.

transformers converts each once per module, saved as the base and the -Instruct variant (the chat
template written here, as on the model cards); the base Mistral and Llama-3-Instruct also get a
tiny random Llama of their vocabulary size. Expected token ids come from the prompt text written by
hand and encoded here, or from the reference libraries themselves (sentencepiece, tiktoken).
"""

import copy
import importlib.util
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from conftest import JUDGE_ROWS, SFT_ROWS, build_model, read_jsonl

import cream
import prompts
import scir

KINDS = ("mistral", "mistral-instruct", "llama3", "llama3-instruct")
VOCAB_SIZE = {"mistral": 32768, "mistral-instruct": 32768,
              "llama3": 128256, "llama3-instruct": 128256}
# Llama-3's special tokens after its 128,000 BPE ranks (Meta-Llama-3-8B's tokenizer.json)
LLAMA3_SPECIALS = (
    ["<|begin_of_text|>", "<|end_of_text|>"]
    + [f"<|reserved_special_token_{i}|>" for i in range(4)]
    + ["<|start_header_id|>", "<|end_header_id|>", "<|reserved_special_token_4|>", "<|eot_id|>"]
    + [f"<|reserved_special_token_{i}|>" for i in range(5, 251)]
)
BEGIN, END, START_HEADER, END_HEADER, EOT = 128000, 128001, 128006, 128007, 128009
# Meta's split pattern (llama_models/llama3/tokenizer.py), for the tiktoken reference encoding
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
                  r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# Meta-Llama-3-8B-Instruct's chat template, and Mistral-7B-Instruct-v0.3's without tools and system
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}"
)
MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
    "{{ '[INST] ' + message['content'] + '[/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'] | trim + eos_token }}"
    "{% endif %}{% endfor %}"
)
# One user turn as each model sees it, up to where the reply starts, written by hand
TURN = {
    "mistral": "<s>### Instruction:\n{user}\n\n### Response:\n",
    "mistral-instruct": "<s>[INST] {user}[/INST]",
    "llama3": "<|begin_of_text|>### Instruction:\n{user}\n\n### Response:\n",
    "llama3-instruct": "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n{user}"
                       "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
}
# What each format writes around an assistant reply, by hand: Mistral-7B-Instruct-v0.3's template
# puts a space before the content (SentencePiece: the reply's first token carries the word-start
# mark) and </s> after it; Llama-3-Instruct ends a turn with <|eot_id|>; the fallback, with EOS.
LEAD = {"mistral": "", "mistral-instruct": " ", "llama3": "", "llama3-instruct": ""}
TURN_END = {"mistral": "</s>", "mistral-instruct": "</s>", "llama3": "<|end_of_text|>",
            "llama3-instruct": "<|eot_id|>"}
# SFT rows besides conftest's: accents, an emoji (byte fallback in SentencePiece), several lines
EXTRA_SFT_ROWS = [("Say hello in French.", "Bonjour ! Ça va ? 🙂"),
                  ("List two colors.", "1. Red\n2. Blue")]


def turn(kind, user_text):
    return TURN[kind].replace("{user}", user_text)


def ids_of(tokenizer, text):
    """Ids of a text that starts with BOS, as the model saw such texts in pretraining: the BOS id,
    then the rest encoded as a text of its own (tokenizer(...) with its own BOS, checked against
    sentencepiece below)."""
    assert text.startswith(tokenizer.bos_token)
    ids = tokenizer(text[len(tokenizer.bos_token):]).input_ids
    assert ids[0] == tokenizer.bos_token_id
    return ids


def package_file(package, pattern):
    """The one file matching pattern in an installed package (requirements.txt, tests only)."""
    spec = importlib.util.find_spec(package)
    assert spec is not None, f"{package} is missing: pip install -r requirements.txt"
    matches = sorted(Path(spec.origin).parent.glob(pattern))
    assert len(matches) == 1, f"{package}: {pattern} matches {matches}"
    return matches[0]


def mistral_vocab():
    return package_file("mistral_common", "data/mistral_instruct_tokenizer_240323.model.v3")


def llama3_vocab():
    return package_file("llama_models", "llama3/**/tokenizer.model")  # llama3/api/ before 0.2


def llama3_backend():
    """Llama-3's tiktoken ranks via transformers' TikTokenConverter, BOS added like the Hub's."""
    from tokenizers import processors
    from transformers.convert_slow_tokenizer import TikTokenConverter

    backend = TikTokenConverter(vocab_file=str(llama3_vocab()),
                                extra_special_tokens=LLAMA3_SPECIALS).converted()
    backend.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                      pair="<|begin_of_text|> $A <|begin_of_text|> $B",
                                      special_tokens=[("<|begin_of_text|>", BEGIN)]),
    ])
    return backend


@pytest.fixture(scope="module")
def real_dirs(tmp_path_factory):
    """kind -> folder: the tokenizer (save_pretrained), and a tiny random Llama for two kinds.

    Mistral-7B-v0.3: no pad token, no chat template. Llama-3-8B-Instruct as on the Hub today: the
    tokenizer's EOS is <|eot_id|>, generation_config stops on <|end_of_text|> and <|eot_id|>.
    """
    from transformers import LlamaTokenizer, PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("real-tokenizers")
    backend = llama3_backend()
    (root / "sentencepiece").mkdir()
    shutil.copy(mistral_vocab(), root / "sentencepiece" / "tokenizer.model")
    dirs = {}
    for kind in KINDS:
        if kind.startswith("mistral"):  # the SentencePiece converter runs on tokenizer.model
            tokenizer = LlamaTokenizer.from_pretrained(root / "sentencepiece", add_bos_token=True)
        else:
            tokenizer = PreTrainedTokenizerFast(  # a copy of the backend
                tokenizer_object=backend, bos_token="<|begin_of_text|>",
                eos_token="<|eot_id|>" if kind.endswith("instruct") else "<|end_of_text|>")
        tokenizer.chat_template = {"mistral-instruct": MISTRAL_TEMPLATE,
                                   "llama3-instruct": LLAMA3_TEMPLATE}.get(kind)
        tokenizer.save_pretrained(root / kind)
        if kind in ("mistral", "llama3-instruct"):
            model = build_model(tokenizer)
            if kind == "llama3-instruct":
                model.generation_config = GenerationConfig(bos_token_id=BEGIN,
                                                           eos_token_id=[END, EOT])
            model.save_pretrained(root / kind)
        dirs[kind] = str(root / kind)
    return dirs


@pytest.fixture(scope="module")
def loaded(real_dirs):
    """kind -> the tokenizer as the scripts load it (pad = EOS where there is none)."""
    return {kind: scir.load_tokenizer(path) for kind, path in real_dirs.items()}


# ------------------------------------------------------------------------------------------------
# The converted tokenizers are the real ones
# ------------------------------------------------------------------------------------------------
# (no runs of spaces: transformers' SentencePiece conversion merges '\u2581\u2581', sentencepiece
# does not, a difference of transformers that these scripts cannot see in their own data)
SAMPLE_TEXTS = [prompts.PAIRWISE_JUDGE_TEMPLATES[1], "Bonjour ! Ça va ? 🙂 naïve\n\nx = 12345;",
                "[[m]] or [[M]]"]


@pytest.mark.parametrize("kind", KINDS)
def test_converted_tokenizers_match_reference_libraries(kind, real_dirs, loaded):
    tokenizer = loaded[kind]
    raw = AutoTokenizer.from_pretrained(real_dirs[kind])
    assert len(tokenizer) == VOCAB_SIZE[kind]
    if kind.startswith("mistral"):
        import sentencepiece

        reference = sentencepiece.SentencePieceProcessor(model_file=str(mistral_vocab()))
        assert reference.vocab_size() == 32768
        assert tokenizer.convert_ids_to_tokens([0, 1, 2, 3, 4]) == [
            "<unk>", "<s>", "</s>", "[INST]", "[/INST]"]
        assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (1, 2)
        assert raw.pad_token is None
        for text in SAMPLE_TEXTS:
            assert tokenizer(text).input_ids == [1] + reference.encode(text)
    else:
        import tiktoken
        from tiktoken.load import load_tiktoken_bpe

        ranks = load_tiktoken_bpe(str(llama3_vocab()))
        assert len(ranks) == 128000
        reference = tiktoken.Encoding("llama3", pat_str=LLAMA3_PATTERN, mergeable_ranks=ranks,
                                      special_tokens={})
        assert tokenizer.convert_tokens_to_ids(
            ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
             "<|eot_id|>", "<|reserved_special_token_250|>"]) == [
            BEGIN, END, START_HEADER, END_HEADER, EOT, 128255]
        assert tokenizer.bos_token_id == BEGIN
        assert tokenizer.eos_token_id == (EOT if kind == "llama3-instruct" else END)
        assert raw.pad_token is None
        for text in SAMPLE_TEXTS:
            assert tokenizer(text).input_ids == [BEGIN] + reference.encode(text)
    assert bool(tokenizer.chat_template) == kind.endswith("instruct")
    # the hand-written turn is what the chat template (or the fallback format) renders
    assert prompts.chat_prompt(tokenizer, "Name a color.") == turn(kind, "Name a color.")


# ------------------------------------------------------------------------------------------------
# The judge's identifiers and prompts
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_identifier_tokens_follow_the_answer_prefix(kind, loaded):
    tokenizer = loaded[kind]
    m_id, big_m_id = prompts.identifier_token_ids(tokenizer)
    assert (tokenizer.decode([m_id]), tokenizer.decode([big_m_id])) == ("m", "M")
    assert m_id != big_m_id
    for text, _ in prompts.judge_prompts("Name a primary color.", "Red.", "Colors are nice."):
        prefix = turn(kind, text) + "[["
        prefix_ids = ids_of(tokenizer, prefix)
        for identifier, expected in (("m", m_id), ("M", big_m_id)):
            full = ids_of(tokenizer, prefix + identifier + "]]")
            assert full[: len(prefix_ids)] == prefix_ids
            assert full[len(prefix_ids)] == expected


def check_one_bos(tokenizer, ids):
    assert ids[0] == tokenizer.bos_token_id
    assert ids.count(tokenizer.bos_token_id) == 1


@pytest.mark.parametrize("kind", KINDS)
def test_judge_inputs_short_pair_is_the_hand_written_prompt(kind, loaded):
    tokenizer = loaded[kind]
    instruction, chosen, rejected = JUDGE_ROWS[1]
    inputs = scir.judge_inputs(tokenizer, instruction, chosen, rejected, 2048)
    expected = [ids_of(tokenizer, turn(kind, text) + LEAD[kind] + "[[")
                for text, _ in prompts.judge_prompts(instruction, chosen, rejected)]
    assert [ids for ids, _ in inputs] == expected
    assert [first for _, first in inputs] == [True, False, True, False]
    for ids, _ in inputs:
        check_one_bos(tokenizer, ids)
        assert tokenizer.decode(ids[-1:]) == "[["


@pytest.mark.parametrize("kind", KINDS)
def test_judge_inputs_cut_long_responses_to_fit(kind, loaded):
    tokenizer = loaded[kind]
    long_1 = "Paris est la capitale de la France. Café, crème brûlée 🙂. " * 60
    long_2 = "The quick brown fox jumps over the lazy dog 🦊 naïvely. " * 70
    for max_length in (700, 2048):
        inputs = scir.judge_inputs(tokenizer, "Describe Paris.", long_1, long_2, max_length)
        assert len(inputs) == 4
        lengths = [len(ids) for ids, _ in inputs]
        assert max(lengths) <= max_length
        assert max(lengths) >= max_length - 16  # cut to fit, not far below
        for ids, _ in inputs:
            check_one_bos(tokenizer, ids)
            assert tokenizer.decode(ids[-1:]) == "[["
            text = tokenizer.decode(ids, skip_special_tokens=True)
            assert "\ufffd" not in text
            assert "Describe Paris." in text
            assert "Paris est la capitale de la France. Café" in text
            assert "The quick brown fox jumps over the lazy dog 🦊" in text


@pytest.mark.parametrize("kind", KINDS)
def test_judge_sft_targets_are_the_identifier_tokens(kind, loaded):
    tokenizer = loaded[kind]
    rows = [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in JUDGE_ROWS]
    identifier_ids = prompts.identifier_token_ids(tokenizer)
    examples = scir.judge_sft_examples(tokenizer, rows, 2, 0, 700)
    assert len(examples) == 8
    by_prompt = {}  # judge prompt ids -> (its text, the identifier of the chosen response)
    for row in rows:
        for text, first in prompts.judge_prompts(row["prompt"], row["chosen"], row["rejected"]):
            prompt_ids = ids_of(tokenizer, turn(kind, text) + LEAD[kind] + "[[")
            by_prompt[tuple(prompt_ids)] = (text, first)
    for prompt_ids, target_ids in examples:
        text, winner = by_prompt[tuple(prompt_ids)]
        full = ids_of(tokenizer,
                      turn(kind, text) + LEAD[kind] + "[[" + winner + "]]" + TURN_END[kind])
        assert full[: len(prompt_ids)] == prompt_ids
        assert target_ids == full[len(prompt_ids):]
        assert target_ids[0] == identifier_ids["mM".index(winner)]
        check_one_bos(tokenizer, prompt_ids + target_ids)


# ------------------------------------------------------------------------------------------------
# SFT: where the labels start, and EOS
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("module", [scir, cream], ids=["scir", "cream"])
@pytest.mark.parametrize("kind", KINDS)
def test_sft_labels_are_the_response_and_eos(kind, module, loaded):
    tokenizer = loaded[kind]
    rows = SFT_ROWS[:2] + EXTRA_SFT_ROWS
    input_ids, attention_mask, labels = module.collate(
        [module.encode(tokenizer, p, r) for p, r in rows], tokenizer.pad_token_id)
    width = input_ids.shape[1]
    for row, (prompt, response) in enumerate(rows):
        prompt_ids = ids_of(tokenizer, turn(kind, prompt))
        joint = ids_of(tokenizer, turn(kind, prompt) + LEAD[kind] + response + TURN_END[kind])
        assert joint[: len(prompt_ids)] == prompt_ids  # no merge across the boundary here
        response_ids = joint[len(prompt_ids):]
        n = len(joint)
        assert input_ids[row, :n].tolist() == prompt_ids + response_ids
        assert attention_mask[row].tolist() == [1] * n + [0] * (width - n)
        assert labels[row].tolist() == ([-100] * len(prompt_ids) + response_ids
                                        + [-100] * (width - n))
        labelled = [i for i in labels[row].tolist() if i != -100]
        assert tokenizer.decode(labelled[:-1]).removeprefix(LEAD[kind]) == response
        assert tokenizer.decode(labelled[-1:]) == TURN_END[kind]  # as the model's replies end
        check_one_bos(tokenizer, input_ids[row, :n].tolist())


def test_fallback_prompt_is_bos_plus_the_sentencepiece_encoding(loaded):
    import sentencepiece

    reference = sentencepiece.SentencePieceProcessor(model_file=str(mistral_vocab()))
    tokenizer = loaded["mistral"]
    user = "Name a primary color."
    text = prompts.FALLBACK_CHAT_FORMAT.replace("{user_text}", user)
    assert tokenizer(text).input_ids == [1] + reference.encode(text)  # what HF itself does
    for module in (scir, cream):
        assert module.encode(tokenizer, user) == [1] + reference.encode(text)


def test_mistral_instruct_sft_sequence_is_the_v3_chat_format(loaded):
    import sentencepiece

    reference = sentencepiece.SentencePieceProcessor(model_file=str(mistral_vocab()))
    tokenizer = loaded["mistral-instruct"]
    prompt, response = SFT_ROWS[0]
    expected = [1, 3] + reference.encode(prompt) + [4] + reference.encode(response) + [2]
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}],
        tokenize=False)
    assert ids_of(tokenizer, rendered) == expected  # the template agrees with mistral-common
    for module in (scir, cream):
        prompt_ids, response_ids = module.encode(tokenizer, prompt, response)
        assert prompt_ids + response_ids == expected


# ------------------------------------------------------------------------------------------------
# Sampling stops on both of Llama-3-Instruct's EOS ids
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def emitting_model(real_dirs):
    """emit(token_id): the tiny Llama-3 model, set so that every sampled token is token_id.

    The layers add nothing (o_proj, down_proj zero), so the last hidden state is the normed
    embedding, whose dimension 0 is set large; only token_id's lm_head row reads it.
    """
    model = AutoModelForCausalLM.from_pretrained(real_dirs["llama3-instruct"],
                                                 dtype=torch.float32).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.model.embed_tokens.weight[:, 0] = 10.0

    def emit(token_id):
        with torch.no_grad():
            model.lm_head.weight.zero_()
            model.lm_head.weight[token_id, 0] = 10.0  # logit ~ 10 * sqrt(32), the rest 0
        return model
    return emit


@pytest.mark.parametrize("tokenizer_eos, other_eos", [(EOT, END), (END, EOT)],
                         ids=["hub-today", "first-release"])
@pytest.mark.parametrize("module", [scir, cream], ids=["scir", "cream"])
def test_llama3_instruct_sampling_stops_on_both_eos_ids(module, tokenizer_eos, other_eos,
                                                        real_dirs, loaded, emitting_model):
    """The tokenizer's EOS is <|eot_id|> on the Hub today, <|end_of_text|> in the first release:
    the other one is only in generation_config, and sampling must stop on it too."""
    saved = GenerationConfig.from_pretrained(real_dirs["llama3-instruct"])
    assert saved.eos_token_id == [END, EOT]
    tokenizer = copy.deepcopy(loaded["llama3-instruct"])
    tokenizer.eos_token = tokenizer.convert_ids_to_tokens(tokenizer_eos)
    args = SimpleNamespace(temperature=0.7, top_p=0.9, max_new_tokens=5, num_samples=2)
    hello = tokenizer.convert_tokens_to_ids("Hello")
    for token_id, expected in (
        (other_eos, {"response": "", "token_ids": [other_eos], "finished": True}),
        (hello, {"response": "Hello" * 5, "token_ids": [hello] * 5, "finished": False}),
    ):
        grouped = module.sample_responses(emitting_model(token_id), tokenizer,
                                          ["Name a color.", "What is 2 + 3?"], args)
        assert [len(group) for group in grouped] == [2, 2]
        for sample in (s for group in grouped for s in group):
            assert {key: sample[key] for key in expected} == expected


# ------------------------------------------------------------------------------------------------
# Both scripts end to end through their command line
# ------------------------------------------------------------------------------------------------
E2E_FLAGS = ["--iterations", 1, "--num_prompts", 2, "--num_samples", 2, "--max_new_tokens", 4,
             "--max_length", 700, "--sft_epochs", 1, "--batch_size", 2, "--grad_accum", 1,
             "--dtype", "float32"]
SCRIPT_FLAGS = {"cream.py": [], "scir.py": ["--judge_pairs", 2, "--sft_examples", 4]}
# one vocabulary per script (two runs at once take ~13 s on 2 cores, four ~30 s): the judge and
# chat format of the others are checked above without a model
E2E_CASES = [("cream.py", "llama3-instruct"), ("scir.py", "mistral")]


@pytest.fixture(scope="module")
def e2e(real_dirs, data_dir, start_script, tmp_path_factory):
    """(script, kind) -> (CompletedProcess, output folder): the runs at once."""
    root = tmp_path_factory.mktemp("real-e2e")
    started = {}
    for script, kind in E2E_CASES:
        out = root / f"{script[:-3]}-{kind}"
        started[script, kind] = (start_script(
            script, "--model", real_dirs[kind], "--data_dir", data_dir, "--output_dir", out,
            *E2E_FLAGS, *SCRIPT_FLAGS[script], timeout=300), out)
    return {case: (run.result(), out) for case, (run, out) in started.items()}


@pytest.mark.parametrize("script, kind", E2E_CASES)
def test_end_to_end(script, kind, e2e, real_dirs):
    result, out = e2e[script, kind]
    assert result.returncode == 0, result.stderr[-3000:]
    source = AutoTokenizer.from_pretrained(real_dirs[kind])
    models = ["M1", "M2"] if script == "cream.py" else ["M0", "M1"]
    probe = turn(kind, "What is 2 + 3?") + "2 + 3 = 5."
    for name in models:
        assert AutoConfig.from_pretrained(out / name).vocab_size == VOCAB_SIZE[kind]
        model = AutoModelForCausalLM.from_pretrained(out / name)
        assert model.get_input_embeddings().weight.shape[0] == VOCAB_SIZE[kind]
        saved = AutoTokenizer.from_pretrained(out / name)
        assert len(saved) == VOCAB_SIZE[kind]
        assert ids_of(saved, probe) == ids_of(source, probe)
        assert saved.chat_template == source.chat_template
        if kind == "llama3-instruct":  # the next iteration samples from it: both stop ids kept
            assert GenerationConfig.from_pretrained(out / name).eos_token_id == [END, EOT]
    samples = [s for row in read_jsonl(out / "iter1" / "samples.jsonl") for s in row["samples"]]
    assert len(samples) == 2 * 2
    for sample in samples:
        assert 1 <= len(sample["token_ids"]) <= 4
        assert all(0 <= i < VOCAB_SIZE[kind] for i in sample["token_ids"])
