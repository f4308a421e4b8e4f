"""Property-based tests (issue 18, item 7): whatever bytes or trees the readers, the config loader and the checkpoint
loader get, they return valid items / a valid config / a state dict, or raise MedtuneError whose every line is one
`error:` line — never another exception. Bounded and derandomized so the file runs in well under a minute."""

import json
import string
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from medtune.config import Config, load_config
from medtune.data.formats import read_file
from medtune.data.items import MCQItem
from medtune.errors import DataError, MedtuneError, explain

SETTINGS = settings(max_examples=150, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
DEMO = {"id": "q1", "question": "Which organ pumps blood?", "options": ["Heart", "Lung", "Liver", "Skin"], "answer": 0}

scalars = st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=True) | st.text(max_size=20)
json_trees = st.recursive(scalars, lambda kids: st.lists(kids, max_size=5)
                          | st.dictionaries(st.text(max_size=10), kids, max_size=5), max_leaves=30)
# Rows that look like the published layouts, with any field replaced by any JSON value: reaches every reader.
KEYS = ["id", "question", "options", "answer", "answer_idx", "explanation", "subject", "benchmark", "meta_info",
        "sent1", "ending0", "ending1", "ending2", "ending3", "ending4", "label", "opa", "opb", "opc", "opd", "cop",
        "exp", "subject_name", "QUESTION", "CONTEXTS", "final_decision", "context", "pubid", "LONG_ANSWER",
        "long_answer", "choices"]
rows = st.dictionaries(st.sampled_from(KEYS), json_trees | st.sampled_from(["A", "B", 0, 1, 4, "yes", ["a", "b"],
                                                                             {"A": "a", "B": "b"}]), max_size=8)
published = st.sampled_from([
    DEMO,
    {"question": "Q?", "options": {"A": "a", "B": "b", "C": "c", "D": "d"}, "answer_idx": "B"},
    {"sent1": "Q?", "ending0": "a", "ending1": "b", "ending2": "c", "ending3": "d", "label": 1},
    {"question": "Q?", "opa": "a", "opb": "b", "opc": "c", "opd": "d", "cop": 0},
    {"question": "Q?", "context": {"contexts": ["c"]}, "final_decision": "yes"},
    {"question": "Q?", "choices": ["a", "b"], "answer": 1},
])
mutated = st.builds(lambda base, over: {**base, **over}, published, rows)


def _one_line_each(e: MedtuneError) -> None:
    """A DataError lists one problem per line; any other MedtuneError is one line."""
    problems = e.problems if isinstance(e, DataError) else [str(e)]
    assert problems and all(p.strip() and "\n" not in p and "Traceback" not in p for p in problems), problems


def _read(path: Path) -> None:
    try:
        items = read_file(path)
    except MedtuneError as e:
        _one_line_each(e)
        return
    assert items and all(isinstance(i, MCQItem) and isinstance(i.id, str) and isinstance(i.question, str)
                         and all(isinstance(o, str) for o in i.options) and 0 <= i.answer < len(i.options)
                         for i in items)


# --- the readers ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv"])
@SETTINGS
@given(data=st.binary(max_size=400))
def test_any_bytes_give_items_or_one_line_problems(tmp_path, suffix, data):
    path = tmp_path / f"x{suffix}"
    path.write_bytes(data)
    _read(path)


@SETTINGS
@given(lines=st.lists(mutated | rows | json_trees, min_size=1, max_size=4))
def test_any_jsonl_rows_give_items_or_one_line_problems(tmp_path, lines):
    path = tmp_path / "x.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    _read(path)


@SETTINGS
@given(tree=json_trees | st.lists(mutated, max_size=4) | st.dictionaries(st.text(max_size=8), mutated, max_size=3))
def test_any_json_document_gives_items_or_one_line_problems(tmp_path, tree):
    path = tmp_path / "x.json"
    path.write_text(json.dumps(tree))
    _read(path)


cells = st.text(alphabet=string.printable + "é\u2028\"", max_size=12)


@SETTINGS
@given(header=st.sampled_from([["question", "A", "B", "answer"], []]),
       table=st.lists(st.lists(cells, max_size=6), min_size=1, max_size=5))
def test_any_csv_table_gives_items_or_one_line_problems(tmp_path, header, table):
    import csv
    import io

    buf = io.StringIO(newline="")
    csv.writer(buf).writerows([header, *table] if header else table)
    path = tmp_path / "x.csv"
    path.write_text(buf.getvalue(), newline="")
    _read(path)


# --- the config loader ---------------------------------------------------------------------------------------------

SECTIONS = {"data": ["source", "seed", "limit", "holdout", "cop_base", "select"],
            "lora": ["r", "alpha", "dropout", "target_modules", "quantize"],
            "train": ["lr", "epochs", "max_steps", "batch_size", "warmup", "weight_decay", "seed", "report_to"],
            "eval": ["method", "margin", "batch_size", "extra_methods"]}
section = st.sampled_from(sorted(SECTIONS)).flatmap(lambda s: st.tuples(st.just(s), st.dictionaries(
    st.sampled_from(SECTIONS[s]) | st.text(max_size=6), json_trees, max_size=4)))
configs = st.dictionaries(st.sampled_from(["model", "prompt_style", "device", "out_dir"]) | st.text(max_size=6),
                          json_trees, max_size=3).flatmap(
    lambda top: st.lists(section, max_size=3).map(lambda secs: {**top, **dict(secs)}))


def _load(path: Path | None, sets: list[str] | None = None) -> None:
    try:
        cfg = load_config(path, sets)
    except MedtuneError as e:
        _one_line_each(e)
        return
    assert isinstance(cfg, Config)


@SETTINGS
@given(tree=configs | json_trees)
def test_any_yaml_or_json_tree_gives_a_config_or_one_line(tmp_path, tree):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(tree) if tree is not None else "")
    _load(path)
    path.write_text(json.dumps(tree))  # JSON is YAML
    _load(path)


@SETTINGS
@given(text=st.text(alphabet=string.printable + "&*!|>-: ", max_size=200))
def test_any_recipe_text_gives_a_config_or_one_line(tmp_path, text):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    _load(path)


@SETTINGS
@given(key=st.sampled_from(["lora.r", "train.lr", "data.seed", "model", "eval.margin", "lora.target_modules", "x.y"]),
       value=st.text(alphabet=string.printable, max_size=30))
def test_any_set_override_gives_a_config_or_one_line(key, value):
    _load(None, [f"{key}={value}"])


# --- the checkpoint loader -----------------------------------------------------------------------------------------

def _safetensors_blob() -> bytes:
    import torch
    from safetensors.torch import save

    return save({"w": torch.arange(12, dtype=torch.float32).reshape(3, 4)})


BLOB = _safetensors_blob()
states = (json_trees.map(json.dumps) | st.fixed_dictionaries(
    {"step": json_trees | st.integers(0, 10)}, optional={"config": json_trees, "data": json_trees, "world": json_trees}
).map(json.dumps)).flatmap(lambda text: st.sampled_from([text, text[: len(text) // 2]]))


@settings(SETTINGS, report_multiple_bugs=False)
@given(state=states)
def test_any_state_json_gives_the_state_or_one_line(tmp_path_factory, state):
    from medtune import checkpoint

    ckpt = tmp_path_factory.mktemp("ckpt") / "step-0000001"
    ckpt.mkdir()
    (ckpt / "state.json").write_text(state)
    (ckpt / "adapter.safetensors").write_bytes(BLOB)
    cfg = Config().to_dict()
    for data in (None, {"n": 3, "sha256": "0" * 64}):
        try:
            result = checkpoint.check(ckpt, cfg, data)
        except MedtuneError as e:
            _one_line_each(e)
        else:
            assert isinstance(result, dict)


@SETTINGS
@given(cut=st.integers(0, len(BLOB)), noise=st.binary(max_size=64))
def test_any_cut_or_noisy_safetensors_file_is_one_line(tmp_path_factory, cut, noise):
    """What checkpoint.load, PEFT and transformers read: a cut or random file raises SafetensorError, which
    errors.explain (cli.user_errors' last resort) turns into one line naming the file."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    d = tmp_path_factory.mktemp("st")
    for name, data in (("adapter.safetensors", BLOB[:cut]), ("optimizer.safetensors", noise),
                       ("spliced.safetensors", BLOB[:cut] + noise)):
        (d / name).write_bytes(data)
        try:
            load_file(str(d / name))
        except SafetensorError as e:
            mapped = explain(e)
            assert mapped is not None and "\n" not in str(mapped) and name in str(mapped)
