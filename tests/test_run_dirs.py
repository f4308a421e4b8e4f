"""A run directory belongs to one run (issue 18, class 3): an exclusive lock on --out for the command's life, no
symlink followed out of --out, and --overwrite builds the new run beside the old and swaps it in at the end, so a
failed overwrite (an error, Ctrl-C, a full disk) leaves the old run whole and a successful one keeps nothing of it."""

import errno
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from medtune import io
from medtune.cli import app
from medtune.errors import MedtuneError, TrainingInterrupted

ROOT = Path(__file__).resolve().parents[1]
DEMO = {"id": "q1", "question": "Which organ pumps blood?", "options": ["Heart", "Lung", "Liver", "Skin"], "answer": 0}
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
       "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
HOLD = """
import sys
from medtune import io
with io.claim_out_dir(sys.argv[1]):
    print("held", flush=True)
    sys.stdin.read()  # until the test closes stdin
"""
runner = CliRunner()


def rows(n: int) -> list[dict]:
    return [{**DEMO, "id": f"q{i}", "answer": i % 4} for i in range(n)]


def jsonl(path: Path, items: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in items))
    return path


def snapshot(d: Path) -> dict:
    return {str(p.relative_to(d)): p.read_bytes() if p.is_file() else "dir" for p in sorted(d.rglob("*"))}


def beside(d: Path) -> list[str]:
    """What medtune left next to the run dir: temp, moved-aside and lock files."""
    return sorted(p.name for p in d.parent.iterdir() if p.name.startswith(f".{d.name}."))


@pytest.fixture
def holder(tmp_path):
    """Another process holding --out (tmp_path/out) the way a running command does."""
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=ENV)
    assert proc.stdout.readline().strip() == "held", proc.stderr.read()
    yield out, proc
    proc.stdin.close()
    assert proc.wait(timeout=30) == 0, proc.stderr.read()


def test_a_second_process_on_the_same_out_exits_2_with_one_line(holder, tmp_path):
    out, proc = holder
    data = jsonl(tmp_path / "items.jsonl", rows(8))
    done = subprocess.run([sys.executable, "-m", "medtune", "data", "split", str(data), "--train-size", "4", "--out",
                           str(out)], check=False, capture_output=True, text=True, env=ENV, timeout=120)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == [
        (f"error: --out {out}: is in use by another medtune process (pid {proc.pid}); wait for it to finish or use "
         "another --out")]
    assert not (out / "train.jsonl").exists()
    # train --resume takes the same lock (checked in this process: flock locks conflict across open files too)
    with pytest.raises(MedtuneError, match=f"in use by another medtune process \\(pid {proc.pid}\\)"), \
            io.claim_out_dir(out, allow_existing=True):
        pass


def test_lock_is_released_and_leaves_no_file(tmp_path):
    out = tmp_path / "out"
    with io.claim_out_dir(out) as dest:
        assert dest == out and beside(out) == [".out.lock"]
        with pytest.raises(MedtuneError, match="in use by another medtune process"), io.out_dir_lock(out):
            pass
        (dest / "results.json").write_text("{}")
    assert beside(out) == []
    with io.claim_out_dir(out, overwrite=True) as dest:  # free again
        assert dest == tmp_path / f".out.new-{os.getpid()}"


@pytest.mark.parametrize("link", ["checkpoints", "adapter", "base", "tuned"])
def test_overwrite_and_resume_never_follow_a_symlink_out_of_out(tmp_path, link):
    other = tmp_path / "other-run"
    (other / "step-0000001").mkdir(parents=True)
    (other / "step-0000001" / "state.json").write_text("{}")
    before = snapshot(other)
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.json").write_text("{}")
    (out / link).symlink_to(other, target_is_directory=True)
    for kwargs in ({"overwrite": True}, {"allow_existing": True}):
        with pytest.raises(MedtuneError, match=f"holds symlinks \\({link}\\); medtune never replaces or writes "
                                               "through a link"), io.claim_out_dir(out, **kwargs):
            pass
    result = runner.invoke(app, ["train", "--set", "model=embedded", "--out", str(out), "--overwrite"])
    assert result.exit_code == 2 and "holds symlinks" in result.output and "Traceback" not in result.output
    assert snapshot(other) == before and (out / link).is_symlink()


def test_overwrite_refuses_a_symlinked_out_and_swap_never_deletes_through_a_link(tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    (real / "results.json").write_text("{}")
    link = tmp_path / "link"
    link.symlink_to(real, target_is_directory=True)
    with pytest.raises(MedtuneError, match="is a symlink"), io.claim_out_dir(link, overwrite=True):
        pass
    # replace_dir (atomic_dir, export) moves an old symlink aside as a link: its target is kept
    new = tmp_path / "new"
    new.mkdir()
    io.replace_dir(new, link)
    assert link.is_dir() and not link.is_symlink() and (real / "results.json").is_file()


def test_failed_overwrite_keeps_the_old_run_whole_and_a_good_one_keeps_nothing_of_it(tmp_path):
    out = tmp_path / "out"
    (out / "tuned-generate").mkdir(parents=True)
    (out / "results.json").write_text('{"old": true}')
    (out / "tuned-generate" / "predictions.jsonl").write_text('{"id": "q1", "explanation": "STALE"}\n')
    old = snapshot(out)
    for failure in (RuntimeError("boom"), KeyboardInterrupt(), OSError(errno.ENOSPC, "No space left on device")):
        with pytest.raises(type(failure)), io.claim_out_dir(out, overwrite=True) as dest:
            assert dest != out and dest.parent == out.parent
            (dest / "results.json").write_text('{"new": true}')
            raise failure
        assert snapshot(out) == old and beside(out) == []
    with io.claim_out_dir(out, overwrite=True) as dest:
        (dest / "results.json").write_text('{"new": true}')
    assert snapshot(out) == {"results.json": b'{"new": true}'} and beside(out) == []


def test_an_interrupted_training_overwrite_is_swapped_in_for_resume(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "metrics.jsonl").write_text("old\n")
    with pytest.raises(TrainingInterrupted) as caught, io.claim_out_dir(out, overwrite=True, resumable=True) as dest:
        (dest / "checkpoints").mkdir()
        raise TrainingInterrupted(f"stopped; resume with `medtune train --resume --out {dest}`", 143)
    assert str(caught.value) == f"stopped; resume with `medtune train --resume --out {out}`"
    assert caught.value.exit_code == 143
    assert sorted(p.name for p in out.iterdir()) == ["checkpoints"] and beside(out) == []
    with io.claim_out_dir(out, allow_existing=True) as dest:  # --resume continues in place
        assert dest == out


def test_leftovers_of_a_killed_swap_are_cleared_under_the_lock(tmp_path):
    out = tmp_path / "out"
    (tmp_path / ".out.new-99999").mkdir()  # a half-built new run
    (tmp_path / ".out.old-99999").mkdir()  # the old run, moved aside just before the kill
    (tmp_path / ".out.old-99999" / "results.json").write_text("{}")
    with pytest.raises(MedtuneError, match="not empty"), io.claim_out_dir(out):
        pass  # the old run is put back, so it is not silently overwritten
    assert (out / "results.json").is_file() and beside(out) == []


def test_overwrite_of_the_current_directory_is_refused(tmp_path, monkeypatch):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "results.json").write_text("{}")
    monkeypatch.chdir(tmp_path / "run")
    for out in (Path("."), tmp_path):
        with pytest.raises(MedtuneError, match="is the current directory"), io.claim_out_dir(out, overwrite=True):
            pass
    with io.claim_out_dir(Path("."), allow_existing=True) as dest:  # in place (train --resume) is fine
        assert dest == Path(".")
    assert (tmp_path / "run" / "results.json").is_file() and beside(tmp_path / "run") == []


def test_eval_overwrite_on_a_full_disk_leaves_the_old_run_whole(tiny_model_dir, tmp_path, monkeypatch):
    data = jsonl(tmp_path / "items.jsonl", rows(6))
    out = tmp_path / "out"
    args = ["eval", "--model", tiny_model_dir, "--data", str(data), "--out", str(out), "--quiet", "--set", "device=cpu"]
    assert runner.invoke(app, args).exit_code == 0
    (out / "extra").mkdir()
    (out / "extra" / "cost.json").write_text("{}")
    old = snapshot(out)
    real = io.write_bytes

    def full(path, data):
        if Path(path).name == "results.json":  # predictions.jsonl went in; then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(path, data)

    monkeypatch.setattr(io, "write_bytes", full)
    result = runner.invoke(app, [*args, "--overwrite"])
    assert result.exit_code == 2 and [x for x in result.output.splitlines() if x.startswith("error:")], result.output
    assert snapshot(out) == old and beside(out) == []  # byte-identical results.json and predictions.jsonl
    monkeypatch.setattr(io, "write_bytes", real)
    assert runner.invoke(app, [*args, "--overwrite"]).exit_code == 0
    assert not (out / "extra").exists() and beside(out) == []  # nothing of the old run is kept


@pytest.mark.slow  # two evals of the tiny model in two processes: ~15 s on 2 shared cores
def test_two_evals_started_at_once_one_succeeds_the_other_exits_2(tiny_model_dir, tmp_path):
    data = jsonl(tmp_path / "items.jsonl", rows(6))
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "medtune", "eval", "--model", tiny_model_dir, "--data", str(data), "--out", str(out),
           "--quiet", "--set", "device=cpu"]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
             for _ in range(2)]
    done = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    assert sorted(code for code, _ in done) == [0, 2], done
    err = next(e for code, e in done if code == 2).strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: --out {out}: "), err
    assert "in use by another medtune process" in err[0] or "already exists and is not empty" in err[0]
    assert json.loads((out / "results.json").read_text())["metrics"]["n"] == 6 and beside(out) == []


@pytest.mark.slow  # a whole `medtune run` (2 training steps) twice on the tiny model: ~30 s
def test_run_overwrite_neither_reads_nor_keeps_a_stale_generate_dir_or_cost(tiny_model_dir, tmp_path):
    from medtune import cost

    out = tmp_path / "run"
    (out / "tuned-generate").mkdir(parents=True)
    (out / "tuned-generate" / "predictions.jsonl").write_text(
        "".join(json.dumps({"id": f"demo-{i}", "pred": "A", "explanation": "STALE EXPLANATION"}) + "\n"
                for i in range(200)))
    (out / "extra").mkdir()
    (out / "extra" / "cost.json").write_text(json.dumps({"kind": "eval", "wall_s": 1e6, "device_kind": "cpu",
                                                         "device_name": "x", "device_count": 1}))
    (out / "results.json").write_text("{}")
    started = time.time()
    result = runner.invoke(app, [
        "run", "--config", str(ROOT / "recipes" / "demo.yaml"), "--model", tiny_model_dir, "--out", str(out),
        "--set", "train.max_steps=2", "--set", "train.dtype=float32", "--set", "data.limit=6", "--set",
        "device=cpu", "--quiet", "--overwrite"])
    assert result.exit_code == 0, result.output
    assert not (out / "tuned-generate").exists() and not (out / "extra").exists() and beside(out) == []
    assert "STALE EXPLANATION" not in (out / "report.html").read_text()
    spent = cost.collect(out)
    assert "extra" not in spent["parts"] and spent["wall_s"] < time.time() - started + 1
    res = json.loads((out / "results.json").read_text())
    assert res["kind"] == "run" and f"report: {out / 'report.html'}" in result.output


@pytest.mark.slow  # `accelerate launch` of two gloo ranks on the CPU: ~50 s
def test_two_ranks_of_one_launch_share_the_lock_and_swap_once(tiny_model_dir, tmp_path):
    import socket

    data = jsonl(tmp_path / "train.jsonl", rows(32))
    out = tmp_path / "ddp"
    (out / "stale").mkdir(parents=True)
    (out / "results.json").write_text("{}")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    values = {"model": tiny_model_dir, "device": "cpu", "data.source": data, "data.train_size": 16,
              "train.batch_size": 2, "train.max_steps": 2, "train.dtype": "float32", "train.max_length": 128}
    done = subprocess.run([sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch", "--config_file",
                           str(ROOT / "recipes" / "accelerate" / "cpu-ddp.yaml"), "--main_process_port", str(port),
                           "-m", "medtune", "train", *[a for k, v in values.items() for a in ("--set", f"{k}={v}")],
                           "--out", str(out), "--quiet", "--overwrite"], check=False, capture_output=True, text=True,
                          timeout=900, cwd=ROOT, env={**ENV, "ACCELERATE_USE_CPU": "1"})
    assert done.returncode == 0, done.stderr[-5000:]
    assert (out / "adapter" / "adapter_model.safetensors").is_file() and not (out / "stale").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ddp", "train.jsonl"]  # no lock, temp or old dir left


def test_overwrite_never_deletes_the_commands_own_inputs(tmp_path, tiny_model_dir, monkeypatch):
    """--overwrite replaces --out as a whole, so an --out that holds the data, the model or the adapter is refused in
    one line and nothing is touched (a hostile probe deleted its input data and model this way)."""
    import shutil

    from typer.testing import CliRunner

    from medtune.cli import app

    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    shutil.copytree(tiny_model_dir, out / "model")
    data = out / "data.jsonl"
    data.write_text("".join(f'{{"id": "q{i}", "question": "Which {i}?", "options": ["a", "b"], "answer": 0}}\n'
                            for i in range(8)))
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    for args in (["--model", str(out / "model"), "--data", "demo"], ["--model", tiny_model_dir, "--data", str(data)]):
        result = CliRunner().invoke(app, ["eval", *args, "--limit", "1", "--out", str(out), "--overwrite"])
        assert result.exit_code == 2 and "holds this command's input" in result.output, result.output
    result = CliRunner().invoke(app, ["train", "--out", str(out), "--overwrite", "--set", f"data.source={data}",
                                      "--set", f"model={tiny_model_dir}", "--set", "train.max_steps=1"])
    assert result.exit_code == 2 and "holds this command's input" in result.output, result.output
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before
