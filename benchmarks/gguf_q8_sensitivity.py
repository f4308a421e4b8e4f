"""Which matrices make Q8_0 move the demo letter log-probs? Round one kind of matrix at a time in memory.

Scores the demo evaluation set (letter method, fp32, `harness` prompt) with the embedded model (merged with
--adapter), then with Q8_0 rounding (the gguf package's quantiser, what `medtune export --gguf q8_0` writes) applied
to all matrices, all but the tied embedding, each projection kind alone, and layers 0-1; prints the same comparison
the export's check writes into the model card (export_gguf.compare_scores) for each.

  HF_HUB_OFFLINE=1 python benchmarks/gguf_q8_sensitivity.py --adapter runs/demo/adapter
"""

from __future__ import annotations

import argparse
import copy
import json


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--adapter")
    ap.add_argument("--limit", type=int)
    args = ap.parse_args()

    import gguf
    import torch

    from medtune.data import sources
    from medtune.export_gguf import compare_scores
    from medtune.models import load_model
    from medtune.scoring import encode, score

    items = sources.load(sources.DEMO, "eval")[: args.limit]
    model, tokenizer, _ = load_model("embedded", adapter=args.adapter, merge=True, log=lambda *_: None)
    encoded = encode(items, "harness", tokenizer)
    ref = score(model, encoded, batch_size=16, mode="exact")[0]
    q8 = gguf.GGMLQuantizationType.Q8_0

    def embed(name: str) -> bool:
        return "embed_tokens" in name or "lm_head" in name

    subsets = {"all": lambda n: True, "all but the embedding": lambda n: not embed(n)}
    for kind in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
        subsets[f"only {kind}"] = lambda n, kind=kind: kind in n
    subsets["layers 0-1 only"] = lambda n: ".layers.0." in n or ".layers.1." in n
    for label, chosen in subsets.items():
        rounded = copy.deepcopy(model)
        with torch.no_grad():
            for name, p in rounded.named_parameters():
                if p.ndim == 2 and chosen(name):
                    q = gguf.quants.dequantize(gguf.quants.quantize(p.float().numpy(), q8), q8)
                    p.copy_(torch.from_numpy(q.reshape(p.shape)))
        c = compare_scores(ref, score(rounded, encoded, batch_size=16, mode="exact")[0], 0.15)
        keep = ("max_abs_logprob_diff", "mean_abs_logprob_diff", "agreement", "max_abs_option_normalized_diff")
        print(label, json.dumps({k: round(c[k], 4) for k in keep}), flush=True)


if __name__ == "__main__":
    main()
