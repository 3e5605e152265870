"""Knowledge distillation: a smaller student learns the teacher's next-token distribution (off-policy).

Reads top to bottom:

1. **Student.** ``student_layers`` of the teacher's blocks, evenly spaced, with their weights copied
   (embeddings, final norm and head too); or, when ``student_hidden_size`` is set, a fresh, narrower
   model of the same family (``student_layers`` sets its depth, default the teacher's) on the same tokenizer.
2. **Teacher outputs, once.** The teacher runs once over the tokenized records; for every completion
   (assistant) token it keeps the **top-k log-probabilities at temperature T** and their token ids
   (k = 64 by default). That is what the KL needs, at a fraction of the full-vocabulary size (64 x 8 bytes
   per token instead of vocab x 2). The cache sits under ``cache_dir/<sha256 of (teacher weights sha,
   tokenizer sha, record ids, max_length, temperature, k)>`` as safetensors, so a retry reuses it
   (``teacher_cache_hit``).
3. **Loss.** ``alpha_ce * CE + alpha_kl * T^2 * KL(teacher_T || student_T)`` on the completion tokens, in a
   ``Trainer.compute_loss`` subclass. The KL is taken over k + 1 buckets: the teacher's top-k tokens and
   "the rest of the vocabulary" (teacher tail mass = 1 - top-k mass; student tail = 1 - its mass on the same
   k tokens). This is exact when the teacher's tail is empty and a lower bound of the full KL otherwise.

Heavy libraries (torch, transformers, safetensors) are imported inside the functions.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from tuneline.params import DistillParams
from tuneline.records import canonical_json, sha256_file, sha256_text

TOP_K = 64  # teacher tokens kept per completion position
CACHE_FORMAT = 1  # bump when the cached layout changes (it is part of the key)
CACHE_FILE = "teacher.safetensors"
STUDENT_SUBDIR = "student"  # the saved student (safetensors + tokenizer) under out_dir
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")

OnLog = Callable[[int, dict[str, float]], None]


@dataclass
class DistillResult:
    """What distillation produced and measured."""

    output_dir: str  # the student (safetensors + tokenizer), loadable with from_pretrained
    teacher_dir: str
    student_layers: Optional[list[int]]  # teacher block indices copied (None for a fresh narrower student)
    student_config: dict[str, int]
    teacher_params: int
    student_params: int
    param_ratio: float  # student / teacher
    teacher_cache_hit: bool  # both the train and val teacher outputs came from the cache
    teacher_cache: dict[str, str]  # split -> cache directory
    top_k: int
    temperature: float
    kd_curve: list[dict[str, float]] = field(default_factory=list)  # step, loss, kl, ce
    val_kl_before: float = float("nan")  # mean per-token KL(teacher_T || student_T) on val completion tokens
    val_kl_after: float = float("nan")
    val_ce_before: float = float("nan")  # mean per-token cross-entropy of the labels on val
    val_ce_after: float = float("nan")
    train_sequences: int = 0
    val_sequences: int = 0
    steps: int = 0
    seconds: float = 0.0
    resumed_from_step: int = 0  # the checkpoint a rerun continued from (0: started fresh)
    params: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------
# the student


def evenly_spaced(n_teacher: int, n_student: int) -> list[int]:
    """``n_student`` block indices spread over ``range(n_teacher)``, first and last included."""
    if not 1 <= n_student <= n_teacher:
        raise ValueError(f"student_layers must be in [1, {n_teacher}] for a {n_teacher}-layer teacher, got {n_student}")
    if n_student == 1:
        return [n_teacher - 1]
    return sorted({round(i * (n_teacher - 1) / (n_student - 1)) for i in range(n_student)})


_LAYER_KEY = re.compile(r"(^|\.)layers\.(\d+)(\.|$)")


def _renumbered(name: str, new_index: dict[int, int]) -> Optional[str]:
    """A teacher parameter or module name in the student (its block renumbered), or None for a block not kept."""
    match = _LAYER_KEY.search(name)
    if match is None:
        return name
    if int(match.group(2)) not in new_index:
        return None
    start, end = match.span(2)
    return name[:start] + str(new_index[int(match.group(2))]) + name[end:]


def build_student(teacher: Any, params: DistillParams, *, seed: int) -> tuple[Any, Optional[list[int]]]:
    """The student model and the teacher blocks it copied (``None`` when it is a fresh, narrower model)."""
    import copy

    import torch
    from transformers import AutoModelForCausalLM, set_seed

    from tuneline.train.bottleneck import CONFIG_ATTR, add_bottleneck_adapters

    tconf = teacher.config
    n_teacher = int(tconf.num_hidden_layers)
    set_seed(seed)

    if params.student_hidden_size is None:
        keep = evenly_spaced(n_teacher, int(params.student_layers))
        config = copy.deepcopy(tconf)
        config.num_hidden_layers = len(keep)
        if isinstance(getattr(config, "layer_types", None), list):
            config.layer_types = [tconf.layer_types[i] for i in keep]
        student = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        new_index = {old: new for new, old in enumerate(keep)}
        adapters = getattr(teacher, CONFIG_ATTR, None)
        if adapters is not None:  # a bundle teacher: the copied blocks keep their bottleneck adapters
            kept = [_renumbered(name, new_index) for name in adapters.targets]
            add_bottleneck_adapters(student, dataclasses.replace(adapters, targets=tuple(n for n in kept if n)),
                                    freeze_base=False)
        state = {new: value for key, value in teacher.state_dict().items()
                 if (new := _renumbered(key, new_index)) is not None}
        missing, unexpected = student.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.endswith("lm_head.weight") or not config.tie_word_embeddings]
        if missing or unexpected:
            raise RuntimeError(f"student weights do not line up with the teacher: missing {missing}, unexpected {unexpected}")
        student.tie_weights()
        return student, keep

    hidden = int(params.student_hidden_size)
    head_dim = int(getattr(tconf, "head_dim", None) or tconf.hidden_size // tconf.num_attention_heads)
    if hidden % head_dim:
        raise ValueError(f"student_hidden_size {hidden} must be a multiple of the teacher's head dim {head_dim}")
    heads = hidden // head_dim
    kv = math.gcd(heads, int(getattr(tconf, "num_key_value_heads", None) or tconf.num_attention_heads))
    ratio = tconf.intermediate_size / tconf.hidden_size
    config = copy.deepcopy(tconf)
    config.hidden_size = hidden
    config.intermediate_size = max(32, int(round(hidden * ratio / 32)) * 32)
    config.num_attention_heads = heads
    config.num_key_value_heads = kv
    config.head_dim = head_dim
    config.num_hidden_layers = int(params.student_layers or n_teacher)
    if isinstance(getattr(config, "layer_types", None), list):
        config.layer_types = list(tconf.layer_types[: config.num_hidden_layers])
    student = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return student, None


# ---------------------------------------------------------------------------
# teacher outputs, computed once and cached


def weights_sha(model_dir: str | Path) -> str:
    """sha256 over the model's weight files (name and content): what the teacher *is*."""
    root = Path(model_dir)
    files = sorted(p for p in root.iterdir() if p.suffix in (".safetensors", ".bin") and p.is_file())
    if not files:
        raise FileNotFoundError(f"no weight files (*.safetensors) in {root}")
    return sha256_text(canonical_json({p.name: sha256_file(p) for p in files}))


def tokenizer_sha(model_dir: str | Path) -> str:
    root = Path(model_dir)
    return sha256_text(canonical_json({n: sha256_file(root / n) for n in TOKENIZER_FILES if (root / n).is_file()}))


def teacher_cache_key(
    teacher_sha: str, record_ids: Sequence[str], max_length: int, temperature: float, top_k: int, tok_sha: str,
    dtype: str = "float32",
) -> str:
    """The cache folder's name: everything the teacher's outputs depend on (a bf16 pass on a GPU is another key)."""
    return sha256_text(
        canonical_json(
            {
                "format": CACHE_FORMAT,
                **({} if dtype == "float32" else {"teacher_dtype": dtype}),
                "teacher_weights_sha256": teacher_sha,
                "tokenizer_sha256": tok_sha,
                "record_ids": list(record_ids),
                "max_length": int(max_length),
                "temperature": float(temperature),
                "top_k": int(top_k),
            }
        )
    )


def _completion_positions(labels: Sequence[int]) -> list[int]:
    """Positions t whose logits predict a labelled token (labels[t + 1] is not ignored)."""
    return [t for t in range(len(labels) - 1) if labels[t + 1] != -100]


def teacher_outputs(
    teacher: Any,
    features: list[dict[str, list[int]]],
    cache_path: Path,
    *,
    temperature: float,
    top_k: int,
    pad_token_id: int,
    batch_size: int = 8,
) -> tuple[dict[str, Any], bool]:
    """Top-k teacher log-probs (temperature T) at every completion position; (tensors, cache_hit).

    Tensors: ``logp`` float32 [N, k], ``index`` int32 [N, k], ``offsets`` int64 [n_sequences + 1]
    (sequence i owns rows ``offsets[i]:offsets[i+1]``, in position order).
    """
    import torch
    from safetensors.torch import load_file, save_file

    file = cache_path / CACHE_FILE
    if file.is_file():
        return load_file(str(file)), True

    from tuneline.evaluate.report import virtual_tokens_sliced
    from tuneline.models.generation import batches
    from tuneline.train.checkpoints import move_into_place, temp_sibling
    from tuneline.train.common import PadCollator

    collate = PadCollator(pad_token_id=pad_token_id)
    logps, indices = [None] * len(features), [None] * len(features)
    teacher.eval()
    device = next(teacher.parameters()).device
    # batches of similar lengths (a quarter less padding on the demo's rows); the outputs go back in record order
    order = sorted(range(len(features)), key=lambda i: len(features[i]["input_ids"]))
    with torch.no_grad():
        for chunk in batches(order, batch_size):
            batch = {k: v.to(device) for k, v in collate([features[i] for i in chunk]).items()}
            logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            logits = virtual_tokens_sliced(logits, batch["input_ids"]).float()  # a prompt teacher's cut off
            for row, i in enumerate(chunk):
                pos = torch.as_tensor(_completion_positions(features[i]["labels"]), dtype=torch.long, device=device)
                top = torch.log_softmax(logits[row, pos] / temperature, dim=-1).topk(top_k, dim=-1)
                logps[i], indices[i] = top.values.cpu(), top.indices.to(torch.int32).cpu()
    counts = [len(lp) for lp in logps]
    tensors = {
        "logp": torch.cat(logps).contiguous(),
        "index": torch.cat(indices).contiguous(),
        "offsets": torch.tensor([0, *torch.tensor(counts).cumsum(0).tolist()], dtype=torch.int64),
    }
    tmp = temp_sibling(cache_path)
    tmp.mkdir(parents=True)
    save_file(tensors, str(tmp / CACHE_FILE))
    meta = {"positions": int(tensors["logp"].shape[0]), "sequences": len(features), "top_k": top_k,
            "temperature": temperature, "dtype": "float32 log-probs at temperature T, int32 token ids"}
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    move_into_place(tmp, cache_path, CACHE_FILE)  # another process's identical entry, if first, is kept
    return tensors, False


# ---------------------------------------------------------------------------
# the loss


def topk_kl(student_logits: Any, teacher_logp: Any, teacher_index: Any, temperature: float) -> Any:
    """Per-position KL(teacher_T || student_T) over the teacher's top-k tokens plus one "rest" bucket.

    ``student_logits`` [N, V]; ``teacher_logp``/``teacher_index`` [N, k]. Returns [N].
    """
    import torch

    s_logp_all = torch.log_softmax(student_logits.float() / temperature, dim=-1)
    s_logp = s_logp_all.gather(-1, teacher_index.long())
    t_logp = teacher_logp.float()
    t_p = t_logp.exp()
    kl_top = (t_p * (t_logp - s_logp)).sum(-1)
    eps = 1e-6
    t_rest = (1.0 - t_p.sum(-1)).clamp_min(eps)
    s_rest = (1.0 - s_logp.exp().sum(-1)).clamp_min(eps)
    kl_rest = t_rest * (t_rest.log() - s_rest.log())
    return (kl_top + kl_rest).clamp_min(0.0)


def _gather_teacher(cache: dict[str, Any], seq_ids: Sequence[int]) -> tuple[Any, Any]:
    import torch

    offsets = cache["offsets"]
    rows = [torch.arange(int(offsets[i]), int(offsets[i + 1])) for i in seq_ids]
    rows = torch.cat(rows) if rows else torch.zeros(0, dtype=torch.long)
    return cache["logp"][rows], cache["index"][rows]


def kd_terms(model: Any, batch: dict[str, Any], cache: dict[str, Any], temperature: float,
             ce_grad: bool = True) -> tuple[Any, Any, int]:
    """(mean KL over completion tokens, mean CE, token count) for one padded batch. ``ce_grad`` False: the CE is
    only reported (a loss that weighs it 0), so it is computed without a graph to differentiate."""
    import contextlib

    import torch

    outputs = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    logits = outputs.logits[:, :-1]
    targets = batch["labels"][:, 1:]
    mask = targets != -100
    picked = logits[mask]  # row-major: sequence by sequence, positions in order, as in the cache
    t_logp, t_index = _gather_teacher(cache, batch["kd_index"].tolist())
    if t_logp.shape[0] != picked.shape[0]:
        raise RuntimeError(f"teacher cache rows {t_logp.shape[0]} != completion positions {picked.shape[0]}")
    t_logp, t_index = t_logp.to(picked.device), t_index.to(picked.device)
    kl = topk_kl(picked, t_logp, t_index, temperature).mean()
    with contextlib.nullcontext() if ce_grad else torch.no_grad():
        ce = torch.nn.functional.cross_entropy(picked.float(), targets[mask])
    return kl, ce, int(mask.sum())


def kd_metrics(model: Any, features: list[dict], cache: dict[str, Any], temperature: float, pad_token_id: int,
               batch_size: int = 16) -> dict[str, float]:
    """Token-weighted mean KL to the teacher and CE of the labels over ``features`` (no gradients)."""
    import torch

    from tuneline.train.common import PadCollator

    collate = PadCollator(pad_token_id=pad_token_id)
    was_training = model.training
    model.eval()
    kl_sum = ce_sum = 0.0
    n = 0
    device = next(model.parameters()).device
    with torch.no_grad():
        for start in range(0, len(features), batch_size):
            chunk = features[start : start + batch_size]
            batch = {k: v.to(device) for k, v in collate(chunk).items()}
            batch["kd_index"] = torch.tensor([f["kd_index"] for f in chunk])
            kl, ce, tokens = kd_terms(model, batch, cache, temperature)
            kl_sum += float(kl) * tokens
            ce_sum += float(ce) * tokens
            n += tokens
    model.train(was_training)
    return {"kl": kl_sum / max(n, 1), "ce": ce_sum / max(n, 1)}


# ---------------------------------------------------------------------------
# training


def _collator(pad_token_id: int) -> Callable[[list[dict]], dict[str, Any]]:
    import torch

    from tuneline.train.common import PadCollator

    pad = PadCollator(pad_token_id=pad_token_id)

    def collate(features: list[dict]) -> dict[str, Any]:
        batch = pad([{"input_ids": f["input_ids"], "labels": f["labels"]} for f in features])
        batch["kd_index"] = torch.tensor([f["kd_index"] for f in features], dtype=torch.long)
        return batch

    return collate


def _tokenize(tokenizer: Any, records: Sequence[Any], max_length: int) -> list[dict]:
    from tuneline.train.common import tokenize_chat

    features = tokenize_chat(tokenizer, records, max_length)
    for i, f in enumerate(features):
        f["kd_index"] = i
    return features


def _record_ids(records: Sequence[Any]) -> list[str]:
    return [r["id"] if isinstance(r, dict) else r.id for r in records]


def distill_student(
    teacher_dir: str | Path,
    records: Sequence[Any],
    val_records: Sequence[Any],
    params: DistillParams,
    out_dir: str | Path,
    *,
    seed: int,
    max_steps: Optional[int] = None,
    cache_dir: str | Path,
    on_log: Optional[OnLog] = None,
    top_k: int = TOP_K,
    on_checkpoint: Optional[Callable[[Path], None]] = None,
    teacher_base_dir: Optional[str | Path] = None,
) -> DistillResult:
    """Distill the teacher at ``teacher_dir`` (a full model + tokenizer) into a smaller student saved in
    ``out_dir/student``. A prompt-learning teacher (``teacher_dir`` its adapter, ``teacher_base_dir`` its base)
    runs with its virtual tokens, and the student, built from the base's blocks, learns to answer without them.
    ``records``/``val_records`` are SFT chat records (``ChatRecord`` or dicts); the loss covers the assistant
    tokens. ``max_steps`` caps the run on top of ``params.max_steps``. Checkpoints every ``params.save_steps``
    steps are marked complete (then ``on_checkpoint(folder)``); a rerun resumes from the last complete one."""
    import torch
    from transformers import TrainingArguments

    from tuneline.models.loading import load_causal_lm, load_tokenizer, place_for_inference, resolve_bf16
    from tuneline.train import callbacks as cb
    from tuneline.train import checkpoints as ck
    from tuneline.train import distributed
    from tuneline.train.bottleneck import save_model
    from tuneline.train.common import loss_curve, use_training_attention
    from tuneline.train.methods import count_params

    distributed.check_world(params.num_processes, "tuneline.recipes.distill")
    started = time.perf_counter()
    teacher_dir, out_dir, cache_dir = Path(teacher_dir), Path(out_dir), Path(cache_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    tokenizer = load_tokenizer(teacher_dir)
    if teacher_base_dir is None:
        teacher = load_causal_lm(teacher_dir)  # fp32 on the CPU: the student copies its blocks from these weights
        student, kept = build_student(teacher, params, seed=seed)
    else:
        from tuneline.train.sft import load_trained

        teacher, _ = load_trained(teacher_base_dir, teacher_dir)
        student, kept = build_student(teacher.get_base_model(), params, seed=seed)
    use_training_attention(student)  # the teacher only runs forward: its kernel stays
    _, teacher_total = count_params(teacher)
    teacher = place_for_inference(teacher, "auto")  # the one teacher pass: on the GPU in bf16 where there is one
    teacher_dtype = str(next(teacher.parameters()).dtype).replace("torch.", "")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    k = min(int(top_k), int(teacher.config.vocab_size))

    train_features = _tokenize(tokenizer, records, params.max_length)
    val_features = _tokenize(tokenizer, val_records, params.max_length)
    if not train_features or not val_features:
        raise ValueError(f"distillation needs train and val records with assistant tokens "
                         f"(got {len(train_features)} train, {len(val_features)} val after tokenizing)")

    t_sha, tok_sha = weights_sha(teacher_dir), tokenizer_sha(teacher_dir)
    if teacher_base_dir is not None:  # the teacher is its prompt and its base together
        t_sha = sha256_text(canonical_json({"adapter": t_sha, "base": weights_sha(teacher_base_dir)}))
    caches, hits, cache_paths = {}, [], {}
    with distributed.main_process_first():  # rank 0 runs the teacher; the other ranks read its cache
        for split, recs, feats in (("train", records, train_features), ("val", val_records, val_features)):
            key = teacher_cache_key(t_sha, _record_ids(recs), params.max_length, params.temperature, k, tok_sha,
                                    teacher_dtype)
            path = cache_dir / key
            caches[split], hit = teacher_outputs(
                teacher, feats, path, temperature=params.temperature, top_k=k, pad_token_id=pad_id,
                batch_size=params.batch_size,
            )
            hits.append(hit)
            cache_paths[split] = str(path)

    _, student_total = count_params(student)
    del teacher  # only its cached outputs are needed from here on

    before = kd_metrics(student, val_features, caches["val"], params.temperature, pad_id)

    steps_cap = [s for s in (params.max_steps, max_steps) if s is not None]
    bf16 = resolve_bf16(params.bf16)
    n_steps_hint = min(steps_cap) if steps_cap else math.ceil(len(train_features) / params.batch_size * params.epochs)
    args = TrainingArguments(
        output_dir=str(out_dir / "checkpoints"),
        per_device_train_batch_size=params.batch_size,
        learning_rate=params.learning_rate,
        num_train_epochs=params.epochs,
        max_steps=min(steps_cap) if steps_cap else -1,
        lr_scheduler_type="cosine",
        warmup_steps=0,
        logging_steps=max(1, n_steps_hint // 100),
        save_strategy="steps",  # crash-safe checkpoints (marked complete), resumed by a retry
        save_steps=params.save_steps,
        save_total_limit=2,
        eval_strategy="no",
        report_to="none",
        bf16=bf16,
        use_cpu=not torch.cuda.is_available(),  # bf16 autocast on CPU needs it
        ddp_backend=distributed.ddp_backend(),  # every rank opts into gloo on CPU, else each trains alone
        gradient_checkpointing=False,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        seed=seed,
        data_seed=seed,
        disable_tqdm=True,
    )
    from tuneline.train.trainers import KDTrainer

    trainer = KDTrainer(
        model=student,
        args=args,
        train_dataset=train_features,
        data_collator=_collator(pad_id),
        teacher_cache=caches["train"],
        kd=params,
        callbacks=[*([cb.MetricsCallback(on_log)] if on_log else []), cb.CompleteCheckpointCallback(on_checkpoint)],
    )
    resume = ck.last_valid_checkpoint(out_dir / "checkpoints")
    with ck.disk_full_explained(out_dir / "checkpoints"):
        output = trainer.train(resume_from_checkpoint=str(resume) if resume is not None else None)
    curve = loss_curve(trainer.state.log_history, {k: k for k in ("loss", "kl", "ce")})
    student = trainer.model
    after = kd_metrics(student, val_features, caches["val"], params.temperature, pad_id)

    model_dir = out_dir / STUDENT_SUBDIR
    if distributed.is_main_process():
        save_model(student, model_dir)  # a student with bottleneck adapters is saved as a bundle
        tokenizer.save_pretrained(model_dir)
        shutil.rmtree(out_dir / "checkpoints", ignore_errors=True)

    config = student.config
    result = DistillResult(
        output_dir=str(model_dir),
        teacher_dir=str(teacher_dir),
        student_layers=kept,
        student_config={
            "num_hidden_layers": int(config.num_hidden_layers),
            "hidden_size": int(config.hidden_size),
            "intermediate_size": int(config.intermediate_size),
            "num_attention_heads": int(config.num_attention_heads),
        },
        teacher_params=int(teacher_total),
        student_params=int(student_total),
        param_ratio=round(student_total / teacher_total, 4),
        teacher_cache_hit=all(hits),
        teacher_cache=cache_paths,
        top_k=k,
        temperature=params.temperature,
        kd_curve=curve,
        val_kl_before=before["kl"],
        val_kl_after=after["kl"],
        val_ce_before=before["ce"],
        val_ce_after=after["ce"],
        train_sequences=len(train_features),
        val_sequences=len(val_features),
        steps=int(output.global_step),
        seconds=round(time.perf_counter() - started, 3),
        resumed_from_step=ck.checkpoint_step(resume) if resume is not None else 0,
        params=dataclasses.asdict(params),
    )
    if distributed.is_main_process():
        (out_dir / "distill_result.json").write_text(json.dumps(result.to_dict(), indent=2) + "\n", encoding="utf-8")
    return result
