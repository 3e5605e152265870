"""The recipe's offload section: device_map loading across CPU and disk gives the same logits; ZeRO configs."""

from __future__ import annotations

from pathlib import Path

import pytest

from tuneline.params import OffloadParams, Recipe, RecipeError, build

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)
    out = tmp_path_factory.mktemp("offload-model")
    LlamaForCausalLM(config).save_pretrained(out)
    return out


def test_device_map_offload_to_disk_keeps_the_logits(model_dir, tmp_path):
    from tuneline.models.loading import load_causal_lm
    from tuneline.models.offload import device_map_kwargs, placement_summary, plan_device_map

    params = OffloadParams(inference=True, max_memory={"cpu": "450KiB"}, offload_folder=str(tmp_path / "off"))
    kwargs = device_map_kwargs(params)
    assert kwargs["max_memory"] == {"cpu": 450 * 1024} and kwargs["device_map"] == "auto"
    planned = plan_device_map(model_dir, params)
    assert "disk" in set(map(str, planned.values())) and "cpu" in set(map(str, planned.values()))
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))
    plain = load_causal_lm(model_dir)
    offloaded = load_causal_lm(model_dir, offload=params)
    placed = placement_summary(offloaded)
    assert placed.get("disk", 0) > 0, placed
    # (safetensors weights placed on "disk" are read from the checkpoint itself: nothing needs copying into the folder)
    with torch.no_grad():
        assert torch.allclose(plain(input_ids=ids).logits, offloaded(input_ids=ids).logits, atol=1e-5)
    assert device_map_kwargs(OffloadParams()) == {}  # inference offload off: plain loading


def test_zero_configs_and_recipe_checks():
    from tuneline.models.offload import check_zero_runs, zero_config

    assert zero_config(OffloadParams(), bf16=True) is None
    cfg = zero_config(OffloadParams(zero_stage=3, offload_optimizer=True, offload_params=True), bf16=True)
    zero = cfg["zero_optimization"]
    assert zero["stage"] == 3 and zero["offload_optimizer"]["device"] == "cpu" and zero["offload_param"]["device"] == "cpu"
    assert cfg["bf16"]["enabled"] and cfg["train_micro_batch_size_per_gpu"] == "auto"
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="needs CUDA"):
            check_zero_runs(OffloadParams(zero_stage=2))
    with pytest.raises(RecipeError, match="offload_params needs offload.zero_stage: 3"):
        OffloadParams(zero_stage=2, offload_params=True)
    with pytest.raises(RecipeError, match="not a memory size"):
        OffloadParams(max_memory={"cpu": "lots"})
    base = {"name": "t", "model": {"build": "tiny"}, "data": {"demo": {}}}
    recipe = build(Recipe, {**base, "offload": {"inference": True, "max_memory": {"0": "20GiB", "cpu": "48GiB"}}})
    assert recipe.offload.max_memory == {"0": "20GiB", "cpu": "48GiB"}
    with pytest.raises(RecipeError, match="unknown key offload.zero"):
        build(Recipe, {**base, "offload": {"zero": 3}})
