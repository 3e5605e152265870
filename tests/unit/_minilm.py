"""A session fixture shared by the classifier tests: all-MiniLM-L6-v2 cut to its first two blocks (the real
pretrained weights, a third of the compute)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def minilm2(tmp_path_factory) -> str:
    from transformers import AutoModel

    from tuneline.classify.model import encoder_path
    from tuneline.models.loading import load_tokenizer

    source = encoder_path(None)
    model = AutoModel.from_pretrained(source, use_safetensors=True)
    model.encoder.layer = model.encoder.layer[:2]
    model.config.num_hidden_layers = 2
    out = tmp_path_factory.mktemp("minilm2")
    model.save_pretrained(out)
    load_tokenizer(source).save_pretrained(out)
    return str(out)
