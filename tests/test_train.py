"""Training invariants on a tiny random model: label mask, only LoRA weights change, gradient accumulation equals the
larger batch, bitwise reproducibility, resume equals an uninterrupted run, option shuffling removes a letter prior."""

import json
import math
import random

import pytest
import torch
from safetensors.torch import load_file

from medtune import batches
from medtune import train as train_mod
from medtune.config import load_config
from medtune.data.items import MCQItem
from medtune.models import load_model, load_tokenizer
from medtune.prompts import build_prompt, build_target
from medtune.scoring import encode, score


def items(n=24, all_a=False, seed=0):
    rng = random.Random(seed)
    out = []
    for k in range(n):
        opts = [f"option {w}" for w in rng.sample(["red", "green", "blue", "cyan", "pink", "gray", "gold"], 4)]
        out.append(MCQItem(id=f"t{k}", question=f"Which colour is item {k}?", options=tuple(opts),
                           answer=0 if all_a else k % 4, explanation=f"Item {k} has that colour.", subject="s"))
    return out


def cfg_for(model_dir, out, **sets):
    base = {"model": model_dir, "device": "cpu", "out_dir": str(out), "train.dtype": "float32", "train.batch_size": 4,
            "train.max_steps": 3, "train.lr": 1e-3, "train.max_length": 128, "lora.r": 4, "lora.alpha": 8}
    return load_config(None, [f"{k}={v}" for k, v in {**base, **sets}.items()])


def adapter_tensors(out):
    return load_file(str(out / "adapter" / "adapter_model.safetensors"))


def test_label_mask_token_by_token(tiny_model_dir):
    cfg = cfg_for(tiny_model_dir, "unused")
    tok = load_tokenizer(tiny_model_dir, padding_side="right")
    item = items(1)[0]
    ex = batches.tokenize_example(item, cfg, tok)
    prompt = tok(build_prompt(item, "harness"), add_special_tokens=False).input_ids
    target = tok(build_target(item, "harness"), add_special_tokens=False).input_ids
    assert ex.input_ids == prompt + target + [tok.eos_token_id] and ex.prompt_len == len(prompt)
    short = batches.tokenize_example(items(2)[1], cfg, tok)
    ids, _, labels = batches.collate([ex, short], tok.pad_token_id, "cpu")
    for row, e in enumerate([ex, short]):
        for t in range(ids.shape[1]):
            if t < e.prompt_len or t >= len(e.input_ids):
                assert labels[row, t] == -100  # prompt and padding: no loss
            else:
                assert labels[row, t] == e.input_ids[t]
        assert labels[row, len(e.input_ids) - 1] == tok.eos_token_id  # the model learns to stop
    # the first target token is the letter the scorer reads: " B" after "Answer:"
    assert tok.decode(target[:1]) == f" {item.gold_letter}"
    assert encode([item], "harness", tok)[0].options[item.answer] == target[:1]


def test_truncation_keeps_eos_and_answer(tiny_model_dir):
    cfg = cfg_for(tiny_model_dir, "unused", **{"train.max_length": 40})
    tok = load_tokenizer(tiny_model_dir)
    long = MCQItem(id="l", question="Why? " * 5, options=("a", "b", "c", "d"), answer=1, explanation="x " * 200)
    ex = batches.tokenize_example(long, cfg, tok)
    assert len(ex.input_ids) <= 40 and ex.input_ids[-1] == tok.eos_token_id
    assert tok.decode(ex.input_ids[ex.prompt_len:ex.prompt_len + 1]) == " B"


def test_one_step_changes_only_lora_weights(tiny_model_dir):
    from accelerate import Accelerator

    cfg = cfg_for(tiny_model_dir, "unused")
    model, tok = train_mod.lora_model(cfg, Accelerator(cpu=True), print)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    plan = batches.batch_plan(items(8), cfg, tok)
    ids, mask, labels = batches.collate(plan[0][0], tok.pad_token_id, "cpu")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    train_mod.completion_loss_sum(model, ids, mask, labels, batches.first_target(plan[0][0])).backward()
    opt.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    lora = {n for n, _ in model.named_parameters() if "lora_" in n}
    assert changed and changed <= lora
    assert any("lora_B" in n for n in changed)  # B starts at zero, so only a real update moves it


def test_loss_matches_transformers_loss(tiny_model_dir):
    """The summed target-only loss over selected logits equals HF's own mean loss times the target count."""
    from accelerate import Accelerator

    cfg = cfg_for(tiny_model_dir, "unused")
    model, tok = train_mod.lora_model(cfg, Accelerator(cpu=True), print)
    plan = batches.batch_plan(items(8), cfg, tok)
    ids, mask, labels = batches.collate(plan[0][0], tok.pad_token_id, "cpu")
    with torch.no_grad():
        mine = train_mod.completion_loss_sum(model, ids, mask, labels, batches.first_target(plan[0][0]))
        hf = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    n_targets = int((labels[:, 1:] != -100).sum())
    assert mine.item() == pytest.approx(hf.item() * n_targets, rel=1e-5)


def test_gradient_accumulation_equals_larger_batch(tiny_model_dir, tmp_path):
    common = {"train.group_by_length": "false", "data.shuffle_options": "false"}
    big = cfg_for(tiny_model_dir, tmp_path / "big", **common, **{"train.batch_size": 4, "train.grad_accum": 1})
    acc = cfg_for(tiny_model_dir, tmp_path / "acc", **common, **{"train.batch_size": 2, "train.grad_accum": 2})
    data = items(12)
    a = train_mod.train(big, data, tmp_path / "big", quiet=True)
    b = train_mod.train(acc, data, tmp_path / "acc", quiet=True)
    assert a["final_loss"] == pytest.approx(b["final_loss"], rel=1e-4)
    ta, tb = adapter_tensors(tmp_path / "big"), adapter_tensors(tmp_path / "acc")
    assert all(torch.allclose(ta[k], tb[k], atol=1e-6) for k in ta)


def test_same_seed_gives_bitwise_identical_adapter(tiny_model_dir, tmp_path):
    cfg = cfg_for(tiny_model_dir, tmp_path / "x", **{"lora.dropout": 0.1})
    a = train_mod.train(cfg, items(), tmp_path / "a", quiet=True)
    b = train_mod.train(cfg, items(), tmp_path / "b", quiet=True)
    assert a["final_loss"] == b["final_loss"]
    ta, tb = adapter_tensors(tmp_path / "a"), adapter_tensors(tmp_path / "b")
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    lines = (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [1, 2, 3] and "lr" in json.loads(lines[0])
    meta = json.loads((tmp_path / "a" / "adapter" / "medtune.json").read_text())
    assert meta["prompt_style"] == "harness" and meta["train_ids"] == [i.id for i in items()]
    assert (tmp_path / "a" / "adapter" / "medtune-config.yaml").is_file()


def test_train_twice_in_one_process_with_another_precision(tiny_model_dir, tmp_path):
    """A notebook (or a test session) that trains in fp32 and then with bf16 autocast: accelerate keeps its first
    state and would refuse the second precision; train() resets it."""
    fp32 = train_mod.train(cfg_for(tiny_model_dir, tmp_path / "a", **{"train.max_steps": 1}), items(), tmp_path / "a",
                           quiet=True)
    bf16 = train_mod.train(cfg_for(tiny_model_dir, tmp_path / "b", **{"train.max_steps": 1, "train.dtype": "bfloat16"}),
                           items(), tmp_path / "b", quiet=True)
    assert math.isfinite(fp32["final_loss"]) and math.isfinite(bf16["final_loss"])
    assert json.loads((tmp_path / "b" / "adapter" / "medtune.json").read_text())


def test_resume_reaches_the_uninterrupted_adapter(tiny_model_dir, tmp_path, monkeypatch):
    from medtune import checkpoint

    sets = {"train.max_steps": 6, "train.save_every": 2, "lora.dropout": 0.1}
    full = train_mod.train(cfg_for(tiny_model_dir, tmp_path / "full", **sets), items(), tmp_path / "full", quiet=True)
    real_save = checkpoint.save

    def crash_after_step_4(out_dir, step, *args, **kwargs):
        path = real_save(out_dir, step, *args, **kwargs)
        if step == 4:
            (out_dir / "checkpoints" / ".step-0000006.tmp-1").mkdir()  # a half-written checkpoint left by a crash
            with (out_dir / "metrics.jsonl").open("a") as f:
                f.write('{"step": 5, "loss": 1.0}\n{"step": 6, "lo')  # rows after the checkpoint, one torn
            raise KeyboardInterrupt
        return path

    monkeypatch.setattr(checkpoint, "save", crash_after_step_4)
    cfg = cfg_for(tiny_model_dir, tmp_path / "cut", **sets)
    with pytest.raises(KeyboardInterrupt):
        train_mod.train(cfg, items(), tmp_path / "cut", quiet=True)
    monkeypatch.setattr(checkpoint, "save", real_save)
    assert not (tmp_path / "cut" / "adapter").exists()
    resumed = train_mod.train(cfg, items(), tmp_path / "cut", resume=True, quiet=True)
    assert resumed["resumed_from_step"] == 4 and resumed["final_loss"] == full["final_loss"]
    ta, tb = adapter_tensors(tmp_path / "full"), adapter_tensors(tmp_path / "cut")
    assert all(torch.equal(ta[k], tb[k]) for k in ta)
    rows = [json.loads(x) for x in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    want = [json.loads(x) for x in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]  # cut back to the checkpoint, no repeats
    assert [r["tokens"] for r in rows] == [r["tokens"] for r in want]  # the token counter continues
    assert [r["loss"] for r in rows] == [r["loss"] for r in want]
    assert resumed["real_tokens"] == full["real_tokens"]


def _letter_shares(model_dir, adapter, data):
    model, tok, _ = load_model(model_dir, adapter=str(adapter), log=lambda *_: None)
    scores, _ = score(model, encode(data, "harness", tok), mode="exact")
    probs = torch.softmax(torch.tensor(scores), dim=-1)
    return probs.mean(0).tolist()


def _symmetric_letters_model(src: str, dst) -> str:
    """The tiny model with the letter tokens " A".." D" given orthogonal, equal-norm embeddings, so that any letter
    preference after training comes from the training data, not from the random initialization's geometry."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tok = AutoModelForCausalLM.from_pretrained(src), AutoTokenizer.from_pretrained(src)
    emb = model.get_input_embeddings().weight
    letters = [tok(f" {ch}", add_special_tokens=False).input_ids[0] for ch in "ABCD"]
    with torch.no_grad():
        basis = torch.linalg.qr(torch.randn(emb.shape[1], 4, generator=torch.Generator().manual_seed(0)))[0]
        for k, t in enumerate(letters):
            emb[t] = basis[:, k] * emb.norm(dim=1).mean()
    model.save_pretrained(dst)
    tok.save_pretrained(dst)
    return str(dst)


def test_option_shuffling_prevents_a_letter_prior(tiny_model_dir, tmp_path):
    """Trained on questions whose answer is always A: without shuffling the model learns "A"; with it, no letter."""
    model_dir = _symmetric_letters_model(tiny_model_dir, tmp_path / "sym")
    data = items(64, all_a=True)
    evals = [it.permuted(random.Random(k).sample(range(4), 4)) for k, it in enumerate(items(40, seed=1))]
    sets = {"train.max_steps": 200, "train.lr": 3e-3, "train.batch_size": 16, "train.epochs": 100, "lora.r": 16,
            "train.target": "answer"}
    shares = {}
    for shuffle in ("true", "false"):
        out = tmp_path / shuffle
        train_mod.train(cfg_for(model_dir, out, **sets, **{"data.shuffle_options": shuffle}), data, out, quiet=True)
        shares[shuffle] = _letter_shares(model_dir, out / "adapter", evals)
    assert shares["false"][0] > 0.9, shares  # learned "always A"
    tv = 0.5 * sum(abs(x - 0.25) for x in shares["true"])  # total variation distance from uniform
    assert tv < 0.15 and shares["true"][0] < 0.4, shares  # close to uniform: no letter carries the answer


def test_a_one_step_run_learns_and_train_quiet_still_reports_it(tiny_model_dir, tmp_path):
    """Probe 8: with max_steps 1 the warmup (ceil(0.05 x 1) = 1 step from lr 0) took the only step, and the saved
    adapter equalled the base (every lora_B zero) while `train -q` exited 0 printing nothing."""
    from typer.testing import CliRunner

    from medtune.cli import app
    from medtune.config import save_config

    recipe = tmp_path / "r.yaml"
    save_config(cfg_for(tiny_model_dir, tmp_path / "run", **{"train.max_steps": 1, "data.source": "demo"}), recipe)
    result = CliRunner().invoke(app, ["train", "--config", str(recipe), "-q"])
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("trained 1 steps") and len(result.stdout.splitlines()) == 1, result.output
    assert result.stderr == ""
    lora_b = [v for k, v in adapter_tensors(tmp_path / "run").items() if "lora_B" in k]
    assert lora_b and any(v.abs().max() > 0 for v in lora_b)
    assert json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])["lr"] > 0
