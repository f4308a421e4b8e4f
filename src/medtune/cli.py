"""The `medtune` command: one verb per command. Heavy modules are imported inside each command, so `medtune --help`
and `medtune env` start instantly. Exit codes: 0 ok, 2 user error (printed as one `error: ...`), 1 bug, and 3 for a
parity certificate that fails (`compare --parity`)."""

from __future__ import annotations

import functools
import json
import os
import signal
import sys
from pathlib import Path
from typing import Annotated

import typer

from medtune.errors import DataError, MedtuneError, TrainingInterrupted
from medtune.io import check_out_dir, claim_out_dir

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Fine-tune (LoRA) and evaluate small language models on medical multiple-choice exams.")
data_app = typer.Typer(no_args_is_help=True, help="Validate, inspect and split MCQ data files.")
app.add_typer(data_app, name="data")

Config_ = Annotated[Path | None, typer.Option("--config", "-c", help="YAML recipe (see recipes/).")]
Set_ = Annotated[list[str] | None, typer.Option("--set", help="Override a config value: --set lora.r=16.")]
Model_ = Annotated[str | None, typer.Option(help="embedded, a Hub id, or a local model dir.")]
Data_ = Annotated[str | None, typer.Option(help="A file, `demo`, or a preset (medqa, medmcqa, ...).")]
Adapter_ = Annotated[str | None, typer.Option(help="A PEFT adapter dir (e.g. RUN/adapter).")]
Mode_ = Annotated[str | None, typer.Option(help="fast (bf16 + fp32 re-score of close calls) or exact.")]
Limit_ = Annotated[int | None, typer.Option(help="The first N items only.")]
PromptStyle_ = Annotated[str | None, typer.Option(help="harness, chat or seed (an adapter's or export's saved style "
                                                       "wins).")]
BatchSize_ = Annotated[int | None, typer.Option(help="Questions per forward pass.")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")]
Json = Annotated[bool, typer.Option("--json", help="Print the result as JSON.")]
CopBase = Annotated[int | None, typer.Option("--cop-base", help="MedMCQA `cop` base (0 Hub, 1 published).")]
Map = Annotated[str | None, typer.Option("--map", help="Column mapping: question=q,options=a|b|c|d,answer=label")]
Overwrite = Annotated[bool, typer.Option("--overwrite", help="Replace a non-empty output dir as a whole: the new run "
                                                            "is built beside it and swapped in when it succeeds.")]
Device = Annotated[str | None, typer.Option("--device", help="auto (the policy's choice: the GPU torch sees, else the "
                                                         "CPU), cpu, cuda, cuda:N, xpu, xpu:N or mps.")]


def main() -> None:
    """The `medtune` command (and `python -m medtune`): a usage error (an unknown flag, a value of the wrong type) is one
    line, exit 2, as every other error is, instead of click's usage box."""
    usage_error = typer.BadParameter.__mro__[1]  # click's UsageError (typer 0.29 vendors click; not exported)
    if {"-q", "--quiet"} & set(sys.argv[1:]):  # tqdm reads this once, when first imported (torch imports it early):
        os.environ["TQDM_DISABLE"] = "1"  # the bars of transformers' GGUF conversion too
    try:
        code = app(standalone_mode=False)
    except usage_error as e:
        if type(e).__name__ == "NoArgsIsHelpError":  # `medtune`, `medtune data`: the help, as before
            typer.echo(e.ctx.get_help())
            sys.exit(2)
        where = f" (see `{e.ctx.command_path} --help`)" if e.ctx is not None else ""
        typer.echo(f"error: {one_line(e.format_message())}{where}", err=True)
        code = 2
    except typer.Abort as e:  # a signal outside a command's own handling (click turns it into Abort)
        cause = e.__cause__ or e.__context__
        signum = cause.args[0] if isinstance(cause, KeyboardInterrupt) and cause.args and isinstance(
            cause.args[0], int) else signal.SIGINT
        typer.echo(f"error: {signal.Signals(signum).name}: stopped", err=True)
        code = 128 + signum
    sys.exit(code if isinstance(code, int) else 0)


def one_line(message: str, limit: int = 2000) -> str:
    """An error message as one line, whatever it quotes: newlines in a path shown as \\n, and a message that quotes
    a 30 MB value cut to its start and end."""
    text = str(message).replace("\r", "\\r").replace("\n", "\\n")
    return text if len(text) <= limit else f"{text[: limit - 200]}... ({len(text) - limit + 20:,} characters cut) ..." \
        f"{text[-180:]}"


NO_DEVICE = {"compare", "conformal", "data"}  # never touch a GPU; every other command, present or future, is prepared


@app.callback()
def _prepare(ctx: typer.Context) -> None:
    # Runs before any command's own code: ROCm reads HSA_OVERRIDE_GFX_VERSION once, when HIP starts, and
    # detect(), accelerate or a model load would start it. Reads only the kernel driver and torch's arch list.
    import logging
    import warnings

    if sys.stdout is None:  # started with stdout closed (`>&-`): what the command prints would be lost silently
        typer.echo("error: standard output is closed; medtune prints its results there", err=True)
        raise typer.Exit(2)
    warnings.filterwarnings("ignore", message="Initializing zero-element tensors is a no-op")  # torch, on odd configs

    # bitsandbytes' CPU backend logs a warning about an optional Hub kernel package whenever transformers imports it
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    # transformers' load reports and warnings (a 19-line table before a one-line error): medtune says what matters
    # itself; TRANSFORMERS_VERBOSITY=warning brings them back
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    # SIGTERM and SIGHUP end a command as Ctrl-C does: one line, exit 128 + the signal, an unfinished --out rolled back
    # (training installs its own handlers, which checkpoint first: checkpoint.Signals)
    import threading

    for sig in (signal.SIGTERM, signal.SIGHUP):
        if threading.current_thread() is threading.main_thread() and signal.getsignal(sig) is signal.SIG_DFL:
            signal.signal(sig, _interrupt)
    if ctx.invoked_subcommand not in NO_DEVICE:
        from medtune.hardware import prepare_env

        prepare_env()


def _interrupt(signum, frame):
    raise KeyboardInterrupt(signum)


def user_errors(fn):
    """Print a user-fixable problem as `error: ...` and exit 2, with no traceback."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except DataError as e:
            if len(e.problems) == 1:  # one line: file:line: field: what is wrong
                typer.echo(f"error: {one_line(e.problems[0])} (nothing was written)", err=True)
            else:
                problems = "\n".join(one_line(p) for p in e.problems[:50]) + (f"\n... and {len(e.problems) - 50} more "
                                                                               "problems" if len(e.problems) > 50 else "")
                typer.echo(f"error: {len(e.problems)} problem(s) in the data; nothing was written:\n{problems}", err=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt as e:  # Ctrl-C, or a second SIGTERM/SIGINT during training (checkpoint.Signals)
            signum = e.args[0] if e.args and isinstance(e.args[0], int) else signal.SIGINT
            typer.echo(f"error: {signal.Signals(signum).name}: stopped at once; files are written whole or not at "
                       "all, so nothing half-written is left (training: --resume continues from the last complete "
                       "checkpoint, if one was written)", err=True)
            raise typer.Exit(128 + signum) from None
        except TrainingInterrupted as e:  # checkpoint written; 128 + signal number, as a shell reports it
            typer.echo(f"error: {one_line(e)}", err=True)
            raise typer.Exit(e.exit_code) from None
        except MedtuneError as e:
            typer.echo(f"error: {one_line(e)}", err=True)
            raise typer.Exit(2) from None
        except Exception as e:  # last resort: a known library error (corrupt safetensors, full disk, ...) is one line
            from medtune.errors import explain

            mapped = explain(e)
            if mapped is None:  # a bug: the traceback is the report
                raise
            typer.echo(f"error: {one_line(mapped)}", err=True)
            raise typer.Exit(2) from None
    return wrapper


def _in_range(flag: str, value, low=None, high=None) -> None:
    """A numeric option checked before any work: finite, and within [low, high] where given; one line otherwise."""
    import math

    if value is None:
        return
    if not math.isfinite(value) or (low is not None and value < low) or (high is not None and value > high):
        span = f"in {low}..{high}" if low is not None and high is not None else f">= {low}" if low is not None \
            else f"<= {high}"
        raise MedtuneError(f"{flag} {value!r} is out of range; must be {span}")


TRACKER_PACKAGES = {"tensorboard": ("tensorboard", "tensorboardX"), "comet_ml": ("comet_ml",), "wandb": ("wandb",),
                    "aim": ("aim",), "mlflow": ("mlflow",), "clearml": ("clearml",), "dvclive": ("dvclive",),
                    "swanlab": ("swanlab",), "trackio": ("trackio",)}


def _check_trackers(cfg) -> None:
    """train.report_to names trackers that are installed (accelerate only warns and trains untracked otherwise)."""
    import importlib.util

    missing = [t for t in cfg.train.report_to if t in TRACKER_PACKAGES and not any(
        importlib.util.find_spec(m) for m in TRACKER_PACKAGES[t])]
    if missing:
        raise MedtuneError(f"train.report_to: {', '.join(missing)} is not installed; pip install "
                           f"{' '.join(TRACKER_PACKAGES[t][0] for t in missing)}, or drop it from train.report_to")


def _inputs(cfg, adapter: str | None = None, config: Path | None = None) -> tuple:
    """What a command reads: an --overwrite of --out must never delete them (io.claim_out_dir refuses), the recipe
    (`--config RUN/config.yaml --out RUN`) included."""
    return (cfg.model, adapter, cfg.data.source, cfg.data.eval_source, config)


def _log(quiet: bool = False):
    if quiet:  # transformers' weight-loading / shard-writing bars and huggingface_hub's download bars too
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
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
    from medtune.doctor import doctor

    info = hardware.detect()
    policy = hardware.decide(info)
    rep = hardware.report(info, policy, doctor(info, policy))
    typer.echo(json.dumps(rep, indent=1) if json_out else hardware.render(rep))


def _scoring_config(config, sets, model, prompt_style, device, adapter, values: dict):
    """eval's and audit's config and adapter (a run dir RUN or RUN/adapter, as ask takes it), with every check that
    needs no data or model made first: the prompt style, the device, the adapter."""
    from medtune.hardware import resolve_device
    from medtune.prompts import check_style

    cfg = _config(config, sets, model=model, prompt_style=prompt_style, device=device, **values)
    check_style(cfg.prompt_style)
    resolve_device(cfg.device)  # a device that is not there: one line, before any data or model is read
    if adapter:
        from medtune.models import adapter_dir, check_adapter

        adapter = adapter_dir(adapter)
        check_adapter(adapter)
    return cfg, adapter


@app.command("eval")
@user_errors
def eval_(
    model: Model_ = None, data: Data_ = None, adapter: Adapter_ = None, limit: Limit_ = None,
    out: Annotated[Path | None, typer.Option(help="Output dir (default runs/eval-<data>).")] = None,
    permute: Annotated[str | None, typer.Option(help="none or cyclic (debiased accuracy).")] = None,
    method: Annotated[str | None, typer.Option(help="letter (default), answer (whole answer line) or generate.")]
    = None,
    mode: Mode_ = None, prompt_style: PromptStyle_ = None, batch_size: BatchSize_ = None,
    cop_base: CopBase = None, mapping: Map = None, config: Config_ = None, sets: Set_ = None, quiet: Quiet = False,
    json_out: Json = False, overwrite: Overwrite = False, device: Device = None,
) -> None:
    """Score a model (optionally with an adapter) on MCQ items: accuracy with CI, letter baselines, calibration."""
    from medtune.data import sources
    from medtune.data.formats import parse_mapping

    cfg, adapter = _scoring_config(config, sets, model, prompt_style, device, adapter, {
        "data.source": data, "data.limit": limit, "eval.mode": mode, "eval.permute": permute,
        "eval.batch_size": batch_size, "eval.method": method})
    if cfg.data.source in sources.SUITES:
        from medtune.evaluate import run_suite

        out = out or Path("runs") / f"eval-{cfg.data.source}"
        with claim_out_dir(out, overwrite, inputs=(cfg.model, adapter, config)) as dest:  # dest: beside an old run, swapped in
            summary = run_suite(cfg, dest, adapter, quiet, _log(quiet))
        _print_results({"suite": summary}, json_out, out)
        return
    out = out or Path("runs") / f"eval-{Path(cfg.data.source).stem}"
    check_out_dir(out, overwrite)
    items = sources.load(cfg.data.source, "eval", cop_base=cop_base, mapping=parse_mapping(mapping) if mapping else None)
    items = items[: cfg.data.limit] if cfg.data.limit else items
    with claim_out_dir(out, overwrite, inputs=_inputs(cfg, adapter, config)) as dest:  # beside an old run, swapped in
        results = _eval_items(items, cfg, dest, adapter, quiet)
    _print_results({"eval": results}, json_out, out)


def _eval_items(items, cfg, out: Path, adapter: str | None, quiet: bool) -> dict:
    from medtune.data import sources
    from medtune.evaluate import run_eval

    split_name = "eval" if cfg.data.source in sources.PRESETS or cfg.data.source == sources.DEMO else "file"
    results, _ = run_eval(items, cfg, out, adapter=adapter, fingerprint=sources.fingerprint(
        items, cfg.data.source, split_name), quiet=quiet, log=_log(quiet), label=Path(cfg.data.source).stem)
    return results


@app.command()
@user_errors
def train(config: Config_ = None, sets: Set_ = None,
          out: Annotated[Path | None, typer.Option(help="Run dir (adapter, checkpoints, metrics).")] = None,
          resume: Annotated[bool, typer.Option(help="Continue from the last complete checkpoint in --out.")] = False,
          quiet: Quiet = False, overwrite: Overwrite = False, device: Device = None) -> None:
    """LoRA fine-tune on the training part of the data; writes RUN/adapter and RUN/metrics.jsonl."""
    from medtune.data.prepare import prepare_data, validation_split
    from medtune.hardware import resolve_device
    from medtune.train import train as train_fn

    cfg = _config(config, sets, out_dir=str(out) if out else None, device=device)
    resolve_device(cfg.device)
    _check_trackers(cfg)
    log = _log(quiet)
    if resume and overwrite:
        raise MedtuneError("--resume continues the run in --out, --overwrite replaces it: pass one of them")
    if resume and not (Path(cfg.out_dir) / "checkpoints").is_dir():
        raise MedtuneError(f"--resume: {cfg.out_dir} holds no earlier run (no checkpoints/); drop --resume to start one")
    check_out_dir(Path(cfg.out_dir), overwrite, allow_existing=resume)
    train_items, eval_items, data = prepare_data(cfg, log)
    train_items, val_items, data = validation_split(cfg, train_items, eval_items, data)  # data.validation
    with claim_out_dir(Path(cfg.out_dir), overwrite, allow_existing=resume, inputs=_inputs(cfg, config=config),
                       resumable=True) as dest:
        train_fn(cfg, train_items, dest, resume=resume, quiet=quiet, log=log, extra_meta={"data": data},
                 val_items=val_items, done=typer.echo)  # the result on stdout, as eval's (-q too)


@app.command()
@user_errors
def run(config: Config_ = None, sets: Set_ = None,
        model: Model_ = None,
        data: Annotated[str | None, typer.Option(help="demo, a preset (medmcqa, medqa) or a file.")] = None,
        train_size: Annotated[int | None, typer.Option(help="Training items.")] = None,
        out: Annotated[Path | None, typer.Option(help="Run dir.")] = None,
        quiet: Quiet = False, json_out: Json = False, overwrite: Overwrite = False, device: Device = None) -> None:
    """The main job: evaluate the base model, fine-tune, evaluate again on the same items, compare."""
    from medtune.hardware import resolve_device
    from medtune.run import run as run_fn

    cfg = _config(config, sets, model=model, out_dir=str(out) if out else None, device=device,
                  **{"data.source": data, "data.train_size": train_size})
    resolve_device(cfg.device)
    _check_trackers(cfg)
    try:
        with claim_out_dir(Path(cfg.out_dir), overwrite, inputs=_inputs(cfg, config=config)) as dest:  # beside an old run, swapped in
            results = run_fn(cfg, quiet=quiet, log=_log(quiet), out=dest)  # the config records the final --out
    except TrainingInterrupted as e:  # `run` has no --resume: rolled back like any failure, the old run kept whole
        raise TrainingInterrupted(f"{str(e).split(':')[0]}: `medtune run` stopped during training; a run does not "
                                  f"resume, so it was rolled back (an earlier run in {cfg.out_dir} is unchanged). "
                                  "Rerun it, or use `medtune train` for a resumable training", e.exit_code) from None
    _print_results(results, json_out, Path(cfg.out_dir))
    if not json_out:
        typer.echo(f"report: {Path(cfg.out_dir) / Path(results['report']).relative_to(dest)}")


@app.command()
@user_errors
def export(run_dir: Path, out: Annotated[Path | None, typer.Option(help="Default RUN/merged.")] = None,
           merge: Annotated[bool, typer.Option(help="Merge the adapter into the base weights.")] = True,
           include_training_data: Annotated[bool, typer.Option(
               help="Also ship the training items (RUN/train_items.jsonl); by default only ids and hashes.")] = False,
           gguf: Annotated[str | None, typer.Option(help="Also write model.<type>.gguf (f16 or q8_0) for llama.cpp "
                                                          "and Ollama, with a Modelfile, verified.")] = None,
           overwrite: Overwrite = False, device: Device = None) -> None:
    """Write a merged safetensors model (or the adapter) with a model card: base, data, recipe, results, limits."""
    from medtune.export import export as export_fn
    from medtune.hardware import resolve_device

    path = export_fn(run_dir, out, merge=merge, log=_log(), overwrite=overwrite,
                     include_training_data=include_training_data, gguf=gguf, device=resolve_device(device))
    typer.echo(f"exported: {path}")


PARITY_FAILED = 3  # `compare --parity`: the certificate's verdict is "fail" (2 stays "user error", 1 "bug")


@app.command()
@user_errors
def compare(a: Path, b: Path, json_out: Json = False,
            parity: Annotated[bool, typer.Option(help="A parity certificate instead: two evaluations of the same model "
                                                      "on the same items (two devices, bf16 vs fp32). Exit 0 on "
                                                      "pass, 3 on fail.")] = False,
            tolerance_logprob: Annotated[float | None, typer.Option(
                help="--parity: largest allowed per-item max |delta log-prob| in nats (default 0.6).")] = None,
            tolerance_flips: Annotated[float | None, typer.Option(
                help="--parity: largest allowed share of predictions that differ (default 0.01).")] = None) -> None:
    """Paired comparison of two results.json on the same items: McNemar's exact test, difference with CI, won/lost.
    With --parity: a per-item certificate that A and B gave the same answers; exit 3 when it fails."""
    from medtune.compare import compare_files

    if parity:
        _parity(a, b, json_out, tolerance_logprob, tolerance_flips)
        return
    if tolerance_logprob is not None or tolerance_flips is not None:
        raise MedtuneError("--tolerance-logprob and --tolerance-flips apply to --parity only")
    typer.echo(compare_files(a, b, as_json=json_out))


@app.command()
@user_errors
def conformal(calibration: Annotated[Path, typer.Argument(help="Eval output on a non-test split (e.g. MedQA dev).")],
              evaluation: Annotated[Path, typer.Argument(help="Eval output of the same model on the items to cover.")],
              alpha: Annotated[float, typer.Option(help="Miscoverage: sets hold the answer with probability >= "
                                                        "1 - alpha.")] = 0.1,
              method: Annotated[str, typer.Option(help="lac (smallest sets) or aps (adaptive).")] = "lac",
              json_out: Json = False) -> None:
    """Conformal prediction sets: calibrate on one evaluation, report coverage (with CI), mean set size and accuracy
    when answering only single-option sets on another. Assumes the two sets of items are exchangeable."""
    from medtune.compare import conformal_files
    from medtune.conformal import METHODS, render

    if not 0 < alpha < 1 or method not in METHODS:
        raise MedtuneError(f"--alpha must be in (0, 1) and --method one of {', '.join(METHODS)}")
    summary = conformal_files(calibration, evaluation, alpha, method)
    typer.echo(json.dumps(summary, indent=1) if json_out else render(summary))


def _parity(a: Path, b: Path, json_out: bool, tolerance_logprob: float | None, tolerance_flips: float | None) -> None:
    """Print the certificate; exit PARITY_FAILED on a "fail" verdict, so a script can gate on it."""
    from medtune.compare import parity_files, render_parity

    _in_range("--tolerance-logprob", tolerance_logprob, 0)
    _in_range("--tolerance-flips", tolerance_flips, 0, 1)
    tolerance = {k: v for k, v in (("max_abs_dlogprob", tolerance_logprob), ("flip_rate", tolerance_flips))
                 if v is not None}
    cert = parity_files(a, b, tolerance)
    typer.echo(json.dumps({"a": str(a), "b": str(b), **cert}, indent=1) if json_out else render_parity(cert, a, b))
    if cert["verdict"] != "pass":
        raise typer.Exit(PARITY_FAILED)


@app.command()
@user_errors
def audit(
    model: Model_ = None, data: Data_ = None, adapter: Adapter_ = None, limit: Limit_ = None,
    out: Annotated[Path | None, typer.Option(help="Output dir (default runs/audit-<data>).")] = None,
    method: Annotated[str | None, typer.Option(help="letter (default) or answer.")] = None,
    mode: Mode_ = None, prompt_style: PromptStyle_ = None, batch_size: BatchSize_ = None,
    cop_base: CopBase = None, mapping: Map = None, config: Config_ = None, sets: Set_ = None, quiet: Quiet = False,
    json_out: Json = False, overwrite: Overwrite = False, device: Device = None,
) -> None:
    """Shortcut audit: accuracy with the question stem removed (vs chance and the full prompt), with the right option
    replaced by "None of the other answers", and under every rotation of the options. Writes OUT/results.json and
    the per-item rows in OUT/predictions.jsonl."""
    from medtune.data import sources
    from medtune.data.formats import parse_mapping

    cfg, adapter = _scoring_config(config, sets, model, prompt_style, device, adapter, {
        "data.source": data, "data.limit": limit, "eval.mode": mode, "eval.batch_size": batch_size,
        "eval.method": method})
    if cfg.data.source in sources.SUITES:
        raise MedtuneError(f"{cfg.data.source} is a suite; audit one source at a time (e.g. --data medqa)")
    out = out or Path("runs") / f"audit-{Path(cfg.data.source).stem}"
    check_out_dir(out, overwrite)
    items = sources.load(cfg.data.source, "eval", cop_base=cop_base, mapping=parse_mapping(mapping) if mapping else None)
    items = items[: cfg.data.limit] if cfg.data.limit else items
    _audit_items(items, cfg, out, adapter, quiet, json_out, overwrite, config)


def _audit_items(items, cfg, out: Path, adapter: str | None, quiet: bool, json_out: bool, overwrite: bool,
                 config: Path | None = None) -> None:
    from medtune.audit import render
    from medtune.data import sources
    from medtune.evaluation_extras import audit_eval
    from medtune.report import DISCLAIMER

    split_name = "eval" if cfg.data.source in sources.PRESETS or cfg.data.source == sources.DEMO else "file"
    fingerprint = sources.fingerprint(items, cfg.data.source, split_name)
    with claim_out_dir(out, overwrite, inputs=_inputs(cfg, adapter, config)) as dest:  # beside an old run, swapped in
        results = audit_eval(items, cfg, dest, adapter, fingerprint, quiet, _log(quiet))
    if json_out:
        typer.echo(json.dumps(results, indent=1, default=str))
        return
    typer.echo(render(results["audit"]))
    typer.echo(f"results: {out / 'results.json'}\nper item: {out / 'predictions.jsonl'}\n{DISCLAIMER}")


@app.command()
@user_errors
def cost(runs: Annotated[list[Path], typer.Argument(help="Run dirs (or train/eval output dirs).")],
         price_per_hour: Annotated[float | None, typer.Option(help="Price of one device-hour.")] = None,
         prices: Annotated[Path | None, typer.Option(help="YAML: device name -> price per device-hour.")] = None,
         json_out: Json = False) -> None:
    """What each run cost: wall time x devices x price, per million training tokens, per accuracy point gained."""
    from medtune import cost as cost_mod

    _in_range("--price-per-hour", price_per_hour, 0, 1e6)
    if (price_per_hour is None) == (prices is None):
        raise MedtuneError("give exactly one of --price-per-hour and --prices")
    table = cost_mod.load_prices(prices) if prices else None
    rows = [(c, cost_mod.price(c, price_per_hour, table)) for c in map(cost_mod.collect, runs)]
    typer.echo(json.dumps([{**c, **p} for c, p in rows], indent=1) if json_out else cost_mod.render(rows))


@app.command()
@user_errors
def report(run_dir: Path, out: Annotated[Path | None, typer.Option(help="Default RUN/report.html.")] = None,
           price_per_hour: Annotated[float | None, typer.Option(help="Show the run's cost at this device-hour price.")]
           = None,
           explain: Annotated[bool, typer.Option(help="Generate the ten examples' explanations with the tuned model "
                                                      "(when the run has no generate evaluation).")] = False,
           quiet: Quiet = False) -> None:
    """A self-contained HTML report of a run: curves, before/after with CIs, calibration, examples, cost."""
    from medtune.html_report import write_report
    from medtune.io import check_file_target

    _in_range("--price-per-hour", price_per_hour, 0, 1e6)
    if out is not None:
        check_file_target(out)
        if out.suffix.lower() not in (".html", ".htm"):  # `--out RUN/results.json` replaced the run's results
            raise MedtuneError(f"--out {out}: the report is an HTML page; name a .html file")
    path = write_report(run_dir, out, price_per_hour=price_per_hour, explain=explain, log=_log(quiet))
    typer.echo(f"report: {path}")


@data_app.command("validate")
@user_errors
def data_validate(source: str, cop_base: CopBase = None, mapping: Map = None,
                  model: Annotated[str | None, typer.Option(help="Count tokens with this model's tokenizer to warn "
                                                                 "about overlong items (default: an estimate).")] = None,
                  max_length: Annotated[int, typer.Option(help="Token limit to warn above (train.max_length).")] = 512
                  ) -> None:
    """Read every row; report each bad one as file:line: field: problem (exit 2), or the count of valid items, with a
    warning for items longer than the token limit (they are cut from the left of the question; docs/reliability.md)."""
    from medtune.data.inspect import validate
    from medtune.prompts import overlong_warnings

    _in_range("--max-length", max_length, 16, 1 << 20)

    line, items = validate(source, cop_base, mapping)
    tokenizer = None
    if model:  # data stays below models: the tokenizer is loaded here and passed in
        from medtune.models import load_tokenizer, resolve

        tokenizer = load_tokenizer(resolve(model, log=lambda *_: None))
    typer.echo("\n".join([line, *overlong_warnings(items, max_length, tokenizer, model or "")]))


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
               seed: int = 42, cop_base: CopBase = None, overwrite: Overwrite = False) -> None:
    """Seeded, subject-stratified train/eval partition; reports exact duplicates between the parts."""
    from medtune.data.inspect import split_to_files
    from medtune.data.sources import trains_on_test

    _in_range("--seed", seed, 0, 2**32 - 1)
    why = trains_on_test(source)
    if why:  # its train.jsonl would carry test questions under a name the training guard no longer recognises
        raise MedtuneError(f"{why}; `data split` makes a training part and medtune never trains on test: split a "
                           "train or dev file")
    typer.echo(split_to_files(source, train_size, out, seed, cop_base, overwrite=overwrite))


ModelOpt = Annotated[str, typer.Option(help="embedded, a Hub id, a local model dir or a merged export (RUN/merged).")]
AdapterOpt = Annotated[str | None, typer.Option(help="A PEFT adapter dir, or a run dir holding adapter/.")]
MethodOpt = Annotated[str | None, typer.Option(help="letter or answer (default: the one its results.json used).")]
ModeOpt = Annotated[str, typer.Option(help="exact (fp32) or fast (bf16 + fp32 re-score of close calls).")]

@app.command()
@user_errors
def ask(question: Annotated[str | None, typer.Option(help="The question (or a JSON item on stdin).")] = None,
        option: Annotated[list[str] | None, typer.Option("--option", "-o", help="An option; repeat 2-10 times.")]
        = None,
        model: ModelOpt = "embedded", adapter: AdapterOpt = None, method: MethodOpt = None, mode: ModeOpt = "exact",
        prompt_style: PromptStyle_ = None,
        max_new_tokens: Annotated[int, typer.Option(help="Explanation length cap (tokens); 0: no explanation.")] = 96,
        json_out: Json = False, device: Device = None, quiet: Quiet = False) -> None:
    """Ask one question: the scored answer, every option's probability (eval's scoring) and a greedy explanation."""
    from medtune import ask as ask_mod

    if question is None and option:
        raise MedtuneError("--question is missing (options were given with --option/-o)")
    if question is None:
        if sys.stdin.isatty():
            raise MedtuneError("give --question and --option (2-10 times), or a JSON item on stdin")
        try:
            text = sys.stdin.buffer.read().decode("utf-8-sig")
        except UnicodeDecodeError as e:
            raise MedtuneError(f"stdin: not UTF-8 text (byte {e.start}); give the JSON item as UTF-8") from None
        item = ask_mod.item_from_json(text)
    else:
        item = ask_mod.make_item(question, option or [])
    _in_range("--max-new-tokens", max_new_tokens, 0, 1 << 16)
    loaded = ask_mod.load(model, adapter, method, mode, prompt_style, device=device, log=_log(json_out or quiet))
    result = ask_mod.answer(loaded, item, max_new_tokens, explain=max_new_tokens > 0)
    typer.echo(json.dumps(result, indent=1) if json_out else ask_mod.render(result))


@app.command()
@user_errors
def predict(source: Annotated[str, typer.Argument(help="A file, `demo`, `demo:train`, or a preset (medqa, ...).")],
            out: Annotated[Path, typer.Option(help="The .jsonl to write; a rerun resumes it.")]
            = Path("predictions.jsonl"),
            model: ModelOpt = "embedded", adapter: AdapterOpt = None, method: MethodOpt = None, mode: ModeOpt = "exact",
            prompt_style: PromptStyle_ = None,
            csv_out: Annotated[bool, typer.Option("--csv", help="Also write the same rows as OUT.csv.")] = False,
            chunk: Annotated[int, typer.Option(help="Items scored and appended at a time (bounds memory).")] = 64,
            limit: Limit_ = None,
            cop_base: CopBase = None, mapping: Map = None, quiet: Quiet = False, json_out: Json = False,
            device: Device = None) -> None:
    """Score every item of a source into predictions.jsonl (letter, probabilities), streamed and resumable."""
    from medtune import ask as ask_mod
    from medtune.data import sources
    from medtune.data.formats import parse_mapping
    from medtune.hardware import resolve_device
    from medtune.io import check_file_target
    from medtune.predict import predict as predict_fn

    _in_range("--limit", limit, 1)
    for path in (out, out.with_name(out.stem + ".meta.json"), *([out.with_suffix(".csv")] if csv_out else [])):
        check_file_target(path)  # never a device, FIFO or directory; before anything is read
    device = resolve_device(device)  # before the data is read or the model loads
    items = sources.load(source, "eval", cop_base=cop_base, mapping=parse_mapping(mapping) if mapping else None)
    items = items[:limit] if limit else items
    loaded = ask_mod.load(model, adapter, method, mode, prompt_style, device=device, log=_log(quiet))
    summary = predict_fn(loaded, items, out, source, chunk, csv_out, quiet, _log(quiet))
    typer.echo(json.dumps(summary, indent=1) if json_out else
               f"{summary['new']} new, {summary['skipped']} already written: {summary['out']}"
               + (f" and {summary['csv']}" if csv_out else ""))


@app.command()
@user_errors
def serve(model: ModelOpt = "embedded", adapter: AdapterOpt = None, method: MethodOpt = None, mode: ModeOpt = "exact",
          prompt_style: PromptStyle_ = None,
          host: Annotated[str, typer.Option(help="Interface to bind; the default is this machine only.")]
          = "127.0.0.1",
          port: int = 7860,
          share: Annotated[bool, typer.Option(help="Also open a public Gradio share link (prints a warning).")] = False,
          concurrency: Annotated[int, typer.Option(help="Questions answered at once.")] = 1,
          max_queue: Annotated[int, typer.Option(help="Waiting questions beyond this get 'busy'.")] = 16,
          max_new_tokens: Annotated[int, typer.Option(help="Explanation length cap (tokens).")] = 96,
          device: Device = None) -> None:
    """A local web page to ask the model questions (Gradio), with probabilities, explanation and disclaimer."""
    from medtune import ask as ask_mod
    from medtune.serve import check_listen
    from medtune.serve import serve as serve_fn

    _in_range("--max-new-tokens", max_new_tokens, 1, 1 << 16)
    _in_range("--port", port, 1, 65535)
    _in_range("--concurrency", concurrency, 1, 256)
    _in_range("--max-queue", max_queue, 1, 1 << 16)
    check_listen(host, port)
    loaded = ask_mod.load(model, adapter, method, mode, prompt_style, device=device, log=_log())
    serve_fn(loaded, host, port, share, concurrency, max_queue, max_new_tokens, log=_log())


def _print_results(results: dict, json_out: bool, out: Path) -> None:
    from medtune.report import DISCLAIMER, render_results

    if json_out:
        typer.echo(json.dumps(results, indent=1, default=str))
        return
    typer.echo(render_results(results))
    typer.echo(f"results: {out / 'results.json'}\n{DISCLAIMER}")


if __name__ == "__main__":  # python -m medtune.cli
    sys.exit(app())
