"""The README says what the code does (README, 'Where each equation lives' and 'Departures'):
every function its equation tables name exists where they say, and the departures list names the
choices the code makes where the papers are silent or say otherwise.

Read from the text of README.md and the scripts' syntax trees.
"""

import ast
import re

from conftest import ROOT

README = (ROOT / "README.md").read_text()


def defined(script):
    tree = ast.parse((ROOT / script).read_text())
    names = {node.name for node in tree.body if isinstance(node, (ast.FunctionDef, ast.ClassDef))}
    return names | {target.id for node in tree.body if isinstance(node, ast.Assign)
                    for target in node.targets if isinstance(target, ast.Name)}


def section(title):
    start = README.index(title)
    return README[start: README.index("\n## ", start + 1)]


def table_functions(text):
    """The names in the 'function' column (the last) of each table row of text."""
    names = set()
    for line in text.splitlines():
        if line.startswith("|") and not line.startswith(("| paper", "|---")):
            names |= set(re.findall(r"`([A-Za-z_][A-Za-z0-9_.]*)", line.rsplit("|", 2)[-2]))
    return names


def test_every_function_the_equation_tables_name_exists():
    tables = section("## Where each equation lives")
    cream_part, scir_part = tables.split("SCIR, [`scir.py`](scir.py)")
    prompts = defined("prompts.py")
    for script, text in (("cream.py", cream_part), ("scir.py", scir_part)):
        names = table_functions(text)
        assert len(names) > 15, script
        for name in names:
            # a name without 'prompts.' may be one the script imports from prompts.py
            assert name.removeprefix("prompts.") in (
                prompts if name.startswith("prompts.") else defined(script) | prompts), name


def test_the_departures_name_the_choices_made_where_the_papers_are_silent():
    departures = section("## Departures from the papers")
    for choice in ("Yuan et al. average three",  # SRLM: one sampled judgement
                   "randomly sample 500 examples from Oasst2",  # the oasst2 filter
                   "`--no_dcpo` drops Eq. 7's DPO term entirely",
                   "`--single_judge_prompt` takes Q from template 1 with y1 shown first",
                   "`pointwise.jsonl`",  # SRLM's judge data: a 70B judge's, not public
                   "sampled at the paper's temperature"):  # SCIR's evaluation decoding
        assert choice in departures, choice
    assert "There is no DDP wrapper" not in departures  # torchrun trains with FSDP2
