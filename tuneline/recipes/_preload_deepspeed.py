"""Imported by the preloaded server (:data:`tuneline.recipes._preload.PRELOAD`), never by a job itself: DeepSpeed,
where importing it in the server is safe.

Every ``Trainer`` imports DeepSpeed when it is installed (accelerate's ``unwrap_model``, in the Trainer's
``__init__``, even for a plain single-process run): 10 processes of ``make run`` did. Imported in the server, a forked
job's Trainer is set up in 0.03 s instead of 0.31 (a tiny model, medians of 10 jobs each in alternating groups of 5,
2-core AMD EPYC Zen 4). Only with a torch build without CUDA or ROCm: DeepSpeed's import picks its accelerator by
asking torch whether a GPU is available, which starts the GPU driver in the server, and a driver started before a
fork does not work in the child. Any failure leaves the import to the job, as without this module (the server must
not die of it).
"""

from __future__ import annotations

try:
    import torch

    if torch.version.cuda is None and getattr(torch.version, "hip", None) is None:
        import deepspeed  # noqa: F401
except Exception:  # noqa: BLE001 - not installed, or failed: the server imports the rest without it
    pass
