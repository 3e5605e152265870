"""The recipe's ``offload`` section, applied: accelerate ``device_map`` loading for inference (GPUs, CPU, disk)
and the DeepSpeed ZeRO configuration for training.

``device_map_kwargs`` turns :class:`~tuneline.params.OffloadParams` into ``from_pretrained`` keywords
(``device_map``, ``max_memory`` in bytes, ``offload_folder``); :func:`tuneline.models.loading.load_causal_lm`
and :func:`tuneline.train.methods.load_base` take them. ``plan_device_map`` shows where each module would go
without loading any weight (``init_empty_weights`` + ``infer_auto_device_map``). ``zero_config`` is the DeepSpeed
config the HF ``Trainer`` takes (``TrainingArguments(deepspeed=...)``); it needs CUDA and the ``deepspeed``
package, and :func:`check_zero_runs` says so before training starts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from tuneline.params import OffloadParams


def max_memory_bytes(params: OffloadParams) -> Optional[dict[Any, int]]:
    """``max_memory`` as accelerate wants it: GPU indices as ints, sizes in bytes (None when the recipe sets none)."""
    from tuneline.train.memory import parse_size

    if not params.max_memory:
        return None
    return {int(k) if k.isdigit() else k: parse_size(v) for k, v in params.max_memory.items()}


def device_map_kwargs(params: Optional[OffloadParams]) -> dict[str, Any]:
    """``from_pretrained`` keywords for offloaded inference loading; empty when ``params.inference`` is off."""
    if params is None or not params.inference:
        return {}
    kwargs: dict[str, Any] = {"device_map": params.device_map}
    memory = max_memory_bytes(params)
    if memory is not None:
        kwargs["max_memory"] = memory
    if params.offload_folder:
        folder = Path(params.offload_folder).expanduser()
        folder.mkdir(parents=True, exist_ok=True)
        kwargs["offload_folder"] = str(folder)
    return kwargs


def plan_device_map(model_path: str | Path, params: OffloadParams) -> dict[str, Any]:
    """Where each module would be placed under ``params`` (reads the config only, allocates nothing)."""
    from accelerate import infer_auto_device_map, init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(model_path), trust_remote_code=False)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config)
    no_split = getattr(model, "_no_split_modules", None) or []
    return dict(infer_auto_device_map(model, max_memory=max_memory_bytes(params), no_split_module_classes=no_split))


def placement_summary(model: Any) -> dict[str, int]:
    """How many modules of a device-mapped model sit on each device ("disk", "cpu", 0, ...)."""
    counts: dict[str, int] = {}
    for device in (getattr(model, "hf_device_map", None) or {}).values():
        counts[str(device)] = counts.get(str(device), 0) + 1
    return counts


def zero_config(params: OffloadParams, *, bf16: bool) -> Optional[dict[str, Any]]:
    """The DeepSpeed config for ``params.zero_stage`` (None when ZeRO is off); batch sizes, learning rate and
    accumulation stay "auto" so the HF Trainer fills them from its own arguments."""
    if not params.zero_stage:
        return None
    zero: dict[str, Any] = {"stage": params.zero_stage, "overlap_comm": True, "contiguous_gradients": True,
                            "reduce_bucket_size": "auto"}
    if params.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if params.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    if params.zero_stage == 3:
        zero.update(stage3_prefetch_bucket_size="auto", stage3_param_persistence_threshold="auto",
                    stage3_gather_16bit_weights_on_model_save=True)
    return {
        "zero_optimization": zero,
        "bf16": {"enabled": bool(bf16)},
        "fp16": {"enabled": False},
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "train_batch_size": "auto",
    }


def check_zero_runs(params: Optional[OffloadParams]) -> None:
    """Raise ValueError saying why DeepSpeed ZeRO cannot run here (no CUDA, no ``deepspeed``); no-op when off."""
    if params is None or not params.zero_stage:
        return
    import importlib.util

    import torch

    if not torch.cuda.is_available():
        raise ValueError(f"offload.zero_stage: {params.zero_stage} needs CUDA devices (DeepSpeed ZeRO does not train "
                         "on CPU); set offload.zero_stage: 0 and see `tuneline plan` for what fits this machine")
    if importlib.util.find_spec("deepspeed") is None:
        raise ValueError("offload.zero_stage needs the deepspeed package (pip install deepspeed); "
                         "or set offload.zero_stage: 0")
