"""Reward model: TRL's RewardTrainer on preference pairs ranks chosen above rejected on held-out pairs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tuneline.params import DemoDataParams, RecipeError, RewardParams, TinyModelParams
from tuneline.records import ChatRecord
from tuneline.train import reward

SHAPE = TinyModelParams(vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=2,
                        num_kv_heads=2, max_position_embeddings=256)


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def demo_pairs(n: int = 500) -> list[ChatRecord]:
    """The demo's own preference pairs (correct answer vs a plausible wrong one), six task families."""
    from tuneline.data.demo import build_rows

    rows = build_rows(DemoDataParams(examples_per_task=10, preference_pairs=n))["preference"]
    return [ChatRecord(kind="preference", source="demo", line=i, messages=[{"role": "user", "content": r["prompt"]}],
                       chosen=r["chosen"], rejected=r["rejected"], task=r["task"]) for i, r in enumerate(rows)]


def tiny_base(texts: list[str], folder: Path) -> Path:
    from tuneline.models.tiny import init_tiny_model, save_model, train_tokenizer

    tokenizer = train_tokenizer(texts, SHAPE)
    return save_model(init_tiny_model(tokenizer, SHAPE, seed=0), tokenizer, folder)


def test_params_are_checked() -> None:
    with pytest.raises(RecipeError, match="batch_size"):
        RewardParams(batch_size=0)
    with pytest.raises(RecipeError, match="max_steps"):
        RewardParams(max_steps=0)


def test_encode_keeps_the_response_end_and_rejects_non_pairs(tmp_path: Path) -> None:
    base = tiny_base(["What is two plus two? Four. Five."] * 20, tmp_path / "base")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base)
    long_prompt = [{"role": "user", "content": "word " * 200}]
    ids = reward.encode(tok, long_prompt, "Four.", 32)
    assert len(ids) == 32 and ids[-1] == tok.eos_token_id  # cut on the left: the answer and its eos stay
    with pytest.raises(ValueError, match="preference"):
        reward.pair_parts(ChatRecord(kind="sft", source="t", line=3, messages=[
            {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]))


@pytest.mark.slow
def test_reward_model_ranks_chosen_above_rejected_on_held_out_demo_pairs(tmp_path: Path) -> None:
    pairs = demo_pairs()
    train, held_out = pairs[:400], pairs[400:]
    base = tiny_base([p.messages[0]["content"] + " " + p.chosen + " " + p.rejected for p in pairs], tmp_path / "b")
    params = RewardParams(learning_rate=2e-3, max_steps=250, batch_size=8, max_length=64, bf16=False, save_steps=125)
    logs: list[dict] = []
    result = reward.train_reward_model(base, train, held_out, params, tmp_path / "rm", seed=0,
                                       on_log=lambda step, m: logs.append(m))
    assert result.steps == 250 and result.val_pairs == 100
    assert all(c["loss"] == c["loss"] for c in result.losses)  # finite (checked in the trainer too)
    assert result.losses[-1]["loss"] < result.losses[0]["loss"]
    # better than chance on 100 held-out pairs: 62 or more correct has p < 0.01 under a fair coin
    assert result.after["accuracy"] >= 0.62, result.after
    assert result.after["accuracy"] > result.before["accuracy"]
    assert any("accuracy" in m for m in logs)
    # saved as a plain classifier directory; the scorer (the RL reward function) gives the same scores
    scorer = reward.RewardScorer(result.output_dir)
    got = scorer(prompts=[p.messages for p in held_out[:8]],
                 completions=[[{"role": "assistant", "content": p.chosen}] for p in held_out[:8]])
    again = reward.pairwise_accuracy(scorer.model, scorer.tokenizer, held_out, params.max_length)
    assert again["accuracy"] == result.after["accuracy"] and len(got) == 8
    assert json.loads((Path(result.output_dir) / reward.INFO_FILE).read_text())["format"] == "chat template"
    assert (tmp_path / "rm" / "checkpoints").is_dir()


@pytest.mark.slow
def test_reward_model_trains_on_the_real_preference_files(tmp_path: Path, shared_data: Path) -> None:
    """hh-rlhf (dialogue pairs) and alpaca_eval pairwise (a preference label) both become pairs and train."""
    from tuneline.data.ingest import read_source

    hh = read_source(shared_data / "preference" / "hh_rlhf_harmless.jsonl")
    ae = read_source(shared_data / "preference" / "alpaca_eval_pairwise.json")
    assert hh.schema == "hh_rlhf" and ae.schema == "alpaca_eval"
    pairs = hh.records[:48] + ae.records[:48]
    assert all(p.kind == "preference" for p in pairs)
    base = tiny_base([p.prompt_text() + " " + p.chosen + " " + p.rejected for p in pairs], tmp_path / "b")
    params = RewardParams(learning_rate=1e-3, max_steps=6, batch_size=8, max_length=128, bf16=False, save_steps=6)
    result = reward.train_reward_model(base, pairs[:40] + pairs[48:88], pairs[40:48] + pairs[88:96], params,
                                       tmp_path / "rm", seed=0)
    assert result.steps == 6 and result.val_pairs == 16
    assert 0.0 <= result.after["accuracy"] <= 1.0 and result.after["margin_mean"] == result.after["margin_mean"]


@pytest.mark.slow
def test_reward_model_from_the_minilm_encoder_reads_prompt_and_answer_as_a_sentence_pair(tmp_path: Path) -> None:
    pairs = demo_pairs(48)
    params = RewardParams(base="encoder", learning_rate=5e-5, max_steps=3, batch_size=8, max_length=64, bf16=False,
                          save_steps=3)
    result = reward.train_reward_model(None, pairs[:40], pairs[40:], params, tmp_path / "rm", seed=0)
    assert result.steps == 3 and result.base == "encoder" and "minilm" in result.started_from.lower()
    assert result.total_params > 20_000_000  # MiniLM-L6 (22.7 M) + a one-label head
    scorer = reward.RewardScorer(result.output_dir)
    assert scorer.info["format"] == "sentence pair"
    scores = scorer(prompts=["What is 2 plus 3?"] * 2, completions=["5", "6"])
    assert len(scores) == 2 and all(s == s for s in scores)
