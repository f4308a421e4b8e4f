"""Parity of `medtune eval` with lm-evaluation-harness (lm_eval 0.4.13): MedQA, MedMCQA, PubMedQA, MMLU.

Runs, each as its own timed process (whole-process wall time and peak RSS):
  lmeval  lm-eval's `hf` model, fp32, CPU, batch size 1, on a local copy of medqa_4options / medmcqa / pubmedqa /
          mmlu_<subject> (benchmarks/lmeval_task/), samples logged;
  exact   `medtune eval --mode exact` (fp32);
  fast    `medtune eval --mode fast` (the default: bf16 where supported, fp32 re-score of close calls);
then compares per-option log-likelihoods, predictions, accuracies and times, prints a table and writes OUT/parity.json.

  bash benchmarks/setup_lmeval.sh          # once: lm-eval in its own venv
  python benchmarks/lmeval_parity.py --data ../shared/data/medqa/test.jsonl --benchmark medqa --out runs/parity-medqa
  python benchmarks/lmeval_parity.py --data ../shared/data/mmlu/*_test.csv --benchmark mmlu --out runs/parity-mmlu

PubMedQA's ori_pqal.json (an object keyed by PMID) and MMLU's headerless CSVs are written as JSONL for lm-eval's
`json` loader first (`lmeval_data`), in the order medtune reads them, so doc_id k is medtune's k-th item.

Checks (`--check` makes a failed one exit 1): exact max |logprob diff| <= 1e-3; fast agreement with lm-eval >= 0.995;
|accuracy(fast) - accuracy(lm-eval)| <= 0.001; wall(fast) / wall(lm-eval) <= 0.4.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
TASK_TEMPLATES = HERE / "lmeval_task"
TASKS = {"medqa": "medqa_local", "medmcqa": "medmcqa_local", "pubmedqa": "pubmedqa_local", "mmlu": "mmlu_local"}
PUBMEDQA_CHOICES = ["yes", "no", "maybe"]
LETTERS = "ABCD"
DEFAULT_VENV = Path.home() / ".cache" / "medtune" / "lmeval-venv"
THRESHOLDS = {"logprob_max_abs_diff": 1e-3, "agreement_fast": 0.995, "accuracy_diff_fast": 0.001,
              "wall_ratio_fast": 0.4}
RUNS = ("lmeval", "exact", "fast")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    cop_base = args.cop_base if args.cop_base is not None else detect_cop_base(Path(args.data[0])) \
        if args.benchmark == "medmcqa" else None
    model_dir = resolve_model(args.model)
    lm_data, data = lmeval_data(args.benchmark, [Path(d).resolve() for d in args.data], out)
    task_dir = write_task(out / "lmeval_task", args.benchmark, lm_data, cop_base)

    ceilings = [host_ceilings()]  # before and after: the ratio is bounded by this host's bf16 / fp32 speeds
    timings: dict[str, list[dict]] = {name: [] for name in RUNS}
    for r in range(args.repeats):
        # Alternate who runs first, so that a warm page cache or a busy neighbour does not favour one side.
        order = RUNS if r % 2 == 0 else ("exact", "fast", "lmeval")
        for name in order:
            run_dir = out / f"rep{r}" / name
            if run_dir.exists():
                shutil.rmtree(run_dir)
            cmd, env = command(name, args, data, model_dir, task_dir, run_dir, cop_base)
            print(f"[{r + 1}/{args.repeats}] {name}: {' '.join(cmd)}", file=sys.stderr, flush=True)
            timings[name].append(timed(cmd, env, run_dir))

    samples = read_samples(find_samples(out / "rep0" / "lmeval"))
    exact = read_predictions(out / "rep0" / "exact" / "predictions.jsonl")
    fast = read_predictions(out / "rep0" / "fast" / "predictions.jsonl")
    report = compare(samples, exact, fast)
    report["accuracy"]["lmeval_reported"] = reported_accuracy(out / "rep0" / "lmeval", TASKS[args.benchmark])
    report["prompt_mismatches"] = prompt_mismatches(samples, data, args.benchmark, cop_base, args.limit)
    report["timing"] = summarize_timing(timings)
    report["host"] = {"matmul_gflops_before": ceilings[0], "matmul_gflops_after": host_ceilings()}
    report["checks"] = checks(report)
    report["setup"] = {"data": str(data), "benchmark": args.benchmark, "limit": args.limit, "adapter": args.adapter,
                       "model_dir": model_dir, "repeats": args.repeats, "cop_base": cop_base,
                       "lmeval_python": args.lmeval_python, "thresholds": THRESHOLDS}
    (out / "parity.json").write_text(json.dumps(report, indent=1) + "\n")
    print(render(report))
    print(f"wrote {out / 'parity.json'}")
    failed = [k for k, ok in report["checks"].items() if not ok]
    if args.check and failed:
        print(f"FAILED: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, nargs="+",
                   help="The benchmark's file as published (MMLU: one or more subject CSVs).")
    p.add_argument("--benchmark", required=True, choices=sorted(TASKS))
    p.add_argument("--limit", type=int, help="Only the first N questions (both tools).")
    p.add_argument("--adapter", help="A PEFT adapter dir, applied on both sides.")
    p.add_argument("--model", default="embedded", help="medtune model name (embedded, or a local HF dir).")
    p.add_argument("--out", required=True, help="Output dir: rep*/{lmeval,exact,fast}/ and parity.json.")
    p.add_argument("--repeats", type=int, default=1, help="Timed repeats; medians are reported.")
    p.add_argument("--cop-base", type=int, choices=(0, 1), help="MedMCQA cop base (default: from the file).")
    p.add_argument("--lmeval-python", default=str(Path(os.environ.get("LMEVAL_VENV", DEFAULT_VENV)) / "bin/python"),
                   help="Python of the lm-eval venv (benchmarks/setup_lmeval.sh).")
    p.add_argument("--lmeval-device", default="cpu", help="lm-eval's --device (cuda:0 on a GPU; medtune picks its own).")
    p.add_argument("--check", action="store_true", help="Exit 1 when a parity check fails.")
    args = p.parse_args(argv)
    if not Path(args.lmeval_python).exists():
        p.error(f"{args.lmeval_python} not found: run `bash benchmarks/setup_lmeval.sh` or pass --lmeval-python")
    for d in args.data:
        if not Path(d).is_file():
            p.error(f"{d}: file not found")
    if len(args.data) > 1 and args.benchmark != "mmlu":
        p.error("several --data files only for --benchmark mmlu (one CSV per subject)")
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    return args


def detect_cop_base(data: Path) -> int:
    """MedMCQA `cop`: 1-based in the published files (a 4 occurs), 0-based on the Hub (a 0 occurs)."""
    values = {json.loads(line)["cop"] for line in data.open() if line.strip()}
    if 0 in values and 4 in values:
        raise SystemExit(f"{data}: cop has both 0 and 4; pass --cop-base")
    if 0 in values or 4 in values:
        return 0 if 0 in values else 1
    raise SystemExit(f"{data}: cop only has 1-3, so its base is ambiguous; pass --cop-base")


def resolve_model(name: str) -> str:
    """The HF directory medtune loads for `name`, so that lm-eval loads the very same weights."""
    code = "import sys; from medtune.models import resolve; print(resolve(sys.argv[1], log=lambda *a: None))"
    return subprocess.run([sys.executable, "-c", code, name], check=True, capture_output=True,
                          text=True).stdout.strip().splitlines()[-1]


def lmeval_data(benchmark: str, files: list[Path], out: Path) -> tuple[Path, Path]:
    """(file lm-eval reads, file medtune reads). MedQA and MedMCQA: the published JSONL for both. PubMedQA: its
    JSON object of PMID -> record as JSONL for lm-eval (medtune reads the original). MMLU: the subject CSVs as one
    JSONL in the Hub layout (question, subject, choices, answer) for both, the subject taken from the file name."""
    if benchmark in ("medqa", "medmcqa"):
        return files[0], files[0]
    target = out / f"{benchmark}.jsonl"
    with target.open("w") as f:
        for row in lmeval_rows(benchmark, files):
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return target, files[0] if benchmark == "pubmedqa" else target


def lmeval_rows(benchmark: str, files: list[Path]) -> list[dict]:
    import csv

    if benchmark == "pubmedqa":
        data = json.loads(files[0].read_text(encoding="utf-8"))
        return [{"PMID": k, "QUESTION": v["QUESTION"], "CONTEXTS": v["CONTEXTS"],
                 "final_decision": v["final_decision"]} for k, v in data.items()]
    rows = []
    for path in files:
        subject = path.stem.removesuffix("_test")
        with path.open(newline="", encoding="utf-8") as f:
            for rec in csv.reader(f):
                rows.append({"question": rec[0], "subject": subject, "choices": rec[1:5], "answer": "ABCD".index(rec[5])})
    return rows


def write_task(task_dir: Path, benchmark: str, data: Path, cop_base: int | None) -> Path:
    """The task YAML from its template with the data path filled in, beside a copy of utils.py."""
    task_dir.mkdir(parents=True, exist_ok=True)
    shutil.copy(TASK_TEMPLATES / "utils.py", task_dir / "utils.py")
    text = (TASK_TEMPLATES / f"{TASKS[benchmark]}.yaml.in").read_text()
    text = text.replace("__DATA_FILE__", str(data)).replace("__COP_BASE__", str(cop_base))
    (task_dir / f"{TASKS[benchmark]}.yaml").write_text(text)
    return task_dir


def command(name: str, args, data: Path, model_dir: str, task_dir: Path, run_dir: Path,
            cop_base: int | None) -> tuple[list[str], dict]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    limit = ["--limit", str(args.limit)] if args.limit else []
    if name == "lmeval":
        model_args = f"pretrained={model_dir},dtype=float32" + (f",peft={args.adapter}" if args.adapter else "")
        return [args.lmeval_python, "-m", "lm_eval", "run", "--model", "hf", "--model_args", model_args,
                "--tasks", TASKS[args.benchmark], "--include_path", str(task_dir), "--device", args.lmeval_device,
                "--batch_size", "1", "--output_path", str(run_dir), "--log_samples", *limit], env
    cmd = [sys.executable, "-m", "medtune", "eval", "--model", args.model, "--data", str(data), "--out", str(run_dir),
           "--mode", name, "--quiet", "--overwrite", *limit]  # run_dir already holds log.txt and rss.txt
    cmd += ["--adapter", args.adapter] if args.adapter else []
    cmd += ["--cop-base", str(cop_base)] if cop_base is not None else []
    return cmd, env


def timed(cmd: list[str], env: dict, run_dir: Path) -> dict:
    """Run `cmd` to completion; whole-process wall seconds and peak RSS (MB). The log goes to RUN_DIR/log.txt."""
    run_dir.mkdir(parents=True, exist_ok=True)
    rss_file = run_dir / "rss.txt"
    if Path("/usr/bin/time").exists():
        wrapped = ["/usr/bin/time", "-v", "-o", str(rss_file), *cmd]
    else:  # a fresh interpreter whose only child is `cmd`, so RUSAGE_CHILDREN is that child's peak
        code = ("import resource, subprocess, sys; rc = subprocess.call(sys.argv[2:]); "
                "open(sys.argv[1], 'w').write(f'Maximum resident set size (kbytes): "
                "{resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}\\n'); sys.exit(rc)")
        wrapped = [sys.executable, "-c", code, str(rss_file), *cmd]
    with (run_dir / "log.txt").open("w") as log:
        start = time.perf_counter()
        rc = subprocess.run(wrapped, env=env, stdout=log, stderr=subprocess.STDOUT, check=False).returncode
        wall = time.perf_counter() - start
    if rc != 0:
        tail = (run_dir / "log.txt").read_text()[-3000:]
        raise SystemExit(f"command failed ({rc}): {' '.join(cmd)}\n--- {run_dir / 'log.txt'} (tail) ---\n{tail}")
    return {"wall_s": round(wall, 2), "peak_rss_mb": peak_rss_mb(rss_file)}


def peak_rss_mb(path: Path) -> float | None:
    for line in path.read_text().splitlines() if path.is_file() else []:
        if "Maximum resident set size" in line:
            return round(int(line.rsplit(":", 1)[1]) / 1024, 1)
    return None


def find_samples(run_dir: Path) -> Path:
    found = sorted(run_dir.rglob("samples_*.jsonl"))
    if len(found) != 1:
        raise SystemExit(f"{run_dir}: expected one lm-eval samples_*.jsonl, found {len(found)}")
    return found[0]


def reported_accuracy(run_dir: Path, task: str) -> float | None:
    """lm-eval's own `acc` from its results_*.json: a cross-check of the accuracy recomputed from the samples."""
    found = sorted(run_dir.rglob("results_*.json"))
    return json.loads(found[0].read_text())["results"][task].get("acc,none") if found else None


# ---- parsing and comparison (imported by tests/test_bench_parity.py) ----

def read_samples(path: Path) -> dict[int, dict]:
    """lm-eval's logged samples by doc_id (= line order in the data file): per-choice log-likelihoods (logged as
    strings, in `filtered_resps` as [[ll, is_greedy], ...] or [ll, ...]), gold index, lm-eval's prediction, context."""
    out = {}
    for line in Path(path).read_text().splitlines():
        if not line.strip():
            continue
        s = json.loads(line)
        resps = s.get("filtered_resps") or [r[0] if isinstance(r, list) and r and isinstance(r[0], list) else r
                                             for r in s["resps"]]
        lls = [float(r[0] if isinstance(r, (list, tuple)) else r) for r in resps]
        context = _first_context(s.get("arguments"))
        target = str(s["target"]).strip()
        gold = int(target) if target.lstrip("-").isdigit() else PUBMEDQA_CHOICES.index(target)
        out[int(s["doc_id"])] = {"logprobs": lls, "gold": gold, "pred": _argmax(lls),
                                 "acc": s.get("acc"), "context": context}
    return out


def _first_context(arguments) -> str | None:
    """The prompt of the first request: `arguments` is {"gen_args_0": {"arg_0": ctx, "arg_1": cont}, ...} in
    0.4.x, [[ctx, cont], ...] in older versions."""
    if isinstance(arguments, dict) and arguments:
        first = next(iter(arguments.values()))
        return first.get("arg_0") if isinstance(first, dict) else None
    if isinstance(arguments, list) and arguments and isinstance(arguments[0], list):
        return arguments[0][0]
    return None


def read_predictions(path: Path) -> list[dict]:
    """medtune's predictions.jsonl (input order): log-likelihoods in letter order, gold and predicted index."""
    rows = []
    for line in Path(path).read_text().splitlines():
        if line.strip():
            r = json.loads(line)
            letters = sorted(r["logprobs"])
            rows.append({"id": r["id"], "logprobs": [r["logprobs"][k] for k in letters],
                         "gold": letters.index(r["gold"]), "pred": letters.index(r["pred"])})
    return rows


def compare(samples: dict[int, dict], exact: list[dict], fast: list[dict] | None = None) -> dict:
    """Log-likelihood differences (lm-eval vs medtune exact), prediction agreement and accuracies."""
    n = len(samples)
    if sorted(samples) != list(range(n)):
        raise ValueError(f"lm-eval doc_ids are not 0..{n - 1}")
    for name, rows in (("exact", exact), ("fast", fast)):
        if rows is not None and len(rows) != n:
            raise ValueError(f"lm-eval scored {n} questions, medtune {name} {len(rows)}")
    diffs = []  # (max |diff| over the options, doc_id)
    gold_mismatch = []
    for i in range(n):
        a, b = samples[i]["logprobs"], exact[i]["logprobs"]
        if len(a) != len(b):
            raise ValueError(f"doc {i}: lm-eval has {len(a)} options, medtune {len(b)}")
        diffs.append((max(abs(x - y) for x, y in zip(a, b)), i))
        if samples[i]["gold"] != exact[i]["gold"]:
            gold_mismatch.append(i)
    worst = sorted(diffs, reverse=True)[:5]
    report = {
        "n": n,
        "logprob_max_abs_diff": max(d for d, _ in diffs) if diffs else 0.0,
        "logprob_mean_abs_diff": sum(d for d, _ in diffs) / n if n else 0.0,
        "worst_docs": [{"doc_id": i, "id": exact[i]["id"], "max_abs_diff": d, "lmeval": samples[i]["logprobs"],
                        "medtune_exact": exact[i]["logprobs"]} for d, i in worst],
        "gold_mismatches": gold_mismatch,
        "accuracy": {"lmeval": _accuracy([samples[i] for i in range(n)]), "exact": _accuracy(exact)},
        "agreement": {"exact": _agreement(samples, exact)},
    }
    report["accuracy_diff"] = {"exact": abs(report["accuracy"]["exact"] - report["accuracy"]["lmeval"])}
    if fast is not None:
        report["accuracy"]["fast"] = _accuracy(fast)
        report["agreement"]["fast"] = _agreement(samples, fast)
        report["accuracy_diff"]["fast"] = abs(report["accuracy"]["fast"] - report["accuracy"]["lmeval"])
        report["disagreements_fast"] = [i for i in range(n) if samples[i]["pred"] != fast[i]["pred"]]
    report["disagreements_exact"] = [i for i in range(n) if samples[i]["pred"] != exact[i]["pred"]]
    return report


def _argmax(values: list[float]) -> int:
    return max(range(len(values)), key=lambda j: values[j])  # first of equals, as numpy.argmax in lm-eval


def _accuracy(rows: list[dict]) -> float:
    return sum(r["pred"] == r["gold"] for r in rows) / len(rows) if rows else 0.0


def _agreement(samples: dict[int, dict], rows: list[dict]) -> float:
    return sum(samples[i]["pred"] == r["pred"] for i, r in enumerate(rows)) / len(rows) if rows else 0.0


def host_ceilings(n: int = 2048, repeats: int = 5) -> dict:
    """GFLOP/s of an n^3 matrix multiply in fp32 and bf16 with torch's default threads (MEASURING.md's ceilings). Fast
    mode computes in bf16 and lm-eval in fp32, so fast mode's wall ratio cannot beat fp32 / bf16 on this host."""
    import time

    import torch

    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        a @ b
        start = time.perf_counter()
        for _ in range(repeats):
            a @ b
        out[str(dtype).removeprefix("torch.")] = round(2 * n ** 3 * repeats / (time.perf_counter() - start) / 1e9, 1)
    out["bf16_over_fp32"] = round(out["bfloat16"] / out["float32"], 2)
    return out


def summarize_timing(timings: dict[str, list[dict]]) -> dict:
    out = {}
    for name, runs in timings.items():
        rss = [r["peak_rss_mb"] for r in runs if r["peak_rss_mb"] is not None]
        out[name] = {"wall_s": statistics.median(r["wall_s"] for r in runs), "walls_s": [r["wall_s"] for r in runs],
                     "peak_rss_mb": max(rss) if rss else None}
    base = out["lmeval"]["wall_s"]
    out["ratio"] = {name: round(out[name]["wall_s"] / base, 3) if base else None for name in ("exact", "fast")}
    return out


def checks(report: dict) -> dict[str, bool]:
    t = THRESHOLDS
    result = {"logprob_max_abs_diff": report["logprob_max_abs_diff"] <= t["logprob_max_abs_diff"]}
    if "fast" in report["agreement"]:
        result["agreement_fast"] = report["agreement"]["fast"] >= t["agreement_fast"]
        result["accuracy_diff_fast"] = report["accuracy_diff"]["fast"] <= t["accuracy_diff_fast"] + 1e-12
    ratio = report.get("timing", {}).get("ratio", {}).get("fast")
    if ratio is not None:
        result["wall_ratio_fast"] = ratio <= t["wall_ratio_fast"]
    return result


def prompt_mismatches(samples: dict[int, dict], data: Path, benchmark: str, cop_base: int | None,
                      limit: int | None) -> list[int] | None:
    """doc_ids whose lm-eval prompt differs from the text medtune builds for the same item (None if not logged)."""
    from medtune.data import sources
    from medtune.prompts import build_prompt

    if any(s["context"] is None for s in samples.values()):
        return None
    items = sources.load(str(data), "eval", cop_base=cop_base)
    items = items[:limit] if limit else items
    return [i for i, item in enumerate(items) if i in samples and build_prompt(item, "harness") != samples[i]["context"]]


def render(report: dict) -> str:
    t = report.get("timing", {})
    acc, agr = report["accuracy"], report["agreement"]
    lines = [f"questions: {report['n']}",
             (f"logprob |lm-eval - medtune exact|: max {report['logprob_max_abs_diff']:.2e}, "
              f"mean {report['logprob_mean_abs_diff']:.2e}"),
             f"prompt mismatches: {report.get('prompt_mismatches')}",
             f"{'run':8} {'accuracy':>9} {'agree':>7} {'wall s':>8} {'ratio':>6} {'peak MB':>8}"]
    for name in RUNS:
        if name not in acc:
            continue
        tm = t.get(name, {})
        ratio = t.get("ratio", {}).get(name, 1.0 if name == "lmeval" else None)
        lines.append(f"{name:8} {acc[name]:9.4f} {agr.get(name, 1.0):7.4f} {_fmt(tm.get('wall_s'), '8.1f')} "
                     f"{_fmt(ratio, '6.3f')} {_fmt(tm.get('peak_rss_mb'), '8.0f')}")
    for when, c in report.get("host", {}).items():
        lines.append(f"host {when.removeprefix('matmul_gflops_')}: matmul GFLOP/s fp32 {c['float32']}, bf16 "
                     f"{c['bfloat16']} ({c['bf16_over_fp32']}x)")
    lines.append("checks: " + ", ".join(f"{k} {'ok' if v else 'FAIL'}" for k, v in report.get("checks", {}).items()))
    return "\n".join(lines)


def _fmt(value, spec: str) -> str:
    width = int(spec.split(".")[0])
    return format(value, spec) if value is not None else "-".rjust(width)


if __name__ == "__main__":
    sys.exit(main())
