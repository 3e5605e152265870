"""SFT throughput: tuneline's ``train_sft`` against bare TRL ``SFTTrainer`` and LLaMA-Factory.

One shared setup (demo data, a byte-level BPE tokenizer and a random tiny Llama of ~4.2 M
parameters), the same LoRA (r=16, alpha=32, dropout 0.05, every linear layer), batch 8, max length
256, 50 optimizer steps, peak lr 2e-4 (cosine, no warmup), seed 42; each contender trains in its
own subprocess and the runs are interleaved (ours, trl, llamafactory, ours, trl, ...).

Measured for every run, the same way for every contender (each is a ``transformers.Trainer``):

* training wall time: a ``TrainerCallback`` (``timing_callback`` below) takes ``perf_counter`` at
  ``on_train_begin`` and ``on_train_end``: model loading, tokenization and saving are outside it;
* real tokens: ``TrainingArguments.include_num_input_tokens_seen="non_padding"`` (the trainer sums
  each consumed batch's attention mask), read from ``state.num_input_tokens_seen`` at train end;
* validation loss: after training, this process loads base + adapter in fp32 and computes the
  token-weighted completion-only cross-entropy on the same held-out split for every contender;
* the tokenized training set each trainer really iterated over (dumped after the clock stops) is
  compared with ours: same token ids and same loss mask means the same work.

    python bench/sft_throughput.py --runs 3 [--skip-llamafactory] [--with-defaults]

Writes bench/results/sft_throughput.json and docs/sft_throughput.png. The LLaMA-Factory venv comes
from bench/setup_llamafactory.sh. Only stdlib at module level: bench/trl_sft.py and
bench/llamafactory_sft.py (another venv) import ``timing_callback`` from here.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
DEFAULT_WORK_DIR = ROOT / ".bench" / "sft_throughput"
LF_VENV = ROOT / ".bench" / "llamafactory-venv"
RESULTS_PATH = BENCH / "results" / "sft_throughput.json"
PLOT_PATH = ROOT / "docs" / "sft_throughput.png"

# the workload, identical for every contender
STEPS = 50
BATCH = 8
MAX_LENGTH = 256
LEARNING_RATE = 2e-4
LORA_R, LORA_ALPHA, LORA_DROPOUT = 16, 32, 0.05
SEED = 42
TARGET_RATIO = 1.25  # ours must reach this multiple of the fastest peer
CHILD_TIMEOUT_S = 900

CONTENDERS = {
    "ours": "tuneline train_sft (plain Trainer, bf16 autocast where native, shipped defaults)",
    "ours-packed": "control: ours with padding_free=True forced (batches packed into rows, no padding)",
    "trl": "TRL SFTTrainer, bf16 autocast where native, no gradient checkpointing",
    "llamafactory": "LLaMA-Factory, bf16 where native, no gradient checkpointing",
    "trl-defaults": "TRL SFTTrainer at its defaults (bf16, gradient checkpointing on)",
    "llamafactory-defaults": "LLaMA-Factory at its defaults (gradient checkpointing on), bf16",
    "trl-eager": "TRL SFTTrainer as `trl`, the model loaded with eager attention (ours' kernel on a CPU)",
    "llamafactory-eager": "LLaMA-Factory as `llamafactory`, flash_attn: disabled (eager attention)",
}

CHILD_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "WANDB_DISABLED": "true",
    "DISABLE_VERSION_CHECK": "0",
    "PYTHONUNBUFFERED": "1",
}


# ---------------------------------------------------------------------------
# shared by the three children (keep it free of module-level third-party imports)


def timing_callback(dump_path: Optional[str] = None) -> Any:
    """A ``TrainerCallback`` that times on_train_begin -> on_train_end and reads the tokens seen.

    After the clock stops it writes the training dataset the trainer iterated over (token ids and
    loss mask per example) to ``dump_path``, so the benchmark can check that every contender
    trained on the same tokens.
    """
    from transformers import TrainerCallback

    class TimingCallback(TrainerCallback):
        def __init__(self) -> None:
            self.begin: Optional[float] = None
            self.end: Optional[float] = None
            self.tokens = 0
            self.steps = 0
            self.losses: list[tuple[int, float]] = []
            self.train_runtime: Optional[float] = None
            self.dumped = 0

        def on_train_begin(self, args, state, control, **kwargs):
            self.begin = time.perf_counter()

        def on_log(self, args, state, control, logs=None, **kwargs):
            logs = logs or {}
            if "loss" in logs:
                self.losses.append((int(state.global_step), float(logs["loss"])))
            if "train_runtime" in logs:
                self.train_runtime = float(logs["train_runtime"])

        def on_train_end(self, args, state, control, **kwargs):
            self.end = time.perf_counter()
            self.tokens = int(state.num_input_tokens_seen)
            self.steps = int(state.global_step)
            loader = kwargs.get("train_dataloader")
            if dump_path and loader is not None:
                self.dumped = dump_dataset(loader.dataset, dump_path)

        @property
        def seconds(self) -> float:
            return (self.end or 0.0) - (self.begin or 0.0)

        def summary(self) -> dict[str, Any]:
            return {
                "train_seconds": self.seconds,
                "real_tokens": self.tokens,
                "tokens_per_second": self.tokens / self.seconds if self.seconds > 0 else 0.0,
                "steps": self.steps,
                "trainer_train_runtime": self.train_runtime,
                "train_losses": self.losses,
                "dumped_examples": self.dumped,
            }

    return TimingCallback()


def dump_dataset(dataset: Any, path: str) -> int:
    """Write each example's ``input_ids`` and loss mask (1 = the token is a label) as JSON lines."""
    n = 0
    with open(path, "w", encoding="utf-8") as fh:
        for row in dataset:
            ids = [int(t) for t in row["input_ids"]]
            if "labels" in row and row["labels"] is not None:
                mask = [int(int(t) != -100) for t in row["labels"]]
            elif "assistant_masks" in row:  # TRL: the collator turns these into labels
                mask = [int(m) for m in row["assistant_masks"]]
            elif "completion_mask" in row:
                mask = [int(m) for m in row["completion_mask"]]
            else:
                mask = [1] * len(ids)
            fh.write(json.dumps({"input_ids": ids, "mask": mask}) + "\n")
            n += 1
    return n


def versions() -> dict[str, str]:
    """Versions of the libraries that matter, as this interpreter sees them."""
    from importlib import metadata

    out = {"python": platform.python_version()}
    for name in ("torch", "transformers", "peft", "trl", "accelerate", "datasets", "llamafactory"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def write_json(path: Path | str, data: Any) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    tmp.replace(path)


# ---------------------------------------------------------------------------
# the shared setup


def build_setup(work: Path, seed: int, pad_vocab: int, data: Optional[Path] = None,
                row_tokens: Optional[tuple[int, int]] = None) -> dict[str, Any]:
    """Data (the demo's, or ``data``: any SFT file ingest reads), tokenizer, tiny Llama, and each
    contender's data in its native format. ``row_tokens=(lo, hi)`` keeps only the conversations whose
    tokenized chat is lo..hi tokens long (long rows, where matmuls outweigh per-step overhead)."""
    sys.path.insert(0, str(ROOT))
    from tuneline.data.demo import read_corpus, write_demo_data
    from tuneline.data.ingest import read_source
    from tuneline.data.split import split_records
    from tuneline.models.loading import resolve_bf16
    from tuneline.models.tiny import init_tiny_model, save_model, train_tokenizer
    from tuneline.params import DemoDataParams, SplitParams, TinyModelParams
    from tuneline.records import sha256_file, write_jsonl

    work.mkdir(parents=True, exist_ok=True)
    if data is None:
        manifest = write_demo_data(DemoDataParams(), work / "demo")
        records = read_source(work / "demo" / "sft.jsonl").records  # alpaca rows -> ChatRecords
        corpus = read_corpus(work / "demo" / "corpus.txt")
        data_sha256 = manifest["files"]["sft.jsonl"]["sha256"]
    else:
        # a real SFT file: conversations with a non-empty answer; the tokenizer learns from its text
        records = [r for r in read_source(data).records
                   if r.kind == "sft" and r.messages[-1]["content"].strip()]
        corpus = [m["content"] for r in records for m in r.messages]
        data_sha256 = sha256_file(data)
    split = split_records(records, SplitParams(), seed=seed)
    train, val = split.splits["train"], split.splits["validation"]

    tiny = TinyModelParams()  # hidden 256, intermediate 768, 4 layers, 4 heads, vocab 4096
    tokenizer = train_tokenizer(corpus, tiny)  # as the pipeline does
    model = init_tiny_model(tokenizer, tiny, seed=0)
    learned_vocab = len(tokenizer)
    if row_tokens is not None:
        from tuneline.train.common import tokenize_chat

        def within(rows: list[Any]) -> list[Any]:
            tokenized = (tokenize_chat(tokenizer, [r], 1 << 16) for r in rows)
            lengths = [len(t[0]["input_ids"]) if t else 0 for t in tokenized]
            return [r for r, n in zip(rows, lengths) if row_tokens[0] <= n <= row_tokens[1]]

        train, val = within(train), within(val)
        if not train or not val:
            raise RuntimeError(f"no train or validation conversation is {row_tokens[0]}-{row_tokens[1]} tokens long")
    if pad_vocab and pad_vocab > learned_vocab:
        # The demo corpus only has enough distinct text for ~800 BPE tokens; the embedding (tied
        # with the LM head) is padded to the nominal vocabulary so the LM head costs what a
        # vocab-4096 model costs. Unused rows; identical for every contender.
        import torch

        torch.manual_seed(0)
        model.resize_token_embeddings(pad_vocab, mean_resizing=False)
        model.tie_weights()
    n_params = sum(p.numel() for p in model.parameters())  # tied embeddings counted once
    if not 3.0e6 <= n_params <= 5.0e6:
        raise RuntimeError(f"tiny model has {n_params:,} parameters, expected about 4.2 M")
    base = save_model(model, tokenizer, work / "base")

    # ours: ChatRecord JSONL, read back with read_records by the child
    write_jsonl(work / "data" / "ours_train.jsonl", (r.to_dict() for r in train))
    write_jsonl(work / "data" / "val.jsonl", (r.to_dict() for r in val))
    # TRL: conversational dataset, one {"messages": [...]} per line (assistant_only_loss)
    write_jsonl(work / "data" / "trl_train.jsonl", ({"messages": r.messages} for r in train))
    # LLaMA-Factory: sharegpt-style file + dataset_info.json; the template is parsed from the
    # tokenizer's own chat template (no `template:` key), so the ids match ours (checked per run)
    lf_dir = work / "data" / "llamafactory"
    lf_dir.mkdir(parents=True, exist_ok=True)
    if any(m["role"] not in ("system", "user", "assistant") for r in train for m in r.messages):
        raise RuntimeError("unexpected role in the demo data")
    lf_rows = []
    for r in train:
        row: dict[str, Any] = {"messages": [m for m in r.messages if m["role"] != "system"]}
        system = [m["content"] for m in r.messages if m["role"] == "system"]
        if system:
            row["system"] = system[0]
        lf_rows.append(row)
    (lf_dir / "tuneline_train.json").write_text(json.dumps(lf_rows, ensure_ascii=False), encoding="utf-8")
    dataset_info = {
        "tuneline_train": {
            "file_name": "tuneline_train.json",
            "formatting": "sharegpt",
            "columns": {"messages": "messages", **({"system": "system"} if any("system" in r for r in lf_rows) else {})},
            "tags": {
                "role_tag": "role",
                "content_tag": "content",
                "user_tag": "user",
                "assistant_tag": "assistant",
                "system_tag": "system",
            },
        }
    }
    write_json(lf_dir / "dataset_info.json", dataset_info)

    spec = {
        "base_model": str(base),
        "ours_train": str(work / "data" / "ours_train.jsonl"),
        "trl_train": str(work / "data" / "trl_train.jsonl"),
        "llamafactory_dataset_dir": str(lf_dir),
        "llamafactory_dataset": "tuneline_train",
        "val": str(work / "data" / "val.jsonl"),
        "steps": STEPS,
        "batch_size": BATCH,
        "max_length": MAX_LENGTH,
        "learning_rate": LEARNING_RATE,
        "lr_scheduler": "cosine",
        "warmup_steps": 0,
        "weight_decay": 0.0,
        "lora": {"r": LORA_R, "alpha": LORA_ALPHA, "dropout": LORA_DROPOUT, "target": "all-linear"},
        "seed": seed,
        # the peers' precision: bf16 where it is native (as ours picks), fp32 elsewhere, where emulated bf16 runs
        # many times slower (their best flags for that CPU)
        "bf16": resolve_bf16(None),
    }
    write_json(work / "spec.json", spec)
    return {
        "spec": spec,
        "model": {
            "parameters": n_params,
            "vocab": model.config.vocab_size,
            "tokenizer_tokens": learned_vocab,
            "hidden": tiny.hidden_size,
            "intermediate": tiny.intermediate_size,
            "layers": tiny.num_layers,
            "heads": tiny.num_heads,
            "tied_embeddings": True,
        },
        "data": {
            "train_records": len(train),
            "val_records": len(val),
            "source": str(data) if data is not None else "demo",
            "row_tokens": list(row_tokens) if row_tokens is not None else None,
            "sft_sha256": data_sha256,
        },
    }


# ---------------------------------------------------------------------------
# child: our SFT stage


def run_ours(spec_path: Path, out: Path, result_path: Path, padding_free: Optional[bool] = None) -> None:
    sys.path.insert(0, str(ROOT))
    import torch

    from tuneline.params import LoraParams, SftParams
    from tuneline.records import read_records
    from tuneline.train.sft import train_sft

    digests = source_digests()  # taken as the run starts (another engineer may be editing these files)
    spec = json.loads(spec_path.read_text(encoding="utf-8"))
    params = SftParams(
        method="lora",
        learning_rate=spec["learning_rate"],
        max_steps=spec["steps"],
        batch_size=spec["batch_size"],
        max_length=spec["max_length"],
        warmup_ratio=0.0,
        weight_decay=spec["weight_decay"],
        lora=LoraParams(r=spec["lora"]["r"], alpha=spec["lora"]["alpha"], dropout=spec["lora"]["dropout"]),
        eval_steps=1000,  # beyond the 50 steps: no evaluation or checkpoint inside the timed part
        save_steps=1000,
        # bf16, padding_free (None: chosen from the rows' mean length) and group_by_length (False: the
        # Trainer's random sampler, so the very batches TRL and LLaMA-Factory get) stay at what the
        # pipeline ships; the `ours-packed` control forces packed batches on
        padding_free=padding_free,
    )
    cb = timing_callback(str(out / "train_dataset.jsonl"))
    result = train_sft(
        spec["base_model"], read_records(spec["ours_train"]), [], params, out, seed=spec["seed"], extra_callbacks=[cb]
    )
    write_json(
        result_path,
        {
            **cb.summary(),
            "adapter_dir": result.output_dir,
            "own_report": {
                "real_tokens": result.real_tokens,
                "train_seconds": result.train_seconds,
                "tokens_per_second": result.tokens_per_second,
            },
            "bf16": result.bf16,
            "group_by_length": params.group_by_length,
            "padding_free": result.padding_free,
            "trainable_params": result.trainable_params,
            "threads": torch.get_num_threads(),
            "versions": versions(),
            "tuneline_sources": digests,
        },
    )


def _cpu() -> str:
    """The CPU's name and the flags that decide its speed (bench/_machine.py; stdlib only)."""
    sys.path.insert(0, str(ROOT))
    from bench._machine import cpu

    return cpu()


def source_digests() -> dict[str, str]:
    """sha256 (12 hex) of the tuneline files the SFT stage runs: which version of the code was measured."""
    import hashlib

    files = ("tuneline/train/sft.py", "tuneline/train/common.py", "tuneline/train/methods.py",
             "tuneline/train/callbacks.py")
    return {f: hashlib.sha256((ROOT / f).read_bytes()).hexdigest()[:12] for f in files if (ROOT / f).exists()}


# ---------------------------------------------------------------------------
# the parent: interleaved runs, evaluation, report


def cpu_jiffies() -> tuple[float, float]:
    """(busy, total) CPU time of the whole machine in seconds, from /proc/stat."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    values = [float(v) for v in fields[:8]]
    idle = values[3] + values[4]  # idle + iowait
    hz = os.sysconf("SC_CLK_TCK")
    return (sum(values) - idle) / hz, sum(values) / hz


def busy_cores(seconds: float = 3.0) -> float:
    """Cores kept busy by everything on the machine over the next ``seconds`` (we sleep meanwhile)."""
    b0, _ = cpu_jiffies()
    time.sleep(seconds)
    b1, _ = cpu_jiffies()
    return (b1 - b0) / seconds


def wait_for_quiet(max_load: float, max_busy: float, max_wait_s: float, poll_s: float, check_loadavg: bool) -> dict:
    """Wait until the machine is quiet; returns what was seen when the run was allowed to start.

    Quiet: the other processes keep at most ``max_busy`` cores busy right now (a 3 s sample, while
    this benchmark sleeps) and, when ``check_loadavg``, the 1-minute load average is at most
    ``max_load``. The load average is only checked before the first run: our own runs push it up.
    Gives up after ``max_wait_s`` and measures anyway (recorded as ``quiet: False``; a disturbed
    run is then redone or flagged by the caller).
    """
    started = time.monotonic()
    while True:
        load = os.getloadavg()
        busy = busy_cores()
        quiet = busy <= max_busy and (not check_loadavg or load[0] <= max_load)
        waited = time.monotonic() - started
        if quiet or waited >= max_wait_s:
            return {"loadavg": [round(x, 2) for x in load], "busy_cores_before": round(busy, 2),
                    "waited_s": round(waited), "quiet": quiet}
        print(f"  machine busy (load {load[0]:.2f}, {busy:.2f} cores busy now); waiting {poll_s:.0f} s", flush=True)
        time.sleep(poll_s)


def child_command(contender: str, spec_path: Path, out: Path, result_path: Path) -> list[str]:
    if contender in ("ours", "ours-packed"):
        return [sys.executable, str(Path(__file__).resolve()), "--child", contender, "--spec", str(spec_path),
                "--out", str(out), "--result", str(result_path)]
    if contender.startswith("trl"):
        cmd = [sys.executable, str(BENCH / "trl_sft.py"), "--spec", str(spec_path), "--out", str(out),
               "--result", str(result_path)]
        return cmd + {"trl-defaults": ["--defaults"], "trl-eager": ["--eager"]}.get(contender, [])
    if contender.startswith("llamafactory"):
        python = LF_VENV / "bin" / "python"
        if not python.exists():
            raise FileNotFoundError(f"{python} missing: run `bash bench/setup_llamafactory.sh` (or --skip-llamafactory)")
        cmd = [str(python), str(BENCH / "llamafactory_sft.py"), "--spec", str(spec_path), "--out", str(out),
               "--result", str(result_path)]
        return cmd + {"llamafactory-defaults": ["--defaults"], "llamafactory-eager": ["--eager"]}.get(contender, [])
    raise ValueError(contender)


def run_child(contender: str, spec_path: Path, work: Path, run: int) -> dict[str, Any]:
    out = work / "runs" / f"{contender}-{run}"
    if out.exists():
        import shutil

        shutil.rmtree(out)
    out.mkdir(parents=True)
    result_path = out / "result.json"
    log_path = work / "logs" / f"{contender}-{run}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **CHILD_ENV, "HF_DATASETS_CACHE": str(work / "hf_datasets_cache")}
    env.pop("VIRTUAL_ENV", None)
    busy0, _ = cpu_jiffies()
    usage0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    wall0 = time.perf_counter()
    with open(log_path, "w", encoding="utf-8") as log:
        proc = subprocess.run(child_command(contender, spec_path, out, result_path), stdout=log,
                              stderr=subprocess.STDOUT, env=env, cwd=str(ROOT), timeout=CHILD_TIMEOUT_S)
    wall = time.perf_counter() - wall0
    busy1, _ = cpu_jiffies()
    usage1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0 or not result_path.exists():
        tail = "\n".join(log_path.read_text(encoding="utf-8", errors="replace").splitlines()[-40:])
        raise RuntimeError(f"{contender} run {run} failed (exit {proc.returncode}); log {log_path}:\n{tail}")
    result = json.loads(result_path.read_text(encoding="utf-8"))
    child_cpu = (usage1.ru_utime + usage1.ru_stime) - (usage0.ru_utime + usage0.ru_stime)
    # CPU that other processes on the machine used while the child ran (whole child lifetime)
    result["other_cores_during_run"] = round(max(0.0, (busy1 - busy0) - child_cpu) / wall, 2)
    result["process_seconds"] = round(wall, 2)
    result["log"] = str(log_path)
    return result


def validation_loss(base_model: str, adapter_dir: Optional[str], val_data: list[dict], batch_size: int = 16) -> float:
    """Token-weighted completion-only cross-entropy of base (+ adapter) on ``val_data``, fp32."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from tuneline.train.common import IGNORE_INDEX, PadCollator

    hf_logging.disable_progress_bar()

    model = AutoModelForCausalLM.from_pretrained(base_model, dtype=torch.float32)
    if adapter_dir:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter_dir)
    model.eval()
    collate = PadCollator(model.config.pad_token_id if model.config.pad_token_id is not None else 0)
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(val_data), batch_size):
            batch = collate(val_data[start : start + batch_size])
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
            labels = batch["labels"][:, 1:]
            loss = torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), labels.reshape(-1),
                ignore_index=IGNORE_INDEX, reduction="sum",
            )
            total += float(loss)
            count += int((labels != IGNORE_INDEX).sum())
    return total / count


def compare_tokenization(reference: list[dict], dump_path: Path) -> dict[str, Any]:
    """Does a contender's tokenized training set equal ours (same ids, same loss mask, as a multiset)?"""
    from collections import Counter

    def key(ids, mask):
        return (tuple(ids), tuple(mask))

    ours = Counter(key(r["input_ids"], [int(t != -100) for t in r["labels"]]) for r in reference)
    theirs: Counter = Counter()
    ids_only_theirs: Counter = Counter()
    for line in dump_path.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        theirs[key(row["input_ids"], row["mask"])] += 1
        ids_only_theirs[tuple(row["input_ids"])] += 1
    ids_only_ours = Counter(k[0] for k in ours.elements())
    same = sum((ours & theirs).values())
    same_ids = sum((ids_only_ours & ids_only_theirs).values())
    n_ours, n_theirs = sum(ours.values()), sum(theirs.values())
    return {
        "examples_ours": n_ours,
        "examples_theirs": n_theirs,
        "identical_ids_and_mask": same,
        "identical_ids": same_ids,
        "identical": same == n_ours == n_theirs,
    }


def summarize(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def report(contenders: list[str], results: dict[str, list[dict]], base_val: float) -> dict[str, Any]:
    table: dict[str, Any] = {}
    for c in contenders:
        runs = results[c]
        table[c] = {
            "description": CONTENDERS[c],
            "tokens_per_second": summarize([r["tokens_per_second"] for r in runs]),
            "train_seconds": summarize([r["train_seconds"] for r in runs]),
            "real_tokens": summarize([r["real_tokens"] for r in runs]),
            "val_loss": summarize([r["val_loss"] for r in runs]),
            "other_cores_during_run_max": max(r["other_cores_during_run"] for r in runs),
            "disturbed_runs": sum(bool(r.get("contaminated")) for r in runs),
            "runs": len(runs),
        }
    ratios: dict[str, Any] = {}
    if "ours" in table:
        ours = table["ours"]["tokens_per_second"]
        for peer in contenders:
            if peer == "ours":
                continue
            theirs = table[peer]["tokens_per_second"]
            ratios[peer] = {
                "median": ours["median"] / theirs["median"],
                "worst": ours["min"] / theirs["max"],
                "best": ours["max"] / theirs["min"],
                "val_loss_delta": table["ours"]["val_loss"]["median"] - table[peer]["val_loss"]["median"],
            }
    peers = [c for c in contenders if c in ("trl", "llamafactory", "trl-eager", "llamafactory-eager")]
    fastest = max(peers, key=lambda c: table[c]["tokens_per_second"]["median"]) if peers else None
    verdict = None
    if fastest and "ours" in table:
        r = ratios[fastest]["median"]
        loss_ok = table["ours"]["val_loss"]["median"] <= table[fastest]["val_loss"]["median"] + 1e-3
        verdict = {
            "fastest_peer": fastest,
            "ratio": r,
            "target": TARGET_RATIO,
            "speed_met": r >= TARGET_RATIO,
            "val_loss_equal_or_better": loss_ok,
            "met": r >= TARGET_RATIO and loss_ok,
        }
    return {"table": table, "ratios": ratios, "verdict": verdict, "base_val_loss": base_val}


def print_table(summary: dict[str, Any]) -> None:
    print()
    header = (f"{'contender':24s} {'real tok/s median':>17s} {'min':>7s} {'max':>7s} {'train s':>8s} {'tokens':>7s} "
              f"{'val loss':>9s} {'others':>7s}")
    print(header)
    print("-" * len(header))
    for c, row in summary["table"].items():
        t = row["tokens_per_second"]
        print(f"{c:24s} {t['median']:17,.0f} {t['min']:7,.0f} {t['max']:7,.0f} "
              f"{row['train_seconds']['median']:8.2f} {row['real_tokens']['median']:7,.0f} {row['val_loss']['median']:9.4f} "
              f"{row['other_cores_during_run_max']:7.2f}")
    print("(others: most cores other processes kept busy during one of the contender's runs)")
    disturbed = {c: row["disturbed_runs"] for c, row in summary["table"].items() if row["disturbed_runs"]}
    if disturbed:
        print(f"WARNING: runs disturbed by other processes (kept after retries): {disturbed}")
    print(f"(base model before training: val loss {summary['base_val_loss']:.4f})")
    for peer, r in summary["ratios"].items():
        print(f"ours / {peer:22s} {r['median']:.2f}x  (worst {r['worst']:.2f}x, best {r['best']:.2f}x; "
              f"val loss ours - theirs {r['val_loss_delta']:+.4f})")
    v = summary["verdict"]
    if v:
        print(f"target >= {v['target']:.2f}x the fastest peer ({v['fastest_peer']}): {v['ratio']:.2f}x -> "
              f"{'MET' if v['met'] else 'NOT MET'} (speed {'ok' if v['speed_met'] else 'short'}, "
              f"val loss {'ok' if v['val_loss_equal_or_better'] else 'worse'})")


def markdown_table(summary: dict[str, Any]) -> str:
    """The results as the Markdown table docs/benchmarks.md shows."""
    lines = [
        "| contender | real tokens/s, median | min | max | train s (median) | real tokens | val loss (median) "
        "| ours / this |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c, row in summary["table"].items():
        t = row["tokens_per_second"]
        ratio = summary["ratios"].get(c)
        lines.append(
            f"| `{c}` | {t['median']:,.0f} | {t['min']:,.0f} | {t['max']:,.0f} | {row['train_seconds']['median']:.2f} "
            f"| {row['real_tokens']['median']:,.0f} | {row['val_loss']['median']:.4f} | "
            + (f"{ratio['median']:.2f}x ({ratio['worst']:.2f}-{ratio['best']:.2f}) |" if ratio else "- |")
        )
    return "\n".join(lines)


def plot(summary: dict[str, Any], results: dict[str, list[dict]], path: Path, subtitle: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(summary["table"])
    med = [summary["table"][n]["tokens_per_second"]["median"] for n in names]
    lo = [m - summary["table"][n]["tokens_per_second"]["min"] for n, m in zip(names, med)]
    hi = [summary["table"][n]["tokens_per_second"]["max"] - m for n, m in zip(names, med)]
    colors = ["#2b6cb0" if n == "ours" else "#90cdf4" if n.startswith("ours") else "#a0aec0" for n in names]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4.6), gridspec_kw={"width_ratios": [2.2, 1]})
    x = range(len(names))
    ax.bar(x, med, yerr=[lo, hi], capsize=5, color=colors)
    for i, n in enumerate(names):
        ax.scatter([i] * len(results[n]), [r["tokens_per_second"] for r in results[n]], color="black", s=10, zorder=3)
        ax.annotate(f"{med[i]:,.0f}", (i, med[i]), textcoords="offset points", xytext=(0, 4),
                    ha="center", va="bottom", fontsize=9)
    v = summary["verdict"]
    if v:
        target = v["target"] * summary["table"][v["fastest_peer"]]["tokens_per_second"]["median"]
        ax.axhline(target, color="#c53030", linestyle="--", linewidth=1)
        ax.text(len(names) - 0.5, target, f"target {v['target']:.2f}x {v['fastest_peer']}", color="#c53030",
                ha="right", va="bottom", fontsize=8)
    ax.set_xticks(list(x), names, rotation=15)
    ax.set_ylabel("real (non-padding) tokens / s")
    ax.set_title("SFT throughput (median, min-max, each run a dot)")
    losses = [summary["table"][n]["val_loss"]["median"] for n in names]
    ax2.bar(x, losses, color=colors)
    ax2.axhline(summary["base_val_loss"], color="black", linestyle=":", linewidth=1)
    ax2.text(len(names) - 0.5, summary["base_val_loss"], "before training", ha="right", va="bottom", fontsize=8)
    for i, loss in enumerate(losses):
        ax2.annotate(f"{loss:.3f}", (i, loss), textcoords="offset points", xytext=(0, 3), ha="center", fontsize=8)
    ax2.set_ylim(min(losses) * 0.97, max(max(losses), summary["base_val_loss"]) * 1.02)
    ax2.set_xticks(list(x), names, rotation=15)
    ax2.set_ylabel("validation loss (completion-only)")
    ax2.set_title("after 50 steps x 8")
    disturbed = {n: summary["table"][n].get("disturbed_runs", 0) for n in names}
    if any(disturbed.values()):
        worst = max(summary["table"][n].get("other_cores_during_run_max", 0.0) for n in names)
        subtitle += (f"\nDISTURBED: other processes used up to {worst:.1f} of the 2 cores during "
                     f"{sum(disturbed.values())} of {sum(len(results[n]) for n in names)} runs: not a valid throughput measurement")
    fig.suptitle(subtitle, fontsize=9, color="#c53030" if any(disturbed.values()) else "black")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=3, help="runs per contender (interleaved)")
    p.add_argument("--skip-llamafactory", action="store_true", help="leave LLaMA-Factory out")
    p.add_argument("--with-defaults", action="store_true", help="also run TRL and LLaMA-Factory at their defaults")
    p.add_argument("--with-eager", action="store_true", help="also run TRL and LLaMA-Factory with eager attention")
    p.add_argument("--with-control", action="store_true",
                   help="also run ours with padding_free=True (batches packed into rows) as a control")
    p.add_argument("--only", nargs="+", choices=list(CONTENDERS), help="run just these contenders")
    p.add_argument("--work-dir", type=Path, default=DEFAULT_WORK_DIR)
    p.add_argument("--seed", type=int, default=SEED)
    p.add_argument("--data", type=Path, help="an SFT data file to use instead of the demo data "
                   "(e.g. ../shared/data/sft/alpaca.jsonl); use another --work-dir, --results and --plot")
    p.add_argument("--row-tokens", metavar="LO-HI",
                   help="keep only the conversations LO-HI tokens long (e.g. 150-250 with alpaca: long rows)")
    p.add_argument("--pad-vocab", type=int, default=4096,
                   help="pad the model's (tied) embedding to this many rows; 0 = the tokenizer's own size")
    p.add_argument("--max-load", type=float, default=1.5, help="1-min load average allowed before the first run")
    p.add_argument("--max-busy", type=float, default=0.5, help="cores other processes may keep busy before a run")
    p.add_argument("--max-wait", type=float, default=1200,
                   help="seconds the whole benchmark may spend waiting for a quiet machine; then it measures "
                        "anyway and flags disturbed runs")
    p.add_argument("--poll", type=float, default=60)
    p.add_argument("--max-other", type=float, default=0.25,
                   help="a run during which other processes used more cores than this is redone")
    p.add_argument("--retries", type=int, default=3, help="redos of a disturbed run before keeping it (flagged)")
    p.add_argument("--results", type=Path, default=RESULTS_PATH)
    p.add_argument("--plot", type=Path, default=PLOT_PATH)
    # internal: the child that runs our stage
    p.add_argument("--child", choices=["ours", "ours-packed"], help=argparse.SUPPRESS)
    p.add_argument("--spec", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--replot", action="store_true", help="redraw --plot from --results and print the table")
    args = p.parse_args(argv)

    if args.replot:
        saved = json.loads(args.results.read_text(encoding="utf-8"))
        print_table(saved["summary"])
        print(markdown_table(saved["summary"]))
        plot(saved["summary"], saved["runs"], args.plot, saved.get("plot_subtitle", ""))
        return 0
    if args.child:
        run_ours(args.spec, args.out, args.result, padding_free=True if args.child == "ours-packed" else None)
        return 0

    if args.only:
        contenders = list(args.only)
    else:
        contenders = ["ours", "trl", "llamafactory"]
        if args.with_control:
            contenders.insert(1, "ours-packed")
        if args.with_defaults:
            contenders += ["trl-defaults", "llamafactory-defaults"]
        if args.with_eager:
            contenders += ["trl-eager", "llamafactory-eager"]
        if args.skip_llamafactory:
            contenders = [c for c in contenders if not c.startswith("llamafactory")]
    for k, v in CHILD_ENV.items():
        os.environ.setdefault(k, v)

    work = args.work_dir.resolve()
    print(f"setup under {work}", flush=True)
    setup = build_setup(work, args.seed, args.pad_vocab, args.data.resolve() if args.data else None,
                        row_tokens=tuple(int(x) for x in args.row_tokens.split("-")) if args.row_tokens else None)
    spec_path = work / "spec.json"
    m = setup["model"]
    print(f"tiny Llama: {m['parameters']:,} parameters (vocab {m['vocab']}, tokenizer {m['tokenizer_tokens']} tokens, "
          f"hidden {m['hidden']}, "
          f"{m['layers']} layers, {m['heads']} heads, tied embeddings); train {setup['data']['train_records']} / "
          f"val {setup['data']['val_records']} records", flush=True)

    sys.path.insert(0, str(ROOT))
    from transformers import AutoTokenizer

    from tuneline.records import read_records
    from tuneline.train.common import tokenize_chat

    tokenizer = AutoTokenizer.from_pretrained(setup["spec"]["base_model"])
    val_data = tokenize_chat(tokenizer, read_records(setup["spec"]["val"]), MAX_LENGTH)
    train_ref = tokenize_chat(tokenizer, read_records(setup["spec"]["ours_train"]), MAX_LENGTH)
    base_val = validation_loss(setup["spec"]["base_model"], None, val_data)

    results: dict[str, list[dict]] = {c: [] for c in contenders}
    discarded: list[dict] = []
    need_quiet = True  # wait before the first run and after a disturbed one; otherwise go straight on
    wait_budget = float(args.max_wait)  # seconds of waiting left for the whole benchmark
    tokenization: dict[str, Any] = {}
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    for run in range(1, args.runs + 1):
        for c in contenders:
            for attempt in range(1, args.retries + 2):
                if need_quiet:
                    machine = wait_for_quiet(args.max_load, args.max_busy, wait_budget, args.poll,
                                             check_loadavg=(run == 1 and c == contenders[0] and attempt == 1))
                    wait_budget = max(0.0, wait_budget - machine["waited_s"])
                else:  # no idle gap between back-to-back runs: other jobs waiting for an idle CPU stay queued
                    machine = {"loadavg": [round(x, 2) for x in os.getloadavg()], "busy_cores_before": None,
                               "waited_s": 0, "quiet": None}
                busy = machine["busy_cores_before"]
                print(f"run {run}/{args.runs} {c:22s} (load {machine['loadavg'][0]:.2f}"
                      + (f", {busy:.2f} cores busy)" if busy is not None else ")"), end=" ", flush=True)
                r = run_child(c, spec_path, work, run)
                r.update(machine, attempt=attempt)
                r["contaminated"] = r["other_cores_during_run"] > args.max_other
                need_quiet = r["contaminated"]
                if not r["contaminated"] or attempt == args.retries + 1 or wait_budget <= 0:
                    break
                discarded.append({"contender": c, "run": run, "attempt": attempt,
                                  "tokens_per_second": r["tokens_per_second"],
                                  "other_cores_during_run": r["other_cores_during_run"]})
                print(f"-> discarded ({r['tokens_per_second']:,.0f} tok/s; others used "
                      f"{r['other_cores_during_run']:.2f} cores > {args.max_other}), retrying", flush=True)
            r["val_loss"] = validation_loss(setup["spec"]["base_model"], r["adapter_dir"], val_data)
            dump = work / "runs" / f"{c}-{run}" / "train_dataset.jsonl"
            if c not in tokenization:  # the data never changes between runs: check the first
                tokenization[c] = compare_tokenization(train_ref, dump) if dump.exists() else {"identical": None}
            results[c].append(r)
            print(f"-> {r['tokens_per_second']:,.0f} real tok/s ({r['real_tokens']:,} tokens in "
                  f"{r['train_seconds']:.2f} s), val loss {r['val_loss']:.4f}, "
                  f"others used {r['other_cores_during_run']:.2f} cores", flush=True)

    summary = report(contenders, results, base_val)
    print(f"# {_cpu()}")
    print_table(summary)
    for c, t in tokenization.items():
        print(f"tokenization {c}: {t}")
    print()
    print(markdown_table(summary))
    versions_seen = {c: results[c][0]["versions"] for c in contenders}
    payload = {
        "benchmark": "sft_throughput",
        "started": started,
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": "python bench/sft_throughput.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "processor": platform.processor(),
                    "cpu": _cpu()},
        "workload": {**setup["spec"], "model": setup["model"], "data": setup["data"]},
        "method": {
            "timing": "perf_counter between TrainerCallback.on_train_begin and on_train_end, in every contender",
            "tokens": "state.num_input_tokens_seen with include_num_input_tokens_seen='non_padding' "
                      "(sum of each consumed batch's attention mask), in every contender",
            "val_loss": "token-weighted completion-only CE on the validation split, base + adapter in fp32, "
                        "computed by this script for every contender",
            "interleaving": "runs go ours, trl, llamafactory, ours, ... each in its own subprocess",
            "quiet": "before the first run and after a disturbed one: other processes keep <= max_busy cores "
                     "busy (3 s /proc/stat sample) and, before the first run, 1-min load average <= max_load "
                     "(polled every `poll` s; max_wait s of waiting in all); undisturbed runs follow back to "
                     "back; a run during which other "
                     "processes used > max_other cores (/proc/stat busy minus the child's own CPU time) is "
                     "redone up to `retries` times, then kept and flagged `contaminated`",
            "thresholds": {"max_load": args.max_load, "max_busy": args.max_busy, "max_other": args.max_other,
                           "retries": args.retries, "max_wait_s": args.max_wait},
        },
        "contenders": {c: CONTENDERS[c] for c in contenders},
        "versions": versions_seen,
        "tokenization_vs_ours": tokenization,
        "discarded_runs": discarded,
        "summary": summary,
        "runs": results,
    }
    subtitle = (f"tiny Llama {m['parameters'] / 1e6:.1f} M params, LoRA r={LORA_R} all linear, batch {BATCH}, "
                f"max len {MAX_LENGTH}, {STEPS} steps, {args.runs} interleaved runs, {os.cpu_count()} CPU cores")
    payload["plot_subtitle"] = subtitle
    write_json(args.results, payload)
    plot(summary, results, args.plot, subtitle)
    print(f"wrote {args.results} and {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
