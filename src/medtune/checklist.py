"""The reporting checklist: the MI-CLEAR-LLM and TRIPOD-LLM items a `medtune run` directory can fill, and the ones
only its author can.

Checklists (the wording below is ours, not the checklists'):
  MI-CLEAR-LLM  Park SH et al., Korean J Radiol 2024;25(10):865-868: six items, numbered 1-6 as published (1 the
                LLM's identification and specification, 2 stochasticity, 3 prompt wording and syntax, 4 prompt
                structuring, 5 prompt testing and optimization, 6 test-data independence). A 2025 update (Korean J
                Radiol 2025;26(12)) regroups them into eight; this checklist follows the 2024 numbering.
  TRIPOD-LLM    Gallifant J et al., Nat Med 2025;31:60-69: 19 main items with lettered subitems. We could not check
                its item numbers against the published table, so its entries are cited by section only (e.g.
                "Methods: LLM"); look the number up in the official checklist (tripod-llm.vercel.app) when you submit.

Everything filled comes from the run's own files (results.json, config.yaml, base/ and tuned/ results and cost.json,
adapter/medtune.json, the weights' sha256); nothing is guessed. An item the files cannot answer says so and is marked
"to be completed by the author".

Public API:
  fill(run_dir, items=None, tokenizer=None) -> [{checklist, item, topic, status ("filled" | "author"), text}]
  markdown(entries) -> the section the export's model card carries
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

MI_CLEAR = "MI-CLEAR-LLM"
TRIPOD = "TRIPOD-LLM"
AUTHOR = "to be completed by the author"
HASH_LIMIT = 4 << 30  # bytes of weights hashed at most (a 135M-1B model); larger: the Hub revision or file sizes
CITATIONS = (
    "MI-CLEAR-LLM: Park SH, Suh CH, Lee JH, Kahn CE Jr, Moy L. Korean J Radiol 2024;25(10):865-868 (items 1-6 as "
    "published). TRIPOD-LLM: Gallifant J et al. Nat Med 2025;31:60-69 (19 items; cited here by section, because we "
    "could not verify the item numbers against the published table). Wording here is medtune's, not the checklists'.")


def fill(run_dir: Path | str, items: list | None = None, tokenizer=None) -> list[dict]:
    """The checklist of one run directory, in checklist order: MI-CLEAR-LLM 1-6, then TRIPOD-LLM by section."""
    run_dir = Path(run_dir)
    res = _json(run_dir / "results.json")
    base, tuned = res.get("base", {}), res.get("tuned", {})
    cfg = res.get("config", {})
    model = _model_identity(run_dir, res)
    dates = _dates(run_dir)
    decoding = _decoding(res)
    prompt = _prompt(res, items if items is not None else _items(run_dir), tokenizer)
    independence = _independence(res)
    stats_text = _statistics(res)
    env = res.get("environment", {})
    versions = ", ".join(f"{k} {v}" for k, v in sorted(env.get("versions", {}).items()) if v)
    hardware = (f"{env.get('device', '?')} ({', '.join(env.get('device_names') or []) or 'no accelerator'}), "
                f"{env.get('cpu_count', '?')} CPU cores, {env.get('platform', '?')}; Python {env.get('python', '?')}; "
                f"{versions}; whole run {res.get('wall_s', '?')} s")
    seeds = (f"data split seed {cfg.get('data', {}).get('seed')}, training seed {cfg.get('train', {}).get('seed')}; "
             "evaluation draws no random numbers")
    lora, train = cfg.get("lora", {}), cfg.get("train", {})
    adaptation = (f"LoRA fine-tuning (r {lora.get('r')}, alpha {lora.get('alpha')}, dropout {lora.get('dropout')}, "
                  f"modules {', '.join(lora.get('target_modules') or [])}, quantize {lora.get('quantize')}); "
                  f"{res.get('train', {}).get('steps', '?')} steps, lr {train.get('lr')}, batch {train.get('batch_size')}"
                  f" x {train.get('grad_accum')}, target {train.get('target')}, loss on {train.get('loss_on')}; "
                  "the full config is in config.yaml")
    data = res.get("data", {})
    data_text = "; ".join(f"{part}: {d.get('source')} ({d.get('split')}), n = {d.get('n')}, ids sha256 "
                          f"{str(d.get('ids_sha256', ''))[:16]}..." for part, d in data.items() if isinstance(d, dict)
                          and "source" in d)
    entries = [
        _e(MI_CLEAR, "1", "LLM identification and specification",
           f"{model}. Queried (evaluations started): {dates}. No web access or retrieval: local weights, offline. "
           f"The base model's training-data cutoff: {AUTHOR} (from its model card)."),
        _e(MI_CLEAR, "2", "Stochasticity", f"{decoding} Seeds: {seeds}. Each figure comes from one deterministic "
           "pass; repeating it gives the same predictions on the same hardware and software (medtune compare "
           "--parity checks this across devices)."),
        _e(MI_CLEAR, "3", "Prompt wording and syntax", prompt),
        _e(MI_CLEAR, "4", "Prompt structuring", f"One prompt per question, zero-shot, no conversation history, no "
           f"system prompt beyond the style's own; options lettered in the prompt; {decoding}"),
        _e(MI_CLEAR, "5", "Prompt testing and optimization", f"medtune tuned no prompt on these items: the style "
           f"({tuned.get('prompt_style', '?')}) was chosen by name before the run. Any prompt exploration done "
           f"beforehand, and why this style: {AUTHOR}.", status="author"),
        _e(MI_CLEAR, "6", "Independence of the test data", independence),
        _e(TRIPOD, "Methods: data", "Data sources, partition and dates",
           f"{data_text}. Training never includes test splits (medtune refuses them). Data collection dates and "
           f"preprocessing beyond medtune's reader: {AUTHOR}."),
        _e(TRIPOD, "Methods: LLM", "Model, version and adaptation", f"{model}. Adaptation: {adaptation}."),
        _e(TRIPOD, "Methods: LLM", "Output generation and handling", decoding),
        _e(TRIPOD, "Methods: evaluation", "Metrics, uncertainty and comparison", stats_text),
        _e(TRIPOD, "Methods: compute", "Hardware and software", hardware),
        _e(TRIPOD, "Results", "Performance with uncertainty", _results(base, tuned, res)),
        _e(TRIPOD, "Open science", "Code, config and prompts", f"medtune {env.get('versions', {}).get('medtune', '')}"
           f" with the resolved config (config.yaml), the prompt style and per-item predictions (base/, tuned/) in "
           f"the run directory. Data availability, funding, conflicts of interest, protocol and registration: "
           f"{AUTHOR}.", status="author"),
    ]
    for section, topic in (("Title and abstract", "Title and structured abstract naming the LLM and task"),
                           ("Introduction", "Background, intended use and objectives"),
                           ("Methods: annotation", "Reference standard, annotators and any human rating of outputs"),
                           ("Methods: ethics", "Ethics approval and data governance"),
                           ("Patient and public involvement", "Involvement, or a statement that there was none"),
                           ("Discussion", "Interpretation, limitations, intended use, oversight, future work")):
        entries.append(_e(TRIPOD, section, topic, f"{AUTHOR}.", status="author"))
    return entries


def markdown(entries: list[dict], public: bool = False) -> str:
    """The checklist as a model-card section; `public`: absolute paths reduced to their last component (a card
    leaves this machine)."""
    lines = ["## Reporting checklist (MI-CLEAR-LLM, TRIPOD-LLM)", "",
             "Filled by medtune from the run's files; items marked *author* are for the study's author.", "",
             "| checklist | item | topic | status | filled from the run |", "|---|---|---|---|---|"]
    for e in entries:
        text = _scrub(e["text"]) if public else e["text"]
        text = text.replace("|", "\\|").replace("\n", "<br>")
        lines.append(f"| {e['checklist']} | {e['item']} | {e['topic']} | {e['status']} | {text} |")
    return "\n".join(lines + ["", CITATIONS, ""])


def _scrub(text: str) -> str:
    """Every absolute or ~ path in `text` reduced to its last component."""
    return _PATH.sub(lambda m: Path(m.group()).name or m.group(), text)


_PATH = re.compile(r"(?<![\w.:/])(?:~|/)[^\s,;()'\"]+")


def _e(checklist: str, item: str, topic: str, text: str, status: str = "filled") -> dict:
    return {"checklist": checklist, "item": item, "topic": topic, "status": status, "text": text}


def _json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _model_identity(run_dir: Path, res: dict) -> str:
    """Name, where the weights came from, and their revision: the Hub snapshot, or the sha256 of the weights files."""
    tuned = res.get("tuned", {})
    name = res.get("config", {}).get("model") or tuned.get("model", "?")
    path = Path(tuned["model_path"]) if tuned.get("model_path") else None
    parts = path.parts if path else ()
    revision = f"Hub revision {parts[parts.index('snapshots') + 1]}" if "snapshots" in parts[:-1] else None
    weights = _weights_sha256(run_dir, path) if path else None
    adapter = _file_sha256(run_dir / "adapter" / "adapter_model.safetensors")
    text = f"base model {name}"
    text += f" ({revision})" if revision else ""
    text += f"; weights sha256: {weights}" if weights else ""
    text += f"; LoRA adapter adapter/adapter_model.safetensors sha256 {adapter}" if adapter else ""
    return text


def _weights_sha256(run_dir: Path, model_path: Path) -> str | None:
    """sha256 of each weights file (cached in RUN/weights_sha256.json: a report re-render does not re-read GBs)."""
    cache = run_dir / "weights_sha256.json"
    if cache.is_file():
        saved = json.loads(cache.read_text())
        if saved.get("model_path") == str(model_path):
            return saved["text"]
    if not model_path.is_dir():
        return None
    files = sorted(model_path.glob("*.safetensors")) or sorted(model_path.glob("*.bin")) or sorted(
        model_path.glob("*.gguf"))
    if not files:
        return None
    size = sum(f.stat().st_size for f in files)
    if size > HASH_LIMIT:
        text = f"not computed ({size / 2**30:.1f} GiB in {len(files)} files; run sha256sum on {model_path})"
    else:
        text = ", ".join(f"{f.name} {_file_sha256(f)}" for f in files)
    from medtune import io

    io.write_text(cache, json.dumps({"model_path": str(model_path), "text": text}))
    return text


def _file_sha256(path: Path) -> str | None:
    from medtune import io

    return io.sha256_file(path) if path.is_file() else None


def _dates(run_dir: Path) -> str:
    found = []
    for part in ("base", "tuned"):
        started = _json(run_dir / part / "cost.json").get("started")
        if started:
            found.append(f"{part} {started}")
    if found:
        return ", ".join(found)
    path = run_dir / "results.json"
    return (f"results.json written {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(path.stat().st_mtime))} (file "
            "time)") if path.is_file() else f"unknown ({AUTHOR})"


def _decoding(res: dict) -> str:
    tuned = res.get("tuned", {})
    method = tuned.get("method", "?")
    if method.startswith("generate"):
        return (f"Generation is greedy (no sampling, no temperature), at most {tuned.get('max_new_tokens')} new "
                "tokens; the answer letter is parsed from the text.")
    mode = tuned.get("mode", "?")
    return (f"Scoring method {method}: every option's log-likelihood in one forward pass, the answer is the argmax; "
            f"no text is sampled, so there is no temperature or top-p. Mode {mode}"
            + (" (bf16, close calls re-scored in fp32: decisions equal fp32's)." if mode == "fast" else " (fp32).")
            + f" Option permutation: {tuned.get('permute', 'none')}.")


def _prompt(res: dict, items: list | None, tokenizer) -> str:
    style = res.get("tuned", {}).get("prompt_style") or res.get("config", {}).get("prompt_style", "?")
    text = f"Prompt style {style!r} (medtune.prompts), identical for training and evaluation."
    if not items:
        return text + " An example prompt could not be rendered (the eval items were not readable again)."
    from medtune.errors import MedtuneError
    from medtune.prompts import build_prompt

    try:
        example = build_prompt(items[0], style, tokenizer)
    except (MedtuneError, TypeError, AttributeError, ValueError):
        return text + " (the chat style renders with the model's chat template; load its tokenizer to show it)."
    return text + f" The first eval item ({items[0].id}) as the model saw it:\n{example}"


def _items(run_dir: Path) -> list | None:
    from medtune.config import load_config
    from medtune.data.prepare import prepare_data
    from medtune.errors import MedtuneError

    if not (run_dir / "config.yaml").is_file():
        return None
    try:
        return prepare_data(load_config(run_dir / "config.yaml"), log=lambda *_: None)[1]
    except (MedtuneError, OSError):
        return None


def _independence(res: dict) -> str:
    found = res.get("tuned", {}).get("contamination")
    data = res.get("data", {})
    ev = data.get("eval", {})
    text = f"Eval items: {ev.get('source')} ({ev.get('split')}), n = {ev.get('n')}. "
    if found:
        text += (f"Contamination check against the {found.get('n_train')} training items: {len(found.get('exact', []))}"
                 f" exact and {len(found.get('near', []))} near duplicates ({found.get('ngram')}-gram overlap) among "
                 f"{found.get('n_eval')} eval items.")
    else:
        text += "No contamination check was recorded (the adapter lists no training items)."
    return text + f" Whether the base model's pretraining data held these questions: {AUTHOR}."


def _statistics(res: dict) -> str:
    text = ("Accuracy with Wilson 95% intervals; base vs tuned on the same items with McNemar's exact test and the "
            "paired difference's 95% interval; letter baselines and calibration (ECE)")
    if "subgroups" in res:
        text += "; per-subject accuracy with Wilson intervals, McNemar per subject with Benjamini-Hochberg-adjusted p " \
                "and the minimum detectable effect (80% power, alpha 0.05)"
    if isinstance(res.get("audit"), dict) and "n" in res["audit"]:
        text += "; a shortcut audit (options only, none of the other answers, option rotations)"
    if isinstance(res.get("conformal"), dict) and "lac" in res["conformal"]:
        text += f"; split-conformal prediction sets at alpha {res['conformal']['alpha']}"
    return text + "."


def _results(base: dict, tuned: dict, res: dict) -> str:
    if not base or not tuned:
        return f"no before/after results in results.json ({AUTHOR})"
    b, t = base["metrics"], tuned["metrics"]
    raw = res.get("comparison", {}).get("raw", {})
    text = (f"n = {t['n']} eval items; base accuracy {b['accuracy']:.3f} [{b['ci95'][0]:.3f}, {b['ci95'][1]:.3f}], "
            f"tuned {t['accuracy']:.3f} [{t['ci95'][0]:.3f}, {t['ci95'][1]:.3f}] (Wilson 95% CI)")
    if raw:
        text += (f"; difference {raw['diff'] * 100:+.1f} points [{raw['diff_ci'][0] * 100:+.1f}, "
                 f"{raw['diff_ci'][1] * 100:+.1f}], McNemar exact p = {raw['mcnemar_p']:.3g}")
    return text + "."
