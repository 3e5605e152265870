"""Build the trainable model for each fine-tuning method in ``tuneline.params.PEFT_METHODS``.

``apply_method`` loads the base model and returns it ready for a plain ``transformers.Trainer``:
LoRA-family adapters (lora, qlora, adalora), IA3, prompt learning (prefix, prompt, ptuning,
multitask_prompt), our own bottleneck adapters (``adapter``, :mod:`tuneline.train.bottleneck`), full
fine-tuning, or ``freeze`` (only the top blocks train). Settings that cannot run raise before any
training. Heavy libraries are imported inside the functions.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from tuneline.params import PEFT_METHODS, PROMPT_LEARNING, TOKEN_METHODS, SftParams

QUANT_MULTIPLE = 32  # bitsandbytes 4-bit on CPU needs each quantized Linear's out size to be a multiple of this
METHOD_FILE = "tuneline_method.json"  # written next to a saved adapter/model: how to load it back
ADAPTER_METHODS = ("lora", "qlora", "adalora", "ia3", "prefix", "prompt", "ptuning", "multitask_prompt")
UNTAGGED_TASK = "untagged"  # multitask prompt tuning: the family of records that name none


def count_params(model: Any) -> tuple[int, int]:
    """(trainable, total) parameter counts; 4-bit weights count as their unpacked size."""
    if hasattr(model, "get_nb_trainable_parameters"):
        trainable, total = model.get_nb_trainable_parameters()
        return int(trainable), int(total)
    seen: set[int] = set()
    trainable = total = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
    return trainable, total


# ---------------------------------------------------------------------------
# QLoRA preconditions


def quantized_linear_sizes(base_model_path: str | Path) -> dict[str, int]:
    """Out size of every Linear that 4-bit loading would quantize, by module name (read from the config).

    The model is built on the meta device (no weights, no memory) and the modules transformers keeps
    unquantized (output embeddings, tied weights) are left out, exactly as ``from_pretrained`` does.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from tuneline.compat.transformers import keys_to_not_convert

    config = AutoConfig.from_pretrained(base_model_path)
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(config)
    skip = set(keys_to_not_convert(meta))
    return {
        name: module.out_features
        for name, module in meta.named_modules()
        if isinstance(module, torch.nn.Linear) and name not in skip and not any(name.startswith(s + ".") for s in skip)
    }


def check_4bit_shapes(base_model_path: str | Path) -> int:
    """Raise ValueError naming the first Linear whose out size is not a multiple of 32; returns how many pass."""
    sizes = quantized_linear_sizes(base_model_path)
    bad = {name: size for name, size in sizes.items() if size % QUANT_MULTIPLE}
    if bad:
        name, size = next(iter(bad.items()))
        raise ValueError(
            f"qlora: Linear {name!r} has out_features={size}, not a multiple of {QUANT_MULTIPLE}: "
            f"bitsandbytes 4-bit on CPU cannot run it ({len(bad)} of {len(sizes)} quantized Linears fail: "
            f"{', '.join(sorted(set(n.rsplit('.', 1)[-1] + '=' + str(s) for n, s in bad.items())))}). "
            "Use method 'lora', or a model whose hidden/intermediate/head sizes are multiples of 32."
        )
    return len(sizes)


def check_bitsandbytes_runs(compute_dtype: Any) -> None:
    """Quantize and run one tiny 4-bit Linear; raise RuntimeError saying why when bitsandbytes cannot."""
    import torch

    try:
        import bitsandbytes as bnb

        device = "cuda" if torch.cuda.is_available() else "cpu"
        layer = bnb.nn.Linear4bit(64, 64, bias=False, compute_dtype=compute_dtype, quant_type="nf4")
        layer = layer.to(device)
        with torch.no_grad():
            out = layer(torch.randn(2, 64, device=device, dtype=compute_dtype))
        if not torch.isfinite(out.float()).all():
            raise RuntimeError("a 4-bit forward returned non-finite values")
    except Exception as exc:  # noqa: BLE001 - any failure means the method cannot run here
        raise RuntimeError(
            f"qlora: bitsandbytes 4-bit cannot run on this device ({type(exc).__name__}: {exc}); use method 'lora'"
        ) from exc


def keep_4bit_layout(model: Any) -> int:
    """Stop bitsandbytes from repacking 4-bit weights for its CPU inference kernel; returns the layers touched.

    On AVX512-BF16 CPUs, ``Linear4bit.forward`` in eval mode without gradients repacks the weight
    in place and rounds its absmax scales to bf16 (lossy). During training that would swap the
    base under the adapter at the first evaluation, and a reloaded adapter would see a different
    base than the one it was trained on. With the flag off, training, evaluation and reloading
    all use the same dequantize-and-matmul path.
    """
    n = 0
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
            n += 1
    return n


def bf16_autocast_layout(model: Any) -> Callable[[], None]:
    """Lay an adapter model out for training under CPU bf16 autocast; returns the function that undoes it.

    Autocast casts to bf16 at every use what it could cast once; two changes give the very same
    matmul inputs without the repeated casts:

    - frozen ``nn.Linear`` weights are stored in bf16 (autocast re-cast them at every step: 15-18%
      of a LoRA step on the tiny Llama). A tied LM head is left alone (its weight is also the input
      embedding, looked up in fp32).
    - the RMSNorm outputs inside the decoder blocks are cast to bf16 once, and PEFT's own cast of
      an adapter's input to the adapter weights' dtype is turned off (it cast the bf16 input back to
      fp32, which autocast then cast to bf16 again); together ~5% of a step.

    The model then only runs under bf16 autocast, so the caller undoes this when training ends
    (``callbacks.UndoAtTrainEndCallback``), before anything else evaluates or saves the model.
    """
    import torch

    tied = model.get_input_embeddings().weight
    swapped: list[tuple[Any, Any]] = []
    hooks: list[Any] = []
    uncast: list[Any] = []

    def to_bf16(module, args, output):
        return output.to(torch.bfloat16)

    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if (
            isinstance(module, torch.nn.Linear)
            and weight is not None
            and not weight.requires_grad
            and weight.dtype == torch.float32
            and weight is not tied
        ):
            swapped.append((weight, weight.data))
            weight.data = weight.data.to(torch.bfloat16)
        if type(module).__name__.endswith("RMSNorm") and ".layers." in f".{name}":
            hooks.append(module.register_forward_hook(to_bf16))
        if getattr(module, "cast_input_dtype_enabled", False):
            module.cast_input_dtype_enabled = False
            uncast.append(module)

    def undo() -> None:
        for param, data in swapped:
            param.data = data
        for hook in hooks:
            hook.remove()
        for module in uncast:
            module.cast_input_dtype_enabled = True

    return undo


def fast_adapter_dropout(model: Any) -> int:
    """Swap the adapters' ``nn.Dropout`` modules for :class:`~tuneline.train.modules.FastDropout` instances; returns how many.

    On CPU, ``torch.nn.Dropout`` draws its mask with ``bernoulli_``, one generator call per element:
    measured here, 19-21% of a LoRA step's time on the tiny Llama (28 adapter inputs per step). The
    fast mask takes 16 random bits per element from 64-bit draws (4x fewer generator calls), keeping
    an element with probability ``1 - round(p * 65536) / 65536`` (|error| <= 8e-6) and scaling kept
    ones by the inverse of that probability, so the expectation is unchanged. Same seed, same masks.
    """
    import torch

    from tuneline.train.modules import FastDropout as cls
    n = 0
    for module in model.modules():
        dropouts = getattr(module, "lora_dropout", None)
        if isinstance(dropouts, torch.nn.ModuleDict):
            for key, drop in list(dropouts.items()):
                if type(drop) is torch.nn.Dropout and drop.p > 0:
                    dropouts[key] = cls(drop.p)
                    n += 1
    return n


# ---------------------------------------------------------------------------
# AdaLoRA schedule


def adalora_schedule(total_steps: int) -> dict[str, int]:
    """tinit/tfinal/deltaT for a run of ``total_steps`` optimizer steps.

    10% warmup at full rank, then budget reallocation, then the last 20% at the final ranks;
    about ten reallocations in between. Needs at least 3 steps to have a budgeting phase.
    """
    if total_steps < 3:
        raise ValueError(f"adalora needs at least 3 optimizer steps to reallocate ranks, this run has {total_steps}")
    tinit = max(1, int(0.1 * total_steps))
    tfinal = max(1, int(0.2 * total_steps))
    budget = total_steps - tinit - tfinal
    return {"tinit": tinit, "tfinal": tfinal, "deltaT": max(1, budget // 10), "total_step": total_steps}


# ---------------------------------------------------------------------------
# multitask prompt tuning: the two stages and the task ids


@dataclass(frozen=True)
class MultitaskStage:
    """One stage of multitask prompt tuning. Source: one task id per family in ``families``. Target: starts from
    the source adapter's weights (``source_weights``) and has a single task, id 0, which serving uses too."""

    families: tuple[str, ...]  # the source stage's task families, in task-id order
    source_weights: Optional[str] = None  # the source adapter's safetensors (target stage)
    source_task: int = 0  # exact_source_task: the source family the target starts from

    @property
    def stage(self) -> str:
        return "source" if self.source_weights is None else "target"

    def task_id(self, family: Optional[str]) -> int:
        """The task id a record of ``family`` trains with in this stage."""
        if self.stage == "target":
            return 0
        name = family or UNTAGGED_TASK
        if name not in self.families:
            raise ValueError(f"multitask_prompt: task family {name!r} is not one of the source stage's "
                             f"{', '.join(self.families)}")
        return self.families.index(name)

    def to_dict(self) -> dict[str, Any]:
        return {"stage": self.stage, "families": list(self.families), "source_task": self.source_task}


def task_families(records: Any) -> tuple[str, ...]:
    """The sorted task families of ``records`` (records without one are :data:`UNTAGGED_TASK`)."""
    return tuple(sorted({getattr(r, "task", None) or UNTAGGED_TASK for r in records}))


def bind_task_ids(model: Any, task_id: int = 0) -> Any:
    """Make a multitask-prompt model's ``forward`` and ``generate`` pass ``task_ids`` (``task_id`` for every row)
    when the caller gives none: PEFT raises without them, and evaluation and serving know no task families.
    Returns the model."""
    import torch

    forward, generate = model.forward, model.generate

    def ids_for(args: tuple, kwargs: dict) -> Any:
        x = kwargs.get("input_ids")
        if x is None:
            x = kwargs.get("inputs_embeds")
        if x is None and args:
            x = args[0]
        return torch.full((x.shape[0],), task_id, dtype=torch.long, device=x.device)

    def bound_forward(*args, task_ids=None, **kwargs):
        return forward(*args, task_ids=ids_for(args, kwargs) if task_ids is None else task_ids, **kwargs)

    def bound_generate(*args, task_ids=None, **kwargs):
        return generate(*args, task_ids=ids_for(args, kwargs) if task_ids is None else task_ids, **kwargs)

    model.forward, model.generate = bound_forward, bound_generate
    return model


# ---------------------------------------------------------------------------
# building the model


def _targets(params: SftParams) -> Any:
    targets = tuple(params.lora.target_modules)
    return "all-linear" if targets == ("all-linear",) else list(targets)


def _freeze_all_but_top(model: Any, top: int) -> dict[str, Any]:
    layers = model.model.layers
    n = len(layers)
    if not 1 <= top <= n:
        raise ValueError(f"freeze: train_top_layers must be in [1, {n}] for this {n}-layer model, got {top}")
    for p in model.parameters():
        p.requires_grad_(False)
    trained = list(range(n - top, n))
    for i in trained:
        for p in layers[i].parameters():
            p.requires_grad_(True)
    for p in model.model.norm.parameters():
        p.requires_grad_(True)
    head = model.get_output_embeddings()
    head.weight.requires_grad_(True)
    tied = head.weight is model.get_input_embeddings().weight
    info: dict[str, Any] = {"trained_layers": trained, "frozen_layers": list(range(n - top)), "tied_embeddings": tied}
    if tied:
        info["note"] = (
            "lm_head is tied to the input embeddings: training the head also updates the token embeddings "
            "that feed the frozen bottom blocks"
        )
    return info


def apply_method(
    base_model_path: str | Path,
    params: SftParams,
    *,
    seed: int,
    total_steps: Optional[int] = None,
    multitask: Optional["MultitaskStage"] = None,
    added_tokens: Optional[dict[str, Any]] = None,
) -> tuple[Any, dict[str, Any]]:
    """Load the base model and make it trainable by ``params.method``; returns (model, info).

    ``total_steps`` (the run's optimizer steps) is required for AdaLoRA, whose schedule depends on it.
    ``multitask`` says which stage of multitask prompt tuning to build (required for that method).
    ``added_tokens`` (:func:`tuneline.train.tokens.extend_tokenizer`'s result) grows the embeddings to the new
    vocabulary (mean-resizing); LoRA/QLoRA then train the new rows (``trainable_token_indices``), full trains all.
    ``info`` holds trainable/total parameter counts and what the method set up.
    """
    import torch
    from transformers import AutoModelForCausalLM, set_seed

    from tuneline.models.loading import resolve_bf16
    from tuneline.train.common import attention_implementation

    method = params.method
    if method not in PEFT_METHODS:
        raise ValueError(f"method {method!r} is not one of {', '.join(PEFT_METHODS)}")
    if method == "multitask_prompt" and multitask is None:
        raise ValueError("multitask_prompt needs its stage (source over the task families, or target from a source)")
    new_ids = list((added_tokens or {}).get("ids") or [])
    if new_ids and method not in TOKEN_METHODS:
        raise ValueError(f"{method} cannot train the embedding rows of added tokens; use one of {', '.join(TOKEN_METHODS)}")
    if method == "adalora" and total_steps is None:
        raise ValueError("adalora needs total_steps (its rank budget schedule depends on the run length)")
    bf16 = resolve_bf16(params.bf16)
    info: dict[str, Any] = {"method": method}

    # checks that can fail, before anything is loaded
    if method == "qlora":
        compute_dtype = torch.bfloat16 if bf16 else torch.float32
        if not torch.cuda.is_available():
            info["quantized_linears"] = check_4bit_shapes(base_model_path)
        check_bitsandbytes_runs(compute_dtype)
    schedule = adalora_schedule(int(total_steps)) if method == "adalora" else None

    set_seed(seed)
    if method == "qlora":
        from peft import prepare_model_for_kbit_training
        from transformers import BitsAndBytesConfig

        quant = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=compute_dtype,
            bnb_4bit_use_double_quant=False,
        )
        model = AutoModelForCausalLM.from_pretrained(
            base_model_path, quantization_config=quant, dtype=torch.float32, attn_implementation=attention_implementation()
        )
        keep_4bit_layout(model)
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        info["quantization"] = {"bits": 4, "quant_type": "nf4", "compute_dtype": str(compute_dtype).split(".")[-1]}
    else:
        model = AutoModelForCausalLM.from_pretrained(
            base_model_path, dtype=torch.float32, attn_implementation=attention_implementation()
        )
    model.config.use_cache = False  # no KV cache while training
    if new_ids:
        from tuneline.train.tokens import embeddings_tied, resize_embeddings

        resize_embeddings(model, int(added_tokens["vocab_size"]))
        info["added_tokens"] = {**added_tokens, "tied_embeddings": embeddings_tied(model)}

    if method in ADAPTER_METHODS:
        from peft import get_peft_model

        config = _peft_config(model, params, schedule, multitask, new_ids)
        model = get_peft_model(model, config)
        if multitask is not None and multitask.source_weights is not None:
            # the target's prompt is initialized from the source now; the saved config must not point at the
            # source's file (a reload elsewhere would look for it): its weights are the adapter's own
            config.prompt_tuning_init = "RANDOM"
            config.prompt_tuning_init_state_dict_path = None
        if multitask is not None:
            info["multitask"] = multitask.to_dict()
        info["peft_type"] = config.peft_type.value
        targets = getattr(config, "target_modules", None)
        if targets is not None:  # resolved module names -> their distinct leaf names
            info["target_modules"] = targets if isinstance(targets, str) else sorted({t.rsplit(".", 1)[-1] for t in targets})
        if method in ("lora", "qlora", "adalora"):
            info.update(r=params.lora.r, alpha=params.lora.alpha, dropout=params.lora.dropout)
        if method == "adalora":
            info.update(init_r=config.init_r, target_r=config.target_r, **schedule)
        if method in PROMPT_LEARNING:
            info["num_virtual_tokens"] = params.num_virtual_tokens
    elif method == "adapter":
        from tuneline.train.bottleneck import BottleneckConfig, add_bottleneck_adapters

        shape = params.adapter
        config = add_bottleneck_adapters(model, BottleneckConfig(
            reduction_factor=shape.reduction_factor, placement=shape.placement, activation=shape.activation))
        info["bottleneck"] = {"reduction_factor": config.reduction_factor, "placement": config.placement,
                              "activation": config.activation, "targets": list(config.targets)}
    elif method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
    elif method == "freeze":
        info.update(_freeze_all_but_top(model, params.train_top_layers))

    trainable, total = count_params(model)
    if trainable == 0:
        raise RuntimeError(f"{method}: no trainable parameters after setup")
    info.update(trainable_params=trainable, total_params=total, trainable_percent=round(100.0 * trainable / total, 4))
    info["bf16"] = bf16
    info["attn_implementation"] = model.config._attn_implementation
    return model, info


def _peft_config(model: Any, params: SftParams, schedule: Optional[dict[str, int]],
                 multitask: Optional["MultitaskStage"] = None, new_ids: Optional[list[int]] = None) -> Any:
    import peft

    method, lora = params.method, params.lora
    task = peft.TaskType.CAUSAL_LM
    if method in ("lora", "qlora"):
        from tuneline.train.tokens import trainable_token_indices

        return peft.LoraConfig(
            task_type=task, r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
            target_modules=_targets(params), bias="none",
            trainable_token_indices=trainable_token_indices(model, new_ids) if new_ids else None,
        )
    if method == "adalora":
        return peft.AdaLoraConfig(
            task_type=task, target_r=lora.r, init_r=math.ceil(1.5 * lora.r), lora_alpha=lora.alpha,
            lora_dropout=lora.dropout, target_modules=_targets(params), **(schedule or {}),
        )
    if method == "ia3":
        # IA3 scales keys, values and the MLP input of down_proj (PEFT's defaults for the architecture)
        return peft.IA3Config(task_type=task)
    if method == "prefix":
        return peft.PrefixTuningConfig(task_type=task, num_virtual_tokens=params.num_virtual_tokens)
    if method == "prompt":
        return peft.PromptTuningConfig(task_type=task, num_virtual_tokens=params.num_virtual_tokens)
    if method == "multitask_prompt":
        assert multitask is not None
        if multitask.source_weights is None:  # source stage: a shared prompt and one factor per task family
            return peft.MultitaskPromptTuningConfig(
                task_type=task, num_virtual_tokens=params.num_virtual_tokens, num_tasks=len(multitask.families),
                num_ranks=params.multitask_prompt.num_ranks, prompt_tuning_init="RANDOM",
            )
        exact = params.multitask_prompt.target_init == "exact_source_task"
        return peft.MultitaskPromptTuningConfig(
            task_type=task, num_virtual_tokens=params.num_virtual_tokens, num_tasks=1,
            num_ranks=params.multitask_prompt.num_ranks,
            prompt_tuning_init="EXACT_SOURCE_TASK" if exact else "AVERAGE_SOURCE_TASKS",
            prompt_tuning_init_state_dict_path=str(multitask.source_weights),
            prompt_tuning_init_task=multitask.source_task,
        )
    if method == "ptuning":
        return peft.PromptEncoderConfig(
            task_type=task, num_virtual_tokens=params.num_virtual_tokens,
            encoder_hidden_size=model.config.hidden_size,
        )
    raise ValueError(f"{method} is not an adapter method")


# ---------------------------------------------------------------------------
# loading what training saved


def write_method_file(out_dir: str | Path, info: dict[str, Any], base_model_path: str | Path) -> None:
    """Record how ``out_dir`` was trained, so :func:`load_trained` can rebuild the same model."""
    record = {"method": info["method"], "base_model": str(base_model_path), "quantization": info.get("quantization")}
    for key in ("multitask", "added_tokens"):
        if info.get(key) is not None:
            record[key] = info[key]
    Path(out_dir, METHOD_FILE).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")


def read_method_file(out_dir: str | Path) -> dict[str, Any]:
    from tuneline.train.bottleneck import is_bottleneck_dir

    path = Path(out_dir, METHOD_FILE)
    if path.is_file():
        return json.loads(path.read_text(encoding="utf-8"))
    if is_bottleneck_dir(out_dir):
        return {"method": "adapter", "quantization": None}
    if Path(out_dir, "adapter_config.json").is_file():
        return {"method": "adapter", "quantization": None}
    return {"method": "full", "quantization": None}


def load_base(base_model_path: str | Path, quantization: Optional[dict[str, Any]] = None,
              vocab_size: Optional[int] = None, offload: Any = None, dtype: Any = None) -> Any:
    """The base model in fp32 (or ``dtype``), or 4-bit as it was for QLoRA training (``quantization`` from the method file);
    with ``vocab_size`` (tokens added at fine-tuning, from the method file) its embeddings grown to that size
    first, as training did, so the adapter's token rows fit. ``offload`` (the recipe's offload section) places an
    unquantized base across devices and disk for inference."""
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from tuneline.models.offload import device_map_kwargs
    from tuneline.train.bottleneck import attach_if_bundle
    from tuneline.train.common import attention_implementation
    from tuneline.train.tokens import resize_embeddings

    attn = attention_implementation()
    if quantization:
        quant = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=quantization["quant_type"],
            bnb_4bit_compute_dtype=getattr(torch, quantization["compute_dtype"]),
        )
        model = AutoModelForCausalLM.from_pretrained(
            base_model_path, quantization_config=quant, dtype=torch.float32, attn_implementation=attn
        )
        keep_4bit_layout(model)  # the same numerics as in training
    else:
        model = AutoModelForCausalLM.from_pretrained(base_model_path, dtype=dtype or torch.float32,
                                                     attn_implementation=attn, **device_map_kwargs(offload))
    if vocab_size:
        resize_embeddings(model, int(vocab_size))
    return attach_if_bundle(model, base_model_path)  # a later stage's base can be SFT's bottleneck bundle
