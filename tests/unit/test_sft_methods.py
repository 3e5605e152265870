"""SFT: every fine-tuning method really trains a tiny Llama, saves, and reloads to the same logits.

No dagster here. The tiny model (vocab ~300-512, hidden 64, 2 layers) is built once per module.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from tuneline.params import EarlyStoppingParams, LoraParams, SftParams, TinyModelParams
from tuneline.records import ChatRecord

torch = pytest.importorskip("torch")

WORDS = "apple banana cherry grape lemon mango peach plum berry melon kiwi lime".split()
TINY = TinyModelParams(
    vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=2, num_kv_heads=2,
    max_position_embeddings=256, tokenizer_min_frequency=1,
)


def chat(user: str, answer: str, line: int = 0) -> ChatRecord:
    return ChatRecord(
        kind="sft",
        messages=[{"role": "user", "content": user}, {"role": "assistant", "content": answer}],
        source="test",
        line=line,
    )


def reverse_records(n: int, seed: int) -> list[ChatRecord]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 5)))
        out.append(chat(f"reverse: {words}", words[::-1], i))
    return out


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    """A tiny Llama + tokenizer (chat template with generation markers) saved once for the module."""
    from tuneline.models.tiny import init_tiny_model, save_model, train_tokenizer

    records = reverse_records(60, seed=1)
    texts = [m["content"] for r in records for m in r.messages] + ["yes no maybe"] * 5
    tokenizer = train_tokenizer(texts, TINY)
    model = init_tiny_model(tokenizer, TINY, seed=0)
    return save_model(model, tokenizer, tmp_path_factory.mktemp("tiny-base"))


@pytest.fixture(scope="module")
def data() -> tuple[list[ChatRecord], list[ChatRecord]]:
    records = reverse_records(40, seed=2)
    return records[:32], records[32:]


def sample_ids(base_dir: Path) -> "torch.Tensor":
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base_dir)
    text = tok.apply_chat_template(
        [{"role": "user", "content": "reverse: plum kiwi"}, {"role": "assistant", "content": "iwik mulp"}],
        tokenize=True, return_dict=True,
    )["input_ids"]
    return torch.tensor([text])


def make_logit_capture(ids: "torch.Tensor"):
    """A callback that records the trained (best-restored) model's logits at the end of training."""
    from transformers import TrainerCallback

    class CaptureLogits(TrainerCallback):
        logits = None

        def on_train_end(self, args, state, control, model=None, **kwargs):
            from accelerate.utils import extract_model_from_parallel

            # accelerate wraps forward in bf16 autocast when training in bf16: unwrap to compare in fp32
            model = extract_model_from_parallel(model, keep_fp32_wrapper=False)
            model.eval()
            with torch.no_grad():
                self.logits = model(input_ids=ids).logits.float().clone()

    return CaptureLogits()


def params_for(method: str, **overrides) -> SftParams:
    base = dict(
        method=method, max_steps=6, batch_size=4, eval_steps=3, save_steps=3, learning_rate=1e-2,
        num_virtual_tokens=4, lora=LoraParams(r=4, alpha=8, dropout=0.0), train_top_layers=1,
    )
    base.update(overrides)
    return SftParams(**base)


def state_of(model) -> dict[str, "torch.Tensor"]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ---------------------------------------------------------------------------
# fast pieces


def test_labels_cover_only_assistant_tokens_and_their_eos(base_dir):
    from transformers import AutoTokenizer

    from tuneline.train.common import IGNORE_INDEX, tokenize_chat

    tok = AutoTokenizer.from_pretrained(base_dir)
    record = ChatRecord(
        kind="sft",
        messages=[
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "reverse: plum"},
            {"role": "assistant", "content": "mulp"},
            {"role": "user", "content": "reverse: kiwi lime"},
            {"role": "assistant", "content": "emil iwik"},
        ],
        source="t", line=0,
    )
    [example] = tokenize_chat(tok, [record], max_length=256)
    ids, labels = example["input_ids"], example["labels"]
    assert len(ids) == len(labels)
    labelled = [i for i, lab in enumerate(labels) if lab != IGNORE_INDEX]
    assert all(labels[i] == ids[i] for i in labelled)
    # the labelled positions form exactly two runs: each assistant answer followed by its eos
    runs, start = [], labelled[0]
    for a, b in zip(labelled, labelled[1:] + [None]):
        if b != a + 1:
            runs.append((start, a))
            start = b
    assert len(runs) == 2
    texts = [tok.decode(ids[s : e + 1]) for s, e in runs]
    assert texts == ["mulp" + tok.eos_token, "emil iwik" + tok.eos_token]
    for s, e in runs:
        assert ids[e] == tok.eos_token_id
        assert labels[s - 1] == IGNORE_INDEX  # the <|assistant|> header is prompt, not label
    # nothing from system/user turns is labelled
    prompt_text = tok.decode([ids[i] for i in range(len(ids)) if labels[i] == IGNORE_INDEX])
    assert "be brief" in prompt_text and "reverse: kiwi lime" in prompt_text
    assert "mulp" not in prompt_text


def test_truncation_drops_records_without_assistant_tokens(base_dir):
    from transformers import AutoTokenizer

    from tuneline.train.common import IGNORE_INDEX, tokenize_chat

    tok = AutoTokenizer.from_pretrained(base_dir)
    long_prompt = chat("reverse: " + " ".join(WORDS * 4), "x")
    short = chat("reverse: plum", "mulp")
    out = tokenize_chat(tok, [long_prompt, short], max_length=12)
    assert len(out) == 1 and all(len(x["input_ids"]) <= 12 for x in out)
    assert any(lab != IGNORE_INDEX for lab in out[0]["labels"])


def test_template_without_generation_markers_labels_the_final_answer(base_dir):
    from transformers import AutoTokenizer

    from tuneline.train.common import IGNORE_INDEX, tokenize_chat

    tok = AutoTokenizer.from_pretrained(base_dir)
    tok.chat_template = tok.chat_template.replace("{% generation %}", "").replace("{% endgeneration %}", "")
    [example] = tokenize_chat(tok, [chat("reverse: plum", "mulp")], max_length=64)
    labelled = [t for t, lab in zip(example["input_ids"], example["labels"]) if lab != IGNORE_INDEX]
    assert tok.decode(labelled) == "mulp" + tok.eos_token


@pytest.mark.parametrize("method", ["lora", "full"])
def test_label_only_head_loss_equals_the_model_loss_and_gradients(method, base_dir, tmp_path):
    """The trainer's fast loss (LM head only at labelled positions) is the model's own loss, on padded
    and on padding-free batches alike, and both batch layouts give the same loss and gradients."""
    from transformers import AutoTokenizer, TrainingArguments

    from tuneline.train.common import PackedCollator, PadCollator, tokenize_chat
    from tuneline.train.methods import apply_method
    from tuneline.train.trainers import SftTrainer

    tok = AutoTokenizer.from_pretrained(base_dir)
    features = tokenize_chat(tok, reverse_records(6, seed=3), 64)
    # one example twice as long as the others, so the packed layout puts two short ones in a row
    features.append({k: features[0][k] + features[1][k] for k in ("input_ids", "labels")})
    assert len({len(f["input_ids"]) for f in features}) > 1  # the padded batch really holds padding
    model, _ = apply_method(base_dir, params_for(method, bf16=False), seed=0)
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, bf16=False)
    trainer = SftTrainer(model=model, args=args, train_dataset=features)
    model.train()
    unwrapped = []  # the fast loss finds the decoder under the model once, not at every step
    real_unwrap = trainer.accelerator.unwrap_model
    trainer.accelerator.unwrap_model = lambda m, *a, **k: unwrapped.append(m) or real_unwrap(m, *a, **k)
    results = {}
    for layout, collator in (("padded", PadCollator(tok.pad_token_id)), ("packed", PackedCollator(tok.pad_token_id))):
        batch = collator(features)
        if layout == "packed":  # really packed: fewer rows, more than one example in some row
            assert len(batch["input_ids"]) < len(features) and "attention_mask" not in batch
        n_labels = (batch["labels"][:, 1:] != -100).sum()
        for path in (method, "reference"):
            trainer.method = path  # "reference" is not a label-only method: the model's own loss
            model.zero_grad()
            loss = trainer.compute_loss(model, dict(batch), num_items_in_batch=n_labels)
            loss.backward()
            grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
            results[layout, path] = (loss.detach(), grads)
    fast, g_fast = results["padded", method]
    assert unwrapped == [model]
    assert g_fast
    for key, (loss, grads) in results.items():
        assert torch.allclose(loss, fast, atol=1e-5), key
        assert grads.keys() == g_fast.keys(), key
        for name in g_fast:
            assert torch.allclose(grads[name], g_fast[name], atol=1e-6, rtol=1e-3), (key, name)


def test_packed_collator_fills_rows_up_to_the_longest_example_restarting_positions():
    from tuneline.train.common import IGNORE_INDEX, PackedCollator, pack_rows

    X = IGNORE_INDEX
    rows = [{"input_ids": [1, 2, 3, 4, 5], "labels": [X, X, 3, 4, 5]}, {"input_ids": [6, 7], "labels": [6, 7]},
            {"input_ids": [8, 9, 10], "labels": [X, 9, 10]}, {"input_ids": [11, 12], "labels": [X, 12]}]
    assert pack_rows([5, 2, 3, 2], 5) == [[0], [2, 1], [3]]  # first-fit decreasing, rows of at most 5
    batch = PackedCollator(pad_token_id=0)(rows)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5], [8, 9, 10, 6, 7], [11, 12, 0, 0, 0]]
    # each example's positions restart at 0; padding continues the row's last example (no new example starts)
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4], [0, 1, 2, 0, 1], [0, 1, 2, 3, 4]]
    # an example's first label is ignored: no position predicts the next example's first token
    assert batch["labels"].tolist() == [[X, X, 3, 4, 5], [X, 9, 10, X, 7], [X, 12, X, X, X]]
    assert "attention_mask" not in batch and batch["use_cache"] is False
    # nothing to pack (every pair is longer than the longest): the padded batch, causal mask and all
    padded = PackedCollator(pad_token_id=0)(rows[:1] + rows[2:3])
    assert padded["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]] and "position_ids" not in padded


def test_collator_pads_labels_with_ignore_and_masks_padding():
    from tuneline.train.common import IGNORE_INDEX, PadCollator

    batch = PadCollator(pad_token_id=0)(
        [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}]
    )
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 6, 7], [8, IGNORE_INDEX, IGNORE_INDEX]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


def test_length_grouped_order_removes_most_padding_and_is_seeded():
    from tuneline.train.common import length_grouped_order, padding_fraction

    rng = random.Random(0)
    lengths = [rng.randint(10, 250) for _ in range(400)]
    order = length_grouped_order(lengths, batch_size=8, seed=3)
    assert sorted(order) == list(range(400))
    assert order == length_grouped_order(lengths, batch_size=8, seed=3)
    assert order != length_grouped_order(lengths, batch_size=8, seed=4)
    shuffled = list(range(400))
    rng.shuffle(shuffled)
    assert padding_fraction(lengths, order, 8) < 0.1 < padding_fraction(lengths, shuffled, 8)
    assert max(lengths[i] for i in order[:8]) == max(lengths)  # longest batch first


def test_resolve_bf16_never_returns_fp16_and_honours_explicit_flags():
    from tuneline.models.loading import bf16_supported, resolve_bf16

    assert resolve_bf16(False) is False
    if not torch.cuda.is_available():
        assert resolve_bf16(True) is True
        assert resolve_bf16(None) is bf16_supported("cpu")


def test_no_native_bf16_when_torch_runs_avx2_kernels():
    """torch held to AVX2 (an AVX2-only CPU, or ATEN_CPU_CAPABILITY=avx2 on this one) has no native bf16, whatever
    /proc/cpuinfo lists: bf16 would be emulated there, several times slower than fp32."""
    import os
    import subprocess
    import sys

    probe = "from tuneline.models.loading import bf16_supported; print(bf16_supported('cpu'))"
    out = subprocess.run([sys.executable, "-c", probe], env={**os.environ, "ATEN_CPU_CAPABILITY": "avx2"},
                         capture_output=True, text=True, check=True).stdout.strip()
    assert out == "False"


def test_checkpoint_markers_and_last_valid_checkpoint(tmp_path):
    from tuneline.train.checkpoints import COMPLETE_MARKER, last_valid_checkpoint, mark_complete

    assert last_valid_checkpoint(tmp_path / "missing") is None
    for step in (2, 4, 6):
        (tmp_path / f"checkpoint-{step}").mkdir()
    mark_complete(tmp_path / "checkpoint-2", 2)
    mark_complete(tmp_path / "checkpoint-4", 4)
    assert last_valid_checkpoint(tmp_path, delete_incomplete=False).name == "checkpoint-4"
    assert (tmp_path / "checkpoint-6").exists()
    assert last_valid_checkpoint(tmp_path).name == "checkpoint-4"
    assert not (tmp_path / "checkpoint-6").exists()  # the incomplete one is deleted
    assert not list(tmp_path.glob(f"*/.{COMPLETE_MARKER}.tmp"))


def test_adalora_schedule_fits_short_runs():
    from tuneline.train.methods import adalora_schedule

    s = adalora_schedule(50)
    assert s["tinit"] < s["total_step"] - s["tfinal"] and s["deltaT"] >= 1
    with pytest.raises(ValueError, match="at least 3"):
        adalora_schedule(2)


# ---------------------------------------------------------------------------
# every method trains, moves only its trainable weights and reloads to the same logits


METHODS = ["lora", "qlora", "adalora", "ia3", "prefix", "prompt", "ptuning", "adapter", "full", "freeze"]


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_method_trains_saves_and_reloads(method, base_dir, data, tmp_path):
    from tuneline.train.methods import apply_method
    from tuneline.train.sft import load_trained, train_sft

    train, val = data
    params = params_for(method)
    ids = sample_ids(base_dir)
    capture = make_logit_capture(ids)
    result = train_sft(base_dir, train, val, params, tmp_path / "run", seed=0, extra_callbacks=[capture])

    assert result.global_step == 6 and result.method == method
    assert result.train_losses and all(torch.isfinite(torch.tensor(loss)) for _, loss in result.train_losses)
    assert result.val_losses and result.best_step is not None
    assert result.real_tokens > 0 and result.tokens_per_second > 0
    assert 0 < result.trainable_params <= result.total_params
    assert Path(result.output_dir).is_dir()
    assert not list(Path(result.output_dir).glob("*.bin")), "weights must be safetensors"
    assert list(Path(result.output_dir).glob("*.safetensors"))

    # the saved adapter/model reloads to the very logits of the trained model
    trained, _ = load_trained(base_dir, result.output_dir)
    with torch.no_grad():
        reloaded = trained(input_ids=ids).logits.float()
    assert capture.logits is not None
    assert torch.allclose(reloaded, capture.logits, atol=1e-5, rtol=0), (reloaded - capture.logits).abs().max()

    # weights: trainable ones moved, frozen ones did not (the same seed rebuilds the untrained state)
    fresh, info = apply_method(base_dir, params, seed=0, total_steps=6)
    assert info["trainable_params"] == result.trainable_params
    before, after = state_of(fresh), state_of(trained)
    if method == "ptuning":
        # PEFT saves P-tuning's encoder *output* as the prompt embedding; the MLP is folded in
        assert {k for k in set(before) - set(after)} == {k for k in before if ".mlp_head." in k}
        before = {k: v for k, v in before.items() if k in after}
    assert set(before) == set(after)
    moved = {k for k in before if before[k].shape != after[k].shape or not torch.equal(before[k], after[k])}

    if method == "full":
        assert moved == set(before), set(before) - moved
    elif method == "freeze":
        top = TINY.num_layers - 1
        assert not {k for k in moved if k.startswith("model.layers.0.")}
        assert {k for k in before if k.startswith(f"model.layers.{top}.")} <= moved
        assert "model.norm.weight" in moved
        assert info["tied_embeddings"] and "tied" in info["note"]
    else:
        adapter_keys = {k for k in before if _is_adapter_key(k)}
        assert adapter_keys, f"no adapter weights found for {method}"
        assert adapter_keys <= moved, adapter_keys - moved
        assert not (moved - adapter_keys), f"frozen base weights changed: {sorted(moved - adapter_keys)[:5]}"


def _is_adapter_key(key: str) -> bool:
    return any(tag in key for tag in ("lora_A", "lora_B", "lora_E", "ia3_", "prompt_encoder", ".bottleneck."))


@pytest.mark.slow
def test_qlora_base_really_is_4bit(base_dir):
    from tuneline.train.methods import apply_method

    model, info = apply_method(base_dir, params_for("qlora"), seed=0)
    import bitsandbytes as bnb

    n4 = sum(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    assert n4 == info["quantized_linears"] == 7 * TINY.num_layers
    assert info["quantization"]["quant_type"] == "nf4"


@pytest.mark.slow
def test_qlora_rejects_linear_not_multiple_of_32_before_training(tmp_path, base_dir, data):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from tuneline.train.sft import train_sft

    tok = AutoTokenizer.from_pretrained(base_dir)
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=100, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, head_dim=32, tie_word_embeddings=True,
        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
    )
    odd = tmp_path / "odd"
    LlamaForCausalLM(config).save_pretrained(odd)
    tok.save_pretrained(odd)
    train, val = data
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.(gate|up)_proj.*out_features=100.*multiple of 32"):
        train_sft(odd, train, val, params_for("qlora"), tmp_path / "run", seed=0)
    assert not (tmp_path / "run" / "checkpoints").exists()  # raised before any training
    # the same shape trains fine with plain LoRA
    ok = train_sft(odd, train, val, params_for("lora", max_steps=2, eval_steps=2, save_steps=2), tmp_path / "ok", seed=0)
    assert ok.global_step == 2


@pytest.mark.slow
def test_adalora_really_reallocates_ranks(base_dir, data, tmp_path):
    from tuneline.train.methods import apply_method
    from tuneline.train.sft import load_trained, train_sft

    train, val = data
    params = params_for("adalora", max_steps=12, eval_steps=6, save_steps=6, lora=LoraParams(r=4, alpha=8, dropout=0.0))
    result = train_sft(base_dir, train, val, params, tmp_path / "run", seed=0)
    info = result.method_info
    assert info["init_r"] == 6 and info["target_r"] == 4 and info["tinit"] < 12 - info["tfinal"]

    config = json.loads((Path(result.output_dir) / "adapter_config.json").read_text())
    pattern = config["rank_pattern"]
    assert pattern, "update_and_allocate never ran: no rank pattern"
    ranks = {name: sum(bool(x) for x in mask) for name, mask in pattern.items()}
    n_modules = len(ranks)
    assert n_modules == 7 * TINY.num_layers
    # budget moved from init_r everywhere to about target_r on average, unevenly across modules
    assert sum(ranks.values()) <= info["target_r"] * n_modules < info["init_r"] * n_modules
    assert len(set(ranks.values())) > 1, f"ranks did not move apart: {ranks}"

    # the masked singular values are really zero in the trained model
    trained, _ = load_trained(base_dir, result.output_dir)
    fresh, _ = apply_method(base_dir, params, seed=0, total_steps=12)
    e_trained = {n: p for n, p in trained.named_parameters() if "lora_E" in n}
    e_fresh = {n: p for n, p in fresh.named_parameters() if "lora_E" in n}
    assert sum(int(p.numel()) for p in e_trained.values()) < sum(int(p.numel()) for p in e_fresh.values())


@pytest.mark.slow
def test_early_stopping_stops_when_validation_loss_rises(base_dir, tmp_path):
    """Validation answers contradict the training answers: validation loss rises as training fits."""
    from tuneline.train.sft import train_sft

    rng = random.Random(5)
    prompts = [" ".join(rng.choice(WORDS) for _ in range(3)) for _ in range(24)]
    train = [chat(f"reverse: {p}", "yes", i) for i, p in enumerate(prompts)]
    val = [chat(f"reverse: {p}", "no", i) for i, p in enumerate(prompts[:8])]
    params = params_for(
        "full", max_steps=40, eval_steps=2, save_steps=2, learning_rate=5e-3, warmup_ratio=0.0,
        early_stopping=EarlyStoppingParams(patience=2, min_delta=0.0),
    )
    result = train_sft(base_dir, train, val, params, tmp_path / "run", seed=0)
    assert result.stopped_early
    assert result.global_step < 40
    assert result.best_step is not None and result.best_step < result.global_step
    best = min(loss for _, loss in result.val_losses)
    assert result.best_val_loss == pytest.approx(best)
    assert result.val_losses[-1][1] > best


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", "adalora", "ia3"])
def test_merge_adapter_matches_unmerged_logits(method, base_dir, data, tmp_path):
    from transformers import AutoModelForCausalLM

    from tuneline.train.sft import load_trained, merge_adapter, train_sft

    train, val = data
    params = params_for(method, max_steps=4, eval_steps=2, save_steps=2)
    result = train_sft(base_dir, train, val, params, tmp_path / "run", seed=0)
    report = merge_adapter(base_dir, result.output_dir, tmp_path / "merged")
    assert report["max_abs_diff"] < 1e-4 and report["method"] == method
    assert list((tmp_path / "merged").glob("*.safetensors"))
    ids = sample_ids(base_dir)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    adapter, _ = load_trained(base_dir, result.output_dir)
    with torch.no_grad():
        diff = (merged(input_ids=ids).logits - adapter(input_ids=ids).logits).abs().max().item()
    assert diff < 1e-4


@pytest.mark.slow
def test_merge_refuses_prompt_learning_and_full_models(base_dir, data, tmp_path):
    from tuneline.train.sft import merge_adapter, train_sft

    train, val = data
    short = dict(max_steps=2, eval_steps=2, save_steps=2)
    prompt = train_sft(base_dir, train, val, params_for("prompt", **short), tmp_path / "p", seed=0)
    with pytest.raises(ValueError, match="cannot merge a PROMPT_TUNING adapter"):
        merge_adapter(base_dir, prompt.output_dir, tmp_path / "merged-prompt")
    full = train_sft(base_dir, train, val, params_for("full", **short), tmp_path / "f", seed=0)
    with pytest.raises(ValueError, match="holds no adapter"):
        merge_adapter(base_dir, full.output_dir, tmp_path / "merged-full")


class Crash(Exception):
    pass


def crash_at(step: int):
    from transformers import TrainerCallback

    class CrashAt(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == step:
                raise Crash(f"simulated crash at step {step}")

    return CrashAt()


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", "adalora", "ptuning"])
def test_resume_after_crash_continues_exactly(method, base_dir, data, tmp_path):
    """A crashed run rerun on the same out_dir resumes from its last complete checkpoint and
    reaches the very losses of an uninterrupted run (AdaLoRA's allocator and P-tuning's encoder
    included, which PEFT's own checkpoints lose)."""
    from tuneline.train.sft import train_sft

    train, val = data
    params = params_for(method, max_steps=6, eval_steps=2, save_steps=2)
    with pytest.raises(Crash):
        train_sft(base_dir, train, val, params, tmp_path / "run", seed=0, extra_callbacks=[crash_at(5)])
    resumed = train_sft(base_dir, train, val, params, tmp_path / "run", seed=0)
    reference = train_sft(base_dir, train, val, params, tmp_path / "ref", seed=0)
    assert resumed.resumed_from_step == 4 and reference.resumed_from_step == 0
    assert resumed.global_step == reference.global_step == 6
    for got, want in ((resumed.train_losses, reference.train_losses), (resumed.val_losses, reference.val_losses)):
        assert [step for step, _ in got] == [step for step, _ in want]
        assert [loss for _, loss in got] == pytest.approx([loss for _, loss in want], abs=1e-5)
    assert resumed.real_tokens < reference.real_tokens  # this process only did steps 5-6


def test_unknown_world_size_is_a_clear_error(base_dir, data, tmp_path):
    from tuneline.train.sft import train_sft

    train, val = data
    with pytest.raises(ValueError, match="torchrun --standalone --nproc-per-node 2"):
        train_sft(base_dir, train, val, params_for("lora", num_processes=2), tmp_path / "run", seed=0)


def test_fast_adapter_dropout_keeps_the_rate_and_the_expectation(base_dir):
    from tuneline.train.methods import apply_method, fast_adapter_dropout
    from tuneline.train.modules import FastDropout

    drop = FastDropout(0.05)
    x = torch.ones(400_000)
    torch.manual_seed(0)
    y = drop(x)
    kept = (y != 0).float().mean().item()
    assert abs(kept - 0.95) < 0.002  # binomial sd here is 0.0003
    assert abs(y.mean().item() - 1.0) < 0.003  # kept values are scaled by 1/keep-probability
    torch.manual_seed(0)
    assert torch.equal(drop(x), y)  # same seed, same mask
    drop.eval()
    assert drop(x) is x

    lora = LoraParams(r=4, alpha=8, dropout=0.1)
    model, _ = apply_method(base_dir, params_for("lora", bf16=False, lora=lora), seed=0)
    before = sum(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in model.modules())
    assert before > 0 and fast_adapter_dropout(model) == before
    assert not any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in model.modules())


def test_attention_mask_is_dropped_only_for_right_padded_batches():
    from tuneline.train.sft import needed_mask

    right = torch.tensor([[1, 1, 1], [1, 1, 0]])
    left = torch.tensor([[1, 1, 1], [0, 1, 1]])
    assert needed_mask(right) is None and needed_mask(None) is None
    assert needed_mask(left) is left


def test_bf16_autocast_layout_keeps_the_autocast_loss_and_is_undone(base_dir):
    from tuneline.train.methods import apply_method, bf16_autocast_layout

    model, _ = apply_method(base_dir, params_for("lora", lora=LoraParams(r=4, alpha=8, dropout=0.0)), seed=0)
    model.eval()
    ids = sample_ids(base_dir)
    with torch.no_grad():
        before = model(input_ids=ids).logits
        with torch.autocast("cpu", dtype=torch.bfloat16):
            auto = model(input_ids=ids, labels=ids).loss
        undo = bf16_autocast_layout(model)
        assert any(p.dtype == torch.bfloat16 for p in model.parameters())
        with torch.autocast("cpu", dtype=torch.bfloat16):
            laid_out = model(input_ids=ids, labels=ids).loss
        undo()
        after = model(input_ids=ids).logits
    assert abs(laid_out.item() - auto.item()) < 2e-3  # the same bf16 matmul inputs, cast once
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert not any(m._forward_hooks for m in model.modules())
    assert torch.equal(before, after)


def test_padding_free_is_chosen_from_the_rows_mean_length():
    from tuneline.train.sft import PADDING_FREE_MIN_MEAN_TOKENS, use_padding_free

    short = [{"input_ids": [1] * (PADDING_FREE_MIN_MEAN_TOKENS - 10)}] * 4
    long = [{"input_ids": [1] * (PADDING_FREE_MIN_MEAN_TOKENS + 10)}] * 4
    assert not use_padding_free(params_for("lora"), short)
    assert use_padding_free(params_for("lora"), long)
    assert use_padding_free(params_for("full", padding_free=True), short)
    assert not use_padding_free(params_for("lora", padding_free=False), long)
    assert not use_padding_free(params_for("prefix", padding_free=True), long)  # virtual tokens in front


# ---------------------------------------------------------------------------
# multitask prompt tuning: a source stage over task families, a target stage initialized from it


def two_family_records(n: int, seed: int) -> list[ChatRecord]:
    import dataclasses

    rng = random.Random(seed)
    out = []
    for i in range(n):
        words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 4)))
        family = "reverse" if i % 2 else "upper"
        answer = words[::-1] if family == "reverse" else words.upper()
        out.append(dataclasses.replace(chat(f"{family}: {words}", answer, i), task=family))
    return out


@pytest.mark.slow
def test_multitask_prompt_trains_source_then_target_and_reloads(base_dir, tmp_path):
    from peft import PeftModel
    from safetensors.torch import load_file

    from tuneline.evaluate.report import _token_logprobs, virtual_tokens_sliced
    from tuneline.params import MultitaskPromptParams
    from tuneline.train.methods import MultitaskStage, apply_method
    from tuneline.train.sft import SOURCE_DONE, load_trained, train_sft

    records = two_family_records(40, seed=3)
    train, val = records[:32], records[32:]
    params = params_for("multitask_prompt", max_steps=4, eval_steps=2, save_steps=2,
                        multitask_prompt=MultitaskPromptParams(source_steps=4))
    ids = sample_ids(base_dir)
    captured = {}

    from transformers import TrainerCallback

    class Capture(TrainerCallback):
        def on_train_end(self, args, state, control, model=None, **kwargs):
            from accelerate.utils import extract_model_from_parallel

            model = extract_model_from_parallel(model, keep_fp32_wrapper=False).eval()
            with torch.no_grad():
                captured["logits"] = model(input_ids=ids, task_ids=torch.zeros(1, dtype=torch.long)).logits.float()
            captured["state"] = state_of(model)

    result = train_sft(base_dir, train, val, params, tmp_path / "run", seed=0, extra_callbacks=[Capture()])
    assert result.global_step == 4 and all(torch.isfinite(torch.tensor(v)) for _, v in result.train_losses)
    mt = result.method_info["multitask"]
    assert mt["stage"] == "target" and mt["families"] == ["reverse", "upper"]
    assert mt["source_run"]["global_step"] == 4
    source_dir = tmp_path / "run" / "source"
    assert (source_dir / SOURCE_DONE).is_file()
    source = load_file(str(source_dir / "model" / "adapter_model.safetensors"))
    cols = next(v for k, v in source.items() if k.endswith("prefix_task_cols"))
    assert cols.shape[0] == 2  # one factor per task family

    # the target starts from the source's average task prompt and trains only its prompt
    stage = MultitaskStage(("reverse", "upper"), source_weights=str(source_dir / "model" / "adapter_model.safetensors"))
    fresh, _ = apply_method(base_dir, params, seed=0, multitask=stage)
    encoder = fresh.prompt_encoder["default"]
    assert encoder.prefix_task_cols.shape[0] == 1
    assert torch.allclose(encoder.prefix_task_cols[0], cols.mean(0))
    before, after = state_of(fresh), captured["state"]
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert moved and all("prompt_encoder" in k for k in moved), sorted(moved)[:5]

    # reload: task ids bound to the target's task 0, virtual tokens in front of the logits
    model, _ = load_trained(base_dir, result.output_dir)
    assert isinstance(model, PeftModel)
    with torch.no_grad():
        logits = model(input_ids=ids).logits.float()
    assert logits.shape[1] == ids.shape[1] + params.num_virtual_tokens
    assert torch.allclose(logits, captured["logits"], atol=1e-5, rtol=0)
    sliced = virtual_tokens_sliced(logits, ids)
    labels = ids.clone()
    logp, count = _token_logprobs(model, ids, torch.ones_like(ids), labels)
    manual = torch.log_softmax(sliced[:, :-1], -1).gather(-1, ids[:, 1:].unsqueeze(-1)).sum()
    assert int(count) == ids.shape[1] - 1 and torch.allclose(logp.sum(), manual, atol=1e-4)
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False)
    assert out.shape[1] >= ids.shape[1] + 1

    # PEFT itself refuses a forward without task ids: the binding is what evaluation and serving rely on
    raw = PeftModel.from_pretrained(apply_method(base_dir, params_for("full"), seed=0)[0], result.output_dir)
    with pytest.raises(ValueError, match="task_ids"):
        raw(input_ids=ids)


# ---------------------------------------------------------------------------
# tokens added at fine-tuning time: mean-resized rows trained by LoRA's trainable_token_indices


@pytest.fixture(scope="module")
def untied_base_dir(base_dir, tmp_path_factory) -> Path:
    """The tiny base with its LM head untied from the embedding (its own copy of the weights)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(base_dir)
    model.config.tie_word_embeddings = False
    model.lm_head.weight = torch.nn.Parameter(model.get_input_embeddings().weight.detach().clone())
    out = tmp_path_factory.mktemp("tiny-untied")
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(base_dir).save_pretrained(out)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("tied", [True, False])
def test_added_tokens_train_with_lora_and_reload(tied, base_dir, untied_base_dir, tmp_path):
    from transformers import AutoTokenizer

    from tuneline.evaluate.report import template_parity
    from tuneline.params import TokenizerParams
    from tuneline.train.methods import apply_method
    from tuneline.train.sft import load_trained, train_sft

    base = base_dir if tied else untied_base_dir
    tokens = TokenizerParams(add_special_tokens=("<sep>",), add_tokens=("kiwiberry",))
    records = [chat(f"reverse: {w} <sep> kiwiberry", f"kiwiberry <sep> {w[::-1]}", i)
               for i, w in enumerate(WORDS * 3)]
    train, val = records[:30], records[30:]
    params = params_for("lora")
    with_new = chat("reverse: plum <sep> kiwiberry", "kiwiberry <sep> mulp")
    probe_tok = AutoTokenizer.from_pretrained(base)
    from tuneline.train.tokens import extend_tokenizer

    extend_tokenizer(probe_tok, tokens)
    ids = torch.tensor([probe_tok.apply_chat_template(with_new.messages, tokenize=True, return_dict=True)["input_ids"]])
    capture = make_logit_capture(ids)
    result = train_sft(base, train, val, params, tmp_path / "run", seed=0, tokens=tokens, extra_callbacks=[capture])
    info = result.method_info["added_tokens"]
    new_ids = info["ids"]
    assert len(new_ids) == 2 and info["tied_embeddings"] is tied
    assert all(torch.isfinite(torch.tensor(v)) for _, v in result.train_losses)

    tok = AutoTokenizer.from_pretrained(result.output_dir)
    assert [tok.convert_tokens_to_ids(t) for t in ("<sep>", "kiwiberry")] == new_ids
    parity = template_parity(tok, val)
    assert parity["ok"] and set(parity["probed_tokens"]) == {"<sep>", "kiwiberry"}

    assert set(new_ids) <= set(ids[0].tolist())
    trained, _ = load_trained(base, result.output_dir)
    fresh, fresh_info = apply_method(base, params, seed=0, added_tokens={k: info[k] for k in ("ids", "vocab_size")})
    config = fresh.peft_config["default"]
    assert set(config.trainable_token_indices) == ({"embed_tokens"} if tied else {"embed_tokens", "lm_head"})
    before, after = state_of(fresh), state_of(trained)
    # the base embedding/head rows of the new tokens start from mean-resizing (sampled) and are never used: the
    # adapter's trained rows replace them; every old row is untouched
    resized = {k for k in before if before[k].shape[0] == info["vocab_size"] and "trainable_tokens" not in k}
    assert resized
    for key in resized:
        assert torch.equal(before[key][: new_ids[0]], after[key][: new_ids[0]]), key
    moved = {k for k in before if k not in resized and not torch.equal(before[k], after[k])}
    token_keys = {k for k in before if "trainable_tokens" in k}
    assert token_keys and {k for k in token_keys if "embed_tokens" in k} <= moved
    if not tied:
        assert {k for k in token_keys if "lm_head" in k} <= moved
    assert all(_is_adapter_key(k) or "trainable_tokens" in k for k in moved), sorted(moved)[:5]
    saved = Path(result.output_dir, "adapter_model.safetensors").stat().st_size
    assert saved < 0.5 * Path(base, "model.safetensors").stat().st_size  # new rows only, not the whole embedding
    with torch.no_grad():
        again = load_trained(base, result.output_dir)[0](input_ids=ids).logits
        assert torch.equal(trained(input_ids=ids).logits, again)
        assert torch.allclose(again.float(), capture.logits, atol=1e-5, rtol=0)
        assert again.shape[-1] == info["vocab_size"]


def test_a_finished_folder_moves_into_place_keeping_a_complete_one_and_replacing_a_partial_one(tmp_path):
    import shutil

    from tuneline.train.checkpoints import move_into_place, temp_sibling

    target = tmp_path / "entry"
    for content, already in (("first", None), ("second", "complete"), ("third", "partial")):
        if already == "partial":  # an interrupted write: no marker
            shutil.rmtree(target)
            target.mkdir()
            (target / "data").write_text("half")
        tmp = temp_sibling(target)
        tmp.mkdir()
        (tmp / "data").write_text(content)
        (tmp / "DONE").write_text("")
        move_into_place(tmp, target, "DONE")
        assert not tmp.exists()
        expected = "first" if already == "complete" else content  # a complete entry is never overwritten
        assert (target / "data").read_text() == expected and (target / "DONE").is_file()


@pytest.mark.parametrize("stops_early", [True, False], ids=["early-stopped", "to-max-steps"])
def test_a_search_trial_writes_nothing_and_trains_and_stops_as_a_kept_run_does(base_dir, data, tmp_path, stops_early):
    """``save=False`` (an HPO trial): no checkpoint, no weights, the same losses step for step, the same early stop
    or the same last step (where a kept run also evaluates and saves)."""
    from tuneline.train.sft import train_sft

    train, val = data
    if stops_early:  # a learning rate far too high: the validation loss rises, so early stopping ends both runs
        params = params_for("full", max_steps=40, eval_steps=2, save_steps=2, learning_rate=0.3,
                            early_stopping=EarlyStoppingParams(patience=1, min_delta=0.0))
    else:  # 7 steps, evaluated every 2: the last step is evaluated (and, when kept, saved) only because it is last
        params = params_for("full", max_steps=7, eval_steps=2, save_steps=2, learning_rate=1e-3,
                            early_stopping=EarlyStoppingParams(patience=100, min_delta=0.0))
    kept = train_sft(base_dir, train, val, params, tmp_path / "kept", seed=0)
    trial = train_sft(base_dir, train, val, params, tmp_path / "trial", seed=0, save=False)
    assert kept.stopped_early == stops_early and (kept.global_step < 40 if stops_early else kept.global_step == 7)
    assert (trial.train_losses, trial.val_losses, trial.global_step, trial.stopped_early, trial.best_val_loss) == (
        kept.train_losses, kept.val_losses, kept.global_step, kept.stopped_early, kept.best_val_loss)
    assert any((tmp_path / "kept" / "checkpoints").iterdir()) and Path(kept.output_dir).is_dir()
    assert [p for p in (tmp_path / "trial").rglob("*") if p.is_file()] == []
