"""Custom classifier against prompt template, measured: macro-F1 against examples per class, per approach.

For each dataset (the recipes configs/banking77.yaml and configs/sst2.yaml: the real BANKING77 and SST-2 samples
in ../shared/data/classification/), the recipe's own ingest, validation and stratified leak-free split; then,
on train subsets of k examples per class (seeded) and on the whole train split, all scored on the same test split:

* ``probe``: the floor, logistic regression on frozen, mean-pooled, normalized MiniLM embeddings;
* ``classifier/<strategy>``: the MiniLM sequence classifier (mean pooling, head initialized as the probe,
  early stopping on validation macro-F1) for each ``--strategies`` entry;
* ``template/<k>-shot``: the prompt-template arm on the offline tiny causal LM (built and pretrained here on the
  recipe's corpus, ``--lm-steps`` steps), label names scored by log-likelihood, on ``--template-examples`` rows;
* ``template/tuned``: that LM instruction-tuned on the template (``train_sft``, ``--tune-steps`` steps on the train
  split's zero-shot prompts with the label names as answers), scored the same way;
* ``ensemble``: short/mid/long members (the recipe's ``ensemble_max_lengths``) at the largest size.

Each dataset gets an equal share of ``--budget-min``; runs past it are skipped (and recorded as skipped), so the
bench always ends. The whole train split runs first.
Writes bench/results/classifier_vs_template.json (after every run), docs/classifier_learning_curve.png and
the table in docs/classifier_results.md.

    python bench/classifier_vs_template.py [--datasets banking77,sst2] [--sizes 4,16,all] \\
        [--strategies head,top_layers] [--max-steps 80] [--budget-min 25]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import random
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "bench" / "results" / "classifier_vs_template.json"
PLOT = ROOT / "docs" / "classifier_learning_curve.png"
TABLE = ROOT / "docs" / "classifier_results.md"


def load_dataset(name: str) -> tuple[Any, dict[str, Any]]:
    """(recipe, {train, validation, test}: Examples) through the recipe's ingest, validation and split."""
    from tuneline.classify.data import examples_from_records
    from tuneline.data.ingest import read_source
    from tuneline.data.split import plan_splits
    from tuneline.data.validate import validate_records
    from tuneline.params import load_recipe
    from tuneline.paths import resolve

    recipe = load_recipe(ROOT / "configs" / f"{name}.yaml")
    records, rejected = [], []
    for source in recipe.data.sources:
        result = read_source(dataclasses.replace(source, path=str(resolve(source.path))))
        records += result.records
        rejected += result.rejected
    checked = validate_records(records, dataclasses.replace(recipe.validation, min_accepted=0),
                               parse_rejections=rejected)
    plan = plan_splits(checked.accepted, recipe.split, recipe.seed, new_sources=set(), replay_ratio=0.0,
                       reference_size=10)
    splits = {k: examples_from_records(plan.result.splits[k], k) for k in ("train", "validation", "test")}
    return recipe, {**splits, "quarantined": len(checked.quarantined)}


def per_class_subset(train: Any, k: Optional[int], seed: int) -> Any:
    if k is None:
        return train
    rng = random.Random(seed)
    by_label: dict[str, list[int]] = {}
    for i, label in enumerate(train.labels):
        by_label.setdefault(label, []).append(i)
    chosen = [i for rows in by_label.values() for i in rng.sample(rows, min(k, len(rows)))]
    return train.subset(sorted(chosen))


def tiny_lm(work: Path, corpus: list[str], steps: int) -> tuple[Any, Any, Path]:
    """The offline tiny causal LM the template arm scores with (built once, reused), and its directory."""
    from tuneline.models.loading import load_causal_lm, load_tokenizer
    from tuneline.models.provision import provision_base_model
    from tuneline.params import ModelParams, PretrainParams

    out = work / f"tiny_lm_{steps}"
    if not (out / "config.json").is_file():
        provision_base_model(ModelParams(build="tiny"), PretrainParams(steps=steps, batch_size=16, seq_len=128),
                             corpus, out, seed=0)
    return load_causal_lm(out), load_tokenizer(out), out


def tuned_lm(lm_dir: Path, tokenizer: Any, train: Any, val: Any, labels: Any, params: Any, out: Path, steps: int,
             seed: int) -> Any:
    """The instruction-tuned variant: the tiny LM fine-tuned (full, the existing SFT stage's ``train_sft``) on the
    train split's zero-shot prompts with the label names as answers; (model, tokenizer)."""
    from tuneline.classify.template import template_records
    from tuneline.params import SftParams
    from tuneline.train.sft import load_trained, train_sft

    def records(examples: Any) -> list[Any]:
        return template_records(examples, template=params.template.template, labels=labels, tokenizer=tokenizer,
                                max_length=params.template.max_length, names=params.label_names)

    sft = SftParams(method="full", learning_rate=1e-3, epochs=1000.0, batch_size=16, eval_steps=max(1, steps // 4),
                    save_steps=max(1, steps // 4), max_length=params.template.max_length, group_by_length=True)
    result = train_sft(lm_dir, records(train), records(val.subset(range(min(64, len(val))))), sft, out, seed=seed,
                       max_steps=steps)
    return load_trained(lm_dir, result.output_dir)


def headline(rep: dict[str, Any]) -> dict[str, Any]:
    ci = rep["ci"]
    return {"accuracy": rep["accuracy"], "macro_f1": rep["macro_f1"], "macro_f1_low": ci["macro_f1"]["low"],
            "macro_f1_high": ci["macro_f1"]["high"], "ece": rep["ece"], "n": rep["n"]}


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--datasets", default="banking77,sst2")
    ap.add_argument("--sizes", default="4,16,all", help="examples per class of the train subsets (all = whole split)")
    ap.add_argument("--strategies", default="head,top_layers")
    ap.add_argument("--max-steps", type=int, default=80, help="cap on each classifier's optimizer steps")
    ap.add_argument("--steps-not-epochs", action="store_true",
                    help="raise the recipe's epochs so that every run can reach --max-steps (small subsets otherwise "
                         "stop after a few steps: 8 examples at batch 32 are one step per epoch); early stopping "
                         "still applies")
    ap.add_argument("--template-examples", type=int, default=150, help="test rows the template arm scores")
    ap.add_argument("--template-shots", default="0,4")
    ap.add_argument("--lm-steps", type=int, default=150, help="pretraining steps of the tiny causal LM")
    ap.add_argument("--tune-steps", type=int, default=0,
                    help="SFT steps of the instruction-tuned template variant (0, the default: not run; it is one "
                         "run the time budget cannot cut short, and BANKING77's 512-token prompts take ~20 s a step)")
    ap.add_argument("--bootstrap", type=int, default=1000)
    ap.add_argument("--budget-min", type=float, default=25.0, help="skip the remaining runs after this many minutes")
    ap.add_argument("--work", default=str(ROOT / ".tuneline" / "bench_classifier"))
    ap.add_argument("--arms", default="probe,classifier,template,ensemble", help="which approaches to run")
    ap.add_argument("--results", default=str(RESULTS), help="where this run's JSON goes")
    ap.add_argument("--merge", nargs="*", default=[], help="earlier results JSON whose runs join the table and plot")
    ap.add_argument("--table-only", action="store_true",
                    help="run nothing: rewrite the table and the plot from --results and --merge")
    args = ap.parse_args(argv)
    arms = set(args.arms.split(","))
    out_json = Path(args.results)
    if args.table_only:
        merged = merge_results(json.loads(out_json.read_text(encoding="utf-8")), out_json.name, args.merge)
        plot(merged)
        TABLE.write_text(table(merged), encoding="utf-8")
        return 0

    import numpy as np

    from tuneline.classify.data import LabelSet
    from tuneline.classify.ensemble import combine, validation_weights
    from tuneline.classify.evaluate import evaluate_model, evaluate_probs
    from tuneline.classify.model import encoder_path
    from tuneline.classify.probe import embed_texts
    from tuneline.classify.template import choose_shots, template_probs
    from tuneline.classify.train import fit_classifier

    started = time.perf_counter()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    sizes = [None if s == "all" else int(s) for s in args.sizes.split(",")]
    results: dict[str, Any] = {"args": vars(args), "machine": {"python": platform.python_version(),
                               "cpu_flags": _cpu_flags()}, "datasets": {}, "skipped": []}
    encoder = encoder_path(None)

    datasets = args.datasets.split(",")
    clock = {"start": started}

    def left() -> bool:  # each dataset gets an equal share of the budget
        return (time.perf_counter() - clock["start"]) / 60 < args.budget_min / len(datasets)

    def save() -> None:
        results["seconds"] = round(time.perf_counter() - started, 1)
        out_json.parent.mkdir(parents=True, exist_ok=True)
        out_json.write_text(json.dumps(results, indent=1, default=float), encoding="utf-8")

    for name in datasets:
        clock["start"] = time.perf_counter()
        recipe, data = load_dataset(name)
        params = recipe.classifier
        train, val, test = data["train"], data["validation"], data["test"]
        labels = LabelSet.from_labels(train.labels)
        entry: dict[str, Any] = {"n_train": len(train), "n_val": len(val), "n_test": len(test), "n_labels": len(labels),
                                 "quarantined": data["quarantined"], "runs": []}
        results["datasets"][name] = entry
        print(f"{name}: train {len(train)} val {len(val)} test {len(test)}, {len(labels)} labels", flush=True)
        t = time.perf_counter()
        if "probe" in arms:
            vectors = embed_texts(list(train.texts) + list(test.texts))
            train_vec, test_vec = vectors[:len(train)], vectors[len(train):]
        entry["embed_seconds"] = round(time.perf_counter() - t, 1)

        def record(approach: str, size: Optional[int], rep: dict[str, Any], **extra: Any) -> None:
            row = {"approach": approach, "per_class": size or "all", "train_examples": extra.pop("n", None),
                   **headline(rep), **extra}
            entry["runs"].append(row)
            print(f"  {approach:<22} per class {str(size or 'all'):>4}: macro-F1 {row['macro_f1']:.4f} "
                  f"[{row['macro_f1_low']:.4f}, {row['macro_f1_high']:.4f}]  ({extra.get('seconds', 0):.0f} s)",
                  flush=True)
            save()

        def run_size(size: Optional[int]) -> None:
            sub = per_class_subset(train, size, recipe.seed)
            idx = [train.texts.index(x) for x in sub.texts] if size is not None else list(range(len(train)))
            from sklearn.linear_model import LogisticRegression

            t = time.perf_counter()
            if "probe" in arms:
                clf = LogisticRegression(C=10.0, max_iter=2000, random_state=recipe.seed)
                clf.fit(train_vec[idx], np.asarray(labels.encode(sub.labels)))
                probs = np.zeros((len(test), len(labels)))
                probs[:, clf.classes_] = clf.predict_proba(test_vec)
                record("probe", size, evaluate_probs(probs, test, labels, name="probe", samples=args.bootstrap),
                       n=len(sub), seconds=time.perf_counter() - t)
            for strategy in (args.strategies.split(",") if "classifier" in arms else []):
                if not left():
                    results["skipped"].append(f"{name} classifier/{strategy} per class {size or 'all'}")
                    continue
                t = time.perf_counter()
                p = dataclasses.replace(params, max_steps=args.max_steps)
                if args.steps_not_epochs:
                    per_epoch = -(-len(sub) // params.batch_size)
                    p = dataclasses.replace(p, epochs=max(params.epochs, args.max_steps / per_epoch))
                out = work / name / f"{strategy}_{size or 'all'}"
                result, model, tok = fit_classifier(encoder, sub, val, p, out, strategy=strategy, seed=recipe.seed)
                rep, _ = evaluate_model(model, tok, labels, test, name=strategy, max_length=p.max_length,
                                        samples=args.bootstrap, timing=size is None, bf16=result.bf16)
                record(f"classifier/{strategy}", size, rep, n=len(sub), seconds=time.perf_counter() - t,
                       steps=result.global_step, best_step=result.best_step, train_seconds=result.train_seconds,
                       latency=rep.get("latency"))
        ordered = sorted(sizes, key=lambda k: -1 if k is None else k)  # the whole split first, then the template arm
        run_size(ordered[0])
        if "template" in arms and left():  # the template arm, on the largest size's train split for the few-shot examples
            t = time.perf_counter()
            from tuneline.monitoring.drift import texts_from_file
            from tuneline.paths import resolve

            corpus = [x for c in recipe.data.corpus for x in texts_from_file(resolve(c))]
            lm, lm_tok, lm_dir = tiny_lm(work, corpus, args.lm_steps)
            entry["lm_build_seconds"] = round(time.perf_counter() - t, 1)
            few = test.subset(range(min(args.template_examples, len(test))))
            for k in [int(x) for x in args.template_shots.split(",")]:
                if not left():
                    results["skipped"].append(f"{name} template {k}-shot")
                    continue
                t = time.perf_counter()
                shots = choose_shots(train, k, recipe.seed, params.label_names)
                probs = template_probs(lm, lm_tok, few.texts, labels, template=params.template.template, shots=shots,
                                       names=params.label_names, max_length=params.template.max_length)
                record(f"template/{k}-shot", None, evaluate_probs(probs, few, labels, name="t", samples=args.bootstrap),
                       n=len(train), seconds=time.perf_counter() - t, test_rows=len(few))
            if args.tune_steps and left():  # the template's prompts as SFT data, then scored zero-shot
                t = time.perf_counter()
                tuned, tuned_tok = tuned_lm(lm_dir, lm_tok, train, val, labels, params, work / name / "template_tuned",
                                            args.tune_steps, recipe.seed)
                probs = template_probs(tuned, tuned_tok, few.texts, labels, template=params.template.template,
                                       names=params.label_names, max_length=params.template.max_length, chat=True)
                record("template/tuned", None, evaluate_probs(probs, few, labels, name="t", samples=args.bootstrap),
                       n=len(train), seconds=time.perf_counter() - t, test_rows=len(few), steps=args.tune_steps)
            elif args.tune_steps:
                results["skipped"].append(f"{name} template/tuned")
        elif "template" in arms:
            results["skipped"].append(f"{name} template arm")
        for size in ordered[1:]:
            run_size(size)
        if "ensemble" in arms and left():  # the ensemble at the whole train split, with the first strategy
            strategy = args.strategies.split(",")[0]
            t = time.perf_counter()
            members, val_scores, reps = [], [], {}
            for length in params.ensemble_max_lengths:
                p = dataclasses.replace(params, max_steps=args.max_steps, max_length=length)
                result, model, tok = fit_classifier(encoder, train, val, p, work / name / f"ens_{strategy}_{length}",
                                                    strategy=strategy, seed=recipe.seed)
                rep, probs = evaluate_model(model, tok, labels, test, name=f"m{length}", max_length=length,
                                            samples=args.bootstrap, timing=False, bf16=result.bf16)
                members.append(probs)
                val_scores.append(result.best_val_macro_f1)
                reps[length] = headline(rep)
            weights = validation_weights(val_scores)
            best = params.ensemble_max_lengths[int(np.argmax(val_scores))]
            record("ensemble", None, evaluate_probs(combine(members, weights), test, labels, name="ensemble",
                                                    samples=args.bootstrap), n=len(train),
                   seconds=time.perf_counter() - t, strategy=strategy, weights=weights, members=reps,
                   best_member=best)
        elif "ensemble" in arms:
            results["skipped"].append(f"{name} ensemble")
    save()
    merged = merge_results(results, out_json.name, args.merge)
    plot(merged)
    TABLE.write_text(table(merged), encoding="utf-8")
    print(f"done in {results['seconds']:.0f} s; skipped: {results['skipped'] or 'nothing'}")
    return 0


def _cpu_flags() -> list[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    return sorted({f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f" {f}" in text})


def merge_results(results: dict[str, Any], name: str, extra_files: Sequence[str]) -> dict[str, Any]:
    """This run's results with the runs of earlier results files; every run names the file it came from, and a
    run skipped in one file but measured in another is no longer listed as skipped."""
    merged = json.loads(json.dumps(results))
    for entry in merged["datasets"].values():
        for run in entry["runs"]:
            run.setdefault("source", name)
    merged["skipped"] = [f"{x} (in {name})" for x in merged["skipped"]]
    for extra in extra_files:
        other = json.loads(Path(extra).read_text(encoding="utf-8"))
        for dataset, entry in other["datasets"].items():
            for run in entry["runs"]:
                run.setdefault("source", Path(extra).name)
            if dataset in merged["datasets"]:
                merged["datasets"][dataset]["runs"] += entry["runs"]
            else:
                merged["datasets"][dataset] = entry
        merged["skipped"] += [f"{x} (in {Path(extra).name})" for x in other["skipped"]]
    measured = {f"{d} {r['approach']}{suffix}" for d, e in merged["datasets"].items() for r in e["runs"]
                for suffix in ("", f" per class {r['per_class']}")}
    measured |= {f"{d} template arm" for d, e in merged["datasets"].items()
                 if any(r["approach"].startswith("template/") for r in e["runs"])}
    merged["skipped"] = [x for x in merged["skipped"] if x.split(" (in ")[0] not in measured]
    return merged


def table(results: dict[str, Any]) -> str:
    lines = []
    for name, entry in results["datasets"].items():
        lines += [f"### {name} (train {entry['n_train']}, test {entry['n_test']}, {entry['n_labels']} labels)", "",
                  "| approach | per class | train rows | accuracy | macro-F1 [95% CI] | ECE | seconds | results file |",
                  "|---|---:|---:|---:|---:|---:|---:|---|"]
        for r in entry["runs"]:
            rows = r.get("test_rows")
            lines.append(f"| {r['approach']}{f' ({rows} test rows)' if rows else ''} | {r['per_class']} | "
                         f"{r['train_examples']} | {r['accuracy']:.3f} | {r['macro_f1']:.3f} "
                         f"[{r['macro_f1_low']:.3f}, {r['macro_f1_high']:.3f}] | {r['ece']:.3f} | "
                         f"{r.get('seconds', 0):.0f} | {r.get('source', '')} |")
        lines.append("")
    if results["skipped"]:
        lines.append("Skipped (time budget): " + "; ".join(results["skipped"]))
    return "\n".join(lines) + "\n"


def plot(results: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results["datasets"])
    fig, axes = plt.subplots(1, len(names), figsize=(6 * len(names), 4.5), squeeze=False)
    for ax, name in zip(axes[0], names):
        entry = results["datasets"][name]
        full = entry["n_train"] / entry["n_labels"]
        by: dict[str, dict[float, float]] = {}
        for r in entry["runs"]:  # one point per approach and size: a later results file's run replaces an earlier's
            x = full if r["per_class"] == "all" else float(r["per_class"])
            by.setdefault(r["approach"], {})[x] = r["macro_f1"]
        for approach, points in sorted(by.items()):
            pts = sorted(points.items())
            style = "o--" if approach.startswith("template") or approach == "ensemble" else "o-"
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=approach)
        ax.set_xscale("log")
        ax.set_xlabel("train examples per class (log)")
        ax.set_ylabel("test macro-F1")
        ax.set_title(name)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    PLOT.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(PLOT, dpi=90)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
