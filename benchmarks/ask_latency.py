"""Generation throughput and `medtune ask` latency on this machine (issue 11).

Part 1, generation (`eval --method generate`'s `generate_rows`): the same demo questions generated with limit 1 and
limit 6 at eval's default batch size (16: all six in one left-padded batch) and at batch size 1, each until EOS or a
token cap: wall and CPU time, new tokens written (to EOS), how many hit the cap. Then the decode cost of exactly 96 new
tokens (EOS ignored) for a batch of 1 and a left-padded batch of 6: a batch decodes until its longest row stops, so
one row that never writes EOS makes every row of its batch pay for the whole cap.

Part 2, ask latency: `ask.answer()` (eval's scoring + a greedy explanation capped at 96 tokens) on N demo questions
after the model is loaded: p50, p90, max of wall time and of process CPU time. On a shared machine wall time measures
the neighbours; CPU time does not, and on 2 idle cores the wall time of a 2-thread process is at most its CPU time.

    OMP_NUM_THREADS=2 python benchmarks/ask_latency.py [--adapter RUN/adapter] [--n 20] [--cap 256]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="embedded")
    ap.add_argument("--adapter", default=None)
    ap.add_argument("--n", type=int, default=20, help="questions for the ask latency")
    ap.add_argument("--cap", type=int, default=256, help="max_new_tokens for part 1 (eval's default)")
    ap.add_argument("--skip-generate", action="store_true")
    args = ap.parse_args()

    import torch

    from medtune import ask
    from medtune.data.sources import demo_items

    started = time.time()
    loaded = ask.load(args.model, args.adapter, log=lambda *_: None)
    load_s = time.time() - started
    items = demo_items("eval")
    out = {"model": args.model, "adapter": args.adapter, "threads": torch.get_num_threads(), "load_s": round(load_s, 2)}
    if not args.skip_generate:
        out["generate"] = generation(loaded, items[:6], args.cap)
        out["decode_96"] = [decode_cost(loaded, items[:n]) for n in (1, 6)]
    out["ask"] = ask_latency(loaded, items[: args.n])
    print(json.dumps(out, indent=1))


def generation(loaded, items, cap: int) -> list[dict]:
    from medtune.generate import generate_rows

    tok = loaded.tokenizer
    rows_out = []
    for limit, batch in [(1, 16), (6, 16), (6, 1)]:
        t, c = time.time(), time.process_time()
        rows = generate_rows(loaded.model, tok, items[:limit], loaded.style, cap, batch)
        wall, cpu = time.time() - t, time.process_time() - c
        lengths = [len(tok(r["output"], add_special_tokens=False).input_ids) for r in rows]
        rows_out.append({"limit": limit, "batch_size": batch, "wall_s": round(wall, 2), "cpu_s": round(cpu, 2),
                         "new_tokens": lengths, "hit_cap": sum(r["hit_length_cap"] for r in rows)})
    return rows_out


def decode_cost(loaded, items) -> dict:
    """Greedy decoding of exactly 96 new tokens (EOS ignored) for a left-padded batch of len(items) prompts."""
    import torch

    from medtune.prompts import build_prompt

    tok = loaded.tokenizer
    tok.padding_side = "left"
    enc = tok([build_prompt(it, loaded.style, tok) for it in items], return_tensors="pt", padding=True,
              add_special_tokens=False)
    with torch.inference_mode():
        loaded.model.generate(**enc, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)  # warm-up
        t, c = time.time(), time.process_time()
        loaded.model.generate(**enc, max_new_tokens=96, min_new_tokens=96, do_sample=False,
                              pad_token_id=tok.pad_token_id)
        wall, cpu = time.time() - t, time.process_time() - c
    return {"batch": len(items), "prompt_tokens": enc.input_ids.shape[1], "new_tokens_per_row": 96,
            "wall_s": round(wall, 2), "cpu_s": round(cpu, 2), "cpu_s_per_step": round(cpu / 96, 4)}


def ask_latency(loaded, items) -> dict:
    from medtune import ask

    ask.answer(loaded, items[0])  # warm-up (first-call allocations)
    walls, cpus, capped = [], [], 0
    for item in items:
        t, c = time.time(), time.process_time()
        result = ask.answer(loaded, item, max_new_tokens=96)
        walls.append(time.time() - t)
        cpus.append(time.process_time() - c)
        capped += result["explanation_hit_cap"]
    return {"n": len(walls), "wall": _quantiles(walls), "cpu": _quantiles(cpus), "explanations_hit_96_cap": capped}


def _quantiles(values: list[float]) -> dict:
    v = sorted(values)
    return {"p50_s": round(statistics.median(v), 2), "p90_s": round(v[int(0.9 * (len(v) - 1))], 2),
            "max_s": round(v[-1], 2)}


if __name__ == "__main__":
    main()
