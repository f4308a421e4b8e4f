"""The main job: evaluate the base model, fine-tune, evaluate the tuned model on the same items, compare honestly."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

from medtune import stats
from medtune.config import Config, save_config
from medtune.data.items import MCQItem
from medtune.data.prepare import prepare_data, validation_split


def run(cfg: Config, quiet: bool = False, log=print, out: Path | None = None) -> dict:
    """The base weights are held once: the base evaluations (every method), training (LoRA layers injected into that
    same model, then taken out) and the tuned evaluations (the saved adapter attached to it) all use one load, in the
    device policy's dtype. QLoRA trains on its own quantized load, so the evaluation copy is dropped meanwhile.
    `out`: where to write (the CLI's fresh dir beside an old run, swapped in at the end); default cfg.out_dir."""
    import gc

    from medtune.doctor import preflight
    from medtune.evaluate import run_eval
    from medtune.hardware import resolve_device, weights_dtype
    from medtune.models import attach_adapter, held_in_bf16, hold_in_bf16, load_model, load_tokenizer
    from medtune.report import environment, write_json
    from medtune.train import train

    started = time.time()
    out = Path(out) if out is not None else Path(cfg.out_dir)
    device = resolve_device(cfg.device)
    train_items, eval_items, data = prepare_data(cfg, log)
    train_items, val_items, data = validation_split(cfg, train_items, eval_items, data)  # data.validation
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    log(f"data: {len(train_items)} training and {len(eval_items)} eval items ({data['eval']['source']})")
    preflight(cfg, log)  # the doctor's warnings for this training (dtype, memory) before the base evaluation
    model, tokenizer, path = load_model(cfg.model, device=device, log=log)
    methods = [cfg.eval.method, *[m for m in cfg.eval.extra_methods if m != cfg.eval.method]]
    method_cfgs = {m: replace(cfg, eval=replace(cfg.eval, method=m)) for m in methods}
    suffix = {m: "" if m == cfg.eval.method else f"-{m}" for m in methods}  # base/, base-answer/, ...
    base = {m: run_eval(eval_items, method_cfgs[m], out / f"base{suffix[m]}", loaded=(model, tokenizer, path),
                        fingerprint=data["eval"], quiet=quiet, log=log, label=f"base{suffix[m].replace('-', ' ')}")
            for m in methods}
    if cfg.lora.quantize != "none":
        del model
        gc.collect()
        summary = train(cfg, train_items, out, quiet=quiet, log=log, extra_meta={"data": data}, val_items=val_items)
        model = load_model(cfg.model, device=device, log=log)[0]
    else:
        summary = train(cfg, train_items, out, quiet=quiet, log=log, extra_meta={"data": data}, base_model=model,
                        val_items=val_items)
        if weights_dtype(device) == "bfloat16" and not held_in_bf16(model):
            hold_in_bf16(model, device)  # fp32 training (train.dtype=float32) widened it: back to the eval holding
    adapter = str(out / "adapter")
    tuned_model = attach_adapter(model, adapter)
    merge = cfg.eval.merge_adapter and not held_in_bf16(model)  # bf16 weights keep the adapter apart (no rounding)
    tuned_model = (tuned_model.merge_and_unload() if merge else tuned_model).eval()
    tuned_tok = load_tokenizer(adapter) if (out / "adapter" / "tokenizer_config.json").is_file() else tokenizer
    tuned = {m: run_eval(eval_items, method_cfgs[m], out / f"tuned{suffix[m]}", adapter=adapter,
                         loaded=(tuned_model, tuned_tok, path), fingerprint=data["eval"], quiet=quiet, log=log,
                         label=f"tuned{suffix[m].replace('-', ' ')}") for m in methods}
    first = cfg.eval.method
    results = {"kind": "run", "config": cfg.to_dict(), "data": data, "base": base[first][0], "tuned": tuned[first][0],
               "train": summary, "comparison": compare(eval_items, base[first][0], tuned[first][0], base[first][1],
                                                       tuned[first][1]), "extra_methods": {}}
    for m in methods[1:]:  # the same items and adapter, scored another way
        (b, b_rows), (t, t_rows) = base[m], tuned[m]
        results["extra_methods"][m] = {"base": b, "tuned": t, "comparison": compare(eval_items, b, t, b_rows, t_rows)}
    from medtune.evaluation_extras import run_extras  # subgroups with power, eval.audit, conformal sets

    results |= run_extras(cfg, out, eval_items, base[first][1], tuned[first][1], (tuned_model, tuned_tok),
                          tuned[first][0]["prompt_style"], val_items, log)
    results["wall_s"], results["environment"] = round(time.time() - started, 1), environment()
    write_json(out / "results.json", results)
    from medtune.html_report import write_report

    results["report"] = str(write_report(out, explain=True, log=log, loaded=(tuned_model, tuned_tok)))  # + cost
    return results


def compare(items: list[MCQItem], base: dict, tuned: dict, base_rows: list[dict], tuned_rows: list[dict]) -> dict:
    """Paired comparison on the same items (McNemar), for raw and, when measured, debiased predictions, plus the
    letter-bias check: does a change in letter preference explain the change in accuracy?"""
    ids = [it.id for it in items]
    bm, tm = base["metrics"], tuned["metrics"]
    out = {"raw": stats.paired_compare([r["correct"] for r in base_rows], [r["correct"] for r in tuned_rows], ids)}
    deb_b = deb_t = None
    if "permute" in bm and "permute" in tm:
        out["debiased"] = stats.paired_compare(bm["permute"]["debiased_correct"], tm["permute"]["debiased_correct"],
                                               ids)
        deb_b, deb_t = bm["permute"]["debiased_accuracy"], tm["permute"]["debiased_accuracy"]
    out["letter_bias_warning"] = stats.letter_shift_explains(bm["letters"], tm["letters"], deb_b, deb_t)
    return out
