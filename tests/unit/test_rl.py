"""Online RL (RLOO, GRPO): the mean reward on held-out demo prompts rises; the reference is the adapter disabled."""

from __future__ import annotations

from pathlib import Path

import pytest

from tuneline.params import LoraParams, RecipeError, RlParams
from tuneline.train import rl

from test_reward import demo_pairs, tiny_base  # noqa: E402 - same folder (pytest puts it on sys.path)


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def even_share(prompts, completions, completion_ids=None, **kwargs):
    """An easy, dense reward: the share of completion tokens with an even id (about 0.5 for a random policy's
    samples). Enough to show the policy moves towards what the reward function prefers, in a few steps."""
    return [sum(1 for t in ids if t % 2 == 0) / max(1, len(ids)) for ids in completion_ids]


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory):
    pairs = demo_pairs(120)
    root = tmp_path_factory.mktemp("rl")
    base = tiny_base([p.messages[0]["content"] + " " + p.chosen + " " + p.rejected for p in pairs], root / "base")
    return base, pairs[:100], pairs[100:]


def params(steps: int, save_steps: int = 100) -> RlParams:
    return RlParams(learning_rate=1e-2, max_steps=steps, batch_size=8, num_generations=4, max_completion_length=8,
                    bf16=False, beta=0.01, lora=LoraParams(r=8, alpha=16, dropout=0.0), save_steps=save_steps,
                    eval_prompts=16)


def test_params_are_checked() -> None:
    with pytest.raises(RecipeError, match="multiple of rl.num_generations"):
        RlParams(batch_size=6, num_generations=4)
    with pytest.raises(RecipeError, match="num_generations"):
        RlParams(num_generations=1, batch_size=2)


def test_prompts_come_from_preference_and_sft_records() -> None:
    pairs = demo_pairs(12)
    prompts = rl.prompts_of(pairs + pairs[:3])
    assert len(prompts) == 12 and prompts[0] == pairs[0].messages  # distinct, in order


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ["rloo", "grpo"])
def test_rl_raises_the_mean_reward_on_held_out_prompts(setup, tmp_path: Path, algorithm: str) -> None:
    base, train, held_out = setup
    probe = rl.build_rl_trainer(algorithm, base, rl.prompts_of(train), even_share, params(1), tmp_path / "probe",
                                seed=0)
    args = probe.args
    assert probe.ref_model is None and list(probe.model.peft_config) == ["default"]  # reference = adapter disabled
    assert not args.gradient_checkpointing and not args.bf16 and args.beta == 0.01  # TRL defaults overridden
    assert args.num_generations == 4 and args.max_completion_length == 8 and args.learning_rate == 1e-2
    import torch
    from trl import GRPOTrainer, RLOOTrainer

    assert isinstance(probe, {"rloo": RLOOTrainer, "grpo": GRPOTrainer}[algorithm])
    walks = []  # the Trainer's per-step FLOP estimate walks every parameter; nothing reads it
    probe.model.num_parameters = lambda *a, **k: walks.append(1) or 1
    assert probe.floating_point_ops({"input_ids": torch.ones(2, 3, dtype=torch.long)}) == 0 and not walks
    del probe

    result = rl.train_rl(algorithm, base, None, "full", train, held_out, even_share, params(15), tmp_path / "rl",
                         seed=0)
    assert result.steps == 15 and result.eval_prompts == 16
    assert result.before["kl"] == 0.0  # a fresh adapter: the policy is the reference
    assert result.after["mean_reward"] > result.before["mean_reward"] + 0.2, (result.before, result.after)
    assert 0.0 < result.after["kl"] < 1.0
    assert result.after["tokens_per_s"] > 0 and all(c["loss"] == c["loss"] for c in result.losses)
    assert "leave-one-out" in result.baseline if algorithm == "rloo" else "group" in result.baseline
    merged = rl.load_rl_model(tmp_path / "rl")
    assert (merged / "model.safetensors").is_file()


@pytest.mark.slow
def test_rl_resumes_from_its_last_complete_checkpoint(setup, tmp_path: Path) -> None:
    base, train, held_out = setup
    first = rl.train_rl("rloo", base, None, "full", train, held_out, even_share, params(4, save_steps=2),
                        tmp_path / "rl", seed=0)
    assert first.steps == 4 and (tmp_path / "rl" / "checkpoints" / "checkpoint-4").is_dir()
    again = rl.train_rl("rloo", base, None, "full", train, held_out, even_share, params(6, save_steps=2),
                        tmp_path / "rl", seed=0)
    assert again.steps == 6
    assert [c["step"] for c in again.losses] == [1, 2, 3, 4, 5, 6]  # the curve before the resume is kept
