"""Test-set evaluation on a tiny random Llama: report contents, loss, generation stops, template parity,
comparison table and chart."""

from __future__ import annotations

import copy
import math

import pytest

from tuneline.params import DemoDataParams, EvaluationParams, TinyModelParams
from tuneline.records import ChatRecord

SMALL = TinyModelParams(vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=2, num_kv_heads=2)
PARAMS = EvaluationParams(max_new_tokens=6, batch_size=8, bootstrap_samples=200, num_samples=3)


@pytest.fixture(scope="module")
def tokenizer():
    from tuneline.data.demo import generate_corpus
    from tuneline.models.tiny import train_tokenizer

    return train_tokenizer(generate_corpus(DemoDataParams(seed=3, corpus_paragraphs=200)), SMALL)


@pytest.fixture(scope="module")
def records() -> tuple[list[ChatRecord], list[ChatRecord]]:
    from tuneline.data.demo import alpaca_prompt, build_rows

    rows = build_rows(DemoDataParams(seed=3, examples_per_task=3, preference_pairs=8, drift_examples=1))
    tests = [
        ChatRecord(
            kind="sft",
            messages=[
                {"role": "user", "content": alpaca_prompt(r["instruction"], r["input"])},
                {"role": "assistant", "content": r["output"]},
            ],
            source="sft.jsonl",
            line=i,
            task=r["task"],
        )
        for i, r in enumerate(rows["sft"])
    ]
    prefs = [
        ChatRecord(
            kind="preference",
            messages=[{"role": "user", "content": r["prompt"]}],
            chosen=r["chosen"],
            rejected=r["rejected"],
            source="preference.jsonl",
            line=i,
            task=r["task"],
        )
        for i, r in enumerate(rows["preference"])
    ]
    return tests, prefs


@pytest.fixture(scope="module")
def model(tokenizer):
    from tuneline.models.tiny import init_tiny_model

    return init_tiny_model(tokenizer, SMALL, seed=0)


@pytest.fixture(scope="module")
def model_dir(model, tokenizer, tmp_path_factory):
    from tuneline.models.tiny import save_model

    return save_model(model, tokenizer, tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def report(model_dir, records):
    from tuneline.data.demo import check_answer
    from tuneline.evaluate.report import evaluate_model

    tests, prefs = records
    return evaluate_model(str(model_dir), tests, prefs, PARAMS, name="tiny", checker=check_answer)


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def test_report_fields_present_and_finite(report, records, model) -> None:
    tests, prefs = records
    for key in (
        "name", "model", "n_test", "n_preference", "loss", "perplexity", "loss_tokens", "exact_match", "rouge_l",
        "task_accuracy", "per_task", "preference_accuracy", "latency_ms", "tokens_per_s", "hit_eos_rate",
        "per_example", "samples", "params", "seconds",
    ):
        assert key in report, key
    assert report["name"] == "tiny" and report["n_test"] == len(tests) and report["n_preference"] == len(prefs)
    for key in ("loss", "perplexity", "tokens_per_s", "hit_eos_rate", "teacher_forced_tokens_per_s", "mean_new_tokens"):
        assert _finite(report[key]), key
    for key in ("exact_match", "rouge_l", "task_accuracy", "preference_accuracy"):
        ci = report[key]
        assert ci["low"] <= ci["mean"] <= ci["high"] and 0.0 <= ci["low"] and ci["high"] <= 1.0, key
    assert report["task_accuracy"]["n"] == len(tests) and report["preference_accuracy"]["n"] == len(prefs)
    latency = report["latency_ms"]
    assert 0 < latency["p50"] <= latency["p95"] and "batch" in latency["method"]
    info = report["model"]
    assert info["n_params"] == sum(p.numel() for p in model.parameters())
    assert info["size_source"].startswith("disk") and info["size_mb"] > info["n_params"] * 4 / 1e6 * 0.9
    assert set(report["per_task"]) == {r.task for r in tests}
    assert sum(t["n"] for t in report["per_task"].values()) == len(tests)
    per = report["per_example"]
    assert per["ids"] == [r.id for r in tests] and per["preference_ids"] == [r.id for r in prefs]
    for key in ("exact_match", "rouge_l", "correct", "loss", "hit_eos", "new_tokens"):
        assert len(per[key]) == len(tests), key
    assert len(per["preference_correct"]) == len(prefs)
    assert sum(per["preference_correct"]) / len(prefs) == pytest.approx(report["preference_accuracy"]["mean"])
    assert len(report["samples"]) == PARAMS.num_samples
    assert {"prompt", "expected", "response", "correct", "hit_eos"} <= set(report["samples"][0])
    assert report["params"]["max_new_tokens"] == PARAMS.max_new_tokens


def test_perplexity_is_exp_loss_and_loss_matches_transformers(report, records, model, tokenizer) -> None:
    import torch

    from tuneline.train.common import PadCollator, tokenize_chat

    assert report["perplexity"] == pytest.approx(math.exp(report["loss"]))
    tests, _ = records
    features = tokenize_chat(tokenizer, tests, PARAMS.max_length)
    assert report["loss_tokens"] == sum(sum(1 for t in f["labels"][1:] if t != -100) for f in features)
    with torch.inference_mode():  # transformers' own completion-only loss on the first example
        hf_loss = float(model(**PadCollator(tokenizer.pad_token_id)([features[0]])).loss)
    assert report["per_example"]["loss"][0] == pytest.approx(hf_loss, rel=1e-4)
    # the split loss is token-weighted over examples
    counts = [sum(1 for t in f["labels"][1:] if t != -100) for f in features]
    weighted = sum(l * n for l, n in zip(report["per_example"]["loss"], counts)) / sum(counts)
    assert report["loss"] == pytest.approx(weighted, rel=1e-6)


def test_preference_accuracy_compares_summed_response_logprobs(report, records, model, tokenizer) -> None:
    import torch

    _, prefs = records
    record = prefs[0]
    prompt = tokenizer.apply_chat_template(record.messages, add_generation_prompt=True, return_dict=True)["input_ids"]

    def logp(response: str) -> float:
        answer = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        ids = torch.tensor([list(prompt) + answer])
        with torch.inference_mode():
            logprobs = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), dim=-1)
        targets = ids[0, 1:]
        picked = logprobs[torch.arange(len(targets)), targets]
        return float(picked[len(prompt) - 1 :].sum())

    expected = 1.0 if logp(record.chosen) > logp(record.rejected) else 0.0
    assert report["per_example"]["preference_correct"][0] == expected


def test_generation_stops_at_eos_or_max_new_tokens(report, model, tokenizer) -> None:
    from tuneline.models.generation import generate_greedy

    # in the report: every generation either ended with eos or used the whole budget
    per = report["per_example"]
    for hit, n in zip(per["hit_eos"], per["new_tokens"]):
        assert 1 <= n <= PARAMS.max_new_tokens
        assert hit or n == PARAMS.max_new_tokens
    assert report["hit_eos_rate"] == pytest.approx(sum(per["hit_eos"]) / len(per["hit_eos"]))

    # a model forced to say eos from absolute position T on: with left padding, a prompt of L tokens
    # must stop after exactly max(1, T - L + 2) new tokens (the eos included), or run to the cap
    threshold, cap = 12, 6
    eos = tokenizer.eos_token_id

    def force_eos(module, args, kwargs, output):
        pos = kwargs["position_ids"]
        n = output.logits.shape[1]
        output.logits[..., eos] += 1000.0 * (pos[:, -n:] >= threshold)
        return output

    texts = ["hi", "What is 4 plus 7?", "Which is bigger: 34 or 71? Answer with the number only, please."]
    prompts = [
        tokenizer.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True, return_dict=True)[
            "input_ids"
        ]
        for t in texts
    ]
    handle = model.register_forward_hook(force_eos, with_kwargs=True)
    try:
        results = generate_greedy(model, tokenizer, prompts, max_new_tokens=cap, batch_size=4)
    finally:
        handle.remove()
    seen_stop, seen_cap = False, False
    for prompt, result in zip(prompts, results):
        stop = max(1, threshold - len(prompt) + 2)
        assert eos not in result["ids"]
        if stop <= cap:
            assert result["hit_eos"] and result["new_tokens"] == stop and len(result["ids"]) == stop - 1
            seen_stop = True
        else:
            assert not result["hit_eos"] and result["new_tokens"] == cap == len(result["ids"])
            seen_cap = True
    assert seen_stop and seen_cap  # the batch mixed both endings


def test_template_parity_ok_and_detects_a_template_without_eos(tokenizer, records) -> None:
    from tuneline.evaluate.report import template_parity
    from tuneline.models.tiny import CHAT_TEMPLATE

    tests, prefs = records
    result = template_parity(tokenizer, tests + prefs)
    assert result == {"ok": True, "checked": len(tests) + len(prefs), "mismatches": [], "probed_tokens": []}

    broken = copy.deepcopy(tokenizer)
    broken.chat_template = CHAT_TEMPLATE.replace("{{ eos_token }}", "")
    assert broken.chat_template != CHAT_TEMPLATE and tokenizer.chat_template == CHAT_TEMPLATE
    result = template_parity(broken, tests[:4])
    assert not result["ok"] and result["checked"] == 4 and len(result["mismatches"]) == 4
    mismatch = result["mismatches"][0]
    assert "eos" in mismatch["reason"] and mismatch["serving_len"] == mismatch["training_len"] + 1
    assert template_parity(tokenizer, [])["ok"] is False  # nothing checked is not a pass


def test_compare_markdown_table_and_plot(report, tmp_path) -> None:
    from tuneline.evaluate.report import compare, markdown_table, plot_comparison

    other = copy.deepcopy(report)  # higher loss, but every answer right
    other["name"] = "other"
    other["loss"] += 1.0
    other["per_example"]["correct"] = [1.0] * report["n_test"]
    reports = {"tiny": report, "other | copy": other}

    table = markdown_table(reports)
    lines = table.strip().splitlines()
    assert len(lines) == 2 + len(reports)
    assert lines[0].startswith("| model | loss | ppl | task acc")
    assert lines[2].startswith("| tiny |") and lines[3].startswith("| other \\| copy |")
    assert all(line.count(" | ") == lines[0].count(" | ") for line in lines[2:])

    summary = compare(reports)
    assert summary["baseline"] == "tiny" and summary["best"]["loss"] == "tiny"
    assert summary["metrics"]["loss"] == {"tiny": report["loss"], "other | copy": report["loss"] + 1.0}
    diff = summary["paired"]["other | copy"]["task_accuracy"]
    assert diff["diff"] == pytest.approx(1.0 - sum(report["per_example"]["correct"]) / report["n_test"])
    assert 0 < diff["low"] <= diff["diff"] <= diff["high"]
    assert summary["paired"]["other | copy"]["preference_accuracy"]["diff"] == 0.0

    png = plot_comparison(reports, tmp_path / "cmp" / "comparison.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_evaluate_model_rejects_wrong_records(model, tokenizer, records) -> None:
    from tuneline.evaluate.report import evaluate_model

    tests, prefs = records
    with pytest.raises(ValueError, match="kind 'sft'"):
        evaluate_model((model, tokenizer), prefs, [], PARAMS, name="x")
    with pytest.raises(ValueError, match="no test records"):
        evaluate_model((model, tokenizer), [], prefs, PARAMS, name="x")


def test_kl_to_reference_cuts_a_prompt_learning_policys_virtual_tokens(model) -> None:
    """A prompt-tuned policy returns logits for its virtual tokens too: KL to the reference (its adapter disabled)
    compares the input positions only (make run with sft.method: multitask_prompt failed here on a shape error)."""
    import torch
    from peft import PromptTuningConfig, get_peft_model

    from tuneline.evaluate.policy import kl_to_reference

    policy = get_peft_model(copy.deepcopy(model), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5))
    with torch.no_grad():  # a trained prompt, not the start
        policy.prompt_encoder["default"].embedding.weight.normal_(0.0, 1.0)
    prompts, completions = [[5, 6, 7], [8, 9]], [[10, 11], [12, 13, 14]]
    kl = kl_to_reference(policy, prompts, completions, pad_id=0)
    assert math.isfinite(kl) and kl > 0  # the prompt changes the policy
    assert kl_to_reference(model, prompts, completions, pad_id=0, reference=model) == pytest.approx(0.0, abs=1e-6)
