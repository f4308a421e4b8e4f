import json
import logging
import sys
from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


class _CurrentStderr:
    """transformers' log handler keeps the stderr it was created with; under CliRunner that is one invocation's
    capture, closed afterwards, and a later warning prints "--- Logging error --- Traceback" into another test's
    output. Writing to whatever sys.stderr is now keeps each invocation's output its own (a terminal never changes)."""

    def write(self, text):
        return sys.stderr.write(text)

    def flush(self):
        sys.stderr.flush()


@pytest.fixture(autouse=True, scope="session")
def _library_logs_follow_stderr():
    from transformers.utils import logging as hf_logging

    hf_logging.get_logger("transformers")  # creates transformers' handler now
    for handler in logging.getLogger("transformers").handlers:
        if isinstance(handler, logging.StreamHandler):
            handler.setStream(_CurrentStderr())
    yield


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.fixture(scope="session")
def tokenizer_dir() -> str:
    """The embedded model's directory (converted once into the cache); its tokenizer serves the tiny models."""
    from medtune.models import resolve

    return resolve("embedded", log=lambda *_: None)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer_dir) -> str:
    """A tiny random Llama with the embedded model's tokenizer, built from config (offline, seconds)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                         tie_word_embeddings=True, initializer_range=0.3)  # logits large enough to learn
    out = tmp_path_factory.mktemp("tiny")
    LlamaForCausalLM(config).save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


@pytest.fixture
def shared_data() -> Path:
    if not (SHARED / "medqa" / "test.jsonl").is_file():
        pytest.skip("../shared/data is not beside the checkout")
    return SHARED
