"""The Trainer subclasses of the SFT and distillation stages, at module level. This module imports transformers:
only the trainers import it, inside their functions, so loading the Dagster definitions stays light."""

from __future__ import annotations

from typing import Any, Optional

from transformers import Trainer

from tuneline.compat.transformers import SamplerHooks
from tuneline.params import DistillParams
from tuneline.train.common import LengthGroupedSampler
from tuneline.train.distill import kd_terms
from tuneline.train.sft import needed_mask


class UnwrapsOnce:
    """A trainer mixin: the model under accelerate's wrappers, looked up once per model. accelerate's
    ``unwrap_model`` looks up installed packages' metadata on every call (2.7 ms of a ~85 ms step, the demo's full
    SFT on 2 cores)."""

    def unwrapped(self, model):
        found = getattr(self, "_unwrapped_of", None)
        if found is None or found[0] is not model:
            found = (model, self.accelerator.unwrap_model(model))
            self._unwrapped_of = found
        return found[1]


class NoFlopCount:
    """A trainer mixin: no FLOP estimate per step. The ``Trainer``'s estimate walks every parameter each step
    (2.6 ms of a ~75 ms LoRA step on the tiny Llama) for a statistic (``total_flos``) nothing here reads."""

    def floating_point_ops(self, inputs):
        return 0


def without_flop_count(trainer_class: type) -> type:
    """``trainer_class`` (a TRL trainer built as it is) with :class:`NoFlopCount` mixed in, under its own name."""
    return type(trainer_class.__name__, (NoFlopCount, trainer_class), {})


class SftTrainer(SamplerHooks, UnwrapsOnce, NoFlopCount, Trainer):
    """``Trainer`` with optional length-grouped batches (a seeded, resumable train order, and evaluation
    in length order), and a label-only head loss for methods whose forward adds nothing."""

    group_by_length: bool = True

    def train_sampler(self, dataset):
        if not self.group_by_length:
            return None  # the Trainer's seeded random order
        lengths = [len(x["input_ids"]) for x in dataset]
        # grouped by the global batch: every rank draws the same order and accelerate deals it out in
        # per-rank batches, so N ranks see the same global batches as one process would
        global_batch = self.args.train_batch_size * self.args.gradient_accumulation_steps * self.args.world_size
        return LengthGroupedSampler(lengths, global_batch, seed=self.args.seed)

    # methods whose PeftModel forward adds nothing to the decoder + head (AdaLoRA adds its
    # orthogonal regularizer to the loss, prompt learning prepends virtual tokens)
    label_only_methods: tuple[str, ...] = ("lora", "qlora", "ia3", "adapter", "full", "freeze")
    method: str = ""
    examples_seen: int = 0  # train examples this rank computed a loss on

    def training_step(self, model, inputs, num_items_in_batch=None):
        positions = inputs.get("position_ids")  # packed rows: positions restart at 0 per example
        self.examples_seen += int((positions == 0).sum()) if positions is not None else len(inputs["input_ids"])
        return super().training_step(model, inputs, num_items_in_batch)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """Training loss with the LM head applied only where there are labels.

        The stock causal-LM loss projects every position onto the vocabulary and then ignores
        prompt and padding positions; here the decoder's hidden states are gathered at the
        labelled positions first (25% fewer head rows on the alpaca-like bench data). Same
        loss and normalization as the model's own (sum / ``num_items_in_batch``, or the mean).
        Not with several ranks: the decoder is called on the unwrapped model, which bypasses the
        DDP wrapper's forward, and with it the gradient all-reduce (measured: ranks drift apart).
        """
        if (return_outputs or not model.training or self.method not in self.label_only_methods
                or self.args.world_size > 1):
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        import torch.nn.functional as F

        lm = self._decoder_lm(model)
        with self.accelerator.autocast():
            hidden = lm.get_decoder()(
                input_ids=inputs["input_ids"],
                attention_mask=needed_mask(inputs.get("attention_mask")),
                position_ids=inputs.get("position_ids"),
                use_cache=False,
            ).last_hidden_state
            targets = inputs["labels"][:, 1:]
            keep = targets != -100
            logits = lm.get_output_embeddings()(hidden[:, :-1][keep])
        loss = F.cross_entropy(logits.float(), targets[keep], reduction="sum")
        if self.model_accepts_loss_kwargs and num_items_in_batch is not None:
            loss = loss / num_items_in_batch
            if self.args.average_tokens_across_devices:
                loss = loss * self.accelerator.num_processes
        else:
            loss = loss / keep.sum().clamp(min=1)
        return loss

    def _decoder_lm(self, model):
        """The causal LM under ``model``, wrappers and PEFT off."""
        unwrapped = self.unwrapped(model)
        return unwrapped.get_base_model() if hasattr(unwrapped, "get_base_model") else unwrapped

    def eval_sampler(self, dataset):
        if not self.group_by_length or self.args.world_size > 1:
            return None
        return sorted(range(len(dataset)), key=lambda i: -len(dataset[i]["input_ids"]))


class KDTrainer(NoFlopCount, Trainer):
    """``Trainer`` whose loss is alpha_ce * CE + alpha_kl * T^2 * KL(teacher_T || student_T)."""

    def __init__(self, *args: Any, teacher_cache: dict[str, Any], kd: DistillParams, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.teacher_cache = teacher_cache
        self.kd = kd
        self._terms: dict[str, list[float]] = {"kl": [], "ce": []}

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        kl, ce, _ = kd_terms(model, inputs, self.teacher_cache, self.kd.temperature, ce_grad=self.kd.alpha_ce > 0)
        loss = self.kd.alpha_ce * ce + self.kd.alpha_kl * self.kd.temperature**2 * kl
        if model.training:
            self._terms["kl"].append(float(kl.detach()))
            self._terms["ce"].append(float(ce.detach()))
        return (loss, None) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: Optional[float] = None) -> None:
        if "loss" in logs and self._terms["kl"]:
            for name, values in self._terms.items():
                logs[name] = sum(values) / len(values)
                values.clear()
        super().log(logs, start_time)
