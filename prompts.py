"""Judge prompts shared by cream.py and scir.py, and how they are put into a chat turn.

The pairwise templates are SCIR Table 5, the pointwise one is SCIR Table 6 (arXiv 2502.08922,
Appendix B), copied word for word; only the page layout (line breaks) is reconstructed. The
scripts read the model's replies here too: the judge's score, and the answer to a test question.
"""

import math
import re
import string
import unicodedata

# SCIR Table 5. Placeholders: {instruction}, {response_1}, {response_2}. The braces of the
# JSON-like blocks are literal text, so never use str.format on these; use _fill below.
PAIRWISE_JUDGE_TEMPLATES = (
    # Judge Prompt 1 (from AlpacaEval).
    "You are a highly efficient assistant, who evaluates and selects the best large language "
    "model (LLMs) based on the quality of their responses to a given instruction. This process "
    "will be used to create a leaderboard reflecting the most accurate and human-preferred "
    "answers. I require a leaderboard for various large language models. I'll provide you with "
    "prompts given to these models and their corresponding outputs. Your task is to assess these "
    "responses, and select the model that produces the best output from a human perspective. "
    "Here is the prompt:\n"
    "\n"
    "{\n"
    '    "instruction": "{instruction}",\n'
    "}\n"
    "\n"
    "Here are the outputs of the models:\n"
    "\n"
    "{\n"
    '    "model": "m",\n'
    '    "answer": "{response_1}"\n'
    "}\n"
    "\n"
    "{\n"
    '    "model": "M",\n'
    '    "answer": "{response_2}"\n'
    "}\n"
    "\n"
    "Evaluate the models based on the quality and relevance of their outputs, and select the "
    "model that generated the best output. Answer by providing the model identifier of the best "
    "model. We will use your output as the name of the best model, so make sure your output only "
    "contains one of the following model identifiers: [[m]] or [[M]].",
    # Judge Prompt 2 (from Chatbot Arena).
    "Please act as an impartial judge and evaluate the quality of the responses provided by two "
    "AI assistants to the user question displayed below. You should choose the assistant that "
    "follows the user's instructions and answers the user's question better. Your evaluation "
    "should consider factors such as the helpfulness, relevance, accuracy, depth, creativity, and "
    "level of detail of their responses. Avoid any position biases and ensure that the order in "
    "which the responses were presented does not influence your decision. Do not allow the length "
    "of the responses to influence your evaluation. Do not favor certain names of the assistants. "
    "Be as objective as possible.\n"
    "\n"
    "### Instruction:\n"
    "{instruction}\n"
    "\n"
    "### Response m:\n"
    "{response_1}\n"
    "\n"
    "### Response M:\n"
    "{response_2}\n"
    "\n"
    'Output your final verdict by strictly following this format: "[[m]]" if Response m is better '
    'than Response M, "[[M]]" if Response M is better than Response m.',
)

# SCIR Table 6: the Self-Rewarding (Yuan et al.) pointwise prompt, with the paper's typographic
# apostrophes and quotes. Placeholders: {instruction}, {response}.
POINTWISE_JUDGE_TEMPLATE = (
    "Review the user\u2019s question and the corresponding response using the additive 5-point "
    "scoring system described below. Points are accumulated based on the satisfaction of each "
    "criterion:\n"
    "\n"
    "- Add 1 point if the response is relevant and provides some information related to the "
    "user\u2019s inquiry, even if it is incomplete or contains some irrelevant content.\n"
    "- Add another point if the response addresses a substantial portion of the user\u2019s "
    "question, but does not completely resolve the query or provide a direct answer.\n"
    "- Award a third point if the response answers the basic elements of the user\u2019s question "
    "in a useful way, regardless of whether it seems to have been written by an AI Assistant or if "
    "it has elements typically found in blogs or search results.\n"
    "- Grant a fourth point if the response is clearly written from an AI Assistant\u2019s "
    "perspective, addressing the user\u2019s question directly and comprehensively, and is "
    "well-organized and helpful, even if there is slight room for improvement in clarity, "
    "conciseness or focus.\n"
    "- Bestow a fifth point for a response that is impeccably tailored to the user\u2019s question "
    "by an AI Assistant, without extraneous information, reflecting expert knowledge, and "
    "demonstrating a high-quality, engaging, and insightful answer.\n"
    "\n"
    "User: {instruction}\n"
    "<response>{response}</response>\n"
    "\n"
    "After examining the user\u2019s instruction and the response:\n"
    "\n"
    "- Briefly justify your total score, up to 100 words.\n"
    "- Conclude with the score using the format: \u201cScore: <total points>\u201d\n"
    "\n"
    "Remember to assess from the AI Assistant perspective. To evaluate the response in alignment "
    "with this additive scoring model, we\u2019ll systematically attribute points based on the "
    "outlined criteria."
)

# The two model identifiers of the pairwise templates: "m" is the first slot, "M" the second.
JUDGE_IDS = ("m", "M")

# The judge's answer is generated right after this text in the assistant turn, so the next
# token is the identifier. A judge SFT example has the target "[[m]]" or "[[M]]".
ANSWER_PREFIX = "[["

# User turn for tokenizers without a chat template (base models such as Mistral-7B-v0.3);
# chat_prompt puts tokenizer.bos_token in front when there is one.
FALLBACK_CHAT_FORMAT = "### Instruction:\n{user_text}\n\n### Response:\n"

# Short fixed question (and reply) used to read the chat format and the identifier tokens.
_PROBE_QUESTION = "Which is better?"
_PROBE_REPLY = "The first one."


def _fill(template, **values):
    """Replace {name} placeholders in one pass, so braces inside the values stay literal."""
    pattern = "|".join(re.escape("{" + name + "}") for name in values)
    return re.sub(pattern, lambda match: values[match.group(0)[1:-1]], template)


def judge_prompts(instruction, response_1, response_2):
    """The four judge prompts of SCIR section 3.3 (2 templates x 2 response orders).

    Returns [(prompt, id_of_response_1), ...]: template 1 with response_1 first ("m"),
    template 1 swapped ("M"), template 2 first ("m"), template 2 swapped ("M").
    """
    prompts = []
    for template in PAIRWISE_JUDGE_TEMPLATES:
        for first, second, id_of_response_1 in (
            (response_1, response_2, JUDGE_IDS[0]),
            (response_2, response_1, JUDGE_IDS[1]),
        ):
            text = _fill(template, instruction=instruction, response_1=first, response_2=second)
            prompts.append((text, id_of_response_1))
    return prompts


def fill_pointwise(instruction, response):
    """The Self-Rewarding pointwise judge prompt (SCIR Table 6) for one response."""
    return _fill(POINTWISE_JUDGE_TEMPLATE, instruction=instruction, response=response)


def chat_prompt(tokenizer, user_text):
    """One user turn as text, ending exactly where the assistant's reply begins.

    Encode the result with token_ids: BOS is already in the text (chat templates normally write
    it themselves; the fallback format gets it prepended here).
    """
    if tokenizer.chat_template:
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": user_text}], tokenize=False, add_generation_prompt=True
        )
    text = _fill(FALLBACK_CHAT_FORMAT, user_text=user_text)
    return (tokenizer.bos_token or "") + text


def reply_format(tokenizer):
    """(lead, end): the text the chat format writes before and after an assistant reply, right after
    chat_prompt(...). Mistral-7B-Instruct-v0.3's template gives (" ", "</s>"), Llama-3-Instruct's
    ("", "<|eot_id|>"); without a template, ("", EOS). Read from the template's own rendering of a
    probe exchange, so that training sequences end the way the model's replies do.
    """
    if tokenizer.chat_template:
        prompt = chat_prompt(tokenizer, _PROBE_QUESTION)
        exchange = tokenizer.apply_chat_template(
            [{"role": "user", "content": _PROBE_QUESTION},
             {"role": "assistant", "content": _PROBE_REPLY}],
            tokenize=False,
        )
        if exchange.startswith(prompt) and _PROBE_REPLY in exchange[len(prompt):]:
            lead, end = exchange[len(prompt):].split(_PROBE_REPLY, 1)
            return lead, end
    return "", tokenizer.eos_token or ""


def token_ids(tokenizer, text):
    """Token ids of chat-formatted text (chat_prompt and what follows), special tokens as written.

    A BOS written at the start becomes its id and the rest is encoded as a text of its own:
    SentencePiece tokenizers mark the first word of a text ("\u2581###"), which the same word
    after a BOS written as text would not get. Byte-level BPE (Llama-3) gives the same ids.
    """
    bos = tokenizer.bos_token
    if bos and text.startswith(bos):
        rest = tokenizer(text[len(bos):], add_special_tokens=False).input_ids
        return [tokenizer.bos_token_id] + rest
    return tokenizer(text, add_special_tokens=False).input_ids


def identifier_token_ids(tokenizer):
    """Token ids of "m" and "M" at the answer position: after chat_prompt(...), the reply's lead
    (reply_format) and "[[".

    Raises ValueError if the tokenizer does not keep the identifier as a token of its own there.
    """
    prefix = chat_prompt(tokenizer, _PROBE_QUESTION) + reply_format(tokenizer)[0] + ANSWER_PREFIX
    prefix_ids = token_ids(tokenizer, prefix)
    ids = []
    for identifier in JUDGE_IDS:
        full_ids = token_ids(tokenizer, prefix + identifier + "]]")
        if full_ids[: len(prefix_ids)] != prefix_ids or len(full_ids) <= len(prefix_ids):
            raise ValueError(
                f"tokenizer {tokenizer.name_or_path!r}: the tokens of '...{ANSWER_PREFIX}"
                f"{identifier}]]' do not start with the tokens of the prompt ending in "
                f"'{ANSWER_PREFIX}'"
            )
        token_id = full_ids[len(prefix_ids)]
        decoded = tokenizer.decode([token_id])
        if decoded != identifier:
            raise ValueError(
                f"tokenizer {tokenizer.name_or_path!r}: the token after '{ANSWER_PREFIX}' "
                f"decodes to {decoded!r}, not {identifier!r}"
            )
        ids.append(token_id)
    if ids[0] == ids[1]:
        raise ValueError(
            f"tokenizer {tokenizer.name_or_path!r}: 'm' and 'M' map to the same token id {ids[0]}"
        )
    return ids[0], ids[1]


# --- The Table 6 judge's reply: its score ---
SCORE = re.compile(r"(?i:score)\**(?:\s*[:：=]|\s+of|\s+is)?[\s*\[<]*"
                   r"(\d+(?:\.\d+)?(?:\s*\+\s*\d+(?:\.\d+)?)*(?:\s*=\s*\d+(?:\.\d+)?)?)"  # N, 1+1=2
                   r"[\]>*]*(?:\s*(?:/|out of)\s*(\d+))?")  # an optional denominator


def parse_score(judgement):
    """The last 'Score: N' of a judgement, N in 0..5, else None. '**Score:** 4', 'score of 4',
    'Score: 4/5' and 'Score: 3 + 1 = 4' count; 'Score: 5/10' is on another scale."""
    scores = []
    for tally, denominator in SCORE.findall(judgement):
        if denominator and denominator != "5":
            continue
        total = (float(tally.split("=")[-1]) if "=" in tally
                 else sum(float(term) for term in tally.split("+")))
        if 0 <= total <= 5:
            scores.append(total)
    return scores[-1] if scores else None


# --- Test questions (the scripts' --evaluate): how to state the answer, and reading it back ---
# Only test questions get this line; the prompt pools keep their prompts as they are
EVAL_SUFFIX = {
    "choice": "\n\nEnd your reply with 'Answer: X', where X is the letter of the correct option.",
    "number": "\n\nSolve it step by step and end your reply with 'Answer: N', where N is the final "
              "number."}
NUMBER = r"-?(?:\d[\d,]*(?:\.\d+)?|\.\d+)"  # a gold answer: '1,234', '-2.5', '.5'
# The strict rule: "Answer:" as the prompt asks for it, markdown bold allowed around it or after it
STATED = r"\bAnswer(?:\*\*)?:(?:\*\*)?\s*(?:\*\*)?"
# lm-evaluation-harness's GSM8K flexible extract (gsm8k-cot-zeroshot.yaml): the last match wins
HARNESS_NUMBER = r"(-?[$0-9.,]{2,})|(-?[0-9]+)"
# a number read from a reply that is_correct compares by value: not '42.' (from '42..'), which
# the harness, comparing text, does not take for 42 either
PLAIN_NUMBER = r"-?(?:\d+(?:\.\d+)?|\.\d+)"


def answer_kind(answer):
    """A test question's answer: 'choice' (a letter A-E), 'number', or None (neither)."""
    if re.fullmatch(r"[A-E]", answer):
        return "choice"
    return "number" if re.fullmatch(NUMBER, answer) else None


def eval_prompt(row):
    """A test question as the model sees it: the question, then how to state the answer."""
    return row["prompt"] + EVAL_SUFFIX[answer_kind(row["answer"])]


def options(prompt):
    """The option texts of a multiple-choice question: its last run of lines 'A. ...', 'B. ...'
    (as both scripts and eval.jsonl write them) -> [text of A, text of B, ...], [] if none."""
    blocks = re.findall(r"^A\. .*(?:\n[B-Z]\. .*)*", prompt, re.MULTILINE)
    return [line[3:] for line in blocks[-1].split("\n")] if blocks else []


def strict_answer(reply, kind):
    """The strict rule: the answer stated as the prompt asks, after the last 'Answer:' that states
    one -> a letter, or a number without '$' and commas; None if no 'Answer:' states one.

    'Answer' is capitalised as asked; '**Answer:**', '**Answer**:' and 'Final Answer:' count, and
    so does bold or a parenthesis around the answer ('Answer: **(B)**'). A letter is a capital
    standing alone: 'Answer: A cell wall' states A, 'Answer: Approximately' no letter. A number
    is the first one after 'Answer:', '-$5' as -5: 'Answer: 3 x 4 = 12' states 3, and commas
    count only between groups of three digits: 'Answer: 1,2,3' states 1. '\\boxed{}',
    lower case 'answer:' and 'The answer is' are no statement in this format.
    """
    # a number: commas only as thousands separators ('1,234'; '1,2,3' states 1)
    value = r"\(?([A-Z])\b" if kind == "choice" else (
        r"(-?\$?(?:(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?|\.\d+))")
    found = re.findall(STATED + value, reply)
    return found[-1].replace("$", "").replace(",", "") if found else None


def _plain(text):
    """Text as the harness's multiple-choice filter compares it: lower case, no punctuation
    (Unicode categories P*)."""
    return "".join(c for c in text.lower() if not unicodedata.category(c).startswith("P"))


def flexible_answer(reply, kind, choices=()):
    """The flexible rule: lm-evaluation-harness's flexible extract -> a letter or a number text;
    None where the harness reads nothing (or, for letters, something that is no letter).

    Numbers (its GSM8K tasks): the last match of HARNESS_NUMBER, '$' and commas dropped and one
    final '.' (a sentence's full stop), as its exact match drops them: 'Answer: 42. (I checked
    3 times.)' reads 3. Letters (its MMLU flan CoT zero-shot task): the last '(X)', any capital;
    else the last option text found in the reply (both in lower case without punctuation); else
    the last ':' followed by an option's letter, spaces between: 'Answer: A cell wall' reads A.
    choices: the option texts in order, A first (options(prompt)).
    """
    if kind == "number":
        found = re.findall(HARNESS_NUMBER, reply)
        if not found:
            return None
        return "".join(found[-1]).replace("$", "").replace(",", "").removesuffix(".")
    found = re.findall(r"\(([A-Z])\)", reply)
    if found:
        return found[-1]
    if not choices:
        return None
    letter_of = {}
    for letter, text in zip(string.ascii_uppercase, choices):
        letter_of[_plain(text.strip())] = letter  # the same text twice: the later letter
    found = re.findall("|".join(map(re.escape, letter_of)), _plain(reply))
    if found and found[-1].strip():  # a match that is no option's whole text reads as no letter
        return letter_of.get(found[-1].strip())
    found = re.findall(rf":\s*([{string.ascii_uppercase[:len(choices)]}])", reply)
    return found[-1] if found else None


def is_correct(extracted, answer):
    """An extracted answer against the gold one: letters exactly; numbers by value, where the
    harness compares text ('.5' is 0.5 here, not there; GSM8K's gold answers are integers)."""
    if extracted is None:
        return False
    if answer_kind(answer) == "choice":
        return extracted == answer
    if not re.fullmatch(PLAIN_NUMBER, extracted):
        return False
    return math.isclose(float(extracted), float(answer.replace(",", "")), abs_tol=1e-6)


def read_answers(row, reply):
    """A reply to a test question {prompt, answer} read by both rules -> {strict, flexible,
    correct_strict, correct_flexible}."""
    kind = answer_kind(row["answer"])
    strict = strict_answer(reply, kind)
    flexible = flexible_answer(reply, kind, options(row["prompt"]))
    return {"strict": strict, "flexible": flexible,
            "correct_strict": is_correct(strict, row["answer"]),
            "correct_flexible": is_correct(flexible, row["answer"])}


# --- The demo (--demo): instructions with a right and a wrong answer, offline ---
DEMO_DATA = [
    ("Name a primary color.", "Red is a primary color.", "Cats like milk."),
    ("What is 2 + 3?", "2 + 3 = 5.", "2 + 3 = 7."),
    ("Give a synonym for happy.", "Glad is a synonym for happy.", "Sad."),
    ("What do bees make?", "Bees make honey.", "Bees make cars."),
    ("Translate 'hola' to English.", "'Hola' means hello.", "'Hola' means goodbye."),
    ("What is the capital of France?", "The capital of France is Paris.", "Berlin."),
    ("How many legs does a spider have?", "A spider has eight legs.", "Two."),
    ("What is the opposite of cold?", "The opposite of cold is hot.", "Cold."),
    ("Which planet is called the red planet?", "Mars is called the red planet.", "The Moon."),
    ("What gas do plants take in?", "Plants take in carbon dioxide.", "Plants take in gold."),
    ("What is 10 minus 4?", "10 minus 4 is 6.", "10 minus 4 is 9."),
    ("Name a mammal that can fly.", "The bat is a mammal that can fly.", "The fish."),
    ("What freezes at zero degrees Celsius?", "Water freezes at zero degrees Celsius.", "Fire."),
    ("How many days are in a week?", "A week has seven days.", "A week has ten days."),
    ("What color is the sky on a clear day?", "The sky is blue on a clear day.", "Green."),
    ("Who wrote Hamlet?", "William Shakespeare wrote Hamlet.", "Nobody."),
]
