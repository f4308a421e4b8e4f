"""The HTML report and `medtune cost` on a real tiny run (tiny random model, demo data, two training steps): every
embedded image decodes, nothing is loaded from the network, headless Chromium renders it, and the cost figures follow
from cost.json by hand."""

import base64
import io
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

from medtune.cli import app

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_run(tiny_model_dir, tmp_path_factory) -> tuple[Path, str]:
    """`medtune run` as the README shows it, on the tiny model: writes results, cost.json files and report.html."""
    out = tmp_path_factory.mktemp("report") / "run"
    result = CliRunner().invoke(app, [
        "run", "--config", str(ROOT / "recipes" / "demo.yaml"), "--model", tiny_model_dir, "--out", str(out),
        "--set", "train.max_steps=2", "--set", "train.dtype=float32", "--set", "data.limit=10", "--quiet"])
    assert result.exit_code == 0, result.output
    return out, result.output


def _images(page: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r'src="data:image/png;base64,([^"]+)"', page)]


@pytest.mark.slow
def test_report_says_when_earlier_sessions_cost_is_unknown(tiny_run, tmp_path):
    """A resumed training whose checkpoint's cost record was not medtune's: cost.json says so, and so does the page."""
    run = tmp_path / "run"
    shutil.copytree(tiny_run[0], run)
    cost = json.loads((run / "cost.json").read_text())
    note = "the checkpoint's record of this run's earlier sessions is not medtune's: their cost is not included"
    (run / "cost.json").write_text(json.dumps({**cost, "sessions": None, "earlier_sessions": note}))
    result = CliRunner().invoke(app, ["report", str(run), "-q"])
    assert result.exit_code == 0, result.output
    assert "their cost is not included" in (run / "report.html").read_text()


def test_run_writes_a_self_contained_report(tiny_run):
    from PIL import Image

    out, output = tiny_run
    assert f"report: {out / 'report.html'}" in output
    page = (out / "report.html").read_text()
    images = _images(page)
    # accuracy, subjects, training, reliability, risk-coverage (fp32 rows only: see the test below), letters, cost
    bf16 = any('"precision": "bf16"' in (out / p / "predictions.jsonl").read_text() for p in ("base", "tuned"))
    assert len(images) == 7 - bf16
    for data in images:
        with Image.open(io.BytesIO(data)) as im:
            im.verify()  # raises on a truncated or corrupt PNG
        with Image.open(io.BytesIO(data)) as im:
            lo, hi = im.convert("L").getextrema()
            assert im.format == "PNG" and im.width > 200 and hi - lo > 100  # drawn, not blank
    # nothing fetched from anywhere: every src/href is a data URI or a fragment, no script at all
    assert all(v.startswith(("data:", "#")) for v in re.findall(r'(?:src|href)="([^"]*)"', page))
    assert "<script" not in page and "@import" not in page and "url(" not in page
    assert page.count("Research and education only") == 2
    # the first ten eval items, each with its options, gold marked, and a generated explanation
    preds = [json.loads(x) for x in (out / "tuned" / "predictions.jsonl").read_text().splitlines()]
    assert page.count('<div class="example">') == 10
    for row in preds:
        assert f"<b>{row['id']}</b>" in page
    assert "generated greedily for this report" in page and page.count("Explanation (generated") == 10
    res = json.loads((out / "results.json").read_text())
    acc = res["tuned"]["metrics"]["accuracy"]
    assert f"{acc:.3f} [{res['tuned']['metrics']['ci95'][0]:.3f}" in page
    assert res["config"]["model"] in page and res["data"]["eval"]["ids_sha256"] in page


@pytest.mark.slow
def test_report_renders_in_headless_chromium(tiny_run, tmp_path):
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("chromium is not installed (.ci/run installs it: apt-get install chromium)")
    from PIL import Image

    out, _ = tiny_run
    shot = tmp_path / "report.png"
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
                    f"--screenshot={shot}", "--window-size=1100,1600", (out / "report.html").as_uri()],
                   check=True, capture_output=True, timeout=120)
    with Image.open(shot) as im:
        assert im.size == (1100, 1600)
        colours = im.convert("RGB").getcolors(maxcolors=1 << 16)
        assert colours is None or len(colours) > 50  # a rendered page with text and figures, not a blank one


@pytest.mark.slow
def test_report_command_and_explanations_not_generated(tiny_run, tmp_path):
    out, _ = tiny_run
    target = tmp_path / "r.html"
    result = CliRunner().invoke(app, ["report", str(out), "--out", str(target), "--price-per-hour", "2.5"])
    assert result.exit_code == 0, result.output
    page = target.read_text()
    assert "explanations.jsonl" in page and page.count("Explanation (generated") == 10  # kept from the run
    assert "at 2.5 per device-hour" in page
    bare = tmp_path / "bare"
    shutil.copytree(out, bare)
    (bare / "explanations.jsonl").unlink()
    assert CliRunner().invoke(app, ["report", str(bare)]).exit_code == 0
    page = (bare / "report.html").read_text()
    assert "Explanations were not generated" in page and "Explanation (generated" not in page
    bad = CliRunner().invoke(app, ["report", str(out / "base")])
    assert bad.exit_code == 2 and "error:" in bad.output


@pytest.mark.slow
def test_cost_of_two_runs(tiny_run, tmp_path):
    """Run A as recorded; run B is A's copy relabelled as another device, to price it from a YAML keyed by name."""
    from medtune.cost import collect

    a, _ = tiny_run
    b = tmp_path / "b"
    shutil.copytree(a, b)
    for path in [b / "cost.json", *b.glob("*/cost.json")]:
        rec = json.loads(path.read_text())
        path.write_text(json.dumps({**rec, "device_name": "Other GPU", "device_count": 2}))
    parts = [json.loads(p.read_text()) for p in [a / "cost.json", *a.glob("*/cost.json")]]
    assert {p["kind"] for p in parts} == {"train", "eval"} and len(parts) == 3  # train, base, tuned
    assert all(p["energy_source"] is None and "no energy counter" in p["energy_note"] for p in parts) or \
        all(p["energy_j"] >= 0 for p in parts)
    wall = sum(p["wall_s"] for p in parts)
    train = next(p for p in parts if p["kind"] == "train")
    assert train["train_tokens"] == json.loads((a / "results.json").read_text())["train"]["real_tokens"]

    result = CliRunner().invoke(app, ["cost", str(a), str(b), "--price-per-hour", "2.5", "--json"])
    assert result.exit_code == 0, result.output
    ra, rb = json.loads(result.output)
    assert ra["cost"] == pytest.approx(wall * 2.5 / 3600) and rb["cost"] == pytest.approx(2 * ra["cost"])
    assert ra["cost_per_million_train_tokens"] == pytest.approx(train["wall_s"] * 2.5 / 3600 / train["train_tokens"]
                                                                * 1e6)
    assert ra["gain_kind"] == "debiased" and ra["gain_points"] == collect(a)["gain_points"]
    if ra["gain_points"] > 0:
        assert ra["cost_per_point"] == pytest.approx(ra["cost"] / ra["gain_points"])
    else:
        assert ra["cost_per_point"] is None

    prices = tmp_path / "prices.yaml"
    prices.write_text(f"{json.dumps(parts[0]['device_name'])}: 1.0\nOther GPU: 4.0\n")
    table = CliRunner().invoke(app, ["cost", str(a), str(b), "--prices", str(prices)])
    assert table.exit_code == 0, table.output
    assert "2 x Other GPU" in table.output and "(debiased)" in table.output and "energy:" in table.output
    missing = CliRunner().invoke(app, ["cost", str(a), "--prices", str(prices), "--price-per-hour", "1"])
    assert missing.exit_code == 2 and "exactly one" in missing.output
    prices.write_text("Other GPU: 4.0\n")
    unknown = CliRunner().invoke(app, ["cost", str(a), "--prices", str(prices)])
    assert unknown.exit_code == 2 and "no price for device" in unknown.output


@pytest.mark.slow
def test_readme_command_examples_run(tiny_run, tiny_model_dir, tmp_path, monkeypatch):
    """Each per-verb example of the README that needs a model runs as written, on the tiny model and a copy of the
    tiny run as runs/demo (the README's env and data examples are run by test_cli.py)."""
    import shlex

    text = (ROOT / "README.md").read_text()
    # the first bash block of each "### `medtune VERB`" section, in README order
    blocks = re.findall(r"^### `medtune (\w+)`[^\n]*\n.*?```bash\n(.*?)```", text, re.DOTALL | re.MULTILINE)
    verbs = ("data", "eval", "train", "report", "cost", "compare", "export")
    commands = [shlex.split(line) for verb, b in blocks if verb in verbs for line in b.splitlines()]
    assert [c[1] for c in commands] == ["data"] * 3 + ["eval", "train", "report", "cost", "compare", "export"]
    shared = ROOT.parent / "shared" / "data"
    monkeypatch.chdir(tmp_path)
    shutil.copytree(tiny_run[0], tmp_path / "runs" / "demo")
    (tmp_path / "recipes").symlink_to(ROOT / "recipes")
    for argv in commands:  # env: test_cli.py; run: the tiny_run fixture; ask/predict/serve: their own tests
        if argv[1] == "data":
            if not shared.is_dir():
                continue  # ../shared/data is not beside this checkout
            argv = [a.replace("../shared/data", str(shared)) for a in argv]
        extra = {"eval": ["--model", tiny_model_dir, "--quiet"],
                 "train": ["--set", f"model={tiny_model_dir}", "--set", "train.dtype=float32", "--quiet"]}
        result = CliRunner().invoke(app, argv[1:] + extra.get(argv[1], []))
        assert result.exit_code == 0, (argv, result.output)
    assert (tmp_path / "runs" / "eval-demo" / "cost.json").is_file()
    assert (tmp_path / "runs" / "try" / "adapter" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "runs" / "demo" / "merged" / "model.safetensors").is_file()


@pytest.mark.slow
def test_report_of_a_generate_run_without_probabilities(tiny_run, tmp_path):
    """A run scored with `--method generate` has explanations but no probabilities, calibration or debiased accuracy:
    the report uses the explanations, says there is nothing to calibrate and that the raw gain was used."""
    run = tmp_path / "gen"
    shutil.copytree(tiny_run[0], run)
    rows = [json.loads(x) for x in (run / "tuned" / "predictions.jsonl").read_text().splitlines()]
    (run / "tuned" / "predictions.jsonl").write_text("".join(json.dumps(
        {k: r[k] for k in ("id", "gold", "pred", "correct", "subject")} | {"explanation": f"why {r['id']}"}) + "\n"
        for r in rows))
    res = json.loads((run / "results.json").read_text())
    for part in ("base", "tuned"):
        del res[part]["metrics"]["calibration"], res[part]["metrics"]["permute"]
    del res["comparison"]["debiased"]
    (run / "results.json").write_text(json.dumps(res))
    page = (run / "report.html") if CliRunner().invoke(app, ["report", str(run)]).exit_code == 0 else None
    assert page is not None
    text = page.read_text()
    assert all(f"why {r['id']}" in text for r in rows) and "from the run&#39;s greedy `generate` evaluation" in text
    assert "This method gives no probabilities" in text and "raw used" in text and len(_images(text)) == 5


def test_acc_norm_when_some_items_have_equal_length_choices():
    """Scoring leaves correct_norm out where all choices have one length (the argmax is acc's); metrics must count
    those items with their raw result, not crash (it did on the demo set) or skip acc_norm."""
    from medtune.data.items import MCQItem
    from medtune.report import metrics

    items = [MCQItem("a", "q?", ("xx", "yy"), 0), MCQItem("b", "q?", ("x", "yyyy"), 1)]
    rows = [{"id": "a", "gold": "A", "pred": "A", "correct": True, "probs": {"A": 0.6, "B": 0.4}},
            {"id": "b", "gold": "B", "pred": "B", "correct": True, "probs": {"A": 0.3, "B": 0.7}, "pred_norm": "A",
             "correct_norm": False}]
    m = metrics(items, rows)
    assert m["accuracy"] == 1.0 and m["accuracy_norm"] == 0.5


def test_risk_coverage_curve_only_from_fp32_rows(tiny_run, tmp_path):
    """Selective answering ranks by confidence, which bf16 reorders: the curve is drawn from fp32 rows only, and the
    report says why it is missing otherwise."""
    pages = {}
    for precision in ("fp32", "bf16"):
        run = tmp_path / precision
        shutil.copytree(tiny_run[0], run)
        for part in ("base", "tuned"):
            path = run / part / "predictions.jsonl"
            rows = [json.loads(x) for x in path.read_text().splitlines()]
            path.write_text("".join(json.dumps(r | {"precision": precision}) + "\n" for r in rows))
        assert CliRunner().invoke(app, ["report", str(run)]).exit_code == 0
        pages[precision] = (run / "report.html").read_text()
    assert 'alt="risk-coverage curve"' in pages["fp32"] and "reorders near-tied" not in pages["fp32"]
    assert 'alt="risk-coverage curve"' not in pages["bf16"] and "reorders near-tied confidences" in pages["bf16"]
    assert len(_images(pages["bf16"])) == len(_images(pages["fp32"])) - 1 == 6


def test_risk_coverage_curve_lets_ties_enter_together():
    """One rule for ties (stats.risk_coverage): two questions at the same confidence, one right and one wrong, are
    answered together, so the curve has no point between them that depends on their order."""
    from medtune.html_report import risk_coverage

    conf, ok = [0.9, 0.8, 0.8, 0.6, 0.3], [True, True, False, True, False]
    rows = [{"probs": {"A": c, "B": c / 2}, "correct": k} for c, k in zip(conf, ok)]
    coverage, risk = risk_coverage(rows)
    assert coverage == [0.2, 0.6, 0.8, 1.0]
    assert risk == pytest.approx([0.0, 1 / 3, 0.25, 0.4])
    assert risk_coverage(rows[::-1]) == (coverage, risk)  # the order of tied rows does not matter
