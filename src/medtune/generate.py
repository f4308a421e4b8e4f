"""The `generate` evaluation method: greedy answers with explanations, parsed without ever defaulting to a letter.

Each question's prompt is the run's prompt style; the model writes until EOS or `max_new_tokens` (a hit cap is
reported). The letter is read by `parse.parse_answer` (an unparseable answer counts as wrong and is reported);
the explanation is kept, scored with ROUGE-L against the item's reference explanation when there is one, and
checked for contradicting the chosen letter.
"""

from __future__ import annotations

from medtune.data.items import MCQItem
from medtune.errors import MedtuneError
from medtune.parse import contradiction, parse_answer
from medtune.prompts import clean_explanation, context_limit, fit_prompt
from medtune.rouge import rouge_l


def generate_rows(model, tokenizer, items: list[MCQItem], style: str, max_new_tokens: int = 256,
                  batch_size: int = 8, progress=None) -> list[dict]:
    limit = context_limit(tokenizer) - max_new_tokens  # overlong items: the same rule as training and scoring
    if limit < 1:
        raise MedtuneError(f"max_new_tokens={max_new_tokens}: leaves no room for the question in the "
                           f"{context_limit(tokenizer)} positions the model takes; lower it (eval.max_new_tokens, "
                           "--max-new-tokens) well below that")
    prompts = [fit_prompt(item, style, tokenizer, limit)[1] for item in items]
    outputs = greedy(model, tokenizer, prompts, max_new_tokens, batch_size, progress)
    return [_row(item, text, cap) for item, (text, cap) in zip(items, outputs)]


def greedy(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int = 8,
           progress=None) -> list[tuple[str, bool]]:
    """(text up to EOS, hit the max_new_tokens cap) per prompt, greedy; the one decode loop (eval's generate method,
    ask's explanation). Longest prompts first, left-padded batches."""
    import torch
    from transformers import GenerationConfig

    device = next(model.parameters()).device
    outputs: list[tuple[str, bool]] = [("", False)] * len(prompts)
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    tokenizer.padding_side = "left"
    # greedy decoding, whatever the model's generation_config.json asks (100,000 beams, sampling, a huge length)
    decoding = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                              pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    for start in range(0, len(order), batch_size):
        idx = order[start: start + batch_size]
        enc = tokenizer([prompts[i] for i in idx], return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.inference_mode():
            out = model.generate(**enc.to(device), generation_config=decoding,
                                 logits_processor=[_FiniteScores(model)])
        for row, i in enumerate(idx):
            new = out[row, enc.input_ids.shape[1]:].tolist()
            ended = tokenizer.eos_token_id in new
            new = new[: new.index(tokenizer.eos_token_id)] if ended else new
            outputs[i] = tokenizer.decode(new, skip_special_tokens=True), not ended
        if progress is not None:
            progress.update(len(idx))
    return outputs


class _FiniteScores:
    """A logits processor that refuses NaN scores: greedy decoding would take an arbitrary token from them (NaN
    weights, adapter or config values), and the answer would be read from noise. One reduction per step."""

    def __init__(self, model):
        self.model = model

    def __call__(self, input_ids, scores):
        import torch

        if bool(torch.isnan(scores).any()):
            from medtune.models import describe_model

            raise MedtuneError(f"{describe_model(self.model)}: the model computed non-finite scores while generating: "
                               "its weights, adapter or config (e.g. rms_norm_eps) hold NaN or infinite values; use "
                               "the original checkpoint")
        return scores


def _row(item: MCQItem, text: str, capped: bool) -> dict:
    parsed = parse_answer(text, options=list(item.options))
    explanation = text.split("Explanation:", 1)[1].strip() if "Explanation:" in text else text.strip()
    return {"id": item.id, "gold": item.gold_letter, "pred": parsed.letter, "correct": parsed.letter == item.gold_letter,
            "parse": parsed.reason, "ambiguous": parsed.ambiguous, "output": text, "explanation": explanation,
            "hit_length_cap": capped, "contradiction": contradiction(parsed.letter, explanation, list(item.options)),
            "reference_explanation": clean_explanation(item.explanation), "subject": item.subject}


def generation_metrics(rows: list[dict]) -> dict:
    """Unparseable answers, length-cap hits, ROUGE-L (rouge.py) of explanations against references, contradiction rate."""
    n = len(rows)
    rouge = [rouge_l(r["reference_explanation"], r["explanation"]) for r in rows if r["reference_explanation"]]
    answered = [r for r in rows if r["pred"] is not None]
    return {"unparseable": n - len(answered), "unparseable_share": (n - len(answered)) / n,
            "hit_length_cap": sum(r["hit_length_cap"] for r in rows),
            "rougeL_f": sum(rouge) / len(rouge) if rouge else None, "rougeL_n": len(rouge),
            "contradiction_rate": sum(r["contradiction"] for r in answered) / len(answered) if answered else None,
            "parse_reasons": {k: sum(r["parse"] == k for r in rows) for k in sorted({r["parse"] for r in rows})}}
