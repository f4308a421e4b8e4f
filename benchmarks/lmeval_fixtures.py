"""Make tests/fixtures/lmeval/: per-item, per-option log-likelihoods computed by lm-evaluation-harness 0.4.13 itself.

  bash benchmarks/setup_lmeval.sh      # once: lm-eval in its own venv
  python benchmarks/lmeval_fixtures.py --shared ../shared/data          # rewrites tests/fixtures/lmeval/*.json

For each benchmark a fixed sample of items (every k-th item of the published file, `sample_indices`) is written to a
small local file, and lm-eval (`hf` model, fp32, CPU, batch size 1, samples logged) scores them through the tasks in
benchmarks/lmeval_task/ twice: on the embedded model and with the LoRA adapter in tests/fixtures/lmeval/adapter (made
by `make_adapter`: seeded random LoRA weights, r=2 on o_proj and down_proj, scaled so that its predictions vary; it is a
parity fixture, not a model anyone should use). The fixtures hold ids, indices into the published file and numbers
only: no question text. tests/test_lmeval_fixtures.py scores the same items with medtune's exact mode.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import lmeval_parity as parity

FIXTURES = HERE.parent / "tests" / "fixtures" / "lmeval"
# benchmark -> (files under the shared data dir, items in the sample)
SETS = {
    "medqa": (["medqa/test.jsonl"], 25),
    "medmcqa": (["medmcqa/dev.jsonl"], 25),
    "pubmedqa": (["pubmedqa/pqal_non_test.json"], 25),
    "mmlu": ([f"mmlu/{s}_test.csv" for s in ("clinical_knowledge", "college_biology", "college_medicine",
                                             "professional_medicine")], 28),
}
ADAPTER_SEED, ADAPTER_STD, TARGETS = 0, 0.3, ["o_proj", "down_proj"]


def sample_indices(n_items: int, k: int) -> list[int]:
    """k indices spread evenly over the file (the first item, then every n/k-th)."""
    return [i * n_items // k for i in range(k)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shared", default=str(HERE.parent.parent / "shared" / "data"), help="The shared data dir.")
    p.add_argument("--work", default="runs/lmeval-fixtures", help="Scratch dir for lm-eval's outputs.")
    p.add_argument("--lmeval-python", default=str(parity.DEFAULT_VENV / "bin/python"))
    p.add_argument("--compare", action="store_true",
                   help="Do not run lm-eval: score the fixtures' items with medtune exact mode and print the table.")
    args = p.parse_args(argv)
    if args.compare:
        print(compare(Path(args.shared).resolve()))
        return 0
    shared, work = Path(args.shared).resolve(), Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    adapter = FIXTURES / "adapter"
    if not (adapter / "adapter_model.safetensors").is_file():
        make_adapter(adapter)
    model_dir = parity.resolve_model("embedded")
    tasks, picked = prepare(shared, work)
    results = {}
    for label, extra in (("base", ""), ("adapter", f",peft={adapter}")):
        out = work / label
        cmd = [args.lmeval_python, "-m", "lm_eval", "run", "--model", "hf", "--model_args",
               f"pretrained={model_dir},dtype=float32{extra}", "--tasks", ",".join(parity.TASKS[b] for b in tasks),
               "--include_path", str(work / "task"), "--device", "cpu", "--batch_size", "1", "--output_path",
               str(out), "--log_samples"]
        print(" ".join(cmd), file=sys.stderr, flush=True)
        subprocess.run(cmd, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
        for b in tasks:
            found = sorted(out.rglob(f"samples_{parity.TASKS[b]}_*.jsonl"))
            results.setdefault(b, {})[label] = parity.read_samples(found[-1])
    FIXTURES.mkdir(parents=True, exist_ok=True)
    for b, (indices, ids) in picked.items():
        fixture = {
            "benchmark": b, "files": SETS[b][0], "lm_eval": "0.4.13", "model": "embedded (SmolLM2-135M-Instruct)",
            "adapter": "tests/fixtures/lmeval/adapter", "dtype": "float32", "device": "cpu", "batch_size": 1,
            "command": "python benchmarks/lmeval_fixtures.py --shared ../shared/data",
            "items": [{"index": i, "id": item_id, "gold": results[b]["base"][k]["gold"],
                       "base": results[b]["base"][k]["logprobs"], "adapter": results[b]["adapter"][k]["logprobs"]}
                      for k, (i, item_id) in enumerate(zip(indices, ids))],
        }
        (FIXTURES / f"{b}.json").write_text(json.dumps(fixture, indent=1) + "\n")
        print(f"wrote {FIXTURES / f'{b}.json'} ({len(indices)} items)")
    return 0


def compare(shared: Path) -> str:
    """medtune exact mode (fp32, adapter merged as `medtune eval` does) on each fixture's items: the markdown table of
    items, max |Δ log-likelihood| against lm-eval, prediction agreement and accuracies, base and adapter."""
    import time

    from medtune.data.formats import read_file
    from medtune.models import load_model
    from medtune.scoring import argmax, score_items

    quiet = {"log": lambda *_: None}
    models = {"base": load_model("embedded", **quiet)[:2],
              "adapter": load_model("embedded", adapter=str(FIXTURES / "adapter"), merge=True, **quiet)[:2]}
    lines = ["| benchmark | model | n | max abs diff | agreement | accuracy lm-eval | accuracy medtune | medtune s |",
             "|---|---|---|---|---|---|---|---|"]
    for b, (names, _) in SETS.items():
        fixture = json.loads((FIXTURES / f"{b}.json").read_text())
        items = [it for n in names for it in read_file(shared / n, cop_base=1 if b == "medmcqa" else None)]
        items = [items[e["index"]] for e in fixture["items"]]
        for label, (model, tok) in models.items():
            start = time.perf_counter()
            rows = score_items(model, tok, items, "harness", mode="exact", batch_size=8)
            secs = time.perf_counter() - start
            theirs = [e[label] for e in fixture["items"]]
            ours = [list(r["logprobs"].values()) for r in rows]
            diff = max(abs(x - y) for t, o in zip(theirs, ours) for x, y in zip(t, o))
            agree = sum(argmax(t) == argmax(o) for t, o in zip(theirs, ours)) / len(rows)
            acc_l = sum(argmax(t) == e["gold"] for t, e in zip(theirs, fixture["items"])) / len(rows)
            acc_m = sum(r["correct"] for r in rows) / len(rows)
            lines.append(f"| {b} | {label} | {len(rows)} | {diff:.2e} | {agree:.3f} | {acc_l:.3f} | {acc_m:.3f} | "
                         f"{secs:.1f} |")
    return "\n".join(lines)


def prepare(shared: Path, work: Path) -> tuple[list[str], dict[str, tuple[list[int], list[str]]]]:
    """The sampled items of each benchmark as a local file lm-eval reads (doc_id k = the k-th sampled item), the task
    YAMLs, and per benchmark the sampled indices into the published file(s) and medtune's ids for them."""
    from medtune.data.formats import read_file

    picked = {}
    for b, (names, k) in SETS.items():
        files = [shared / n for n in names]
        items = [it for f in files for it in read_file(f, cop_base=1 if b == "medmcqa" else None)]
        indices = sample_indices(len(items), k)
        if b in ("medqa", "medmcqa"):
            lines = [line for f in files for line in f.read_text(encoding="utf-8").splitlines() if line.strip()]
            rows = [json.loads(lines[i]) for i in indices]
        else:
            all_rows = parity.lmeval_rows(b, files)
            rows = [all_rows[i] for i in indices]
        data = work / f"{b}.jsonl"
        data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        parity.write_task(work / "task", b, data, 1 if b == "medmcqa" else None)
        picked[b] = (indices, [items[i].id for i in indices])
    return list(SETS), picked


def make_adapter(out: Path) -> None:
    """A small PEFT LoRA adapter with seeded random weights (r=2, o_proj and down_proj), saved as safetensors."""
    import torch
    from peft import LoraConfig, get_peft_model

    from medtune.models import load_model

    model = load_model("embedded", log=lambda *_: None)[0]
    peft_model = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=TARGETS,
                                                  lora_dropout=0.0))
    gen = torch.Generator().manual_seed(ADAPTER_SEED)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * ADAPTER_STD)
    peft_model.save_pretrained(out)
    (out / "README.md").unlink(missing_ok=True)  # PEFT's model-card template: not needed for a test fixture


if __name__ == "__main__":
    sys.exit(main())
