"""A self-contained directory for the registry from the gate's candidate, whatever kind it is.

Full weights register as they are. A LoRA-family/IA3 adapter is merged into its base (``merge_adapter`` checks
the merged logits against the adapter's). Bottleneck adapters cannot be merged (a non-linear module), so the
bundle is the base's weights and config with the adapter's files beside them; ``load_causal_lm`` (and the
registered pyfunc) put the adapters back when they find ``bottleneck_config.json``. The bundle's logits are
checked against the adapter loaded on its base before it is returned. Prompt-learning adapters (virtual tokens)
cannot be served from a plain directory and are refused with the reason.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

BASE_FILES = ("config.json", "generation_config.json")
# fp32 logits of the bundle (loaded as a served model: the default attention kernel) against the adapter on its base
# (loaded as for training: eager attention on CPU) differ by kernel rounding: 1.1e-5 on the demo's model, so 1e-5
# refused a correct bundle; a wrong bundle (a missing or misplaced adapter) is off by far more than 1e-4
BUNDLE_TOLERANCE = 1e-4


def servable_model_dir(candidate: Any, work_dir: str | Path, *, tolerance: float = BUNDLE_TOLERANCE) -> tuple[Path, str]:
    """(directory to register, how it was made: "full", "merged" or "bundle") for a :class:`ModelRef`."""
    from tuneline.models.loading import local_model_dir

    if candidate.kind == "full":
        return local_model_dir(candidate), "full"
    if candidate.base is None:
        raise ValueError(f"{candidate.uri}: an adapter reference without its base")
    return adapter_on_base(local_model_dir(candidate.base), local_model_dir(candidate), work_dir,
                           what=f"the candidate {candidate.stage}", tolerance=tolerance)


def check_servable_adapter(adapter_dir: str | Path, what: str = "") -> None:
    """Raise ValueError for an adapter no from_pretrained directory can hold (prompt learning: virtual tokens)."""
    from tuneline.params import PROMPT_LEARNING
    from tuneline.train.methods import read_method_file

    method = read_method_file(adapter_dir).get("method")
    if method in PROMPT_LEARNING:
        raise ValueError(f"{what or adapter_dir} is a {method} adapter: its virtual tokens cannot be merged "
                         "into weights or served from a from_pretrained directory; use a LoRA-family, adapter or "
                         "full sft.method for a registered model")


def adapter_on_base(base_dir: str | Path, adapter_dir: str | Path, work_dir: str | Path, *, what: str = "",
                    tolerance: float = BUNDLE_TOLERANCE) -> tuple[Path, str]:
    """A from_pretrained directory in ``work_dir`` from an adapter and its base: (path, "bundle") for bottleneck
    adapters, (path, "merged") for a LoRA-family/IA3 adapter (the merge checked against the adapter's logits)."""
    from tuneline.train.bottleneck import is_bottleneck_dir

    work = Path(work_dir)
    if is_bottleneck_dir(adapter_dir):
        return bottleneck_bundle(base_dir, adapter_dir, work / "bundle", tolerance=tolerance), "bundle"
    check_servable_adapter(adapter_dir, what)
    from tuneline.train.sft import merge_adapter

    merge_adapter(base_dir, adapter_dir, work / "merged")
    return work / "merged", "merged"


def bottleneck_bundle(base_dir: str | Path, adapter_dir: str | Path, out_dir: str | Path, *,
                      tolerance: float = BUNDLE_TOLERANCE) -> Path:
    """Base weights + config, and the adapter directory's files (adapters, tokenizer, method file), in
    ``out_dir``; raises RuntimeError when the bundle does not reproduce the adapter's logits."""
    import torch

    from tuneline.models.loading import load_causal_lm
    from tuneline.train.sft import load_trained

    base_dir, adapter_dir, out = Path(base_dir), Path(adapter_dir), Path(out_dir)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    for file in sorted(base_dir.glob("*.safetensors")) + [base_dir / n for n in BASE_FILES]:
        if file.is_file():
            shutil.copy2(file, out / file.name)
    for file in sorted(adapter_dir.iterdir()):
        if file.is_file():
            shutil.copy2(file, out / file.name)
    bundled = load_causal_lm(out)
    reference, _ = load_trained(base_dir, adapter_dir)
    vocab = reference.get_input_embeddings().weight.shape[0]
    sample = torch.randint(0, vocab, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = float((bundled(input_ids=sample).logits - reference(input_ids=sample).logits).abs().max())
    if not diff <= tolerance:
        raise RuntimeError(f"the bundle in {out} differs from the adapter on its base by {diff:.3g} > {tolerance}")
    return out
