"""Causal-LM (continued) pretraining on a plain-text corpus.

The one path that builds the tiny model's knowledge and runs DAPT/TAPT on a real model: nothing
here knows about the tiny build. The corpus is packed (bos + text + eos, concatenated) into
``seq_len`` blocks; a held-out slice of blocks measures the loss before and after; training is
AdamW with linear warmup and cosine decay, under bf16 autocast where the hardware supports it.
Deterministic for the same model, corpus, params and seed on the same machine.
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator, Optional

from tuneline.models.loading import resolve_bf16
from tuneline.params import PretrainParams

Progress = Callable[[int, int, float], None]  # (step, total steps, loss)

EVAL_FRACTION = 0.05  # share of packed blocks held out for evaluation
MAX_EVAL_BLOCKS = 64  # cap on held-out blocks (keeps evaluation a few seconds on CPU)
MIN_LR_RATIO = 0.1  # cosine decays to this fraction of the peak learning rate
MAX_GRAD_NORM = 1.0
CHECKPOINT_WEIGHTS = "model.safetensors"  # inside checkpoint-N/
CHECKPOINT_OPTIMIZER = "optimizer.pt"  # AdamW state (torch.save; loaded with weights_only=True)
CHECKPOINT_STATE = "loop_state.json"  # step, loss history, tokens seen, eval loss before training
# pretrain.compile null: torch.compile on a CPU from this many steps. Measured on the demo model (16 x 128 tokens):
# compiling took 31-36 s on a cold cache and saved 49 ms a step (126 -> 77 ms, bf16 on AMX) to 94 ms (399 -> 305 ms,
# fp32 on AVX-512 without bf16): repaid after ~630 and ~380 steps (docs/benchmarks.md)
COMPILE_MIN_STEPS = 650


@dataclass
class PretrainResult:
    """What a pretraining run did and how well."""

    losses: list[tuple[int, float]]  # (step, mean training loss since the previous point)
    tokens_seen: int  # training tokens processed (steps x batch_size x seq_len)
    seconds: float  # wall time of the training loop (evaluation excluded; a resumed run adds its parts)
    tokens_per_second: float  # tokens_seen / seconds
    final_loss: float  # mean training loss of the last ``log_every`` steps
    bf16: bool  # whether bf16 autocast was used
    eval_loss_before: float  # mean token loss on the held-out blocks before training
    eval_loss_after: float  # the same after training
    steps: int = 0  # optimizer steps run
    train_blocks: int = 0  # packed training blocks
    eval_blocks: int = 0  # packed held-out blocks
    seq_len: int = 0  # tokens per block
    batch_size: int = 0  # blocks per step
    corpus_tokens: int = 0  # tokens in the packed corpus (remainder dropped)
    device: str = "cpu"  # where it trained
    resumed_from_step: int = 0  # the checkpoint a rerun continued from (0: started fresh)
    meta: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["losses"] = [[int(s), float(v)] for s, v in self.losses]
        return data


def pack_corpus(tokenizer: Any, texts: list[str], seq_len: int) -> "Any":
    """Tokenize ``texts`` as bos + text + eos (bos/eos when the tokenizer has them), concatenate,
    and cut into a LongTensor of shape (n_blocks, seq_len); the remainder is dropped."""
    import torch

    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    texts = [t for t in texts if t and t.strip()]
    stream: list[int] = []
    batch = 1000
    for start in range(0, len(texts), batch):
        encoded = tokenizer(texts[start : start + batch], add_special_tokens=False, verbose=False)["input_ids"]
        for ids in encoded:
            stream.extend(bos)
            stream.extend(ids)
            stream.extend(eos)
    n_blocks = len(stream) // seq_len
    return torch.tensor(stream[: n_blocks * seq_len], dtype=torch.long).view(n_blocks, seq_len)


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warmup to ``peak`` over ``warmup`` steps, then cosine decay to MIN_LR_RATIO * peak (step is 0-based)."""
    if warmup > 0 and step < warmup:
        return peak * (step + 1) / warmup
    span = max(1, total - warmup)
    progress = min(1.0, (step - warmup) / span)
    return peak * (MIN_LR_RATIO + (1 - MIN_LR_RATIO) * 0.5 * (1 + math.cos(math.pi * progress)))


def _autocast(device: Any, enabled: bool) -> Any:
    import torch

    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=enabled)


def evaluate_blocks(model: Any, blocks: Any, *, batch_size: int, bf16: bool) -> float:
    """Mean next-token loss over ``blocks`` (every block has the same number of predicted tokens)."""
    import torch

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, blocks.shape[0], batch_size):
            batch = blocks[start : start + batch_size].to(device)
            with _autocast(device, bf16):
                loss = model(input_ids=batch, labels=batch).loss
            total += float(loss) * batch.shape[0]
            count += batch.shape[0]
    model.train(was_training)
    return total / max(1, count)


def training_forward(model: Any, params: PretrainParams, device: Any, steps: int) -> tuple[Any, str]:
    """The callable the training steps run ``model`` through, and what it is ("inductor" or "eager ...").

    ``params.compile`` true compiles (an error on a CPU without the C++ compiler inductor needs), false never,
    null from :data:`COMPILE_MIN_STEPS` steps on a CPU. The decision depends on the run's total steps, so a
    resumed run trains exactly as the uninterrupted one. The compiled callable shares ``model``'s weights;
    evaluation and checkpoints use ``model`` itself. Every batch has the same shape: one compilation.
    """
    import os
    import shutil

    import torch

    wanted = params.compile
    if wanted is None:
        wanted = device.type == "cpu" and steps >= COMPILE_MIN_STEPS
        if not wanted:
            return model, (f"eager (pretrain.compile null: {steps} steps on {device.type}; compiled on a CPU "
                           f"from {COMPILE_MIN_STEPS})")
    if not wanted:
        return model, "eager (pretrain.compile false)"
    compilers = [os.environ.get("CXX") or "", "g++", "c++", "clang++"]
    if device.type == "cpu" and not any(c and shutil.which(c) for c in compilers):
        if params.compile:
            raise RuntimeError("pretrain.compile is true, but torch.compile needs a C++ compiler on a CPU and none "
                               "was found (CXX, g++, c++, clang++): install one or set pretrain.compile: false")
        return model, "eager (no C++ compiler for torch.compile found: CXX, g++, c++, clang++)"
    return torch.compile(model), "inductor"


@contextmanager
def _deterministic(enabled: bool) -> Iterator[None]:
    """``torch.use_deterministic_algorithms`` on while ``enabled`` (restored after). A compiled step needs it: without
    it inductor turns the embedding's gradient (an accumulating index_put) into atomic adds whose order changes
    from run to run, so two runs of the same seed ended 800 demo steps at held-out losses 0.832, 0.834 and 0.844;
    with it the eager kernel is kept for that op and every run gives the same weights, at the same speed."""
    import torch

    if not enabled:
        yield
        return
    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])


@contextmanager
def _inductor_cache_per_cpu(enabled: bool) -> Iterator[None]:
    """While ``enabled``, torch inductor's cache (``TORCHINDUCTOR_CACHE_DIR`` or its default) in a subfolder named for
    the kernels torch may use here: its CPU capability, and the ISA oneDNN and MKL are held to when they are (restored
    after). Code compiled under one capability and loaded under another crashed (torch 2.13: the same cache used
    first with the kernels free, then held to AVX2 as docs/benchmarks.md emulates the AVX2-only kind: an "index out
    of bounds" in a generated kernel, or an abort), as a cache shared by machines of two kinds would."""
    import os
    import re

    import torch

    if not enabled:
        yield
        return
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    before = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    held = [os.environ.get(k) for k in ("ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")]
    key = re.sub(r"[^A-Za-z0-9_.-]", "_", "-".join([torch.backends.cpu.get_cpu_capability(), *filter(None, held)]))
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(cache_dir(), key)
    try:
        yield
    finally:
        if before is None:
            del os.environ["TORCHINDUCTOR_CACHE_DIR"]
        else:
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = before


def batch_indices(step: int, n_train: int, batch_size: int, seed: int) -> "Any":
    """Indices of the training blocks step ``step`` (0-based) trains on: a function of the step alone.

    Epoch ``e`` is a permutation of the blocks seeded by ``(seed, e)``, cut into full batches (a short tail
    is dropped when there are at least ``batch_size`` blocks). Because no state carries from step to step,
    a resumed run continues with exactly the batches the uninterrupted run would have seen.
    """
    import torch

    per_epoch = max(1, n_train // batch_size) if n_train >= batch_size else 1
    epoch, index = divmod(step, per_epoch)
    perm = torch.randperm(n_train, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch + 1))
    return perm[index * batch_size : (index + 1) * batch_size]


def _save_checkpoint(folder: Any, model: Any, optimizer: Any, state: dict[str, Any]) -> None:
    """Weights (safetensors), optimizer state and the loop's own state, then the completion marker."""
    import json

    import torch
    from safetensors.torch import save_file

    from tuneline.train.checkpoints import mark_complete

    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(_untied(model, tensors), str(folder / CHECKPOINT_WEIGHTS))
    torch.save(optimizer.state_dict(), folder / CHECKPOINT_OPTIMIZER)
    (folder / CHECKPOINT_STATE).write_text(json.dumps(state) + "\n", encoding="utf-8")
    mark_complete(folder, state["step"])


def _untied(model: Any, tensors: dict[str, Any]) -> dict[str, Any]:
    """State dict without the tied copies safetensors refuses (shared storage saved once)."""
    seen: dict[int, str] = {}
    out = {}
    for key, value in tensors.items():
        ptr = value.data_ptr()
        if ptr in seen:
            continue
        seen[ptr] = key
        out[key] = value
    return out


def _load_checkpoint(folder: Any, model: Any, optimizer: Any) -> dict[str, Any]:
    import json

    import torch
    from safetensors.torch import load_file

    missing, unexpected = model.load_state_dict(load_file(str(folder / CHECKPOINT_WEIGHTS)), strict=False)
    missing = [k for k in missing if not (k.endswith("lm_head.weight") and model.config.tie_word_embeddings)]
    if missing or unexpected:
        raise RuntimeError(f"checkpoint {folder} does not fit the model: missing {missing}, unexpected {unexpected}")
    optimizer.load_state_dict(torch.load(folder / CHECKPOINT_OPTIMIZER, weights_only=True))
    return json.loads((folder / CHECKPOINT_STATE).read_text(encoding="utf-8"))


def pretrain_causal_lm(
    model: Any,
    tokenizer: Any,
    texts: list[str],
    params: PretrainParams,
    *,
    seed: int,
    steps: int,
    progress: Optional[Progress] = None,
    checkpoint_dir: Optional[Any] = None,
    on_checkpoint: Optional[Callable[[Any], None]] = None,
) -> PretrainResult:
    """Train ``model`` in place as a causal LM on ``texts`` for ``steps`` optimizer steps.

    The model stays on its device; it is left in eval mode, with the training attention kernel
    (:func:`~tuneline.train.common.use_training_attention`: eager on a CPU). ``progress(step, steps, loss)``
    is called at every logging point. With ``checkpoint_dir``, a complete checkpoint (weights, optimizer, loop state,
    then a completion marker) is written every ``params.checkpoint_every`` steps and a rerun resumes from
    the last complete one, giving the same result as an uninterrupted run (the batches are a function of
    the step); ``on_checkpoint(folder)`` runs after each (e.g. an upload).
    """
    from pathlib import Path

    import torch

    from tuneline.train.checkpoints import last_valid_checkpoint
    from tuneline.train.common import use_training_attention

    if steps < 1:
        raise ValueError("steps must be >= 1")
    device = next(model.parameters()).device
    bf16 = resolve_bf16(params.bf16, device, field="pretrain.bf16")
    use_training_attention(model)

    blocks = pack_corpus(tokenizer, texts, params.seq_len)
    n_blocks = int(blocks.shape[0])
    if n_blocks < 2:
        raise ValueError(
            f"corpus too small to pretrain: {n_blocks} block(s) of {params.seq_len} tokens; "
            "need at least 2 (one to train on, one held out)"
        )

    order = torch.randperm(n_blocks, generator=torch.Generator().manual_seed(seed))
    n_eval = min(MAX_EVAL_BLOCKS, max(1, round(n_blocks * EVAL_FRACTION)))
    eval_blocks = blocks[order[:n_eval]]
    train_blocks = blocks[order[n_eval:]]
    n_train = int(train_blocks.shape[0])

    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    forward, compiled = training_forward(model, params, device, steps)
    # AdamW fused: one kernel per step; on a CPU the unfused default is a loop over the tensors (3.6M parameters in
    # 38 tensors: 16 ms against 2 ms a step, Zen 4, 2 threads; docs/benchmarks.md)
    compiled_step = compiled == "inductor"
    fused = device.type in ("cpu", "cuda")
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": params.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=params.learning_rate,
        betas=(0.9, 0.95),
        eps=1e-8,
        fused=fused,
    )
    trainable = decay + no_decay

    root = Path(checkpoint_dir) if checkpoint_dir is not None else None
    resume = last_valid_checkpoint(root) if root is not None else None
    state: dict[str, Any] = {"step": 0, "losses": [], "window": [], "tail": [], "tokens_seen": 0,
                             "seconds": 0.0, "eval_before": None}
    if resume is not None:
        state = _load_checkpoint(resume, model, optimizer)
    resumed_from = int(state["step"])
    if state["eval_before"] is None:
        state["eval_before"] = evaluate_blocks(model, eval_blocks, batch_size=params.batch_size, bf16=bf16)

    model.train()
    start_time = time.perf_counter()
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), _deterministic(compiled_step), _inductor_cache_per_cpu(compiled_step):
        for step in range(resumed_from, steps):
            # any randomness in the model (dropout) is a function of the step too: resuming changes nothing
            torch.manual_seed(seed * 1_000_003 + step)
            start_time = _train_step(
                model, forward, optimizer, trainable, train_blocks, params, state, step=step, steps=steps, seed=seed,
                n_train=n_train, device=device, bf16=bf16, progress=progress, root=root,
                on_checkpoint=on_checkpoint, start_time=start_time,
            )
    seconds = state["seconds"] + time.perf_counter() - start_time
    model.eval()

    eval_after = evaluate_blocks(model, eval_blocks, batch_size=params.batch_size, bf16=bf16)
    return PretrainResult(
        losses=[(int(s), float(v)) for s, v in state["losses"]],
        tokens_seen=int(state["tokens_seen"]),
        seconds=seconds,
        tokens_per_second=state["tokens_seen"] / seconds if seconds > 0 else 0.0,
        final_loss=sum(state["tail"]) / len(state["tail"]),
        bf16=bf16,
        eval_loss_before=float(state["eval_before"]),
        eval_loss_after=eval_after,
        steps=steps,
        train_blocks=n_train,
        eval_blocks=n_eval,
        seq_len=params.seq_len,
        batch_size=params.batch_size,
        corpus_tokens=n_blocks * params.seq_len,
        device=str(device),
        resumed_from_step=resumed_from,
        meta={"lr_schedule": "linear warmup + cosine", "min_lr_ratio": MIN_LR_RATIO, "max_grad_norm": MAX_GRAD_NORM,
              "eval_fraction": EVAL_FRACTION, "seed": seed, "batch_order": "seeded permutation per epoch",
              "attention": model.config._attn_implementation, "compile": compiled, "fused_adamw": fused},
    )


def _train_step(model: Any, forward: Any, optimizer: Any, trainable: list, train_blocks: Any, params: PretrainParams,
                state: dict[str, Any], *, step: int, steps: int, seed: int, n_train: int, device: Any, bf16: bool,
                progress: Optional[Progress], root: Any, on_checkpoint: Optional[Callable[[Any], None]],
                start_time: float) -> float:
    """One optimizer step (and the log point / checkpoint after it); returns the timer's start."""
    import shutil

    import torch

    from tuneline.train.checkpoints import checkpoint_step, disk_full_explained

    lr = lr_at(step, steps, params.learning_rate, params.warmup_steps)
    for group in optimizer.param_groups:
        group["lr"] = lr
    batch = train_blocks[batch_indices(step, n_train, params.batch_size, seed)].to(device)
    with _autocast(device, bf16):
        loss = forward(input_ids=batch, labels=batch).loss
    if not torch.isfinite(loss):
        raise FloatingPointError(f"pretraining loss is {float(loss)} at step {step + 1}")
    loss.backward()
    torch.nn.utils.clip_grad_norm_(trainable, MAX_GRAD_NORM)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    state["tokens_seen"] += batch.numel()
    value = float(loss.detach())
    state["window"].append(value)
    state["tail"] = (state["tail"] + [value])[-params.log_every :]
    done = step + 1
    if done % params.log_every == 0 or done == steps or done == 1:
        point = [done, sum(state["window"]) / len(state["window"])]
        state["losses"].append(point)
        state["window"] = []
        if progress is not None:
            progress(done, steps, point[1])
    if root is not None and done < steps and done % params.checkpoint_every == 0:
        state["step"] = done
        state["seconds"] += time.perf_counter() - start_time
        model.eval()
        with disk_full_explained(root):
            _save_checkpoint(root / f"checkpoint-{done}", model, optimizer, state)
        model.train()
        for old in sorted(root.glob("checkpoint-*"), key=checkpoint_step)[:-2]:
            shutil.rmtree(old, ignore_errors=True)
        if on_checkpoint is not None:
            on_checkpoint(root / f"checkpoint-{done}")
        return time.perf_counter()
    return start_time
