"""Tokens added at fine-tuning time and the eos/bos/pad checks against the chat template (fast: no training)."""

from __future__ import annotations

import pytest

from tuneline.params import Recipe, RecipeError, TinyModelParams, TokenizerParams, build

pytest.importorskip("transformers")

TINY = TinyModelParams(vocab_size=400, hidden_size=64, intermediate_size=128, num_layers=1, num_heads=2,
                       num_kv_heads=2, max_position_embeddings=128, tokenizer_min_frequency=1)


@pytest.fixture()
def tokenizer():
    from tuneline.models.tiny import train_tokenizer

    return train_tokenizer(["reverse the words apple banana", "yes no maybe so"] * 20, TINY)


def test_added_tokens_are_single_ids_and_the_checks_pass(tokenizer):
    from tuneline.evaluate.report import added_token_probes, template_parity
    from tuneline.train.tokens import check_special_tokens, extend_tokenizer

    before = len(tokenizer)
    added = extend_tokenizer(tokenizer, TokenizerParams(add_special_tokens=("<sep>",), add_tokens=("kiwiberry",)))
    assert added["special"] == ["<sep>"] and added["regular"] == ["kiwiberry"]
    assert added["ids"] == [before, before + 1] and added["vocab_size"] == before + 2
    encoded = tokenizer.encode("a <sep> kiwiberry", add_special_tokens=False)
    assert set(added["ids"]) <= set(encoded) and encoded[-1] == added["ids"][1]
    assert check_special_tokens(tokenizer)["template_emits_eos"] is True
    assert sorted(added_token_probes(tokenizer)) == ["<sep>", "kiwiberry"]
    parity = template_parity(tokenizer, [])
    assert parity["ok"] and parity["checked"] == 2 and parity["probed_tokens"] == ["<sep>", "kiwiberry"]
    # adding the same tokens again adds nothing
    assert extend_tokenizer(tokenizer, TokenizerParams(add_special_tokens=("<sep>",)))["ids"] == []


def test_missing_pad_is_an_error_that_says_how_to_fix_it_and_the_fix_works(tokenizer):
    from tuneline.train.tokens import check_special_tokens, extend_tokenizer

    tokenizer.pad_token = None
    with pytest.raises(ValueError, match="tokenizer.pad_token in the recipe"):
        check_special_tokens(tokenizer)
    added = extend_tokenizer(tokenizer, TokenizerParams(pad_token="<padx>"))
    assert tokenizer.pad_token == "<padx>" and added["special"] == ["<padx>"]
    assert check_special_tokens(tokenizer)["pad"] == "<padx>"


def test_template_that_never_emits_eos_or_doubles_bos_is_refused(tokenizer):
    from tuneline.train.tokens import check_special_tokens

    good = tokenizer.chat_template
    tokenizer.chat_template = good.replace("{{ eos_token }}", "")
    with pytest.raises(ValueError, match="never emits the eos token"):
        check_special_tokens(tokenizer)
    tokenizer.chat_template = "{{ bos_token }}" + good
    with pytest.raises(ValueError, match="both add the bos token"):
        check_special_tokens(tokenizer)


def test_recipe_tokenizer_section_is_checked():
    base = {"name": "t", "model": {"build": "tiny"}, "data": {"demo": {}}, "dpo": {"enabled": False},
            "distill": {"enabled": False}, "gate": {"candidate": "sft"}}
    recipe = build(Recipe, {**base, "tokenizer": {"add_special_tokens": ["<sep>"]}, "sft": {"method": "lora"}})
    assert recipe.tokenizer.add_special_tokens == ("<sep>",)
    with pytest.raises(RecipeError, match="cannot train their embedding rows"):
        build(Recipe, {**base, "tokenizer": {"add_tokens": ["kiwi"]}, "sft": {"method": "prompt"}})
    with pytest.raises(RecipeError, match="listed twice"):
        TokenizerParams(add_tokens=("a", "a"))
    with pytest.raises(RecipeError, match="unknown key tokenizer.add_token"):
        build(Recipe, {**base, "tokenizer": {"add_token": ["kiwi"]}})
