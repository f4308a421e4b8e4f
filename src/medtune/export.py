"""Export a run's adapter as a shareable model directory: merged into the base weights (a plain transformers model) or
as the PEFT adapter itself, either way with a Hugging Face model card (README.md) and a provenance file (medtune.json).

The card says what was trained, on what (the data fingerprint), with which recipe and prompt style, how it scored
(from RUN/results.json when `medtune run` wrote one) and what the numbers do not mean. The export is written to a
temporary directory beside the target and renamed into place, so a crash never leaves half a model.

Privacy: an export carries the training item ids, counts and hashes (train-hashes.safetensors), never the training
texts (only `--include-training-data` ships RUN/train_items.jsonl), and no path of this machine: the base model is named
by its Hub id (or its directory's name), data sources by their file names. `check_no_local_paths` guards the result.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from datetime import datetime, timezone
from pathlib import Path

import yaml

from medtune import io
from medtune.errors import MedtuneError
from medtune.records import read_record

TAGS = ["medical", "multiple-choice", "lora", "medtune"]


def export(run_dir: Path, out: Path | None = None, merge: bool = True, log=print, overwrite: bool = False,
           include_training_data: bool = False, gguf: str | None = None, device: str = "cpu") -> Path:
    """Write RUN's adapter, merged into its base model (default, to RUN/merged) or as-is (to RUN/export), with a model
    card and medtune.json; return the export directory. No training text and no path of this machine goes in, unless
    `include_training_data` ships RUN/train_items.jsonl (an explicit opt-in). `gguf` (f16, q8_0) adds a verified GGUF
    and an Ollama Modelfile. The merge runs in fp32 on `device`."""
    run_dir = Path(run_dir)
    adapter = run_dir / "adapter"
    meta = _adapter_meta(adapter)
    out = Path(out) if out is not None else run_dir / ("merged" if merge else "export")
    _check_target(out, run_dir, adapter, overwrite)
    if gguf:  # refused before the merge: a wrong type or architecture costs a second, and nothing is written
        _check_gguf(gguf, merge, meta["base_model"])
    items_file = _training_items(run_dir, meta) if include_training_data else None
    # Locked for the export's life (a second export to the same --out is refused, and the check is made again under
    # the lock); a crash or Ctrl-C leaves no half-written export behind and the old one whole
    with io.out_dir_lock(out), io.atomic_dir(io.check_out_dir(out, overwrite)) as tmp:
        if merge:
            _save_merged(meta["base_model"], adapter, tmp, log, device)
        else:
            for f in adapter.iterdir():  # the adapter's own files; nothing else from the run dir
                if f.is_file() and f.name not in ("medtune.json", "README.md"):
                    shutil.copy2(f, tmp / f.name)
        public = public_meta(meta, run_dir, merge)
        if items_file is not None:
            shutil.copy2(items_file, tmp / "train_items.jsonl")
            public["export"]["train_items_file"] = "train_items.jsonl"
        _scrub_files(tmp, meta)
        # The training ids, counts and item hashes travel (not the texts), so evaluate.py's prompt-style and
        # contamination checks work on the export exactly as on the adapter.
        io.write_json(tmp / "medtune.json", public)
        results = run_dir / "results.json"
        card = model_card(meta, adapter, read_record(results, "run") if results.is_file() else None, merge)
        if gguf:
            from medtune import export_gguf

            public["gguf"] = export_gguf.export_gguf(tmp, gguf, meta["prompt_style"], log=log)
            io.write_json(tmp / "medtune.json", public)
            card += "\n" + export_gguf.card_section(public["gguf"])
        io.write_text(tmp / "README.md", card)
        check_no_local_paths(tmp, [run_dir, adapter, Path(meta["base_model"])])
    log(f"exported {'merged model' if merge else 'adapter'} with model card to {out}")
    return out


def _adapter_meta(adapter: Path) -> dict:
    if not (adapter / "adapter_config.json").is_file():
        raise MedtuneError(f"{adapter}: no trained adapter here (no adapter_config.json). Pass the run directory "
                           "that `medtune train` or `medtune run` wrote (it holds adapter/).")
    if not (adapter / "medtune.json").is_file():
        raise MedtuneError(f"{adapter}: no medtune.json, so the base model and prompt style are unknown; export "
                           "needs an adapter written by medtune")
    from medtune.models import read_meta

    meta = read_meta(adapter)
    missing = [k for k in ("base_model", "prompt_style") if not meta.get(k)]
    if missing:
        raise MedtuneError(f"{adapter / 'medtune.json'}: missing {', '.join(missing)}")
    return meta


def _check_gguf(gguf: str, merge: bool, base_model: str) -> None:
    from transformers import AutoConfig

    from medtune.export_gguf import check_architecture, check_type
    from medtune.models import resolve

    check_type(gguf)
    if not merge:
        raise MedtuneError("--gguf needs the merged model; drop --no-merge")
    check_architecture(AutoConfig.from_pretrained(resolve(base_model, log=lambda *_: None), trust_remote_code=False).to_dict())


def _check_target(out: Path, run_dir: Path, adapter: Path, overwrite: bool) -> None:
    """Never overwrite the run or the adapter; an existing non-empty --out only with --overwrite."""
    target = out.resolve()
    for keep in (run_dir.resolve(), adapter.resolve()):
        if target == keep or target in keep.parents:
            raise MedtuneError(f"--out {out}: would overwrite {keep}; choose a new directory")
    io.check_out_dir(out, overwrite)


def _training_items(run_dir: Path, meta: dict) -> Path:
    path = run_dir / "train_items.jsonl"
    if not path.is_file():
        raise MedtuneError(f"--include-training-data: {path} not found (the run dir keeps the training items there); "
                           "export without the flag to ship ids and hashes only")
    return path


def public_meta(meta: dict, run_dir: Path, merged: bool) -> dict:
    """medtune.json for an export: the adapter's record with training text dropped and every local path reduced to
    its last component; the base model named by its Hub id when it has one. A merged export records the adapter
    weights' sha256: attaching that adapter to it again is refused (models.check_not_merged)."""
    from medtune.models import adapter_sha256

    keep = {k: v for k, v in meta.items() if k not in ("train_items",)}
    public = _scrub(keep)
    public["base_model"] = public_base(meta["base_model"])
    public["export"] = {"run": run_dir.resolve().name, "merged": merged, "base_model": public["base_model"],
                        "prompt_style": meta["prompt_style"], "medtune_version": _version(),
                        "exported_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                        "train_items_file": None, "adapter_sha256": adapter_sha256(run_dir / "adapter")}
    return public



def public_base(base_model: str) -> str:
    """The base model as a recipient can name it: its Hub id, else the local directory's name."""
    return _hub_id(base_model) or Path(base_model).name


def _scrub(value):
    """Absolute paths (and ~ paths) reduced to their last component, recursively."""
    if isinstance(value, dict):
        return {k: _scrub(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_scrub(v) for v in value]
    if isinstance(value, str) and (value.startswith(("/", "~")) or (len(value) > 2 and value[1:3] in (":\\", ":/"))):
        return Path(value).name
    return value


def _scrub_files(tmp: Path, meta: dict) -> None:
    """The PEFT and medtune configs copied into the export name the base by Hub id and hold no local paths."""
    peft_cfg = tmp / "adapter_config.json"
    if peft_cfg.is_file():
        cfg = json.loads(peft_cfg.read_text())
        cfg["base_model_name_or_path"] = public_base(meta["base_model"])
        io.write_json(peft_cfg, _scrub(cfg), indent=2)
    recipe = tmp / "medtune-config.yaml"
    if recipe.is_file():
        cfg = yaml.safe_load(recipe.read_text()) or {}
        if cfg.get("model"):
            cfg["model"] = public_base(cfg["model"])
        io.write_text(recipe, yaml.safe_dump(_scrub(cfg), sort_keys=False))


def check_no_local_paths(directory: Path, extra: list[Path]) -> None:
    """A last guard: the files medtune writes into an export must not name this machine's directories."""
    import tempfile

    needles = {str(p) for p in (Path.home(), Path.cwd(), Path(tempfile.gettempdir())) if len(str(p)) > 1}
    needles |= {str(p.resolve()) for p in extra if p.is_absolute() or p.exists()}
    for name in ("medtune.json", "README.md", "adapter_config.json", "medtune-config.yaml", "config.json"):
        f = directory / name
        if f.is_file():
            text = f.read_text(encoding="utf-8", errors="replace")
            found = sorted(n for n in needles if n in text)
            if found:
                raise RuntimeError(f"export bug: {name} names a local path ({found[0]}); nothing was exported")


def _save_merged(base_model: str, adapter: Path, tmp: Path, log, device: str = "cpu") -> str:
    """Base (fp32) + adapter -> merge_and_unload -> save_pretrained, with the adapter's tokenizer (its chat template)."""
    from medtune.models import load_model

    # load_model = resolve + fp32 from_pretrained + attach_adapter; the tokenizer comes from the adapter dir.
    # Merging in fp32 keeps the merged weights equal to base + B·A·scale to float rounding.
    model, tokenizer, path = load_model(base_model, adapter=str(adapter), dtype="float32", device=device, log=log)
    log(f"merging {adapter} into {path}")
    merged = model.merge_and_unload()
    size = sum(p.numel() * p.element_size() for p in merged.state_dict().values())
    io.check_free_space(tmp, size, "the merged model")
    merged.save_pretrained(tmp)  # transformers 5 always writes safetensors (safe_serialization is gone)
    tokenizer.save_pretrained(tmp)  # left padding, pad token set: ready for batched generation
    if not any(tmp.glob("model*.safetensors")):
        raise MedtuneError(f"{tmp}: save_pretrained wrote no safetensors file")
    return path


def model_card(meta: dict, adapter: Path, results: dict | None, merged: bool) -> str:
    """README.md: YAML front matter, then Model, Training data, Recipe, Evaluation, Intended use, Limitations."""
    from medtune.report import DISCLAIMER

    sections = [_front_matter(meta["base_model"], merged), f"# {_title(meta, merged)}\n",
                f"> **{DISCLAIMER}**\n", _model_section(meta, adapter, merged), _data_section(meta),
                _recipe_section(meta, adapter), _eval_section(results), _usage_section(meta, adapter, merged),
                _INTENDED_USE, _LIMITATIONS, _checklist_section(adapter.parent, results),
                f"## Medical disclaimer\n\n{DISCLAIMER}\n"]
    return "\n".join(s for s in sections if s)


def _checklist_section(run_dir: Path, results: dict | None) -> str:
    """MI-CLEAR-LLM / TRIPOD-LLM items filled from the run (checklist.py), local paths reduced to their names."""
    if results is None or results.get("kind") != "run":
        return ""
    from medtune import checklist

    return checklist.markdown(checklist.fill(run_dir), public=True)


def _front_matter(base_model: str, merged: bool) -> str:
    hub_id = _hub_id(base_model)
    fields = {"library_name": "transformers" if merged else "peft", "tags": TAGS, "pipeline_tag": "text-generation"}
    if hub_id:
        fields = {"base_model": hub_id, **fields}
    text = yaml.safe_dump(fields, sort_keys=False)
    # No license line: the export inherits the base model's licence and the training data's terms (check both).
    note = "" if hub_id else f"# base_model: local directory {Path(base_model).name} (not a Hub id)\n"
    return f"---\n{note}{text}---\n"


def _hub_id(base_model: str) -> str | None:
    from medtune.models import EMBEDDED, EMBEDDED_HUB

    if base_model == EMBEDDED:
        return EMBEDDED_HUB
    return None if Path(base_model).exists() or base_model.count("/") != 1 else base_model


def _title(meta: dict, merged: bool) -> str:
    base = _hub_id(meta["base_model"]) or Path(meta["base_model"]).name
    return f"{base.split('/')[-1]} + medtune LoRA ({'merged' if merged else 'adapter'})"


def _model_section(meta: dict, adapter: Path, merged: bool) -> str:
    from medtune.models import EMBEDDED, EMBEDDED_GGUF

    cfg = _adapter_config(adapter)
    lora = cfg.get("lora", {})
    peft_cfg = json.loads((adapter / "adapter_config.json").read_text())
    targets = peft_cfg.get("target_modules")  # what PEFT resolved "all-linear" to
    targets = ", ".join(f"`{t}`" for t in sorted(targets)) if isinstance(targets, list) else f"`{targets}`"
    configured = ", ".join(lora.get("target_modules", [])) or "unknown"
    base = meta["base_model"]
    hub_id = _hub_id(base)
    if base == EMBEDDED:
        origin = f" (medtune's embedded model: `{EMBEDDED_GGUF}` dequantized to fp32, not the Hub's original weights)"
    else:
        origin = "" if hub_id else " (a local directory)"
    form = ("the adapter merged into the base weights (fp32), loadable with transformers alone" if merged
            else "the PEFT adapter; load it on top of the base model with peft")
    lines = ["## Model", "",
             f"- Base model: `{public_base(base)}`{origin}",
             (f"- Trained: a LoRA adapter, r = {lora.get('r', peft_cfg.get('r'))}, alpha = "
             f"{lora.get('alpha', peft_cfg.get('lora_alpha'))}, dropout = "
             f"{lora.get('dropout', peft_cfg.get('lora_dropout'))}, on {targets} (configured: {configured})"),
             f"- This directory: {form}",
             f"- Training objective: {_objective(meta, cfg)}",
             "- Licence: none stated here; the base model's licence and the training data's terms apply", ""]
    return "\n".join(lines)


def _objective(meta: dict, cfg: dict) -> str:
    train, data = cfg.get("train", {}), cfg.get("data", {})
    loss = "prompt and target tokens" if train.get("loss_on") == "all" else "the target tokens only"
    eos = ", then EOS" if train.get("add_eos", True) else ""
    order = ("option order shuffled per example and epoch" if data.get("shuffle_options", True)
             else "option order as given")
    return f"after the prompt, `{meta.get('target', 'answer+explanation')}`{eos}; loss on {loss}; {order}"


def _data_section(meta: dict) -> str:
    ids = meta.get("train_ids") or []
    data = _scrub(meta.get("data") or {})
    train = data.get("train") or {"source": "not recorded", "split": "train", "n": len(ids),
                                  "ids_sha256": hashlib.sha256("\n".join(ids).encode()).hexdigest()}
    lines = ["## Training data", "", f"- Training items: {len(ids)}",
             f"- Source: `{train.get('source')}` (split `{train.get('split')}`), n = {train.get('n')}",
             f"- sha256 of the item ids, in order: `{train.get('ids_sha256')}`"]
    if data.get("eval"):
        e = data["eval"]
        lines.append(f"- Held-out eval set: `{e.get('source')}`, n = {e.get('n')}, ids sha256 `{e.get('ids_sha256')}`")
    if data.get("overlap"):
        o = data["overlap"]
        lines.append(f"- Train/eval overlap found: {o.get('exact', 0)} exact, {o.get('near', 0)} near duplicates")
    s = meta.get("summary") or {}
    if s:
        lines.append(f"- Training: {s.get('steps')} optimizer steps, final loss {s.get('final_loss', float('nan')):.4f}, "
                     f"{s.get('wall_s')} s")
    lines.append("- The item ids are listed in `medtune.json` (`train_ids`); the texts are not shipped (unless "
                 "exported with `--include-training-data`). `train-hashes.safetensors` holds 64-bit hashes of each "
                 "normalized item and of its question's word 8-grams, so `medtune eval` can still check an eval set "
                 "for contamination.")
    return "\n".join(lines) + "\n"


def _recipe_section(meta: dict, adapter: Path) -> str:
    from medtune.data.items import MCQItem
    from medtune.prompts import build_prompt, build_target

    cfg = _adapter_config(adapter)
    style = meta["prompt_style"]
    example = MCQItem(id="example", question="{question}", options=("{option A}", "{option B}", "{option C}",
                                                                    "{option D}"), answer=1, explanation="{explanation}")
    try:
        prompt = build_prompt(example, style, _tokenizer_or_none(adapter) if style == "chat" else None)
    except MedtuneError as e:
        prompt = f"(could not render: {e})"
    target = build_target(example, style, meta.get("target", "answer+explanation"))
    cfg = _scrub({**cfg, "model": public_base(cfg["model"])} if cfg.get("model") else cfg)
    config_text = yaml.safe_dump(cfg, sort_keys=False).rstrip() if cfg else "(medtune-config.yaml not found)"
    return "\n".join([
        "## Recipe", "", "The resolved medtune config:", "", "```yaml", config_text, "```", "",
        (f"Prompt style: **`{style}`**. Use the same prompt style at inference: multiple-choice scores move with the "
        "prompt format, and the model learned this one. The prompt (generic benchmark; medqa, medmcqa, mmlu and "
        "pubmedqa items use their lm-evaluation-harness variants):"), "",
        "```text", prompt, "```", "",
        ("The completion it was trained to write (then EOS); scoring reads the log-probability of each option's "
        "letter right after the prompt:"), "", "```text", target, "```", ""])


def _eval_section(results: dict | None) -> str:
    if not results or "base" not in results or "tuned" not in results:
        return "## Evaluation\n\nNot evaluated: this run has no results.json from `medtune run`.\n"
    base, tuned = results["base"], results["tuned"]
    e = _scrub((results.get("data") or {}).get("eval") or {})
    rows = ["| model | n | accuracy [95% CI] | majority-letter baseline | debiased accuracy [95% CI] |",
            "|---|---|---|---|---|"]
    for label, r in (("base", base), ("tuned", tuned)):
        m = r["metrics"]
        lo, hi = m["ci95"]
        letters = m.get("letters", {})
        majority = f"{letters['majority_baseline']:.3f} ({letters['majority_letter']})" if letters else "-"
        p = m.get("permute")
        deb = f"{p['debiased_accuracy']:.3f} [{p['debiased_ci95'][0]:.3f}, {p['debiased_ci95'][1]:.3f}]" if p else "-"
        rows.append(f"| {label} | {m['n']} | {m['accuracy']:.3f} [{lo:.3f}, {hi:.3f}] | {majority} | {deb} |")
    lines = ["## Evaluation", "",
             (f"On `{e.get('source', 'the eval set')}` (n = {e.get('n', tuned['metrics']['n'])}, ids sha256 "
             f"`{e.get('ids_sha256', '-')}`), scored by `{tuned.get('method')}` in `{tuned.get('mode')}` mode with the "
             f"`{tuned.get('prompt_style')}` prompt, base and tuned on the same items:"), "", *rows, ""]
    for kind, c in (results.get("comparison") or {}).items():
        if isinstance(c, dict) and "mcnemar_p" in c:
            lo, hi = c["diff_ci"]
            lines.append(f"- {kind}: {c['diff'] * 100:+.1f} points (95% CI [{lo * 100:+.1f}, {hi * 100:+.1f}]), "
                         f"{len(c['won'])} items won, {len(c['lost'])} lost, McNemar exact p = {c['mcnemar_p']:.4g}")
    warning = (results.get("comparison") or {}).get("letter_bias_warning")
    if warning:
        lines.append(f"- Letter bias: {warning}")
    return "\n".join(lines) + "\n"


def _usage_section(meta: dict, adapter: Path, merged: bool) -> str:
    from medtune.models import EMBEDDED

    base = meta["base_model"]
    if merged:
        code = ('from transformers import AutoModelForCausalLM, AutoTokenizer\n\n'
                'model = AutoModelForCausalLM.from_pretrained("PATH")\ntokenizer = AutoTokenizer.from_pretrained("PATH")')
        cli = "medtune eval --model PATH"
    else:
        # The base the adapter was trained on, as PEFT recorded it (the resolved path or Hub id).
        trained_on = public_base(base)  # its Hub id, or the local directory's name: the recipient's copy of it
        code = ('from peft import PeftModel\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n\n'
                f'base = AutoModelForCausalLM.from_pretrained("{trained_on}")\n'
                'model = PeftModel.from_pretrained(base, "PATH")\ntokenizer = AutoTokenizer.from_pretrained("PATH")')
        cli = f"medtune eval --model {base if base == EMBEDDED else public_base(base)} --adapter PATH"
    note = ("\nThe base is medtune's embedded model (`medtune eval --model embedded` builds it); the Hub's "
            "original SmolLM2 weights differ from it by the GGUF quantization error.\n") if base == EMBEDDED else ""
    return "\n".join(["## How to use", "", "```python", code, "```", "",
                      f"With medtune (same prompt style and scoring): `{cli} --prompt-style {meta['prompt_style']}`",
                      note])


_INTENDED_USE = """## Intended use

Research and education on medical exam benchmarks: studying how fine-tuning changes multiple-choice accuracy, letter
preferences and calibration. Not for clinical decisions, patient care, or answering health questions for anyone.
"""

_LIMITATIONS = """## Limitations

- Small models learn the answer format and letter priors easily: an accuracy gain can come from a shift in which
  letter the model prefers rather than from medical knowledge. Compare with the majority-letter baseline and the
  debiased (option-rotation) accuracy above.
- Multiple-choice scores move with the prompt format and the scoring method; numbers are comparable only under the
  same prompt style and method.
- Exam accuracy is not clinical competence. The generated explanations can be fluent and wrong.
- The training data's biases, errors and coverage carry over to the model.
"""


def _adapter_config(adapter: Path) -> dict:
    path = adapter / "medtune-config.yaml"
    return (yaml.safe_load(path.read_text()) or {}) if path.is_file() else {}


def _tokenizer_or_none(adapter: Path):
    """The adapter's tokenizer (for the chat prompt style's template); None when it was not saved."""
    if not (adapter / "tokenizer_config.json").is_file():
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(adapter, trust_remote_code=False)


def _version() -> str | None:
    from importlib import metadata

    try:
        return metadata.version("medtune")
    except metadata.PackageNotFoundError:
        return None
