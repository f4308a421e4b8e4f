"""User-fixable problems. Library code raises MedtuneError; only cli.py prints it and exits 2."""

from __future__ import annotations

import errno
import json
import os
import re


class MedtuneError(Exception):
    """A problem the user can fix (bad input, bad config, missing package). The message says what to do next."""


class DataError(MedtuneError):
    """One or more bad rows; each problem is one `file:line: field: what is wrong` line."""

    def __init__(self, problems: list[str], limit: int = 50):
        self.problems = problems
        shown = problems[:limit]
        more = f"\n... and {len(problems) - limit} more problems" if len(problems) > limit else ""
        super().__init__("\n".join(shown) + more)


class TrainingInterrupted(MedtuneError):
    """SIGTERM/SIGINT during training: a checkpoint was written; the CLI exits with 128 + the signal number."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


# --- the one place that maps a library's exception to one line (cli.user_errors calls it last) -----------------------
# Library code converts what it can where it happens (with the file in hand). What escapes from inside transformers,
# PEFT, safetensors or jinja lands here: the file is found in the raising frames' locals when the exception does not
# carry it, so the line still names it.

WRITE_ERRORS = {errno.ENOSPC: ("disk full while writing", "free space at {} and rerun"),
                errno.EDQUOT: ("disk quota exceeded while writing", "free space at {} and rerun"),
                errno.EROFS: ("read-only file system while writing", "write somewhere else (--out)"),
                errno.EACCES: ("permission denied on", "check its permissions, or write somewhere else (--out)"),
                errno.EPERM: ("permission denied on", "check its permissions, or write somewhere else (--out)")}


def shown(name) -> str:
    """A key or name as an error message shows it: as is when printable, else its repr (a key "\n" stays one line)."""
    return name if isinstance(name, str) and name.isprintable() and name.strip() == name and name else repr(name)


def not_a_file(path) -> str:
    """Why `path` cannot be read as a file: missing, a directory, or something else (a FIFO would block a reader)."""
    if path.is_dir():
        return "is a directory; give a file"
    if path.exists():
        return "is not a regular file (a FIFO, socket or device); give a file"
    return "file not found"


def explain(exc: BaseException, path: str | None = None) -> MedtuneError | None:
    """A one-line MedtuneError for a known library error (naming the file and what to do), or None for a bug."""
    kind, module = type(exc).__name__, type(exc).__module__ or ""
    detail = _first_line(exc)
    if kind == "SafetensorError":
        where = path or _file_in_traceback(exc, (".safetensors",)) or "a .safetensors file"
        stamp = os.path.join(os.path.dirname(where), "medtune-source.json")  # medtune's converted embedded model
        todo = ("delete this checkpoint to resume from the one before" if re.search(r"checkpoints/step-\d+/", where)
                else f"delete medtune's cache directory {os.path.dirname(where)} and rerun, which converts the "
                     "embedded model again" if os.path.isfile(stamp) else "copy it again or re-export it")
        return MedtuneError(f"{where}{_link(where)}: not a readable safetensors file ({detail}); it is truncated or not "
                            f"model weights: {todo}")
    if module.startswith("jinja2"):
        where = path or "the tokenizer's chat template"
        return MedtuneError(f"{where}: chat template failed ({kind}: {detail}); fix the tokenizer's chat_template "
                            "or use --prompt-style harness")
    if kind == "NoMatchingPeftModuleError":
        return MedtuneError(f"lora.target_modules: {detail.split('. ')[0]}; use all-linear (every linear layer) or "
                            "module names of this model, e.g. q_proj, v_proj")
    unwrappable = re.match(r"Target module (\w+)", str(exc)) if kind == "ValueError" else None
    if unwrappable:  # a name matching a whole block (`5`: model.layers.5; `mlp`): PEFT's ValueError and its repr
        return MedtuneError(f"lora.target_modules: a name matches a {unwrappable[1]}, which LoRA cannot wrap (only "
                            "linear layers); use all-linear or names of linear layers, e.g. q_proj, v_proj")
    if isinstance(exc, json.JSONDecodeError):
        where = path or _file_in_traceback(exc, (".json", ".jsonl")) or "a JSON file"
        return MedtuneError(f"{where}:{exc.lineno}: not valid JSON: {exc.msg} at column {exc.colno}; it is corrupt "
                            "or truncated: restore or rewrite it")
    if isinstance(exc, RecursionError):
        where = path or _file_in_traceback(exc, (".json", ".jsonl", ".yaml", ".yml")) or "the input"
        return MedtuneError(f"{where}: nested too deeply to read; it is not a file medtune wrote or expects")
    if module.startswith("yaml"):
        where = path or _file_in_traceback(exc, (".yaml", ".yml")) or "a YAML file"
        mark = getattr(exc, "problem_mark", None)
        return MedtuneError(f"{where}{f':{mark.line + 1}' if mark else ''}: not valid YAML: "
                            f"{getattr(exc, 'problem', None) or detail}")
    if isinstance(exc, OSError) and exc.errno in WRITE_ERRORS:
        where = path or exc.filename or ("the standard output" if _writing_stdout(exc) else None) or \
            _file_in_traceback(exc) or "the output directory"
        where = re.sub(r"(^|/)\.([^/]+)\.tmp-\d+(?=/|$)", r"\1\2", str(where))  # io's temp names: the final one
        what, advice = WRITE_ERRORS[exc.errno]
        if where == "the standard output":
            return MedtuneError(f"{what} the standard output: redirect it to a file or device with room")
        return MedtuneError(f"{what} {where}: {advice.format(_existing_dir(where))}")
    if isinstance(exc, OSError) and exc.errno == errno.ENAMETOOLONG:
        where = str(path or exc.filename or _file_in_traceback(exc) or "a path")
        where = where if len(where) <= 120 else f"{where[:60]}...{where[-40:]} ({len(where):,} characters)"
        return MedtuneError(f"{where}: a name in this path is longer than the file system allows (255 bytes per "
                            "name, 4096 per path); use a shorter path")
    if isinstance(exc, UnicodeError):  # a lone surrogate in JSON text, invalid bytes on the command line
        return MedtuneError(f"the input holds text that is not valid Unicode{f' ({path})' if path else ''}: "
                            f"{getattr(exc, 'reason', exc)} at character {getattr(exc, 'start', '?')} of a field; "
                            "remove or replace that character")
    if isinstance(exc, MemoryError):
        where = path or _file_in_traceback(exc)
        return MedtuneError(f"out of memory{f' while reading {where}' if where else ''}: a file larger or deeper "
                            "than it should be, or lower the batch size / --limit")
    return None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0][:300] if text else type(exc).__name__)


def _writing_stdout(exc: BaseException) -> bool:
    """The error came from printing (click's echo, print): stdout is full or closed, not a file medtune writes."""
    tb = exc.__traceback__
    while tb is not None:
        code = tb.tb_frame.f_code
        if code.co_name in ("echo", "print") or code.co_filename.endswith(("click/utils.py", "rich/console.py")):
            return True
        tb = tb.tb_next
    return False


def _file_in_traceback(exc: BaseException, suffixes: tuple[str, ...] = ()) -> str | None:
    """The innermost path-like local (a str or Path with a '/') of the frames that raised, with one of `suffixes`."""
    from pathlib import PurePath

    frames, tb = [], exc.__traceback__
    while tb is not None:
        frames.append(tb.tb_frame)
        tb = tb.tb_next
    for frame in reversed(frames):
        for value in frame.f_locals.values():
            if isinstance(value, (str, PurePath)) and 0 < len(str(value)) < 4096 and os.sep in str(value) \
                    and "\n" not in str(value) and (not suffixes or str(value).endswith(suffixes)):
                return str(value)
    return None


def _link(where: str) -> str:
    return f" (a link to {os.path.realpath(where)})" if os.path.islink(where) else ""


def _existing_dir(where: str) -> str:
    d = os.path.abspath(where)
    while not os.path.isdir(d) and os.path.dirname(d) != d:
        d = os.path.dirname(d)
    return d
