"""`medtune audit` on the tiny random model (results.json with the eval-style record, per-item rows), and
`medtune compare --parity`'s exit codes: 0 on pass, 3 on a failed certificate, 2 on a user error."""

import copy
import json

import pytest
from typer.testing import CliRunner

from medtune.cli import PARITY_FAILED, app


def test_audit_writes_results_and_per_item_rows(tiny_model_dir, tmp_path):
    out = tmp_path / "audit"
    result = CliRunner().invoke(app, ["audit", "--model", tiny_model_dir, "--data", "demo", "--limit", "6",
                                      "--out", str(out), "--mode", "exact", "--quiet", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "options only (stem removed)" in result.output and "rotations:" in result.output
    res = json.loads((out / "results.json").read_text())
    assert res["kind"] == "audit" and res["model"] == tiny_model_dir and res["prompt_style"] == "harness"
    assert res["data"]["source"] == "demo" and res["data"]["n"] == 6 and len(res["data"]["ids_sha256"]) == 64
    assert res["placement"] and res["environment"]["versions"]
    summary = res["audit"]
    assert summary["n"] == 6 and 0 <= summary["options_only"]["accuracy"] <= 1
    rows = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and {"pred_full", "pred_options_only", "pred_nota", "flips"} <= set(rows[0])
    assert summary["full"]["correct"] == sum(r["correct_full"] for r in rows)  # the summary is the rows' hand count
    again = CliRunner().invoke(app, ["audit", "--model", tiny_model_dir, "--data", "demo", "--limit", "2",
                                     "--out", str(out), "--quiet", "--device", "cpu"])
    assert again.exit_code == 2 and "error:" in again.output  # a non-empty --out needs --overwrite
    as_json = CliRunner().invoke(app, ["audit", "--model", tiny_model_dir, "--data", "demo", "--limit", "2",
                                       "--out", str(out), "--quiet", "--device", "cpu", "--overwrite", "--json"])
    assert as_json.exit_code == 0, as_json.output
    assert json.loads(as_json.output)["audit"]["n"] == 2


def test_audit_refuses_generate_in_one_line(tiny_model_dir, tmp_path):
    result = CliRunner().invoke(app, ["audit", "--model", tiny_model_dir, "--data", "demo", "--limit", "2",
                                      "--out", str(tmp_path / "a"), "--method", "generate", "--quiet"])
    assert result.exit_code == 2 and "letter or answer" in result.output


def _eval_dir(path, rows):
    from conftest import write_jsonl

    path.mkdir()
    (path / "results.json").write_text(json.dumps({"metrics": {"n": len(rows)}}))
    write_jsonl(path / "predictions.jsonl", rows)
    return path


@pytest.fixture(scope="module")
def fp32_bf16(tiny_model_dir, tmp_path_factory):
    """The tiny model's evaluations in fp32 and by a bf16 copy of its weights (tests/test_parity.py's pair)."""
    import torch

    from medtune.data.items import MCQItem
    from medtune.models import load_model
    from medtune.scoring import score_items

    model, tok, _ = load_model(tiny_model_dir, device="cpu", log=lambda *_: None)
    items = [MCQItem(id=f"q{k}", question=f"Which option is number {k}? " + "Some context. " * (k % 4),
                     options=(f"alpha {k}", "beta", "gamma", "delta"), answer=k % 4) for k in range(24)]
    exact = score_items(model, tok, items, "harness", mode="exact")
    bf16 = score_items(copy.deepcopy(model).to(torch.bfloat16), tok, items, "harness", mode="exact")
    root = tmp_path_factory.mktemp("parity")
    return _eval_dir(root / "fp32", exact), _eval_dir(root / "bf16", bf16), exact, bf16


def test_compare_parity_exit_codes(fp32_bf16):
    a, b, exact, bf16 = fp32_bf16
    delta = max(max(abs(x["logprobs"][k] - y["logprobs"][k]) for k in x["logprobs"]) for x, y in zip(exact, bf16))
    flips = sum(x["pred"] != y["pred"] for x, y in zip(exact, bf16))
    assert delta > 0
    same = CliRunner().invoke(app, ["compare", str(a), str(a), "--parity"])
    assert same.exit_code == 0 and same.output.startswith("parity certificate: PASS")
    loose = CliRunner().invoke(app, ["compare", str(a), str(b), "--parity", "--json", "--tolerance-logprob",
                                     str(delta + 1), "--tolerance-flips", "1"])
    assert loose.exit_code == 0, loose.output
    cert = json.loads(loose.output)
    assert cert["verdict"] == "pass" and cert["logprob"]["max"] == pytest.approx(delta)
    assert cert["flips"]["n"] == flips and len(cert["per_item"]) == 24
    strict = CliRunner().invoke(app, ["compare", str(a), str(b), "--parity", "--tolerance-logprob", str(delta / 2)])
    assert strict.exit_code == PARITY_FAILED == 3 and "parity certificate: FAIL" in strict.output
    assert "fails: max |Δ log-prob|" in strict.output


def test_compare_parity_user_errors(fp32_bf16, tmp_path):
    a, b, exact, _ = fp32_bf16
    other = _eval_dir(tmp_path / "other", exact[:-1])
    short = CliRunner().invoke(app, ["compare", str(a), str(other), "--parity"])
    assert short.exit_code == 2 and "not on the same items" in short.output
    stray = CliRunner().invoke(app, ["compare", str(a), str(b), "--tolerance-flips", "0.1"])
    assert stray.exit_code == 2 and "--parity only" in stray.output
    negative = CliRunner().invoke(app, ["compare", str(a), str(b), "--parity", "--tolerance-logprob", "-1"])
    assert negative.exit_code == 2 and ">= 0" in negative.output
    help_text = " ".join(CliRunner().invoke(app, ["compare", "--help"]).output.replace("│", " ").split())
    assert "exit 3 when it fails" in help_text
