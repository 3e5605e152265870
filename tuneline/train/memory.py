"""Peak training memory from a model's config alone, and the cheapest setting that fits a memory budget.

``model_shape`` reads the config (``AutoConfig``; no weights) and builds the model on the meta device to count
its parameters exactly (embeddings, head, the Linears 4-bit loading would quantize). ``estimate`` adds up, for
one device:

- **weights**: every parameter at the load dtype (fp32 4 bytes, bf16 2), or 4-bit NF4 for the quantizable
  Linears (0.5 byte + one fp32 absmax per 64 weights); adapters (LoRA, prompts, bottlenecks) are kept in fp32;
- **gradients** and **optimizer** (AdamW: two moments) for the trainable parameters, in their dtype;
- **activations** kept for the backward pass, per layer and token for a Llama-style block (the attention score
  matrix for eager attention, none for SDPA/flash), plus the logits, their log-softmax and its gradient; with
  gradient checkpointing only each layer's input is kept and one layer is recomputed at a time;
- **optimizer_step**: AdamW's temporaries during the step, after the backward has freed the activations, so
  the peak is weights + gradients + optimizer + overhead + max(activations, optimizer_step);
- **overhead**: on CUDA the context, cuBLAS workspace and allocator slack (a flat 1 GiB); 0 on CPU, where the
  estimate is compared with the growth of the process's peak RSS.

ZeRO-2 partitions gradients and optimizer state (fp32 master weights and moments: 12 bytes per trainable
parameter) over ``num_gpus``, ZeRO-3 the weights too; ZeRO-Offload moves
optimizer state (and fp32 gradients) to CPU memory, ZeRO-Infinity the weights as well. ``plan`` tries the
settings in order of their expected slowdown and returns the first that fits. Figures are estimates: check them
against ``bench/plan_accuracy.py`` (measured peaks) before trusting a tight fit.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

GIB = 1024**3
CUDA_OVERHEAD = GIB  # context + cuBLAS workspace + allocator fragmentation, per GPU
NF4_BYTES = 0.5 + 4 / 64  # 4 bits per weight + one fp32 absmax per block of 64
ZERO_BUCKET_ELEMENTS = 5e8  # DeepSpeed's default reduce bucket (what stays on the GPU with optimizer offload)
METHODS = ("full", "freeze", "lora", "qlora", "adalora", "ia3", "prefix", "prompt", "ptuning", "multitask_prompt",
           "adapter")
# expected slowdown factors of the memory-saving settings (multiplied together), for ordering the candidates
SLOWDOWN = {"gradient_checkpointing": 1.33, "quant4": 1.25, "zero2": 1.05, "zero3": 1.15, "offload_optimizer": 1.5,
            "offload_params": 3.0, "halve_micro_batch": 1.1}


@dataclass(frozen=True)
class ModelShape:
    """What the planner needs from a config (counted on the meta device, no weights read)."""

    model_type: str
    n_params: int  # distinct parameters (tied weights once)
    n_embedding: int  # input embedding
    n_untied_head: int  # LM head when not tied to the embedding, else 0
    n_quantizable: int  # Linears 4-bit loading would quantize
    layer_params: int  # parameters of one decoder block
    largest_param: int  # elements of the largest single parameter tensor (the optimizer step's temporaries)
    linear_dims: tuple[tuple[int, int], ...]  # (in, out) of each Linear in one block (LoRA "all-linear" targets)
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    config_dtype: str  # the checkpoint's dtype as the config states it

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim


def model_shape(name_or_path: str | Path, revision: Optional[str] = None) -> ModelShape:
    """The shape of a causal LM from its config only (a local directory, or a hub id already cached/reachable)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from tuneline.compat.transformers import keys_to_not_convert

    config = AutoConfig.from_pretrained(str(name_or_path), revision=revision, trust_remote_code=False)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=False)
    seen: set[int] = set()
    n_params = 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            n_params += p.numel()
    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    tied = head is None or head.weight is emb
    skip = set(keys_to_not_convert(model))
    quantizable = sum(m.weight.numel() for n, m in model.named_modules()
                      if isinstance(m, torch.nn.Linear) and n not in skip
                      and not any(n.startswith(s + ".") for s in skip))
    blocks = _blocks(model)
    block = blocks[0]
    linears = tuple((m.in_features, m.out_features) for m in block.modules() if isinstance(m, torch.nn.Linear))
    heads = int(getattr(text, "num_attention_heads", 1))
    hidden = int(getattr(text, "hidden_size", emb.shape[1]))
    head_dim = int(getattr(text, "head_dim", None) or hidden // heads)
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or "float32"
    return ModelShape(
        model_type=str(getattr(config, "model_type", type(model).__name__)),
        n_params=n_params, n_embedding=emb.numel(), n_untied_head=0 if tied else head.weight.numel(),
        n_quantizable=quantizable, layer_params=sum(p.numel() for p in block.parameters()), linear_dims=linears,
        largest_param=max(p.numel() for p in model.parameters()),
        hidden=hidden, intermediate=int(getattr(text, "intermediate_size", None) or 4 * hidden),
        layers=len(blocks), heads=heads, kv_heads=int(getattr(text, "num_key_value_heads", None) or heads),
        head_dim=head_dim, vocab=int(emb.shape[0]), config_dtype=str(dtype).replace("torch.", ""),
    )


def _blocks(model: Any) -> list[Any]:
    import torch

    best: list[Any] = []
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) > len(best):
            best = list(module)
    if not best:
        raise ValueError(f"{type(model).__name__}: no list of transformer blocks found")
    return best


# ---------------------------------------------------------------------------
# one setting


@dataclass(frozen=True)
class Setting:
    """How training is run; each knob trades speed for memory."""

    dtype: str = "fp32"  # weights and activations: fp32 or bf16
    quant4: bool = False  # frozen Linears in 4-bit NF4 (QLoRA)
    gradient_checkpointing: bool = False
    zero: int = 0  # DeepSpeed ZeRO stage: 0 (none), 2 or 3
    offload: str = "none"  # none, optimizer (ZeRO-Offload), params (optimizer and weights: ZeRO-Infinity)
    micro_batch: int = 8  # sequences per device step (gradient accumulation keeps the effective batch)

    def slowdown(self, batch: int) -> float:
        f = 1.0
        f *= SLOWDOWN["gradient_checkpointing"] if self.gradient_checkpointing else 1.0
        f *= SLOWDOWN["quant4"] if self.quant4 else 1.0
        f *= {0: 1.0, 2: SLOWDOWN["zero2"], 3: SLOWDOWN["zero3"]}[self.zero]
        f *= {"none": 1.0, "optimizer": SLOWDOWN["offload_optimizer"], "params": SLOWDOWN["offload_params"]}[self.offload]
        f *= SLOWDOWN["halve_micro_batch"] ** max(0.0, math.log2(batch / self.micro_batch))
        return round(f, 3)

    def describe(self, batch: int) -> str:
        parts = [self.dtype]
        if self.quant4:
            parts.append("4-bit base (QLoRA)")
        if self.gradient_checkpointing:
            parts.append("gradient checkpointing")
        if self.zero:
            parts.append(f"ZeRO-{self.zero}")
        if self.offload != "none":
            parts.append({"optimizer": "CPU offload of optimizer state", "params": "CPU offload of optimizer and weights"}[self.offload])
        if self.micro_batch < batch:
            parts.append(f"micro-batch {self.micro_batch} x {math.ceil(batch / self.micro_batch)} accumulation steps")
        return ", ".join(parts)


def trainable_params(shape: ModelShape, method: str, *, lora_r: int = 16, num_virtual_tokens: int = 16,
                     reduction_factor: int = 16, train_top_layers: int = 1, num_tasks: int = 6) -> int:
    """Parameters ``method`` trains on this model (PEFT's counts, from the shapes)."""
    h, L = shape.hidden, shape.layers
    if method == "full":
        return shape.n_params
    if method == "freeze":
        return train_top_layers * shape.layer_params + h + shape.n_embedding + shape.n_untied_head
    if method in ("lora", "qlora"):
        return L * sum(lora_r * (i + o) for i, o in shape.linear_dims)
    if method == "adalora":
        r = math.ceil(1.5 * lora_r)
        return L * sum(r * (i + o + 1) for i, o in shape.linear_dims)
    if method == "ia3":
        return L * (2 * shape.kv_dim + shape.intermediate)
    if method == "prefix":
        return num_virtual_tokens * L * 2 * shape.kv_dim
    if method == "prompt":
        return num_virtual_tokens * h
    if method == "ptuning":
        return num_virtual_tokens * h + 3 * (h * h + h)
    if method == "multitask_prompt":
        return num_virtual_tokens * h + num_tasks * (num_virtual_tokens + h)
    if method == "adapter":
        width = max(1, h // reduction_factor)
        return 2 * L * (2 * h * width + width + h)
    raise ValueError(f"unknown method {method!r} (one of {', '.join(METHODS)})")


def activation_elements(shape: ModelShape, batch: int, seq_len: int, *, checkpointing: bool, eager: bool,
                        layers: Optional[int] = None) -> tuple[float, float]:
    """(elements kept for the whole backward pass, elements of the one block recomputed at a time under gradient
    checkpointing: 0 without it), the logits left out."""
    h, i, a, s = shape.hidden, shape.intermediate, shape.heads, seq_len
    L = shape.layers if layers is None else layers
    # one block keeps (counted with saved-tensor hooks on a Llama, transformers 5.23): the two norms' inputs and
    # normalized outputs, q/k/v after RoPE, the attention output; the MLP's gate, up, activation and product
    # (4 x intermediate); eager attention also the softmax output and the (p=0) dropout output of its scores
    per_token = 5 * h + 2 * shape.kv_dim + 4 * i + (2 * a * s if eager else 0)
    tokens = batch * seq_len
    if checkpointing:  # each block's input and the final norm; one block recomputed at a time in the backward
        return tokens * (L * h + 3 * h), tokens * per_token
    return tokens * (L * per_token + 3 * h), 0.0


@dataclass(frozen=True)
class Estimate:
    """Bytes on one device (and in CPU memory when offloaded) for one setting."""

    setting: Setting
    peak_bytes: int
    breakdown: dict[str, int]
    cpu_offload_bytes: int
    trainable_params: int
    slowdown: float

    def to_dict(self, batch: int) -> dict[str, Any]:
        return {"setting": dataclasses.asdict(self.setting), "description": self.setting.describe(batch),
                "peak_bytes": self.peak_bytes, "peak_gib": round(self.peak_bytes / GIB, 3),
                "breakdown": dict(self.breakdown), "cpu_offload_bytes": self.cpu_offload_bytes,
                "trainable_params": self.trainable_params, "slowdown": self.slowdown}


def estimate(shape: ModelShape, method: str, setting: Setting, *, batch: int, seq_len: int, num_gpus: int = 1,
             device: str = "cpu", **method_kwargs: Any) -> Estimate:
    """Peak memory of one training step on one device for ``setting``."""
    if setting.quant4 and method not in ("lora", "qlora", "adalora"):
        raise ValueError("a 4-bit base only trains with LoRA-family adapters (qlora)")
    wbytes = 4 if setting.dtype == "fp32" else 2
    n_train = trainable_params(shape, method, **method_kwargs)
    peft = method not in ("full", "freeze")
    # weights: frozen base (maybe 4-bit) + trainable (adapters in fp32)
    base = shape.n_params
    if setting.quant4:
        weights = shape.n_quantizable * NF4_BYTES + (base - shape.n_quantizable) * wbytes
    else:
        weights = base * wbytes
    train_bytes = 4 if peft else wbytes
    if peft:
        weights += n_train * 4
    gradients = n_train * train_bytes
    # AdamW's two moments in the parameters' dtype; under DeepSpeed ZeRO mixed precision an fp32 master copy and
    # fp32 moments (12 bytes per trainable parameter)
    optimizer = (12 if setting.zero else 2 * train_bytes) * n_train
    # activations (bf16 under autocast or bf16 weights); freeze keeps none below its trained blocks
    abytes = 4 if setting.dtype == "fp32" else 2
    top = method_kwargs.get("train_top_layers", 1) if method == "freeze" else None
    kept, recomputed = activation_elements(shape, setting.micro_batch, seq_len,
                                           checkpointing=setting.gradient_checkpointing, eager=device == "cpu",
                                           layers=top)
    logits = 3 * setting.micro_batch * seq_len * shape.vocab * 4  # fp32 log-softmax, its gradient, the logits' one
    # the backward starts at the loss (the logits' peak) and only then recomputes the top block: the two peaks
    # do not overlap
    activations = kept * abytes + max(recomputed * abytes, logits)
    # ZeRO partitioning and offload
    n = max(1, num_gpus)
    cpu = 0.0
    if setting.zero >= 2:
        gradients, optimizer = gradients / n, optimizer / n
    if setting.zero == 3:
        weights = weights / n + 2 * shape.layer_params * wbytes  # plus the gathered working set
    if setting.offload in ("optimizer", "params"):
        cpu += optimizer + gradients
        gradients = min(gradients, ZERO_BUCKET_ELEMENTS * train_bytes)
        optimizer = 0
    if setting.offload == "params":
        cpu += weights
        weights = 2 * shape.layer_params * wbytes
    # the optimizer step runs after the backward freed the activations; AdamW's temporaries (the second moment's
    # square root and its quotient): per parameter on CPU (two of the largest tensor), for all at once on CUDA
    # (foreach); none on the device when the optimizer is offloaded
    if optimizer == 0:
        step = 0.0
    elif device == "cuda":
        step = n_train * train_bytes / (max(1, num_gpus) if setting.zero else 1)
    else:
        step = 2 * min(shape.largest_param, n_train) * train_bytes
    overhead = CUDA_OVERHEAD if device == "cuda" else 0
    breakdown = {"weights": int(weights), "gradients": int(gradients), "optimizer": int(optimizer),
                 "activations": int(activations), "optimizer_step": int(step), "overhead": int(overhead)}
    peak = weights + gradients + optimizer + overhead + max(activations, step)
    return Estimate(setting, int(peak), breakdown, int(cpu), n_train, setting.slowdown(batch))


def candidate_settings(method: str, *, dtype: str, batch: int, device: str, num_gpus: int) -> list[Setting]:
    """Every setting worth trying, cheapest (least slowdown) first."""
    quants = [True] if method == "qlora" else ([False, True] if method in ("lora", "adalora") else [False])
    zeros: list[tuple[int, str]] = [(0, "none")]
    if device == "cuda":  # DeepSpeed ZeRO needs GPUs
        if num_gpus > 1:
            zeros += [(2, "none"), (3, "none")]
        zeros += [(2, "optimizer"), (3, "params")]
    micro = []
    b = batch
    while b >= 1:
        micro.append(b)
        if b == 1:
            break
        b = max(1, b // 2)
    out = [Setting(dtype=dtype, quant4=q, gradient_checkpointing=gc, zero=z, offload=o, micro_batch=m)
           for q in quants for gc in (False, True) for z, o in zeros for m in micro]
    return sorted(out, key=lambda s: (s.slowdown(batch), -s.micro_batch))


def plan(shape: ModelShape, method: str, *, budget_bytes: int, batch: int = 8, seq_len: int = 512,
         dtype: str = "fp32", device: str = "cpu", num_gpus: int = 1, requested: Optional[Setting] = None,
         **method_kwargs: Any) -> dict[str, Any]:
    """The requested setting's estimate, whether it fits ``budget_bytes``, and the cheapest setting that fits."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r} (one of {', '.join(METHODS)})")
    requested = requested or Setting(dtype=dtype, quant4=method == "qlora", micro_batch=batch)
    asked = estimate(shape, method, requested, batch=batch, seq_len=seq_len, num_gpus=num_gpus, device=device,
                     **method_kwargs)
    candidates = [estimate(shape, method, s, batch=batch, seq_len=seq_len, num_gpus=num_gpus, device=device,
                           **method_kwargs)
                  for s in candidate_settings(method, dtype=dtype, batch=batch, device=device, num_gpus=num_gpus)]
    fitting = [e for e in candidates if e.peak_bytes <= budget_bytes]
    best = fitting[0] if fitting else min(candidates, key=lambda e: e.peak_bytes)
    if asked.peak_bytes <= budget_bytes:
        text = f"fits as requested ({asked.setting.describe(batch)})"
    elif fitting:
        text = f"does not fit as requested; cheapest setting that fits: {best.setting.describe(batch)}"
    else:
        text = (f"no setting fits {budget_bytes / GIB:.1f} GiB on {num_gpus} {device} device(s); the smallest needs "
                f"{best.peak_bytes / GIB:.1f} GiB ({best.setting.describe(batch)}): use more devices or a smaller "
                "model" + ("" if device == "cuda" else "; ZeRO and offload need CUDA devices"))
    return {
        "model_type": shape.model_type, "method": method, "params": shape.n_params,
        "trainable_params": asked.trainable_params, "batch_size": batch, "seq_len": seq_len, "device": device,
        "num_gpus": num_gpus, "budget_bytes": int(budget_bytes),
        "fits": asked.peak_bytes <= budget_bytes, "peak_bytes": asked.peak_bytes, "breakdown": asked.breakdown,
        "setting": asked.to_dict(batch),
        "recommendation": {"fits": bool(fitting), "text": text, **best.to_dict(batch)},
        "alternatives": [e.to_dict(batch) for e in candidates[:12]],
    }


# ---------------------------------------------------------------------------
# sizes


_SIZE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([KMGT]i?B?|B)?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """Bytes from "24GiB", "24GB", "12G", "512MiB", "1.5TiB" or a plain number of bytes (G = GiB)."""
    m = _SIZE.match(str(text))
    if not m:
        raise ValueError(f"not a memory size: {text!r} (use e.g. 24GiB, 80GB, 512MiB)")
    value, unit = float(m.group(1)), (m.group(2) or "B").upper()
    if unit == "B":
        return int(value)
    power = "KMGT".index(unit[0]) + 1
    base = 1000 if unit.endswith("B") and "I" not in unit else 1024
    return int(value * base**power)


def available_memory() -> tuple[int, str]:
    """(bytes, device): the CUDA device's total memory when there is one, else this machine's available RAM."""
    import torch

    if torch.cuda.is_available():
        return int(torch.cuda.get_device_properties(0).total_memory), "cuda"
    for line in Path("/proc/meminfo").read_text(encoding="utf-8").splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024, "cpu"
    raise RuntimeError("cannot read the available memory; pass --gpu-memory")
