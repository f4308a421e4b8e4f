"""Memory that fits the card: peak memory of medtune against lm-evaluation-harness and of `run` against `train`.

One script, the runs side by side, each its own process under /usr/bin/time -v (whole-process peak RSS):
  lmeval  lm-eval 0.4.13's `hf` model with dtype=bfloat16, batch size 1, on the first --limit MedQA test questions;
  eval    `medtune eval` in its default mode on the same model and questions;
  train   `medtune train` with a small recipe (the MedQA dev file, never test; LoRA r=8 on q_proj/v_proj);
  run     `medtune run` with the same recipe (evaluates the base and tuned model on the first 16 test questions).
The model is random, with Qwen3-1.7B's published shape (MEASURING.md), saved as bf16 safetensors with the embedded
model's tokenizer: memory is a matter of shapes and dtypes, not of what the weights know.

  bash benchmarks/setup_lmeval.sh                 # once: lm-eval in its own venv
  python benchmarks/memory_fit.py --out runs/memory-fit
  python benchmarks/memory_fit.py --out runs/memory-fit --device cuda   # on a GPU: also peak GPU memory per run
  python benchmarks/memory_fit.py --out runs/memory-fit-tiny --tiny --skip-lmeval   # toy sizes (gpu_check --tiny)

Checks (`--check` makes a failed one exit 1): peak RSS of eval <= 1.25 x lm-eval's; of run <= 1.1 x train's.
On a GPU the same ratios are reported for peak GPU memory (torch.cuda.max_memory_allocated, read by a small wrapper).
Writes OUT/memory_fit.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from lmeval_parity import DEFAULT_VENV, timed, write_task

QWEN3_1_7B = {"hidden_size": 2048, "intermediate_size": 6144, "num_hidden_layers": 28, "num_attention_heads": 16,
                  "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 151936, "tie_word_embeddings": True, "rope_theta": 1e6,
                  "max_position_embeddings": 40960}
TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "head_dim": 16, "vocab_size": 49152, "tie_word_embeddings": True, "rope_theta": 1e6, "max_position_embeddings": 2048}
LIMITS = {"eval_vs_lmeval": 1.25, "run_vs_train": 1.1}
# Peak GPU memory of a medtune command, read in the same process: the CLI runs, then the peak is printed.
GPU_PEAK = ("import sys, torch; from medtune.cli import app\n"
            "try:\n    app(sys.argv[1:], standalone_mode=False)\n"
            "finally:\n    print('medtune-gpu-peak-bytes', torch.cuda.max_memory_allocated() if torch.cuda.is_available()"
            " else 0, flush=True)\n")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    model_dir = Path(args.model_dir).resolve() if args.model_dir else out / ("tiny-model" if args.tiny else
                                                                             "qwen3-1.7b-shape-random")
    make_model(model_dir, TINY if args.tiny else QWEN3_1_7B)
    data = Path(args.data).resolve()
    train_file = data.parent / "dev.jsonl"  # training never reads a test split
    previous = json.loads((out / "memory_fit.json").read_text())["runs"] if (out / "memory_fit.json").is_file() else {}
    runs = {k: v for k, v in previous.items() if k not in args.runs}  # --runs: measure these again, keep the rest
    for name in args.runs:
        if name == "lmeval" and args.skip_lmeval:
            continue
        cmd, env = command(name, args, model_dir, data, train_file, out)
        runs[name] = timed(cmd, env, out / name)
        runs[name]["gpu_peak_mb"] = gpu_peak_mb(out / name / "log.txt")
        print(f"{name:7} peak RSS {runs[name]['peak_rss_mb']:9.1f} MB  wall {runs[name]['wall_s']:7.1f} s", flush=True)
    report = {"model": "Qwen3-1.7B shape, random, bf16" if not args.tiny else "tiny Qwen3, random, bf16",
              "limit": args.limit, "device": args.device, "runs": runs, "ratios": ratios(runs), "limits": LIMITS}
    report["checks"] = {k: v <= LIMITS[k] for k, v in report["ratios"].items() if v is not None}
    (out / "memory_fit.json").write_text(json.dumps(report, indent=1))
    print(render(report))
    return 1 if args.check and not all(report["checks"].values()) else 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--data", default=str(HERE.parent.parent / "shared" / "data" / "medqa" / "test.jsonl"),
                   help="MedQA test file (the training file is dev.jsonl beside it).")
    p.add_argument("--limit", type=int, default=64, help="Questions for the eval comparison.")
    p.add_argument("--model-dir", help="Reuse (or create) the random model here.")
    p.add_argument("--device", default="cpu", help="medtune's --device and lm-eval's (cuda on a GPU).")
    p.add_argument("--tiny", action="store_true", help="A toy model: checks the script, measures nothing.")
    p.add_argument("--skip-lmeval", action="store_true", help="Only medtune's runs (no lm-eval venv).")
    p.add_argument("--lmeval-python", default=str(Path(os.environ.get("LMEVAL_VENV", DEFAULT_VENV)) / "bin/python"))
    p.add_argument("--check", action="store_true", help="Exit 1 when a ratio is over its limit.")
    p.add_argument("--runs", nargs="+", default=["lmeval", "eval", "train", "run"],
                   choices=["lmeval", "eval", "train", "run"], help="Measure only these (others: from OUT's last run).")
    args = p.parse_args(argv)
    if not args.skip_lmeval and not Path(args.lmeval_python).exists():
        p.error(f"{args.lmeval_python} not found: run `bash benchmarks/setup_lmeval.sh` or pass --skip-lmeval")
    if not Path(args.data).is_file() or not (Path(args.data).parent / "dev.jsonl").is_file():
        p.error(f"{args.data} (and dev.jsonl beside it) not found")
    return args


def make_model(model_dir: Path, shape: dict) -> None:
    """A random Qwen3 of `shape`, saved as bf16 safetensors with the embedded model's tokenizer (once)."""
    if (model_dir / "config.json").is_file():
        return
    import torch
    from transformers import AutoTokenizer, Qwen3Config, Qwen3ForCausalLM

    from medtune.models import resolve

    tok = AutoTokenizer.from_pretrained(resolve("embedded", log=lambda *_: None))
    config = Qwen3Config(**shape, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)  # built in bf16: no fp32 transient of 7 GB
    try:
        model = Qwen3ForCausalLM(config)
    finally:
        torch.set_default_dtype(torch.float32)
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)


def recipe(model_dir: Path, data: Path, train_file: Path, device: str) -> list[str]:
    values = {"model": str(model_dir), "device": device, "data.source": str(train_file), "data.train_size": 16,
              "data.eval_source": str(data), "data.limit": 16, "train.max_steps": 2, "train.batch_size": 2,
              "train.max_length": 256, "train.target": "answer", "train.warmup": 0, "lora.r": 8, "lora.alpha": 16,
              "lora.target_modules": "[q_proj, v_proj]"}
    return [a for k, v in values.items() for a in ("--set", f"{k}={v}")]


def command(name: str, args, model_dir: Path, data: Path, train_file: Path, out: Path) -> tuple[list[str], dict]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    if name == "lmeval":
        task_dir = write_task(out / "lmeval_task", "medqa", data, None)
        return [args.lmeval_python, "-m", "lm_eval", "run", "--model", "hf", "--model_args",
                f"pretrained={model_dir},dtype=bfloat16", "--tasks", "medqa_local", "--include_path", str(task_dir),
                "--device", args.device, "--batch_size", "1", "--output_path", str(out / name),
                "--limit", str(args.limit)], env
    medtune = [sys.executable, "-c", GPU_PEAK] if args.device.startswith("cuda") else [sys.executable, "-m", "medtune"]
    if name == "eval":
        return [*medtune, "eval", "--model", str(model_dir), "--data", str(data), "--limit", str(args.limit),
                "--device", args.device, "--out", str(out / name / "out"), "--quiet", "--overwrite"], env
    return [*medtune, name, "--out", str(out / name / "out"), "--quiet", "--overwrite",
            *recipe(model_dir, data, train_file, args.device)], env


def gpu_peak_mb(log: Path) -> float | None:
    for line in log.read_text().splitlines() if log.is_file() else []:
        if line.startswith("medtune-gpu-peak-bytes"):
            return round(int(line.split()[1]) / 2**20, 1)
    return None


def ratios(runs: dict) -> dict:
    def ratio(a: str, b: str, key: str = "peak_rss_mb"):
        x, y = (runs.get(a) or {}).get(key), (runs.get(b) or {}).get(key)
        return round(x / y, 3) if x and y else None

    return {"eval_vs_lmeval": ratio("eval", "lmeval"), "run_vs_train": ratio("run", "train"),
            "gpu_run_vs_train": ratio("run", "train", "gpu_peak_mb")}


def render(report: dict) -> str:
    lines = [f"{report['model']}, {report['limit']} MedQA questions, device {report['device']}",
             f"{'run':8}{'peak RSS MB':>14}{'peak GPU MB':>14}{'wall s':>10}"]
    for name, r in report["runs"].items():
        gpu = f"{r['gpu_peak_mb']:.1f}" if r.get("gpu_peak_mb") else "-"
        lines.append(f"{name:8}{r['peak_rss_mb']:>14.1f}{gpu:>14}{r['wall_s']:>10.1f}")
    for key, value in report["ratios"].items():
        limit = LIMITS.get(key)
        verdict = "" if value is None or limit is None else (" ok" if value <= limit else " OVER")
        lines.append(f"{key:16} {value if value is not None else '-'}" + (f" (limit {limit}){verdict}" if limit else ""))
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
