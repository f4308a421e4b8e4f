"""The doctor: known traps on this machine, each with a fix, and a memory estimate for the training run.

`medtune env` shows every finding; `train` and `run` print the warnings (dtype, memory for this model, size and
quantization) before loading weights. The device facts and the policy come from hardware.py.
"""

from __future__ import annotations

from dataclasses import dataclass

from medtune.hardware import (
    CUDA_INDEX,
    DTYPE_BYTES,
    GIB,
    HSA,
    ROCM_INDEX,
    VISIBLE_ENV,
    DeviceInfo,
    Policy,
    flash_ok,
    hsa_override,
    native_dtype,
)

QUANT_BYTES = {"4bit": 0.55, "8bit": 1.05}  # bytes per weight with quantization constants (NF4 + double quant: ~0.52)
# warnings already printed in this process (`run` checks before its base eval and in train)
SHOWN_WARNINGS: set[str] = set()


@dataclass
class Finding:
    level: str  # "warning" | "info"
    message: str
    fix: str


def estimate_memory(params: int, batch_tokens: int, dtype: str, quantize: str = "none") -> int:
    """Conservative bytes for LoRA training on one device.

    weights = params x dtype bytes (frozen base in the training dtype; x 0.55 bytes for 4bit, 1.05 for 8bit);
    LoRA adapters + grads + AdamW states = 2% of params x 16 bytes; activations = batch_tokens x 128 x sqrt(params) x
    dtype bytes / 2 (no gradient checkpointing, logits included: checked against SmolLM2-135M, Qwen3-1.7B and
    Llama-2-7B layer sizes); then +10% allocator slack and 1 GiB runtime.
    """
    size = DTYPE_BYTES[dtype]
    weights, lora = params * QUANT_BYTES.get(quantize, size), 0.02 * params * 16
    activations = batch_tokens * 128 * params**0.5 * size / 2
    return int((weights + lora + activations) * 1.1 + GIB)


def doctor(info: DeviceInfo, policy: Policy, model_params: int | None = None, batch_tokens: int | None = None,
           quantize: str = "none") -> list[Finding]:
    """Known traps on this machine, each with a fix. Pass the model size and tokens per step for a memory check."""
    findings = _check_torch_build(info) + _check_arch(info) + _check_policy(info, policy, quantize)
    if model_params:
        findings += _check_memory(info, policy, model_params, batch_tokens or 0, quantize)
    return findings


def preflight(cfg, log=print, info: DeviceInfo | None = None) -> list[Finding]:
    """The doctor for a training config, before any weights load: the dtype it will train in, the model's size from
    its config (no weights read), tokens per micro-batch and quantization. Prints each warning once per process."""
    from medtune.hardware import decide, detect

    info = info or detect()
    requested = cfg.train.dtype if cfg.train.dtype != "auto" else None
    policy = decide(info, {"train_dtype": requested if requested in ("bfloat16", "float16", "float32") else None})
    findings = doctor(info, policy, model_params(cfg.model), cfg.train.batch_size * cfg.train.max_length,
                      cfg.lora.quantize)
    for f in findings:
        if f.level == "warning" and f.message not in SHOWN_WARNINGS:
            SHOWN_WARNINGS.add(f.message)
            log(f"warning: {f.message}\n  fix: {f.fix}")
    return findings


def model_params(name: str) -> int | None:
    """Parameter count from the model's config on the meta device (no weights read); None if the config can't load."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    from medtune.models import resolve

    try:
        config = AutoConfig.from_pretrained(resolve(name, log=lambda *_: None), trust_remote_code=False)
        with init_empty_weights():
            model = AutoModelForCausalLM.from_config(config)
    except (OSError, ValueError, KeyError):  # unreachable Hub id, unknown architecture: the load reports it later
        return None
    model.tie_weights()  # tied embeddings count once, as in the loaded model
    return sum(p.numel() for p in model.parameters())


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
    gfx, value = info.gfx_arch, hsa_override(info.gfx_arch, info.arch_list)[0]
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


def _check_policy(info: DeviceInfo, policy: Policy, quantize: str = "none") -> list[Finding]:
    out = []
    half = [k for k in ("train_dtype", "eval_dtype") if getattr(policy, k) == "float16"]
    if half and native_dtype(info)[0] == "bfloat16":
        out.append(Finding("warning", f"{' and '.join(half)} float16 on a device with bf16: fp16 overflows past "
                           "65504 and needs loss scaling; bf16 has fp32's range at the same speed",
                           "drop the dtype override (medtune picks bfloat16 here)"))
    if policy.attn_implementation == "flash_attention_2" and not (info.flash_attn and flash_ok(info)):
        out.append(Finding("warning", "attn_implementation flash_attention_2 is set but flash_attn doesn't import or "
                           f"doesn't support this {info.kind} device: loading the model will fail",
                           "drop the override (medtune picks sdpa) or install flash-attn for this device"))
    if info.bitsandbytes and not policy.qlora_available:
        level = "warning" if info.kind in ("cuda", "rocm") or quantize != "none" else "info"
        out.append(Finding(level, f"bitsandbytes {info.bitsandbytes} is installed but QLoRA is off: "
                           f"{policy.reasons['qlora_available']}",
                           "train plain LoRA (lora.quantize=none), or install a bitsandbytes build for this device: "
                           "https://huggingface.co/docs/bitsandbytes/main/en/installation"))
    elif quantize != "none" and not info.bitsandbytes:
        out.append(Finding("warning", f"lora.quantize={quantize} but bitsandbytes is not installed: training will stop",
                           "pip install 'medtune[qlora]', or lora.quantize=none"))
    return out


def _check_memory(info: DeviceInfo, policy: Policy, params: int, batch_tokens: int, quantize: str) -> list[Finding]:
    available = min(info.memory) if info.memory else info.ram_bytes
    if not available:
        return [Finding("info", "device memory is unknown: memory check skipped", "-")]
    dtype = policy.train_dtype
    need = estimate_memory(params, batch_tokens, dtype, quantize)
    base = f"{params / 1e9:.2f}B parameters in {quantize if quantize != 'none' else dtype}"
    where = f"{available / GIB:.1f} GiB on {info.names[0] if info.names else 'this machine (RAM)'}"
    if need <= available:
        return [Finding("info", f"estimated {need / GIB:.1f} GiB of {where} for {base} and {batch_tokens} tokens "
                        "per step", "-")]
    fixed = estimate_memory(params, 0, dtype, quantize)
    per_token = estimate_memory(params, 1, dtype, quantize) - fixed
    fits = int((available - fixed) / max(per_token, 1))
    fix = (f"use at most ~{fits} tokens per step (smaller batch, more gradient accumulation) or enable gradient "
           "checkpointing" if fits > 0 else "the weights alone don't fit: use a smaller model, lora.quantize=4bit "
           "where QLoRA is available, or shard with recipes/accelerate/fsdp.yaml or deepspeed-zero3.yaml")
    return [Finding("warning", f"estimated {need / GIB:.1f} GiB needed but {where} ({base}, {batch_tokens} tokens "
                    "per step)", fix)]
