"""Every cached file and model of a run records the models it was made from (README, 'Quickstart':
to redo an iteration, delete its folder and the models after it). A model deleted and redone
gets a new id, so what an earlier model of that name made is made again, and a model trained on
an earlier one's data is named, with what to delete.

On a CPU a redone model is byte-identical, so only the ids, never the bytes, can tell.
"""

import json
import shutil

import pytest

import cream
import scir

SCRIPTS = {"scir.py": scir, "cream.py": cream}
SHORT = ["--demo", "--iterations", 2, "--sft_epochs", 1, "--num_prompts", 4, "--num_samples", 2,
         "--max_new_tokens", 8, "--evaluate"]
# the model each script's iteration 1 samples from, and the one it trains
FIRST = {"scir.py": ("M0", "M1"), "cream.py": ("M1", "M2")}


def run(script, out):
    SCRIPTS[script].main([str(arg) for arg in [*SHORT, "--output_dir", out]])


def model_id(folder):
    return json.loads((folder / "provenance.json").read_text())["id"]


@pytest.mark.parametrize("script", ["scir.py", "cream.py"])
def test_what_an_earlier_model_made_is_made_again(script, tmp_path, capsys):
    out = tmp_path / "run"
    run(script, out)
    sampler, trained = FIRST[script]
    before = model_id(out / trained)
    capsys.readouterr()
    later = sorted(int(p.name[1:]) for p in out.glob("M*") if int(p.name[1:]) >= int(trained[1:]))
    for k in later:  # the README's way to redo iteration 2: the models after iteration 1
        shutil.rmtree(out / f"M{k}")
    run(script, out)
    notes = [line for line in capsys.readouterr().out.splitlines() if line.startswith("note:")]
    assert model_id(out / trained) != before
    made_again = {line.split()[1] for line in notes}
    assert str(out / "iter2" / "samples.jsonl") in made_again  # sampled by the redone model
    decoding = "sampled" if script == "scir.py" else "greedy"
    assert str(out / "eval" / f"{trained}-{decoding}.jsonl") in made_again
    assert str(out / "iter1" / "samples.jsonl") not in made_again  # sampled by the kept model
    record = json.loads((out / "iter2" / "made_by.json").read_text())
    assert record["samples.jsonl"][trained] == model_id(out / trained)
    assert model_id(out / sampler) == json.loads(
        (out / trained / "provenance.json").read_text())["made_by"][sampler]


@pytest.mark.parametrize("script", ["scir.py", "cream.py"])
def test_a_model_trained_on_an_earlier_models_data_is_named(script, tmp_path):
    out = tmp_path / "run"
    run(script, out)
    sampler, trained = FIRST[script]
    shutil.rmtree(out / trained)  # and not the model after it
    next_model = f"M{int(trained[1:]) + 1}"
    with pytest.raises(SystemExit) as exit_info:
        run(script, out)
    assert str(exit_info.value.code) == (
        f"{script}: error: {out / next_model} was trained on data of an earlier {trained}: delete "
        f"it and the models after it, and rerun to redo them")
