"""The DeepSpeed recipes as accelerate reads them: `accelerate launch`'s own parsing turns each yaml into the worker
environment, accelerate's DeepSpeedPlugin builds the DeepSpeed config from it, and medtune's loop fills what it would
otherwise fail on. DeepSpeed itself is not installed here (no GPU; accelerate's launcher needs it to start workers),
so no ZeRO step has run: the yaml headers say so."""

import os
from pathlib import Path
from types import SimpleNamespace

import pytest

from medtune.train import fill_deepspeed

ROOT = Path(__file__).resolve().parents[1]


def plugin_for(name: str, monkeypatch, grad_accum: int):
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils import DeepSpeedPlugin
    from accelerate.utils.launch import prepare_deepspeed_cmd_env

    path = ROOT / "recipes" / "accelerate" / f"{name}.yaml"
    args = launch_command_parser().parse_args(["--config_file", str(path), "-m", "medtune", "train"])
    args, defaults, _ = _validate_launch_command(args)  # unknown or invalid keys raise here
    assert args.use_deepspeed and not args.cpu
    args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)  # as launch_command does
    _, env = prepare_deepspeed_cmd_env(args)
    for key in [k for k in os.environ if k.startswith("ACCELERATE_")]:
        monkeypatch.delenv(key)
    for key, value in env.items():
        if key.startswith("ACCELERATE_"):
            monkeypatch.setenv(key, value)
    return DeepSpeedPlugin(gradient_accumulation_steps=grad_accum)  # what each worker's Accelerator builds


@pytest.mark.parametrize("name,stage", [("deepspeed-zero2", 2), ("deepspeed-zero3", 3)])
def test_deepspeed_recipes_load_and_validate(monkeypatch, name, stage):
    plugin = plugin_for(name, monkeypatch, grad_accum=4)
    ds = plugin.deepspeed_config
    assert ds["zero_optimization"]["stage"] == stage
    assert ds["gradient_accumulation_steps"] == 4  # one ZeRO optimizer step per medtune step, not per micro-batch
    if stage == 3:  # accelerate.get_state_dict gathers ZeRO-3 shards only with this set; else it raises at save
        assert ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
        assert plugin.zero3_init_flag
    fill_deepspeed(SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=plugin)), batch_size=8)
    assert ds["train_micro_batch_size_per_gpu"] == 8  # prepare() raises on `auto` without a DataLoader
    assert ds["gradient_clipping"] == 0.0  # no clipping, as without DeepSpeed
    fill_deepspeed(SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=None)), batch_size=8)  # no-op elsewhere


# --- resume and interrupts under FSDP / DeepSpeed: refused, and said truthfully ---------------------------------------
# medtune writes no checkpoints there (the optimizer state is sharded, and gathering it whole would need
# torch.distributed.checkpoint or DeepSpeed's own pickled files): `--resume` is refused in one line before any weights
# load, and SIGTERM says that nothing was written.

@pytest.mark.parametrize("backend", ["DEEPSPEED", "FSDP"])
def test_resume_is_refused_under_sharded_backends(backend):
    from accelerate.utils import DistributedType

    from medtune.checkpoint import check_launch
    from medtune.errors import MedtuneError

    acc = SimpleNamespace(distributed_type=getattr(DistributedType, backend), num_processes=2)
    with pytest.raises(MedtuneError, match=r"^--resume: medtune writes no checkpoints under FSDP/DeepSpeed.*without "
                                           r"--resume.*DDP") as e:
        check_launch(acc, None, resume=True)
    assert "\n" not in str(e.value)
    check_launch(acc, None, resume=False)  # a fresh run is fine


@pytest.mark.parametrize("backend", ["DEEPSPEED", "FSDP"])
def test_sigterm_under_sharded_backends_says_no_checkpoint_was_written(backend, tmp_path):
    import signal

    from accelerate.utils import DistributedType

    from medtune.errors import TrainingInterrupted
    from medtune.train import TrainRun

    acc = SimpleNamespace(distributed_type=getattr(DistributedType, backend), num_processes=1, is_main_process=True)
    run = TrainRun(acc, None, None, None, None, tmp_path, 10, lambda *_: None)
    run.step = 3
    with pytest.raises(TrainingInterrupted, match=r"^SIGTERM at step 3 of 10: no checkpoint is written under "
                                                  r"FSDP/DeepSpeed, so the run must start again") as e:
        run.interrupt(signal.SIGTERM)
    assert e.value.exit_code == 128 + signal.SIGTERM and "checkpoint written" not in str(e.value)
    assert not (tmp_path / "checkpoints").exists()
