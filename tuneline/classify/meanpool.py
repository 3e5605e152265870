"""The mean-pooling sequence classifier, at module level: the encoder's token states are mean-pooled over the
attention mask and L2-normalized (what sentence encoders like MiniLM were trained to produce, and what the linear
probe sees), then a linear layer gives the logits. This module imports transformers: the classifier code imports it
inside its functions."""

from __future__ import annotations

from typing import Any, Optional

import torch
from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import SequenceClassifierOutput

MEAN_POOL_TYPE = "tuneline_mean_pool"


class MeanPoolConfig(PretrainedConfig):
    model_type = MEAN_POOL_TYPE

    def __init__(self, encoder: Optional[dict] = None, classifier_dropout: float = 0.1, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.encoder = dict(encoder or {})
        self.classifier_dropout = classifier_dropout
        self.hidden_size = self.encoder.get("hidden_size", 0)
        self.max_position_embeddings = self.encoder.get("max_position_embeddings", 512)

class MeanPoolClassifier(PreTrainedModel):
    config_class = MeanPoolConfig
    base_model_prefix = "encoder"

    def __init__(self, config: MeanPoolConfig) -> None:
        super().__init__(config)
        encoder_config = AutoConfig.for_model(**config.encoder)
        self.encoder = AutoModel.from_config(encoder_config, add_pooling_layer=False)
        self.dropout = torch.nn.Dropout(config.classifier_dropout)
        self.classifier = torch.nn.Linear(encoder_config.hidden_size, config.num_labels)
        self.post_init()

    def _init_weights(self, module: Any) -> None:
        if module is getattr(self, "classifier", None):
            torch.nn.init.normal_(module.weight, std=0.02)
            torch.nn.init.zeros_(module.bias)

    def pooled(self, input_ids: Any, attention_mask: Any) -> Any:
        states = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(states.dtype)
        mean = (states * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
        return torch.nn.functional.normalize(mean.float(), dim=-1)

    def forward(self, input_ids: Any = None, attention_mask: Any = None, labels: Any = None,
                **kwargs: Any) -> Any:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        logits = self.classifier(self.dropout(self.pooled(input_ids, attention_mask)))
        loss = torch.nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return SequenceClassifierOutput(loss=loss, logits=logits)


def register() -> None:
    """Make ``AutoModelForSequenceClassification`` load a saved mean-pooling classifier (idempotent)."""
    AutoConfig.register(MEAN_POOL_TYPE, MeanPoolConfig, exist_ok=True)
    AutoModelForSequenceClassification.register(MeanPoolConfig, MeanPoolClassifier, exist_ok=True)
