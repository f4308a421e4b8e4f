"""Readers for every published layout, validation errors, splits and duplicates."""

import csv
import json

import pytest
from conftest import write_jsonl

from medtune.data.formats import parse_mapping, read_file
from medtune.data.sources import demo_items, fingerprint
from medtune.data.split import item_key, overlap, split
from medtune.errors import DataError, MedtuneError

MEDQA = {"question": "Q1?", "answer": "b", "options": {"A": "a", "B": "b", "C": "c", "D": "d"}, "meta_info": "step1",
         "answer_idx": "B", "metamap_phrases": []}
MEDMCQA = {"id": "x1", "question": "Q?", "opa": "a", "opb": "b", "opc": "c", "opd": "d", "cop": 4,
           "choice_type": "single", "exp": "Because.", "subject_name": "Anatomy", "topic_name": None}


def test_medqa_original_4_and_5_options(tmp_path):
    five = {**MEDQA, "options": {**MEDQA["options"], "E": "e"}, "answer_idx": "E", "answer": "e"}
    items = read_file(write_jsonl(tmp_path / "m.jsonl", [MEDQA, five]))
    assert [len(i.options) for i in items] == [4, 5]
    assert [i.answer for i in items] == [1, 4]
    assert items[0].id == "m-1" and items[1].id == "m-2"  # stable ids from file and line
    assert items[0].benchmark == "medqa" and items[0].subject == "step1"


def test_medqa_hub_layout(tmp_path):
    row = {"id": "h1", "sent1": "Q?", "sent2": "", "ending0": "a", "ending1": "b", "ending2": "c", "ending3": "d",
           "label": 2}
    (item,) = read_file(write_jsonl(tmp_path / "hub.jsonl", [row]))
    assert item.options == ("a", "b", "c", "d") and item.answer == 2 and item.id == "h1"


def test_medmcqa_cop_base_detected_from_whole_file(tmp_path):
    one_based = [MEDMCQA, {**MEDMCQA, "id": "x2", "cop": 1}]
    items = read_file(write_jsonl(tmp_path / "pub.jsonl", one_based))
    assert [i.answer for i in items] == [3, 0]
    zero_based = [{**MEDMCQA, "cop": 0}, {**MEDMCQA, "id": "x2", "cop": 2}]
    assert [i.answer for i in read_file(write_jsonl(tmp_path / "hub.jsonl", zero_based))] == [0, 2]
    assert items[0].explanation == "Because." and items[0].subject == "Anatomy"


def test_medmcqa_ambiguous_cop_needs_flag(tmp_path):
    path = write_jsonl(tmp_path / "amb.jsonl", [{**MEDMCQA, "cop": 2}, {**MEDMCQA, "id": "x2", "cop": 3}])
    with pytest.raises(MedtuneError, match="--cop-base"):
        read_file(path)
    assert [i.answer for i in read_file(path, cop_base=1)] == [1, 2]
    assert [i.answer for i in read_file(path, cop_base=0)] == [2, 3]


def test_pubmedqa_original_and_hub(tmp_path):
    ori = {"12345": {"QUESTION": "Does X help?", "CONTEXTS": ["Ctx one.", "Ctx two."], "LABELS": ["A", "B"],
                     "final_decision": "maybe", "LONG_ANSWER": "Perhaps.", "MESHES": []}}
    path = tmp_path / "ori_pqal.json"
    path.write_text(json.dumps(ori))
    (item,) = read_file(path)
    assert item.id == "12345" and item.options == ("yes", "no", "maybe") and item.answer == 2
    assert item.question == "Abstract: Ctx one.\nCtx two.\nQuestion: Does X help?"  # lm-eval's pubmedqa text
    hub = {"pubid": 7, "question": "Q?", "context": {"contexts": ["C."], "labels": [], "meshes": []},
           "long_answer": "L.", "final_decision": "yes"}
    (item,) = read_file(write_jsonl(tmp_path / "hub.jsonl", [hub]))
    assert item.id == "7" and item.answer == 0 and item.benchmark == "pubmedqa"


def test_mmlu_headerless_csv_and_hub(tmp_path):
    path = tmp_path / "anatomy_test.csv"
    with path.open("w", newline="") as f:
        csv.writer(f).writerows([["What, exactly?", "a", "b", "c", "d", "C"], ["Q2", "w", "x", "y", "z", "A"]])
    items = read_file(path)
    assert [i.answer for i in items] == [2, 0] and items[0].question == "What, exactly?"
    assert items[0].subject == "anatomy" and items[0].benchmark == "mmlu"
    hub = {"question": "Q?", "subject": "college_medicine", "choices": ["a", "b", "c", "d"], "answer": 3}
    (item,) = read_file(write_jsonl(tmp_path / "mmlu.jsonl", [hub]))
    assert item.answer == 3 and item.subject == "college_medicine"


def test_mapped_csv_jsonl_parquet(tmp_path):
    rows = [{"q": "Q?", "o1": "a", "o2": "b", "o3": "c", "lab": "B", "why": "Since."}]
    mapping = parse_mapping("question=q,options=o1|o2|o3,answer=lab,explanation=why")
    (item,) = read_file(write_jsonl(tmp_path / "x.jsonl", rows), mapping=mapping)
    assert item.options == ("a", "b", "c") and item.answer == 1 and item.explanation == "Since."
    path = tmp_path / "x.csv"
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerow({**rows[0], "lab": "2"})
    (item,) = read_file(path, mapping=parse_mapping("question=q,options=o1|o2|o3,answer=lab,answer_base=1"))
    assert item.answer == 1
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([{**rows[0], "lab": 0}]), tmp_path / "x.parquet")
    (item,) = read_file(tmp_path / "x.parquet", mapping=parse_mapping("question=q,options=o1|o2|o3,answer=lab"))
    assert item.answer == 0


@pytest.mark.parametrize("row, expected", [
    ({**MEDQA, "answer_idx": "F"}, "answer_idx: expected one of A, B, C, D, got 'F'"),
    ({**MEDQA, "question": ""}, "question: empty"),
    ({k: v for k, v in MEDQA.items() if k != "question"}, "question: missing"),
    ({**MEDQA, "options": ["a", "b"]}, "options: expected an object"),
    ({**MEDQA, "options": {"A": "a", "C": "c", "B": "b", "E": "e"}}, "options: expected keys A-D or A-E"),
])
def test_validation_errors_name_file_line_field(tmp_path, row, expected):
    path = write_jsonl(tmp_path / "bad.jsonl", [MEDQA, row])
    with pytest.raises(DataError) as e:
        read_file(path)
    (problem,) = e.value.problems
    assert problem.startswith(f"{path}:2: {expected}")


def test_all_problems_listed(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", ['{"question": ', MEDMCQA, {**MEDMCQA, "id": "x2", "cop": 7},
                                              {**MEDMCQA, "opb": None}, [1, 2]])
    with pytest.raises(DataError) as e:
        read_file(path)
    assert len(e.value.problems) == 2  # JSON problems stop the read before row checks
    assert e.value.problems[0].startswith(f"{path}:1: json:")
    assert e.value.problems[1] == f"{path}:5: row: expected a JSON object, got list"
    path = write_jsonl(tmp_path / "bad2.jsonl", [MEDMCQA, {**MEDMCQA, "id": "x2", "cop": "three"},
                                               {**MEDMCQA, "id": "x3", "opb": None}, MEDMCQA])
    with pytest.raises(DataError) as e:
        read_file(path)
    assert e.value.problems == [f"{path}:2: cop: expected an integer, got 'three'", f"{path}:3: opb: null",
                                f"{path}:4: id: duplicate id 'x1' (first at {path}:1)"]


def test_unknown_format_and_missing_file(tmp_path):
    with pytest.raises(MedtuneError, match="unknown format"):
        read_file(write_jsonl(tmp_path / "x.jsonl", [{"foo": 1}]))
    with pytest.raises(MedtuneError, match="file not found"):
        read_file(tmp_path / "nope.jsonl")


def _items(n: int, subjects=("a", "b", "c")):
    from medtune.data.items import MCQItem

    return [MCQItem(id=f"i{k}", question=f"question number {k} about things", options=("w", "x", "y", f"z{k}"),
                    answer=k % 4, subject=subjects[k % len(subjects)]) for k in range(n)]


def test_split_is_deterministic_stratified_and_exact():
    items = _items(300, ("a", "a", "b", "c"))
    train, evals = split(items, 100, seed=7)
    assert len(train) == 100 and len(evals) == 200
    assert (train, evals) == split(items, 100, seed=7)
    assert [i.id for i in split(items, 100, seed=8)[0]] != [i.id for i in train]
    assert {i.id for i in train}.isdisjoint(i.id for i in evals)
    assert sum(i.subject == "a" for i in train) == 50  # half the items are subject a
    with pytest.raises(MedtuneError):
        split(items, 300)


def test_overlap_finds_exact_and_near_duplicates():
    items = _items(20)
    reordered = items[3].permuted([3, 2, 1, 0])
    from dataclasses import replace

    near = replace(items[5], id="near", question=items[5].question + " really", options=("p", "q", "r", "s"))
    found = overlap(items[:10], [reordered, near, items[15]], n=3)
    assert [x["eval_id"] for x in found["exact"]] == ["i3"]
    assert item_key(reordered) == item_key(items[3])
    assert [x["eval_id"] for x in found["near"]][:1] == ["near"]


def test_real_files_validate(shared_data):
    assert len(read_file(shared_data / "medqa" / "test.jsonl")) == 1273
    assert len(read_file(shared_data / "medqa" / "dev.jsonl")) == 1272
    items = read_file(shared_data / "medmcqa" / "dev.jsonl")
    assert len(items) == 4183 and sum(i.explanation is None for i in items) == 1977
    train, evals = split(items, 2000, seed=42)
    assert (len(train), len(evals)) == (2000, 2183)
    assert fingerprint(train, "x", "train") == fingerprint(split(items, 2000, seed=42)[0], "x", "train")


def test_demo_set_design():
    """Every eval question re-asks a fact taught by two training questions, with its answer at another letter."""
    import json as _json
    from importlib import resources

    rows = [_json.loads(line) for line in (resources.files("medtune.data.demo") / "demo.jsonl").read_text()
            .splitlines() if line.strip()]
    train, evals = demo_items("train"), demo_items("eval")
    assert len(train) + len(evals) >= 150 and len(evals) >= 60
    by_fact = {}
    for r in rows:
        by_fact.setdefault(r["fact"], []).append(r)
    for fact, group in by_fact.items():
        tr = [r for r in group if r["split"] == "train"]
        ev = [r for r in group if r["split"] == "eval"]
        assert len(tr) >= 2 and len(ev) == 1, fact
        gold = ev[0]["options"][ev[0]["answer"]].lower()
        assert all(r["options"][r["answer"]].lower() == gold for r in tr), fact
        assert all(r["question"] != ev[0]["question"] for r in tr), fact
        assert all(r["options"] != ev[0]["options"] for r in tr), fact
    assert not overlap(train, evals)["exact"]


# --- hostile files: one line, bounded (issue 18) --------------------------------------------------------------------

DEMO_ROW = {"id": "q1", "question": "Which organ pumps blood?", "options": ["Heart", "Lung"], "answer": 0}


@pytest.mark.parametrize("bad_id", [{"a": 1}, ["x"], True, 1.5])
def test_an_id_that_is_not_text_or_an_integer_is_refused(tmp_path, bad_id):
    path = write_jsonl(tmp_path / "ids.jsonl", [{**DEMO_ROW, "id": bad_id}])
    with pytest.raises(DataError, match=r"ids.jsonl:1: id: expected text or an integer, got"):
        read_file(path)
    path = write_jsonl(tmp_path / "ok.jsonl", [{**DEMO_ROW, "id": 7}, {**DEMO_ROW, "id": None}])
    assert [i.id for i in read_file(path)] == ["7", "ok-2"]


def test_csv_error_names_a_line_the_file_has(tmp_path):
    path = tmp_path / "big.csv"
    path.write_text("question,A,B,answer\n" + "x" * 200_000 + ",a,b,A\n")
    with pytest.raises(DataError, match=r"big.csv:2: csv: field larger than field limit"):
        read_file(path)
    path = tmp_path / "multi.csv"  # a quoted field over three lines: the next row starts on line 5
    path.write_text('question,A,B,answer\n"one\ntwo\nthree",a,b,A\nq,a,b\n')
    with pytest.raises(DataError, match=r"multi.csv:5: row: expected 4 columns, got 3"):
        read_file(path)


@pytest.mark.parametrize("name, text", [("deep.json", "[" * 100_000 + "]" * 100_000),
                                        ("deep.jsonl", json.dumps(DEMO_ROW) + "\n" + '{"a":' * 100_000 + "1"
                                         + "}" * 100_000 + "\n")])
def test_json_nested_100k_deep_is_one_line(tmp_path, name, text):
    (tmp_path / name).write_text(text)
    with pytest.raises(DataError, match="json: nested too deeply") as e:
        read_file(tmp_path / name)
    assert len(e.value.problems) == 1 and name in e.value.problems[0]


@pytest.mark.parametrize("row, expected", [
    ({"question": "q", "final_decision": "yes", "context": "not an object"}, "context.contexts"),
    ({"question": "q", "final_decision": 5, "context": {"contexts": ["c"]}}, "final_decision"),
    ({"question": "q", "options": {"A": "a", "B": "b", "C": "c", "D": "d"}, "answer_idx": "A", "meta_info": {}},
     "meta_info"),
    ({**DEMO_ROW, "answer": "--1"}, "answer"),
    ({**DEMO_ROW, "answer": "²"}, "answer"),
])
def test_wrong_types_in_any_field_are_row_errors(tmp_path, row, expected):
    path = write_jsonl(tmp_path / "t.jsonl", [row])
    with pytest.raises(DataError, match=f"t.jsonl:1: {expected}"):
        read_file(path)


def test_medmcqa_cop_of_the_wrong_type_is_a_row_error(tmp_path):
    row = {"question": "q", "opa": "a", "opb": "b", "opc": "c", "opd": "d"}
    path = write_jsonl(tmp_path / "m.jsonl", [{**row, "cop": 0}, {**row, "id": "2", "cop": [1]}])
    with pytest.raises(DataError, match=r"m.jsonl:2: cop: expected an integer"):
        read_file(path)
