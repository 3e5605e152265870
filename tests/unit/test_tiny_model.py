"""The offline tiny model: tokenizer, chat template mask, init/save/load, pretraining, provisioning."""

from __future__ import annotations

import dataclasses
import math

import pytest

from tuneline.params import ModelParams, PretrainParams, TinyModelParams

SMALL = TinyModelParams(vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=2, num_kv_heads=2)
MESSAGES = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "What is 3 plus 4?"},
    {"role": "assistant", "content": "7"},
    {"role": "user", "content": "Which day comes after Monday?"},
    {"role": "assistant", "content": "Tuesday, of course."},
]


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    from tuneline.data.demo import generate_corpus
    from tuneline.params import DemoDataParams

    return generate_corpus(DemoDataParams(seed=3, corpus_paragraphs=400))


@pytest.fixture(scope="module")
def tokenizer(corpus):
    from tuneline.models.tiny import train_tokenizer

    return train_tokenizer(corpus, SMALL)


def test_tokenizer_special_tokens_and_defaults(tokenizer, corpus):
    from tuneline.models.tiny import train_tokenizer

    assert tokenizer.bos_token == "<|bos|>" and tokenizer.eos_token == "<|eos|>" and tokenizer.pad_token == "<|pad|>"
    ids = {tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id}
    assert None not in ids and len(ids) == 3
    assert len(tokenizer) == SMALL.vocab_size
    assert tokenizer.padding_side == "right"
    assert tokenizer.model_max_length == SMALL.max_position_embeddings
    text = "On Monday 12 plus 7 is 19."
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text  # byte-level round trip
    # a word or number opening a turn is tokenized as inside a sentence; digits are single tokens
    assert tokenizer("cat")["input_ids"] == tokenizer("a cat")["input_ids"][1:]
    assert tokenizer.tokenize("71") == ["Ġ", "7", "1"]
    assert tokenizer.tokenize("x\n71")[-2:] == ["7", "1"]
    assert train_tokenizer(corpus, SMALL).get_vocab() == tokenizer.get_vocab()  # deterministic


def test_chat_template_masks_exactly_assistant_content_and_eos(tokenizer):
    enc = tokenizer.apply_chat_template(MESSAGES, return_dict=True, return_assistant_tokens_mask=True)
    ids, mask = enc["input_ids"], enc["assistant_masks"]
    assert len(ids) == len(mask)
    assert ids[0] == tokenizer.bos_token_id

    # the masked tokens are exactly each assistant content's tokens followed by eos
    expected: list[int] = []
    for message in MESSAGES:
        if message["role"] == "assistant":
            expected += tokenizer(message["content"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert [i for i, m in zip(ids, mask) if m] == expected
    assert ids.count(tokenizer.eos_token_id) == 2 and ids[-1] == tokenizer.eos_token_id
    # contiguous spans: nothing of the user/system turns or the headers is masked in
    spans = [(i, ids[i]) for i in range(len(ids)) if mask[i] and (i == 0 or not mask[i - 1])]
    assert all(ids[i - 1] == tokenizer.convert_tokens_to_ids("<|assistant|>") for i, _ in spans)

    prompt = tokenizer.apply_chat_template(MESSAGES[:2], add_generation_prompt=True, return_dict=True)["input_ids"]
    assert prompt[-1] == tokenizer.convert_tokens_to_ids("<|assistant|>")
    assert ids[: len(prompt)] == prompt  # prompt + answer tokenizes as a prefix extension (serving == training)


def test_init_save_load_same_logits_and_template(tokenizer, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tuneline.models.tiny import init_tiny_model, save_model

    model = init_tiny_model(tokenizer, SMALL, seed=0)
    assert model.config.tie_word_embeddings and model.config.vocab_size == len(tokenizer)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert (model.config.bos_token_id, model.config.eos_token_id, model.config.pad_token_id) == (
        tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
    again = init_tiny_model(tokenizer, SMALL, seed=0)
    torch.testing.assert_close(model.state_dict(), again.state_dict())

    save_model(model, tokenizer, tmp_path)
    names = {p.name for p in tmp_path.iterdir()}
    assert {"model.safetensors", "chat_template.jinja", "tokenizer.json", "config.json"} <= names
    assert not any(n.endswith(".bin") for n in names)

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    loaded_tok = AutoTokenizer.from_pretrained(tmp_path)
    ids = tokenizer.apply_chat_template(MESSAGES, return_dict=True)["input_ids"]
    assert loaded_tok.apply_chat_template(MESSAGES, return_dict=True)["input_ids"] == ids
    assert loaded_tok.pad_token_id == tokenizer.pad_token_id and loaded_tok.padding_side == "right"
    x = torch.tensor([ids])
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, model.eval()(x).logits)


def test_linear_sizes_are_multiples_of_32(tokenizer):
    import torch

    from tuneline.models.tiny import check_quantizable, init_tiny_model

    check_quantizable(TinyModelParams())  # the defaults are quantizable
    model = init_tiny_model(tokenizer, SMALL, seed=0)
    linears = [(n, m.out_features) for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    assert linears and all(size % 32 == 0 for _, size in linears)

    bad = TinyModelParams(hidden_size=64, intermediate_size=100, num_heads=2, num_kv_heads=2)
    with pytest.raises(ValueError, match=r"multiples of 32.*intermediate_size=100"):
        init_tiny_model(tokenizer, bad, seed=0)
    with pytest.raises(ValueError, match="k_proj=16"):  # 4 heads of 16: kv projection 16 wide
        check_quantizable(TinyModelParams(hidden_size=64, intermediate_size=128, num_heads=4, num_kv_heads=1))


def test_short_pretrain_lowers_eval_loss(tokenizer, corpus):
    import torch

    from tuneline.models.pretrain import pretrain_causal_lm
    from tuneline.models.tiny import init_tiny_model

    params = PretrainParams(steps=30, batch_size=8, seq_len=64, warmup_steps=5, log_every=5)
    model = init_tiny_model(tokenizer, SMALL, seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calls = []
    result = pretrain_causal_lm(model, tokenizer, corpus, params, seed=1, steps=30,
                                progress=lambda s, n, loss: calls.append((s, n, loss)))
    assert [s for s, _ in result.losses] == [1, 5, 10, 15, 20, 25, 30]
    assert all(math.isfinite(v) for _, v in result.losses) and math.isfinite(result.final_loss)
    assert result.eval_loss_after < result.eval_loss_before - 0.5
    assert result.tokens_seen == 30 * 8 * 64 and result.tokens_per_second > 0
    assert calls[-1][:2] == (30, 30)
    assert not torch.equal(before["model.embed_tokens.weight"], model.state_dict()["model.embed_tokens.weight"])

    twin = init_tiny_model(tokenizer, SMALL, seed=0)
    again = pretrain_causal_lm(twin, tokenizer, corpus, params, seed=1, steps=30)
    assert again.losses == result.losses  # deterministic given the seed
    torch.testing.assert_close(twin.state_dict(), model.state_dict())


def test_training_attention_kernel_gives_the_default_kernels_loss_and_gradients(tokenizer, corpus, tmp_path):
    """Training on the CPU switches a model built or loaded with SDPA to eager attention (faster in backward there):
    the same loss and gradients on a padded batch, and nothing of the choice is saved with the model."""
    import copy
    import json

    import torch

    from tuneline.models.pretrain import pretrain_causal_lm
    from tuneline.models.tiny import init_tiny_model, save_model
    from tuneline.train.common import use_training_attention

    model = init_tiny_model(tokenizer, SMALL, seed=0)
    assert model.config._attn_implementation == "sdpa"
    twin = use_training_attention(copy.deepcopy(model))
    assert twin.config._attn_implementation == "eager" and model.config._attn_implementation == "sdpa"
    ids = torch.randint(3, SMALL.vocab_size, (3, 24), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 17:] = 0  # right padding, as the collators pad
    mask[2, 9:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    losses = []
    for m in (model, twin):
        m.train()
        loss = m(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[0], losses[1])
    for (name, a), (_, b) in zip(model.named_parameters(), twin.named_parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-4, msg=name)

    result = pretrain_causal_lm(init_tiny_model(tokenizer, SMALL, seed=0), tokenizer, corpus,
                                PretrainParams(steps=2, batch_size=4, seq_len=32, log_every=1), seed=1, steps=2)
    assert result.meta["attention"] == "eager"
    save_model(twin, tokenizer, tmp_path / "saved")
    assert not [k for k in json.loads((tmp_path / "saved" / "config.json").read_text()) if "attn" in k]


def test_compiled_pretraining_keeps_inductors_cache_apart_per_cpu_capability(tmp_path, monkeypatch):
    """The compiled step's inductor cache is a subfolder per CPU capability and held ISA, restored after."""
    import os

    import torch

    from tuneline.models.pretrain import _inductor_cache_per_cpu

    capability = torch.backends.cpu.get_cpu_capability()
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    monkeypatch.delenv("MKL_ENABLE_INSTRUCTIONS", raising=False)
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "shared"))
    with _inductor_cache_per_cpu(True):
        assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "shared" / capability)
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "shared")
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    monkeypatch.setenv("MKL_ENABLE_INSTRUCTIONS", "AVX2")
    with _inductor_cache_per_cpu(True):
        assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "shared" / f"{capability}-AVX2-AVX2")
    with _inductor_cache_per_cpu(False):  # eager runs leave it alone
        assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "shared")
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR")
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path / "tmp"))  # torch's default: <tmp>/torchinductor_<user>
    with _inductor_cache_per_cpu(True):
        folder = os.environ["TORCHINDUCTOR_CACHE_DIR"]
        assert folder.startswith(str(tmp_path / "tmp" / "torchinductor_")) and folder.endswith("-AVX2-AVX2")
    assert "TORCHINDUCTOR_CACHE_DIR" not in os.environ


@pytest.mark.long
def test_a_compile_cache_filled_with_free_kernels_serves_a_run_held_to_avx2(tmp_path):
    """The drill behind ``_inductor_cache_per_cpu``: two compiled pretraining runs, one process each, one cache folder,
    the second with torch, oneDNN and MKL held to AVX2 (as docs/benchmarks.md emulates the AVX2-only kind); before,
    the second crashed in code the first had compiled."""
    import json
    import os
    import subprocess
    import sys

    script = f"""
import json, math
from tuneline.data.demo import generate_corpus
from tuneline.models.pretrain import pretrain_causal_lm
from tuneline.models.tiny import init_tiny_model, train_tokenizer
from tuneline.params import DemoDataParams, PretrainParams, TinyModelParams
small = TinyModelParams(**{dataclasses.asdict(SMALL)!r})
corpus = generate_corpus(DemoDataParams(seed=3, corpus_paragraphs=400))
tokenizer = train_tokenizer(corpus, small)
params = PretrainParams(steps=4, batch_size=4, seq_len=32, warmup_steps=1, log_every=1, compile=True, bf16=False)
result = pretrain_causal_lm(init_tiny_model(tokenizer, small, seed=0), tokenizer, corpus, params, seed=1, steps=4)
print("RESULT " + json.dumps({{"compile": result.meta["compile"], "losses": [v for _, v in result.losses]}}))
"""
    held = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}
    base = {k: v for k, v in os.environ.items() if k not in held}
    base["TORCHINDUCTOR_CACHE_DIR"] = str(tmp_path / "inductor")
    results = []
    for env in (base, {**base, **held}):
        proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=900)
        assert proc.returncode == 0, proc.stderr[-3000:]
        line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
        results.append(json.loads(line[len("RESULT "):]))
    for result in results:
        assert result["compile"] == "inductor" and len(result["losses"]) == 4
        assert all(math.isfinite(v) for v in result["losses"])
    assert results[0]["losses"] == pytest.approx(results[1]["losses"], rel=1e-3)  # the same run, fp32 either way
    folders = {p.name for p in (tmp_path / "inductor").iterdir() if p.is_dir()}
    assert len(folders) == 2 and "AVX2-AVX2-AVX2" in folders  # one per capability, never shared


def test_compiled_pretraining_trains_as_eager_and_auto_compiles_only_long_cpu_runs(tokenizer, corpus, monkeypatch):
    """pretrain.compile true runs the steps through torch.compile: the same losses and weights as eager within
    rounding; null compiles a CPU run only from COMPILE_MIN_STEPS steps; true without a C++ compiler says why."""
    import torch

    from tuneline.models.pretrain import COMPILE_MIN_STEPS, pretrain_causal_lm, training_forward
    from tuneline.models.tiny import init_tiny_model

    runs = {}
    for mode in (False, True):
        model = init_tiny_model(tokenizer, SMALL, seed=0)
        # fp32: under bf16 autocast (a CPU with native bf16) compiled kernels round in another order, and after 6
        # steps the weights differ by up to 6e-3 while the losses still agree to 1e-4
        params = PretrainParams(steps=6, batch_size=4, seq_len=32, warmup_steps=1, log_every=1, compile=mode,
                                bf16=False)
        runs[mode] = (pretrain_causal_lm(model, tokenizer, corpus, params, seed=1, steps=6), model)
    eager, compiled = runs[False][0], runs[True][0]
    assert compiled.meta["compile"] == "inductor" and eager.meta["compile"] == "eager (pretrain.compile false)"
    assert compiled.meta["fused_adamw"] is eager.meta["fused_adamw"] is True
    assert [s for s, _ in compiled.losses] == [s for s, _ in eager.losses] == [1, 2, 3, 4, 5, 6]
    assert eager.losses[-1][1] < eager.losses[0][1]  # it trained
    for (_, a), (_, b) in zip(eager.losses, compiled.losses, strict=True):
        assert a == pytest.approx(b, rel=1e-4)
    torch.testing.assert_close(runs[True][1].state_dict(), runs[False][1].state_dict(), atol=1e-4, rtol=1e-3)
    twin = init_tiny_model(tokenizer, SMALL, seed=0)  # compiled runs are deterministic too (no atomic adds)
    again = pretrain_causal_lm(twin, tokenizer, corpus, dataclasses.replace(params, compile=True), seed=1, steps=6)
    assert again.losses == compiled.losses
    torch.testing.assert_close(twin.state_dict(), runs[True][1].state_dict(), atol=0, rtol=0)
    assert not torch.are_deterministic_algorithms_enabled()  # restored after the run

    model = init_tiny_model(tokenizer, SMALL, seed=0)
    cpu = torch.device("cpu")
    assert training_forward(model, PretrainParams(), cpu, COMPILE_MIN_STEPS - 1)[0] is model
    assert training_forward(model, PretrainParams(), cpu, COMPILE_MIN_STEPS)[1] == "inductor"
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setattr("shutil.which", lambda name: None)
    forward, why = training_forward(model, PretrainParams(), cpu, COMPILE_MIN_STEPS)
    assert forward is model and "no C++ compiler" in why
    with pytest.raises(RuntimeError, match="pretrain.compile is true.*C\\+\\+ compiler"):
        training_forward(model, PretrainParams(compile=True), cpu, 10)


def test_pretrain_rejects_tiny_corpus(tokenizer):
    from tuneline.models.pretrain import pretrain_causal_lm
    from tuneline.models.tiny import init_tiny_model

    model = init_tiny_model(tokenizer, SMALL, seed=0)
    with pytest.raises(ValueError, match="corpus too small"):
        pretrain_causal_lm(model, tokenizer, ["a cat"], PretrainParams(seq_len=64), seed=0, steps=1)


def test_provision_tiny_writes_safetensors_with_matching_sha(corpus, tmp_path):
    from transformers import AutoModelForCausalLM

    from tuneline.models.provision import provision_base_model
    from tuneline.records import sha256_file

    params = PretrainParams(steps=5, batch_size=4, seq_len=64, warmup_steps=1, log_every=5)
    info = provision_base_model(ModelParams(build="tiny", tiny=SMALL), params, corpus, tmp_path / "base", seed=0)
    out = tmp_path / "base"
    assert not list(out.rglob("*.bin")) and not list(out.rglob("*.pt"))
    assert info.weight_files == ["model.safetensors"]
    assert info.weights_sha256 == sha256_file(out / "model.safetensors")
    assert info.source == "tiny" and info.vocab_size == SMALL.vocab_size
    assert info.config["hidden_size"] == 64 and info.config["num_hidden_layers"] == 2
    assert info.pretrain is not None and info.pretrain["steps"] == 5 and len(info.loss_curve) == 2
    assert info.n_params == sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(out).parameters())
    assert set(info.to_dict()) >= {"path", "source", "weights_sha256", "n_params", "vocab_size", "config",
                                   "pretrain", "loss_curve"}

    # continued pretraining of a local model by path, then the same provisioning is reproducible
    cont = provision_base_model(ModelParams(name_or_path=str(out)), params, corpus, tmp_path / "cont", seed=0)
    assert cont.source == str(out) and cont.pretrain is not None
    assert cont.pretrain["eval_loss_after"] < cont.pretrain["eval_loss_before"]
    no_pt = provision_base_model(ModelParams(name_or_path=str(out)), PretrainParams(enabled=False), [],
                                 tmp_path / "copy", seed=0)
    assert no_pt.pretrain is None and no_pt.loss_curve == []
    assert no_pt.weights_sha256 == info.weights_sha256  # load + save is lossless


def test_missing_model_gives_clear_error():
    from tuneline.models.loading import ModelNotAvailableError, load_causal_lm, load_tokenizer

    with pytest.raises(ModelNotAvailableError, match="nobody-here/no-such-model"):
        load_tokenizer("nobody-here/no-such-model")
    with pytest.raises(ModelNotAvailableError, match="local directory not found"):
        load_causal_lm("/no/such/dir")


def test_plot_curves_writes_png(tmp_path):
    from tuneline.plots import plot_curves

    path = plot_curves({"train": [(1, 3.0), (2, 2.0)], "eval": [(2, 2.5)], "empty": []},
                       tmp_path / "c.png", "loss", "step", "loss")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
