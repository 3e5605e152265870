"""The prompt-template scorer (max-likelihood label, multi-token labels) on a tiny causal LM, and the ensemble's
probabilities."""

from __future__ import annotations

import pytest

from tuneline.classify.data import Examples, LabelSet
from tuneline.classify.ensemble import combine, validation_weights
from tuneline.classify.template import choose_shots, label_token_ids, render, score_labels, template_probs
from tuneline.params import TemplateArmParams, TinyModelParams

SMALL = TinyModelParams(vocab_size=320, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=2, num_kv_heads=2)


@pytest.fixture(scope="module")
def lm():
    from tuneline.models.tiny import init_tiny_model, train_tokenizer

    corpus = ["the film was good and the plot was great", "a dull and boring movie", "card arrived late"] * 20
    tokenizer = train_tokenizer(corpus, SMALL)
    return init_tiny_model(tokenizer, SMALL, seed=0), tokenizer


def _brute_force(model, tokenizer, prompt: str, label: list[int]) -> float:
    """log P(label | prompt) from one full forward pass, no cache."""
    import torch

    ids = tokenizer(prompt)["input_ids"]
    full = torch.tensor([ids + label])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=full).logits[0].float(), dim=-1)
    return sum(float(logp[len(ids) + j - 1, t]) for j, t in enumerate(label))


def test_scores_are_label_log_likelihoods_including_multi_token_labels(lm) -> None:
    model, tokenizer = lm
    names = ["good", "boring", "extraordinarily_unremarkable_xyzzy"]
    ids = label_token_ids(tokenizer, names)
    assert len(ids[2]) > 1  # a label several tokens long
    prompt = render(TemplateArmParams().template, text="the plot was great", labels=names)
    assert "good, boring" in prompt and prompt.endswith("Label:")
    scores = score_labels(model, tokenizer, prompt, ids, max_length=512)
    expected = [_brute_force(model, tokenizer, prompt, t) for t in ids]
    assert scores == pytest.approx(expected, abs=1e-4)
    probs = template_probs(model, tokenizer, ["the plot was great"], LabelSet(("a", "b", "c")),
                           template=TemplateArmParams().template, names=dict(zip("abc", names)))
    assert probs.sum() == pytest.approx(1.0) and int(probs.argmax()) == max(range(3), key=lambda i: expected[i])


def test_few_shot_examples_cover_labels_and_long_prompts_are_cut_from_the_front(lm) -> None:
    model, tokenizer = lm
    train = Examples(tuple(f"text {i}" for i in range(9)), ("x", "y", "z") * 3)
    shots = choose_shots(train, 3, seed=1, names={"x": "ex"})
    assert sorted(s["label"] for s in shots) == ["ex", "y", "z"]
    assert choose_shots(train, 3, seed=1, names={}) != [] and choose_shots(train, 0, 1, {}) == []
    long_prompt = render(TemplateArmParams().template, text="good", labels=["good"], examples=shots * 30)
    assert len(tokenizer(long_prompt)["input_ids"]) > 64
    ids = label_token_ids(tokenizer, ["good", "boring"])
    short = score_labels(model, tokenizer, long_prompt, ids, max_length=64)
    assert all(s < 0 for s in short)  # ran within 64 positions


def test_the_tuned_template_variant_is_scored_on_exactly_the_tokens_sft_trained(lm, tmp_path) -> None:
    """template_records -> train_sft -> template_probs(chat=True): the label tokens scored after the chat prompt are
    the assistant tokens the SFT stage trained on, and a few steps move the probabilities towards the labels."""
    import numpy as np

    from tuneline.classify.template import template_records
    from tuneline.models.tiny import save_model
    from tuneline.params import SftParams
    from tuneline.train.sft import load_trained, train_sft

    model, tokenizer = lm
    template, names = TemplateArmParams().template, {"p": "good", "n": "boring"}
    train = Examples(("the plot was great", "a dull movie", "great film", "boring and dull") * 4, ("p", "n") * 8)
    labels = LabelSet(("n", "p"))
    records = template_records(train, template=template, labels=labels, tokenizer=tokenizer, max_length=512,
                               names=names)
    assert records[0].messages[1]["content"] == "good" and "Labels: boring, good" in records[0].messages[0]["content"]
    chat = tokenizer.apply_chat_template(records[0].messages, tokenize=False)
    prompt = tokenizer.apply_chat_template(records[0].messages[:1], add_generation_prompt=True, tokenize=False)
    full = tokenizer(chat, add_special_tokens=False)["input_ids"]
    head = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert full[:len(head)] + label_token_ids(tokenizer, ["good"], chat=True)[0] == full[:-1]  # then eos
    long = template_records(Examples(("great " * 300,), ("n",)), template=template, labels=labels,
                            tokenizer=tokenizer, max_length=64, names=names)[0].messages
    assert long[0]["content"].endswith("Label:") and long[1]["content"] == "boring"  # cut from the front
    assert len(tokenizer(tokenizer.apply_chat_template(long, tokenize=False), add_special_tokens=False)["input_ids"]) <= 64

    base = save_model(model, tokenizer, tmp_path / "lm")
    before = template_probs(model, tokenizer, train.texts[:4], labels, template=template, names=names, chat=True)
    params = SftParams(method="full", learning_rate=1e-2, epochs=100.0, batch_size=8, eval_steps=30, save_steps=30,
                       bf16=False, group_by_length=False)
    result = train_sft(base, records, records[:4], params, tmp_path / "sft", seed=0, max_steps=60)
    tuned, tuned_tok = load_trained(base, result.output_dir)
    after = template_probs(tuned, tuned_tok, train.texts[:4], labels, template=template, names=names, chat=True)
    right = np.array([labels.names.index(y) for y in train.labels[:4]])
    assert after[np.arange(4), right].mean() > before[np.arange(4), right].mean() + 0.2, (before, after)


def test_ensemble_probabilities_sum_to_one() -> None:
    import numpy as np

    rng = np.random.default_rng(0)
    members = [rng.dirichlet(np.ones(5), size=7) for _ in range(3)]
    weights = validation_weights([0.8, 0.6, 0.0])
    assert weights == pytest.approx([0.8 / 1.4, 0.6 / 1.4, 0.0])
    mixed = combine(members, weights)
    assert mixed.shape == (7, 5) and np.allclose(mixed.sum(axis=1), 1.0)
    assert np.allclose(mixed, (0.8 * members[0] + 0.6 * members[1]) / 1.4)
    assert validation_weights([0.0, 0.0]) == [0.5, 0.5]
    with pytest.raises(ValueError):
        combine(members[:2], [1.0])


def test_metrics_match_scikit_learn_and_calibration_is_sane() -> None:
    import numpy as np
    from sklearn.metrics import f1_score

    from tuneline.classify.metrics import calibration, macro_f1, report

    rng = np.random.default_rng(1)
    y = rng.integers(0, 4, size=200)
    pred = np.where(rng.random(200) < 0.7, y, rng.integers(0, 4, size=200))
    assert macro_f1(y, pred, 4) == pytest.approx(f1_score(y, pred, average="macro"))
    probs = np.full((200, 4), 0.0)
    probs[np.arange(200), pred] = 1.0  # always fully confident: ECE = 1 - accuracy
    assert calibration(probs, y)["ece"] == pytest.approx(1 - (pred == y).mean())
    rep = report(probs, y, ["a", "b", "c", "d"], samples=200)
    ci = rep["ci"]["macro_f1"]
    assert ci["low"] <= rep["macro_f1"] <= ci["high"] and sum(map(sum, rep["confusion"])) == 200
    assert set(rep["per_class"]) == {"a", "b", "c", "d"}
