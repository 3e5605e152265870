"""Test-set evaluation of one model, template parity, and side-by-side comparison of several.

:func:`evaluate_model` measures, on the held-out splits:

- teacher-forced loss and perplexity on the assistant tokens (completion-only, the training path's
  tokenization :func:`tuneline.train.common.tokenize_chat`), token-weighted over the split;
- greedy generation (batched, left padding, ``max_new_tokens`` cap, stop at eos): exact match,
  ROUGE-L and, with a ``checker``, the task's own answer accuracy, each with a bootstrap interval,
  plus per-task accuracy, the eos hit rate and sample generations;
- preference accuracy: the summed log-probability of the chosen response (its tokens and the eos)
  beats the rejected one's;
- latency p50/p95 per request (each batch's wall time divided by its size: batched throughput
  latency, not single-request latency) and generated tokens/s;
- parameter count and size (of the safetensors files on disk, or of the parameters in memory).

The raw per-example scores are in the report, in the order of the input records, so a promotion gate
can compare a candidate and a baseline with :func:`tuneline.evaluate.metrics.paired_bootstrap_diff`.

torch, transformers and matplotlib are imported inside the functions.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from tuneline.evaluate.metrics import (
    bootstrap_ci,
    exact_match,
    paired_bootstrap_diff,
    percentile,
    rouge_l,
)
from tuneline.models.generation import batches, generate_greedy, input_ids, pad_id, prompt_ids
from tuneline.params import EvaluationParams, to_plain
from tuneline.records import ChatRecord

Checker = Callable[[str, str, str, str], bool]  # (task, prompt, expected, response) -> correct

LATENCY_METHOD = (
    "per batch: wall time of one batched greedy generate() call divided by the batch size, "
    "assigned to each request in the batch"
)


# ---------------------------------------------------------------------------
# loading and sizes


def _load(model_or_dir: Any) -> tuple[Any, Any, Optional[Path]]:
    """(model, tokenizer, directory or None) from a model directory or a (model, tokenizer) pair."""
    if isinstance(model_or_dir, (tuple, list)):
        if len(model_or_dir) != 2:
            raise ValueError("pass a model directory or a (model, tokenizer) pair")
        model, tokenizer = model_or_dir
        return model, tokenizer, None
    from tuneline.models.loading import load_causal_lm, load_tokenizer

    path = Path(model_or_dir)
    if not path.is_dir():
        raise FileNotFoundError(f"model directory not found: {path}")
    model = load_causal_lm(path, device="auto")
    tokenizer = load_tokenizer(path)
    return model, tokenizer, path


def _model_info(model: Any, model_dir: Optional[Path]) -> dict[str, Any]:
    params = list(model.parameters())  # shared (tied) tensors are listed once
    n_params = sum(p.numel() for p in params)
    first = params[0] if params else None
    if model_dir is not None:
        files = sorted(model_dir.glob("*.safetensors"))
        size = sum(f.stat().st_size for f in files)
        source = "disk: " + ", ".join(f.name for f in files) if files else "disk: no safetensors files"
    else:
        size = sum(p.numel() * p.element_size() for p in params)
        source = "memory: parameter bytes (no model directory given)"
    return {
        "source": str(model_dir) if model_dir is not None else "in-memory",
        "class": type(model).__name__,
        "n_params": int(n_params),
        "size_mb": size / 1e6,
        "size_source": source,
        "dtype": str(first.dtype).replace("torch.", "") if first is not None else None,
        "device": str(first.device) if first is not None else None,
    }


def _device(model: Any) -> Any:
    return next(model.parameters()).device


def _answer_ids(tokenizer: Any, text: str) -> list[int]:
    """Serving-path ids of a response: its text tokenized without specials, then eos."""
    ids = input_ids(tokenizer(text, add_special_tokens=False))
    return ids + ([int(tokenizer.eos_token_id)] if tokenizer.eos_token_id is not None else [])


def _ci(values: Sequence[float], params: EvaluationParams) -> Optional[dict[str, Any]]:
    if not values:
        return None
    mean, low, high = bootstrap_ci(
        list(values), samples=params.bootstrap_samples, confidence=params.confidence, seed=params.seed
    )
    return {"mean": mean, "low": low, "high": high, "n": len(values), "confidence": params.confidence}


# ---------------------------------------------------------------------------
# teacher-forced pieces


def _right_pad(seqs: Sequence[Sequence[int]], pad: int, fill_labels: Optional[Sequence[Sequence[int]]] = None):
    import torch

    longest = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), longest), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), longest), dtype=torch.long)
    labels = torch.full((len(seqs), longest), -100, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.as_tensor(list(s), dtype=torch.long)
        mask[i, : len(s)] = 1
        if fill_labels is not None:
            labels[i, : len(s)] = torch.as_tensor(list(fill_labels[i]), dtype=torch.long)
    return ids, mask, labels


def virtual_tokens_sliced(logits: Any, ids: Any) -> Any:
    """The logits of the input positions only: prompt-learning models (prompt, P-tuning, multitask prompt) return
    logits for their virtual tokens in front as well; those are cut off so position i is token i again."""
    extra = logits.shape[1] - ids.shape[1]
    if extra < 0:
        raise ValueError(f"the model returned {logits.shape[1]} positions for {ids.shape[1]} input tokens")
    return logits[:, extra:] if extra else logits


def _token_logprobs(model: Any, ids: Any, mask: Any, labels: Any) -> tuple[Any, Any]:
    """Per-sequence (sum of log p(label), count of labelled tokens), labels already aligned to ids."""
    import torch

    device = _device(model)
    logits = virtual_tokens_sliced(model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits, ids).float()
    target = labels.to(device)[:, 1:]
    logp = torch.log_softmax(logits[:, :-1], dim=-1)
    keep = target != -100
    picked = logp.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1) * keep
    return picked.sum(dim=1).cpu(), keep.sum(dim=1).cpu()


def _teacher_forced(model: Any, tokenizer: Any, records: list[ChatRecord], params: EvaluationParams) -> dict[str, Any]:
    import torch

    from tuneline.train.common import tokenize_chat

    features: list[Optional[dict[str, list[int]]]] = []
    for record in records:
        one = tokenize_chat(tokenizer, [record], params.max_length)
        features.append(one[0] if one else None)  # None: every assistant token cut by max_length
    kept = [i for i, f in enumerate(features) if f is not None]
    order = sorted(kept, key=lambda i: len(features[i]["input_ids"]))
    per_example: list[Optional[float]] = [None] * len(records)
    total_nll, total_tokens, total_seq_tokens = 0.0, 0, 0
    start = time.perf_counter()
    with torch.inference_mode():
        for batch in batches(order, params.batch_size):
            seqs = [features[i]["input_ids"] for i in batch]
            ids, mask, labels = _right_pad(seqs, pad_id(tokenizer), [features[i]["labels"] for i in batch])
            sums, counts = _token_logprobs(model, ids, mask, labels)
            for j, i in enumerate(batch):
                n = int(counts[j])
                if n:
                    per_example[i] = -float(sums[j]) / n
                    total_nll -= float(sums[j])
                    total_tokens += n
            total_seq_tokens += int(mask.sum())
    elapsed = time.perf_counter() - start
    loss = total_nll / total_tokens if total_tokens else float("nan")
    return {
        "loss": loss,
        "perplexity": math.exp(loss) if total_tokens else float("nan"),
        "loss_tokens": total_tokens,
        "loss_examples": sum(1 for v in per_example if v is not None),
        "teacher_forced_tokens_per_s": total_seq_tokens / elapsed if elapsed > 0 else float("nan"),
        "per_example_loss": per_example,
        "seconds": elapsed,
    }


def _preference(model: Any, tokenizer: Any, records: list[ChatRecord], params: EvaluationParams) -> dict[str, Any]:
    """Per pair: summed log p(response tokens + eos | prompt) of chosen and rejected."""
    import torch

    seqs: list[list[int]] = []
    labels: list[list[int]] = []
    for record in records:
        if record.kind != "preference" or record.chosen is None or record.rejected is None:
            raise ValueError(f"record {record.id}: preference accuracy needs kind 'preference' with chosen/rejected")
        prompt = prompt_ids(tokenizer, record.messages)
        for response in (record.chosen, record.rejected):
            answer = _answer_ids(tokenizer, response)
            ids = (prompt + answer)[: params.max_length]
            seqs.append(ids)
            labels.append(([-100] * len(prompt) + answer)[: params.max_length])
    logps: list[float] = [0.0] * len(seqs)
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    start = time.perf_counter()
    with torch.inference_mode():
        for batch in batches(order, params.batch_size):
            ids, mask, lab = _right_pad([seqs[i] for i in batch], pad_id(tokenizer), [labels[i] for i in batch])
            sums, _ = _token_logprobs(model, ids, mask, lab)
            for j, i in enumerate(batch):
                logps[i] = float(sums[j])
    elapsed = time.perf_counter() - start
    correct = [1.0 if logps[2 * k] > logps[2 * k + 1] else 0.0 for k in range(len(records))]
    margins = [logps[2 * k] - logps[2 * k + 1] for k in range(len(records))]
    return {
        "correct": correct,
        "margin_mean": sum(margins) / len(margins) if margins else None,
        "chosen_logp": logps[0::2],
        "rejected_logp": logps[1::2],
        "seconds": elapsed,
    }


# ---------------------------------------------------------------------------
# generation


# ---------------------------------------------------------------------------
# the report


def _sft_records(records: Sequence[ChatRecord]) -> list[ChatRecord]:
    for record in records:
        if record.kind != "sft" or not record.messages or record.messages[-1].get("role") != "assistant":
            raise ValueError(f"record {record.id}: test records must be kind 'sft' ending with an assistant turn")
    return list(records)


def evaluate_model(
    model: Any,
    test_records: Sequence[ChatRecord],
    pref_records: Sequence[ChatRecord],
    params: EvaluationParams,
    *,
    name: str,
    checker: Optional[Checker] = None,
) -> dict[str, Any]:
    """Evaluate a model directory or a ``(model, tokenizer)`` pair on the test and preference splits.

    ``checker(task, prompt, expected, response)`` (e.g. the demo's ``check_answer``) scores task
    accuracy on records that carry a ``task``; records without one are left out of it. At most
    ``params.max_examples`` records of each split are used (the first ones). The report is plain
    JSON-able data; see the module docstring for what is measured.
    """
    total_start = time.perf_counter()
    model, tokenizer, model_dir = _load(model)
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("the tokenizer has no chat template: chat evaluation needs one")
    model.eval()
    limit = params.max_examples
    tests = _sft_records(test_records[:limit] if limit else test_records)
    prefs = list(pref_records[:limit] if limit else pref_records)
    if not tests:
        raise ValueError("no test records to evaluate")

    tf = _teacher_forced(model, tokenizer, tests, params)

    prompts = [prompt_ids(tokenizer, r.messages[:-1]) for r in tests]
    gen_start = time.perf_counter()
    generations = generate_greedy(
        model, tokenizer, prompts, max_new_tokens=params.max_new_tokens, batch_size=params.batch_size
    )
    gen_seconds = time.perf_counter() - gen_start

    em: list[float] = []
    rl: list[float] = []
    correct: list[Optional[float]] = []
    responses: list[str] = []
    per_task: dict[str, dict[str, list[float]]] = {}
    for record, gen in zip(tests, generations):
        response = tokenizer.decode(gen["ids"], skip_special_tokens=True).strip()
        expected = record.messages[-1]["content"]
        responses.append(response)
        em.append(1.0 if exact_match(response, expected) else 0.0)
        rl.append(rouge_l(response, expected))
        ok: Optional[float] = None
        if checker is not None and record.task is not None:
            ok = 1.0 if checker(record.task, record.prompt_text(), expected, response) else 0.0
        correct.append(ok)
        bucket = per_task.setdefault(record.task or "(none)", {"exact_match": [], "correct": []})
        bucket["exact_match"].append(em[-1])
        if ok is not None:
            bucket["correct"].append(ok)

    pref = _preference(model, tokenizer, prefs, params) if prefs else None

    latencies = [g["latency_s"] for g in generations]
    new_tokens = [g["new_tokens"] for g in generations]
    gen_time = sum(latencies)  # = the summed wall time of the generate() calls
    scored = [c for c in correct if c is not None]
    samples = [
        {
            "id": r.id,
            "task": r.task,
            "prompt": r.prompt_text(),
            "expected": r.messages[-1]["content"],
            "response": resp,
            "exact_match": bool(e),
            "correct": None if c is None else bool(c),
            "hit_eos": g["hit_eos"],
            "new_tokens": g["new_tokens"],
        }
        for r, resp, e, c, g in list(zip(tests, responses, em, correct, generations))[: params.num_samples]
    ]
    return {
        "name": name,
        "model": _model_info(model, model_dir),
        "n_test": len(tests),
        "n_preference": len(prefs),
        "loss": tf["loss"],
        "perplexity": tf["perplexity"],
        "loss_tokens": tf["loss_tokens"],
        "loss_examples": tf["loss_examples"],
        "teacher_forced_tokens_per_s": tf["teacher_forced_tokens_per_s"],
        "exact_match": _ci(em, params),
        "rouge_l": _ci(rl, params),
        "task_accuracy": _ci(scored, params),
        "per_task": {
            task: {
                "n": len(v["exact_match"]),
                "accuracy": sum(v["correct"]) / len(v["correct"]) if v["correct"] else None,
                "exact_match": sum(v["exact_match"]) / len(v["exact_match"]),
            }
            for task, v in sorted(per_task.items())
        },
        "preference_accuracy": _ci(pref["correct"], params) if pref else None,
        "preference_margin_mean": pref["margin_mean"] if pref else None,
        "latency_ms": {
            "p50": percentile(latencies, 50) * 1000,
            "p95": percentile(latencies, 95) * 1000,
            "mean": sum(latencies) / len(latencies) * 1000,
            "method": LATENCY_METHOD,
            "batch_size": params.batch_size,
        },
        "tokens_per_s": sum(new_tokens) / gen_time if gen_time > 0 else float("nan"),
        "hit_eos_rate": sum(1 for g in generations if g["hit_eos"]) / len(generations),
        "mean_new_tokens": sum(new_tokens) / len(new_tokens),
        "max_new_tokens": params.max_new_tokens,
        "per_example": {
            "ids": [r.id for r in tests],
            "tasks": [r.task for r in tests],
            "exact_match": em,
            "rouge_l": rl,
            "correct": correct if checker is not None else None,
            "loss": tf["per_example_loss"],
            "hit_eos": [g["hit_eos"] for g in generations],
            "new_tokens": new_tokens,
            "preference_ids": [r.id for r in prefs],
            "preference_correct": pref["correct"] if pref else [],
        },
        "samples": samples,
        "params": to_plain(params),
        "seconds": {
            "teacher_forced": tf["seconds"],
            "generation": gen_seconds,
            "preference": pref["seconds"] if pref else 0.0,
            "total": time.perf_counter() - total_start,
        },
    }


# ---------------------------------------------------------------------------
# template parity


def _tail(tokenizer: Any, ids: Sequence[int], start: int) -> str:
    return tokenizer.decode(list(ids[max(0, start - 3) : start + 5]), skip_special_tokens=False)


def added_token_probes(tokenizer: Any) -> list[str]:
    """Tokens added to the vocabulary (special or not) that the chat template itself does not write and that are
    not bos/eos/pad/unk: the tokens a fine-tuning recipe added, which :func:`template_parity` must also cover."""
    template = getattr(tokenizer, "chat_template", None) or ""
    if isinstance(template, dict):
        template = " ".join(template.values())
    control = {tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token, tokenizer.unk_token}
    return sorted(t for t in tokenizer.get_added_vocab() if t not in control and t not in template)


def _probe_records(tokens: Sequence[str]) -> list[ChatRecord]:
    return [ChatRecord(kind="sft", source="parity-probe", line=i,
                       messages=[{"role": "user", "content": f"use {tok} here"},
                                 {"role": "assistant", "content": f"{tok} done {tok}"}])
            for i, tok in enumerate(tokens)]


def template_parity(tokenizer: Any, records: Sequence[ChatRecord],
                    probe_tokens: Optional[Sequence[str]] = None) -> dict[str, Any]:
    """Whether training and serving tokenize each conversation to the same ids.

    Training path: ``apply_chat_template(conversation, return_assistant_tokens_mask=True)``.
    Serving path: ``apply_chat_template(prompt turns, add_generation_prompt=True)`` + the expected
    answer tokenized without specials + eos. SFT records are checked as they are; preference records
    as their prompt plus the chosen response; other kinds are skipped. A mismatch names the record,
    the first differing position and both paths' tokens around it. A template that drops the eos
    shows up here: the model would be trained never to stop.

    Tokens added at fine-tuning time (``probe_tokens``; None = :func:`added_token_probes`) are checked too: a
    conversation using each must tokenize the same on both paths, and each must stay one id (not split).
    """
    mismatches: list[dict[str, Any]] = []
    checked = 0
    probes = added_token_probes(tokenizer) if probe_tokens is None else list(probe_tokens)
    vocab = tokenizer.get_vocab()
    for token in probes:
        if token not in vocab or tokenizer.encode(token, add_special_tokens=False) != [vocab[token]]:
            mismatches.append({"id": f"token:{token}", "reason": f"added token {token!r} is not encoded as its own id",
                               "first_diff": 0, "training_len": 0, "serving_len": 0, "training_tail": "",
                               "serving_tail": ""})
    for record in list(records) + _probe_records(probes):
        if record.kind == "sft" and record.messages and record.messages[-1].get("role") == "assistant":
            conversation = record.messages
        elif record.kind == "preference" and record.chosen is not None:
            conversation = list(record.messages) + [{"role": "assistant", "content": record.chosen}]
        else:
            continue
        checked += 1
        enc = tokenizer.apply_chat_template(
            conversation, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
        )
        training = input_ids(enc)
        serving = prompt_ids(tokenizer, conversation[:-1]) + _answer_ids(tokenizer, conversation[-1]["content"])
        if training == serving:
            continue
        first = next((k for k, (x, y) in enumerate(zip(training, serving)) if x != y), min(len(training), len(serving)))
        if serving[: len(training)] == training:
            reason = "training ids are a prefix of serving ids (does the template drop the eos after the answer?)"
        elif training[: len(serving)] == serving:
            reason = "training ids run past the serving ids (extra tokens after the answer's eos)"
        else:
            reason = "ids differ"
        mismatches.append(
            {
                "id": record.id,
                "reason": reason,
                "first_diff": first,
                "training_len": len(training),
                "serving_len": len(serving),
                "training_tail": _tail(tokenizer, training, first),
                "serving_tail": _tail(tokenizer, serving, first),
            }
        )
    return {"ok": checked > 0 and not mismatches, "checked": checked, "mismatches": mismatches,
            "probed_tokens": probes}


# ---------------------------------------------------------------------------
# comparison


# metric -> (how to read it from a report, True when higher is better)
COMPARED: dict[str, tuple[Callable[[dict[str, Any]], Optional[float]], bool]] = {
    "loss": (lambda r: r.get("loss"), False),
    "perplexity": (lambda r: r.get("perplexity"), False),
    "task_accuracy": (lambda r: (r.get("task_accuracy") or {}).get("mean"), True),
    "exact_match": (lambda r: (r.get("exact_match") or {}).get("mean"), True),
    "rouge_l": (lambda r: (r.get("rouge_l") or {}).get("mean"), True),
    "preference_accuracy": (lambda r: (r.get("preference_accuracy") or {}).get("mean"), True),
    "hit_eos_rate": (lambda r: r.get("hit_eos_rate"), True),
    "latency_p50_ms": (lambda r: r["latency_ms"]["p50"], False),
    "latency_p95_ms": (lambda r: r["latency_ms"]["p95"], False),
    "tokens_per_s": (lambda r: r.get("tokens_per_s"), True),
    "reward": (lambda r: (r.get("policy") or {}).get("reward"), True),
    "kl_to_reference": (lambda r: (r.get("policy") or {}).get("kl_to_reference"), False),
    "n_params": (lambda r: r["model"]["n_params"], False),
    "size_mb": (lambda r: r["model"]["size_mb"], False),
}


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _correctness(report: dict[str, Any]) -> tuple[str, Optional[list[float]]]:
    per = report["per_example"]
    if per.get("correct") is not None and all(c is not None for c in per["correct"]):
        return "task_accuracy", per["correct"]
    return "exact_match", per["exact_match"]


def compare(reports: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Metrics side by side, the best model per metric, and paired differences against the first model.

    The first report is the baseline. For each other model whose test examples are the same (same
    ids, same order), ``paired`` holds the bootstrap difference (model - baseline) of per-example
    correctness (task accuracy when every example was checked, else exact match) and, when both have
    preference results on the same pairs, of preference correctness.
    """
    if not reports:
        raise ValueError("nothing to compare")
    names = list(reports)
    metrics = {m: {n: get(reports[n]) for n in names} for m, (get, _) in COMPARED.items()}
    best: dict[str, Optional[str]] = {}
    for metric, (_, higher) in COMPARED.items():
        values = {n: v for n, v in metrics[metric].items() if _finite(v)}
        best[metric] = (max if higher else min)(values, key=values.get) if values else None

    baseline = names[0]
    base = reports[baseline]
    base_params = base.get("params") or {}
    kwargs = {
        "samples": int(base_params.get("bootstrap_samples", 1000)),
        "confidence": float(base_params.get("confidence", 0.95)),
        "seed": int(base_params.get("seed", 0)),
    }
    paired: dict[str, dict[str, Any]] = {}
    for name in names[1:]:
        report = reports[name]
        entry: dict[str, Any] = {}
        if report["per_example"]["ids"] == base["per_example"]["ids"]:
            metric, mine = _correctness(report)
            base_metric, theirs = _correctness(base)
            if metric != base_metric:
                metric = "exact_match"
                mine, theirs = report["per_example"]["exact_match"], base["per_example"]["exact_match"]
            diff, low, high = paired_bootstrap_diff(mine, theirs, **kwargs)
            entry[metric] = {"diff": diff, "low": low, "high": high, "n": len(mine)}
        else:
            entry["skipped"] = "test examples differ from the baseline's"
        a, b = report["per_example"], base["per_example"]
        if a["preference_correct"] and a["preference_ids"] == b["preference_ids"]:
            diff, low, high = paired_bootstrap_diff(a["preference_correct"], b["preference_correct"], **kwargs)
            entry["preference_accuracy"] = {"diff": diff, "low": low, "high": high, "n": len(a["preference_correct"])}
        paired[name] = entry
    return {"models": names, "baseline": baseline, "metrics": metrics, "best": best, "paired": paired}


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return f"{value:.{digits}f}"


def _fmt_ci(ci: Optional[dict[str, Any]]) -> str:
    if not ci:
        return "-"
    return f"{ci['mean']:.3f} [{ci['low']:.3f}, {ci['high']:.3f}]"


def _fmt_count(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)


def markdown_table(reports: dict[str, dict[str, Any]]) -> str:
    """A Markdown table: one row per model; intervals in brackets at each report's confidence."""
    header = [
        "model", "loss", "ppl", "task acc [CI]", "exact match [CI]", "ROUGE-L", "pref acc [CI]",
        "p50 / p95 ms", "tok/s", "params", "MB",
    ]
    policy = any(r.get("policy") for r in reports.values())  # reward-model score and KL to the SFT model
    if policy:
        header[-2:-2] = ["reward", "KL to SFT"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    for name, r in reports.items():
        row = [
            str(name).replace("|", "\\|"),
            _fmt(r.get("loss")),
            _fmt(r.get("perplexity"), 2),
            _fmt_ci(r.get("task_accuracy")),
            _fmt_ci(r.get("exact_match")),
            _fmt((r.get("rouge_l") or {}).get("mean")),
            _fmt_ci(r.get("preference_accuracy")),
            f"{r['latency_ms']['p50']:.1f} / {r['latency_ms']['p95']:.1f}",
            _fmt(r.get("tokens_per_s"), 0),
            _fmt_count(int(r["model"]["n_params"])),
            _fmt(r["model"]["size_mb"], 2),
        ]
        if policy:
            figures = r.get("policy") or {}
            row[-2:-2] = [_fmt(figures.get("reward")), _fmt(figures.get("kl_to_reference"), 4)]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def plot_comparison(reports: dict[str, dict[str, Any]], path: str | Path) -> Path:
    """A PNG: task accuracy per model with its interval as error bars (exact match when a report has no
    task accuracy), and teacher-forced loss per model."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    names = list(reports)
    means, lows, highs, labels = [], [], [], []
    for name in names:
        r = reports[name]
        ci = r.get("task_accuracy") or r.get("exact_match")
        labels.append("task acc" if r.get("task_accuracy") else "exact match")
        means.append(ci["mean"] if ci else 0.0)
        lows.append(ci["mean"] - ci["low"] if ci else 0.0)
        highs.append(ci["high"] - ci["mean"] if ci else 0.0)
    losses = [r.get("loss") if _finite(r.get("loss")) else 0.0 for r in reports.values()]
    xs = list(range(len(names)))
    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(max(6.4, 1.6 * len(names) * 2), 4.0), dpi=100)
    try:
        ax_acc.bar(xs, means, yerr=[lows, highs], capsize=4, color="tab:blue")
        ax_acc.set_xticks(xs, [f"{n}\n({label})" for n, label in zip(names, labels)])
        ax_acc.set_ylim(0, 1.05)
        ax_acc.set_ylabel("accuracy")
        conf = next((r["params"].get("confidence") for r in reports.values() if r.get("params")), 0.95)
        ax_acc.set_title(f"accuracy ({conf:.0%} bootstrap CI)")
        ax_acc.grid(True, axis="y", alpha=0.3)
        ax_loss.bar(xs, losses, color="tab:orange")
        ax_loss.set_xticks(xs, names)
        ax_loss.set_ylabel("loss (assistant tokens)")
        ax_loss.set_title("teacher-forced test loss")
        ax_loss.grid(True, axis="y", alpha=0.3)
        fig.tight_layout()
        fig.savefig(path, format="png", metadata={"Software": None})
    finally:
        plt.close(fig)
    return path
