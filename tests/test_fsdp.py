"""FSDP on the CPU, two gloo processes: the sharded LoRA run equals the single-process run, and the adapter save path
(the full state dict accelerate's `get_state_dict` gathers for FSDP2, then medtune's `save_adapter`) writes whole
tensors, not each rank's shard.

accelerate 1.15 cannot drive FSDP on a CPU: with `ACCELERATE_USE_CPU=1` its workers become MULTI_CPU (gloo), and
accelerate switches to FSDP only from the MULTI_GPU/NPU/XPU/... types (accelerate/state.py, AcceleratorState), so
`accelerate launch --config_file recipes/accelerate/fsdp.yaml` trains as plain DDP there. torch itself shards on the
CPU, so this test applies `fully_shard` (FSDP2, what fsdp.yaml selects) per decoder layer as accelerate would, runs
medtune's loss and normalization, and saves through the same calls `train()` makes.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_ddp import free_port

ROOT = Path(__file__).resolve().parents[1]
WORKER = r'''
import json, sys
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from medtune import batches
from medtune import train as T
from medtune.config import load_config
from test_train import items

model_dir, out = sys.argv[1], sys.argv[2]
acc = Accelerator(cpu=True)  # under torchrun: MULTI_CPU, gloo process group
world, rank = acc.num_processes, acc.process_index
cfg = load_config(None, [f"model={model_dir}", "train.dtype=float32", f"train.batch_size={4 // world}",
                         "train.max_length=128", "lora.r=4", "lora.alpha=8", "train.group_by_length=false"])
set_seed(7)
model, tok = T.lora_model(cfg, acc, print)
if world > 1:
    for layer in model.base_model.model.model.layers:  # the transformer block is the shard unit (fsdp.yaml)
        fully_shard(layer)
    fully_shard(model)
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
data = items(12)
for step in batches.batch_plan(data, cfg, tok, world)[:3]:
    total = sum(len(ex.input_ids) - max(ex.prompt_len, 1) for b in step for ex in b)
    for b in step:
        ids, mask, labels = batches.collate(b[rank::world], tok.pad_token_id, "cpu")
        (T.completion_loss_sum(model, ids, mask, labels, batches.first_target(b[rank::world])) * world / total).backward()
    opt.step()
    opt.zero_grad()
lora = {k: v for k, v in model.state_dict().items() if "lora_" in k}
sharded = all(isinstance(v, DTensor) and v.to_local().shape != v.shape for v in lora.values())
state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True,
                                                              cpu_offload=True))  # accelerate.get_state_dict, FSDP2
if acc.is_main_process:
    T.save_adapter(model, state, tok, cfg, data, __import__("pathlib").Path(out), {"steps": 3}, None)
    print("RESULT " + json.dumps({"world": world, "sharded": sharded}))
acc.wait_for_everyone()
'''


def launch(nproc: int, model_dir: str, out: Path, script: Path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "ACCELERATE_USE_CPU": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
           str(free_port()), str(script), model_dir, str(out)]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))[7:])


@pytest.mark.slow  # two gloo processes plus a single-process reference on a tiny model: ~25 s
def test_fsdp2_cpu_adapter_matches_single_process(tiny_model_dir, tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    single = launch(1, tiny_model_dir, tmp_path / "single", script)
    fsdp = launch(2, tiny_model_dir, tmp_path / "fsdp", script)
    assert single == {"world": 1, "sharded": False} and fsdp == {"world": 2, "sharded": True}  # really sharded
    a = load_file(str(tmp_path / "fsdp" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "single" / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and a
    for k in a:  # whole tensors, and FSDP's averaged gradients gave the single-process update
        assert a[k].shape == b[k].shape, k
        assert torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6), (k, (a[k] - b[k]).abs().max())
    assert any("lora_B" in k and b[k].abs().sum() > 0 for k in b)  # the steps moved the adapter
