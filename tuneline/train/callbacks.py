"""Trainer callbacks: AdaLoRA rank allocation, crash-safe checkpoints, metric forwarding, early stopping, Optuna
pruning.

Imported by the trainers only (it imports transformers); the checkpoint helpers live in the light
:mod:`tuneline.train.checkpoints`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable, Optional

from transformers import EarlyStoppingCallback, TrainerCallback

from tuneline.train.checkpoints import mark_complete

PROMPT_ENCODER_FILE = "prompt_encoder_state.safetensors"  # P-tuning's full encoder, saved with each checkpoint
ADALORA_STATE_FILE = "adalora_allocator.safetensors"  # AdaLoRA importance averages, saved with each checkpoint
ADALORA_PATTERN_FILE = "adalora_rank_pattern.json"  # AdaLoRA rank pattern at the checkpoint's step


def _plain_pattern(pattern: Optional[dict[str, Any]]) -> Optional[dict[str, list[bool]]]:
    if pattern is None:
        return None
    return {k: [bool(x) for x in (v.view(-1).tolist() if hasattr(v, "view") else v)] for k, v in pattern.items()}


class AdaLoraAllocateCallback(TrainerCallback):
    """Calls AdaLoRA's ``update_and_allocate(global_step)`` after every optimizer step.

    ``on_optimizer_step`` runs after ``optimizer.step()`` and before ``zero_grad()``, so the
    gradients the importance scores need are still there. No trainer does this by itself:
    without it AdaLoRA trains as a plain LoRA of rank ``init_r``.

    Checkpoints stay full-size (pruned ranks are zeros) so that resuming and best-model
    loading fit the live modules: between calls the rank pattern is held here, not in the
    adapter config (PEFT trims a saved adapter to the config's pattern). Each checkpoint
    also gets the pattern and the allocator's importance averages (written before the
    completion marker: add this callback before CompleteCheckpointCallback); a resumed run
    reads them back. At the end the pattern of the restored (best) step goes back into the
    config, so the final adapter is saved trimmed, as PEFT loads it.
    """

    def __init__(self, resume_from: Optional[str | Path] = None) -> None:
        self.resume_from = resume_from
        self.rank_pattern: Optional[dict[str, list[bool]]] = None
        self.calls = 0

    @staticmethod
    def _peft(model: Any) -> Any:
        while model is not None and not hasattr(model, "base_model"):
            model = getattr(model, "module", None)  # unwrap DDP
        if model is None or not hasattr(model.base_model, "update_and_allocate"):
            raise RuntimeError("AdaLoraAllocateCallback needs an AdaLoRA PeftModel")
        return model

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        peft_model = self._peft(model)
        config = peft_model.peft_config[peft_model.active_adapter]
        config.rank_pattern = self.rank_pattern
        peft_model.base_model.update_and_allocate(state.global_step)
        self.rank_pattern, config.rank_pattern = config.rank_pattern, None
        self.calls += 1
        return control

    def on_save(self, args, state, control, model=None, **kwargs):
        from safetensors.torch import save_file

        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if not (state.is_world_process_zero and folder.is_dir()):
            return control
        allocator = self._peft(model).base_model.rankallocator
        tensors = {
            f"{kind}/{name}": value.detach().contiguous()
            for kind in ("ipt", "exp_avg_ipt", "exp_avg_unc")
            for name, value in getattr(allocator, kind).items()
        }
        save_file(tensors, str(folder / ADALORA_STATE_FILE))
        (folder / ADALORA_PATTERN_FILE).write_text(json.dumps(_plain_pattern(self.rank_pattern)), encoding="utf-8")
        return control

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if self.resume_from is None:
            return control
        from safetensors.torch import load_file

        folder = Path(self.resume_from)
        allocator = self._peft(model).base_model.rankallocator
        allocator.reset_ipt()
        for key, value in load_file(str(folder / ADALORA_STATE_FILE)).items():
            kind, name = key.split("/", 1)
            getattr(allocator, kind)[name] = value
        self.rank_pattern = json.loads((folder / ADALORA_PATTERN_FILE).read_text(encoding="utf-8"))
        return control

    def on_train_end(self, args, state, control, model=None, **kwargs):
        peft_model = self._peft(model)
        pattern = self.rank_pattern
        best = state.best_model_checkpoint if args.load_best_model_at_end else None
        if best and (Path(best) / ADALORA_PATTERN_FILE).is_file():
            pattern = json.loads((Path(best) / ADALORA_PATTERN_FILE).read_text(encoding="utf-8"))
        peft_model.peft_config[peft_model.active_adapter].rank_pattern = pattern
        return control


class CompleteCheckpointCallback(TrainerCallback):
    """Marks each checkpoint valid once the trainer has fully written it (``on_save`` runs after the write);
    then ``on_complete(folder)`` (e.g. an upload of the checkpoint to a remote store) when given."""

    def __init__(self, on_complete: Optional[Callable[[Path], None]] = None) -> None:
        self.on_complete = on_complete

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if folder.is_dir():
                mark_complete(folder, state.global_step)
                if self.on_complete is not None:
                    self.on_complete(folder)
        return control


class MetricsCallback(TrainerCallback):
    """Forwards every log (train loss, learning rate, eval loss, ...) as ``on_log(step, logs)``."""

    def __init__(self, sink: Callable[[int, dict[str, Any]], None]) -> None:
        self.sink = sink

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and state.is_world_process_zero:
            self.sink(int(state.global_step), dict(logs))
        return control


class EvaluateAtEndCallback(TrainerCallback):
    """Evaluates and saves at the last step too, so the best-model choice sees the final weights (saves only
    where the run saves at all: a search trial keeps no checkpoint)."""

    def on_step_end(self, args, state, control, **kwargs):
        if state.max_steps and state.global_step >= state.max_steps and args.eval_strategy != "no":
            control.should_evaluate = True
            control.should_save = args.save_strategy != "no"
        return control


class PromptEncoderStateCallback(TrainerCallback):
    """Keeps P-tuning's whole prompt encoder (embedding + MLP) in each checkpoint and restores it.

    PEFT checkpoints of P-tuning hold only the encoder's *output*; the trainer's resume and
    best-model loading put that output into the encoder's input embedding, so the MLP is
    applied twice (measured: prompt values off by 1e8). This callback saves the encoder's
    state next to the adapter (before the completion marker: add it before
    CompleteCheckpointCallback) and loads it back after the trainer's own loading: on train
    begin when resuming, on train end after the best checkpoint was restored.
    """

    def __init__(self, resume_from: Optional[str | Path] = None) -> None:
        self.resume_from = resume_from

    @staticmethod
    def _encoder(model: Any) -> Any:
        return model.prompt_encoder[model.active_adapter]

    def on_save(self, args, state, control, model=None, **kwargs):
        from safetensors.torch import save_file

        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if state.is_world_process_zero and folder.is_dir():
            tensors = {k: v.detach().contiguous() for k, v in self._encoder(model).state_dict().items()}
            save_file(tensors, str(folder / PROMPT_ENCODER_FILE))
        return control

    def _restore(self, model: Any, checkpoint: str | Path) -> None:
        from safetensors.torch import load_file

        path = Path(checkpoint) / PROMPT_ENCODER_FILE
        if not path.is_file():
            raise RuntimeError(f"{checkpoint} has no {PROMPT_ENCODER_FILE}: cannot restore the P-tuning encoder")
        self._encoder(model).load_state_dict(load_file(str(path)), strict=True)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if self.resume_from is not None:
            self._restore(model, self.resume_from)
        return control

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if args.load_best_model_at_end and state.best_model_checkpoint:
            self._restore(model, state.best_model_checkpoint)
        return control


class UndoAtTrainEndCallback(TrainerCallback):
    """Runs ``undo`` when training ends, before any later callback or the caller sees the model
    (e.g. the bf16 layout of ``methods.bf16_autocast_layout``)."""

    def __init__(self, undo: Callable[[], None]) -> None:
        self.undo = undo

    def on_train_end(self, args, state, control, **kwargs):
        self.undo()
        return control


class _EarlyStoppingWithoutBestModel(EarlyStoppingCallback):
    """Early stopping where the best weights are deliberately not reloaded (a search trial keeps no weights):
    without the warning that says so at every trial's start (the checks it skips are of arguments
    ``train_sft`` sets itself)."""

    def on_train_begin(self, args, state, control, **kwargs):
        pass


def early_stopping_callback(patience: int, min_delta: float, *, best_model_loaded: bool = True) -> Any:
    """transformers' ``EarlyStoppingCallback``; needs ``metric_for_best_model="eval_loss"`` and step-wise
    evaluation in the TrainingArguments, and ``load_best_model_at_end=True`` unless ``best_model_loaded`` is
    False (then the stopped run keeps its last weights)."""
    cls = EarlyStoppingCallback if best_model_loaded else _EarlyStoppingWithoutBestModel
    return cls(early_stopping_patience=patience, early_stopping_threshold=min_delta)


class OptunaPruningCallback(TrainerCallback):
    """Report ``eval_loss`` to the Optuna trial at every evaluation; stop training when it is pruned.

    Runs in the trial's own process: the trial is rebuilt from the storage (:func:`load_trial`) on first
    use. After training, ``pruned`` tells whether the pruner stopped it, ``pruned_at_step`` when, and
    ``reported`` holds every ``(step, eval_loss)`` sent. With several ranks, rank 0 reports and asks the
    pruner (the evaluation loss is already averaged over ranks) and every rank follows its decision.
    """

    def __init__(self, study_name: str, storage_url: str, trial_id: int, metric: str = "eval_loss") -> None:
        self.study_name = study_name
        self.storage_url = storage_url
        self.trial_id = int(trial_id)
        self.metric = metric
        self.pruned = False
        self.pruned_at_step: Optional[int] = None
        self.reported: list[tuple[int, float]] = []
        self._trial: Any = None

    @property
    def trial(self) -> Any:
        if self._trial is None:
            from tuneline.train.hpo import load_trial

            self._trial = load_trial(self.study_name, self.storage_url, self.trial_id)
        return self._trial

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if not metrics or self.metric not in metrics or self.pruned:
            return control
        from tuneline.train.distributed import broadcast_flag, is_main_process

        step = int(state.global_step)
        prune = False
        if is_main_process():
            value = float(metrics[self.metric])
            if not math.isfinite(value):
                value = float("inf")
            self.trial.report(value, step)
            self.reported.append((step, value))
            prune = self.trial.should_prune()
        if broadcast_flag(prune):
            self.pruned = True
            self.pruned_at_step = step
            control.should_training_stop = True
        return control
