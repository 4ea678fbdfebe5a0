"""Tests for prompts.py: paper transcription, prompt filling, chat turns, identifier tokens."""

import re

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

import prompts
from conftest import ROOT

SCIR_PAPER = ROOT.parent / "shared" / "papers" / "scir-2502.08922.txt"


def normalise(text):
    """Drop <p>/<pre> tags from the PDF extraction and collapse all whitespace."""
    return " ".join(re.sub(r"</?(?:p|pre)>", " ", text).split())


# Independent transcription of SCIR Table 5 and Table 6, one entry per printed block.
EXPECTED_PAIRWISE = [
    [
        "You are a highly efficient assistant, who evaluates and selects the best large language "
        "model (LLMs) based on the quality of their responses to a given instruction. This process "
        "will be used to create a leaderboard reflecting the most accurate and human-preferred "
        "answers. I require a leaderboard for various large language models. I'll provide you "
        "with prompts given to these models and their corresponding outputs. Your task is to "
        "assess these responses, and select the model that produces the best output from a human "
        "perspective. Here is the prompt:",
        '{ "instruction": "{instruction}", }',
        "Here are the outputs of the models:",
        '{ "model": "m", "answer": "{response_1}" }',
        '{ "model": "M", "answer": "{response_2}" }',
        "Evaluate the models based on the quality and relevance of their outputs, and select the "
        "model that generated the best output. Answer by providing the model identifier of the "
        "best model. We will use your output as the name of the best model, so make sure your "
        "output only contains one of the following model identifiers: [[m]] or [[M]].",
    ],
    [
        "Please act as an impartial judge and evaluate the quality of the responses provided by "
        "two AI assistants to the user question displayed below. You should choose the assistant "
        "that follows the user's instructions and answers the user's question better. Your "
        "evaluation should consider factors such as the helpfulness, relevance, accuracy, depth, "
        "creativity, and level of detail of their responses. Avoid any position biases and ensure "
        "that the order in which the responses were presented does not influence your decision. "
        "Do not allow the length of the responses to influence your evaluation. Do not favor "
        "certain names of the assistants. Be as objective as possible.",
        "### Instruction: {instruction} ### Response m: {response_1} ### Response M: {response_2}",
        'Output your final verdict by strictly following this format: "[[m]]" if Response m is '
        'better than Response M, "[[M]]" if Response M is better than Response m.',
    ],
]

EXPECTED_POINTWISE = [
    "Review the user’s question and the corresponding response using the additive 5-point "
    "scoring system described below. Points are accumulated based on the satisfaction of each "
    "criterion:",
    "- Add 1 point if the response is relevant and provides some information related to the "
    "user’s inquiry, even if it is incomplete or contains some irrelevant content.",
    "- Add another point if the response addresses a substantial portion of the user’s question, "
    "but does not completely resolve the query or provide a direct answer.",
    "- Award a third point if the response answers the basic elements of the user’s question in "
    "a useful way, regardless of whether it seems to have been written by an AI Assistant or if "
    "it has elements typically found in blogs or search results.",
    "- Grant a fourth point if the response is clearly written from an AI Assistant’s "
    "perspective, addressing the user’s question directly and comprehensively, and is "
    "well-organized and helpful, even if there is slight room for improvement in clarity, "
    "conciseness or focus.",
    "- Bestow a fifth point for a response that is impeccably tailored to the user’s question by "
    "an AI Assistant, without extraneous information, reflecting expert knowledge, and "
    "demonstrating a high-quality, engaging, and insightful answer.",
    "User: {instruction}",
    "<response>{response}</response>",
    "After examining the user’s instruction and the response:",
    "- Briefly justify your total score, up to 100 words.",
    "- Conclude with the score using the format: “Score: <total points>”",
    "Remember to assess from the AI Assistant perspective. To evaluate the response in alignment "
    "with this additive scoring model, we’ll systematically attribute points based on the "
    "outlined criteria.",
]


# ---------------------------------------------------------------- templates


def test_pairwise_templates_match_transcription():
    assert len(prompts.PAIRWISE_JUDGE_TEMPLATES) == 2
    for template, expected in zip(prompts.PAIRWISE_JUDGE_TEMPLATES, EXPECTED_PAIRWISE):
        assert normalise(template) == normalise(" ".join(expected))
        assert "<p>" not in template and "<pre>" not in template


def test_pointwise_template_matches_transcription():
    assert normalise(prompts.POINTWISE_JUDGE_TEMPLATE) == normalise(" ".join(EXPECTED_POINTWISE))
    # typographic characters exactly as printed
    assert "user\u2019s question" in prompts.POINTWISE_JUDGE_TEMPLATE
    assert "\u201cScore: <total points>\u201d" in prompts.POINTWISE_JUDGE_TEMPLATE
    assert "we\u2019ll" in prompts.POINTWISE_JUDGE_TEMPLATE


@pytest.mark.skipif(not SCIR_PAPER.exists(), reason="paper text not available")
def test_templates_match_paper_text():
    lines = SCIR_PAPER.read_text(encoding="utf-8").split("\n")

    def line_after(title):
        return lines[lines.index(title) + 1]

    paper_1 = line_after("LLM-as-a-Judge Prompt 1 for Self-Consistent Internal Rewards Training")
    paper_2 = line_after("LLM-as-a-Judge Prompt 2 for Self-Consistent Internal Rewards Training")
    start = lines.index("LLM-as-a-Judge Prompt for Self-Rewarding Language Model (LLM-as-a-Judge)")
    end = next(i for i in range(start, len(lines)) if lines[i].startswith("We use Llama3-70B"))
    paper_pointwise = "\n".join(lines[start + 1 : end])

    assert normalise(prompts.PAIRWISE_JUDGE_TEMPLATES[0]) == normalise(paper_1)
    assert normalise(prompts.PAIRWISE_JUDGE_TEMPLATES[1]) == normalise(paper_2)
    assert normalise(prompts.POINTWISE_JUDGE_TEMPLATE) == normalise(paper_pointwise)


def test_template_layout():
    t1, t2 = prompts.PAIRWISE_JUDGE_TEMPLATES
    assert '{\n    "instruction": "{instruction}",\n}' in t1
    assert '{\n    "model": "m",\n    "answer": "{response_1}"\n}' in t1
    assert '{\n    "model": "M",\n    "answer": "{response_2}"\n}' in t1
    for header in ("### Instruction:", "### Response m:", "### Response M:"):
        assert f"\n{header}\n" in t2
    assert "\nUser: {instruction}\n<response>{response}</response>\n" in (
        prompts.POINTWISE_JUDGE_TEMPLATE
    )


def test_constants():
    assert prompts.JUDGE_IDS == ("m", "M")
    assert prompts.ANSWER_PREFIX == "[["
    assert prompts.FALLBACK_CHAT_FORMAT == "### Instruction:\n{user_text}\n\n### Response:\n"


# ---------------------------------------------------------------- filling

INSTRUCTION = "Name a colour."
FIRST = "Red, as in {'hex': '#ff0000'}."
SECOND = "Blue {response_1} {instruction} }{"


def text_after(text, marker):
    return text[text.index(marker) + len(marker) :]


def answer_of_model(prompt, identifier):
    """The text written after "model": "<identifier>" and its "answer": " key."""
    rest = text_after(prompt, f'"model": "{identifier}"')
    match = re.match(r',\s*"answer": "', rest)
    assert match, rest[:60]
    return rest[match.end() :]


def test_judge_prompts_order_and_identifiers():
    result = prompts.judge_prompts(INSTRUCTION, FIRST, SECOND)
    assert [identifier for _, identifier in result] == ["m", "M", "m", "M"]
    texts = [text for text, _ in result]
    assert all("highly efficient assistant" in t for t in texts[:2])
    assert all("impartial judge" in t for t in texts[2:])

    # template 1: response_1 is model m, then model M
    assert answer_of_model(texts[0], "m").startswith(FIRST + '"\n}')
    assert answer_of_model(texts[0], "M").startswith(SECOND + '"\n}')
    assert answer_of_model(texts[1], "m").startswith(SECOND + '"\n}')
    assert answer_of_model(texts[1], "M").startswith(FIRST + '"\n}')
    # template 2: response_1 under "### Response m:", then under "### Response M:"
    assert text_after(texts[2], "### Response m:\n").startswith(FIRST + "\n")
    assert text_after(texts[2], "### Response M:\n").startswith(SECOND + "\n")
    assert text_after(texts[3], "### Response m:\n").startswith(SECOND + "\n")
    assert text_after(texts[3], "### Response M:\n").startswith(FIRST + "\n")
    # the responses come in order: m slot before M slot
    assert texts[0].index(FIRST) < texts[0].index(SECOND)
    assert texts[1].index(SECOND) < texts[1].index(FIRST)


def test_judge_prompts_each_text_once_and_braces_survive():
    for text, _ in prompts.judge_prompts(INSTRUCTION, FIRST, SECOND):
        assert text.count(FIRST) == 1
        assert text.count(SECOND) == 1
        assert text.count(INSTRUCTION) == 1
        # no placeholder was left unfilled (SECOND contributes one literal "{response_1}")
        assert text.count("{response_1}") == 1
        assert "{response_2}" not in text
        assert text.count("{instruction}") == 1


def test_judge_prompt_full_text_for_template_2():
    text, identifier = prompts.judge_prompts("Q?", "A {1}", "B")[2]
    assert identifier == "m"
    assert text.endswith(
        "### Instruction:\nQ?\n\n### Response m:\nA {1}\n\n### Response M:\nB\n\n"
        'Output your final verdict by strictly following this format: "[[m]]" if Response m is '
        'better than Response M, "[[M]]" if Response M is better than Response m.'
    )


def test_fill_pointwise():
    text = prompts.fill_pointwise("What is {x}? {response}", "It is {y}.")
    assert "\nUser: What is {x}? {response}\n<response>It is {y}.</response>\n" in text
    assert text.startswith("Review the user\u2019s question")
    assert "{instruction}" not in text


# ---------------------------------------------------------------- tokenizers

SENTENCES = [
    "Which is better? The first answer or the second answer.",
    "### Instruction:\nName a colour.\n\n### Response:\nRed.",
    "Output your final verdict: [[m]] or [[M]].",
    "Hello world, this is a tiny tokenizer for tests.",
]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|{{ message['role'] }}|>\n"
    "{{ message['content'] }}\n{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def wrap(tokenizer, name, bos=True):
    kwargs = {"bos_token": "<s>"} if bos else {}
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token="</s>", name_or_path=name, **kwargs
    )


@pytest.fixture(scope="module")
def trained_bpe():
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=350,
        special_tokens=["<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(SENTENCES * 3, trainer)
    return tokenizer


def hand_bpe(merges):
    """Byte-level BPE with a hand-made vocab, no regex split (so merges may cross "[" / "m")."""
    vocab = {"<s>": 0, "</s>": 1}
    for token in pre_tokenizers.ByteLevel.alphabet():
        vocab.setdefault(token, len(vocab))
    for left, right in merges:
        vocab.setdefault(left + right, len(vocab))
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def test_chat_prompt_fallback_with_bos(trained_bpe):
    tokenizer = wrap(trained_bpe, "tiny-base")
    text = prompts.chat_prompt(tokenizer, "Say {hi}.")
    assert text == "<s>### Instruction:\nSay {hi}.\n\n### Response:\n"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert ids.count(tokenizer.convert_tokens_to_ids("<s>")) == 1
    assert ids[0] == tokenizer.convert_tokens_to_ids("<s>")


def test_chat_prompt_fallback_without_bos(trained_bpe):
    tokenizer = wrap(trained_bpe, "tiny-no-bos", bos=False)
    assert prompts.chat_prompt(tokenizer, "Hi") == "### Instruction:\nHi\n\n### Response:\n"


def test_chat_prompt_with_chat_template(trained_bpe):
    tokenizer = wrap(trained_bpe, "tiny-chat")
    tokenizer.chat_template = CHAT_TEMPLATE
    text = prompts.chat_prompt(tokenizer, "Say {hi}.")
    assert text == "<s><|user|>\nSay {hi}.\n<|assistant|>\n"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert ids.count(tokenizer.convert_tokens_to_ids("<s>")) == 1


@pytest.mark.parametrize("templated", [False, True])
def test_identifier_token_ids_byte_level(trained_bpe, templated):
    tokenizer = wrap(trained_bpe, "tiny-ok")
    if templated:
        tokenizer.chat_template = CHAT_TEMPLATE
    id_m, id_big_m = prompts.identifier_token_ids(tokenizer)
    assert id_m != id_big_m
    # in a byte-level vocab the letters are tokens named by themselves
    assert (id_m, id_big_m) == (
        tokenizer.convert_tokens_to_ids("m"),
        tokenizer.convert_tokens_to_ids("M"),
    )
    assert tokenizer.decode([id_m]) == "m"
    assert tokenizer.decode([id_big_m]) == "M"


def test_identifier_token_ids_hand_vocab_ok():
    tokenizer = wrap(hand_bpe([("[", "[")]), "hand-ok")
    assert prompts.identifier_token_ids(tokenizer) == (
        tokenizer.convert_tokens_to_ids("m"),
        tokenizer.convert_tokens_to_ids("M"),
    )


def test_identifier_token_ids_rejects_bracket_merge():
    # "[[m" becomes one token, so no token stands for "m" alone after "[["
    tokenizer = wrap(hand_bpe([("[", "["), ("[[", "m")]), "merges-bracket-m")
    assert tokenizer.convert_ids_to_tokens(tokenizer.encode("[[m]]", add_special_tokens=False))[
        0
    ] == "[[m"
    with pytest.raises(ValueError, match="merges-bracket-m"):
        prompts.identifier_token_ids(tokenizer)


def test_identifier_token_ids_rejects_identifier_merged_with_brackets():
    # "m]]" becomes one token: the token after "[[" decodes to "m]]", not "m"
    tokenizer = wrap(hand_bpe([("]", "]"), ("m", "]]")]), "merges-m-bracket")
    with pytest.raises(ValueError, match="merges-m-bracket"):
        prompts.identifier_token_ids(tokenizer)


def test_identifier_token_ids_rejects_trained_merge():
    # a training text full of "[[m" with no regex split learns the "[[m" merge by itself
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=262,
        special_tokens=["<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(["[[m" * 50, "[[M" * 20], trainer)
    wrapped = wrap(tokenizer, "trained-bracket-m")
    assert "[[m" in wrapped.get_vocab()
    with pytest.raises(ValueError, match="trained-bracket-m"):
        prompts.identifier_token_ids(wrapped)
