"""DPO: a fresh adapter on the merged SFT model raises reward accuracy; the reference is no second copy."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tuneline.params import DpoParams, LoraParams, SftParams, TinyModelParams
from tuneline.records import ChatRecord
from tuneline.train import dpo

QA = [
    ("What colour is the sky?", "The sky is blue.", "The sky is green."),
    ("What colour is grass?", "Grass is green.", "Grass is purple."),
    ("How many legs has a cat?", "A cat has four legs.", "A cat has nine legs."),
    ("What is two plus two?", "Two plus two is four.", "Two plus two is five."),
    ("Name a fruit.", "An apple is a fruit.", "A brick is a fruit."),
    ("What do bees make?", "Bees make honey.", "Bees make cars."),
    ("Where do fish live?", "Fish live in water.", "Fish live in trees."),
    ("What is ice?", "Ice is frozen water.", "Ice is hot sand."),
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


def _sft_records() -> list[ChatRecord]:
    return [ChatRecord(kind="sft", source="test", line=i,
                       messages=[{"role": "user", "content": q}, {"role": "assistant", "content": good}])
            for i, (q, good, _) in enumerate(QA)]


def _pairs() -> list[ChatRecord]:
    return [ChatRecord(kind="preference", source="test", line=i, messages=[{"role": "user", "content": q}],
                       chosen=good, rejected=bad)
            for i, (q, good, bad) in enumerate(QA)]


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(base model dir, SFT LoRA adapter dir) from a few real train_sft steps on the tiny model."""
    from tuneline.models.tiny import init_tiny_model, save_model, train_tokenizer
    from tuneline.train.sft import train_sft

    root = tmp_path_factory.mktemp("dpo_sft")
    texts = [f"{q} {a} {b}" for q, a, b in QA] * 4
    tokenizer = train_tokenizer(texts, SHAPE)
    base = save_model(init_tiny_model(tokenizer, SHAPE, seed=0), tokenizer, root / "base")
    params = SftParams(method="lora", learning_rate=5e-3, batch_size=8, eval_steps=5, save_steps=5, bf16=False,
                       lora=LoraParams(r=8, alpha=16, dropout=0.0), group_by_length=False)
    result = train_sft(base, _sft_records(), _sft_records()[:4], params, root / "sft", seed=0, max_steps=5)
    return base, Path(result.output_dir)


def test_pairs_become_trl_conversational_rows() -> None:
    rows = dpo.to_conversational(_pairs()[:1])
    assert rows == [{
        "prompt": [{"role": "user", "content": "What colour is the sky?"}],
        "chosen": [{"role": "assistant", "content": "The sky is blue."}],
        "rejected": [{"role": "assistant", "content": "The sky is green."}],
    }]
    with pytest.raises(ValueError, match="preference"):
        dpo.to_conversational(_sft_records()[:1])


def test_full_weight_sft_model_is_its_own_base_and_a_prompt_adapters_is_its_base(tmp_path: Path) -> None:
    merged, info = dpo.merged_sft_base(tmp_path / "sft_full", "unused-base", "full", tmp_path / "dpo")
    assert merged == tmp_path / "sft_full" and info is None
    weights, info = dpo.merged_sft_base(tmp_path / "sft", tmp_path / "base", "prefix", tmp_path / "dpo")
    assert weights == tmp_path / "base" and info["prompt_learning"]  # virtual tokens: the weights are the base's
    with pytest.raises(ValueError, match="unknown sft_method 'loha'"):
        dpo.merged_sft_base(tmp_path / "sft", "base", "loha", tmp_path / "dpo")


@pytest.mark.slow
def test_dpo_raises_reward_accuracy_with_a_fresh_adapter_and_no_reference_copy(
    tmp_path: Path, sft_run: tuple[Path, Path]
) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base, adapter = sft_run
    pairs = _pairs()
    params = DpoParams(beta=0.1, learning_rate=5e-3, batch_size=8, max_length=64, bf16=False,
                       lora=LoraParams(r=8, alpha=16, dropout=0.0))

    # the wrapped trainer: one set of full weights, a new adapter whose B matrices are zero
    merged, merge_info = dpo.merged_sft_base(adapter, base, "lora", tmp_path / "probe")
    assert merge_info["max_abs_diff"] <= merge_info["tolerance"]
    trainer = dpo.build_dpo_trainer(merged, pairs, params, tmp_path / "probe" / "ckpt", seed=0, max_steps=1)
    assert trainer.ref_model is None
    assert not trainer.args.gradient_checkpointing and not trainer.args.bf16  # TRL defaults overridden
    assert trainer.args.learning_rate == params.learning_rate and trainer.beta == params.beta
    assert list(trainer.model.peft_config) == ["default"] and dpo._adapter_is_fresh(trainer.model)
    del trainer

    logs: list[tuple[int, dict]] = []
    result = dpo.train_dpo(adapter, base, "lora", pairs, pairs, params, tmp_path / "dpo", seed=0, max_steps=12,
                           on_log=lambda step, m: logs.append((step, m)))
    assert result.ref_model_is_none and result.fresh_adapter
    # before: the policy is the reference, so every margin is exactly zero
    assert result.before["reward_margin"] == 0.0 and result.before["reward_accuracy"] == 0.0
    assert result.after["reward_accuracy"] >= 0.75, result.after
    assert result.after["reward_margin"] > 0.0
    assert result.after["logprob_accuracy"] >= result.before["logprob_accuracy"]
    assert result.steps == 12 and len(result.losses) == 12
    assert result.shared_prompts and result.reference_once  # 12 steps x 8 of 8 pairs: the reference once a pair
    assert result.losses[-1]["loss"] < result.losses[0]["loss"]
    assert any("rewards/accuracies" in m for _, m in logs)
    assert Path(result.merged_base_dir) == tmp_path / "dpo" / dpo.MERGED_SUBDIR
    assert (Path(result.output_dir) / "adapter_config.json").is_file()
    json.dumps(result.to_dict())

    # merged DPO model: a plain full model that prefers what the adapter prefers
    model_dir = dpo.load_dpo_model(tmp_path / "dpo")
    assert (model_dir / "model.safetensors").is_file() and dpo.load_dpo_model(tmp_path / "dpo") == model_dir
    policy = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    reference = AutoModelForCausalLM.from_pretrained(result.merged_base_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    again = dpo.evaluate_preferences(policy, tokenizer, pairs, params.beta, ref=reference, max_length=64)
    assert again.reward_accuracy == result.after["reward_accuracy"]
    assert again.reward_margin == pytest.approx(result.after["reward_margin"], abs=1e-3)


@pytest.mark.slow
def test_after_bottleneck_sft_dpo_reward_and_distillation_start_from_the_bundle_and_keep_its_adapters(
    tmp_path: Path, sft_run: tuple[Path, Path]
) -> None:
    """A bottleneck adapter cannot be merged: DPO, the reward model and the student start from a bundle (base +
    adapters); the fresh LoRA leaves the adapters and the projections they follow alone, so it merges exactly."""
    import torch
    from safetensors.torch import load_file

    from tuneline.models.loading import load_causal_lm, load_tokenizer
    from tuneline.params import AdapterParams, DistillParams, RewardParams
    from tuneline.train.bottleneck import CHILD, WEIGHTS_FILE, is_bundle
    from tuneline.train.distill import build_student
    from tuneline.train.reward import RewardScorer, pairwise_accuracy, train_reward_model
    from tuneline.train.sft import train_sft

    base, _ = sft_run
    params = SftParams(method="adapter", learning_rate=5e-3, batch_size=8, eval_steps=4, save_steps=4, bf16=False,
                       adapter=AdapterParams(reduction_factor=4), group_by_length=False)
    sft = Path(train_sft(base, _sft_records(), _sft_records()[:4], params, tmp_path / "sft", seed=0,
                         max_steps=4).output_dir)
    sft_adapters = load_file(str(sft / WEIGHTS_FILE))
    pairs = _pairs()
    dpo_params = DpoParams(beta=0.1, learning_rate=5e-3, batch_size=8, max_length=64, bf16=False,
                           lora=LoraParams(r=8, alpha=16, dropout=0.0))

    # the trainer's LoRA covers the base's other projections only
    bundle, info = dpo.merged_sft_base(sft, base, "adapter", tmp_path / "probe")
    assert is_bundle(bundle) and info["bundle"]
    trainer = dpo.build_dpo_trainer(bundle, pairs, dpo_params, tmp_path / "probe" / "ckpt", seed=0, max_steps=1)
    lora_on = {n.rsplit(".lora_A", 1)[0] for n, _ in trainer.model.named_parameters() if ".lora_A." in n}
    assert lora_on and not any(n.endswith(("o_proj", "down_proj")) or f".{CHILD}." in n for n in lora_on), lora_on
    assert any(n.endswith("q_proj") for n in lora_on) and dpo._adapter_is_fresh(trainer.model)
    del trainer

    result = dpo.train_dpo(sft, base, "adapter", pairs, pairs, dpo_params, tmp_path / "dpo", seed=0, max_steps=6)
    assert result.fresh_adapter and result.after["reward_margin"] > 0.0
    model_dir = dpo.load_dpo_model(tmp_path / "dpo")  # merge_adapter checks the merged logits against the adapter's
    assert is_bundle(model_dir)
    assert all(torch.equal(v, sft_adapters[k]) for k, v in load_file(str(model_dir / WEIGHTS_FILE)).items())
    policy, tokenizer = load_causal_lm(model_dir), load_tokenizer(model_dir)
    again = dpo.evaluate_preferences(policy, tokenizer, pairs, dpo_params.beta, ref=load_causal_lm(bundle),
                                     max_length=64)
    assert again.reward_accuracy == result.after["reward_accuracy"]

    # the reward model from the bundle keeps the adapters and is saved as a bundle that scores the same
    reward = train_reward_model(bundle, pairs, pairs, RewardParams(method="lora", max_steps=2, batch_size=8,
                                                                   max_length=64, bf16=False), tmp_path / "rm", seed=0)
    assert is_bundle(reward.output_dir)
    scorer = RewardScorer(reward.output_dir)
    assert pairwise_accuracy(scorer.model, scorer.tokenizer, pairs, 64) == reward.after

    # the student copies the kept blocks with their adapters
    student, keep = build_student(policy, DistillParams(student_layers=1), seed=0)
    copied = {k: v for k, v in student.state_dict().items() if f".{CHILD}." in k}
    assert len(keep) == 1 and copied
    teacher = policy.state_dict()
    assert all(torch.equal(v, teacher[k.replace("layers.0.", f"layers.{keep[0]}.")]) for k, v in copied.items())


@pytest.mark.slow
def test_after_prompt_learning_sft_dpo_rl_and_distillation_continue_its_virtual_tokens(
    tmp_path: Path, sft_run: tuple[Path, Path]
) -> None:
    """Virtual tokens are no weights: DPO and RL train the SFT's own (multitask) prompt on against its frozen copy,
    so the policy starts as the SFT model; the result is the same kind of adapter on the same, untouched base; the
    student learns from the prompted teacher."""
    import torch

    from tuneline.params import DistillParams, MultitaskPromptParams, RlParams
    from tuneline.train import rl
    from tuneline.train.distill import distill_student
    from tuneline.train.methods import read_method_file
    from tuneline.train.sft import load_trained, train_sft

    base, _ = sft_run
    params = SftParams(method="multitask_prompt", learning_rate=3e-2, batch_size=8, eval_steps=4, save_steps=4,
                       bf16=False, num_virtual_tokens=4, group_by_length=False,
                       multitask_prompt=MultitaskPromptParams(source_steps=4))
    sft = Path(train_sft(base, _sft_records(), _sft_records()[:4], params, tmp_path / "sft", seed=0,
                         max_steps=4).output_dir)
    base_weights = {k: v.clone() for k, v in load_trained(base, sft)[0].get_base_model().state_dict().items()}
    pairs = _pairs()
    ids = torch.tensor([[5, 6, 7, 8, 9]])

    def logits(model_dir: Path) -> torch.Tensor:
        model, _ = load_trained(base, model_dir)
        assert all(torch.equal(v, base_weights[k]) for k, v in model.get_base_model().state_dict().items())
        with torch.no_grad():
            return model(input_ids=ids).logits

    result = dpo.train_dpo(sft, base, "multitask_prompt", pairs, pairs,
                           DpoParams(beta=0.1, learning_rate=3e-2, batch_size=8, max_length=64, bf16=False),
                           tmp_path / "dpo", seed=0, max_steps=6)
    assert result.continued_adapter and result.ref_model_is_none and Path(result.merged_base_dir) == Path(base)
    assert result.before["reward_margin"] == 0.0 and result.after["reward_margin"] > 0.0  # reference: the SFT prompt
    out = Path(result.output_dir)
    assert read_method_file(out)["method"] == "multitask_prompt" and not (out / "ref").exists()
    assert not torch.allclose(logits(out), logits(sft))  # the prompt moved; the base did not (checked in logits())
    policy, tokenizer = load_trained(base, out)
    again = dpo.evaluate_preferences(policy, tokenizer, pairs, 0.1, ref=load_trained(base, sft)[0], max_length=64)
    assert again.reward_margin == pytest.approx(result.after["reward_margin"], rel=1e-4)  # saved as trained

    def even_share(prompts, completions, completion_ids=None, **kwargs):
        return [sum(1 for t in c if t % 2 == 0) / max(1, len(c)) for c in completion_ids]

    rl_result = rl.train_rl("rloo", sft, base, "multitask_prompt", pairs, pairs, even_share,
                            RlParams(learning_rate=3e-2, max_steps=2, batch_size=8, num_generations=4,
                                     max_completion_length=4, bf16=False, beta=0.01, eval_prompts=4),
                            tmp_path / "rl", seed=0)
    assert rl_result.continued_adapter and rl_result.before["kl"] == 0.0  # the reference is the SFT prompt
    assert read_method_file(rl_result.output_dir)["method"] == "multitask_prompt"
    assert not torch.allclose(logits(Path(rl_result.output_dir)), logits(sft))

    student = distill_student(out, _sft_records(), _sft_records()[:4],
                              DistillParams(student_layers=1, max_steps=2, batch_size=4, max_length=64, bf16=False),
                              tmp_path / "distill", seed=0, cache_dir=tmp_path / "cache", teacher_base_dir=base)
    assert student.steps == 2 and math.isfinite(student.val_kl_after) and len(student.student_layers) == 1


@pytest.mark.slow
def test_dpo_recipe_cli_writes_result_and_teacher_ready_model(
    tmp_path: Path, sft_run: tuple[Path, Path], capsys: pytest.CaptureFixture
) -> None:
    from tuneline import storage
    from tuneline.models.provision import model_ref
    from tuneline.recipes import dpo as recipe
    from tuneline.records import write_jsonl
    from tuneline.refs import ModelRef

    base, adapter = sft_run
    write_jsonl(tmp_path / "pairs.jsonl", (p.to_dict() for p in _pairs()))
    base_ref = model_ref(base, base.as_uri(), method="tiny", stage="test")
    spec = {
        "sft": model_ref(adapter, adapter.as_uri(), method="lora", stage="sft_adapter", base=base_ref).to_dict(),
        "train_uri": (tmp_path / "pairs.jsonl").as_uri(), "val_uri": (tmp_path / "pairs.jsonl").as_uri(),
        "out_uri": (tmp_path / "dpo").as_uri(), "seed": 0, "max_steps": 2,
        "params": {"learning_rate": 5e-3, "batch_size": 8, "max_length": 64, "bf16": False,
                   "lora": {"r": 4, "alpha": 8, "dropout": 0.0}},
    }
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    assert recipe.main(["--spec", str(tmp_path / "spec.json")]) == 0
    result = json.loads((tmp_path / "dpo" / "result.json").read_text())
    assert result["metrics"]["steps"] == 2 and result["metrics"]["ref_model_is_none"]
    model = ModelRef.from_dict(result["model"])
    assert model.kind == "full" and model.method == "dpo"
    assert (storage.local_path(model.uri) / "model.safetensors").is_file()
    out = capsys.readouterr().out
    assert '"step": 1' in out and "dpo done" in out

    (tmp_path / "bad.json").write_text(json.dumps({**spec, "params": {"betta": 0.1}}))
    assert recipe.main(["--spec", str(tmp_path / "bad.json")]) == 1
    assert "unknown key params.betta" in capsys.readouterr().err


@pytest.mark.slow
def test_dpo_after_qlora_trains_on_the_4bit_merged_model_without_an_fp32_copy(
    tmp_path: Path, sft_run: tuple[Path, Path]
) -> None:
    """A QLoRA SFT adapter merges into its base in the compute dtype (bf16 where native) and DPO loads that merged
    model in 4-bit again: policy and reference are the quantized model with and without the fresh adapter."""
    import bitsandbytes as bnb
    import torch
    from safetensors import safe_open

    from tuneline.models.loading import bf16_supported
    from tuneline.train.sft import train_sft

    base, _ = sft_run
    sft = train_sft(base, _sft_records(), _sft_records()[:4], SftParams(
        method="qlora", learning_rate=5e-3, batch_size=8, eval_steps=3, save_steps=3, bf16=None,
        lora=LoraParams(r=8, alpha=16, dropout=0.0), group_by_length=False), tmp_path / "sft", seed=0, max_steps=3)
    params = DpoParams(beta=0.1, learning_rate=5e-3, batch_size=8, max_length=64, bf16=None,
                       lora=LoraParams(r=8, alpha=16, dropout=0.0))
    merged, info = dpo.merged_sft_base(sft.output_dir, base, "qlora", tmp_path / "probe")
    compute = info["quantization"]["compute_dtype"]
    assert compute == ("bfloat16" if bf16_supported("cpu") else "float32")
    assert info["merged_into"].startswith(compute) and info["max_abs_diff"] <= info["tolerance"]
    with safe_open(str(merged / "model.safetensors"), "pt") as f:
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}
    assert dtypes == {"BF16" if compute == "bfloat16" else "F32"}, dtypes

    trainer = dpo.build_dpo_trainer(merged, _pairs(), params, tmp_path / "probe" / "ckpt", seed=0, max_steps=1,
                                    quantization=info["quantization"])
    linears = [m for m in trainer.model.modules() if isinstance(m, torch.nn.Linear)]
    four_bit = [m for m in linears if isinstance(m, bnb.nn.Linear4bit)]
    assert four_bit and trainer.ref_model is None and dpo._adapter_is_fresh(trainer.model)
    assert not any(p.requires_grad for n, p in trainer.model.named_parameters() if "lora_" not in n)
    del trainer

    result = dpo.train_dpo(sft.output_dir, base, "qlora", _pairs(), _pairs(), params, tmp_path / "dpo", seed=0,
                           max_steps=2)
    assert result.steps == 2 and result.merge["quantization"] == info["quantization"]
    model_dir = dpo.load_dpo_model(tmp_path / "dpo")
    merge = json.loads((model_dir / dpo.MERGE_MARKER).read_text())
    assert merge["method"] == "qlora" and merge["merged_into"].startswith(compute)


def test_sft_weight_adds_the_chosen_nll_to_the_dpo_loss(tmp_path: Path, sft_run: tuple[Path, Path]) -> None:
    """dpo.sft_weight > 0 trains DPO + weight x NLL of the chosen answers (RPO); 0 is plain DPO."""
    from tuneline.params import RecipeError

    base, adapter = sft_run
    merged, _ = dpo.merged_sft_base(adapter, base, "lora", tmp_path / "probe")
    common = dict(beta=0.1, learning_rate=5e-3, batch_size=8, max_length=64, bf16=False)
    plain = dpo.build_dpo_trainer(merged, _pairs(), DpoParams(**common), tmp_path / "a", seed=0, max_steps=1)
    assert list(plain.args.loss_type) == ["sigmoid"]
    rpo = dpo.build_dpo_trainer(merged, _pairs(), DpoParams(sft_weight=2.0, **common), tmp_path / "b", seed=0,
                                max_steps=1)
    assert list(rpo.args.loss_type) == ["sigmoid", "sft"] and list(rpo.args.loss_weights) == [1.0, 2.0]
    with pytest.raises(RecipeError, match="sft_weight"):
        DpoParams(sft_weight=-1.0)


@pytest.mark.slow
def test_dpo_the_reward_model_and_rl_share_one_merge_of_the_sft_adapter(
    tmp_path: Path, sft_run: tuple[Path, Path]
) -> None:
    """The three stages that start from a LoRA SFT model find one merge, in the shared cache entry named by the
    content hash, instead of writing one merged copy each; a different adapter gets its own entry."""
    from tuneline.models.provision import model_ref
    from tuneline.params import RewardParams, RlParams
    from tuneline.recipes import dpo as dpo_recipe
    from tuneline.recipes import reward as reward_recipe
    from tuneline.recipes import rl as rl_recipe
    from tuneline.records import write_jsonl
    from tuneline.specs import DpoSpec, RewardSpec, RlSpec

    base, adapter = sft_run
    sft = model_ref(adapter, adapter.as_uri(), method="lora", stage="sft_adapter",
                    base=model_ref(base, base.as_uri(), method="tiny", stage="base_model"))
    write_jsonl(tmp_path / "pairs.jsonl", (p.to_dict() for p in _pairs()))
    pairs_uri, cache = (tmp_path / "pairs.jsonl").as_uri(), tmp_path / "merged_sft"
    common = dict(seed=0, max_steps=1, merge_cache_uri=cache.as_uri())

    dpo_out = dpo_recipe.run(DpoSpec(
        out_uri=(tmp_path / "dpo").as_uri(), sft=sft, train_uri=pairs_uri, val_uri=pairs_uri, merge=False,
        params=DpoParams(batch_size=8, max_length=64, bf16=False, lora=LoraParams(r=8, alpha=16, dropout=0.0)),
        **common))
    reward_out = reward_recipe.run(RewardSpec(
        out_uri=(tmp_path / "reward").as_uri(), sft=sft, train_uris=(pairs_uri,), val_uri=pairs_uri,
        params=RewardParams(max_steps=1, batch_size=8, max_length=64, bf16=False), **common))
    rl_out = rl_recipe.run(RlSpec(
        out_uri=(tmp_path / "rl").as_uri(), sft=sft, reward_model=reward_out.model, algorithm="rloo",
        train_uri=pairs_uri, val_uri=pairs_uri, params=RlParams(
            max_steps=1, batch_size=8, num_generations=4, max_completion_length=4, bf16=False, eval_prompts=4),
        **common))

    key = dpo.merge_cache_key(adapter, sft.base.sha256, "lora")
    assert [p.name for p in cache.iterdir()] == [key]  # one entry, no temporary folder left behind
    merged = cache / key / dpo.MERGED_SUBDIR
    assert (merged / dpo.MERGE_MARKER).is_file()
    assert [o.metrics["sft_merge_reused"] for o in (dpo_out, reward_out, rl_out)] == [False, True, True]
    assert dpo_out.model.base.uri == merged.as_uri()  # the DPO adapter names the shared merge as its base
    assert rl_out.details["merged_base_dir"] == str(merged)  # RL's policy adapter and KL reference: the same merge
    assert not any((tmp_path / stage / dpo.MERGED_SUBDIR).exists() for stage in ("dpo", "reward", "rl"))
    # the key is the content: another adapter file, another base or another method is another merge
    assert dpo.merge_cache_key(base, sft.base.sha256, "lora") != key
    assert dpo.merge_cache_key(adapter, "0" * 64, "lora") != key
    assert dpo.merge_cache_key(adapter, sft.base.sha256, "full") is None  # full weights: nothing to merge
    assert dpo.merge_cache_key(adapter, sft.base.sha256, "prompt") is None  # virtual tokens: the base itself


def test_a_pair_row_holds_prompt_chosen_rejected_with_the_rejected_blind_to_the_chosen() -> None:
    """dpo_shared.pack_pairs: one row per pair, positions restarting at the rejected answer, a mask under which the
    rejected tokens see the prompt and themselves only, and every answer token scored once, from the position before
    it in its own sequence; cut at max_length as TRL's collator cuts prompt + answer."""
    import torch
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    from tuneline.train.dpo_shared import pack_pairs

    examples = [{"prompt_ids": [11, 12, 13], "chosen_ids": [21, 22], "rejected_ids": [31, 32, 33]},
                {"prompt_ids": [14], "chosen_ids": [23], "rejected_ids": [34]}]
    packed = pack_pairs(examples, pad_token_id=0, max_length=None)
    assert packed["input_ids"].tolist() == [[11, 12, 13, 21, 22, 31, 32, 33], [14, 23, 34, 0, 0, 0, 0, 0]]
    assert packed["position_ids"][0].tolist() == [0, 1, 2, 3, 4, 3, 4, 5]
    assert packed["position_ids"][1, :3].tolist() == [0, 1, 1]
    allowed = packed["allowed"][0]
    assert allowed[5].tolist() == [True, True, True, False, False, True, False, False]  # first rejected token
    assert allowed[4].tolist() == [True] * 5 + [False] * 3  # the chosen answer: plain causal
    assert not packed["allowed"][1][:, 3:].any() and packed["allowed"][1][3:, 0].all()  # padding: never a key
    scored = sorted(zip(packed["seq"].tolist(), packed["pred_row"].tolist(), packed["pred_col"].tolist(),
                        packed["target"].tolist()))
    assert scored == [(0, 0, 2, 21), (0, 0, 3, 22), (1, 1, 0, 23), (2, 0, 2, 31), (2, 0, 5, 32), (2, 0, 6, 33),
                      (3, 1, 0, 34)]

    # cut: the same answer tokens as TRL's collator keeps (its completion mask), sequence by sequence
    for max_length in (2, 3, 4, 5):
        cut = pack_pairs(examples, pad_token_id=0, max_length=max_length)
        trl_batch = DataCollatorForPreference(pad_token_id=0, max_length=max_length)(examples)
        trl_tokens = sorted((i, int(t)) for i, (ids, m) in enumerate(zip(trl_batch["input_ids"],
                                                                        trl_batch["completion_mask"]))
                            for t, keep in zip(ids, m) if keep)
        assert sorted(zip(cut["seq"].tolist(), cut["target"].tolist())) == trl_tokens, max_length
        assert int(cut["pairs"]) == 2 and cut["input_ids"].dtype == torch.long


@pytest.mark.parametrize("attention,checkpointing", [("eager", False), ("sdpa", False), ("eager", True)])
def test_shared_prompt_rows_give_trls_loss_gradients_and_rewards(
    tmp_path: Path, sft_run: tuple[Path, Path], attention: str, checkpointing: bool
) -> None:
    """The stage's trainer feeds pairs as shared-prompt rows; on the same pairs TRL's own two-row path gives the same
    loss (DPO + the chosen NLL), LoRA gradients and logged rewards to fp32 rounding, answers cut short included, and
    with activation checkpointing on (the recipe's compute.gradient_checkpointing)."""
    import torch
    from trl import DPOTrainer
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    base, adapter = sft_run
    merged, _ = dpo.merged_sft_base(adapter, base, "lora", tmp_path / "probe")
    for max_length in (64, 14):
        params = DpoParams(beta=0.1, learning_rate=5e-3, batch_size=8, max_length=max_length, bf16=False,
                           sft_weight=0.5, lora=LoraParams(r=8, alpha=16, dropout=0.0))
        trainer = dpo.build_dpo_trainer(merged, _pairs(), params, tmp_path / f"ckpt{max_length}", seed=0,
                                        max_steps=1, gradient_checkpointing=checkpointing)
        assert trainer.shared_prompts and trainer.args.gradient_checkpointing == checkpointing
        trainer.model.train()
        if checkpointing:  # as the Trainer's train() turns it on
            trainer.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            assert trainer.model.get_base_model().is_gradient_checkpointing
        trainer.model.set_attn_implementation(attention)
        torch.manual_seed(0)
        for name, p in trainer.model.named_parameters():
            if "lora_B" in name:  # the policy away from the reference, so the log-ratios are not all zero
                p.data.normal_(0, 0.05)
        examples = [trainer.train_dataset[i] for i in range(len(QA))]
        trl_batch = DataCollatorForPreference(pad_token_id=trainer.data_collator.pad_token_id,
                                              max_length=max_length)(examples)
        assert any(len(e["prompt_ids"]) + len(e["chosen_ids"]) > max_length for e in examples) == (max_length == 14)

        def run(compute, batch):
            trainer.model.zero_grad()
            loss = compute(trainer.model, batch, False)
            loss.backward()
            grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
            return float(loss.detach()), grads, {k: v[-1] for k, v in trainer._metrics["train"].items()}

        trl_loss, trl_grads, trl_logs = run(lambda m, b, r: DPOTrainer._compute_loss(trainer, m, b, r), trl_batch)
        calls = []
        layer = trainer.model.get_base_model().model.layers[0].mlp  # inside the checkpointed forward
        hook = layer.register_forward_pre_hook(lambda *args: calls.append(1))  # a recompute may stop inside it
        loss, grads, logs = run(trainer._compute_loss, trainer.data_collator(examples))
        hook.remove()
        assert len(calls) == (3 if checkpointing else 2)  # policy, reference (and the policy's recompute)
        assert loss == pytest.approx(trl_loss, rel=1e-5)
        assert grads.keys() == trl_grads.keys() and all("lora_" in n for n in grads)
        for name, grad in grads.items():
            assert torch.allclose(grad, trl_grads[name], rtol=1e-4, atol=1e-6 * float(trl_grads[name].abs().max()))
        for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected"):
            assert logs[key] == pytest.approx(trl_logs[key], rel=1e-4, abs=1e-6), key
        assert logs["rewards/accuracies"] == trl_logs["rewards/accuracies"]


def test_trls_own_rows_stay_where_the_shared_prompt_path_does_not_apply(tmp_path: Path,
                                                                       sft_run: tuple[Path, Path]) -> None:
    """A loss other than sigmoid/sft, precomputed reference log-probs, TRL's loss weighting or answers cut from the
    start: TRL's path, unchanged (several ranks and virtual tokens too: the scale-out and methods chain tests)."""
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    from tuneline.train.dpo_shared import shares_prompts

    base, adapter = sft_run
    merged, _ = dpo.merged_sft_base(adapter, base, "lora", tmp_path / "probe")
    params = DpoParams(beta=0.1, learning_rate=5e-3, batch_size=8, max_length=64, bf16=False)
    trainer = dpo.build_dpo_trainer(merged, _pairs(), params, tmp_path / "ckpt", seed=0, max_steps=1)
    packed = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
    with pytest.raises(ValueError, match="no full logits"):  # not TRL's path handed one-row batches
        trainer.compute_loss(trainer.model, packed, return_outputs=True)
    trainer.data_collator = DataCollatorForPreference(pad_token_id=0)
    assert shares_prompts(trainer)
    for attribute, value in (("loss_types", ["ipo"]), ("precompute_ref_logps", True), ("use_weighting", True)):
        before = getattr(trainer, attribute)
        setattr(trainer, attribute, value)
        assert not shares_prompts(trainer), attribute
        setattr(trainer, attribute, before)
    trainer.data_collator.truncation_mode = "keep_end"
    assert not shares_prompts(trainer)
    trainer.data_collator.truncation_mode = "keep_start"
    assert shares_prompts(trainer)
    trainer.model.config._attn_implementation = "flash_attention_2"  # its varlen kernel ignores a 4D mask
    assert not shares_prompts(trainer)


def test_reference_log_probs_computed_once_are_the_per_step_ones_and_give_the_same_step(
    tmp_path: Path, sft_run: tuple[Path, Path]
) -> None:
    """Where a run's steps cover every pair, each pair's reference log-probs come from one pass (length order,
    batches of other shapes, the adapter disabled) and equal the step's own reference pass pair by pair; a step
    then runs the policy alone, with the same loss and gradients. Evaluation, batches without pair indices and
    runs that see only some pairs keep the per-step pass."""
    import contextlib

    import torch

    from tuneline.train.common import reference_context
    from tuneline.train.dpo_shared import PAIR_INDEX, additive_mask, answer_logps, reference_logps

    base, adapter = sft_run
    merged, _ = dpo.merged_sft_base(adapter, base, "lora", tmp_path / "probe")
    params = DpoParams(beta=0.1, learning_rate=5e-3, batch_size=4, max_length=64, bf16=False, sft_weight=0.5,
                       lora=LoraParams(r=8, alpha=16, dropout=0.0))
    trainer = dpo.build_dpo_trainer(merged, _pairs(), params, tmp_path / "ckpt", seed=0, max_steps=2)
    assert trainer.shared_prompts
    torch.manual_seed(0)
    for name, p in trainer.model.named_parameters():
        if "lora_B" in name:  # the policy away from the reference: the pass has to disable the adapter
            p.data.normal_(0, 0.05)
    dataset, pad = trainer.train_dataset, trainer.data_collator.pad_token_id
    n = len(dataset)
    assert dataset[PAIR_INDEX] == list(range(n))
    lengths = [len(e["prompt_ids"]) + len(e["chosen_ids"]) + len(e["rejected_ids"]) for e in dataset]
    assert lengths != sorted(lengths)  # length order is not record order: putting rows back matters

    trainer.model.train()
    table = reference_logps(trainer.model, dataset, pad, 64, 3, contextlib.nullcontext())
    assert trainer.model.training and table.shape == (n, 2)
    batch = trainer.data_collator([dataset[i] for i in range(n)])
    lm = trainer.model.get_base_model()
    mask = additive_mask(batch["allowed"], lm.dtype)
    with torch.no_grad():
        _, policy = answer_logps(lm, batch, mask)
        with reference_context(trainer.model):
            _, reference = answer_logps(lm, batch, mask)
    assert torch.allclose(table[:, 0], reference[:n], rtol=1e-5, atol=1e-5)
    assert torch.allclose(table[:, 1], reference[n:], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(table[:, 0], policy[:n], rtol=1e-3, atol=1e-3)

    calls = []
    hook = lm.model.layers[0].mlp.register_forward_pre_hook(lambda *args: calls.append(1))

    def step(examples):
        calls.clear()
        trainer.model.zero_grad()
        loss = trainer._compute_loss(trainer.model, trainer.data_collator(examples), False)
        loss.backward()
        return float(loss.detach()), {k: p.grad.clone() for k, p in trainer.model.named_parameters()
                                      if p.grad is not None}

    examples = [dataset[i] for i in (5, 2, 7, 0)]
    trainer.state.max_steps = 2  # 2 steps of 4 pairs: all 8
    assert trainer.covers_every_pair()
    step(examples)  # builds the table (its pass goes through the layer as well)
    assert trainer.reference_table is not None
    cached_loss, cached_grads = step(examples)
    assert len(calls) == 1  # the policy only
    trainer.reference_table = None
    loss, grads = step([{k: v for k, v in e.items() if k != PAIR_INDEX} for e in examples])
    assert len(calls) == 2 and trainer.reference_table is None  # no indices: policy and reference
    assert cached_loss == pytest.approx(loss, rel=1e-5)
    assert cached_grads.keys() == grads.keys()
    for name, grad in grads.items():
        assert torch.allclose(cached_grads[name], grad, rtol=1e-4, atol=1e-6 * float(grad.abs().max())), name
    trainer.state.max_steps = 1  # 4 of the 8 pairs: a pass over all would cost more than it saves
    assert not trainer.covers_every_pair()
    step(examples)
    assert len(calls) == 2 and trainer.reference_table is None
    trainer.state.max_steps = 2
    trainer.model.eval()
    with torch.no_grad():
        trainer._compute_loss(trainer.model, trainer.data_collator(examples), False)
    assert trainer.reference_table is None
    hook.remove()
