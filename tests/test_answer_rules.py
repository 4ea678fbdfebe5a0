"""The two rules that read a reply to a test question (prompts.py), against lm-evaluation-harness.

The harness's published patterns are copied below as data, with the file each comes from, and its
filters are re-implemented here from their documented behaviour (findall, the group_select-th
match, its first non-empty group, stripped; the multiple-choice fallbacks; the exact-match
normalisation). Every reply is read by that re-implementation and by prompts.flexible_answer,
and the two must agree on the answer read and on whether it is right. The strict rule is this
code's own (the format the prompt asks for), checked against expectations written by hand.
"""

import re
import string
import sys
import unicodedata

import pytest

import prompts

# --- lm-evaluation-harness (github.com/EleutherAI/lm-evaluation-harness), copied as data ---
# lm_eval/tasks/gsm8k/gsm8k-cot-zeroshot.yaml: filter "flexible-extract" (function "regex",
# group_select -1, then take_first), and exact_match's regexes_to_ignore with ignore_case: true
GSM8K_FLEXIBLE = "(-?[$0-9.,]{2,})|(-?[0-9]+)"
GSM8K_GROUP_SELECT = -1
GSM8K_IGNORE = [",", "\\$", "(?s).*#### ", "\\.$", "\\.0+$"]
# lm_eval/tasks/mmlu/flan_cot_zeroshot/_mmlu_flan_cot_zeroshot_template_yaml: "flexible-extract"
# (function "multi_choice_regex", group_select -1, ignore_case and ignore_punctuation true); the
# targets are "(A)" .. "(D)", scored by exact_match with ignore_case and ignore_punctuation
MMLU_FLEXIBLE = "(\\([A-Z]\\))"
MMLU_GROUP_SELECT = -1
# lm_eval/filters/extraction.py, MultiChoiceRegexFilter: step 1, the option texts joined by "|"
# (each stripped, normalised and re.escape'd); step 2, this pattern with the letters joined by "|"
COLON_LETTER = ":[\\s]*({})"
INVALID = "[invalid]"  # RegexFilter's fallback


def harness_find(pattern, text, group_select):
    """RegexFilter's reading: all matches, the group_select-th, its first non-empty group, stripped;
    an empty list (falsy) when nothing matches."""
    matches = re.findall(pattern, text)
    if not matches:
        return matches
    chosen = matches[group_select]
    if isinstance(chosen, tuple):
        chosen = [group for group in chosen if group][0]
    return chosen.strip()


PUNCTUATION = {code: None for code in range(sys.maxunicode)
               if unicodedata.category(chr(code))[0] == "P"}


def harness_normalise(text):
    """ignore_case and ignore_punctuation as the multiple-choice filter applies them."""
    return text.lower().translate(PUNCTUATION)


def harness_choice_right(reading, gold):
    """exact_match against the target "(X)", with ignore_case and ignore_punctuation as the metric
    applies them (lm_eval/api/metrics.py: string.punctuation only)."""
    def plain(text):
        return text.lower().translate(str.maketrans("", "", string.punctuation))
    return plain(reading) == plain(f"({gold})")


def harness_gsm8k(reply):
    """The flexible extract, then the metric's normalisation -> the text exact_match compares."""
    found = harness_find(GSM8K_FLEXIBLE, reply, GSM8K_GROUP_SELECT) or INVALID
    for pattern in GSM8K_IGNORE:
        found = re.sub(pattern, "", found)
    return found.lower()


def harness_mmlu(reply, choices):
    """MultiChoiceRegexFilter with the MMLU flan CoT zero-shot settings -> "(X)" or another text."""
    found = harness_find(MMLU_FLEXIBLE, reply, MMLU_GROUP_SELECT)
    if not found:
        letters = [chr(ord("A") + i) for i in range(len(choices))]
        texts = [harness_normalise(choice.strip()) for choice in choices]
        label = {text: f"({letter})" for text, letter in zip(texts, letters)}
        found = harness_find("|".join(re.escape(text) for text in texts),
                             harness_normalise(reply), MMLU_GROUP_SELECT)
        if found and found in label:
            found = label[found]
        if not found:
            found = harness_find(COLON_LETTER.format("|".join(letters)), reply, MMLU_GROUP_SELECT)
            found = f"({found})" if found else found
    return found or INVALID


def harness_number_right(reading, gold):
    target = gold
    for pattern in GSM8K_IGNORE:
        target = re.sub(pattern, "", target)
    return reading == target.lower()


# --- The replies: (reply, gold, strict by hand, flexible by hand) ---
ISSUE_TABLE = [  # the six of issue 19's table; the last is a choice question (CELL below)
    ("Answer: 10 = 7 + 3", "10", "10", "3"),
    ("Answer: 3 x 4 = 12", "12", "3", "12"),
    ("#### 1. Cost ... Answer: 42", "42", "42", "42"),
    ("Answer: 42. (I checked my answer 3 times.)", "42", "42", "3"),
    ("Answer: -$5", "-5", "-5", "-5"),
]
NUMBER_REPLIES = ISSUE_TABLE + [
    ("She buys 3 packs of 12 eggs, so 3 * 12 = 36 eggs.\nAnswer: 36", "36", "36", "36"),
    ("**Answer:** 18", "18", "18", "18"),
    ("**Answer**: 18", "18", "18", "18"),
    ("**Answer: 1,234**", "1234", "1234", "1234"),
    ("Answer: $1,000,000", "1000000", "1000000", "1000000"),
    ("In 2 weeks she saves 7 x 2 = $14.\nAnswer: $14", "14", "14", "14"),
    ("The total is $\\boxed{42}$.", "42", None, ""),              # "$." is the last match
    ("Answer: \\boxed{72}", "72", None, "72"),
    ("The answer is \\(\\boxed{1,000}\\)", "1000", None, "1000"),
    ("So the answer is 15.", "15", None, "15"),
    ("The final answer is 1,250.", "1250", None, "1250"),
    ("She loses $5, so the change is -5.\nAnswer: -5", "-5", "-5", "-5"),
    ("Total: -12 degrees", "-12", None, "-12"),
    ("Answer: \u22124", "-4", None, "4"),                         # a Unicode minus is no sign
    ("Answer: 12 or 13", "12", "12", "13"),                       # hedges
    ("I think it is 8, but it could be 9.", "8", None, "9"),
    ("Answer: 8 (or maybe 9)", "8", "8", "9"),
    ("It takes 2.5 hours.\nAnswer: 2.5", "2.5", "2.5", "2.5"),
    ("Answer: 1.5 hours...", "1.5", "1.5", ".."),                 # an ellipsis is the last match
    ("That makes 42..", "42", None, "42."),
    ("Answer: 3,000.", "3000", "3000", "3000"),
    ("Answer: 5.0", "5", "5.0", "5.0"),
    ("Answer: 30%", "30", "30", "30"),
    ("Answer: 10:30", "10", "10", "30"),
    ("Step 1: 4 + 4 = 8\nStep 2: 8 * 2 = 16\nAnswer: 16", "16", "16", "16"),
    ("Answer: 7\n\nExplanation: 3 + 4 = 7 apples in 2 baskets.", "7", "7", "2"),
    ("answer: 7", "7", None, "7"),                                # not the format asked for
    ("The answer: 7", "7", None, "7"),
    ("Final Answer: 7", "7", "7", "7"),
    ("Answer:7", "7", "7", "7"),
    ("#### 72", "72", None, "72"),
    ("I don't know.", "3", None, None),
    ("", "3", None, None),
    # the replies the earlier extractor's tests (tests/test_baselines.py) read
    ("#### 1,234", "1234", None, "1234"),
    ("The answer is 1,234.", "1234", None, "1234"),
    ("so 3 + 4 = 7", "7", None, "7"),
    ("Answer: -12.5", "-12.5", "-12.5", "-12.5"),
    ("She pays $18 a day.\n#### 72\nAnswer: 5", "72", "5", "5"),
    ("no number here", "3", None, None),
    ("**Answer:** 18 (3 more than 15)", "18", "18", "15"),
    ("Answer - 18 (not 20)", "18", None, "20"),
    ("Answer = 18 (not 20)", "18", None, "20"),
    ("Answer: -5 (not 3)", "-5", "-5", "3"),
    ("Answer: 7 + 3 = 10", "10", "7", "10"),
    ("Answer: 2 * (3 + 4) = 14 apples", "14", "2", "14"),
    ("Answer: 1,000 + 2,000 = 3,000", "3000", "1000", "3000"),
    # a list is no number: strict reads its first item; the harness drops the commas (issue 20)
    ("Answer: 1,2,3", "123", "1", "123"),
    ("Answer: 3. Then 2 + 2 = 4", "3", "3", "4"),
    ("Answer: 5\n3 + 4 = 7", "5", "5", "7"),
    ("Answer: \\boxed{10}", "10", None, "10"),
    ("The total is \\boxed{42}, 7 more than 35.", "42", None, "35"),
]
COLORS = "Which is a primary color?\nA. Green\nB. Red\nC. Pink\nD. Brown"
CELL = "What does a plant cell have?\nA. Chloroplast\nB. Cell membrane\nC. Mitochondria\nD. Nucleus"
CELL_WALL = "What does a plant cell have?\nA. Nucleus\nB. Cell membrane\nC. Cell wall\nD. Lysosome"
WEATHER = ("It rained all day. What is likely?\nA. It's wet.\nB. It's dry.\nC. It's hot.\n"
           "D. It's cold.\nE. None of these")
CHOICE_REPLIES = [  # (question, reply, gold, strict by hand, flexible by hand)
    (CELL, "Answer: A cell wall ...", "A", "A", "A"),             # issue 19's sixth reply
    (CELL_WALL, "Answer: A cell wall ...", "C", "A", "C"),        # an option's text, read last
    (COLORS, "(B)", "B", None, "B"),
    (COLORS, "Answer: B", "B", "B", "B"),
    (COLORS, "Answer: (B) Red", "B", "B", "B"),
    (COLORS, "**Answer:** B", "B", "B", None),                    # '**' after the colon
    (COLORS, "Answer: **B**", "B", "B", None),
    (COLORS, "**Answer: B**", "B", "B", "B"),
    (COLORS, "The answer is (B) Red.", "B", None, "B"),
    (COLORS, "Red is a primary color.", "B", None, "B"),
    (COLORS, "I would pick red, not green.", "B", None, "A"),     # the last option text named
    (COLORS, "Answer: b", "B", None, None),                       # letters in upper case only
    (COLORS, "a", "A", None, None),                               # never the word 'a'
    (COLORS, "It is a fact that a b c d", "A", None, None),
    (COLORS, "Answer: B or C", "B", "B", "B"),                    # a hedge: C follows no colon
    (COLORS, "Answer: \\boxed{B}", "B", None, None),
    (COLORS, "$\\boxed{C}$", "C", None, None),
    (COLORS, "Note: Both A and C are wrong. Answer: B", "B", "B", "B"),
    (COLORS, "Answer: B\n\nNote: Doubtful.", "B", "B", "D"),      # ': D', as the harness reads
    (COLORS, "(A) is wrong, so the answer is (B).", "B", None, "B"),
    (COLORS, "Answer: (B)\n(C) would be wrong.", "B", "B", "C"),
    (COLORS, "Answer: I think B", "B", "I", None),
    (COLORS, "The correct option is B.", "B", None, None),
    (COLORS, "Answer: Approximately red", "B", None, "B"),
    (COLORS, "My answer is: C", "C", None, "C"),
    (COLORS, "Answer: [B]", "B", None, None),
    (COLORS, "Answer: E", "B", "E", None),                        # no option E
    (COLORS, "I am not sure.", "B", None, None),
    (WEATHER, "It's wet, surely.", "A", None, "A"),               # punctuation ignored
    (WEATHER, "Answer: E", "E", "E", "E"),
    (WEATHER, "**Answer:** (E) None of these", "E", "E", "E"),
    (WEATHER, "(i) it rained (ii) so: A", "A", None, "A"),        # '(i)' is not upper case
    # the replies the earlier extractor's tests (tests/test_baselines.py) read
    (COLORS, "Answer: C.", "C", "C", "C"),
    (COLORS, "The answer is (D) because it is hot", "D", None, "D"),
    (COLORS, "I think the answer is B", "B", None, None),
    (COLORS, "A", "A", None, None),
    (COLORS, "B.", "B", None, None),
    (COLORS, "A cat sat on the mat", "A", None, None),
    (COLORS, "b", "B", None, None),
    (COLORS, "Mars is a planet. Answer: A", "A", "A", "A"),
    (WEATHER, "answer: E", "E", None, "E"),
    (COLORS, "**Answer:** C", "C", "C", None),
    (COLORS, "The answer is option C", "C", None, None),
    (WEATHER, "answer: E.g. the first one", "A", None, "E"),
    (COLORS, "\\boxed{B}", "B", None, None),
    (COLORS, "So the option is $\\boxed{C}$.", "C", None, None),
    (COLORS, "Answer: B\n\n(Answer A would be wrong.)", "B", "B", "B"),
    (COLORS, "Answer A would be wrong.", "B", None, None),
    (COLORS, "**Answer**: D", "D", "D", "D"),
    (WEATHER, "The answer is: E", "E", None, "E"),
    (COLORS, "Answer: a", "A", None, None),
    (COLORS, "Answer: [B] or [C]", "B", None, None),
]


@pytest.mark.parametrize("reply, gold, strict, flexible", NUMBER_REPLIES)
def test_number_replies_read_as_the_harness_reads_them(reply, gold, strict, flexible):
    assert prompts.strict_answer(reply, "number") == strict
    ours = prompts.flexible_answer(reply, "number")
    assert ours == flexible
    reading = harness_gsm8k(reply)  # what the harness compares; '.0+' dropped on both sides
    assert (ours is None) == (reading == INVALID)
    if ours is not None:
        assert reading == re.sub(r"\.0+$", "", ours)
    assert prompts.is_correct(ours, gold) == harness_number_right(reading, gold)


@pytest.mark.parametrize("question, reply, gold, strict, flexible", CHOICE_REPLIES)
def test_choice_replies_read_as_the_harness_reads_them(question, reply, gold, strict, flexible):
    choices = prompts.options(question)
    assert prompts.strict_answer(reply, "choice") == strict
    ours = prompts.flexible_answer(reply, "choice", choices)
    assert ours == flexible
    reading = harness_mmlu(reply, choices)
    letter = re.fullmatch(r"\(([A-Z])\)", reading)
    assert ours == (letter.group(1) if letter else None)
    assert prompts.is_correct(ours, gold) == harness_choice_right(reading, gold)


def test_the_reply_set_is_large_and_has_every_shape():
    replies = [row[0] for row in NUMBER_REPLIES] + [row[1] for row in CHOICE_REPLIES]
    assert len(replies) >= 60 and len(set(replies)) >= 55
    for shape in ("**", "\\boxed", "$", ",", "-", " or ", "(B)", "Note"):
        assert any(shape in reply for reply in replies), shape


def test_options_are_the_last_lettered_lines():
    assert prompts.options(COLORS) == ["Green", "Red", "Pink", "Brown"]
    assert prompts.options("A. Not an option\nWhich?\nA. x\nB. y") == ["x", "y"]
    assert prompts.options("How many?") == []


def test_read_answers_records_both_rules():
    row = {"prompt": "What is 7 + 3?", "answer": "10"}
    assert prompts.read_answers(row, "Answer: 10 = 7 + 3") == {
        "strict": "10", "flexible": "3", "correct_strict": True, "correct_flexible": False}
    row = {"prompt": COLORS, "answer": "B"}
    assert prompts.read_answers(row, "I would pick red.") == {
        "strict": None, "flexible": "B", "correct_strict": False, "correct_flexible": True}


def test_a_number_without_its_leading_zero_is_read_by_value():
    """'.5' is 0.5 here; the harness, comparing text, would score it wrong against '0.5'."""
    assert prompts.strict_answer("Answer: .5", "number") == ".5"
    assert prompts.flexible_answer("Answer: .5", "number") == ".5"
    assert prompts.is_correct(".5", "0.5") and not prompts.is_correct(".5", "5")
    assert prompts.strict_answer("Answer: -.25", "number") == "-.25"
    assert not harness_number_right(harness_gsm8k("Answer: .5"), "0.5")


def test_is_correct_compares_numbers_by_value_and_letters_exactly():
    assert prompts.is_correct("1234", "1,234") and prompts.is_correct("1234.0", "1234")
    assert prompts.is_correct(".5", "0.5") and prompts.is_correct("-.25", "-0.25")  # by value
    assert not prompts.is_correct("1235", "1234") and not prompts.is_correct(None, "5")
    assert not prompts.is_correct("42.", "42") and not prompts.is_correct("..", "42")  # no number
    assert prompts.is_correct("C", "C") and not prompts.is_correct("c", "C")
