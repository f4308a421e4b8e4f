"""One device policy: what this machine has (detect), what medtune does with it (decide); doctor.py says what is wrong.

torch is imported only inside functions, so `medtune --help` and `medtune env` start instantly. The rules are the
plain tables below; `docs/hardware.md` explains each row.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from medtune.errors import MedtuneError

# CUDA: (lowest compute capability, training dtype, why). First row the GPU reaches wins.
CUDA_DTYPES: list[tuple[tuple[int, int], str, str]] = [
    ((8, 0), "bfloat16", "sm80+ (Ampere and newer) has bf16 tensor cores: fp32's range, no loss scaling"),
    ((7, 0), "float16", "sm70/sm75 (Volta/Turing) has fp16 tensor cores but no bf16: fp16 with loss scaling"),
    ((0, 0), "float32", "below sm70 there are no tensor cores and fp16 is slow or unsupported: fp32"),
]
CUDA_FLASH_ATTN_MIN = (8, 0)  # flash-attn 2 needs Ampere or newer

# ROCm: gfx arch -> (family, training dtype, flash-attn 2 supported). An arch in HSA_OVERRIDES below takes its
# sibling's row (same ISA); other gfx11xx/gfx12xx count as RDNA3+ (bf16); anything else unknown gets fp32.
ROCM_ARCHS: dict[str, tuple[str, str, bool]] = {
    "gfx906": ("Vega 20 (MI50/MI60, Radeon VII): no bf16 instructions", "float16", False),
    "gfx908": ("CDNA1 (MI100): bf16 matrix cores run at half the fp16 rate", "float16", False),
    "gfx90a": ("CDNA2 (MI210/MI250): full-rate bf16 matrix cores", "bfloat16", True),
    "gfx940": ("CDNA3 (MI300 engineering samples): bf16 matrix cores", "bfloat16", False),
    "gfx942": ("CDNA3 (MI300X/MI300A/MI325X): bf16 matrix cores", "bfloat16", True),
    "gfx950": ("CDNA4 (MI350X/MI355X): bf16 matrix cores", "bfloat16", True),
    "gfx1030": ("RDNA2 (RX 6000 series, W6800, 680M): no bf16 WMMA", "float16", False),
    "gfx1100": ("RDNA3 (RX 7000 series, W7900, 780M): bf16 WMMA", "bfloat16", False),
}

# HSA_OVERRIDE_GFX_VERSION makes the ROCm runtime load another arch's kernels. Only for same-ISA siblings: the
# RDNA2 chips run gfx1030 code, the smaller RDNA3 chips run gfx1100 code. Used only when the GPU's own arch is missing
# from torch's compiled list and the sibling is present; never for an arch torch was built for (e.g. gfx942).
HSA_OVERRIDES: dict[str, tuple[str, str]] = {
    "gfx1031": ("gfx1030", "10.3.0"),  # RX 6700 XT
    "gfx1032": ("gfx1030", "10.3.0"),  # RX 6600
    "gfx1034": ("gfx1030", "10.3.0"),  # RX 6500
    "gfx1035": ("gfx1030", "10.3.0"),  # Radeon 680M iGPU
    "gfx1036": ("gfx1030", "10.3.0"),  # Ryzen 7000 iGPU
    "gfx1101": ("gfx1100", "11.0.0"),  # RX 7700/7800
    "gfx1102": ("gfx1100", "11.0.0"),  # RX 7600
    "gfx1103": ("gfx1100", "11.0.0"),  # Radeon 780M iGPU
}

HSA = "HSA_OVERRIDE_GFX_VERSION"
VISIBLE_ENV = ["CUDA_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES", "ZE_AFFINITY_MASK"]
USER_ENV = [*VISIBLE_ENV, HSA, "PYTORCH_ENABLE_MPS_FALLBACK"]
CUDA_INDEX = "https://download.pytorch.org/whl/cu128"
ROCM_INDEX = "https://download.pytorch.org/whl/rocm6.4"
PACKAGES = ["medtune", "torch", "transformers", "peft", "accelerate", "datasets", "bitsandbytes", "flash_attn"]
DTYPES = ("bfloat16", "float16", "float32")
ATTENTION = ("flash_attention_2", "sdpa", "eager")
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
GIB = 1024**3
SET_BY_MEDTUNE: dict[str, str] = {}  # env vars prepare_env set in this process, so detect() doesn't call them "user"


@dataclass
class Host:
    """Facts about the machine that don't come from torch; tests build one by hand."""

    user_env: dict[str, str] = field(default_factory=dict)
    gpu_hints: list[str] = field(default_factory=list)  # signs of a GPU: "/dev/kfd", "/proc/driver/nvidia", ...
    kfd_archs: list[str] = field(default_factory=list)  # real AMD GPU archs from the kernel driver (no HIP init)
    cpu_count: int = 1
    ram_bytes: int | None = None

    @classmethod
    def read(cls) -> Host:
        env = {k: os.environ[k] for k in USER_ENV if k in os.environ and SET_BY_MEDTUNE.get(k) != os.environ[k]}
        hints = [p for p in ("/dev/kfd", "/proc/driver/nvidia") if Path(p).exists()]
        hints += ["nvidia-smi"] if shutil.which("nvidia-smi") else []
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        return cls(env, hints, read_kfd_archs(), cpus, _ram_bytes())


@dataclass
class DeviceInfo:
    kind: str  # "cuda" | "rocm" | "mps" | "xpu" | "cpu"
    names: list[str]
    memory: list[int]  # total bytes per device
    count: int  # accelerator devices torch sees (0 on CPU)
    capability: tuple[int, int] | None  # CUDA: the lowest compute capability among the GPUs
    gfx_arch: str | None  # AMD: real arch, e.g. "gfx942" (kernel driver first: HIP reports the overridden one)
    arch_list: list[str]  # torch.cuda.get_arch_list(), feature suffixes stripped
    bf16: bool  # native bf16 per the tables above (CUDA/ROCm) or a probe (MPS/XPU); False on CPU
    sdpa: bool  # torch has scaled_dot_product_attention
    torch_version: str
    cuda_version: str | None
    hip_version: str | None
    cpu_count: int
    ram_bytes: int | None
    user_env: dict[str, str]  # visible-device and override variables exactly as the user set them
    gpu_hints: list[str]  # signs of a GPU outside torch, to catch a torch build that can't use it
    flash_attn: str | None = None  # version, when it imports
    bitsandbytes: str | None = None  # version, when installed
    bnb_backend: str | None = None  # "CUDA" / "ROCm" / "CPU" when bitsandbytes ran its NF4 test on this device
    bnb_error: str | None = None  # why that test failed


@dataclass
class Policy:
    train_dtype: str
    eval_dtype: str
    loss_scaling: bool
    attn_implementation: str
    qlora_available: bool
    env: dict[str, str]  # variables medtune sets (never visible-device ones)
    reasons: dict[str, str]  # one line per decision


def detect(torch: Any = None, host: Host | None = None) -> DeviceInfo:
    """Describe this machine. Initializes CUDA/HIP: on ROCm call prepare_env() before this (the CLI does)."""
    if torch is None:
        import torch
    host = host if host is not None else Host.read()
    cuda_v, hip_v = getattr(torch.version, "cuda", None), getattr(torch.version, "hip", None)
    kind, names, memory, capability, gcn, bf16 = "cpu", [], [], None, None, False
    if torch.cuda.is_available():  # True on ROCm too: torch exposes HIP through the CUDA API
        kind = "rocm" if hip_v else "cuda"
        props = [torch.cuda.get_device_properties(i) for i in range(torch.cuda.device_count())]
        names, memory = [p.name for p in props], [int(p.total_memory) for p in props]
        if kind == "cuda":
            capability = min((p.major, p.minor) for p in props)
        else:
            gcn = _strip(props[0].gcnArchName)
    elif hasattr(torch.backends, "mps") and torch.backends.mps.is_available():
        kind, names, bf16 = "mps", ["Apple GPU (MPS)"], _mps_bf16(torch)
        mps_max = getattr(getattr(torch, "mps", None), "recommended_max_memory", None)
        memory = [int(mps_max())] if mps_max else ([host.ram_bytes] if host.ram_bytes else [])
    elif hasattr(torch, "xpu") and torch.xpu.is_available():
        kind = "xpu"
        props = [torch.xpu.get_device_properties(i) for i in range(torch.xpu.device_count())]
        names, memory = [p.name for p in props], [int(p.total_memory) for p in props]
        bf16 = bool(torch.xpu.is_bf16_supported()) if hasattr(torch.xpu, "is_bf16_supported") else True
    kfd = sorted(set(host.kfd_archs))
    gfx = kfd[0] if len(kfd) == 1 else gcn  # several AMD archs (iGPU + dGPU): trust HIP's device 0
    arch_list = [_strip(a) for a in torch.cuda.get_arch_list()] if (cuda_v or hip_v) else []
    if kind in ("cuda", "rocm"):
        bf16 = gpu_dtype(kind, capability, gfx)[0] == "bfloat16"
    elif kind == "cpu":
        bf16 = _cpu_bf16(torch)
    extras = probe_extras(kind)
    return DeviceInfo(
        kind=kind, names=names, memory=memory, count=len(names) if kind != "cpu" else 0, capability=capability,
        gfx_arch=gfx, arch_list=arch_list, bf16=bf16,
        sdpa=hasattr(getattr(torch.nn, "functional", None), "scaled_dot_product_attention"),
        torch_version=str(torch.__version__), cuda_version=cuda_v, hip_version=hip_v, cpu_count=host.cpu_count,
        ram_bytes=host.ram_bytes, user_env=dict(host.user_env), gpu_hints=list(host.gpu_hints), **extras,
    )


def decide(info: DeviceInfo, overrides: dict | None = None) -> Policy:
    """The policy for this device. `overrides` (train_dtype, eval_dtype, attn_implementation; None = automatic) win."""
    overrides = _check_overrides(overrides or {})
    train, why = native_dtype(info)
    reasons = {"train_dtype": why}
    if info.bf16:
        evald, reasons["eval_dtype"] = "bfloat16", ("native bf16: evaluation holds the weights once, in bf16; exact "
                                                    "figures (exact mode, fast mode's close calls) are computed in "
                                                    "fp32 from them, layer by layer")
    else:
        evald, reasons["eval_dtype"] = "float32", f"{info.kind} without native bf16: fp32 weights and fp32 scores"
    if "train_dtype" in overrides:
        train, reasons["train_dtype"] = overrides["train_dtype"], f"set by user (automatic: {train})"
    if "eval_dtype" in overrides:
        evald, reasons["eval_dtype"] = overrides["eval_dtype"], f"set by user (automatic: {evald})"
    attn, reasons["attn_implementation"] = _attention(info, train, evald)
    if "attn_implementation" in overrides:
        attn, reasons["attn_implementation"] = overrides["attn_implementation"], f"set by user (automatic: {attn})"
    loss_scaling = train == "float16"
    reasons["loss_scaling"] = "fp16 training: gradients are scaled to stay above fp16's underflow" if loss_scaling \
        else f"{train} training has fp32's exponent range: no loss scaling"
    qlora, reasons["qlora_available"] = _qlora(info)
    env, reasons["env"] = _env(info)
    return Policy(train, evald, loss_scaling, attn, qlora, env, reasons)


def prepare_env(torch: Any = None, host: Host | None = None) -> dict[str, str]:
    """Set HSA_OVERRIDE_GFX_VERSION before HIP starts; call first thing in any command that uses the GPU.

    Reads only the kernel driver's arch list and torch's compiled arch list (neither starts HIP), applies the same
    rule as decide(), and returns what it set. A no-op off ROCm, with several AMD archs, or when the user set it.
    """
    if torch is None:
        import torch
    if not getattr(torch.version, "hip", None):
        return {}
    archs = sorted(set((host or Host.read()).kfd_archs))
    if len(archs) != 1:
        return {}
    value, _ = hsa_override(archs[0], [_strip(a) for a in torch.cuda.get_arch_list()])
    return _set_env({HSA: value} if value else {})


def device_string(info: DeviceInfo) -> str:
    """The torch device for this kind: ROCm is driven through torch's "cuda" device."""
    return {"rocm": "cuda"}.get(info.kind, info.kind)


DEVICES = ("auto", "cpu", "cuda", "cuda:N", "xpu", "xpu:N", "mps")


def resolve_device(requested: str | None = "auto", torch: Any = None) -> str:
    """The torch device a command runs on: `auto` picks the accelerator torch sees (CUDA/ROCm, then XPU, then MPS)
    or the CPU; an explicit `cuda`, `cuda:N`, `xpu[:N]`, `mps` or `cpu` is honoured when it exists and refused in
    one line when it does not. Called before any model loads."""
    if torch is None:
        import torch
    requested = (requested or "auto").strip().lower()
    kind, _, index = requested.partition(":")
    if kind == "auto" and not index:
        if torch.cuda.is_available():
            return "cuda"
        if hasattr(torch, "xpu") and torch.xpu.is_available():
            return "xpu"
        if hasattr(torch.backends, "mps") and torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    if kind not in ("cpu", "cuda", "xpu", "mps") or (index and (not index.isdigit() or kind in ("cpu", "mps"))):
        raise MedtuneError(f"--device {requested!r} is not a device; choose one of: {', '.join(DEVICES)}")
    if kind == "cpu":
        return "cpu"
    if kind == "mps":
        if not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
            raise MedtuneError("--device mps: this machine has no Apple GPU that torch can use; use --device cpu")
        return "mps"
    backend = torch.cuda if kind == "cuda" else getattr(torch, "xpu", None)
    count = backend.device_count() if backend is not None and backend.is_available() else 0
    if count == 0:
        build = ("a CPU-only build" if kind == "cuda" and not (torch.version.cuda or getattr(torch.version, "hip", None))
                 else "a build that sees no such GPU")
        name = "CUDA or ROCm GPU" if kind == "cuda" else "Intel GPU (XPU)"
        raise MedtuneError(f"--device {requested}: torch {torch.__version__} sees no {name} ({build}); run "
                           "`medtune env` for what this machine has, or use --device cpu")
    if index and int(index) >= count:
        raise MedtuneError(f"--device {requested}: torch sees {count} {kind} device(s), numbered 0-{count - 1}")
    return requested


def native_bf16(device: str, torch: Any = None) -> bool:
    """THE bf16 decision, for the policy, scoring, training and `ask`: does `device` run bf16 natively? The same
    tables as detect(): sm80+ and the bf16 ROCm archs; oneDNN's check on CPUs (AVX512-BF16/AMX); a probe on MPS/XPU.
    Emulated bf16 (sm70/75, where torch.cuda.is_bf16_supported() is True, or a CPU without AVX512-BF16) counts as
    none: it would be slower than fp32."""
    if torch is None:
        import torch
    kind, _, index = str(device).partition(":")
    if kind == "cpu":
        return _cpu_bf16(torch)
    if kind == "cuda":
        props = torch.cuda.get_device_properties(int(index or torch.cuda.current_device()))
        if getattr(torch.version, "hip", None):
            kfd = sorted(set(read_kfd_archs()))
            gfx = kfd[0] if len(kfd) == 1 else _strip(props.gcnArchName)
            return gpu_dtype("rocm", None, gfx)[0] == "bfloat16"
        return gpu_dtype("cuda", (props.major, props.minor), None)[0] == "bfloat16"
    if kind == "mps":
        return _mps_bf16(torch)
    if kind == "xpu":
        return bool(torch.xpu.is_bf16_supported()) if hasattr(torch.xpu, "is_bf16_supported") else True
    return False


def weights_dtype(device: str, torch: Any = None, mode: str = "fast") -> str:
    """How evaluation holds the weights on `device`: once, in bf16 where bf16 is native (fast mode, the default),
    else fp32. Exact mode computes everything in fp32, so it holds fp32 weights: computing fp32 layer by layer from
    bf16 holding costs time when every layer runs in fp32 (MedQA on this CPU, benchmarks/lmeval_parity.py: 0.907x
    lm-eval's wall time held in bf16, 0.716x with fp32 weights on 2026-12-01; docs/benchmarks.md)."""
    return "bfloat16" if mode != "exact" and native_bf16(device, torch) else "float32"


def report(info: DeviceInfo, policy: Policy, findings: list) -> dict:
    """JSON-able record of the machine, the policy with its reasons, versions, env and doctor.Findings."""
    versions = {"python": platform.python_version(), "platform": platform.platform()}
    for name in PACKAGES:  # metadata only: importing these would cost seconds
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return {
        "device": asdict(info) | {"torch_device": device_string(info)},
        "policy": asdict(policy),
        "versions": versions,
        "env": {"set_by_user": dict(info.user_env), "set_by_medtune": dict(policy.env)},
        "findings": [asdict(f) for f in findings],
    }


def render(rep: dict) -> str:
    """The report as plain text for people."""
    dev, pol = rep["device"], rep["policy"]
    gpus = ", ".join(f"{n} ({m / GIB:.0f} GiB)" for n, m in zip(dev["names"], dev["memory"])) or "none"
    arch = dev["gfx_arch"] or (f"sm{dev['capability'][0]}{dev['capability'][1]}" if dev["capability"] else "-")
    ram = f"{dev['ram_bytes'] / GIB:.0f} GiB" if dev["ram_bytes"] else "unknown"
    lines = [f"device   {dev['kind']} (torch device '{dev['torch_device']}'), arch {arch}, bf16 {dev['bf16']}",
             f"gpus     {gpus}", f"host     {dev['cpu_count']} CPUs, {ram} RAM", "", "policy"]
    pol = pol | {"env": " ".join(f"{k}={v}" for k, v in pol["env"].items()) or "-"}
    for key in ("train_dtype", "eval_dtype", "loss_scaling", "attn_implementation", "qlora_available", "env"):
        lines.append(f"  {key:<20} {pol[key]!s:<18} {pol['reasons'][key]}")
    lines += ["", "versions", *(f"  {k:<20} {v or 'not installed'}" for k, v in rep["versions"].items())]
    env = rep["env"]["set_by_user"]
    lines += ["", "env (set by user)", *(f"  {k}={v}" for k, v in env.items())] + ([] if env else ["  none"])
    lines += ["", "findings"] + ([] if rep["findings"] else ["  none"])
    for f in rep["findings"]:
        lines += [f"  {f['level']}: {f['message']}", f"    fix: {f['fix']}"]
    return "\n".join(lines)


# --- detection helpers ---


def _strip(arch: str) -> str:
    return arch.split(":")[0]  # "gfx90a:sramecc+:xnack-" -> "gfx90a"


def read_kfd_archs(root: Path = Path("/sys/class/kfd/kfd/topology/nodes")) -> list[str]:
    """AMD GPU archs from the amdgpu kernel driver: real hardware, unaffected by HSA_OVERRIDE_GFX_VERSION."""
    archs = []
    for props in sorted(root.glob("*/properties")):
        for line in props.read_text(encoding="utf-8").splitlines():
            key, _, value = line.partition(" ")
            if key == "gfx_target_version" and int(value) > 0:  # 0 on CPU nodes; 90010 = gfx90a, 100301 = gfx1031
                v = int(value)
                archs.append(f"gfx{v // 10000}{v // 100 % 100}{v % 100:x}")
    return archs


def _ram_bytes() -> int | None:
    meminfo = Path("/proc/meminfo")
    if meminfo.exists():  # Linux; elsewhere sysconf
        return int(meminfo.read_text(encoding="utf-8").split("MemTotal:")[1].split()[0]) * 1024
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # Windows has no sysconf
        return None


def _cpu_bf16(torch: Any) -> bool:
    """oneDNN's own check for native bf16 (AVX512-BF16 or AMX); emulated bf16 would be slower than fp32."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def _mps_bf16(torch: Any) -> bool:
    try:  # bf16 on MPS needs macOS 14+; older systems raise when the tensor is made
        torch.zeros(1, dtype=torch.bfloat16, device="mps")
    except (RuntimeError, TypeError):
        return False
    return True


def probe_extras(kind: str) -> dict[str, str | None]:
    """flash-attn (imported on a GPU only) and bitsandbytes: versions, and whether they work on this device."""
    out: dict[str, str | None] = {"flash_attn": None, "bitsandbytes": None, "bnb_backend": None, "bnb_error": None}
    for name in ("flash_attn", "bitsandbytes"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    if kind in ("cuda", "rocm"):
        try:  # a flash-attn wheel built against another torch fails here with an undefined symbol
            import flash_attn  # noqa: F401
        except (ImportError, OSError):
            out["flash_attn"] = None
    if out["bitsandbytes"] and kind in ("cuda", "rocm", "cpu"):
        out["bnb_backend"], out["bnb_error"] = bnb_probe({"rocm": "cuda"}.get(kind, kind))
    return out


def bnb_probe(device: str) -> tuple[str | None, str | None]:
    """(backend, None) when bitsandbytes round-trips an NF4 tensor on `device`, else (None, why): the real test."""
    import logging

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # its CPU backend warns about optional Hub kernels
    try:
        import torch
        from bitsandbytes import cextension
        from bitsandbytes import functional as bnbf

        w = torch.linspace(-1, 1, 4096, device=device).reshape(64, 64)
        q, state = bnbf.quantize_4bit(w, quant_type="nf4", compress_statistics=True)
        err = float((bnbf.dequantize_4bit(q, state) - w).abs().max())
    except Exception as e:  # noqa: BLE001 -- any failure (no native library, no AVX2, no kernel) means no QLoRA
        return None, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
    if not err < 0.2:
        return None, f"NF4 round trip error {err:.3f} on {device}"
    return getattr(cextension, "BNB_BACKEND", device.upper()), None


# --- policy helpers ---


def _check_overrides(overrides: dict) -> dict:
    allowed = {"train_dtype": DTYPES, "eval_dtype": DTYPES, "attn_implementation": ATTENTION}
    clean = {k: v for k, v in overrides.items() if v is not None}
    for key, value in clean.items():
        if key not in allowed:
            raise MedtuneError(f"unknown device override {key!r}; valid: {', '.join(allowed)}")
        if value not in allowed[key]:
            raise MedtuneError(f"{key}: {value!r} is not one of {', '.join(allowed[key])}")
    return clean


def gpu_dtype(kind: str, capability: tuple[int, int] | None, gfx: str | None) -> tuple[str, str]:
    if kind == "cuda":
        cap = capability or (0, 0)
        return next((dt, f"sm{cap[0]}{cap[1]}: {why}") for low, dt, why in CUDA_DTYPES if cap >= low)
    row = gfx if gfx in ROCM_ARCHS else HSA_OVERRIDES.get(gfx or "", ("",))[0]
    if row in ROCM_ARCHS:
        family, dtype, _ = ROCM_ARCHS[row]
        return dtype, f"{gfx} {family}: {dtype}" + (" with loss scaling" if dtype == "float16" else "")
    if gfx and gfx.startswith(("gfx11", "gfx12")):
        return "bfloat16", f"{gfx} is RDNA3 or newer: bf16 WMMA"
    return "float32", f"{gfx or 'unknown AMD arch'} is not in medtune's table: fp32 is the safe choice"


def native_dtype(info: DeviceInfo) -> tuple[str, str]:
    if info.kind in ("cuda", "rocm"):
        return gpu_dtype(info.kind, info.capability, info.gfx_arch)
    if info.kind in ("mps", "xpu"):
        if info.bf16:
            return "bfloat16", f"{info.kind} supports bf16"
        return "float32", f"{info.kind} without bf16: fp32 (medtune uses fp16 loss scaling only on CUDA/ROCm)"
    if info.bf16:
        return "bfloat16", ("CPU with native bf16 matmul (AVX512-BF16/AMX): bf16 autocast, frozen LoRA base held in "
                            "bf16, ~3.7x the fp32 matmul rate measured here; train.dtype=float32 for bit-exact runs")
    return "float32", "CPU without native bf16: fp32"


def flash_ok(info: DeviceInfo) -> bool:
    if info.kind == "cuda":
        return (info.capability or (0, 0)) >= CUDA_FLASH_ATTN_MIN
    return info.kind == "rocm" and ROCM_ARCHS.get(info.gfx_arch or "", ("", "", False))[2]


def _attention(info: DeviceInfo, train: str, evald: str) -> tuple[str, str]:
    if not info.sdpa:
        return "eager", f"torch {info.torch_version} has no scaled_dot_product_attention"
    if not info.flash_attn:
        return "sdpa", "flash_attn is not installed (or doesn't import): torch's SDPA kernels"
    if not flash_ok(info):
        return "sdpa", f"flash_attn {info.flash_attn} doesn't support this {info.kind} device: SDPA"
    if "float32" in (train, evald):
        return "sdpa", "flash-attn 2 needs fp16/bf16 and a dtype here is fp32: SDPA"
    return "flash_attention_2", f"flash_attn {info.flash_attn} imports and supports this device"


def _qlora(info: DeviceInfo) -> tuple[bool, str]:
    if not info.bitsandbytes:
        return False, "bitsandbytes is not installed (pip install 'medtune[qlora]'): QLoRA off; plain LoRA works"
    if info.bnb_backend:
        return True, (f"bitsandbytes {info.bitsandbytes} ({info.bnb_backend} backend) quantized and dequantized an "
                      f"NF4 test tensor on this {info.kind}: lora.quantize=4bit/8bit work")
    if info.kind in ("cuda", "rocm", "cpu"):
        return False, f"bitsandbytes {info.bitsandbytes} failed its NF4 test on this {info.kind}: {info.bnb_error}"
    return False, f"medtune uses bitsandbytes only on CUDA, ROCm and x86-64 CPUs, not on {info.kind}"


def hsa_override(gfx: str | None, arch_list: list[str]) -> tuple[str | None, str]:
    if not gfx or not arch_list:
        return None, "no AMD arch or no compiled arch list to compare: nothing to set"
    if gfx in arch_list:
        return None, f"{gfx} is compiled into this torch: no HSA_OVERRIDE_GFX_VERSION"
    sibling, value = HSA_OVERRIDES.get(gfx, (None, None))
    if sibling in arch_list:
        return value, f"{gfx} is not compiled into this torch but its same-ISA sibling {sibling} is: {HSA}={value}"
    return None, f"{gfx} is not compiled into this torch and has no compatible compiled arch: nothing to set"


def _env(info: DeviceInfo) -> tuple[dict[str, str], str]:
    if info.kind != "rocm":
        return {}, f"nothing to set on {info.kind}; visible-device variables are only reported, never set"
    value, why = hsa_override(info.gfx_arch, info.arch_list)
    if HSA in info.user_env:
        return {}, f"{HSA}={info.user_env[HSA]} set by user: kept ({why})"
    return ({HSA: value} if value else {}), why


def _set_env(env: dict[str, str]) -> dict[str, str]:
    done = {k: v for k, v in env.items() if k not in os.environ}
    os.environ.update(done)
    SET_BY_MEDTUNE.update(done)
    return done
