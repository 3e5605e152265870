"""The memory planner: config-only estimates, the cheapest fitting setting, the CLI, and accuracy against a
measured peak (the tiny model, peak RSS growth on CPU, within 15%)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[2]
TINY = dict(vocab_size=4096, hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=4, max_position_embeddings=512, tie_word_embeddings=True)
BIG = dict(vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
           num_key_value_heads=8, max_position_embeddings=8192, tie_word_embeddings=False)


@pytest.fixture(scope="module")
def configs(tmp_path_factory) -> dict[str, Path]:
    from transformers import LlamaConfig

    root = tmp_path_factory.mktemp("configs")
    LlamaConfig(**TINY).save_pretrained(root / "tiny")
    LlamaConfig(**BIG).save_pretrained(root / "llama70b")  # a config only: no weights anywhere
    return {"tiny": root / "tiny", "llama70b": root / "llama70b"}


def test_parse_size():
    from tuneline.train.memory import parse_size

    assert parse_size("24GiB") == 24 * 2**30 and parse_size("12G") == 12 * 2**30
    assert parse_size("80GB") == 80 * 10**9 and parse_size("512MiB") == 512 * 2**20 and parse_size("1000") == 1000
    with pytest.raises(ValueError, match="not a memory size"):
        parse_size("lots")


def test_shape_and_trainable_counts_match_the_built_models(configs):
    import torch
    from peft import LoraConfig, PromptTuningConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    from tuneline.train.bottleneck import BottleneckConfig, add_bottleneck_adapters
    from tuneline.train.memory import model_shape, trainable_params

    shape = model_shape(configs["tiny"])
    config = AutoConfig.from_pretrained(configs["tiny"])

    def build():
        return AutoModelForCausalLM.from_config(config)

    assert shape.n_params == sum(p.numel() for p in build().parameters())
    assert shape.layers == 4 and shape.n_untied_head == 0 and shape.vocab == 4096

    def trainable(model):
        return sum(p.numel() for p in model.parameters() if p.requires_grad)

    lora = get_peft_model(build(), LoraConfig(r=8, target_modules="all-linear"))
    assert trainable_params(shape, "lora", lora_r=8) == trainable(lora)
    prompt = get_peft_model(build(), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=10))
    assert trainable_params(shape, "prompt", num_virtual_tokens=10) == trainable(prompt)
    model = build()
    add_bottleneck_adapters(model, BottleneckConfig(reduction_factor=16))
    assert trainable_params(shape, "adapter", reduction_factor=16) == trainable(model)
    assert torch.device("meta") != torch.device("cpu")  # model_shape itself never allocated weights


def test_70b_does_not_fit_12gib_and_the_plan_says_what_would(configs):
    from tuneline.train.memory import GIB, Setting, estimate, model_shape, plan

    shape = model_shape(configs["llama70b"])
    assert 69e9 < shape.n_params < 72e9
    result = plan(shape, "qlora", budget_bytes=12 * GIB, batch=1, seq_len=1024, dtype="bf16", device="cuda")
    assert result["fits"] is False and result["breakdown"]["weights"] > 30 * GIB  # 4-bit 70B alone is ~38 GiB
    rec = result["recommendation"]
    assert rec["fits"] and rec["peak_bytes"] <= 12 * GIB and rec["setting"]["offload"] == "params"
    # on CPU there is no ZeRO: nothing fits in 12 GiB, and the plan says so
    cpu = plan(shape, "qlora", budget_bytes=12 * GIB, batch=1, seq_len=1024, device="cpu")
    assert not cpu["fits"] and not cpu["recommendation"]["fits"] and "ZeRO" in cpu["recommendation"]["text"]
    # each saving really lowers the estimate
    base = estimate(shape, "lora", Setting(dtype="bf16", micro_batch=4), batch=4, seq_len=2048, device="cuda")
    ckpt = estimate(shape, "lora", Setting(dtype="bf16", gradient_checkpointing=True, micro_batch=4), batch=4,
                    seq_len=2048, device="cuda")
    quant = estimate(shape, "lora", Setting(dtype="bf16", quant4=True, micro_batch=4), batch=4, seq_len=2048,
                     device="cuda")
    assert ckpt.breakdown["activations"] < base.breakdown["activations"] / 5
    assert quant.breakdown["weights"] < base.breakdown["weights"] / 3


def test_cli_json_has_the_promised_fields(configs, capsys):
    from pipelines.cli import main

    assert main(["plan", "--model", str(configs["tiny"]), "--method", "lora", "--gpu-memory", "24GiB", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["fits"] is True and isinstance(out["peak_bytes"], int)
    assert {"weights", "gradients", "optimizer", "activations"} <= set(out["breakdown"])
    assert out["recommendation"]["fits"] and "text" in out["recommendation"]
    assert main(["plan", "--model", str(configs["tiny"]), "--method", "full", "--zero", "3"]) == 2  # CPU: no ZeRO


@pytest.mark.slow
def test_tiny_estimate_is_within_15_percent_of_the_measured_peak(configs):
    """A fresh process builds the tiny model and trains 2 AdamW steps (fp32, batch 8 x 256); its peak RSS growth
    is compared with the estimate (bench/plan_accuracy.py does the same for a ~110 M model)."""
    from tuneline.train.memory import Setting, estimate, model_shape

    child = json.dumps([str(configs["tiny"]), "full", 8, 256, False, False])
    env = {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "2", "MALLOC_MMAP_THRESHOLD_": str(128 * 1024),
           "PATH": "/usr/bin:/bin", "HOME": str(Path.home())}
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "plan_accuracy.py"), "--child", child],
                          capture_output=True, text=True, env=env, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    measured = json.loads(proc.stdout.strip().splitlines()[-1])["peak_bytes"]
    est = estimate(model_shape(configs["tiny"]), "full", Setting(micro_batch=8), batch=8, seq_len=256)
    error = (est.peak_bytes - measured) / measured
    assert abs(error) < 0.15, f"estimate {est.peak_bytes / 2**20:.0f} MiB vs measured {measured / 2**20:.0f} MiB"
