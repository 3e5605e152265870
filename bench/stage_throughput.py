"""Per-stage throughput against what a user would write instead: continued pretraining, DPO and evaluation
generation (SFT has its own, ``bench/sft_throughput.py``).

One shared setup per stage (the demo data and corpus, a byte-level BPE tokenizer and a random Llama of the
demo's shape: 4 x 256, vocab 4096), every contender in its own subprocess, runs interleaved (ours, peer, ours,
peer, ...), the same model, data, batch, sequence length, steps, learning rate and seed for each; medians with
min-max. The clock covers the training loop only (model loading, tokenization and saving are outside it).

- ``pretrain``: ``tuneline.models.pretrain.pretrain_causal_lm`` against a bare ``transformers.Trainer`` causal-LM
  run (the ``run_clm`` recipe: the corpus tokenized, concatenated and cut into blocks, default collator) and
  LLaMA-Factory's ``stage: pt`` (given the same blocks pre-tokenized), all at their best flags for this CPU (bf16
  autocast where it is native, fp32 otherwise). Figures: real tokens/s and the held-out loss after training on
  the same blocks.
- ``dpo``: ``tuneline.train.dpo.train_dpo`` against bare TRL ``DPOTrainer`` (same LoRA, ``ref_model=None``,
  TRL's wrong-on-CPU defaults set right: gradient checkpointing off, bf16 only where native) and LLaMA-Factory's
  ``stage: dpo`` (LoRA, sigmoid loss, the adapter disabled as reference). ``trl-precompute`` is TRL with its
  ``precompute_ref_log_probs`` flag (every pair's reference log-probs in one pass before training, 32 pairs a
  batch as ours' pass takes them), timed as that pass plus the loop, as ours is (its pass runs on the first step).
  Figures: pairs/s and the reward accuracy on held-out pairs.

LLaMA-Factory runs in .bench/llamafactory-venv (``bash bench/setup_llamafactory.sh``; without it its rows say so
and the other contenders are still measured) through bench/llamafactory_stage.py; what it saves is scored here.
- ``distill``: ``tuneline.train.distill.distill_student`` (teacher outputs computed once, top-64, then the
  student trains on them; timed as the teacher pass plus the training loop, with a cold cache) against TRL's
  ``GKDTrainer`` with ``lmbda=0`` and ``beta=0`` (the teacher's forward pass every step, full-vocabulary forward
  KL; no generated sequences), the same student (two of the teacher's four blocks), data, steps and schedule: two
  passes over the data, the stage's default. Figures: sequences/s and the student's
  held-out KL to the teacher and cross-entropy, computed the same way for both.
Each peer also runs at its best flags for a CPU: its ``-eager`` variant (``hf-trainer-eager``, ``trl-eager``,
``llamafactory-eager``, ``trl-gkd-eager``) loads the model with eager attention (LLaMA-Factory: ``flash_attn:
disabled``), the kernel ours trains with on a CPU, where SDPA's flash kernel is slow in backward at these sizes.
``hf-trainer-compile-eager`` adds the Trainer's ``torch_compile`` flag: its best flags once a run repays compiling
(``--pretrain-steps 800``, the demo's length, where ours compiles too: ``pretrain.compile`` null). Every child starts
with a cold compile cache, as on a fresh machine. ``--contenders ours-nocompile`` adds a control, ours with
``pretrain.compile: false`` (what compiling adds; never counted as a peer). The summary gives ours' ratio to the
fastest peer at all and to the fastest at its default flags, and each contender's useful MFU
(``useful_flops_per_unit``).
- ``generate``: ``tuneline.models.generation.generate_greedy`` (batch 32, length-sorted, left-padded) against
  ``model.generate`` at its defaults on the same batches of 32 prompts (left padding). Figure: new tokens/s.

    python bench/stage_throughput.py --stages pretrain,dpo,distill,generate --runs 3
    python bench/stage_throughput.py --stages pretrain --pretrain-steps 800 --runs 2 \
        --contenders hf-trainer-eager,hf-trainer-compile-eager --results bench/results/stage_throughput_800.json

Writes bench/results/stage_throughput.json; prints the CPU name and flags with the table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench._machine import cpu  # noqa: E402
from bench.matmul_peak import matmul_params, measure, useful_mfu  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "stage_throughput.json"
SEED = 42
# a peer's "-eager" variant loads its model with eager attention (LLaMA-Factory: flash_attn disabled), ours' kernel
# for training on a CPU, where SDPA's flash kernel is slow in backward at these sizes: each peer at its best flags
CONTENDERS = {"pretrain": ("ours", "hf-trainer", "hf-trainer-eager", "hf-trainer-compile-eager", "llamafactory",
                          "llamafactory-eager"),
              "dpo": ("ours", "trl", "trl-eager", "trl-precompute", "trl-precompute-eager", "llamafactory",
                      "llamafactory-eager"),
              "distill": ("ours", "trl-gkd", "trl-gkd-eager"), "generate": ("ours", "hf-generate")}
CONTROLS = {"pretrain": ("ours-nocompile",)}  # ours with a lever off; run only when --contenders names them
PEER_ATTN: dict[str, str] = {}  # a child of an "-eager" variant: {"attn_implementation": "eager"}
LF_VENV = ROOT / ".bench" / "llamafactory-venv"  # bench/setup_llamafactory.sh
SHAPE = dict(vocab_size=4096, hidden_size=256, intermediate_size=768, num_layers=4, num_heads=4, num_kv_heads=4,
             max_position_embeddings=512)
PRETRAIN = dict(steps=60, batch_size=16, seq_len=128, learning_rate=3e-3, warmup_steps=6)
DPO = dict(steps=60, batch_size=8, max_length=128, learning_rate=5e-4, beta=0.1, lora_r=16)
GENERATE = dict(prompts=96, batch=32, max_new_tokens=32)
# 60 steps x 8 = two passes over 240 train conversations (the stage's default: distill.epochs 2); a 2-block student
# of the 4-block teacher; pure forward KL at temperature 1 (what TRL's GKD computes with lmbda 0 and beta 0: no
# generated sequences, no JSD mix)
DISTILL = dict(steps=60, batch_size=8, epochs=2, max_length=128, learning_rate=1e-3, student_layers=2, val=64)


# ---------------------------------------------------------------------------
# shared setup (written once per bench run, read by every child)


def prepare(work: Path) -> dict[str, Any]:
    from tuneline.data.demo import alpaca_prompt, build_rows, generate_corpus
    from tuneline.models.tiny import init_tiny_model, save_model, train_tokenizer
    from tuneline.params import DemoDataParams, TinyModelParams

    demo = DemoDataParams(seed=7, examples_per_task=300, preference_pairs=400, corpus_paragraphs=3000)
    rows, corpus = build_rows(demo), generate_corpus(demo)
    tokenizer = train_tokenizer(corpus + [r["output"] for r in rows["sft"]], TinyModelParams(**SHAPE))
    base = save_model(init_tiny_model(tokenizer, TinyModelParams(**SHAPE), seed=SEED), tokenizer, work / "base")
    (work / "corpus.json").write_text(json.dumps(corpus))
    pref = [{"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"]} for r in rows["preference"]]
    (work / "pref.json").write_text(json.dumps(pref))
    prompts = [alpaca_prompt(r["instruction"], r["input"]) for r in rows["sft"][: GENERATE["prompts"]]]
    (work / "prompts.json").write_text(json.dumps(prompts))
    conversations = [[{"role": "user", "content": alpaca_prompt(r["instruction"], r["input"])},
                      {"role": "assistant", "content": r["output"]}] for r in rows["sft"]]
    (work / "sft.json").write_text(json.dumps(conversations))
    model = init_tiny_model(tokenizer, TinyModelParams(**SHAPE), seed=SEED)
    _llamafactory_data(work, str(base))
    return {"base": str(base), "n_params": sum(p.numel() for p in model.parameters()),
            "n_matmul_params": matmul_params(model), **_work_sizes(work, model, tokenizer)}


WORK_SIZES = ("dpo_tokens_per_pair", "distill_tokens_per_sequence", "n_matmul_student")


def _work_sizes(work: Path, model: Any, tokenizer: Any) -> dict[str, Any]:
    """What the useful FLOPs of DPO and distillation need: the real tokens of a training pair (chosen and rejected,
    cut to max_length as the trainers cut them) and of a training conversation (their means over the train split),
    and the matmul parameters of the 2-block student."""
    from tuneline.train.distill import _tokenize, build_student
    from tuneline.train.dpo import tokenize_pair

    pairs = [tokenize_pair(tokenizer, r, DPO["max_length"]) for r in _preference_records(work)[0]]
    conversations = _tokenize(tokenizer, _sft_records(work)[0], DISTILL["max_length"])
    student, _ = build_student(model, _distill_params(), seed=SEED)
    return {"dpo_tokens_per_pair": statistics.mean(len(c) + len(r) for c, _, r, _ in pairs),
            "distill_tokens_per_sequence": statistics.mean(len(f["input_ids"]) for f in conversations),
            "n_matmul_student": matmul_params(student)}


def useful_flops_per_unit(stage: str, setup: dict[str, Any]) -> float:
    """Model FLOPs a stage needs per unit it counts (matmul parameters N, attention's own FLOPs left out): 6N per
    pretrained token; 2N per generated token; per DPO pair 6N per real token (the LoRA policy's forward 2N and its
    backward to the inputs 2N, the frozen reference's forward 2N; the adapters' own few FLOPs left out); per distilled
    sequence 6N of the student per token plus the teacher's forward 2N per token once per distinct sequence (the
    workload's passes over the data share it)."""
    n = setup["n_matmul_params"]
    if stage == "pretrain":
        return 6 * n
    if stage == "generate":
        return 2 * n
    if stage == "dpo":
        return 6 * n * setup["dpo_tokens_per_pair"]
    if stage == "distill":
        return (6 * setup["n_matmul_student"] + 2 * n / DISTILL["epochs"]) * setup["distill_tokens_per_sequence"]
    raise ValueError(stage)


def _pretrain_blocks(work: Path, base: str) -> tuple[Any, Any]:
    """(train blocks, held-out blocks): the corpus packed as ours packs it, split as ours splits it (a seeded
    permutation, the first 64 blocks held out), so every contender trains and is scored on the same blocks."""
    import torch
    from transformers import AutoTokenizer

    from tuneline.models.pretrain import pack_corpus

    blocks = pack_corpus(AutoTokenizer.from_pretrained(base), json.loads((work / "corpus.json").read_text()),
                         PRETRAIN["seq_len"])
    order = torch.randperm(blocks.shape[0], generator=torch.Generator().manual_seed(SEED))
    n_eval = 64  # ours: MAX_EVAL_BLOCKS
    return blocks[order[n_eval:]], blocks[order[:n_eval]]


def _llamafactory_data(work: Path, base: str) -> None:
    """LLaMA-Factory's inputs: the training blocks pre-tokenized (``tokenized_path``) and the preference train
    pairs as a sharegpt ranking dataset, registered in ``dataset_info.json``."""
    from datasets import Dataset, DatasetDict

    train_blocks, _ = _pretrain_blocks(work, base)
    DatasetDict({"train": Dataset.from_dict({"input_ids": train_blocks.tolist()})}).save_to_disk(
        str(work / "pt_tokenized"))
    lf = work / "llamafactory"
    lf.mkdir(parents=True, exist_ok=True)
    train, _ = _preference_records(work)
    rows = [{"messages": r.messages, "chosen": {"role": "assistant", "content": r.chosen},
             "rejected": {"role": "assistant", "content": r.rejected}} for r in train]
    (lf / "pref.json").write_text(json.dumps(rows))
    (lf / "corpus.json").write_text(json.dumps([{"text": t} for t in json.loads((work / "corpus.json").read_text())]))
    tags = {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant",
            "system_tag": "system"}
    (lf / "dataset_info.json").write_text(json.dumps({
        "bench_pref": {"file_name": "pref.json", "formatting": "sharegpt", "ranking": True, "tags": tags,
                       "columns": {"messages": "messages", "chosen": "chosen", "rejected": "rejected"}},
        "bench_corpus": {"file_name": "corpus.json", "columns": {"prompt": "text"}},  # unused: tokenized_path wins
    }))


def _preference_records(work: Path) -> tuple[list[Any], list[Any]]:
    from tuneline.records import ChatRecord

    pref = json.loads((work / "pref.json").read_text())
    records = [ChatRecord(kind="preference", source="bench", line=i, chosen=p["chosen"], rejected=p["rejected"],
                          messages=[{"role": "user", "content": p["prompt"]}]) for i, p in enumerate(pref)]
    return records[:-64], records[-64:]


def _sft_records(work: Path) -> tuple[list[Any], list[Any]]:
    """(train, val) conversations for distillation: ``epochs`` passes make the workload's steps; the held-out ones."""
    from tuneline.records import ChatRecord

    conversations = json.loads((work / "sft.json").read_text())
    records = [ChatRecord(kind="sft", source="bench", line=i, messages=m) for i, m in enumerate(conversations)]
    n_train = DISTILL["steps"] * DISTILL["batch_size"] // DISTILL["epochs"]
    return records[:n_train], records[n_train:n_train + DISTILL["val"]]


def distill_teacher(work: Path, base: str) -> str:
    """The teacher both contenders distill: the base pretrained as the pretrain workload does (built once)."""
    from tuneline.models.loading import load_causal_lm, load_tokenizer
    from tuneline.models.pretrain import pretrain_causal_lm
    from tuneline.models.tiny import save_model
    from tuneline.params import PretrainParams

    target = work / "teacher"
    if not (target / "config.json").is_file():
        p = PRETRAIN
        model, tokenizer = load_causal_lm(base), load_tokenizer(base)
        pretrain_causal_lm(model, tokenizer, json.loads((work / "corpus.json").read_text()),
                           PretrainParams(steps=p["steps"], batch_size=p["batch_size"], seq_len=p["seq_len"],
                                          learning_rate=p["learning_rate"], warmup_steps=p["warmup_steps"]),
                           seed=SEED, steps=p["steps"])
        save_model(model, tokenizer, target)
    return str(target)


def _distill_params() -> Any:
    from tuneline.params import DistillParams

    d = DISTILL
    return DistillParams(student_layers=d["student_layers"], temperature=1.0, alpha_kl=1.0, alpha_ce=0.0,
                         learning_rate=d["learning_rate"], batch_size=d["batch_size"], max_length=d["max_length"],
                         epochs=d["epochs"], max_steps=d["steps"], save_steps=10 * d["steps"])


def _timing_callback(marks: dict[str, float]) -> Any:
    from transformers import TrainerCallback

    class Timing(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            marks["start"] = time.perf_counter()

        def on_train_end(self, args, state, control, **kwargs):
            marks["end"] = time.perf_counter()

    return Timing()


# ---------------------------------------------------------------------------
# contenders (each runs in its own process)


def pretrain_ours_nocompile(work: Path, base: str) -> dict[str, Any]:
    """Ours with ``pretrain.compile: false``: what compiling adds (a control, not a peer)."""
    return pretrain_ours(work, base, compile=False)


def pretrain_ours(work: Path, base: str, compile: bool | None = None) -> dict[str, Any]:
    from tuneline.models.loading import load_causal_lm, load_tokenizer
    from tuneline.models.pretrain import pretrain_causal_lm
    from tuneline.params import PretrainParams

    p = PRETRAIN
    params = PretrainParams(steps=p["steps"], batch_size=p["batch_size"], seq_len=p["seq_len"],
                            learning_rate=p["learning_rate"], warmup_steps=p["warmup_steps"], log_every=10,
                            compile=compile)
    model, tokenizer = load_causal_lm(base), load_tokenizer(base)
    result = pretrain_causal_lm(model, tokenizer, json.loads((work / "corpus.json").read_text()), params, seed=SEED,
                                steps=p["steps"])
    return {"seconds": result.seconds, "tokens": result.tokens_seen, "eval_loss": result.eval_loss_after,
            "bf16": result.bf16, "compile": result.meta["compile"]}


def pretrain_hf_trainer_compile(work: Path, base: str) -> dict[str, Any]:
    """The run_clm recipe with the Trainer's ``torch_compile`` flag (its best flags once a run repays compiling)."""
    return pretrain_hf_trainer(work, base, compile=True)


def pretrain_hf_trainer(work: Path, base: str, compile: bool = False) -> dict[str, Any]:
    """The run_clm recipe: tokenize, concatenate, cut into blocks; Trainer with the LM collator."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForLanguageModeling, Trainer, \
        TrainingArguments

    from tuneline.models.loading import bf16_supported
    from tuneline.models.pretrain import evaluate_blocks

    p = PRETRAIN
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, **PEER_ATTN)
    train_blocks, eval_blocks = _pretrain_blocks(work, base)
    dataset = Dataset.from_dict({"input_ids": train_blocks.tolist()})
    bf16 = bf16_supported("cpu") if not torch.cuda.is_available() else True
    marks: dict[str, float] = {}
    args = TrainingArguments(output_dir=str(work / "hf-pretrain"), max_steps=p["steps"],
                             per_device_train_batch_size=p["batch_size"], learning_rate=p["learning_rate"],
                             warmup_steps=p["warmup_steps"], lr_scheduler_type="cosine", weight_decay=0.01,
                             adam_beta2=0.95, bf16=bf16, save_strategy="no", report_to=[], logging_steps=10,
                             disable_tqdm=True, seed=SEED, dataloader_num_workers=0, use_cpu=not torch.cuda.is_available(),
                             torch_compile=compile)
    trainer = Trainer(model=model, args=args, train_dataset=dataset,
                      data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False), callbacks=[_timing_callback(marks)])
    trainer.train()
    tokens = p["steps"] * p["batch_size"] * p["seq_len"]
    model.eval()
    return {"seconds": marks["end"] - marks["start"], "tokens": tokens, "bf16": bf16,
            "eval_loss": evaluate_blocks(model, eval_blocks, batch_size=p["batch_size"], bf16=bf16)}


def dpo_ours(work: Path, base: str) -> dict[str, Any]:
    from tuneline.params import DpoParams, LoraParams
    from tuneline.train.dpo import train_dpo

    d = DPO
    train, val = _preference_records(work)
    params = DpoParams(beta=d["beta"], learning_rate=d["learning_rate"], batch_size=d["batch_size"],
                       max_length=d["max_length"], lora=LoraParams(r=d["lora_r"], alpha=2 * d["lora_r"], dropout=0.0))
    logs: dict[str, Any] = {}
    out = Path(tempfile.mkdtemp(prefix="ours-dpo-", dir=work))  # a fresh folder: a used one would be resumed
    result = train_dpo(base, base, "full", train, val, params, out, seed=SEED, max_steps=d["steps"],
                       on_log=lambda step, m: logs.update(m))
    # the trainer's own train_runtime: the loop, without the before/after preference evaluation train_dpo adds
    return {"seconds": logs["train_runtime"], "pairs": d["steps"] * d["batch_size"],
            "reward_accuracy": result.after["reward_accuracy"], "bf16": result.bf16}


def dpo_trl(work: Path, base: str, precompute: bool = False) -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    from tuneline.models.loading import bf16_supported
    from tuneline.train.dpo import evaluate_preferences, to_conversational

    d = DPO
    train, val = _preference_records(work)
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, **PEER_ATTN)
    bf16 = bf16_supported("cpu") if not torch.cuda.is_available() else True
    marks: dict[str, float] = {}
    config = DPOConfig(output_dir=str(work / "trl-dpo"), beta=d["beta"], learning_rate=d["learning_rate"],
                       max_steps=d["steps"], per_device_train_batch_size=d["batch_size"], max_length=d["max_length"],
                       lr_scheduler_type="cosine", warmup_steps=0, gradient_checkpointing=False,
                       activation_checkpointing=False, bf16=bf16, use_cpu=not torch.cuda.is_available(),
                       save_strategy="no", report_to=[], logging_steps=1, disable_tqdm=True, seed=SEED,
                       precompute_ref_log_probs=precompute, precompute_ref_batch_size=4 * d["batch_size"])
    lora = LoraConfig(r=d["lora_r"], lora_alpha=2 * d["lora_r"], lora_dropout=0.0, target_modules="all-linear",
                      task_type="CAUSAL_LM")

    class Timed(DPOTrainer):  # TRL runs the reference pass in its constructor: timed into the figure
        def _precompute_ref_logps(self, *args, **kwargs):
            start = time.perf_counter()
            try:
                return super()._precompute_ref_logps(*args, **kwargs)
            finally:
                marks["reference_pass"] = marks.get("reference_pass", 0.0) + time.perf_counter() - start

    trainer = Timed(model=model, ref_model=None, args=config, processing_class=tokenizer, peft_config=lora,
                    train_dataset=Dataset.from_list(to_conversational(train)), callbacks=[_timing_callback(marks)])
    assert precompute == ("reference_pass" in marks), "TRL's precompute flag did not run its reference pass"
    trainer.train()
    after = evaluate_preferences(trainer.model, tokenizer, val, d["beta"], max_length=d["max_length"],
                                 batch_size=d["batch_size"])
    return {"seconds": marks["end"] - marks["start"] + marks.get("reference_pass", 0.0),
            "pairs": d["steps"] * d["batch_size"], "reward_accuracy": after.reward_accuracy, "bf16": bf16}


def dpo_trl_precompute(work: Path, base: str) -> dict[str, Any]:
    return dpo_trl(work, base, precompute=True)


def pretrain_eval_saved(work: Path, base: str, saved: str) -> dict[str, Any]:
    """The held-out loss of a model a peer saved (LLaMA-Factory), computed as for ours."""
    from tuneline.models.loading import bf16_supported, load_causal_lm
    from tuneline.models.pretrain import evaluate_blocks

    _, eval_blocks = _pretrain_blocks(work, base)
    return {"eval_loss": evaluate_blocks(load_causal_lm(saved), eval_blocks, batch_size=PRETRAIN["batch_size"],
                                         bf16=bf16_supported("cpu"))}


def dpo_eval_saved(work: Path, base: str, saved: str) -> dict[str, Any]:
    """The held-out reward accuracy of a DPO adapter a peer saved (LLaMA-Factory), computed as for ours."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tuneline.train.dpo import evaluate_preferences

    _, val = _preference_records(work)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), saved)
    after = evaluate_preferences(model, AutoTokenizer.from_pretrained(base), val, DPO["beta"],
                                 max_length=DPO["max_length"], batch_size=DPO["batch_size"])
    return {"reward_accuracy": after.reward_accuracy}


def distill_ours(work: Path, base: str) -> dict[str, Any]:
    """Our stage with a cold teacher cache, timed as the teacher pass over the train split plus the training loop
    (the trainer's own train_runtime): the work GKD's loop does. Loading, the held-out figures and saving are
    outside the clock for both."""
    from tuneline.models.loading import resolve_bf16
    from tuneline.train import distill

    passes: list[float] = []
    teacher_outputs = distill.teacher_outputs

    def timed(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        out = teacher_outputs(*args, **kwargs)
        passes.append(time.perf_counter() - start)
        return out

    distill.teacher_outputs = timed
    train, val = _sft_records(work)
    out, logs = Path(tempfile.mkdtemp(prefix="ours-distill-", dir=work)), {}
    result = distill.distill_student(work / "teacher", train, val, _distill_params(), out, seed=SEED,
                                     cache_dir=out / "cache", on_log=lambda step, m: logs.update(m))
    return {"seconds": passes[0] + logs["train_runtime"], "teacher_pass_s": passes[0],
            "sequences": result.steps * DISTILL["batch_size"], "val_kl": result.val_kl_after,
            "val_ce": result.val_ce_after, "bf16": resolve_bf16(None)}


def distill_trl_gkd(work: Path, base: str) -> dict[str, Any]:
    """TRL's GKDTrainer (trl.experimental.gkd) with lmbda 0 and beta 0: the teacher's forward pass every step, the
    full-vocabulary KL; the same student (our ``build_student``: the teacher's blocks 0 and 3), data and schedule.
    Timed around the training loop (which runs the teacher); then scored with our own held-out KL and CE."""
    import torch
    from datasets import Dataset
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    from tuneline.models.loading import bf16_supported, load_causal_lm, load_tokenizer
    from tuneline.train.distill import _tokenize, build_student, kd_metrics, teacher_outputs

    d, params = DISTILL, _distill_params()
    train, val = _sft_records(work)
    teacher, tokenizer = load_causal_lm(work / "teacher"), load_tokenizer(work / "teacher")
    student, _ = build_student(teacher, params, seed=SEED)
    if PEER_ATTN:
        student.set_attn_implementation(PEER_ATTN["attn_implementation"])
    bf16 = bf16_supported("cpu") if not torch.cuda.is_available() else True
    config = GKDConfig(output_dir=str(work / "trl-gkd"), lmbda=0.0, beta=0.0, seq_kd=False, max_length=d["max_length"],
                       per_device_train_batch_size=d["batch_size"], max_steps=d["steps"],
                       learning_rate=d["learning_rate"], lr_scheduler_type="cosine", warmup_steps=0, bf16=bf16,
                       use_cpu=not torch.cuda.is_available(), gradient_checkpointing=False, save_strategy="no",
                       report_to=[], logging_steps=10, disable_tqdm=True, seed=SEED, dataloader_num_workers=0)
    marks: dict[str, float] = {}
    trainer = GKDTrainer(model=student, teacher_model=teacher, args=config, processing_class=tokenizer,
                         train_dataset=Dataset.from_list([{"messages": r.messages} for r in train]),
                         callbacks=[_timing_callback(marks)])
    trainer.train()
    seconds = marks["end"] - marks["start"]
    if trainer.state.global_step != d["steps"]:
        raise RuntimeError(f"GKD ran {trainer.state.global_step} steps, the workload is {d['steps']}")
    pad = tokenizer.pad_token_id
    features = _tokenize(tokenizer, val, d["max_length"])
    cache, _ = teacher_outputs(teacher.float(), features, Path(tempfile.mkdtemp(dir=work)) / "val", temperature=1.0,
                               top_k=64, pad_token_id=pad, batch_size=d["batch_size"])
    after = kd_metrics(trainer.model.float(), features, cache, 1.0, pad)
    return {"seconds": seconds, "sequences": d["steps"] * d["batch_size"], "val_kl": after["kl"],
            "val_ce": after["ce"], "bf16": bf16}


def _generation_setup(work: Path, base: str) -> tuple[Any, Any, list[list[int]]]:
    from tuneline.models.generation import prompt_ids
    from tuneline.models.loading import load_causal_lm, load_tokenizer

    model, tokenizer = load_causal_lm(base), load_tokenizer(base)
    prompts = json.loads((work / "prompts.json").read_text())
    return model, tokenizer, [prompt_ids(tokenizer, [{"role": "user", "content": p}]) for p in prompts]


def generate_ours(work: Path, base: str) -> dict[str, Any]:
    from tuneline.models.generation import generate_greedy

    model, tokenizer, ids = _generation_setup(work, base)
    start = time.perf_counter()
    out = generate_greedy(model, tokenizer, ids, max_new_tokens=GENERATE["max_new_tokens"], batch_size=GENERATE["batch"],
                          warm_up=False)
    return {"seconds": time.perf_counter() - start, "new_tokens": sum(o["new_tokens"] for o in out)}


def generate_hf_generate(work: Path, base: str) -> dict[str, Any]:
    """``model.generate`` at its defaults (the model's generation config), batches of 32 in the given order."""
    import torch

    model, tokenizer, ids = _generation_setup(work, base)
    pad = tokenizer.pad_token_id
    new = 0
    start = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(ids), GENERATE["batch"]):
            batch = ids[i: i + GENERATE["batch"]]
            longest = max(len(p) for p in batch)
            input_ids = torch.tensor([[pad] * (longest - len(p)) + p for p in batch])
            mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in batch])
            out = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=GENERATE["max_new_tokens"],
                                 pad_token_id=pad)
            for row in out[:, longest:].tolist():
                eos = next((k for k, t in enumerate(row) if t == tokenizer.eos_token_id), None)
                new += len(row) if eos is None else eos + 1
    return {"seconds": time.perf_counter() - start, "new_tokens": new}


CHILDREN = {("pretrain", "ours"): pretrain_ours, ("pretrain", "hf-trainer"): pretrain_hf_trainer,
            ("pretrain", "hf-trainer-compile"): pretrain_hf_trainer_compile,
            ("pretrain", "ours-nocompile"): pretrain_ours_nocompile,
            ("dpo", "ours"): dpo_ours, ("dpo", "trl"): dpo_trl, ("dpo", "trl-precompute"): dpo_trl_precompute,
            ("distill", "ours"): distill_ours, ("distill", "trl-gkd"): distill_trl_gkd,
            ("generate", "ours"): generate_ours, ("generate", "hf-generate"): generate_hf_generate,
            ("pretrain", "eval-saved"): pretrain_eval_saved, ("dpo", "eval-saved"): dpo_eval_saved}
WORKLOADS = {"pretrain": PRETRAIN, "dpo": DPO, "distill": DISTILL, "generate": GENERATE}


def run_child(stage: str, contender: str, work: Path, base: str, env: dict[str, str]) -> dict[str, Any]:
    """One contender's run in its own process; LLaMA-Factory's in its venv, then scored here from what it saved."""
    saved: list[str] = []
    eager = contender.endswith("-eager")
    contender = contender.removesuffix("-eager")
    if contender == "llamafactory":
        python = LF_VENV / "bin" / "python"
        if not python.exists():
            return {"error": f"{python} missing: run `bash bench/setup_llamafactory.sh`"}
        from tuneline.models.loading import bf16_supported

        out = Path(tempfile.mkdtemp(prefix=f"lf-{stage}-", dir=work))
        cmd = [str(python), str(ROOT / "bench" / "llamafactory_stage.py"),
               "--stage", {"pretrain": "pt"}.get(stage, stage), "--work", str(work), "--base", base, "--out", str(out), "--bf16", str(int(bf16_supported("cpu"))),
               *(["--eager"] if eager else []), "--workload", json.dumps({**WORKLOADS[stage], "seed": SEED})]
        lf_env = {k: v for k, v in env.items() if k != "PYTHONPATH"}  # nothing of ours in its venv
        row = _row(subprocess.run(cmd, capture_output=True, text=True, env={**lf_env, "DISABLE_VERSION_CHECK": "1"},
                                  timeout=1800))
        if "error" in row:
            return row
        contender, saved = "eval-saved", ["--saved", row["saved"]]
        unit = {"pretrain": "tokens", "dpo": "pairs"}[stage]
        row[unit] = WORKLOADS[stage]["steps"] * WORKLOADS[stage]["batch_size"] * (
            PRETRAIN["seq_len"] if stage == "pretrain" else 1)
    else:
        row = {}
    # a cold torch.compile cache for every child, as on a fresh machine (a warm one cuts compiling to seconds)
    cache = {"TORCHINDUCTOR_CACHE_DIR": tempfile.mkdtemp(prefix="inductor-", dir=work)}
    proc = subprocess.run([sys.executable, __file__, "--child", f"{stage}:{contender}", "--work", str(work),
                           "--base", base, "--pretrain-steps", str(PRETRAIN["steps"]), *saved,
                           *(["--attn", "eager"] if eager and not saved else [])],
                          capture_output=True, text=True, env={**env, **cache}, timeout=3600)
    return {**row, **_row(proc)}


def _row(proc: subprocess.CompletedProcess) -> dict[str, Any]:
    found = [json.loads(line[4:]) for line in proc.stdout.splitlines() if line.startswith("ROW ")]
    return found[0] if found else {"error": (proc.stderr.strip().splitlines() or ["?"])[-1]}


# ---------------------------------------------------------------------------
# the driver


def rate(stage: str, row: dict[str, Any]) -> float:
    unit = {"pretrain": "tokens", "dpo": "pairs", "distill": "sequences", "generate": "new_tokens"}[stage]
    return row[unit] / row["seconds"]


def summarize(stage: str, rows: list[dict[str, Any]], flops_per_unit: float, peaks: dict[str, float]) -> dict[str, Any]:
    """Medians with min-max per contender, the ratio to the fastest peer (and to the fastest at its default flags),
    and the useful MFU (:func:`useful_flops_per_unit` per unit of work, against the measured peak of the dtype the
    stage ran in)."""
    out: dict[str, Any] = {}
    for contender in CONTENDERS[stage]:
        mine = [r for r in rows if r["contender"] == contender and "error" not in r]
        if not mine:
            continue
        rates = [rate(stage, r) for r in mine]
        dtype = "bfloat16" if mine[0].get("bf16") else "float32"
        out[contender] = {"median": statistics.median(rates), "min": min(rates), "max": max(rates), "runs": len(mine),
                          "dtype": dtype, "mfu": useful_mfu(statistics.median(rates), flops_per_unit, peaks[dtype]),
                          **{k: statistics.median([r[k] for r in mine])
                             for k in ("eval_loss", "reward_accuracy", "val_kl", "val_ce") if k in mine[0]}}
    peers = {k: v["median"] for k, v in out.items() if not k.startswith("ours")}  # ours-* are controls
    if "ours" in out and peers:
        default = [v for k, v in peers.items() if not k.endswith("-eager") and "-precompute" not in k]
        out["ratio_to_fastest_peer"] = out["ours"]["median"] / max(peers.values())
        out["ratio_to_fastest_peer_at_default_flags"] = out["ours"]["median"] / max(default) if default else None
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stages", default="pretrain,dpo,distill,generate")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--results", type=Path, default=RESULTS, help="results file (a run of some stages keeps the "
                        "other stages' last figures in it)")
    parser.add_argument("--pretrain-steps", type=int, default=PRETRAIN["steps"],
                        help="pretraining steps (the demo's 800 compile by default: pretrain.compile null)")
    parser.add_argument("--contenders", default=None, help="comma-separated subset of each stage's contenders")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--work", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--base", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--saved", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--attn", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.pretrain_steps != PRETRAIN["steps"]:  # warmup stays a tenth of the steps
        PRETRAIN.update(steps=args.pretrain_steps, warmup_steps=max(1, args.pretrain_steps // 10))
    if args.contenders:
        wanted = set(args.contenders.split(","))
        for stage, names in CONTENDERS.items():
            CONTENDERS[stage] = tuple(n for n in names + CONTROLS.get(stage, ()) if n == "ours" or n in wanted)
    if args.child:
        stage, contender = args.child.split(":")
        if args.attn:
            PEER_ATTN["attn_implementation"] = args.attn
        extra = (args.saved,) if contender == "eval-saved" else ()
        row = CHILDREN[(stage, contender)](Path(args.work), args.base, *extra)
        print("ROW " + json.dumps(row), flush=True)
        return 0

    work = Path(tempfile.mkdtemp(prefix="tuneline-stage-bench-"))
    setup = prepare(work)
    machine = cpu()
    from tuneline.models.loading import bf16_supported

    # bf16 emulated (no native bf16, or kernels held to AVX2) takes minutes per matmul, and no stage runs in it there
    peaks = {"float32": measure("float32"), "bfloat16": measure("bfloat16") if bf16_supported("cpu") else None}
    print(f"# {machine}\n# model: {setup['n_params'] / 1e6:.1f} M parameters; {args.runs} interleaved runs", flush=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    results: dict[str, Any] = {"machine": machine, "params": setup["n_params"], "runs": args.runs, "peak_gflops": peaks,
                               "matmul_params": setup["n_matmul_params"],
                               "work_sizes": {k: setup[k] for k in WORK_SIZES},
                               "workloads": WORKLOADS, "stages": {}}
    for stage in args.stages.split(","):
        if stage == "distill":
            distill_teacher(work, setup["base"])
        rows = []
        for run in range(args.runs):
            for contender in CONTENDERS[stage]:
                row = {"contender": contender, "run": run, **run_child(stage, contender, work, setup["base"], env)}
                print(json.dumps({"stage": stage, **row}), flush=True)
                rows.append(row)
        summary = summarize(stage, rows, useful_flops_per_unit(stage, setup), peaks)
        results["stages"][stage] = {"rows": rows, "summary": summary,
                                    "machine": machine, "peak_gflops": peaks,  # a file can hold stages of other runs
                                    "measured": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        print(json.dumps({"stage": stage, "summary": summary}), flush=True)
    args.results.parent.mkdir(parents=True, exist_ok=True)
    if args.results.exists():  # a run of some stages keeps the other stages' last figures
        previous = json.loads(args.results.read_text())
        results["stages"] = {**previous.get("stages", {}), **results["stages"]}
    args.results.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
