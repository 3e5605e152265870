"""Distillation: the student gets closer to the teacher, and a retry reuses the cached teacher outputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tuneline.params import DistillParams, TinyModelParams
from tuneline.records import ChatRecord
from tuneline.train import distill

PAIRS = [
    ("What colour is the sky?", "The sky is blue."),
    ("What colour is grass?", "Grass is green."),
    ("How many legs has a cat?", "A cat has four legs."),
    ("What is two plus two?", "Two plus two is four."),
    ("Name a fruit.", "An apple is a fruit."),
    ("What do bees make?", "Bees make honey."),
    ("Where do fish live?", "Fish live in water."),
    ("What is ice?", "Ice is frozen water."),
]
SHAPE = TinyModelParams(vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=2,
                        num_kv_heads=2, max_position_embeddings=128)


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """The tiny model is faster on one thread, and far faster when the 2 cores are shared (measured 20x)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _records(offset: int = 0) -> list[ChatRecord]:
    return [
        ChatRecord(kind="sft", source="test", line=offset + i,
                   messages=[{"role": "user", "content": q}, {"role": "assistant", "content": a}])
        for i, (q, a) in enumerate(PAIRS)
    ]


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny teacher that has learned the answers (a few full fine-tuning steps), so its outputs are peaked."""
    import torch

    from tuneline.models.tiny import init_tiny_model, save_model, train_tokenizer
    from tuneline.train.common import PadCollator, tokenize_chat

    tokenizer = train_tokenizer([f"{q} {a}" for q, a in PAIRS] * 4, SHAPE)
    model = init_tiny_model(tokenizer, SHAPE, seed=0)
    batch = PadCollator(tokenizer.pad_token_id)(tokenize_chat(tokenizer, _records(), 64))
    torch.manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(40):
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert float(loss) < 1.0
    model.eval()
    out = tmp_path_factory.mktemp("teacher")
    save_model(model, tokenizer, out)
    return out


def test_evenly_spaced_blocks() -> None:
    assert distill.evenly_spaced(12, 4) == [0, 4, 7, 11]
    assert distill.evenly_spaced(2, 1) == [1]
    assert distill.evenly_spaced(4, 4) == [0, 1, 2, 3]
    with pytest.raises(ValueError):
        distill.evenly_spaced(2, 3)


def test_topk_kl_matches_full_kl_when_the_tail_is_empty() -> None:
    import torch

    torch.manual_seed(0)
    teacher_logits, student_logits = torch.randn(5, 16) * 3, torch.randn(5, 16)
    t = 2.0
    t_logp = torch.log_softmax(teacher_logits / t, -1)
    s_logp = torch.log_softmax(student_logits / t, -1)
    full = (t_logp.exp() * (t_logp - s_logp)).sum(-1)
    top = t_logp.topk(16, -1)
    assert torch.allclose(distill.topk_kl(student_logits, top.values, top.indices, t), full, atol=1e-5)
    top8 = t_logp.topk(8, -1)  # fewer buckets: a lower bound of the full KL
    assert (distill.topk_kl(student_logits, top8.values, top8.indices, t) <= full + 1e-5).all()


def test_student_copies_evenly_spaced_teacher_blocks(teacher_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir)
    student, kept = distill.build_student(teacher, DistillParams(student_layers=1), seed=0)
    assert kept == [1] and student.config.num_hidden_layers == 1
    assert torch.equal(student.model.layers[0].mlp.up_proj.weight, teacher.model.layers[1].mlp.up_proj.weight)
    assert torch.equal(student.model.embed_tokens.weight, teacher.model.embed_tokens.weight)
    assert torch.equal(student.model.norm.weight, teacher.model.norm.weight)

    narrow, kept = distill.build_student(teacher, DistillParams(student_layers=1, student_hidden_size=32), seed=0)
    assert kept is None and narrow.config.hidden_size == 32 and narrow.config.vocab_size == teacher.config.vocab_size


def _teacher_and_features(teacher_dir: Path) -> tuple[object, object, list[dict]]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    return AutoModelForCausalLM.from_pretrained(teacher_dir), tokenizer, distill._tokenize(tokenizer, _records(), 64)


def test_teacher_pass_in_length_order_keeps_record_order(tmp_path: Path, teacher_dir: Path) -> None:
    """Batched by length, the cached rows still follow the records: each equals the record run alone."""
    import torch

    teacher, tokenizer, features = _teacher_and_features(teacher_dir)
    lengths = [len(f["input_ids"]) for f in features]
    assert lengths != sorted(lengths)  # the records are not already in length order
    cache, hit = distill.teacher_outputs(teacher, features, tmp_path / "c", batch_size=4, temperature=2.0,
                                         top_k=16, pad_token_id=tokenizer.pad_token_id)
    assert not hit
    with torch.no_grad():
        for i, f in enumerate(features):
            logits = teacher(input_ids=torch.tensor([f["input_ids"]])).logits[0]
            pos = distill._completion_positions(f["labels"])
            top = torch.log_softmax(logits[pos] / 2.0, -1).topk(16, -1)
            rows = slice(int(cache["offsets"][i]), int(cache["offsets"][i + 1]))
            assert torch.allclose(cache["logp"][rows], top.values, atol=1e-4), i
            assert (cache["index"][rows] == top.indices).float().mean() > 0.95, i  # near-ties may swap


def test_a_ce_weighed_zero_is_reported_without_a_graph(tmp_path: Path, teacher_dir: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    import tuneline.train.trainers as trainers
    from tuneline.train.trainers import KDTrainer

    kd = distill.kd_terms

    model, tokenizer, features = _teacher_and_features(teacher_dir)
    cache, _ = distill.teacher_outputs(model, features, tmp_path / "c", temperature=1.0, top_k=8,
                                       pad_token_id=tokenizer.pad_token_id)
    batch = distill._collator(tokenizer.pad_token_id)(features)
    model.train()
    kl, ce, n = distill.kd_terms(model, batch, cache, 1.0)
    kl0, ce0, n0 = distill.kd_terms(model, batch, cache, 1.0, ce_grad=False)
    assert ce.requires_grad and not ce0.requires_grad and kl0.requires_grad
    assert torch.allclose(ce, ce0) and torch.allclose(kl, kl0) and n == n0 > 0
    # the trainer asks for the graph only when the CE is in the loss
    seen = []
    monkeypatch.setattr(trainers, "kd_terms", lambda *a, **k: seen.append(k.get("ce_grad", True)) or kd(*a, **k))
    for alpha_ce in (0.0, 0.3):
        trainer = KDTrainer.__new__(KDTrainer)  # compute_loss reads only these three
        trainer.teacher_cache, trainer.kd = cache, DistillParams(alpha_ce=alpha_ce)
        trainer._terms = {"kl": [], "ce": []}
        assert trainer.compute_loss(model, batch).requires_grad
    assert seen == [False, True]


@pytest.mark.slow
def test_distillation_lowers_kl_and_a_retry_hits_the_teacher_cache(tmp_path: Path, teacher_dir: Path) -> None:
    params = DistillParams(student_layers=1, temperature=2.0, learning_rate=5e-3, epochs=1.0, batch_size=4, bf16=False)
    logs: list[tuple[int, dict]] = []
    kwargs = dict(seed=0, max_steps=20, cache_dir=tmp_path / "cache", top_k=32)
    records = _records() * 2
    result = distill.distill_student(
        teacher_dir, records, _records(100), params, tmp_path / "run1", on_log=lambda s, m: logs.append((s, m)),
        **kwargs,
    )
    assert not result.teacher_cache_hit
    assert result.steps == 20
    assert result.val_kl_after < 0.5 * result.val_kl_before, (result.val_kl_before, result.val_kl_after)
    assert result.student_params < result.teacher_params and 0 < result.param_ratio < 1
    assert result.student_layers == [1] and result.top_k == 32
    assert len(result.kd_curve) >= 2 and all({"loss", "kl", "ce"} <= set(p) for p in result.kd_curve)
    assert logs and "loss" in logs[0][1]
    assert (Path(result.output_dir) / "model.safetensors").is_file()
    json.dumps(result.to_dict())

    # the teacher outputs live in the cache, keyed by what they depend on
    for split, path in result.teacher_cache.items():
        assert (Path(path) / distill.CACHE_FILE).is_file()
        meta = json.loads((Path(path) / "meta.json").read_text())
        assert meta["top_k"] == 32

    retry = distill.distill_student(teacher_dir, records, _records(100), params, tmp_path / "run2", **kwargs)
    assert retry.teacher_cache_hit and retry.teacher_cache == result.teacher_cache
    assert retry.val_kl_before == pytest.approx(result.val_kl_before)
    assert retry.val_kl_after == pytest.approx(result.val_kl_after, rel=1e-4)  # same seed, same cached targets

    # a different temperature (or teacher, records, max_length, k) is a different cache entry
    key = Path(result.teacher_cache["train"]).name
    sha, tok = distill.weights_sha(teacher_dir), distill.tokenizer_sha(teacher_dir)
    ids = [r.id for r in records]
    assert distill.teacher_cache_key(sha, ids, params.max_length, 2.0, 32, tok) == key
    assert distill.teacher_cache_key(sha, ids, params.max_length, 1.0, 32, tok) != key
    assert distill.teacher_cache_key(sha, ids[:-1], params.max_length, 2.0, 32, tok) != key


@pytest.mark.slow
def test_distill_recipe_cli_logs_steps_to_the_mlflow_run(tmp_path: Path, teacher_dir: Path) -> None:
    from mlflow.tracking import MlflowClient

    from tuneline.models.provision import model_ref
    from tuneline.recipes import distill as recipe
    from tuneline.records import write_jsonl

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    run_id = client.create_run(client.create_experiment("distill-test")).info.run_id
    write_jsonl(tmp_path / "train.jsonl", (r.to_dict() for r in _records()))
    spec = {
        "teacher": model_ref(teacher_dir, teacher_dir.as_uri(), method="dpo", stage="dpo_adapter").to_dict(),
        "train_uri": (tmp_path / "train.jsonl").as_uri(),
        "val_uri": (tmp_path / "train.jsonl").as_uri(), "out_uri": (tmp_path / "out").as_uri(),
        "cache_uri": (tmp_path / "cache").as_uri(), "seed": 0, "max_steps": 3, "top_k": 16,
        "params": {"student_layers": 1, "batch_size": 4, "bf16": False},
        "mlflow": {"tracking_uri": uri, "run_id": run_id},
    }
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    assert recipe.main(["--spec", str(tmp_path / "spec.json")]) == 0
    result = json.loads((tmp_path / "out" / "result.json").read_text())["metrics"]
    assert result["steps"] == 3 and result["top_k"] == 16 and not result["teacher_cache_hit"]
    assert [m.step for m in client.get_metric_history(run_id, "kl")] == [1, 2, 3]
    after = client.get_metric_history(run_id, "val_kl_after")
    assert after and after[0].value == pytest.approx(result["val_kl_after"])
