"""The command line: fast start, clear failures (exit 2, one line per problem, nothing written), real outputs."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import write_jsonl
from test_data import MEDMCQA, MEDQA
from typer.testing import CliRunner

from medtune.cli import app

runner = CliRunner()


def test_help_and_env_do_not_import_transformers():
    code = ("import sys; from medtune.cli import app\n"
            "from typer.testing import CliRunner\n"
            "r = CliRunner().invoke(app, ['--help']); assert r.exit_code == 0, r.output\n"
            "assert 'transformers' not in sys.modules and 'torch' not in sys.modules\n"
            "r = CliRunner().invoke(app, ['env', '--json']); assert r.exit_code == 0, r.output\n"
            "import json; rep = json.loads(r.output)\n"
            "assert rep['device']['kind'] in ('cpu', 'cuda', 'rocm', 'mps', 'xpu') and rep['policy']['train_dtype']\n"
            "assert 'transformers' not in sys.modules, 'env imported transformers'\n")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_env_human_report():
    from medtune.hardware import detect

    result = runner.invoke(app, ["env"])
    assert result.exit_code == 0 and f"device   {detect().kind} " in result.output  # whatever this host is


def test_validate_reports_every_bad_row_and_exits_2(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [MEDQA, {**MEDQA, "answer_idx": "Z"}, {**MEDQA, "question": ""}])
    result = runner.invoke(app, ["data", "validate", str(path)])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert lines[0].startswith("error: 2 problem(s)")
    assert lines[1].startswith(f"{path}:2: answer_idx:") and lines[2] == f"{path}:3: question: empty"
    assert "Traceback" not in result.output


def test_validate_and_show_real_medmcqa(shared_data):
    result = runner.invoke(app, ["data", "validate", str(shared_data / "medmcqa" / "dev.jsonl")])
    assert result.exit_code == 0 and "4183 valid items" in result.output and "1-based" in result.output
    result = runner.invoke(app, ["data", "show", str(shared_data / "medqa" / "test.jsonl"), "--json"])
    summary = json.loads(result.output)
    assert summary["n"] == 1273 and sum(summary["answer_letters"].values()) == 1273


def test_ambiguous_cop_names_the_flag(tmp_path):
    path = write_jsonl(tmp_path / "m.jsonl", [{**MEDMCQA, "cop": 2}])
    result = runner.invoke(app, ["data", "validate", str(path)])
    assert result.exit_code == 2 and "--cop-base" in result.output
    assert runner.invoke(app, ["data", "validate", str(path), "--cop-base", "1"]).exit_code == 0


def test_split_writes_both_parts(tmp_path):
    rows = [{**MEDMCQA, "id": f"x{k}", "question": f"Question {k} about a topic?", "subject_name": "AB"[k % 2]}
            for k in range(40)]
    path = write_jsonl(tmp_path / "m.jsonl", rows)
    result = runner.invoke(app, ["data", "split", str(path), "--train-size", "10", "--out", str(tmp_path / "s")])
    assert result.exit_code == 0, result.output
    train = (tmp_path / "s" / "train.jsonl").read_text().splitlines()
    evals = (tmp_path / "s" / "eval.jsonl").read_text().splitlines()
    assert (len(train), len(evals)) == (10, 30) and "exact duplicates between train and eval: 0" in result.output
    again = tmp_path / "t"
    runner.invoke(app, ["data", "split", str(path), "--train-size", "10", "--out", str(again)])
    assert (again / "train.jsonl").read_text() == (tmp_path / "s" / "train.jsonl").read_text()


def test_bad_config_key_lists_valid_keys(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("lora:\n  rank: 8\n")
    result = runner.invoke(app, ["train", "--config", str(recipe)])
    assert result.exit_code == 2 and "unknown key(s) rank" in result.output and "valid keys: r, alpha" in result.output


def test_refuses_to_train_on_a_test_split(shared_data, tmp_path):
    result = runner.invoke(app, ["train", "--set", f"data.source={shared_data / 'medqa' / 'test.jsonl'}",
                                 "--out", str(tmp_path / "x")])
    assert result.exit_code == 2 and "never trains on test data" in result.output
    assert not (tmp_path / "x").exists()


def test_eval_bad_data_writes_nothing(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [{**MEDQA, "answer_idx": 3}])
    out = tmp_path / "out"
    result = runner.invoke(app, ["eval", "--data", str(path), "--out", str(out)])
    assert result.exit_code == 2 and not out.exists()


def test_eval_writes_predictions_and_results(tiny_model_dir, tmp_path):
    path = write_jsonl(tmp_path / "q.jsonl", [{**MEDQA, "question": f"Q{k}?", "answer_idx": "ABCD"[k % 4],
                                                      "answer": "abcd"[k % 4]}
                                             for k in range(6)])
    out = tmp_path / "out"
    result = runner.invoke(app, ["eval", "--model", tiny_model_dir, "--data", str(path), "--out", str(out),
                                 "--limit", "5", "--permute", "cyclic", "--quiet"])
    assert result.exit_code == 0, result.output
    rows = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == [f"q-{k}" for k in range(1, 6)]
    assert set(rows[0]) >= {"id", "gold", "pred", "logprobs", "probs", "debiased_pred", "rotation_choices"}
    res = json.loads((out / "results.json").read_text())
    m = res["metrics"]
    assert m["n"] == 5 and m["correct"] == sum(r["pred"] == r["gold"] for r in rows)  # accuracy = a hand count
    assert m["ci95"][0] <= m["accuracy"] <= m["ci95"][1]
    assert {"majority_baseline", "favourite_letter", "pred_distribution"} <= set(m["letters"])
    assert res["prompt_style"] == "harness" and res["data"]["n"] == 5 and res["environment"]["versions"]["torch"]
    assert "Research and education only" in result.output


def _write_run(path: Path, correct: list[bool]) -> Path:
    path.mkdir(parents=True)
    rows = [{"id": f"q{k}", "gold": "A", "pred": "A" if c else "B", "correct": c} for k, c in enumerate(correct)]
    (path / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (path / "results.json").write_text("{}")
    return path / "results.json"


def test_compare_paired_results(tmp_path):
    a = _write_run(tmp_path / "a", [True] * 5 + [False] * 15)
    b = _write_run(tmp_path / "b", [True] * 4 + [False] + [True] * 9 + [False] * 6)
    result = runner.invoke(app, ["compare", str(a), str(b), "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    assert (out["b"], out["c"]) == (1, 9) and out["mcnemar_p"] == pytest.approx(0.021484375)
    assert out["won"] == [f"q{k}" for k in range(5, 14)] and out["lost"] == ["q4"]
    other = _write_run(tmp_path / "c", [True] * 3)
    assert runner.invoke(app, ["compare", str(a), str(other)]).exit_code == 2
