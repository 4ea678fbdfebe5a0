"""The reader's path (README, 'Where each equation lives'): both scripts in the same three parts, the
paper's part short enough to read next to the paper, and the same job under the same name.

Read from the source text and its syntax tree, not from the imported modules.
"""

import ast
import re

import pytest

from conftest import ROOT

PARTS = ("The paper", "Beyond the paper", "Plumbing")
CORE_LINES = {"scir.py": 720, "cream.py": 465}  # about one sitting next to the paper
# Shared names whose parameters differ on purpose: scir.py also loads the external reward model,
# its judge prompts end in the start of the judge's answer, SCIR's SFT adds judge examples, and
# each paper's table is made of what its own run measures
SIGNATURES_DIFFER = {"load_model", "encode", "run_sft", "final_table"}


def part_banners(script):
    """(line number, part name) of each '# ======== <part>: ...' banner of script."""
    lines = (ROOT / script).read_text().splitlines()
    return [(number, match.group(1)) for number, line in enumerate(lines, 1)
            if (match := re.match(r"# =+ (The paper|Beyond the paper|Plumbing)\b", line))]


@pytest.mark.parametrize("script", ["scir.py", "cream.py"])
def test_three_parts_in_order_and_a_short_paper_part(script):
    banners = part_banners(script)
    assert [name for _, name in banners] == list(PARTS)
    beyond = dict((name, number) for number, name in banners)["Beyond the paper"]
    assert beyond - 1 <= CORE_LINES[script], f"{script}: the paper's part has {beyond - 1} lines"
    lines = (ROOT / script).read_text().splitlines()
    assert max(map(len, lines)) <= 100


@pytest.mark.parametrize("script", ["scir.py", "cream.py"])
def test_the_parts_hold_what_the_readme_says(script):
    """The equations and the loop come before 'Beyond the paper'; the fp32 head's autograd
    function, the optimizer, the training loop and torchrun after 'Plumbing'."""
    tree = ast.parse((ROOT / script).read_text())
    where = {node.name: node.lineno for node in tree.body
             if isinstance(node, (ast.FunctionDef, ast.ClassDef))}
    banners = {name: number for number, name in part_banners(script)}
    paper = ["Args", "main", "sequence_logps", "run_sft", "run_sampling"]
    paper += (["dpo_loss", "implicit_preference", "judge_probability", "consistency_loss",
               "adaptive_reference_logratio", "scir_loss", "scir_iteration", "scir_batch_loss"]
              if script == "scir.py" else
              ["dpo_rewards", "kendall_tau", "consistency_rate", "build_pairs", "soft_dpo_loss",
               "run_preference_training"])
    plumbing = ["TokenLogps", "adamw_step", "train", "share_of", "data_parallel", "parse_args",
                "check_args", "build_demo", "cached", "load_model"]
    for name in paper:
        assert where[name] < banners["Beyond the paper"], name
    for name in plumbing:
        assert where[name] > banners["Plumbing"], name


def top_level_functions(script):
    tree = ast.parse((ROOT / script).read_text())
    return {node.name: node for node in tree.body if isinstance(node, ast.FunctionDef)}


def test_a_helper_in_both_scripts_has_the_same_parameters():
    scir, cream = top_level_functions("scir.py"), top_level_functions("cream.py")
    shared = set(scir) & set(cream)
    assert {"cached", "cached_logps", "batched_logps", "response_logps", "judge_samples",
            "eval_answers", "eval_questions", "train", "locked", "sample_responses"} <= shared
    for name in sorted(shared - SIGNATURES_DIFFER):
        parameters = [[a.arg for a in f.args.args] for f in (scir[name], cream[name])]
        assert parameters[0] == parameters[1], name


@pytest.mark.parametrize("script", ["scir.py", "cream.py"])
def test_no_lambda_is_named_or_spans_lines(script):
    tree = ast.parse((ROOT / script).read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign):
            assert not isinstance(node.value, ast.Lambda), f"line {node.lineno}"
        if isinstance(node, ast.Lambda):
            assert node.lineno == node.end_lineno, f"line {node.lineno}"
