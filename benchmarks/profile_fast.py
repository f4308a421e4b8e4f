"""Where fast mode's bf16 pass spends its time, and what glibc's return-to-OS setting costs it (docs/benchmarks.md,
"Evaluation: parity with lm-evaluation-harness, and speed").

  python benchmarks/profile_fast.py --n 64            # torch profile of the bf16 pass: share of matmul, attention, rest
  python benchmarks/profile_fast.py --n 64 --mallopt  # user CPU seconds of the bf16 pass, setting on / off, 2 pairs
  python benchmarks/profile_fast.py --attention       # ms per call of the attention paths, SmolLM2's shapes, bf16

Embedded model, the first N MedQA test questions, harness prompt, batches as `medtune eval` makes them.
"""

from __future__ import annotations

import argparse
import resource
import time

from medtune import scoring
from medtune.config import Config
from medtune.data.formats import read_file
from medtune.models import glibc, load_model


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--data", default="../shared/data/medqa/test.jsonl")
    parser.add_argument("--mallopt", action="store_true")
    parser.add_argument("--attention", action="store_true")
    args = parser.parse_args()
    if args.attention:
        return attention()
    model, tok, _ = load_model("embedded", log=lambda *_: None)
    encoded = scoring.encode(read_file(args.data)[: args.n], Config().prompt_style, tok, "letter")

    def bf16_pass() -> None:
        with scoring.fp32_head(model):
            scoring.score_batched(model, encoded, 16, None)

    bf16_pass()  # warm-up
    if args.mallopt:
        libc = glibc()
        for pair in range(2):
            for on in (True, False):
                libc.mallopt(scoring.M_MMAP_THRESHOLD, (1 << 20) if on else (32 << 20))
                cpu, wall = resource.getrusage(resource.RUSAGE_SELF).ru_utime, time.perf_counter()
                bf16_pass()
                print(f"pair {pair} setting {'on ' if on else 'off'}: user CPU "
                      f"{resource.getrusage(resource.RUSAGE_SELF).ru_utime - cpu:.1f} s, wall "
                      f"{time.perf_counter() - wall:.1f} s", flush=True)
        return
    from torch.profiler import profile

    with profile() as prof:
        bf16_pass()
    total = sum(e.self_cpu_time_total for e in prof.key_averages())
    for event in sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:8]:
        print(f"{event.key:55} {event.self_cpu_time_total / total:6.1%}")


def attention(batch: int = 16, seq: int = 210, reps: int = 10) -> None:
    """One layer's attention of a scoring batch (9 query heads, 3 KV heads, head dim 64) by each path."""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q = torch.randn(batch, 9, seq, 64, dtype=torch.bfloat16)
    k, v = (torch.randn(batch, 9, seq, 64, dtype=torch.bfloat16) for _ in range(2))
    mask = torch.ones(batch, 1, seq, seq, dtype=torch.bool).tril()
    additive = torch.zeros(batch, 1, seq, seq, dtype=torch.bfloat16).masked_fill(~mask, float("-inf"))

    def eager():
        weights = torch.softmax(((q @ k.transpose(-1, -2)) * 64 ** -0.5 + additive).float(), -1).to(q.dtype)
        return weights @ v

    def math_backend():
        with sdpa_kernel(SDPBackend.MATH):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    for name, fn in (("sdpa, bool mask", lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask)),
                     ("sdpa, float mask", lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=additive)),
                     ("sdpa, causal", lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)),
                     ("eager", eager), ("sdpa, math backend", math_backend)):
        fn()
        start = time.perf_counter()
        for _ in range(reps):
            fn()
        print(f"{name:20} {(time.perf_counter() - start) / reps * 1000:6.1f} ms", flush=True)


if __name__ == "__main__":
    main()
