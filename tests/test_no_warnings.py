"""`medtune eval` prints no FutureWarning or deprecation warning: the answer-line scorer passes its KV cache as
`cache=` (transformers 5), and attaching a PEFT adapter hides peft 0.21's read of a deprecated attribute."""

import os
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_eval_with_adapter_and_answer_lines_prints_no_warning(tiny_model_dir, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), LoraConfig(r=2, target_modules=["q_proj"])
                   ).save_pretrained(tmp_path / "adapter")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}  # what a user sees: Python's defaults
    env["HF_HUB_OFFLINE"] = "1"
    result = subprocess.run([sys.executable, "-m", "medtune", "eval", "--model", tiny_model_dir, "--adapter",
                             str(tmp_path / "adapter"), "--data", "demo", "--limit", "4", "--method", "answer",
                             "--permute", "cyclic", "--out", str(tmp_path / "out"), "--quiet"],
                            capture_output=True, text=True, env=env, check=False)
    assert result.returncode == 0, result.stderr
    assert "Warning" not in result.stderr and "deprecated" not in result.stderr, result.stderr
