"""Issue 18: a GGUF header is checked before transformers allocates anything from it (src/medtune/gguf_check.py)."""

import struct
import time

import numpy as np
import pytest

from medtune.errors import MedtuneError
from medtune.gguf_check import check_gguf


def write_gguf(path, blocks: int = 2, claimed_blocks: int | None = None, width: int = 8, claimed_width=None,
               skip: int | None = None):
    """A tiny llama-shaped GGUF: token embedding plus `blocks` blocks of two tensors each."""
    import gguf

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(blocks if claimed_blocks is None else claimed_blocks)
    w.add_embedding_length(width if claimed_width is None else claimed_width)
    w.add_context_length(64)
    w.add_tensor("token_embd.weight", np.zeros((16, width), dtype=np.float32))
    for i in range(blocks + (skip is not None)):
        if i != skip:
            w.add_tensor(f"blk.{i}.attn_q.weight", np.ones((width, width), dtype=np.float32))
            w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(width, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_a_consistent_gguf_passes(tmp_path):
    check_gguf(write_gguf(tmp_path / "ok.gguf"))


def test_the_embedded_model_gguf_passes():
    from medtune.models import embedded_gguf

    path = embedded_gguf()
    if path is None:
        pytest.skip("the embedded GGUF is not installed")
    started = time.monotonic()
    check_gguf(path)
    assert time.monotonic() - started < 5  # the header only: no tensor is read


@pytest.mark.parametrize("make, expected", [
    (lambda p: write_gguf(p, claimed_blocks=10**6), "llama.block_count is 1000000 but the file holds tensors for 2"),
    (lambda p: write_gguf(p, claimed_blocks=1), "llama.block_count is 1 but"),
    (lambda p: write_gguf(p, skip=1), "skip numbers (no blk.1"),
    (lambda p: write_gguf(p, claimed_width=4096), "embedding_length is 4096 but token_embd.weight is 8 wide"),
])
def test_a_header_that_disagrees_with_its_tensors_is_refused(tmp_path, make, expected):
    path = make(tmp_path / "bad.gguf")
    with pytest.raises(MedtuneError, match="refusing to load it") as e:
        check_gguf(path)
    assert str(path) in str(e.value) and expected in str(e.value) and "\n" not in str(e.value)


def test_a_truncated_gguf_is_refused(tmp_path):
    path = write_gguf(tmp_path / "t.gguf", width=64)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 1000])
    with pytest.raises(MedtuneError, match=r"t.gguf: (tensor blk\.1\.\S+ .* past the end of the file|its header does "
                                           r"not parse)"):
        check_gguf(path)
    path.write_bytes(data[:200])  # cut inside the metadata
    with pytest.raises(MedtuneError, match=r"t.gguf: "):
        check_gguf(path)


def test_a_header_claiming_more_entries_than_bytes_is_refused_without_parsing(tmp_path):
    path = tmp_path / "huge.gguf"
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 10**12, 10**12) + b"\0" * 100)
    with pytest.raises(MedtuneError, match=r"claims 1000000000000 tensors and 1000000000000 metadata keys"):
        check_gguf(path)


@pytest.mark.parametrize("data, expected", [(b"not a gguf at all" * 4, "not a GGUF file"),
                                            (b"GG", "not a GGUF file"),
                                            (b"GGUF" + struct.pack("<IQQ", 99, 0, 0), "version 99")])
def test_not_gguf_is_refused(tmp_path, data, expected):
    (tmp_path / "x.gguf").write_bytes(data)
    with pytest.raises(MedtuneError, match=expected):
        check_gguf(tmp_path / "x.gguf")


def test_eval_on_a_gguf_claiming_a_million_blocks_is_one_line(tmp_path):
    """Through the CLI: the check runs in models.resolve, before transformers reads the file."""
    import inspect
    import json

    from typer.testing import CliRunner

    from medtune import models
    from medtune.cli import app

    if "check_gguf" not in inspect.getsource(models.resolve):  # without it, transformers allocates 10^6 layers
        pytest.skip("models.resolve does not call gguf_check.check_gguf yet")
    path = write_gguf(tmp_path / "x.gguf", claimed_blocks=10**6)
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"id": "q1", "question": "Q?", "options": ["a", "b"], "answer": 0}) + "\n")
    started = time.monotonic()
    result = CliRunner().invoke(app, ["eval", "--model", str(path), "--data", str(data), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "block_count is 1000000" in errors[0] and str(path) in errors[0]
    assert time.monotonic() - started < 30 and not (tmp_path / "o").exists()
