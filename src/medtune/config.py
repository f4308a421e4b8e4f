"""The only config schema: dataclasses. YAML fills values, `--set a.b=v` overrides, unknown keys are errors."""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from medtune.errors import MedtuneError


@dataclass
class DataConfig:
    source: str = "demo"  # preset (demo, medqa, medmcqa, ...) or a local file
    eval_source: str | None = None  # evaluate on another source instead of the held-out part of `source`
    train_size: int | None = None  # items to train on, split from `source` (None: the source's own split)
    eval_size: int | None = None  # cap on held-out items (None: all the rest)
    limit: int | None = None  # evaluate the first N eval items only
    seed: int = 42  # split and shuffling seed
    cop_base: int | None = None  # MedMCQA `cop` base (0 or 1) when the file alone can't tell
    shuffle_options: bool = True  # shuffle option order per example and epoch in training (no letter prior)
    select: str = "random"  # how train_size items are chosen from the training pool: random (seeded) or first
    holdout: float | None = None  # evaluate on this seeded share of the selected training items instead (seed recipe)
    # Validation during training (train.eval_every): hold this seeded share (0 < v < 1) or count (v >= 1) of the
    # training pool out of training. Never eval items: items duplicating an eval item are never chosen.
    validation: float | None = None


@dataclass
class LoraConfig:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.0  # 0: dropout's random masks cost ~20% of a CPU training step (profiled); set it if needed
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"])
    quantize: str = "none"  # none, 8bit or 4bit: load the frozen base weights quantized (QLoRA; needs bitsandbytes)


@dataclass
class TrainConfig:
    epochs: float = 3.0
    max_steps: int | None = None  # stop after at most this many optimizer steps (a cap on the epochs' steps)
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 2e-4
    scheduler: str = "cosine"  # any transformers scheduler name: cosine, linear, constant_with_warmup, ...
    warmup: float = 0.05  # share of total steps
    weight_decay: float = 0.0
    max_length: int = 512  # tokens per example; longer examples are truncated from the explanation end
    target: str = "answer+explanation"  # or "answer": what the model learns to produce after the prompt
    loss_on: str = "completion"  # completion (target tokens only) or all (prompt too, as the seed project did)
    add_eos: bool = True  # end every target with EOS so the model learns to stop (the seed project did not)
    group_by_length: bool = True  # batch similar lengths together (less padding, same examples per epoch)
    gradient_checkpointing: bool = False
    dtype: str = "auto"  # auto (device policy), bfloat16, float16, float32: autocast over fp32 weights
    attn_implementation: str = "auto"  # auto (policy; eager for CPU training), sdpa, eager, flash_attention_2
    seed: int = 42
    save_every: int = 0  # checkpoint every N optimizer steps (0: only at the end)
    log_every: int = 1
    report_to: list[str] = field(default_factory=list)  # tensorboard, wandb, ... through accelerate trackers
    eval_every: int = 0  # letter accuracy on data.validation every N optimizer steps and at the end (0: off)
    keep: str = "last"  # the adapter saved: last, or best (highest validation accuracy; ties: the earlier step)
    eval_method: str = "letter"  # validation's scoring: letter (" A", one forward) or answer (" A. <option text>")
    patience: int | None = None  # stop after this many validations without improvement (None/0: never)


@dataclass
class EvalConfig:
    method: str = "letter"  # letter (" A", one forward pass), answer (" A. <option text>"), or generate
    mode: str = "fast"  # fast (bf16 where it helps + exact fp32 re-score of close calls) or exact (fp32)
    permute: str = "none"  # none or cyclic (score each rotation of the options; debiased prediction)
    batch_size: int = 16
    margin: float | None = None  # fast mode: re-score in fp32 below this top-two margin (None: 0.5 letter, 1.0 answer)
    max_new_tokens: int = 256  # generate method: length cap (reported when hit)
    extra_methods: list[str] = field(default_factory=list)  # `run` also compares base and tuned with these methods
    merge_adapter: bool = True  # score with the LoRA weights merged in (same function, base-model speed)
    audit: bool = False  # `run` also audits the tuned model for shortcuts (options-only, none-of-the-others, rotations)
    conformal_alpha: float = 0.1  # `run`'s conformal sets: coverage >= 1 - alpha, calibrated on data.validation items


@dataclass
class Config:
    model: str = "embedded"  # embedded, a hub id, or a local model directory
    prompt_style: str = "harness"  # harness or chat (see prompts.py)
    out_dir: str = "runs/latest"
    device: str = "auto"
    data: DataConfig = field(default_factory=DataConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


MAX_RECIPE_BYTES = 1 << 20


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults, then the YAML file, then `key.sub=value` overrides (values parsed as YAML scalars)."""
    raw: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            from medtune.errors import not_a_file

            raise MedtuneError(f"{path}: config {not_a_file(path)}")
        if path.stat().st_size > MAX_RECIPE_BYTES:  # YAML parses at ~2 MB/s: a 30 MB "recipe" is not one
            raise MedtuneError(f"{path}: {path.stat().st_size:,} bytes; a recipe is a few KB of settings (at most "
                               f"{MAX_RECIPE_BYTES:,} bytes)")
        try:
            raw = load_yaml(path.read_text(encoding="utf-8-sig"), str(path)) or {}  # a BOM is fine
        except UnicodeDecodeError as e:
            raise MedtuneError(f"{path}: not a text file (invalid UTF-8 at byte {e.start}); a recipe is YAML") from None
        if not isinstance(raw, dict):
            raise MedtuneError(f"{path}: top level must be a mapping of config keys")
    for item in overrides or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise MedtuneError(f"--set {item!r}: expected key=value, e.g. --set lora.r=16")
        node = raw
        *parents, leaf = key.strip().split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise MedtuneError(f"--set {item!r}: {p} is not a section")
        node[leaf] = load_yaml(value, f"--set {item!r}") if value.strip() else None
    cfg = _build(Config, raw, where=str(path) if path else "config")
    validate(cfg, where=str(path) if path else "config")
    return cfg


MAX_YAML_NODES = 10_000  # values a recipe may expand to: a real one has ~100; an alias bomb has billions


class _Refused(yaml.YAMLError):
    def __init__(self, mark, message: str):
        super().__init__(message)
        self.problem_mark, self.problem = mark, message


class _RecipeLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses what a recipe never needs: aliases expanding beyond MAX_YAML_NODES values (or into
    themselves), and a key given twice in one mapping (PyYAML silently keeps the last)."""

    def get_single_node(self):
        node = super().get_single_node()
        if node is not None:
            _expanded_size(node, {}, set())  # before anything is constructed: cost bounded by the file's own nodes
        return node

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            first: dict = {}
            for key_node, _ in node.value:
                if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node)
                if key in first:
                    raise _Refused(key_node.start_mark, f"duplicate key {key!r} (first at line {first[key]}); "
                                                        "keep one")
                first[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


def load_yaml(text: str, where: str):
    """YAML through _RecipeLoader; every failure is one MedtuneError line naming `where` (and the line)."""
    try:
        return yaml.load(text, Loader=_RecipeLoader)  # a SafeLoader: builds plain values only
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f"{where}:{mark.line + 1}" if mark and not where.startswith("--set") else where
        problem = (str(getattr(e, "problem", None) or e).strip().splitlines() or ["?"])[0]  # one line
        raise MedtuneError(f"{at}: {problem}" if isinstance(e, _Refused) else f"{at}: not valid YAML: {problem}") \
            from None
    except RecursionError:
        raise MedtuneError(f"{where}: nested too deeply to be a recipe") from None


def _expanded_size(node, sizes: dict, active: set) -> int:
    """Values `node` stands for once every alias is expanded; refuses a cycle or more than MAX_YAML_NODES."""
    if id(node) in sizes:
        return sizes[id(node)]
    if id(node) in active:
        raise _Refused(node.start_mark, "an alias refers to its own anchor (a recursive structure); a recipe is a "
                                        "tree of values")
    active.add(id(node))
    total = 1
    if isinstance(node, yaml.SequenceNode):
        children = node.value
    elif isinstance(node, yaml.MappingNode):
        children = [n for pair in node.value for n in pair]
    else:
        children = []
    for child in children:
        total += _expanded_size(child, sizes, active)
        if total > MAX_YAML_NODES:
            raise _Refused(node.start_mark, f"aliases expand this to over {MAX_YAML_NODES} values (an alias bomb?); "
                                            "write the values out")
    active.discard(id(node))
    sizes[id(node)] = total
    return total


# Every key with a fixed set of values, checked when the config loads (before any model is loaded). Kept here, not
# imported from the modules that use them, so that loading a config imports no torch; tests/test_config.py checks
# each list against its source (prompts.STYLES, transformers' SchedulerType, accelerate's LoggerType, ...).
SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
              "inverse_sqrt")  # transformers' SchedulerType names that need no extra arguments
CHOICES: dict[str, tuple[str, ...]] = {
    "prompt_style": ("harness", "chat", "seed"),
    "device": ("auto", "cpu", "cuda", "cuda:N", "xpu", "xpu:N", "mps"),  # hardware.DEVICES
    "data.select": ("random", "first"),
    "lora.quantize": ("none", "8bit", "4bit"),
    "train.scheduler": SCHEDULERS,
    "train.target": ("answer+explanation", "answer"),
    "train.loss_on": ("completion", "all"),
    "train.dtype": ("auto", "bfloat16", "float16", "float32"),
    "train.attn_implementation": ("auto", "sdpa", "eager", "flash_attention_2"),
    "train.keep": ("last", "best"),
    "train.eval_method": ("letter", "answer"),
    "train.report_to": ("all", "aim", "tensorboard", "wandb", "trackio", "comet_ml", "mlflow", "clearml", "dvclive",
                        "swanlab"),
    "eval.method": ("letter", "answer", "generate"),
    "eval.mode": ("fast", "exact"),
    "eval.permute": ("none", "cyclic"),
    "eval.extra_methods": ("letter", "answer", "generate"),
}
MAX_BATCH = 65_536  # items per step; more is a typo (1e20), not a batch any card holds
MAX_LORA_R = 4096  # wider than the hidden size of models medtune can train; 1e9 would allocate terabytes
# Numeric ranges: (test, what the error says). None (unset) is always allowed for optional keys.
RANGES: dict[str, tuple] = {
    "data.train_size": (lambda v: v >= 1, ">= 1"),
    "data.eval_size": (lambda v: v >= 1, ">= 1"),
    "data.limit": (lambda v: v >= 1, ">= 1"),
    "data.cop_base": (lambda v: v in (0, 1), "0 or 1"),
    "data.holdout": (lambda v: 0 < v < 1, "between 0 and 1 (exclusive)"),
    "data.seed": (lambda v: 0 <= v < 2**32, "in 0..4294967295 (NumPy's seed range)"),
    "data.validation": (lambda v: 0 < v < 1 or (v >= 1 and v == int(v)), "a share in (0, 1) or a whole count >= 1"),
    "lora.r": (lambda v: 1 <= v <= MAX_LORA_R, f"in 1..{MAX_LORA_R} (a rank above the model's width adds nothing)"),
    "lora.alpha": (lambda v: v > 0, "> 0"),
    "lora.dropout": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "train.epochs": (lambda v: v > 0, "> 0"),
    "train.max_steps": (lambda v: v >= 1, ">= 1"),
    "train.batch_size": (lambda v: 1 <= v <= MAX_BATCH, f"in 1..{MAX_BATCH}"),
    "train.grad_accum": (lambda v: 1 <= v <= MAX_BATCH, f"in 1..{MAX_BATCH}"),
    "train.lr": (lambda v: v > 0, "> 0"),
    "train.warmup": (lambda v: 0 <= v < 1, "in [0, 1) (a share of the total steps)"),
    "train.weight_decay": (lambda v: v >= 0, ">= 0"),
    "train.max_length": (lambda v: 16 <= v <= 1 << 20, "in 16..1048576"),
    "train.save_every": (lambda v: v >= 0, ">= 0 (0: only at the end)"),
    "train.log_every": (lambda v: v >= 1, ">= 1"),
    "train.seed": (lambda v: 0 <= v < 2**32, "in 0..4294967295 (NumPy's seed range)"),
    "train.eval_every": (lambda v: v >= 0, ">= 0 (0: no validation)"),
    "train.patience": (lambda v: v >= 0, ">= 0 (0: no early stopping)"),
    "eval.batch_size": (lambda v: 1 <= v <= MAX_BATCH, f"in 1..{MAX_BATCH}"),
    "eval.margin": (lambda v: v >= 0, ">= 0"),
    "eval.max_new_tokens": (lambda v: 1 <= v <= 1 << 16, "in 1..65536"),
    "eval.conformal_alpha": (lambda v: 0 < v < 1, "in (0, 1)"),
}


def validate(cfg: Config, where: str = "config") -> None:
    """Every enum-valued and numeric key against its valid values: one error naming the key and what is allowed."""
    for key, valid in CHOICES.items():
        value = _get(cfg, key)
        for v in value if isinstance(value, list) else [value]:
            if not _choice_ok(key, v, valid):
                raise MedtuneError(f"{where}: {key} {v!r} is not valid; choose one of: {', '.join(valid)}")
    for key, (ok, text) in RANGES.items():
        value = _get(cfg, key)
        if value is not None and not ok(value):
            raise MedtuneError(f"{where}: {key} {value!r} is out of range; must be {text}")
    _validate_validation(cfg, where)


def _validate_validation(cfg: Config, where: str) -> None:
    """Validation during training needs held-out items; keep=best and patience need validation."""
    t = cfg.train
    if t.eval_every and not cfg.data.validation:
        raise MedtuneError(f"{where}: train.eval_every={t.eval_every} needs items to validate on; set data.validation "
                           "(a share such as 0.1 or a count such as 30 of the training pool)")
    for key, on in (("train.keep=best", t.keep == "best"), (f"train.patience={t.patience}", bool(t.patience))):
        if on and not t.eval_every:
            raise MedtuneError(f"{where}: {key} needs validation during training; set train.eval_every (e.g. 10) "
                               "and data.validation (e.g. 0.1)")


def _get(cfg: Config, key: str):
    node = cfg
    for part in key.split("."):
        node = getattr(node, part)
    return node


def _choice_ok(key: str, value: str, valid: tuple[str, ...]) -> bool:
    if key == "device" and value.startswith(("cuda:", "xpu:")):
        return value[4:].lstrip(":").isdigit()
    return value in valid


def _build(cls, raw: dict, where: str):
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(k if isinstance(k, str) and k.isprintable() and k.strip() == k and k else repr(k)
                     for k in raw if k not in names)  # a key of "\n" or 1 is shown as its repr, on one line
    if unknown:
        raise MedtuneError(f"{where}: unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(names)}")
    values = {}
    for name, value in raw.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, dict):
                raise MedtuneError(f"{where}: {name} must be a mapping with keys {', '.join(_names(hint))}")
            values[name] = _build(hint, value, f"{where}: {name}")
        else:
            values[name] = _coerce(value, hint, f"{where}: {name}")
    return cls(**values)


def _names(cls) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def _coerce(value, hint, where: str):
    """Accept a value of the declared type (ints for floats, a scalar for a one-item list); reject the rest."""
    args = typing.get_args(hint)
    optional = typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in args
    if value is None:
        if optional:
            return None
        raise MedtuneError(f"{where}: must not be empty")
    base = next(a for a in args if a is not type(None)) if optional else hint
    origin = typing.get_origin(base)
    if origin is list:
        items = value if isinstance(value, list) else [value]
        return [str(v) for v in items]
    if base is float and not isinstance(value, bool) and isinstance(value, (int, float, str)):
        try:
            number = float(value)  # YAML 1.1 reads 1e-3 (no dot) as text
        except OverflowError:  # an int too large for a float
            number = math.inf
        except ValueError:
            number = None
        if number is not None and not math.isfinite(number):  # .inf, .nan, 1e999: pass range checks, end in NaN
            raise MedtuneError(f"{where}: must be a finite number, got {_short(value)}")
        if number is not None:
            return number
    if base is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if base is bool and isinstance(value, bool):
        return value
    if base is str and isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return str(value)
    raise MedtuneError(f"{where}: expected {getattr(base, '__name__', base)}, got {_short(value)}")


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else f"{text[:60]}... ({len(text)} characters)"


def save_config(cfg: Config, path: Path) -> None:
    from medtune import io

    io.write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
