"""DPO with each pair's prompt computed once: chosen and rejected answers share one row.

TRL's ``DPOTrainer`` runs a pair as two rows, prompt + chosen and prompt + rejected, through the policy and again
through the reference, and projects every position of both onto the vocabulary. Here a pair is one row: the prompt,
the chosen answer, the rejected answer. The attention mask lets the rejected tokens see the prompt and each other but
not the chosen tokens, and their position ids restart where the prompt ends, so every token sees exactly what it sees
in its own row and each answer's log-probability is the same number (tested against TRL's to fp32 rounding, values
and gradients). Only the answer tokens' hidden states go through the head. On the bench's pairs (18-token prompts,
4-5-token answers) a pair is 27 tokens instead of 45, and the head sees 9 rows instead of every position.

The reference (the model with its adapter disabled) never changes, so when a run's steps cover every pair, every
pair's reference log-probs are computed once, on the first step, in batches of similar lengths without a graph
(:func:`reference_logps`), and looked up by the pair's index from then on: the step runs the policy alone. The run
then computes one reference pass per pair instead of one per pair per epoch, and the pass is counted in the run's
time. A run that sees only some pairs keeps the reference pass in every step.

The loss is TRL's for the losses the stage uses (``sigmoid``, with ``sft`` beside it for RPO), its per-step metrics
the ones the stage reads (rewards and log-probs); checkpoints, resume, scheduling and logging stay TRL's. Anything
else (another loss, several ranks, prompt learning's virtual tokens, TRL's precompute flag, a separate
reference model, flash attention) is TRL's own path, unchanged: :func:`shares_prompts` says which. This module imports
TRL: import it inside functions.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from trl import DPOTrainer
from trl.trainer.dpo_trainer import DataCollatorForPreference

from tuneline.train.trainers import NoFlopCount, UnwrapsOnce

SHARED_LOSSES = {"sigmoid", "sft"}
PAIR_INDEX = "pair_index"  # the column the shared-prompt path adds: a pair's row in the train set
MASKED_KERNELS = ("eager", "sdpa")  # attention kernels that apply a 4D mask as given


def pack_pairs(examples: Sequence[dict[str, Any]], pad_token_id: int, max_length: int | None) -> dict[str, Any]:
    """One row per pair from TRL's tokenized columns (``prompt_ids``, ``chosen_ids``, ``rejected_ids``).

    Cut as TRL's collator cuts (``keep_start``: prompt + answer to ``max_length``). Returns ``input_ids``,
    ``position_ids`` and ``allowed`` (B, L, L: may query q attend to key k) right-padded, and for every answer
    token with a predecessor: its row, the position whose hidden state predicts it, the token and the sequence it
    belongs to (pair i's chosen answer is sequence i, its rejected answer B + i).
    """
    n = len(examples)
    rows, positions, spans = [], [], []
    pred_row, pred_col, target, seq = [], [], [], []
    for i, ex in enumerate(examples):
        prompt, chosen, rejected = list(ex["prompt_ids"]), list(ex["chosen_ids"]), list(ex["rejected_ids"])
        if max_length is not None:
            chosen = (prompt + chosen)[:max_length][len(prompt):]
            rejected = (prompt + rejected)[:max_length][len(prompt):]
            prompt = prompt[:max_length]
        lp, lc, lr = len(prompt), len(chosen), len(rejected)
        rows.append(prompt + chosen + rejected)
        positions.append(list(range(lp + lc)) + list(range(lp, lp + lr)))
        spans.append((lp, lc, lr))
        for j, token in enumerate(chosen):
            if lp + j >= 1:
                pred_row.append(i), pred_col.append(lp + j - 1), target.append(token), seq.append(i)
        for j, token in enumerate(rejected):
            before = (lp - 1) if j == 0 else (lp + lc + j - 1)
            if before >= 0:
                pred_row.append(i), pred_col.append(before), target.append(token), seq.append(n + i)
    length = max(len(r) for r in rows)
    input_ids = torch.full((n, length), pad_token_id, dtype=torch.long)
    position_ids = torch.zeros((n, length), dtype=torch.long)
    allowed = torch.ones(length, length, dtype=torch.bool).tril().repeat(n, 1, 1)
    for i, (row, pos, (lp, lc, lr)) in enumerate(zip(rows, positions, spans)):
        input_ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        position_ids[i, : len(row)] = torch.tensor(pos, dtype=torch.long)
        allowed[i, lp + lc :, lp : lp + lc] = False  # the rejected answer (and padding after it) never sees the chosen
        allowed[i, :, len(row) :] = False  # nor anyone the padding
        allowed[i, len(row) :, 0] = True  # padding queries see the first token: no row of the softmax is empty
    packed = {"input_ids": input_ids, "position_ids": position_ids, "allowed": allowed,
              "pred_row": torch.tensor(pred_row, dtype=torch.long),
              "pred_col": torch.tensor(pred_col, dtype=torch.long),
              "target": torch.tensor(target, dtype=torch.long), "seq": torch.tensor(seq, dtype=torch.long),
              "pairs": torch.tensor(n)}
    if n and PAIR_INDEX in examples[0]:
        packed[PAIR_INDEX] = torch.tensor([ex[PAIR_INDEX] for ex in examples], dtype=torch.long)
    return packed


class PairPacker:
    """The data collator of the shared-prompt path: :func:`pack_pairs` with the trainer's pad id and length."""

    def __init__(self, pad_token_id: int, max_length: int | None) -> None:
        self.pad_token_id, self.max_length = pad_token_id, max_length

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        return pack_pairs(examples, self.pad_token_id, self.max_length)


def additive_mask(allowed: Any, dtype: Any) -> Any:
    """:func:`pack_pairs`' ``allowed`` (B, L, L) as the 4D additive mask the attention kernels take: 0 where a query
    may attend, the dtype's minimum where not."""
    mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    return mask.masked_fill(~allowed, torch.finfo(dtype).min)[:, None]


def answer_logps(lm: Any, batch: dict[str, Any], mask: Any) -> tuple[Any, Any]:
    """(per-token log-probs of every answer token, their sum per sequence: B chosen then B rejected) from the
    causal LM ``lm``'s decoder and head, called directly (PEFT's layers are inside, so its adapters apply), under
    ``mask`` (:func:`additive_mask` of the batch)."""
    hidden = lm.get_decoder()(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                              attention_mask=mask, use_cache=False).last_hidden_state
    logits = lm.get_output_embeddings()(hidden[batch["pred_row"], batch["pred_col"]]).float()
    token_logps = torch.log_softmax(logits, dim=-1).gather(-1, batch["target"][:, None]).squeeze(-1)
    sums = torch.zeros(2 * int(batch["pairs"]), dtype=token_logps.dtype, device=token_logps.device)
    return token_logps, sums.index_add(0, batch["seq"], token_logps)


def reference_logps(peft_model: Any, examples: Any, pad_token_id: int, max_length: int | None, batch_size: int,
                    autocast: Any) -> Any:
    """(n, 2): every pair's reference log-probs (chosen, rejected) from ``peft_model`` with its adapter disabled
    (:func:`tuneline.train.common.reference_context`), in eval mode and without a graph, ``batch_size`` pairs at a
    time in length order (less padding), returned in the pairs' order. ``examples``: TRL's tokenized pairs."""
    from tuneline.models.generation import batches
    from tuneline.train.common import reference_context

    n = len(examples)
    rows = [examples[i] for i in range(n)]
    order = sorted(range(n), key=lambda i: len(rows[i]["prompt_ids"]) + len(rows[i]["chosen_ids"])
                   + len(rows[i]["rejected_ids"]))
    table = torch.empty(n, 2, dtype=torch.float32)
    lm, training = peft_model.get_base_model(), peft_model.training
    peft_model.eval()
    try:
        with torch.no_grad(), reference_context(peft_model), autocast:
            for chunk in batches(order, batch_size):
                batch = pack_pairs([rows[i] for i in chunk], pad_token_id, max_length)
                batch = {k: v.to(lm.device) for k, v in batch.items()}
                _, sums = answer_logps(lm, batch, additive_mask(batch["allowed"], lm.dtype))
                table[chunk] = sums.float().cpu().view(2, -1).T
    finally:
        peft_model.train(training)
    return table


class SharedPromptDPOTrainer(UnwrapsOnce, NoFlopCount, DPOTrainer):
    """TRL's ``DPOTrainer`` that feeds each pair as one row where :func:`shares_prompts` allows it, with the
    reference log-probs computed once per pair where the run's steps cover every pair."""

    REFERENCE_BATCHES = 4  # the one-off reference pass takes this many training batches at a time (no graph kept)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.shared_prompts = shares_prompts(self)
        self.reference_table = None
        if self.shared_prompts:
            self.data_collator = PairPacker(self.data_collator.pad_token_id, self.data_collator.max_length)
            self.train_dataset = self.train_dataset.add_column(PAIR_INDEX, list(range(len(self.train_dataset))))

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        if self.shared_prompts and PAIR_INDEX not in self._signature_columns:
            self._signature_columns = [*self._signature_columns, PAIR_INDEX]

    def covers_every_pair(self) -> bool:
        """Whether this run's steps draw at least as many pairs as the train set holds."""
        drawn = self.state.max_steps * self.args.per_device_train_batch_size * self.args.gradient_accumulation_steps
        return drawn >= len(self.train_dataset)

    def cached_reference(self, inputs: dict[str, Any]) -> Any:
        """The batch's reference log-probs (B chosen, then B rejected) from the once-computed table, or None where
        the per-step pass applies: evaluation, a batch without pair indices, a run that sees only some pairs."""
        if not self.model.training or PAIR_INDEX not in inputs:
            return None
        if self.reference_table is None:
            if not self.covers_every_pair():
                return None
            self.reference_table = reference_logps(
                self.unwrapped(self.model), self.train_dataset, self.data_collator.pad_token_id,
                self.data_collator.max_length, self.REFERENCE_BATCHES * self.args.per_device_train_batch_size,
                self.accelerator.autocast())
        rows = self.reference_table[inputs[PAIR_INDEX].cpu()]
        return torch.cat([rows[:, 0], rows[:, 1]]).to(inputs["input_ids"].device)

    def _compute_loss(self, model, inputs, return_outputs):
        if not self.shared_prompts:
            return super()._compute_loss(model, inputs, return_outputs)
        if return_outputs:  # only an evaluation loop with compute_metrics asks; the stage runs none
            raise ValueError("the shared-prompt DPO step makes no full logits to return (TRL deprecates "
                             "return_outputs); evaluate with tuneline.train.dpo.evaluate_preferences")
        from tuneline.train.common import reference_context

        mode = "train" if self.model.training else "eval"
        peft_model = self.unwrapped(model)
        lm = peft_model.get_base_model()
        mask = additive_mask(inputs["allowed"], lm.dtype)  # one mask for the policy's pass and the reference's
        ref_logps = self.cached_reference(inputs)
        with self.accelerator.autocast():
            token_logps, logps = answer_logps(lm, inputs, mask)
            if ref_logps is None:
                with torch.no_grad(), reference_context(peft_model):
                    _, ref_logps = answer_logps(lm, inputs, mask)
        pairs = int(inputs["pairs"])
        chosen_logps, rejected_logps = logps[:pairs], logps[pairs:]
        chosen_logratios = chosen_logps - ref_logps[:pairs]
        rejected_logratios = rejected_logps - ref_logps[pairs:]
        loss = 0.0
        for loss_type, weight in zip(self.loss_types, self.loss_weights, strict=True):
            if loss_type == "sigmoid":
                loss = loss + weight * -F.logsigmoid(self.beta * (chosen_logratios - rejected_logratios)).mean()
            else:  # "sft": the chosen answers' mean token NLL (RPO)
                loss = loss + weight * -token_logps[inputs["seq"] < pairs].mean()
        chosen_rewards = self.beta * chosen_logratios.detach()
        rejected_rewards = self.beta * rejected_logratios.detach()
        metrics = self._metrics[mode]
        metrics["rewards/chosen"].append(chosen_rewards.mean().item())
        metrics["rewards/rejected"].append(rejected_rewards.mean().item())
        metrics["rewards/accuracies"].append((chosen_rewards > rejected_rewards).float().mean().item())
        metrics["rewards/margins"].append((chosen_rewards - rejected_rewards).mean().item())
        metrics["logps/chosen"].append(chosen_logps.detach().mean().item())
        metrics["logps/rejected"].append(rejected_logps.detach().mean().item())
        return loss


def shares_prompts(trainer: Any) -> bool:
    """Whether ``trainer`` can feed pairs as shared-prompt rows: one process; a PEFT adapter whose reference is
    the model with it disabled, not a separate model or precomputed log-probs; no virtual tokens; and only the
    ``sigmoid`` and ``sft`` losses, without TRL's options that reweight or reshape them; TRL's own collator for
    text, cutting answers at the end; an attention kernel that takes a mask of its own (eager or SDPA: not flash
    attention's varlen kernels)."""
    peft_model = trainer.accelerator.unwrap_model(trainer.model)
    config = getattr(peft_model, "active_peft_config", None)
    collator = trainer.data_collator
    kernel = getattr(peft_model.config, "_attn_implementation", None)
    return (type(collator) is DataCollatorForPreference and collator.truncation_mode == "keep_start"
            and kernel in MASKED_KERNELS
            and trainer.args.world_size == 1 and trainer.ref_model is None and not trainer.precompute_ref_logps
            and config is not None and not config.is_prompt_learning
            and set(trainer.loss_types) <= SHARED_LOSSES and trainer.ld_alpha is None
            and trainer.f_divergence_type == "reverse_kl" and not trainer.use_weighting
            and not trainer.aux_loss_enabled)
