"""Every verb on the device it is given: eval, ask, predict, serve (through gradio_client), train, run, export --gguf.

Each verb runs in this process through medtune's own CLI (`--device DEVICE`), so that the device's peak memory can be
read per verb (torch.cuda.max_memory_allocated, reset before each). After each verb the weights' placement that the
verb recorded (results.json / --json output / the adapter's summary) must name DEVICE and nothing else; training's
peak is set beside the doctor's estimate for the same recipe (doctor.estimate_memory).

  python benchmarks/gpu_verbs.py --device cuda --out runs/gpu-verbs                 # on a GPU, the embedded model
  python benchmarks/gpu_verbs.py --device cpu --model TINY_DIR --out /tmp/v --tiny  # the test, on a CPU

Writes OUT/gpu_verbs.json: per verb exit status, seconds, device peak MB, placement; exit 1 if any verb failed or put
weights anywhere but DEVICE.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import time
import traceback
from pathlib import Path

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "medqa" / "test.jsonl"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    report = {"device": args.device, "model": args.model, "verbs": {}}
    for name, fn in VERBS.items():
        report["verbs"][name] = timed(name, fn, args, out)
        print(f"{name:8} {json.dumps(report['verbs'][name])}", flush=True)
    report["passed"] = all(v["ok"] for v in report["verbs"].values())
    (out / "gpu_verbs.json").write_text(json.dumps(report, indent=1))
    return 0 if report["passed"] else 1


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--model", default="embedded")
    p.add_argument("--data", default=str(DATA), help="MedQA test file (eval, predict, run's eval part).")
    p.add_argument("--out", required=True)
    p.add_argument("--tiny", action="store_true", help="Toy sizes: a few items and steps.")
    return p.parse_args(argv)


def timed(name: str, fn, args, out: Path) -> dict:
    import torch

    cuda = args.device.startswith("cuda")
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    try:
        placement, extra = fn(args, out / name)
        problem = misplaced(placement, args.device)
    except (Exception, SystemExit) as e:  # noqa: BLE001 -- a failing verb is recorded; the next one still runs
        placement, extra, problem = None, {}, f"{type(e).__name__}: {e}"[:500]
        (out / f"{name}.error.txt").write_text(traceback.format_exc())
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else None
    return {"ok": problem is None, "problem": problem, "seconds": round(time.perf_counter() - start, 1),
            "peak_device_mb": round(peak, 1) if peak is not None else None, "placement": placement, **extra}


def misplaced(placement: dict | list | None, device: str) -> str | None:
    """None when every recorded placement names `device` (cuda == cuda:0) and nothing else."""
    records = placement if isinstance(placement, list) else [placement]
    for record in records:
        if not record:
            return "no placement recorded"
        devices = {d if ":" in d or d == "cpu" else f"{d}:0" for d in record["devices"]}
        want = device if ":" in device or device == "cpu" else f"{device}:0"
        if devices != {want}:
            return f"weights on {sorted(devices)}, not only {want}"
    return None


def cli(argv: list[str]) -> None:
    """One medtune command in this process; a non-zero exit raises."""
    from medtune.cli import app

    try:
        code = app(argv, standalone_mode=False)  # click returns an Exit's code instead of exiting
    except SystemExit as e:
        code = e.code
    if code:
        raise RuntimeError(f"medtune {argv[0]} exited {code}")


def common(args) -> list[str]:
    return ["--model", args.model, "--device", args.device]


def limit(args) -> str:
    return "4" if args.tiny else "64"


def verb_eval(args, out: Path):
    cli(["eval", *common(args), "--data", args.data, "--limit", limit(args), "--out", str(out), "--quiet",
         "--overwrite"])
    results = json.loads((out / "results.json").read_text())
    return results["placement"], {"n": results["metrics"]["n"], "wall_s": results["wall_s"]}


def verb_ask(args, out: Path):
    from medtune import ask

    loaded = ask.load(args.model, device=args.device, log=lambda *_: None)
    result = ask.answer(loaded, ask.make_item("Which vitamin prevents scurvy?", ["Vitamin C", "Vitamin D", "Iron"]),
                        max_new_tokens=8 if args.tiny else 48)
    out.mkdir(parents=True, exist_ok=True)
    (out / "answer.json").write_text(json.dumps(result, indent=1))
    return result["placement"], {"answer": result["answer"]}


def verb_predict(args, out: Path):
    from medtune import ask
    from medtune.data import sources
    from medtune.predict import predict

    out.mkdir(parents=True, exist_ok=True)
    loaded = ask.load(args.model, device=args.device, log=lambda *_: None)
    items = sources.load(args.data, "eval")[: int(limit(args))]
    summary = predict(loaded, items, out / "predictions.jsonl", args.data, 16, False, True, lambda *_: None)
    return summary["placement"], {"new": summary["new"]}


def verb_serve(args, out: Path):
    from gradio_client import Client

    from medtune import ask
    from medtune.serve import serve

    loaded = ask.load(args.model, device=args.device, log=lambda *_: None)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    page = serve(loaded, port=port, max_new_tokens=8, log=lambda *_: None, block=False)
    try:
        client = Client(f"http://127.0.0.1:{port}/", verbose=False, analytics_enabled=False)
        *_, result = client.predict("Which vitamin prevents scurvy?", "Vitamin C\nVitamin D\nIron", api_name="/ask")
    finally:
        page.close()
    return result["placement"], {"answer": result["answer"]}


def recipe(args, train_file: Path) -> list[str]:
    steps, size = ("2", "8") if args.tiny else ("20", "160")
    values = {"model": args.model, "data.source": str(train_file), "data.train_size": size,
              "data.eval_source": args.data, "data.limit": limit(args), "train.max_steps": steps,
              "train.batch_size": "4", "train.max_length": "256", "train.target": "answer", "train.warmup": "0"}
    return [a for k, v in values.items() for a in ("--set", f"{k}={v}")]


def verb_train(args, out: Path):
    from medtune.config import load_config
    from medtune.doctor import estimate_memory, model_params

    train_file = Path(args.data).with_name("dev.jsonl")
    sets = recipe(args, train_file)
    cli(["train", "--device", args.device, "--out", str(out), "--quiet", "--overwrite", *sets])
    summary = json.loads((out / "adapter" / "medtune.json").read_text())["summary"]
    cfg = load_config(None, sets[1::2])
    params = model_params(cfg.model)
    dtype = summary["placement"]["weights"]
    estimate = estimate_memory(params, cfg.train.batch_size * cfg.train.max_length, dtype) if params else None
    return summary["placement"], {"doctor_estimate_mb": round(estimate / 2**20, 1) if estimate else None,
                                  "tokens_per_s": summary["tokens_per_s"]}


def verb_run(args, out: Path):
    train_file = Path(args.data).with_name("dev.jsonl")
    cli(["run", "--device", args.device, "--out", str(out), "--quiet", "--overwrite", *recipe(args, train_file)])
    results = json.loads((out / "results.json").read_text())
    return [results["base"]["placement"], results["tuned"]["placement"]], \
        {"base_accuracy": results["base"]["metrics"]["accuracy"], "tuned_accuracy": results["tuned"]["metrics"]["accuracy"]}


def verb_export(args, out: Path):
    run_dir = out.parent / "run"
    cli(["export", str(run_dir), "--device", args.device, "--out", str(out), "--gguf", "f16", "--overwrite"])
    # the merge ran on the device; the GGUF check reads the file back on the CPU (fp32 reference), by design
    return {"devices": [args.device]}, {"gguf": sorted(p.name for p in out.glob("*.gguf"))}


VERBS = {"eval": verb_eval, "ask": verb_ask, "predict": verb_predict, "serve": verb_serve, "train": verb_train,
         "run": verb_run, "export": verb_export}


if __name__ == "__main__":
    sys.exit(main())
