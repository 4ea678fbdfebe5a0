"""The functions people copy run when copied.

Each named function is copied out of its script with the module-level definitions it reaches
(found by reading the source, not by importing the script) and the script's own import lines
for the names it uses, into a fresh file next to a copy of prompts.py. The copied file may import
only the standard library, torch, transformers and prompts. It is then run on cases with an
independent answer: a formula written out, brute force over pairs, or a full-vocabulary
log-softmax of the tiny model, one unpadded sequence at a time.
"""

import ast
import importlib.util
import math
import shutil
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
ALLOWED = {"torch", "transformers", "prompts"} | set(sys.stdlib_module_names)


def module_definitions(tree):
    """name -> top-level node (def, class or assignment) of a parsed script."""
    names = {}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names[node.name] = node
        elif isinstance(node, ast.Assign):
            for target in node.targets:
                if isinstance(target, ast.Name):
                    names[target.id] = node
    return names


def used_names(node):
    return {n.id for n in ast.walk(node) if isinstance(n, ast.Name)} | {
        n.value.id for n in ast.walk(node)
        if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name)}


def copy_functions(script, names, folder):
    """Write `names` of script and what they reach to folder/copied_<script>.py; import it."""
    source = (ROOT / script).read_text()
    tree = ast.parse(source)
    definitions = module_definitions(tree)
    imports = {}  # bound name -> import line
    for node in tree.body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            for alias in node.names:
                line = (f"import {alias.name}" if isinstance(node, ast.Import)
                        else f"from {node.module} import {alias.name}")
                bound = alias.asname or alias.name.split(".")[0]
                imports[bound] = line + (f" as {alias.asname}" if alias.asname else "")
    wanted, todo = set(), list(names)
    while todo:
        name = todo.pop()
        if name in wanted or name not in definitions:
            continue
        wanted.add(name)
        todo += used_names(definitions[name])
    nodes = sorted({id(definitions[n]): definitions[n] for n in wanted}.values(),
                   key=lambda node: node.lineno)
    needed = {n for node in nodes for n in used_names(node)} & set(imports)
    modules = {imports[n].split()[1].split(".")[0] for n in needed}
    assert modules <= ALLOWED, f"{script}: copied functions need {modules - ALLOWED}"
    text = "\n".join(sorted(imports[n] for n in needed)) + "\n\n\n"
    text += "\n\n\n".join(ast.get_source_segment(source, node) for node in nodes) + "\n"
    shutil.copy(ROOT / "prompts.py", folder / "prompts.py")
    path = folder / f"copied_{Path(script).stem}.py"
    path.write_text(text)
    sys.path.insert(0, str(folder))
    try:
        spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(folder))
        sys.modules.pop("prompts", None)  # the tests' own prompts import stays the project's
    return module, text


def brute_logp(model, prompt_ids, response_ids):
    """log pi(response | prompt) from the full-vocabulary logits of one unpadded sequence."""
    ids = torch.tensor([prompt_ids + response_ids])
    with torch.no_grad():
        logps = model(input_ids=ids).logits[0, :-1].float().log_softmax(-1)
    return sum(logps[len(prompt_ids) - 1 + k, t].item() for k, t in enumerate(response_ids))


def sequence_logps_against_brute_force(module, model):
    cases = [([1, 5, 9, 14], [20, 31, 2]), ([1, 7], [8, 9, 10, 11, 2])]
    width = max(len(p) + len(r) for p, r in cases)
    input_ids = torch.zeros(len(cases), width, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    response_mask = torch.zeros_like(input_ids)
    for row, (p, r) in enumerate(cases):
        input_ids[row, : len(p) + len(r)] = torch.tensor(p + r)
        attention_mask[row, : len(p) + len(r)] = 1
        response_mask[row, len(p): len(p) + len(r)] = 1
    with torch.no_grad():
        got = module.sequence_logps(model, input_ids, attention_mask, response_mask)
    assert got.tolist() == pytest.approx([brute_logp(model, p, r) for p, r in cases], abs=1e-4)


def test_scir_functions_run_when_copied(tmp_path, tiny_model, tiny_model_dir):
    names = ["scir_loss", "consistency_loss", "generative_preference", "sequence_logps",
             "implicit_preference"]
    module, text = copy_functions("scir.py", names, tmp_path)
    assert "def fail" not in text and "Args" not in text
    # Eq. 7 by hand: P = sigmoid(0.5 * 2) prefers y1, Q = 0.8 agrees; neither reference ratio
    # beats 0 against a local one of 1, so the DPO margin is 0.5 * (2 - 1)
    pi1, pi2, zero = torch.tensor([2.0]), torch.tensor([0.0]), torch.zeros(1)
    p = module.implicit_preference(pi1, pi2, zero, zero, 0.5)
    terms = module.scir_loss(pi1, pi2, p, torch.tensor([0.8]), torch.tensor([1.0]), zero, zero,
                             zero, 0.5, 1.0, 0.7)
    p_value, q = 1 / (1 + math.exp(-1.0)), 0.8

    def kl_plus_entropy(a, b):  # KL(Bern(a) || Bern(b)) + H(Bern(a)) = cross-entropy
        return -(a * math.log(b) + (1 - a) * math.log(1 - b))
    expected = math.log(1 + math.exp(-0.5)) + kl_plus_entropy(q, p_value) + kl_plus_entropy(
        p_value, q)
    assert terms["loss"].item() == pytest.approx(expected, rel=1e-5)
    assert module.consistency_loss(torch.tensor([0.6]), torch.tensor([0.6]), 0.7).item() == 0.0
    sequence_logps_against_brute_force(module, tiny_model)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)  # padded with EOS, as scir.py does
    tokenizer.pad_token = tokenizer.eos_token
    ids = (5, 6)
    q = module.generative_preference(tiny_model, tokenizer, ["Name a color."], ["Red."],
                                     ["Blue is a color."], ids, 0.0, 4096)
    assert q.shape == (1, 4)
    import prompts  # the judge prompts, one unpadded forward each

    expected = []
    for text, id_of_response_1 in prompts.judge_prompts("Name a color.", "Red.",
                                                        "Blue is a color."):
        chat = prompts.chat_prompt(tokenizer, text) + prompts.reply_format(tokenizer)[0]
        prompt_ids = prompts.token_ids(tokenizer, chat + prompts.ANSWER_PREFIX)
        with torch.no_grad():
            logits = tiny_model(input_ids=torch.tensor([prompt_ids])).logits[0, -1].float()
        p_first = torch.sigmoid(logits[ids[0]] - logits[ids[1]]).item()
        expected.append(p_first if id_of_response_1 == "m" else 1 - p_first)
    assert q[0].tolist() == pytest.approx(expected, abs=1e-4)


def test_cream_functions_run_when_copied(tmp_path, tiny_model):
    module, text = copy_functions("cream.py", ["soft_dpo_loss", "kendall_tau", "sequence_logps"],
                                  tmp_path)
    assert "def fail" not in text and "Args" not in text
    # Eq. 3.7 by hand: margin beta * ((-1 - -2) - (-3 - -3)) = 0.1
    loss = module.soft_dpo_loss(torch.tensor([-1.0]), torch.tensor([-3.0]), torch.tensor([-2.0]),
                                torch.tensor([-3.0]), 0.1, 0.75)
    dpo, reversed_dpo = math.log(1 + math.exp(-0.1)), math.log(1 + math.exp(0.1))
    assert loss.item() == pytest.approx(0.75 * dpo + 0.25 * reversed_dpo, rel=1e-5)
    x, y = [3.0, 1.0, 2.0, 5.0], [2.0, 1.0, 3.0, 4.0]
    pairs = [(i, j) for i in range(4) for j in range(i + 1, 4)]
    concordant = sum((x[i] - x[j]) * (y[i] - y[j]) > 0 for i, j in pairs)
    discordant = sum((x[i] - x[j]) * (y[i] - y[j]) < 0 for i, j in pairs)
    tau = module.kendall_tau(torch.tensor(x), torch.tensor(y))
    assert float(tau) == pytest.approx((concordant - discordant) / len(pairs))
    sequence_logps_against_brute_force(module, tiny_model)
