"""What reviewers ask for beyond accuracy, as jobs: `medtune audit` (the shortcut audit of one model, written like an
eval) and `run`'s extra results (subgroups with power, the tuned model's audit, conformal sets).

The figures themselves come from audit.py, subgroups.py and conformal.py (functions of predictions rows); this module
only loads, scores and writes, so that the CLI and run.py each make one call.

Public API:
  audit_eval(items, cfg, out, adapter, fingerprint, quiet, log)   -> results dict (OUT/results.json, predictions.jsonl)
  run_extras(cfg, out, eval_items, base_rows, tuned_rows, loaded, style, calibration_items, log)
                                                                  -> {"subgroups", "audit"?, "conformal"} for results.json
"""

from __future__ import annotations

from pathlib import Path

from medtune.data.items import MCQItem

NO_HELDOUT = ("skipped: the run holds no items out of training (set data.validation to calibrate on them). Calibrating "
              "on training items gives no coverage guarantee (the model was fitted to them), and on eval items it "
              "would be circular")


def audit_eval(items: list[MCQItem], cfg, out: Path | None, adapter: str | None = None, fingerprint: dict | None = None,
               quiet: bool = False, log=print) -> dict:
    """The shortcut audit of cfg.model (+ adapter) on `items`: OUT/results.json holds the audit summary with the
    eval-style record (model, adapter, data fingerprint, prompt style, method, placement, environment); OUT/
    predictions.jsonl the per-item audit rows (audit.audit_rows)."""
    import time

    from medtune.audit import run_audit
    from medtune.errors import MedtuneError
    from medtune.evaluate import adapter_style
    from medtune.hardware import resolve_device, weights_dtype
    from medtune.models import load_model, placement
    from medtune.report import environment, write_json, write_jsonl

    if cfg.eval.method == "generate":
        raise MedtuneError("the audit re-scores options: use --method letter or answer, not generate")
    started = time.time()
    style = adapter_style(adapter, cfg.prompt_style, log) if adapter else cfg.prompt_style
    device = resolve_device(cfg.device)
    model, tokenizer, path = load_model(cfg.model, adapter=adapter, device=device, log=log,
                                        dtype=weights_dtype(device, mode=cfg.eval.mode),
                                        merge=cfg.eval.merge_adapter)
    log(f"audit: {len(items)} items, each scored as is, without its stem, with none-of-the-others and rotated")
    summary, rows = run_audit(model, tokenizer, items, style, cfg.eval.method, cfg.eval.mode, cfg.eval.batch_size)
    results = {"kind": "audit", "audit": summary, "model": cfg.model, "model_path": str(path), "adapter": adapter,
               "data": fingerprint, "prompt_style": style, "method": f"{cfg.eval.method}-logprob",
               "mode": cfg.eval.mode, "placement": placement(model), "wall_s": round(time.time() - started, 2),
               "environment": environment()}
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        write_jsonl(out / "predictions.jsonl", rows)
        write_json(out / "results.json", results)
    return results


def run_extras(cfg, out: Path, eval_items: list[MCQItem], base_rows: list[dict], tuned_rows: list[dict], loaded,
               style: str, calibration_items: list[MCQItem] | None = None, log=print) -> dict:
    """`run`'s extra results for results.json, from the main method's base and tuned rows and the tuned model:
      subgroups  per-subject accuracy (base, tuned) with Wilson CIs and MDE; before/after per subject with McNemar,
                 BH-adjusted p and the paired MDE;
      audit      (eval.audit) the tuned model's shortcut audit; per-item rows in RUN/tuned-audit/predictions.jsonl;
      conformal  LAC and APS sets calibrated on the tuned model's scores of `calibration_items` (data.validation:
                 held out of training, never eval items), evaluated on the eval rows; else {"skipped": why}."""
    from medtune import subgroups

    extras: dict = {"subgroups": {
        "field": "subject",
        "base": subgroups.accuracy_by(base_rows, "subject"),
        "tuned": subgroups.accuracy_by(tuned_rows, "subject"),
        "before_after": subgroups.before_after_by(base_rows, tuned_rows, "subject"),
    }}
    model, tokenizer = loaded
    method, e = cfg.eval.method, cfg.eval
    if e.audit:
        if method == "generate":
            extras["audit"] = {"skipped": "the audit re-scores options; eval.method generate has no option scores"}
        else:
            from medtune.audit import run_audit
            from medtune.report import write_jsonl

            log(f"audit: the tuned model on {len(eval_items)} items (options only, none of the others, rotations)")
            summary, rows = run_audit(model, tokenizer, eval_items, style, method, e.mode, e.batch_size)
            write_jsonl(_mkdir(Path(out) / "tuned-audit") / "predictions.jsonl", rows)
            extras["audit"] = summary
    extras["conformal"] = _conformal(cfg, model, tokenizer, style, tuned_rows, calibration_items, log)
    return extras


def _conformal(cfg, model, tokenizer, style: str, tuned_rows: list[dict], calibration_items: list[MCQItem] | None,
               log) -> dict:
    from medtune import conformal

    if not calibration_items:
        return {"skipped": NO_HELDOUT}
    if cfg.eval.method == "generate" or not tuned_rows or "probs" not in tuned_rows[0]:
        return {"skipped": "the evaluation has no option probabilities (eval.method generate)"}
    from medtune.scoring import score_items

    log(f"conformal: scoring {len(calibration_items)} held-out calibration items with the tuned model")
    cal_rows = score_items(model, tokenizer, calibration_items, style, cfg.eval.method, cfg.eval.mode,
                           batch_size=cfg.eval.batch_size)
    alpha = cfg.eval.conformal_alpha
    note = ("the validation items also chose the kept checkpoint (train.keep: best), a mild selection on the "
            "calibration items" if getattr(cfg.train, "keep", "last") == "best" else None)
    return {"calibration_source": "data.validation (held out of training, never eval items)", "alpha": alpha,
            "n_calibration": len(cal_rows), "note": note,
            **{m: conformal.conformal_summary(cal_rows, tuned_rows, alpha, m) for m in conformal.METHODS}}


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path
