"""Device policy, doctor and report on faked devices; the real machine here is a CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from medtune import doctor as dr
from medtune import hardware as hw
from medtune.errors import MedtuneError

ROOT = Path(__file__).resolve().parents[1]
GIB = 1024**3
NO_EXTRAS = {"flash_attn": None, "bitsandbytes": None, "bnb_backend": None, "bnb_error": None}
CUDA_ARCHS = ["sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120"]
ROCM_ARCHS = ["gfx900", "gfx906:xnack-", "gfx908", "gfx90a", "gfx942", "gfx950", "gfx1030", "gfx1100", "gfx1201"]


def gpu(name: str, gib: int, cap: tuple[int, int] = (0, 0), gcn: str = "") -> SimpleNamespace:
    return SimpleNamespace(name=name, total_memory=gib * GIB, major=cap[0], minor=cap[1], gcnArchName=gcn)


def fake_torch(*, cuda=None, hip=None, gpus=(), arch_list=(), mps_bf16=None, xpu_bf16=None,
               cpu_bf16=False) -> SimpleNamespace:
    """The slice of torch's API that detect() reads. mps_bf16/xpu_bf16 None means that backend is absent."""
    gpus = list(gpus)

    def zeros(*shape, dtype=None, device=None):
        if device == "mps" and dtype == "bf16" and not mps_bf16:
            raise TypeError("MPS BFloat16 is only supported on MacOS 14 or newer")

    xpus = [gpu("Intel(R) Data Center GPU Max 1550", 64)] if xpu_bf16 is not None else []
    return SimpleNamespace(
        __version__="2.13.0" + ("+rocm6.4" if hip else "+cu128" if cuda else "+cpu"),
        version=SimpleNamespace(cuda=cuda, hip=hip),
        cuda=SimpleNamespace(
            is_available=lambda: bool(gpus),
            device_count=lambda: len(gpus),
            get_device_properties=lambda i: gpus[i],
            get_arch_list=lambda: list(arch_list),
            current_device=lambda: 0,
        ),
        backends=SimpleNamespace(mps=SimpleNamespace(is_available=lambda: mps_bf16 is not None)),
        mps=SimpleNamespace(recommended_max_memory=lambda: 21 * GIB),
        xpu=SimpleNamespace(
            is_available=lambda: bool(xpus),
            device_count=lambda: len(xpus),
            get_device_properties=lambda i: xpus[i],
            is_bf16_supported=lambda: bool(xpu_bf16),
        ),
        nn=SimpleNamespace(functional=SimpleNamespace(scaled_dot_product_attention=lambda *a: None)),
        bfloat16="bf16",
        zeros=zeros,
        ops=SimpleNamespace(mkldnn=SimpleNamespace(_is_mkldnn_bf16_supported=lambda: cpu_bf16)),
    )


def host(**kw) -> hw.Host:
    return hw.Host(**({"cpu_count": 16, "ram_bytes": 64 * GIB} | kw))


def run(monkeypatch, torch, h=None, extras=None, overrides=None, **doctor_kw):
    monkeypatch.setattr(hw, "probe_extras", lambda kind: dict(NO_EXTRAS) | (extras or {}))
    info = hw.detect(torch, h or host())
    policy = hw.decide(info, overrides)
    findings = dr.doctor(info, policy, **doctor_kw)
    rep = hw.report(info, policy, findings)
    assert json.loads(json.dumps(rep)) == json.loads(json.dumps(rep, default=str))  # plain JSON, nothing odd
    assert set(policy.reasons) == {"train_dtype", "eval_dtype", "loss_scaling", "attn_implementation",
                                   "qlora_available", "env"}
    assert all(policy.reasons.values())
    text = hw.render(rep)
    assert policy.reasons["train_dtype"] in text
    return info, policy, findings, rep


def cuda(name: str, gib: int, cap: tuple[int, int], n: int = 1, arch_list: list[str] = CUDA_ARCHS) -> dict:
    return {"cuda": "12.8", "gpus": [gpu(name, gib, cap)] * n, "arch_list": arch_list}


def rocm(name: str, gib: int, gcn: str, n: int = 1, arch_list: list[str] = ROCM_ARCHS) -> dict:
    return {"hip": "6.4", "gpus": [gpu(name, gib, gcn=gcn)] * n, "arch_list": arch_list}


FA = {"flash_attn": "2.8.3"}
HSA = "HSA_OVERRIDE_GFX_VERSION"
CASES = {
    # id: (fake_torch kwargs, Host kwargs, extras, expected kind, train, eval, attention, env)
    "cuda-sm70": (cuda("Tesla V100-SXM2-32GB", 32, (7, 0), arch_list=["sm_70", *CUDA_ARCHS]), {}, FA,
                  "cuda", "float16", "float32", "sdpa", {}),  # fp16 training; eval fp32: bf16 is emulated
    "cuda-sm80": (cuda("NVIDIA A100-SXM4-80GB", 80, (8, 0), n=2), {}, FA,
                  "cuda", "bfloat16", "bfloat16", "flash_attention_2", {}),
    "cuda-sm90": (cuda("NVIDIA H100 80GB HBM3", 80, (9, 0)), {}, {}, "cuda", "bfloat16", "bfloat16", "sdpa", {}),
    "rocm-gfx90a": (rocm("AMD Instinct MI250X", 64, "gfx90a:sramecc+:xnack-"), {}, FA,
                    "rocm", "bfloat16", "bfloat16", "flash_attention_2", {}),
    "rocm-gfx942": (rocm("AMD Instinct MI300X", 192, "gfx942:sramecc+:xnack-", n=8), {"kfd_archs": ["gfx942"] * 8}, {},
                    "rocm", "bfloat16", "bfloat16", "sdpa", {}),
    "rocm-gfx1100": (rocm("Radeon RX 7900 XTX", 24, "gfx1100"), {}, FA, "rocm", "bfloat16", "bfloat16", "sdpa", {}),
    "rocm-gfx1030": (rocm("AMD Radeon RX 6800 XT", 16, "gfx1030"), {}, {}, "rocm", "float16", "float32", "sdpa", {}),
    "rocm-gfx1031-override": (rocm("AMD Radeon RX 6700 XT", 12, "gfx1031"), {"kfd_archs": ["gfx1031"]}, {},
                              "rocm", "float16", "float32", "sdpa", {HSA: "10.3.0"}),
    "rocm-gfx1102-override": (rocm("AMD Radeon RX 7600", 8, "gfx1102"), {}, {},
                              "rocm", "bfloat16", "bfloat16", "sdpa", {HSA: "11.0.0"}),
    "mps-bf16": ({"mps_bf16": True}, {}, {}, "mps", "bfloat16", "bfloat16", "sdpa", {}),
    "mps-no-bf16": ({"mps_bf16": False}, {}, {}, "mps", "float32", "float32", "sdpa", {}),
    "xpu": ({"xpu_bf16": True}, {}, {}, "xpu", "bfloat16", "bfloat16", "sdpa", {}),
    "cpu": ({}, {}, FA, "cpu", "float32", "float32", "sdpa", {}),
    "cpu-bf16": ({"cpu_bf16": True}, {}, FA, "cpu", "bfloat16", "bfloat16", "sdpa", {}),
}


@pytest.mark.parametrize("case", CASES)
def test_policy_per_device(monkeypatch, case):
    torch_kw, host_kw, extras, kind, train, evald, attn, env = CASES[case]
    info, policy, findings, rep = run(monkeypatch, fake_torch(**torch_kw), host(**host_kw), extras)
    assert (info.kind, policy.train_dtype, policy.eval_dtype, policy.attn_implementation) == (kind, train, evald, attn)
    assert policy.env == env
    assert policy.loss_scaling is (train == "float16")
    assert info.bf16 is (train == "bfloat16")
    assert hw.native_bf16(hw.device_string(info), torch_fake := fake_torch(**torch_kw)) is info.bf16  # one decision
    assert hw.weights_dtype(hw.device_string(info), torch_fake) == evald
    assert policy.qlora_available is False  # bitsandbytes isn't installed in any of these
    assert hw.device_string(info) == {"rocm": "cuda"}.get(kind, kind)
    assert rep["device"]["torch_device"] == hw.device_string(info)
    assert rep["env"]["set_by_medtune"] == env
    assert [f for f in findings if f.level == "warning"] == []  # a healthy machine has nothing to warn about
    if kind in ("cuda", "rocm"):
        assert info.count == len(torch_kw["gpus"]) and info.memory[0] == torch_kw["gpus"][0].total_memory
    if kind == "rocm":
        assert info.gfx_arch == torch_kw["gpus"][0].gcnArchName.split(":")[0]
        assert "gfx906" in info.arch_list  # feature suffixes stripped from torch's compiled list too
    if kind == "cpu":  # cpu-only: a faked CPU device (parametrized above), not this machine
        assert info.count == 0 and info.names == []


def test_capability_is_the_weakest_gpu(monkeypatch):
    mixed = fake_torch(cuda="12.8", gpus=[gpu("H100", 80, (9, 0)), gpu("T4", 16, (7, 5))], arch_list=CUDA_ARCHS)
    info, policy, *_ = run(monkeypatch, mixed)
    assert info.capability == (7, 5) and policy.train_dtype == "float16"


def test_reasons_explain_the_table():
    archs = ("gfx906", "gfx908", "gfx942", "gfx1030", "gfx1032", "gfx1151", "gfx803")
    reasons = {arch: hw.gpu_dtype("rocm", None, arch) for arch in archs}
    assert reasons["gfx906"][0] == reasons["gfx908"][0] == "float16"
    assert reasons["gfx942"][0] == "bfloat16" and "CDNA3" in reasons["gfx942"][1]
    why = "gfx1030 RDNA2 (RX 6000 series, W6800, 680M): no bf16 WMMA: float16 with loss scaling"
    assert reasons["gfx1030"] == ("float16", why)
    assert reasons["gfx1032"][0] == "float16"  # takes its same-ISA sibling's row
    assert reasons["gfx1151"][0] == "bfloat16"  # unlisted RDNA3.5: the gfx11 family rule
    assert reasons["gfx803"][0] == "float32"  # unknown: the safe choice
    assert hw.gpu_dtype("cuda", (6, 1), None)[0] == "float32"
    assert hw.gpu_dtype("cuda", (7, 5), None) == ("float16", "sm75: " + hw.CUDA_DTYPES[1][2])


# --- ROCm override: never folklore, never over the user's value ---


def test_user_set_hsa_override_is_kept(monkeypatch):
    monkeypatch.setenv("HSA_OVERRIDE_GFX_VERSION", "10.3.0")
    # with the override active HIP reports gfx1030; the kernel driver still says gfx1031
    torch = fake_torch(hip="6.4", gpus=[gpu("AMD Radeon RX 6700 XT", 12, gcn="gfx1030")], arch_list=ROCM_ARCHS)
    info, policy, findings, rep = run(monkeypatch, torch, host(kfd_archs=["gfx1031"],
                                                               user_env={"HSA_OVERRIDE_GFX_VERSION": "10.3.0"}))
    assert info.gfx_arch == "gfx1031"
    assert policy.env == {} and "set by user: kept" in policy.reasons["env"]
    assert hw.prepare_env(torch, host(kfd_archs=["gfx1031"])) == {}
    assert os.environ["HSA_OVERRIDE_GFX_VERSION"] == "10.3.0"
    assert rep["env"]["set_by_user"] == {"HSA_OVERRIDE_GFX_VERSION": "10.3.0"}
    assert findings == []  # the right value: nothing to say


def test_native_arch_never_gets_an_override(monkeypatch):
    torch = fake_torch(hip="6.4", gpus=[gpu("AMD Instinct MI300X", 192, gcn="gfx942")], arch_list=ROCM_ARCHS)
    _, policy, *_ = run(monkeypatch, torch)
    assert policy.env == {} and "gfx942 is compiled into this torch" in policy.reasons["env"]
    # a build that ships gfx1101 itself: its RDNA3 sibling mapping must not kick in
    torch = fake_torch(**rocm("AMD Radeon RX 7800 XT", 16, "gfx1101", arch_list=[*ROCM_ARCHS, "gfx1101"]))
    _, policy, *_ = run(monkeypatch, torch)
    assert policy.env == {} and "gfx1101 is compiled into this torch" in policy.reasons["env"]
    # the sibling itself missing from torch's list: no override either, and the doctor says why
    torch = fake_torch(hip="6.4", gpus=[gpu("RX 6700 XT", 12, gcn="gfx1031")], arch_list=["gfx90a", "gfx942"])
    _, policy, findings, _ = run(monkeypatch, torch)
    assert policy.env == {}
    assert any("not compiled for gfx1031" in f.message for f in findings)


def test_prepare_env_is_not_reported_as_the_users(monkeypatch):
    monkeypatch.setattr(hw, "SET_BY_MEDTUNE", {})
    monkeypatch.delenv("HSA_OVERRIDE_GFX_VERSION", raising=False)
    rocm = fake_torch(hip="6.4", arch_list=ROCM_ARCHS)
    assert hw.prepare_env(rocm, host(kfd_archs=["gfx1031"])) == {"HSA_OVERRIDE_GFX_VERSION": "10.3.0"}
    # what medtune set is not reported back as the user's choice
    assert "HSA_OVERRIDE_GFX_VERSION" not in hw.Host.read().user_env
    torch = fake_torch(hip="6.4", gpus=[gpu("AMD Radeon RX 6700 XT", 12, gcn="gfx1030")], arch_list=ROCM_ARCHS)
    _, policy, *_ = run(monkeypatch, torch, host(kfd_archs=["gfx1031"]))
    for name in hw.VISIBLE_ENV:  # visible-device variables are reported, never decided
        assert name not in policy.env


def test_prepare_env_before_hip_starts(monkeypatch):
    monkeypatch.setattr(hw, "SET_BY_MEDTUNE", {})
    monkeypatch.delenv("HSA_OVERRIDE_GFX_VERSION", raising=False)
    rocm = fake_torch(hip="6.4", arch_list=ROCM_ARCHS)  # no devices touched: only the compiled list is read
    assert hw.prepare_env(rocm, host(kfd_archs=["gfx1036", "gfx1100"])) == {}  # iGPU + dGPU: don't guess
    assert hw.prepare_env(fake_torch(cuda="12.8"), host(kfd_archs=["gfx1031"])) == {}
    assert hw.prepare_env(rocm, host(kfd_archs=["gfx942"])) == {}
    assert hw.prepare_env(rocm, host(kfd_archs=["gfx1031"])) == {"HSA_OVERRIDE_GFX_VERSION": "10.3.0"}
    assert os.environ["HSA_OVERRIDE_GFX_VERSION"] == "10.3.0"
    monkeypatch.setenv("HSA_OVERRIDE_GFX_VERSION", "10.3.1")
    assert hw.prepare_env(rocm, host(kfd_archs=["gfx1031"])) == {}
    assert os.environ["HSA_OVERRIDE_GFX_VERSION"] == "10.3.1"


def test_kfd_archs_from_sysfs(tmp_path):
    for node, version in enumerate([0, 90010, 100301, 90402]):  # node 0 is the CPU
        (tmp_path / str(node)).mkdir()
        (tmp_path / str(node) / "properties").write_text(f"cpu_cores_count 8\ngfx_target_version {version}\n")
    assert hw.read_kfd_archs(tmp_path) == ["gfx90a", "gfx1031", "gfx942"]
    assert hw.read_kfd_archs(tmp_path / "missing") == []


# --- doctor: one test per trap ---


def test_cuda_torch_on_rocm_machine(monkeypatch):
    _, policy, findings, _ = run(monkeypatch, fake_torch(cuda="12.8"), host(gpu_hints=["/dev/kfd"]))
    assert policy.train_dtype == "float32"
    [f] = findings
    assert "CUDA build" in f.message and "AMD GPU" in f.message
    assert f.fix == "pip uninstall -y torch && pip install torch==2.13.0 --index-url " + hw.ROCM_INDEX


def test_rocm_torch_on_nvidia_machine(monkeypatch):
    _, _, findings, _ = run(monkeypatch, fake_torch(hip="6.4"), host(gpu_hints=["/proc/driver/nvidia", "nvidia-smi"]))
    [f] = findings
    assert "ROCm build" in f.message and "NVIDIA" in f.message
    assert f.fix.endswith("torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128")


@pytest.mark.parametrize("hint,index", [("/dev/kfd", hw.ROCM_INDEX), ("nvidia-smi", hw.CUDA_INDEX)])
def test_cpu_torch_with_a_gpu(monkeypatch, hint, index):
    _, _, findings, rep = run(monkeypatch, fake_torch(), host(gpu_hints=[hint]))
    [f] = findings
    assert f.level == "warning" and "CPU-only build" in f.message and f.fix.endswith(f"--index-url {index}")
    assert rep["findings"] == [{"level": "warning", "message": f.message, "fix": f.fix}]


def test_right_build_but_no_gpu_visible(monkeypatch):
    h = host(gpu_hints=["nvidia-smi"], user_env={"CUDA_VISIBLE_DEVICES": ""})
    _, _, findings, _ = run(monkeypatch, fake_torch(cuda="12.8"), h)
    [f] = findings
    assert "sees no GPU" in f.message and "CUDA_VISIBLE_DEVICES" in f.message


def test_fp16_requested_on_bf16_hardware(monkeypatch):
    torch = fake_torch(cuda="12.8", gpus=[gpu("NVIDIA A100", 80, (8, 0))], arch_list=CUDA_ARCHS)
    _, policy, findings, _ = run(monkeypatch, torch, overrides={"train_dtype": "float16", "eval_dtype": None})
    assert policy.train_dtype == "float16" and policy.loss_scaling is True and policy.eval_dtype == "bfloat16"
    assert policy.reasons["train_dtype"] == "set by user (automatic: bfloat16)"
    [f] = findings
    assert "train_dtype float16 on a device with bf16" in f.message and "bfloat16" in f.fix
    # on a V100 fp16 is the right call: nothing to warn about
    v100 = fake_torch(cuda="12.8", gpus=[gpu("V100", 32, (7, 0))], arch_list=["sm_70"])
    assert run(monkeypatch, v100, overrides={"train_dtype": "float16"})[2] == []


def test_flash_attention_only_in_16_bit(monkeypatch):
    _, policy, *_ = run(monkeypatch, fake_torch(**cuda("A100", 80, (8, 0))), extras=FA, overrides={"eval_dtype": "float32"})
    assert policy.attn_implementation == "sdpa" and "fp32" in policy.reasons["attn_implementation"]


def test_overrides_are_validated(monkeypatch):
    monkeypatch.setattr(hw, "probe_extras", lambda kind: dict(NO_EXTRAS))
    info = hw.detect(fake_torch(), host())
    with pytest.raises(MedtuneError, match="valid: train_dtype, eval_dtype, attn_implementation"):
        hw.decide(info, {"dtype": "float16"})
    with pytest.raises(MedtuneError, match="'fp16' is not one of bfloat16, float16, float32"):
        hw.decide(info, {"train_dtype": "fp16"})
    policy = hw.decide(info, {"attn_implementation": "eager"})
    assert policy.attn_implementation == "eager" and policy.reasons["attn_implementation"].startswith("set by user")


def test_flash_attention_forced_without_flash_attn(monkeypatch):
    torch = fake_torch(cuda="12.8", gpus=[gpu("H100", 80, (9, 0))], arch_list=CUDA_ARCHS)
    _, _, findings, _ = run(monkeypatch, torch, overrides={"attn_implementation": "flash_attention_2"})
    assert [f.message for f in findings if "flash_attention_2" in f.message]


@pytest.mark.parametrize(
    "torch_kw,backend,available,level",
    [
        (rocm("MI300X", 192, "gfx942"), None, False, "warning"),  # installed, but its NF4 test failed on the GPU
        (rocm("MI300X", 192, "gfx942"), "ROCm", True, None),
        (cuda("A100", 80, (8, 0)), "CUDA", True, None),
        ({}, "CPU", True, None),  # bitsandbytes >= 0.49 on an x86-64 CPU with AVX2
        ({}, None, False, "info"),
        ({"mps_bf16": True}, None, False, "info"),
    ],
)
def test_bitsandbytes_backend(monkeypatch, torch_kw, backend, available, level):
    extras = {"bitsandbytes": "0.50.2", "bnb_backend": backend, "bnb_error": None if backend else "RuntimeError: x"}
    _, policy, findings, _ = run(monkeypatch, fake_torch(**torch_kw), extras=extras)
    assert policy.qlora_available is available
    bnb = [f for f in findings if "bitsandbytes" in f.message]
    assert [f.level for f in bnb] == ([level] if level else [])
    if not available and "mps_bf16" not in torch_kw:
        assert "RuntimeError: x" in policy.reasons["qlora_available"]  # the probe's own error, not a guess


def test_quantize_warnings_and_memory(monkeypatch):
    t4 = fake_torch(cuda="12.8", gpus=[gpu("Tesla T4", 16, (7, 5))], arch_list=CUDA_ARCHS)
    monkeypatch.setattr(hw, "probe_extras", lambda kind: dict(NO_EXTRAS))
    info = hw.detect(t4, host())
    policy = hw.decide(info)
    [f] = [f for f in dr.doctor(info, policy, quantize="4bit") if "bitsandbytes" in f.message]
    assert f.level == "warning" and "medtune[qlora]" in f.fix
    # 7B in fp16 doesn't fit a 16 GiB T4; in 4-bit it does
    assert dr.doctor(info, policy, 7 * 10**9, 256)[-1].level == "warning"
    assert dr.doctor(info, policy, 7 * 10**9, 256, quantize="4bit")[-1].level == "info"
    assert dr.estimate_memory(10**9, 0, "bfloat16", "4bit") < dr.estimate_memory(10**9, 0, "bfloat16", "8bit") \
        < dr.estimate_memory(10**9, 0, "bfloat16")


def test_bnb_probe_on_this_machine():
    """The probe `medtune env` trusts: a real NF4 round trip through bitsandbytes, or the exact error."""
    pytest.importorskip("bitsandbytes")
    info = hw.detect()
    backend, error = hw.bnb_probe(hw.device_string(info))
    assert (backend is None) is bool(error), (backend, error)  # a backend, or the reason there is none
    assert hw.decide(info).qlora_available is (backend is not None) or info.kind not in ("cpu", "cuda", "rocm")


def test_memory_estimate_and_what_fits(monkeypatch):
    t4 = fake_torch(cuda="12.8", gpus=[gpu("Tesla T4", 16, (7, 5))], arch_list=CUDA_ARCHS)
    findings = run(monkeypatch, t4, model_params=135_000_000, batch_tokens=2048)[2]
    [f] = findings
    assert f.level == "info" and "of 16.0 GiB on Tesla T4" in f.message
    _, _, findings, _ = run(monkeypatch, t4, model_params=3_000_000_000, batch_tokens=8192)
    [f] = findings
    assert f.level == "warning" and "16.0 GiB on Tesla T4" in f.message
    fits = int(f.fix.split("~")[1].split()[0])
    assert 0 < fits < 8192
    estimate = [dr.estimate_memory(3 * 10**9, tokens, "float16") for tokens in (fits, fits + 8)]
    assert estimate[0] <= 16 * GIB < estimate[1]
    _, _, findings, _ = run(monkeypatch, t4, model_params=70_000_000_000, batch_tokens=1024)
    assert "weights alone don't fit" in findings[0].fix and "fsdp.yaml" in findings[0].fix


def test_memory_formula():
    # 1B params in bf16, no tokens: 2 GB weights + 0.32 GB LoRA/optimizer, +10%, +1 GiB
    assert dr.estimate_memory(10**9, 0, "bfloat16") == int((2e9 + 0.32e9) * 1.1 + GIB)
    assert dr.estimate_memory(10**9, 1000, "float32") > dr.estimate_memory(10**9, 1000, "bfloat16")
    per_token = dr.estimate_memory(10**9, 1001, "bfloat16") - dr.estimate_memory(10**9, 1000, "bfloat16")
    assert per_token == pytest.approx(128 * 10**4.5 * 1.1, rel=1e-3)


def test_odd_hsa_override_on_native_arch(monkeypatch):
    torch = fake_torch(hip="6.4", gpus=[gpu("MI300X", 192, gcn="gfx942")], arch_list=ROCM_ARCHS)
    _, policy, findings, _ = run(monkeypatch, torch, host(user_env={"HSA_OVERRIDE_GFX_VERSION": "9.4.2"},
                                                          kfd_archs=["gfx942"]))
    assert policy.env == {}
    [f] = findings
    assert "gfx942 is compiled into this torch" in f.message and f.fix == "unset HSA_OVERRIDE_GFX_VERSION"
    rx = fake_torch(hip="6.4", gpus=[gpu("RX 6700 XT", 12, gcn="gfx1100")], arch_list=ROCM_ARCHS)
    _, _, findings, _ = run(monkeypatch, rx, host(user_env={"HSA_OVERRIDE_GFX_VERSION": "11.0.0"},
                                                  kfd_archs=["gfx1031"]))
    [f] = findings
    assert f.fix == "export HSA_OVERRIDE_GFX_VERSION=10.3.0"


@pytest.mark.parametrize("cap,arch_list,ok", [
    ((8, 6), ["sm_80"], True),  # sm_80 cubins run on sm86
    ((12, 0), ["sm_80", "sm_90"], False),  # Blackwell on an old build
    ((12, 0), ["sm_80", "compute_90"], True),  # PTX JIT
    ((9, 0), ["sm_90a"], True),
    ((10, 0), ["sm_90a"], False),
    ((7, 0), [], True),  # unknown list: no claim
])
def test_cuda_arch_compatibility(monkeypatch, cap, arch_list, ok):
    torch = fake_torch(cuda="12.8", gpus=[gpu("GPU", 24, cap)], arch_list=arch_list)
    _, _, findings, _ = run(monkeypatch, torch)
    assert (not any("no kernel image" in f.message for f in findings)) is ok


# --- the real machine and the import cost ---


def expected_kind() -> str:
    """What this machine is, asked of torch directly (the suite runs on CPU hosts and on GPU hosts)."""
    import torch

    if torch.cuda.is_available():
        return "rocm" if torch.version.hip else "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "xpu" if hasattr(torch, "xpu") and torch.xpu.is_available() else "cpu"


def test_detect_on_this_machine():
    info = hw.detect()
    kind = expected_kind()
    assert info.kind == kind and hw.device_string(info) == {"rocm": "cuda"}.get(kind, kind)
    assert info.cpu_count >= 1 and info.ram_bytes and info.ram_bytes > GIB
    assert info.torch_version.startswith("2.")
    assert (info.count > 0) is (kind != "cpu") and len(info.names) == len(info.memory)
    policy = hw.decide(info)
    rep = hw.report(info, policy, [])
    assert rep["versions"]["transformers"] and policy.train_dtype == hw.native_dtype(info)[0]
    # evaluation holds the weights in bf16 exactly where bf16 is native (hardware.native_bf16, the one decision)
    assert policy.eval_dtype == ("bfloat16" if info.bf16 else "float32")
    assert info.bf16 is hw.native_bf16(hw.device_string(info))
    if kind == "cpu":  # cpu-only: native bf16 decides the training dtype
        assert policy.train_dtype == ("bfloat16" if info.bf16 else "float32")
    json.dumps(rep)


def test_import_does_not_import_torch():
    code = "import sys, medtune.hardware; assert 'torch' not in sys.modules, 'torch imported'"
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=60)


# --- accelerate recipes ---

ACCELERATE = sorted((ROOT / "recipes" / "accelerate").glob("*.yaml"))


def test_accelerate_recipes_exist():
    names = {p.name for p in ACCELERATE}
    assert names == {"single-gpu.yaml", "multi-gpu-ddp.yaml", "fsdp.yaml", "deepspeed-zero2.yaml",
                     "deepspeed-zero3.yaml", "multi-node.yaml", "cpu-ddp.yaml"}


@pytest.mark.parametrize("path", ACCELERATE, ids=lambda p: p.name)
def test_accelerate_recipe_loads(path):
    from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
    from accelerate.utils import DistributedType

    config = load_config_from_file(str(path))  # what `accelerate launch --config_file` does
    assert isinstance(config, ClusterConfig)
    assert config.mixed_precision == "no"  # medtune's policy picks the dtype, not the launcher
    command = f"accelerate launch --config_file recipes/accelerate/{path.name} -m medtune train"
    assert f"{command} --config recipes/demo.yaml" in path.read_text()
    if path.name == "cpu-ddp.yaml":  # torchrun workers (MULTI_GPU) that pick the CPU: see the file's header
        assert config.distributed_type == DistributedType.MULTI_GPU and config.num_processes == 2 and config.use_cpu
        assert "ACCELERATE_USE_CPU=1 accelerate launch" in path.read_text()
    if path.name.startswith("deepspeed"):
        assert config.distributed_type == DistributedType.DEEPSPEED
        assert config.deepspeed_config["zero_stage"] == int(path.stem[-1])
    if path.name == "fsdp.yaml":
        assert config.distributed_type == DistributedType.FSDP and config.fsdp_config["fsdp_version"] == 2


# --- one entry point prepares the environment before any command can start a GPU runtime ---


class _DeviceTouched(Exception):
    pass


COMMAND_ARGS = {  # enough arguments for each command to reach its first device contact
    "env": ["env"], "eval": ["eval", "--data", "demo", "--limit", "2", "--set", "model={model}", "--out", "{out}"],
    "train": ["train", "--set", "model={model}", "--out", "{out}"],
    "run": ["run", "--set", "model={model}", "--out", "{out}"], "export": ["export", "{run}", "--out", "{out}"],
    "ask": ["ask", "--question", "Which?", "-o", "a", "-o", "b", "--model", "{model}"],
    "predict": ["predict", "demo", "--model", "{model}", "--out", "{out}.jsonl"],
    "serve": ["serve", "--model", "{model}"],
    "audit": ["audit", "--data", "demo", "--limit", "2", "--model", "{model}", "--out", "{out}"],
}
SOMETIMES_DEVICE = {"cost", "report"}  # prepared too; they reach a device only on some paths (detect, --explain)


def test_every_command_is_prepared_or_exempt():
    """A new command gets the environment preparation by default; this keeps the order test below complete."""
    import typer.main

    from medtune import cli

    commands = set(typer.main.get_group(cli.app).commands)
    assert commands - cli.NO_DEVICE - SOMETIMES_DEVICE == set(COMMAND_ARGS), "add the new command to COMMAND_ARGS"


@pytest.mark.parametrize("command", sorted(COMMAND_ARGS))
def test_every_device_command_prepares_env_before_the_runtime_starts(monkeypatch, tmp_path, tiny_model_dir, command):
    """A fake ROCm torch on an RX 6700 XT (gfx1031, needs HSA_OVERRIDE_GFX_VERSION=10.3.0): the variable must be set
    when the command first reaches anything that starts HIP (detect, torch.cuda, a model load)."""
    import torch
    from typer.testing import CliRunner

    from medtune import cli, models

    run_dir = tmp_path / "run"
    if command == "export":  # a real (untrained) adapter, so export's own checks pass and it goes on to load the base
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM

        lora = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), LoraConfig(r=2))
        lora.save_pretrained(run_dir / "adapter")
        (run_dir / "adapter" / "medtune.json").write_text(json.dumps({"base_model": tiny_model_dir,
                                                                      "prompt_style": "harness"}))
    monkeypatch.setattr(hw, "SET_BY_MEDTUNE", {})
    monkeypatch.delenv("HSA_OVERRIDE_GFX_VERSION", raising=False)
    events: list = []
    real_prepare = hw.prepare_env

    def prepare(torch=None, host_=None):
        events.append("prepare")
        return real_prepare(fake_torch(hip="6.4", arch_list=ROCM_ARCHS), host(kfd_archs=["gfx1031"]))

    def touch(what):
        def fn(*a, **k):
            events.append((what, os.environ.get("HSA_OVERRIDE_GFX_VERSION")))
            raise _DeviceTouched(what)
        return fn

    monkeypatch.setattr(hw, "prepare_env", prepare)
    monkeypatch.setattr(hw, "detect", touch("detect"))
    monkeypatch.setattr(models, "resolve", touch("model load"))
    monkeypatch.setattr(torch.cuda, "is_available", touch("torch.cuda"))
    args = [a.format(model=tiny_model_dir, out=tmp_path / "out", run=run_dir) for a in COMMAND_ARGS[command]]
    result = CliRunner().invoke(cli.app, args)
    assert isinstance(result.exception, _DeviceTouched), (result.output, result.exception)
    assert events[0] == "prepare", events
    touched = [e for e in events if e != "prepare"]
    assert touched and touched[0][1] == "10.3.0", events  # the override was in place at the first device contact


def test_preflight_passes_the_training_dtype_and_model_size(monkeypatch, tiny_model_dir):
    """The two warnings `env` alone can't give: fp16 asked for where bf16 exists, and a model too large for memory."""
    from medtune.config import load_config

    monkeypatch.setattr(hw, "probe_extras", lambda kind: dict(NO_EXTRAS))
    monkeypatch.setattr(dr, "SHOWN_WARNINGS", set())
    a100 = hw.detect(fake_torch(cuda="12.8", gpus=[gpu("A100", 1, (8, 0))], arch_list=CUDA_ARCHS), host())
    cfg = load_config(None, [f"model={tiny_model_dir}", "train.dtype=float16", "train.batch_size=64",
                             "train.max_length=512"])
    assert dr.model_params(tiny_model_dir) == sum(
        p.numel() for p in __import__("transformers").AutoModelForCausalLM.from_pretrained(tiny_model_dir).parameters())
    lines: list[str] = []
    findings = dr.preflight(cfg, lines.append, a100)
    assert any("train_dtype float16 on a device with bf16" in m for m in lines), lines
    assert any("needed but 1.0 GiB on A100" in m for m in lines), lines  # 1 GiB card: the memory check fires
    assert [f.level for f in findings].count("warning") == len(lines) == 2
    dr.preflight(cfg, lines.append, a100)
    assert len(lines) == 2  # `run` calls it before its base evaluation and again in train: printed once
