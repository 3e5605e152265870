"""Where a trainer runs and which engine shares the work: the recipe's ``compute`` section made concrete.

- :func:`check_compute` runs first in every trainer (the recipe runner calls it before any model loads): a recipe
  that asks for CUDA on a machine without it, or for FSDP/DeepSpeed where they cannot train, fails there with
  one clear message, not minutes into a run.
- :func:`accelerate_config` renders the ``accelerate launch`` config for ``compute.engine`` (DDP, FSDP or
  DeepSpeed ZeRO with its CPU offload); :func:`validate_accelerate_config` checks it with accelerate's own loader
  (unknown keys are errors) and :func:`validate_deepspeed_config` a ZeRO config with DeepSpeed's config class
  (typos are errors). ``deploy/accelerate/`` holds the rendered files for the GPU recipes; a test keeps them
  equal to what this module renders.

DDP runs through ``torchrun`` (:func:`tuneline.train.distributed.launch_command`); FSDP through ``accelerate
launch --config_file`` (the HF Trainer reads FSDP from accelerate's environment); DeepSpeed through the Trainer's
``deepspeed=`` argument (:func:`tuneline.models.offload.zero_config`) under torchrun.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any, Optional

from tuneline.params import ComputeParams, OffloadParams

ACCELERATE_CONFIG_FILE = "accelerate.yaml"


def check_compute(compute: ComputeParams, offload: Optional[OffloadParams] = None) -> str:
    """The device this trainer runs on (``cpu`` or ``cuda``); ValueError naming the recipe key when the recipe asks
    for what this machine cannot do."""
    import torch

    has_cuda = torch.cuda.is_available()
    if compute.device == "cuda" and not has_cuda:
        raise ValueError("compute.device: cuda but no CUDA device is visible here (torch "
                         f"{torch.__version__}, CUDA build: {torch.version.cuda or 'none'}); run on a GPU machine "
                         "or set compute.device: auto or cpu")
    if compute.engine != "ddp" and not has_cuda:
        raise ValueError(f"compute.engine: {compute.engine} needs CUDA devices and none is visible (through "
                         "accelerate FSDP is silently dropped on CPU, and DeepSpeed ZeRO does not train there); "
                         "set compute.engine: ddp")
    if compute.engine == "deepspeed":
        import importlib.util

        if importlib.util.find_spec("deepspeed") is None:
            raise ValueError("compute.engine: deepspeed needs the deepspeed package "
                             "(DS_BUILD_OPS=0 pip install deepspeed==0.19.8 builds its ops at first use)")
    if offload is not None and offload.zero_stage and compute.engine != "deepspeed":
        raise ValueError("offload.zero_stage > 0 needs compute.engine: deepspeed")
    return "cuda" if has_cuda and compute.device != "cpu" else "cpu"


def accelerate_config(compute: ComputeParams, *, num_processes: int, bf16: bool,
                      offload: Optional[OffloadParams] = None) -> dict[str, Any]:
    """The ``accelerate launch --config_file`` content for ``compute.engine`` on one machine."""
    cpu = compute.device == "cpu"
    config: dict[str, Any] = {
        "compute_environment": "LOCAL_MACHINE",
        "machine_rank": 0,
        "num_machines": 1,
        "num_processes": int(num_processes),
        "mixed_precision": "bf16" if bf16 else "no",
        "use_cpu": cpu,
        "main_training_function": "main",
        "rdzv_backend": "static",
        "same_network": True,
    }
    if compute.engine == "ddp":
        config["distributed_type"] = ("MULTI_CPU" if cpu else "MULTI_GPU") if num_processes > 1 else "NO"
    elif compute.engine == "fsdp":
        config["distributed_type"] = "FSDP"
        config["fsdp_config"] = {
            "fsdp_version": 2,  # FSDP2 (fully_shard): per-parameter sharding, LoRA-friendly
            "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP",  # one unit per decoder layer
            "fsdp_reshard_after_forward": True,  # ZeRO-3-like: parameters gathered per layer
            "fsdp_state_dict_type": "SHARDED_STATE_DICT",  # checkpoints written per rank
            "fsdp_cpu_ram_efficient_loading": True,  # rank 0 loads, the others receive
            "fsdp_offload_params": bool(offload and offload.offload_params),
            "fsdp_activation_checkpointing": compute.gradient_checkpointing,
        }
    else:
        params = offload or OffloadParams()
        if not params.zero_stage:
            raise ValueError("compute.engine: deepspeed needs offload.zero_stage: 2 or 3")
        config["distributed_type"] = "DEEPSPEED"
        config["deepspeed_config"] = {
            "zero_stage": params.zero_stage,
            "offload_optimizer_device": "cpu" if params.offload_optimizer else "none",
            "offload_param_device": "cpu" if params.offload_params else "none",
            "zero3_init_flag": params.zero_stage == 3,
            "zero3_save_16bit_model": params.zero_stage == 3,
            "gradient_accumulation_steps": 1,
        }
    return config


def validate_accelerate_config(config: dict[str, Any]) -> Any:
    """accelerate's own config loader on ``config`` (unknown keys and unknown engines are errors); its ClusterConfig."""
    import yaml
    from accelerate.commands.config.config_args import load_config_from_file

    with tempfile.TemporaryDirectory(prefix="tuneline-accelerate-") as tmp:
        path = Path(tmp) / ACCELERATE_CONFIG_FILE
        path.write_text(yaml.safe_dump(config, sort_keys=True), encoding="utf-8")
        return load_config_from_file(str(path))


def validate_deepspeed_config(config: dict[str, Any], *, micro_batch: int = 1, accumulation: int = 1) -> Any:
    """DeepSpeed's config class on ``config`` (a ZeRO section with a typo is an error), with the ``"auto"`` batch
    values the HF Trainer fills in replaced by ``micro_batch`` and ``accumulation``."""
    from deepspeed.runtime.config import DeepSpeedConfig

    filled = json.loads(json.dumps(config))
    fills = {"train_micro_batch_size_per_gpu": micro_batch, "gradient_accumulation_steps": accumulation,
             "train_batch_size": micro_batch * accumulation, "gradient_clipping": 1.0}
    for key, value in fills.items():
        if filled.get(key) == "auto":
            filled[key] = value
    zero = filled.get("zero_optimization", {})
    for key in [k for k, v in zero.items() if v == "auto"]:
        del zero[key]  # the Trainer sizes these buckets from the model's hidden size
    return DeepSpeedConfig(filled)


def write_accelerate_config(config: dict[str, Any], directory: str | Path) -> Path:
    """Write the config where ``accelerate launch --config_file`` reads it; returns the path."""
    import yaml

    path = Path(directory) / ACCELERATE_CONFIG_FILE
    path.write_text(yaml.safe_dump(config, sort_keys=True), encoding="utf-8")
    return path


# the rendered files in deploy/accelerate/ (a test keeps them equal to what this module renders)
DEPLOY_SETTINGS = {
    "ddp": (ComputeParams(device="cuda", engine="ddp"), OffloadParams()),
    "fsdp": (ComputeParams(device="cuda", engine="fsdp", gradient_checkpointing=True), OffloadParams()),
    "zero2": (ComputeParams(device="cuda", engine="deepspeed", gradient_checkpointing=True),
              OffloadParams(zero_stage=2, offload_optimizer=True)),
    "zero3_offload": (ComputeParams(device="cuda", engine="deepspeed", gradient_checkpointing=True),
                      OffloadParams(zero_stage=3, offload_optimizer=True, offload_params=True)),
}
DEPLOY_PROCESSES = 2  # one machine with two GPUs; `accelerate launch --num_processes N` overrides it


def deploy_files() -> dict[str, str]:
    """``deploy/accelerate/<name>.yaml`` for every entry of :data:`DEPLOY_SETTINGS`, and the DeepSpeed config the
    Trainer gets for the ZeRO ones (``<name>.deepspeed.json``), as file name -> text."""
    import yaml

    from tuneline.models.offload import zero_config

    files = {}
    for name, (compute, offload) in DEPLOY_SETTINGS.items():
        config = accelerate_config(compute, num_processes=DEPLOY_PROCESSES, bf16=True, offload=offload)
        files[f"{name}.yaml"] = (f"# rendered by tuneline.train.engines.deploy_files() for compute: {compute} and "
                                 f"offload: zero_stage={offload.zero_stage}\n" + yaml.safe_dump(config, sort_keys=True))
        zero = zero_config(offload, bf16=True)
        if zero is not None:
            files[f"{name}.deepspeed.json"] = json.dumps(zero, indent=2, sort_keys=True) + "\n"
    return files


if __name__ == "__main__":  # python -m tuneline.train.engines DIR: (re)write the rendered files
    import sys

    target = Path(sys.argv[1] if len(sys.argv) > 1 else "deploy/accelerate")
    target.mkdir(parents=True, exist_ok=True)
    for file_name, text in deploy_files().items():
        (target / file_name).write_text(text, encoding="utf-8")
        print(target / file_name)
