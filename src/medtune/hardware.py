"""One device policy: what this machine has (detect), what medtune does with it (decide), what is wrong (doctor).

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
PACKAGES = ["medtune", "torch", "transformers", "peft", "trl", "accelerate", "datasets", "bitsandbytes", "flash_attn"]
DTYPES = ("bfloat16", "float16", "float32")
ATTENTION = ("flash_attention_2", "sdpa", "eager")
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
GIB = 1024**3
_SET_BY_MEDTUNE: dict[str, str] = {}  # env vars apply_env set in this process, so detect() doesn't call them "user"


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
        env = {k: os.environ[k] for k in USER_ENV if k in os.environ and _SET_BY_MEDTUNE.get(k) != os.environ[k]}
        hints = [p for p in ("/dev/kfd", "/proc/driver/nvidia") if Path(p).exists()]
        hints += ["nvidia-smi"] if shutil.which("nvidia-smi") else []
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        return cls(env, hints, _kfd_archs(), cpus, _ram_bytes())


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
    bnb_backend: str | None = None  # "CUDA" / "ROCm" when bitsandbytes' native library loaded for this device


@dataclass
class Policy:
    train_dtype: str
    eval_dtype: str
    loss_scaling: bool
    attn_implementation: str
    qlora_available: bool
    env: dict[str, str]  # variables medtune sets (never visible-device ones)
    reasons: dict[str, str]  # one line per decision


@dataclass
class Finding:
    level: str  # "warning" | "info"
    message: str
    fix: str


def detect(torch: Any = None, host: Host | None = None) -> DeviceInfo:
    """Describe this machine. Initializes CUDA/HIP: on ROCm call prepare_env() before this (see apply_env)."""
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
        bf16 = _gpu_dtype(kind, capability, gfx)[0] == "bfloat16"
    elif kind == "cpu":
        bf16 = _cpu_bf16(torch)
    extras = _probe_extras(kind)
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
    train, why = _native_dtype(info)
    reasons = {"train_dtype": why}
    evald, reasons["eval_dtype"] = (train, "same as training") if info.kind != "cpu" else (
        "float32", "fp32 on CPU: exact scores (the evaluator's own fast mode re-scores close calls in fp32)")
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
    value, _ = _hsa_override(archs[0], [_strip(a) for a in torch.cuda.get_arch_list()])
    return _set_env({HSA: value} if value else {})


def apply_env(policy: Policy) -> dict[str, str]:
    """Set the policy's env vars the user hasn't set; returns what it set.

    Must run before the first CUDA/HIP initialization to affect this process: the ROCm runtime reads
    HSA_OVERRIDE_GFX_VERSION once, at start-up, and detect() has already started it. Child processes (accelerate
    launch workers, data loader workers) inherit the variables either way. On ROCm use prepare_env() before detect().
    """
    return _set_env(policy.env)


def device_string(info: DeviceInfo) -> str:
    """The torch device for this kind: ROCm is driven through torch's "cuda" device."""
    return {"rocm": "cuda"}.get(info.kind, info.kind)


def estimate_memory(params: int, batch_tokens: int, dtype: str) -> int:
    """Conservative bytes for LoRA training on one device.

    weights = params x dtype bytes; LoRA adapters + grads + AdamW states = 2% of params x 16 bytes;
    activations = batch_tokens x 128 x sqrt(params) x dtype bytes / 2 (no gradient checkpointing, logits included:
    checked against SmolLM2-135M, Qwen3-1.7B and Llama-2-7B layer sizes); then +10% allocator slack and 1 GiB runtime.
    """
    size = DTYPE_BYTES[dtype]
    weights, lora = params * size, 0.02 * params * 16
    activations = batch_tokens * 128 * params**0.5 * size / 2
    return int((weights + lora + activations) * 1.1 + GIB)


def doctor(
    info: DeviceInfo, policy: Policy, model_params: int | None = None, batch_tokens: int | None = None
) -> list[Finding]:
    """Known traps on this machine, each with a fix. Pass the model size and tokens per step for a memory check."""
    findings = _check_torch_build(info) + _check_arch(info) + _check_policy(info, policy)
    if model_params:
        findings += _check_memory(info, policy, model_params, batch_tokens or 0)
    return findings


def report(info: DeviceInfo, policy: Policy, findings: list[Finding]) -> dict:
    """JSON-able record of the machine, the policy with its reasons, versions, env and findings."""
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


def _kfd_archs(root: Path = Path("/sys/class/kfd/kfd/topology/nodes")) -> list[str]:
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


def _probe_extras(kind: str) -> dict[str, str | None]:
    """flash-attn and bitsandbytes: versions, and whether they load for this GPU (imports them only on a GPU)."""
    out: dict[str, str | None] = {"flash_attn": None, "bitsandbytes": None, "bnb_backend": None}
    for name in ("flash_attn", "bitsandbytes"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    if kind not in ("cuda", "rocm"):
        return out
    try:  # a flash-attn wheel built against another torch fails here with an undefined symbol
        import flash_attn  # noqa: F401
    except (ImportError, OSError):
        out["flash_attn"] = None
    try:  # bitsandbytes picks its backend from torch and loads a native library; a missing one is a mock object
        from bitsandbytes import cextension
    except (ImportError, OSError, RuntimeError):
        return out
    lib = getattr(cextension, "lib", None)
    if lib is not None and not type(lib).__name__.startswith("ErrorHandlerMock"):
        out["bnb_backend"] = getattr(cextension, "BNB_BACKEND", "CUDA")  # releases before 0.44 were CUDA-only
    return out


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


def _gpu_dtype(kind: str, capability: tuple[int, int] | None, gfx: str | None) -> tuple[str, str]:
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


def _native_dtype(info: DeviceInfo) -> tuple[str, str]:
    if info.kind in ("cuda", "rocm"):
        return _gpu_dtype(info.kind, info.capability, info.gfx_arch)
    if info.kind in ("mps", "xpu"):
        if info.bf16:
            return "bfloat16", f"{info.kind} supports bf16"
        return "float32", f"{info.kind} without bf16: fp32 (medtune uses fp16 loss scaling only on CUDA/ROCm)"
    if info.bf16:
        return "bfloat16", ("CPU with native bf16 matmul (AVX512-BF16/AMX): bf16 autocast over fp32 weights, ~3.7x the "
                            "fp32 matmul rate measured here; set train.dtype=float32 for bit-exact runs")
    return "float32", "CPU without native bf16: fp32"


def _flash_ok(info: DeviceInfo) -> bool:
    if info.kind == "cuda":
        return (info.capability or (0, 0)) >= CUDA_FLASH_ATTN_MIN
    return info.kind == "rocm" and ROCM_ARCHS.get(info.gfx_arch or "", ("", "", False))[2]


def _attention(info: DeviceInfo, train: str, evald: str) -> tuple[str, str]:
    if not info.sdpa:
        return "eager", f"torch {info.torch_version} has no scaled_dot_product_attention"
    if not info.flash_attn:
        return "sdpa", "flash_attn is not installed (or doesn't import): torch's SDPA kernels"
    if not _flash_ok(info):
        return "sdpa", f"flash_attn {info.flash_attn} doesn't support this {info.kind} device: SDPA"
    if "float32" in (train, evald):
        return "sdpa", "flash-attn 2 needs fp16/bf16 and a dtype here is fp32: SDPA"
    return "flash_attention_2", f"flash_attn {info.flash_attn} imports and supports this device"


def _qlora(info: DeviceInfo) -> tuple[bool, str]:
    if not info.bitsandbytes:
        return False, "bitsandbytes is not installed: QLoRA (4-bit base) off; plain LoRA works everywhere"
    if info.kind == "cuda" and info.bnb_backend:
        return True, f"bitsandbytes {info.bitsandbytes} loaded its CUDA library"
    if info.kind == "rocm" and info.bnb_backend == "ROCm":
        return True, f"bitsandbytes {info.bitsandbytes} loaded its ROCm library"
    if info.kind in ("cuda", "rocm"):
        return False, f"bitsandbytes {info.bitsandbytes} has no working {info.kind} backend here"
    return False, f"medtune uses bitsandbytes 4-bit only on CUDA/ROCm; its {info.kind} support is partial or preview"


def _hsa_override(gfx: str | None, arch_list: list[str]) -> tuple[str | None, str]:
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
    value, why = _hsa_override(info.gfx_arch, info.arch_list)
    if HSA in info.user_env:
        return {}, f"{HSA}={info.user_env[HSA]} set by user: kept ({why})"
    return ({HSA: value} if value else {}), why


def _set_env(env: dict[str, str]) -> dict[str, str]:
    done = {k: v for k, v in env.items() if k not in os.environ}
    os.environ.update(done)
    _SET_BY_MEDTUNE.update(done)
    return done


# --- doctor checks ---


def _pip(index: str, info: DeviceInfo) -> str:
    version = info.torch_version.split("+")[0]
    return f"pip uninstall -y torch && pip install torch=={version} --index-url {index}"


def _check_torch_build(info: DeviceInfo) -> list[Finding]:
    if info.kind != "cpu":
        return []
    amd = "/dev/kfd" in info.gpu_hints
    nvidia = any(h in info.gpu_hints for h in ("/proc/driver/nvidia", "nvidia-smi"))
    build = f"a ROCm build (HIP {info.hip_version})" if info.hip_version else (
        f"a CUDA build (CUDA {info.cuda_version})" if info.cuda_version else "a CPU-only build"
    )
    out = []
    if amd and not info.hip_version:
        out.append(Finding("warning", f"torch {info.torch_version} is {build} but this machine has an AMD GPU "
                           "(/dev/kfd): training runs on the CPU", _pip(ROCM_INDEX, info)))
    if nvidia and not info.cuda_version:
        out.append(Finding("warning", f"torch {info.torch_version} is {build} but this machine has an NVIDIA "
                           "driver: training runs on the CPU", _pip(CUDA_INDEX, info)))
    if (amd and info.hip_version) or (nvidia and info.cuda_version):
        hidden = {k: v for k, v in info.user_env.items() if k in VISIBLE_ENV}
        out.append(Finding("warning", f"torch is {build} and a GPU driver is present, but torch sees no GPU"
                           + (f" (visible-device variables: {hidden})" if hidden else ""),
                           "check `nvidia-smi` / `rocm-smi`, that the driver is new enough for this build, that you "
                           "are in the video/render groups (ROCm), and unset empty *_VISIBLE_DEVICES"))
    return out


def _cuda_arch_ok(cap: tuple[int, int], arch_list: list[str]) -> bool:
    for arch in arch_list:
        kind, _, num = arch.partition("_")
        digits = num.rstrip("af")  # sm_90a / sm_100f: arch-specific cubins
        if not digits.isdigit():
            continue
        have = (int(digits[:-1]), int(digits[-1]))
        if kind == "sm" and have[0] == cap[0] and have[1] <= cap[1] and (digits == num or have == cap):
            return True  # a cubin runs on its own major arch, same or newer minor
        if kind == "compute" and have <= cap:
            return True  # PTX is compiled forward by the driver
    return not arch_list


def _check_arch(info: DeviceInfo) -> list[Finding]:
    out = []
    if info.kind == "cuda" and info.capability and not _cuda_arch_ok(info.capability, info.arch_list):
        sm = f"sm_{info.capability[0]}{info.capability[1]}"
        out.append(Finding("warning", f"torch {info.torch_version} is compiled for {info.arch_list}, not your {sm}: "
                           "kernels fail with 'no kernel image is available'",
                           f"install a torch build whose torch.cuda.get_arch_list() covers {sm}"))
    user = info.user_env.get(HSA)
    if info.kind != "rocm" or not info.gfx_arch or not info.arch_list:
        return out
    gfx, value = info.gfx_arch, _hsa_override(info.gfx_arch, info.arch_list)[0]
    if user and gfx in info.arch_list:
        out.append(Finding("warning", f"{HSA}={user} is set, but {gfx} is compiled into this torch: the override "
                           "makes ROCm run another arch's kernels", f"unset {HSA}"))
    elif user and value and user != value:
        out.append(Finding("warning", f"{HSA}={user} is set; for {gfx} with this torch the compatible value is {value}",
                           f"export {HSA}={value}"))
    elif not user and gfx not in info.arch_list and not value:
        out.append(Finding("warning", f"torch {info.torch_version} is not compiled for {gfx} (it has "
                           f"{', '.join(info.arch_list)}) and no compatible arch is known",
                           "install a torch/ROCm build that lists your arch (pip index for a newer ROCm, or AMD's "
                           "rocm/pytorch image)"))
    return out


def _check_policy(info: DeviceInfo, policy: Policy) -> list[Finding]:
    out = []
    half = [k for k in ("train_dtype", "eval_dtype") if getattr(policy, k) == "float16"]
    if half and _native_dtype(info)[0] == "bfloat16":
        out.append(Finding("warning", f"{' and '.join(half)} float16 on a device with bf16: fp16 overflows past "
                           "65504 and needs loss scaling; bf16 has fp32's range at the same speed",
                           "drop the dtype override (medtune picks bfloat16 here)"))
    if policy.attn_implementation == "flash_attention_2" and not (info.flash_attn and _flash_ok(info)):
        out.append(Finding("warning", "attn_implementation flash_attention_2 is set but flash_attn doesn't import or "
                           f"doesn't support this {info.kind} device: loading the model will fail",
                           "drop the override (medtune picks sdpa) or install flash-attn for this device"))
    if info.bitsandbytes and not policy.qlora_available:
        level = "warning" if info.kind in ("cuda", "rocm") else "info"
        out.append(Finding(level, f"bitsandbytes {info.bitsandbytes} is installed but QLoRA is off: "
                           f"{policy.reasons['qlora_available']}",
                           "train plain LoRA (the default), or install a bitsandbytes build for this device: "
                           "https://huggingface.co/docs/bitsandbytes/main/en/installation"))
    return out


def _check_memory(info: DeviceInfo, policy: Policy, params: int, batch_tokens: int) -> list[Finding]:
    available = min(info.memory) if info.memory else info.ram_bytes
    if not available:
        return [Finding("info", "device memory is unknown: memory check skipped", "-")]
    need = estimate_memory(params, batch_tokens, policy.train_dtype)
    where = f"{available / GIB:.1f} GiB on {info.names[0] if info.names else 'this machine (RAM)'}"
    if need <= available:
        return [Finding("info", f"estimated {need / GIB:.1f} GiB of {where} for {params / 1e9:.2f}B parameters "
                        f"and {batch_tokens} tokens per step", "-")]
    per_token = estimate_memory(params, 1, policy.train_dtype) - estimate_memory(params, 0, policy.train_dtype)
    fits = int((available - estimate_memory(params, 0, policy.train_dtype)) / max(per_token, 1))
    fix = (f"use at most ~{fits} tokens per step (smaller batch, more gradient accumulation) or enable gradient "
           "checkpointing" if fits > 0 else "the weights alone don't fit: use a smaller model, QLoRA where available, "
           "or shard with recipes/accelerate/fsdp.yaml or deepspeed-zero3.yaml")
    return [Finding("warning", f"estimated {need / GIB:.1f} GiB needed but {where} ({params / 1e9:.2f}B parameters "
                    f"in {policy.train_dtype}, {batch_tokens} tokens per step)", fix)]
