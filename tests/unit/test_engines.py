"""The recipe's ``compute`` section: device checks before training, the FSDP/DeepSpeed configs it renders (validated
by accelerate's and DeepSpeed's own config classes), and gradient checkpointing that trains to the same loss."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tuneline.params import ComputeParams, OffloadParams, Recipe, RecipeError, SftParams, build
from tuneline.train import engines

torch = pytest.importorskip("torch")
ROOT = Path(__file__).resolve().parents[2]
NO_CUDA = not torch.cuda.is_available()


def recipe(**sections) -> Recipe:
    return build(Recipe, {"name": "t", "model": {"build": "tiny"}, "data": {"demo": {}}, **sections})


@pytest.mark.skipif(not NO_CUDA, reason="checks what a machine without CUDA does")
def test_a_cpu_run_never_asks_for_cuda_and_a_cuda_recipe_fails_before_training():
    assert engines.check_compute(ComputeParams()) == "cpu"
    assert engines.check_compute(ComputeParams(device="cpu")) == "cpu"
    with pytest.raises(ValueError, match="compute.device: cuda but no CUDA device is visible"):
        engines.check_compute(ComputeParams(device="cuda"))
    for engine in ("fsdp", "deepspeed"):
        with pytest.raises(ValueError, match=f"compute.engine: {engine} needs CUDA"):
            engines.check_compute(ComputeParams(engine=engine))


@pytest.mark.skipif(not NO_CUDA, reason="checks what a machine without CUDA does")
def test_a_trainer_asked_for_cuda_stops_at_its_spec_with_the_reason(tmp_path):
    """The recipe runner checks ``compute`` right after reading the spec, before any model or data loads."""
    from tuneline.recipes.sft import main
    from tuneline.refs import ModelRef
    from tuneline.specs import SftSpec

    missing = tmp_path / "nowhere"
    base = ModelRef(uri=str(missing), sha256="0" * 64, kind="full", method="tiny", stage="base_model")
    spec = SftSpec(out_uri=str(tmp_path / "out"), seed=0, base=base, train_uri=str(missing / "train.jsonl"),
                   val_uri=str(missing / "val.jsonl"), params=SftParams(), compute=ComputeParams(device="cuda"),
                   error_file=str(tmp_path / "error.txt"))
    path = tmp_path / "spec.json"
    spec.save(str(path))
    assert main(["--spec", str(path)]) == 1
    error = (tmp_path / "error.txt").read_text()
    assert "compute.device: cuda but no CUDA device is visible" in error
    assert "nowhere" not in error  # it stopped before touching the data or the model


def test_recipe_rejects_engine_combinations_that_cannot_run():
    with pytest.raises(RecipeError, match="compute.engine: deepspeed needs offload.zero_stage"):
        recipe(compute={"engine": "deepspeed"})
    with pytest.raises(RecipeError, match="set compute.engine: deepspeed"):
        recipe(offload={"zero_stage": 2})
    with pytest.raises(RecipeError, match="compute.engine: fsdp needs CUDA devices but compute.device is cpu"):
        recipe(compute={"engine": "fsdp", "device": "cpu"})
    with pytest.raises(RecipeError, match="compute"):
        recipe(compute={"engine": "megatron"})
    ok = recipe(compute={"engine": "deepspeed", "gradient_checkpointing": True}, offload={"zero_stage": 3})
    assert ok.compute.trainer_checkpointing() is True
    assert recipe(compute={"engine": "fsdp", "gradient_checkpointing": True}).compute.trainer_checkpointing() is False


def test_gpu_recipes_check_out_on_cuda_with_checkpointing():
    from tuneline.params import load_recipe

    for name in ("qwen2.5-0.5b-lora.yaml", "llama3-8b-qlora.yaml"):
        r = load_recipe(ROOT / "configs" / name)
        assert r.compute.device == "cuda" and r.compute.gradient_checkpointing, name


def test_deploy_files_are_what_the_code_renders():
    """deploy/accelerate/ holds exactly the rendered configs (regenerate: python -m tuneline.train.engines)."""
    target = ROOT / "deploy" / "accelerate"
    rendered = engines.deploy_files()
    assert sorted(p.name for p in target.iterdir()) == sorted(rendered)
    for name, text in rendered.items():
        assert (target / name).read_text(encoding="utf-8") == text, f"{name} is stale"


@pytest.mark.parametrize("name", sorted(engines.DEPLOY_SETTINGS))
def test_accelerate_configs_validate_with_accelerate(name):
    compute, offload = engines.DEPLOY_SETTINGS[name]
    config = engines.accelerate_config(compute, num_processes=2, bf16=True, offload=offload)
    cluster = engines.validate_accelerate_config(config)
    expected = {"ddp": "MULTI_GPU", "fsdp": "FSDP", "zero2": "DEEPSPEED", "zero3_offload": "DEEPSPEED"}[name]
    assert str(cluster.distributed_type).endswith(expected)
    assert cluster.num_processes == 2 and cluster.mixed_precision == "bf16"
    if name == "fsdp":
        assert cluster.fsdp_config["fsdp_version"] == 2 and cluster.fsdp_config["fsdp_activation_checkpointing"]
    broken = {**config, "fsdp_confg": {}}
    with pytest.raises(ValueError, match="unknown keys"):
        engines.validate_accelerate_config(broken)


def test_zero_configs_validate_with_deepspeed_and_typos_are_rejected():
    pytest.importorskip("deepspeed", reason="deepspeed (installed by make install, DS_BUILD_OPS=0) validates ZeRO")
    from tuneline.models.offload import zero_config

    for name in ("zero2", "zero3_offload"):
        text = (ROOT / "deploy" / "accelerate" / f"{name}.deepspeed.json").read_text()
        checked = engines.validate_deepspeed_config(json.loads(text), micro_batch=2, accumulation=4)
        stage = engines.DEPLOY_SETTINGS[name][1].zero_stage
        assert checked.zero_config.stage == stage and checked.train_batch_size == 8
        assert checked.zero_config.offload_optimizer.device == "cpu"
    zero3 = zero_config(OffloadParams(zero_stage=3, offload_params=True, offload_optimizer=True), bf16=True)
    assert engines.validate_deepspeed_config(zero3).zero_config.offload_param.device == "cpu"
    zero3["zero_optimization"]["stage3_prefetch_bucket"] = 5  # a typo of stage3_prefetch_bucket_size
    with pytest.raises(Exception, match="stage3_prefetch_bucket"):
        engines.validate_deepspeed_config(zero3)


def test_fsdp_launches_through_accelerate_with_the_rendered_config(tmp_path):
    import yaml

    from resources.launcher import PipesSubprocessLauncher
    from tuneline.specs import DpoSpec

    spec_path = tmp_path / "spec.json"
    spec = DpoSpec.__new__(DpoSpec)  # only module, compute and params are read
    object.__setattr__(spec, "compute", ComputeParams(device="cuda", engine="fsdp", gradient_checkpointing=True))
    object.__setattr__(spec, "params", recipe().dpo)
    cmd = PipesSubprocessLauncher(python="python").command(spec, spec_path, 2)
    assert cmd[:3] == ["python", "-m", "accelerate.commands.launch"]
    assert cmd[cmd.index("--module") + 1] == "tuneline.recipes.dpo" and cmd[-2:] == ["--spec", str(spec_path)]
    written = yaml.safe_load(Path(cmd[cmd.index("--config_file") + 1]).read_text())
    assert written["distributed_type"] == "FSDP" and written["num_processes"] == 2
    ddp = PipesSubprocessLauncher(python="python").command(
        type("S", (), {"compute": ComputeParams(), "module": "tuneline.recipes.sft"})(), spec_path, 2)
    assert "torch.distributed.run" in ddp


def test_gradient_checkpointing_trains_to_the_same_losses(tmp_path):
    """Activation checkpointing recomputes the forward in backward: same losses, step by step (LoRA on a tiny Llama)."""
    from tuneline.models.tiny import init_tiny_model, save_model, train_tokenizer
    from tuneline.params import LoraParams, TinyModelParams
    from tuneline.records import ChatRecord
    from tuneline.train.sft import train_sft

    rows = [ChatRecord(kind="sft", source="t", line=i, messages=[
        {"role": "user", "content": f"count to {i % 7}"}, {"role": "assistant", "content": " ".join("abcdefg"[: i % 7 + 1])}])
        for i in range(24)]
    tiny = TinyModelParams(vocab_size=320, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=2,
                           num_kv_heads=2, max_position_embeddings=128, tokenizer_min_frequency=1)
    tokenizer = train_tokenizer([m["content"] for r in rows for m in r.messages], tiny)
    base = save_model(init_tiny_model(tokenizer, tiny, seed=0), tokenizer, tmp_path / "base")
    params = SftParams(method="lora", max_steps=4, batch_size=4, eval_steps=4, save_steps=4, learning_rate=1e-2,
                       lora=LoraParams(r=4, alpha=8, dropout=0.0), bf16=False)
    from transformers import TrainerCallback

    class Seen(TrainerCallback):
        checkpointing: list = []

        def on_step_end(self, args, state, control, model=None, **kwargs):
            from accelerate.utils import extract_model_from_parallel

            inner = extract_model_from_parallel(model)
            inner = getattr(getattr(inner, "base_model", inner), "model", inner)
            self.checkpointing.append(bool(inner.is_gradient_checkpointing))

    plain_seen, gc_seen = Seen(), Seen()
    plain_seen.checkpointing, gc_seen.checkpointing = [], []
    plain = train_sft(base, rows[:20], rows[20:], params, tmp_path / "plain", seed=0, extra_callbacks=[plain_seen])
    checkpointed = train_sft(base, rows[:20], rows[20:], params, tmp_path / "gc", seed=0, gradient_checkpointing=True,
                             extra_callbacks=[gc_seen])
    assert plain_seen.checkpointing == [False] * 4 and gc_seen.checkpointing == [True] * 4
    assert [s for s, _ in plain.train_losses] == [s for s, _ in checkpointed.train_losses] == [1, 2, 3, 4]
    for (_, a), (_, b) in zip(plain.train_losses, checkpointed.train_losses):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-6)


@pytest.mark.skipif(not NO_CUDA, reason="checks what a machine without CUDA does")
def test_inference_placement_keeps_a_cpu_model_in_fp32_and_refuses_a_missing_gpu(tmp_path):
    from tuneline.models.loading import load_causal_lm, place_for_inference, resolve_device
    from tuneline.models.tiny import init_tiny_model, save_model, train_tokenizer
    from tuneline.params import TinyModelParams

    tiny = TinyModelParams(vocab_size=320, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2,
                           num_kv_heads=2, max_position_embeddings=64, tokenizer_min_frequency=1)
    tokenizer = train_tokenizer(["a b c d e f g"] * 4, tiny)
    path = save_model(init_tiny_model(tokenizer, tiny, seed=0), tokenizer, tmp_path / "m")
    model = load_causal_lm(path, device="auto")
    first = next(model.parameters())
    assert resolve_device("auto") == "cpu" and first.device.type == "cpu" and first.dtype == torch.float32
    assert place_for_inference(model, "cpu") is model
    with pytest.raises(ValueError, match="no CUDA device is visible"):
        load_causal_lm(path, device="cuda")


@pytest.mark.long
def test_gpu_check_runs_its_code_path_on_cpu(tmp_path):
    """bench/gpu_check.py on the small model for 2 steps: every stage measures, QLoRA says why it skipped."""
    import subprocess
    import sys

    out = tmp_path / "gpu_check.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--devices", "cpu", "--size", "small",
                           "--steps", "2", "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = {r["step"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"sft-lora", "sft-qlora", "dpo", "eval-generate", "serve-batched"}
    assert rows["sft-lora"]["tokens_per_s"] > 0 and rows["dpo"]["steps"] == 2 and "skipped" in rows["sft-qlora"]
    assert rows["eval-generate"]["placed_on"] == "cpu" and rows["serve-batched"]["requests"] == 48
