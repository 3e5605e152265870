"""Bottleneck adapters (Houlsby et al. 2019; Pfeiffer et al. 2020), our own: PEFT 0.21 has none and the
AdapterHub ``adapters`` package does not support transformers 5.

An adapter is a small module ``h + up(act(down(h)))`` applied to the output of a block's last projection,
before the block's residual add: after attention (``o_proj`` in Llama, ``attention.output.dense`` in BERT)
and/or after the MLP (``down_proj``, ``output.dense``). ``down`` maps the hidden size ``d`` to
``d // reduction_factor``, ``up`` maps back and starts at zero, so the model with fresh adapters computes
exactly what the base computes. Placement ``houlsby`` puts one after attention and one after the MLP of
every layer; ``pfeiffer`` only after the MLP.

Modelled on PEFT's tuners: the adapter is a child module of the projection it follows (``o_proj.bottleneck``)
and runs from a forward hook, so every base parameter keeps its name and the base ``state_dict`` loads
unchanged. Only adapter weights are saved (:data:`WEIGHTS_FILE`, safetensors) with a JSON config
(:data:`CONFIG_FILE`); :func:`load_bottleneck` puts them back on a fresh base. Works on decoders (Llama,
Qwen, Mistral, GPT-2, GPT-NeoX, OPT) and encoders (BERT/MiniLM ``BertLayer``).
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

CONFIG_FILE = "bottleneck_config.json"
WEIGHTS_FILE = "bottleneck_adapter.safetensors"
CHILD = "bottleneck"  # name of the adapter module under the projection it follows
CONFIG_ATTR = "tuneline_bottleneck_config"  # the model's adapters' config, set by add_bottleneck_adapters
PLACEMENTS = ("houlsby", "pfeiffer")
ACTIVATIONS = ("relu", "gelu", "silu", "tanh")

# full module names (regex, searched) of the last projection of each block, per family of architectures
ATTENTION_OUTPUTS = (
    r"\.self_attn\.o_proj$",  # Llama, Qwen, Mistral, Gemma
    r"\.attention\.output\.dense$",  # BERT, MiniLM, RoBERTa
    r"\.attn\.c_proj$",  # GPT-2
    r"\.attention\.dense$",  # GPT-NeoX
    r"\.self_attn\.out_proj$",  # OPT
)
MLP_OUTPUTS = (
    r"\.mlp\.down_proj$",  # Llama, Qwen, Mistral, Gemma
    r"\.layer\.\d+\.output\.dense$",  # BERT, MiniLM, RoBERTa (BertOutput, not BertSelfOutput)
    r"\.mlp\.c_proj$",  # GPT-2
    r"\.mlp\.dense_4h_to_h$",  # GPT-NeoX
    r"\.layers\.\d+\.fc2$",  # OPT
)


@dataclass(frozen=True)
class BottleneckConfig:
    """What :func:`add_bottleneck_adapters` builds; saved as :data:`CONFIG_FILE`."""

    reduction_factor: int = 16  # bottleneck width = hidden size // reduction_factor (at least 1)
    placement: str = "houlsby"  # houlsby: after attention and MLP; pfeiffer: after the MLP only
    activation: str = "relu"  # non-linearity between down- and up-projection
    targets: tuple[str, ...] = ()  # the projections adapted (filled in when the adapters are added)

    def __post_init__(self) -> None:
        if self.reduction_factor < 1:
            raise ValueError(f"adapter.reduction_factor must be >= 1, got {self.reduction_factor}")
        if self.placement not in PLACEMENTS:
            raise ValueError(f"adapter.placement {self.placement!r} is not one of {', '.join(PLACEMENTS)}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"adapter.activation {self.activation!r} is not one of {', '.join(ACTIVATIONS)}")

    def to_json(self) -> str:
        data = asdict(self)
        data["targets"] = list(self.targets)
        return json.dumps({"adapter_type": "bottleneck", **data}, indent=2) + "\n"

    @classmethod
    def from_file(cls, path: str | Path) -> "BottleneckConfig":
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        if data.pop("adapter_type", None) != "bottleneck":
            raise ValueError(f"{path}: not a bottleneck adapter config (adapter_type is not 'bottleneck')")
        data["targets"] = tuple(data.get("targets", ()))
        return cls(**data)


def _run_adapter(module: Any, args: Any, output: Any) -> Any:
    return getattr(module, CHILD)(output)


def find_targets(model: Any, placement: str) -> list[str]:
    """Names of the projections to adapt for ``placement``; ValueError naming the model when none match."""
    import torch

    patterns = (ATTENTION_OUTPUTS + MLP_OUTPUTS) if placement == "houlsby" else MLP_OUTPUTS
    names = [name for name, module in model.named_modules()
             if isinstance(module, torch.nn.Linear) and any(re.search(p, name) for p in patterns)]
    if not names:
        kind = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
        raise ValueError(f"bottleneck adapter: no attention/MLP output projection found in this {kind} model "
                         f"(known names: {', '.join(ATTENTION_OUTPUTS + MLP_OUTPUTS)})")
    return names


def add_bottleneck_adapters(model: Any, config: BottleneckConfig, *, freeze_base: bool = True,
                            trainable: Sequence[str] = ()) -> BottleneckConfig:
    """Insert adapters into ``model`` in place; returns the config with its ``targets`` filled in.

    With ``freeze_base`` every base parameter is frozen, except those whose name starts with one of
    ``trainable`` (a classifier head, for example). Adapters are created in the base's dtype and device.
    """
    import dataclasses

    from tuneline.train.modules import BottleneckAdapter as cls
    targets = list(config.targets) or find_targets(model, config.placement)
    modules = dict(model.named_modules())
    if freeze_base:
        for name, p in model.named_parameters():
            p.requires_grad_(any(name.startswith(t) for t in trainable))
    for name in targets:
        if name not in modules:
            raise ValueError(f"bottleneck adapter: the model has no module {name!r} (saved for another base?)")
        linear = modules[name]
        if hasattr(linear, CHILD):
            raise ValueError(f"bottleneck adapter: {name} already has an adapter")
        adapter = cls(linear.out_features, config.reduction_factor, config.activation)
        adapter.to(device=linear.weight.device, dtype=linear.weight.dtype)
        linear.add_module(CHILD, adapter)
        linear.register_forward_hook(_run_adapter)
    config = dataclasses.replace(config, targets=tuple(targets))
    setattr(model, CONFIG_ATTR, config)  # save_model writes it back beside the weights
    return config


def adapter_state_dict(model: Any) -> dict[str, Any]:
    """The adapter weights only (names end in ``.bottleneck.{down,up}.{weight,bias}``)."""
    return {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items() if f".{CHILD}." in f".{k}"}


def save_bottleneck(model: Any, config: BottleneckConfig, out_dir: str | Path) -> Path:
    """Write :data:`WEIGHTS_FILE` (safetensors) and :data:`CONFIG_FILE` to ``out_dir``."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = adapter_state_dict(model)
    if not state:
        raise ValueError("save_bottleneck: the model has no bottleneck adapters")
    save_file(state, str(out / WEIGHTS_FILE), metadata={"format": "pt", "adapter_type": "bottleneck"})
    (out / CONFIG_FILE).write_text(config.to_json(), encoding="utf-8")
    return out


def is_bottleneck_dir(path: str | Path) -> bool:
    """True for a directory of bottleneck adapters alone (a stage's adapter, to load on its base)."""
    return Path(path, CONFIG_FILE).is_file() and not Path(path, "config.json").is_file()


def is_bundle(path: str | Path) -> bool:
    """True for a bundle: a model's weights and config with bottleneck adapters beside them (one model)."""
    return Path(path, CONFIG_FILE).is_file() and Path(path, "config.json").is_file()


def load_bottleneck(model: Any, adapter_dir: str | Path, *, freeze_base: bool = True) -> Any:
    """Put the adapters saved in ``adapter_dir`` onto ``model`` (a fresh base), strictly: every saved weight
    lands on an adapter and every adapter gets a saved weight. Returns the model (its base frozen unless
    ``freeze_base`` is False)."""
    from safetensors.torch import load_file

    adapter_dir = Path(adapter_dir)
    config = BottleneckConfig.from_file(adapter_dir / CONFIG_FILE)
    add_bottleneck_adapters(model, config, freeze_base=freeze_base)
    saved = load_file(str(adapter_dir / WEIGHTS_FILE))
    expected = adapter_state_dict(model)
    if set(saved) != set(expected):
        missing, extra = sorted(set(expected) - set(saved)), sorted(set(saved) - set(expected))
        raise ValueError(f"{adapter_dir / WEIGHTS_FILE}: adapter weights do not match the model "
                         f"(missing {missing[:3]}, unexpected {extra[:3]})")
    model.load_state_dict(saved, strict=False)
    return model


# ---------------------------------------------------------------------------
# a bundle (base weights + adapters in one directory) as the start of a later stage

def attach_if_bundle(model: Any, model_dir: str | Path) -> Any:
    """``model`` (just loaded from ``model_dir`` with ``from_pretrained``, which reads only the base's weights)
    with the directory's bottleneck adapters put back when it is a bundle; as it is otherwise. Nothing is frozen:
    a bundle loads as one model, like any ``from_pretrained`` directory."""
    return load_bottleneck(model, model_dir, freeze_base=False) if is_bundle(model_dir) else model


def lora_exclusions(model: Any) -> list[str]:
    """Module names a LoRA on top of a model with bottleneck adapters must leave alone: the projections the
    adapters follow (a LoRA there adds its delta after the adapter, so merging it into the weight, which runs
    before the adapter, would change the function) and the adapters' own layers (they stay as trained)."""
    hosts = [name for name, module in model.named_modules() if hasattr(module, CHILD)]
    return hosts + [f"{CHILD}.down", f"{CHILD}.up"] if hosts else []


def save_model(model: Any, out_dir: str | Path, **kwargs: Any) -> Path:
    """``model.save_pretrained``; a model carrying bottleneck adapters is saved as a bundle: the base's weights
    without the adapters (so ``from_pretrained`` reads them cleanly) and the adapters beside them."""
    out = Path(out_dir)
    config = getattr(model, CONFIG_ATTR, None)
    adapters = adapter_state_dict(model)
    if not adapters:
        model.save_pretrained(out, **kwargs)
        return out
    if config is None:
        raise ValueError("save_model: the model has bottleneck adapters but no config (add_bottleneck_adapters sets it)")
    base = {k: v for k, v in model.state_dict().items() if k not in adapters}
    model.save_pretrained(out, state_dict=base, **kwargs)
    return save_bottleneck(model, config, out)
