"""The one loader: models and tokenizers by hub id or local path (safetensors only, no remote code), the
device and precision they run with, and the weights hash every stage checks them by.

Every stage loads through here: training (fp32 master weights, bf16 autocast where the device runs it natively),
evaluation, serving, DPO, RL and distillation. Heavy libraries are imported inside the functions.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from tuneline.records import sha256_file

if TYPE_CHECKING:
    from tuneline.refs import ModelRef


# ---------------------------------------------------------------------------
# device and precision


def resolve_device(device: Optional[str] = None) -> str:
    """``cuda`` when a GPU is visible (or asked for), else ``cpu``; asking for CUDA without one is an error."""
    import torch

    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but no CUDA device is visible")
    return str(device)


def bf16_supported(device: Any = "cpu") -> bool:
    """True when bf16 matmuls are fast on ``device``: CUDA with bf16, or a CPU with AVX512-BF16 or AMX.

    Without them torch still runs bf16 on a CPU, but emulated and several times slower than fp32.
    """
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    if device.type != "cpu":
        return False
    capability = str(torch.backends.cpu.get_cpu_capability()).upper()
    if "AMX" in capability or "BF16" in capability:
        return True
    if "AVX512" not in capability:  # an AVX2-only CPU, or torch held to AVX2 (ATEN_CPU_CAPABILITY=avx2)
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_bf16(flag: Optional[bool], device: Any = None, *, field: str = "bf16") -> bool:
    """Whether to train or run with bf16 (autocast). fp16 is never used (2.6 GFLOP/s on these CPUs).

    ``None``: what ``device`` (default: the one :func:`resolve_device` picks) runs natively. ``True`` on a CUDA
    device without bf16 is an error (it cannot run); on a CPU without native bf16 it is honoured (emulated, slow).
    """
    import torch

    device = torch.device(resolve_device(device) if device is None else device)
    if flag is None:
        return bf16_supported(device)
    if flag and device.type == "cuda" and not bf16_supported(device):
        raise ValueError(f"{field} is true but CUDA device {torch.cuda.get_device_name()} has no bf16 support; "
                         f"set {field} to false or null (fp16 is not offered)")
    return bool(flag)


# ---------------------------------------------------------------------------
# loading


class ModelNotAvailableError(OSError):
    """A model or tokenizer that cannot be loaded: not a local directory and not reachable or cached."""


def _not_available(kind: str, name_or_path: str, revision: Optional[str], exc: BaseException) -> ModelNotAvailableError:
    rev = f" at revision {revision!r}" if revision else ""
    offline = os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("TRANSFORMERS_OFFLINE") == "1"
    hint = (
        "the Hugging Face Hub is disabled here (HF_HUB_OFFLINE=1)"
        if offline
        else "it is neither a local directory nor reachable on / cached from the Hugging Face Hub"
    )
    return ModelNotAvailableError(
        f"cannot load {kind} {name_or_path!r}{rev}: {hint}. Download it to a local directory and set "
        f"model.name_or_path to that path, or use model.build: tiny. ({type(exc).__name__}: {exc})"
    )


def _check_local(name_or_path: str) -> None:
    looks_local = name_or_path.startswith(("/", "./", "../", "~", ".\\")) or name_or_path.count("/") > 1
    if looks_local and not Path(name_or_path).expanduser().is_dir():
        raise ModelNotAvailableError(f"cannot load {name_or_path!r}: local directory not found")


def load_tokenizer(name_or_path: str | Path, revision: Optional[str] = None) -> Any:
    """``AutoTokenizer.from_pretrained`` without remote code; a clear error when it cannot be had."""
    from transformers import AutoTokenizer

    name = str(name_or_path)
    _check_local(name)
    try:
        return AutoTokenizer.from_pretrained(name, revision=revision, trust_remote_code=False)
    except (OSError, ValueError) as exc:
        if Path(name).expanduser().is_dir():
            raise
        raise _not_available("tokenizer", name, revision, exc) from exc


def _resolve_dtype(dtype: Any) -> Any:
    import torch

    if dtype is None:
        return torch.float32  # trainable master weights; bf16 comes from autocast
    if isinstance(dtype, str) and dtype != "auto":
        resolved = getattr(torch, dtype, None)
        if not isinstance(resolved, torch.dtype):
            raise ValueError(f"unknown dtype {dtype!r}")
        return resolved
    return dtype


def load_causal_lm(name_or_path: str | Path, revision: Optional[str] = None, dtype: Any = None,
                   offload: Any = None, device: Optional[str] = None) -> Any:
    """``AutoModelForCausalLM.from_pretrained`` from safetensors only, without remote code.

    ``dtype`` None loads float32 (what training wants); "auto" keeps the checkpoint's dtype; a
    torch dtype or its name ("bfloat16") loads that. ``offload`` (the recipe's
    :class:`~tuneline.params.OffloadParams`) with ``inference`` on places the model across devices and disk
    (accelerate ``device_map``, ``max_memory``, ``offload_folder``). ``device`` (``auto``, ``cpu``, ``cuda``) places
    it for inference (:func:`place_for_inference`); None leaves it on the CPU, where a trainer takes it from.
    """
    from transformers import AutoModelForCausalLM

    from tuneline.models.offload import device_map_kwargs

    name = str(name_or_path)
    _check_local(name)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            name,
            revision=revision,
            trust_remote_code=False,
            use_safetensors=True,
            dtype=_resolve_dtype(dtype),
            **device_map_kwargs(offload),
        )
    except (OSError, ValueError) as exc:
        if Path(name).expanduser().is_dir():
            raise
        raise _not_available("model", name, revision, exc) from exc
    from tuneline.train.bottleneck import attach_if_bundle

    model = attach_if_bundle(model, name)  # a bundle: the base's weights plus bottleneck adapters
    model.eval()
    return model if device is None else place_for_inference(model, device)


def place_for_inference(model: Any, device: Optional[str] = "auto") -> Any:
    """``model`` on ``device`` (:func:`resolve_device`: a GPU when one is visible) in the dtype it runs fastest there:
    bf16 on a CUDA device with bf16, as loaded (fp32) on a CPU. A model accelerate already placed (``device_map``,
    offload) or bitsandbytes quantized (placed at load, never cast) is left where it is."""
    import torch

    target = resolve_device(device)
    placed = bool(getattr(model, "hf_device_map", None))
    quantized = any(getattr(m, attr, False) for m in (model, getattr(model, "base_model", None))
                    for attr in ("is_loaded_in_4bit", "is_loaded_in_8bit", "is_quantized"))
    if placed or quantized or target == "cpu":
        return model
    return model.to(target, torch.bfloat16) if bf16_supported(target) else model.to(target)


def weight_files(model_dir: str | Path) -> list[Path]:
    return sorted(Path(model_dir).glob("*.safetensors"))


def weights_sha256(model_dir: str | Path) -> str:
    """sha256 of the single safetensors file; for sharded weights, sha256 over "name sha" lines."""
    files = weight_files(model_dir)
    if not files:
        raise FileNotFoundError(f"no .safetensors weights in {model_dir}")
    if len(files) == 1:
        return sha256_file(files[0])
    digest = hashlib.sha256()
    for file in files:
        digest.update(f"{file.name} {sha256_file(file)}\n".encode())
    return digest.hexdigest()


def local_model_dir(ref: "ModelRef") -> Path:
    """The model's directory on this machine (fetched from the artifact store when it is remote); the
    weights are checked against the reference's sha256."""
    from tuneline import storage

    path = storage.fetch(ref.uri)
    actual = weights_sha256(path)
    if actual != ref.sha256:
        raise ValueError(f"{storage.redact(ref.uri)}: weights sha256 {actual[:16]} does not match the "
                         f"reference's {ref.sha256[:16]} (the files changed after {ref.stage} wrote them)")
    return path


def load_model_ref(ref: "ModelRef", offload: Any = None, device: Optional[str] = None) -> tuple[Any, Any]:
    """(model, tokenizer) for a reference: full weights, or the adapter (PEFT or bottleneck) on its base;
    ``offload`` and ``device`` as in :func:`load_causal_lm`."""
    from tuneline.train.sft import load_trained

    if ref.kind == "adapter":
        assert ref.base is not None
        model, tokenizer = load_trained(local_model_dir(ref.base), local_model_dir(ref), offload=offload)
        return (model if device is None else place_for_inference(model, device)), tokenizer
    path = local_model_dir(ref)
    return load_causal_lm(path, offload=offload, device=device), load_tokenizer(path)
