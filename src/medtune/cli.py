"""The `medtune` command: one verb per command. Heavy modules are imported inside each command, so `medtune --help`
and `medtune env` start instantly. Exit codes: 0 ok, 2 user error (printed as one `error: ...`), 1 bug."""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from medtune.errors import DataError, MedtuneError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Fine-tune (LoRA) and evaluate small language models on medical multiple-choice exams.")
data_app = typer.Typer(no_args_is_help=True, help="Validate, inspect and split MCQ data files.")
app.add_typer(data_app, name="data")

Config_ = Annotated[Path | None, typer.Option("--config", "-c", help="YAML recipe (see recipes/).")]
Set_ = Annotated[list[str] | None, typer.Option("--set", help="Override a config value: --set lora.r=16.")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")]
Json = Annotated[bool, typer.Option("--json", help="Print the result as JSON.")]
CopBase = Annotated[int | None, typer.Option("--cop-base", help="MedMCQA `cop` base (0 Hub, 1 published).")]
Map = Annotated[str | None, typer.Option("--map", help="Column mapping: question=q,options=a|b|c|d,answer=label")]


def user_errors(fn):
    """Print a user-fixable problem as `error: ...` and exit 2, with no traceback."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except DataError as e:
            typer.echo(f"error: {len(e.problems)} problem(s) in the data; nothing was written:\n{e}", err=True)
            raise typer.Exit(2) from None
        except MedtuneError as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(2) from None
    return wrapper


def _log(quiet: bool = False):
    return (lambda *a: None) if quiet else (lambda msg: typer.echo(msg, err=True))


def _config(config: Path | None, sets: list[str] | None, **flags):
    """Recipe, then --set, then the explicit flags of the command (None means not given)."""
    from medtune.config import load_config

    overrides = list(sets or []) + [f"{k}={v}" for k, v in flags.items() if v is not None]
    return load_config(config, overrides)


@app.command()
@user_errors
def env(json_out: Json = False) -> None:
    """Device, dtype and attention policy, library versions, and warnings with fixes for known setup traps."""
    from medtune import hardware

    info = hardware.detect()
    policy = hardware.decide(info)
    rep = hardware.report(info, policy, hardware.doctor(info, policy))
    typer.echo(json.dumps(rep, indent=1) if json_out else hardware.render(rep))


@app.command("eval")
@user_errors
def eval_(
    model: Annotated[str | None, typer.Option(help="embedded, a Hub id, or a local model dir.")] = None,
    data: Annotated[str | None, typer.Option(help="A file, `demo`, or a preset (medqa, medmcqa, ...).")] = None,
    adapter: Annotated[str | None, typer.Option(help="A PEFT adapter dir (e.g. RUN/adapter).")] = None,
    limit: Annotated[int | None, typer.Option(help="Evaluate the first N items.")] = None,
    out: Annotated[Path | None, typer.Option(help="Output dir (default runs/eval-<data>).")] = None,
    mode: Annotated[str | None, typer.Option(help="fast (bf16 + fp32 re-score of close calls) or exact.")] = None,
    permute: Annotated[str | None, typer.Option(help="none or cyclic (debiased accuracy).")] = None,
    method: Annotated[str | None, typer.Option(help="letter (default), answer (whole answer line) or generate.")]
    = None,
    prompt_style: Annotated[str | None, typer.Option(help="harness or chat.")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Questions per forward pass.")] = None,
    cop_base: CopBase = None, mapping: Map = None, config: Config_ = None, sets: Set_ = None, quiet: Quiet = False,
    json_out: Json = False,
) -> None:
    """Score a model (optionally with an adapter) on MCQ items: accuracy with CI, letter baselines, calibration."""
    from medtune.data import sources
    from medtune.data.formats import parse_mapping
    from medtune.evaluate import run_eval
    from medtune.prompts import check_style

    cfg = _config(config, sets, model=model, prompt_style=prompt_style, **{
        "data.source": data, "data.limit": limit, "eval.mode": mode, "eval.permute": permute,
        "eval.batch_size": batch_size, "eval.method": method})
    check_style(cfg.prompt_style)
    if cfg.data.source in sources.SUITES:
        from medtune.evaluate import run_suite

        out = out or Path("runs") / f"eval-{cfg.data.source}"
        _print_results({"suite": run_suite(cfg, out, adapter, quiet, _log(quiet))}, json_out, out)
        return
    items = sources.load(cfg.data.source, "eval", cop_base=cop_base, mapping=parse_mapping(mapping) if mapping else None)
    items = items[: cfg.data.limit] if cfg.data.limit else items
    out = out or Path("runs") / f"eval-{Path(cfg.data.source).stem}"
    split_name = "eval" if cfg.data.source in sources.PRESETS or cfg.data.source == sources.DEMO else "file"
    results, _ = run_eval(items, cfg, out, adapter=adapter, fingerprint=sources.fingerprint(
        items, cfg.data.source, split_name), quiet=quiet, log=_log(quiet), label=Path(cfg.data.source).stem)
    _print_results({"eval": results}, json_out, out)


@app.command()
@user_errors
def train(config: Config_ = None, sets: Set_ = None,
          out: Annotated[Path | None, typer.Option(help="Run dir (adapter, checkpoints, metrics).")] = None,
          resume: Annotated[bool, typer.Option(help="Continue from the last complete checkpoint in --out.")] = False,
          quiet: Quiet = False) -> None:
    """LoRA fine-tune on the training part of the data; writes RUN/adapter and RUN/metrics.jsonl."""
    from medtune.run import prepare_data
    from medtune.train import train as train_fn

    cfg = _config(config, sets, out_dir=str(out) if out else None)
    log = _log(quiet)
    train_items, _, data = prepare_data(cfg, log)
    train_fn(cfg, train_items, Path(cfg.out_dir), resume=resume, quiet=quiet, log=log, extra_meta={"data": data})


@app.command()
@user_errors
def run(config: Config_ = None, sets: Set_ = None,
        model: Annotated[str | None, typer.Option(help="embedded, a Hub id, or a local model dir.")] = None,
        data: Annotated[str | None, typer.Option(help="demo, a preset (medmcqa, medqa) or a file.")] = None,
        train_size: Annotated[int | None, typer.Option(help="Training items.")] = None,
        out: Annotated[Path | None, typer.Option(help="Run dir.")] = None,
        quiet: Quiet = False, json_out: Json = False) -> None:
    """The main job: evaluate the base model, fine-tune, evaluate again on the same items, compare."""
    from medtune.run import run as run_fn

    cfg = _config(config, sets, model=model, out_dir=str(out) if out else None,
                  **{"data.source": data, "data.train_size": train_size})
    results = run_fn(cfg, quiet=quiet, log=_log(quiet))
    _print_results(results, json_out, Path(cfg.out_dir))


@app.command()
@user_errors
def export(run_dir: Path, out: Annotated[Path | None, typer.Option(help="Default RUN/merged.")] = None,
           merge: Annotated[bool, typer.Option(help="Merge the adapter into the base weights.")] = True,
           gguf: Annotated[str | None, typer.Option(help="Also write model.<type>.gguf (f16 or q8_0) for llama.cpp "
                                                         "and Ollama, with a Modelfile, verified.")] = None) -> None:
    """Write a merged safetensors model (or the adapter) with a model card: base, data, recipe, results, limits."""
    from medtune.export import export as export_fn

    typer.echo(f"exported: {export_fn(run_dir, out, merge=merge, log=_log(), gguf=gguf)}")


@app.command()
@user_errors
def compare(a: Path, b: Path, json_out: Json = False) -> None:
    """Paired comparison of two results.json on the same items: McNemar's exact test, difference with CI, won/lost."""
    from medtune.compare import compare_files

    typer.echo(compare_files(a, b, as_json=json_out))


@data_app.command("validate")
@user_errors
def data_validate(source: str, cop_base: CopBase = None, mapping: Map = None) -> None:
    """Read every row; report each bad one as file:line: field: problem (exit 2), or the count of valid items."""
    from medtune.data.inspect import validate

    typer.echo(validate(source, cop_base, mapping))


@data_app.command("show")
@user_errors
def data_show(source: str, cop_base: CopBase = None, mapping: Map = None, json_out: Json = False) -> None:
    """Counts, option-count histogram, answer-letter distribution, subjects."""
    from medtune.data.inspect import show

    typer.echo(show(source, cop_base, mapping, as_json=json_out))


@data_app.command("split")
@user_errors
def data_split(source: str, train_size: Annotated[int, typer.Option(help="Items in the training part.")],
               out: Annotated[Path, typer.Option(help="Writes OUT/train.jsonl and OUT/eval.jsonl.")],
               seed: int = 42, cop_base: CopBase = None) -> None:
    """Seeded, subject-stratified train/eval partition; reports exact duplicates between the parts."""
    from medtune.data.inspect import split_to_files

    typer.echo(split_to_files(source, train_size, out, seed, cop_base))


def _print_results(results: dict, json_out: bool, out: Path) -> None:
    from medtune.report import DISCLAIMER, render_results

    if json_out:
        typer.echo(json.dumps(results, indent=1, default=str))
        return
    typer.echo(render_results(results))
    typer.echo(f"results: {out / 'results.json'}\n{DISCLAIMER}")


if __name__ == "__main__":  # python -m medtune.cli
    sys.exit(app())
