"""The anneal experiment: from one checkpoint, anneal on general data, on general data + the task, or on the
task alone (docs/EXPERIMENTS.md).

Contract of `run_anneal_experiment(out, quick=False, seed=0, task_share=0.3, progress="auto")`:
- general data is English prose (`pydoc_data.topics`) and Python source (the standard library), split by
  topic / module (`keepmix.demo.data.build_demo_data`); the task is generated (a seeded RNG): tell
  whether a 48-character snippet is prose or code (snippets of the training documents to train on, of
  the held-out ones to score), scored as a multiple choice between the two (`kind: multiple_choice`,
  accuracy; chance 50 %) and by greedy generation (`kind: generation`, exact match); one BPE tokenizer is trained on all three; all under `<out>/data/`;
- one `keepmix sweep` (`<out>/anneal.yaml`, arms in `<out>/anneal/`): its branch prefix trains a tiny
  Llama from scratch on general data only at a constant LR (the stable phase); from that checkpoint (the
  weights and the AdamW moments) three arms anneal for the same steps of the same rows, the LR falling
  linearly from the peak to 0: `general` (the control), `mix` (general + `task_share` of task rows) and
  `task` (task rows only);
- reads the task metrics (choice accuracy, exact match, the task's held-out loss and token accuracy) and the general
  sources' held-out loss and token accuracy at the checkpoint and at each arm's end; retention = each
  general metric at the end minus at the checkpoint (and minus the control's end);
- prints the table and a reading computed from the numbers, writes `<out>/anneal.md`, `anneal.json`,
  `anneal.png`, and returns the summary. Same seed and scale: the same numbers (completed arms reused).
`run_anneal(out, scale)` takes the scale explicitly (tests use it).
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from keepmix.errors import KeepmixError
from keepmix.experiments.sweepfile import eval_at, run_sweep_spec
from keepmix.experiments.tiny import TINY_FULL, TINY_QUICK, TinyModel, train_tokenizer, write_records

GENERAL = ("prose", "code")
TASK = "kind"
ARMS = ("general", "mix", "task")
METRIC = f"task/{TASK}_choice/acc"  # the right kind of the two, by log-likelihood (chance 50 %)
EXACT = f"task/{TASK}/exact_match"  # the kind generated greedily


@dataclass(frozen=True)
class AnnealScale:
    tiny: TinyModel  # the model; tiny.steps = the steps of the stable phase before the checkpoint
    anneal_steps: int  # steps of every arm
    task_share: float = 0.3  # of the mix arm's rows
    task_items: int = 4000  # training items of the task (each ~20 tokens: several per packed row)
    task_eval_items: int = 128  # held-out items, scored as a multiple choice and by exact match
    warmup: int = 4  # steps of the stable phase
    code_docs: int = 800
    chunk_chars: int = 600
    seed: int = 0
    threads: int | None = 1


QUICK = AnnealScale(tiny=replace(TINY_QUICK, steps=300, valid_docs=32), anneal_steps=80)
FULL = AnnealScale(tiny=replace(TINY_FULL, steps=600, valid_docs=48), anneal_steps=200, task_eval_items=256)


def kind_items(docs: dict[str, list[str]], n: int, seed: int, chars: int = 48) -> list[dict]:
    """n items "Text: <snippet>\nKind:" → "prose" or "code" (alternating, then shuffled): a window of `chars`
    characters at a seeded place in a seeded document of that kind, whitespace collapsed. Same seed, same
    items; each lists both kinds as its choices for the multiple-choice form."""
    rng = random.Random(f"kind/{seed}")
    out = []
    for i in range(n):
        kind = GENERAL[i % len(GENERAL)]
        doc = rng.choice(docs[kind])
        start = rng.randrange(max(1, len(doc) - chars))
        text = " ".join(doc[start:start + chars].split())
        out.append({"prompt": f"Text: {text}\nKind:", "answer": kind, "choices": list(GENERAL),
                    "gold": GENERAL.index(kind)})
    rng.shuffle(out)
    return out


def check_scale(scale: AnnealScale) -> None:
    problems = []
    if not 0 < scale.task_share < 1:
        problems.append(f"task_share {scale.task_share!r} lies outside (0, 1): the mix arm needs both general "
                        f"and task rows (0 is the general arm, 1 the task arm)")
    if scale.anneal_steps < 1 or scale.tiny.steps < 1:
        problems.append(f"steps: stable phase {scale.tiny.steps}, anneal {scale.anneal_steps}; expected at least 1 each")
    if scale.task_items < 1 or scale.task_eval_items < 1:
        problems.append(f"task items: {scale.task_items} train, {scale.task_eval_items} held out; expected at least 1")
    if problems:
        raise KeepmixError("anneal experiment: " + "; ".join(problems))


def write_data(folder: Path, scale: AnnealScale) -> dict[str, Path]:
    """General data, the task (train as prompt/completion, held out as generation items), the tokenizer."""
    from keepmix.demo.data import build_demo_data

    data = build_demo_data(folder, seed=scale.seed, prose_chunk_chars=scale.chunk_chars,
                           code_chunk_chars=scale.chunk_chars, code_max_docs=scale.code_docs,
                           code_valid_docs=scale.tiny.valid_docs)
    def texts_of(path: Path) -> list[str]:
        return [json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines()]

    # snippets of training documents to train on, of held-out documents (other topics, modules) to score
    train = kind_items({"prose": texts_of(data.prose_train), "code": texts_of(data.code_train)}, scale.task_items,
                       scale.seed)
    held = kind_items({"prose": texts_of(data.prose_valid), "code": texts_of(data.code_valid)},
                      scale.task_eval_items, scale.seed + 1)
    task_train = write_records(folder / "task_train.jsonl", [{"prompt": t["prompt"], "completion": " " + t["answer"]}
                                                              for t in train])
    task_valid = write_records(folder / "task_valid.jsonl", [{"prompt": t["prompt"], "completion": " " + t["answer"]}
                                                              for t in held])
    task_eval = write_records(folder / "task_eval.jsonl", held)
    texts = texts_of(data.prose_train) + texts_of(data.code_train) + [t["prompt"] + " " + t["answer"] for t in train]
    tokenizer = train_tokenizer(texts, scale.tiny.vocab_size, folder / "tokenizer")
    return {"tokenizer": tokenizer, "prose_train": data.prose_train, "prose_valid": data.prose_valid,
            "code_train": data.code_train, "code_valid": data.code_valid, "task_train": task_train,
            "task_valid": task_valid, "task_eval": task_eval}


def arm_weights(scale: AnnealScale) -> dict[str, dict[str, float]]:
    general = {s: 1.0 / len(GENERAL) for s in GENERAL}
    mix = {s: (1.0 - scale.task_share) / len(GENERAL) for s in GENERAL}
    return {"general": {**general, TASK: 0.0}, "mix": {**mix, TASK: scale.task_share},
            "task": {**{s: 0.0 for s in GENERAL}, TASK: 1.0}}


def sweep_spec(files: dict[str, Path], scale: AnnealScale, cache: Path) -> dict:
    tiny = scale.tiny
    weights = arm_weights(scale)
    run = {"model": {"init": "scratch", "tokenizer": str(files["tokenizer"]), "architecture": dict(tiny.architecture)},
           "sources": [*({"name": s, "path": str(files[f"{s}_train"]), "valid_path": str(files[f"{s}_valid"])}
                         for s in GENERAL),
                       {"name": TASK, "path": str(files["task_train"]), "valid_path": str(files["task_valid"]),
                        "format": "prompt_completion", "loss_on": "completion"}],
           "mixture": {"schedule": [{"at": 0.0, "weights": weights["mix"]}]},
           # the arms' schedule: no re-warmup, linear to zero (the anneal); the prefix overrides it
           "train": {"seq_len": tiny.seq_len, "batch_size": tiny.batch_size, "steps": tiny.steps + scale.anneal_steps,
                     "lr": tiny.lr, "lr_schedule": "linear", "warmup": 0, "min_lr_ratio": 0.0, "seed": scale.seed,
                     "threads": scale.threads, "checkpoint_every": None, "keep_checkpoints": 1},
           "eval": {"every": None, "batch_size": 16, "kl_to_base": False,
                    "tasks": [{"name": f"{TASK}_choice", "kind": "multiple_choice", "path": str(files["task_eval"]),
                               "context_field": "prompt", "batch_size": 32},
                              {"name": TASK, "kind": "generation", "path": str(files["task_eval"]),
                               "max_new_tokens": 4, "stop": ["\n"], "batch_size": 32}]},
           "cache_dir": str(cache)}
    return {"run": run, "output": "anneal",
            "arms": {name: {"mixture.weights": weights[name]} for name in ARMS},
            "branch": {"at": tiny.steps, "optimizer": True,
                       "set": {"mixture.weights": weights["general"], "train.lr_schedule": "constant",
                               "train.warmup": scale.warmup, "eval.every": tiny.steps}},
            "answer": {"task": [METRIC], "keep": [f"valid/{s}/token_acc" for s in GENERAL]}}


# ---- the table --------------------------------------------------------------------------------------

def _metrics() -> list[str]:
    return [METRIC, EXACT, f"valid/{TASK}/loss", f"valid/{TASK}/token_acc",
            *(f"valid/{s}/{m}" for s in GENERAL for m in ("loss", "token_acc"))]


def summarize(checkpoint: dict, ends: dict[str, dict]) -> dict:
    """Each arm's metrics at its end, and the general metrics' change vs the checkpoint and vs the control."""
    rows = {}
    for arm, m in ends.items():
        row = {k: m[k] for k in _metrics()}
        for s in GENERAL:
            for metric in ("loss", "token_acc"):
                key = f"valid/{s}/{metric}"
                row[f"{key}/vs_checkpoint"] = m[key] - checkpoint[key]
                row[f"{key}/vs_control"] = m[key] - ends["general"][key]
        rows[arm] = row
    return {"checkpoint": {k: checkpoint[k] for k in _metrics()}, "rows": rows}


def table(s: dict) -> list[str]:
    lines = ["| anneal | task choice acc (%) | task exact match (%) | task loss | task token acc (%) | prose loss (Δ ckpt) | "
             "prose token acc (%, Δ ckpt) | code loss (Δ ckpt) | code token acc (%, Δ ckpt) |",
             "|---|---|---|---|---|---|---|---|---|"]
    c = s["checkpoint"]
    lines.append(f"| checkpoint (before) | {100 * c[METRIC]:.1f} | {100 * c[EXACT]:.1f} | {c[f'valid/{TASK}/loss']:.3f} | "
                 f"{100 * c[f'valid/{TASK}/token_acc']:.1f} | " +
                 " | ".join(f"{c[f'valid/{g}/loss']:.3f} | {100 * c[f'valid/{g}/token_acc']:.1f}" for g in GENERAL) + " |")
    for arm, r in s["rows"].items():
        general = " | ".join(f"{r[f'valid/{g}/loss']:.3f} ({r[f'valid/{g}/loss/vs_checkpoint']:+.3f}) | "
                             f"{100 * r[f'valid/{g}/token_acc']:.1f} ({100 * r[f'valid/{g}/token_acc/vs_checkpoint']:+.1f})"
                             for g in GENERAL)
        lines.append(f"| {arm} | {100 * r[METRIC]:.1f} | {100 * r[EXACT]:.1f} | {r[f'valid/{TASK}/loss']:.3f} | "
                     f"{100 * r[f'valid/{TASK}/token_acc']:.1f} | {general} |")
    return lines


def reading(s: dict, task_share: float) -> list[str]:
    r, c = s["rows"], s["checkpoint"]
    em = {arm: 100 * r[arm][METRIC] for arm in r}
    exact = {arm: 100 * r[arm][EXACT] for arm in r}
    out = [f"Task accuracy on held-out snippets (prose or code; chance 50 %): {em['general']:.1f} % "
           f"after the general-only anneal (the control), {em['mix']:.1f} % after the mix ({100 * task_share:g} % "
           f"task rows), {em['task']:.1f} % after the task-only anneal (the checkpoint: {100 * c[METRIC]:.1f} %); "
           f"generated exactly: {exact['general']:.1f} / {exact['mix']:.1f} / {exact['task']:.1f} %."]
    gain_task, gain_mix = em["task"] - em["general"], em["mix"] - em["general"]
    if gain_task > 0:
        out.append(f"The mix gets {100 * gain_mix / gain_task:.0f} % of the task-only arm's gain over the control "
                   f"with {100 * task_share:g} % of its task rows.")
    else:
        out.append("The task-only anneal gained nothing over the control on task accuracy at this scale.")
    worst = {arm: max(r[arm][f"valid/{g}/loss/vs_control"] / r["general"][f"valid/{g}/loss"] for g in GENERAL)
             for arm in ("mix", "task")}
    out.append("Against the control's end, the general held-out loss is worse by at most "
               f"{100 * worst['mix']:.1f} % after the mix and {100 * worst['task']:.1f} % after the task-only anneal "
               "(the larger of prose and code).")
    vs_ckpt = {arm: max(r[arm][f"valid/{g}/loss/vs_checkpoint"] for g in GENERAL) for arm in r}
    kept = [arm for arm, v in vs_ckpt.items() if v <= 0]
    out.append("Against the checkpoint, general loss "
               + (f"improved or held in {', '.join(kept)}" if kept else "rose in every arm")
               + (f" and rose in {', '.join(a for a in r if a not in kept)}" if kept and len(kept) < len(r) else "")
               + " (worst source: " + ", ".join(f"{arm} {v:+.3f}" for arm, v in vs_ckpt.items()) + ").")
    if em["mix"] >= em["task"] and worst["mix"] <= worst["task"]:
        out.append("Here the mix is at least as good as the task alone on both the task and retention.")
    elif em["mix"] < em["task"] and worst["mix"] < worst["task"]:
        out.append("Here annealing on the task alone buys task accuracy at a price in general loss; the mix "
                   "keeps more and learns less.")
    return out


def plot(s: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 3.6))
    axes = fig.subplots(1, 3)
    names = ["checkpoint", *s["rows"]]
    values = [s["checkpoint"], *s["rows"].values()]
    colors = ["grey", "tab:blue", "tab:green", "tab:red"][: len(names)]
    panels = [(METRIC, "task accuracy, prose or code? (%)", 100.0), (f"valid/{GENERAL[0]}/loss", f"{GENERAL[0]} held-out loss", 1.0),
              (f"valid/{GENERAL[1]}/loss", f"{GENERAL[1]} held-out loss", 1.0)]
    for ax, (key, title, scale) in zip(axes, panels):
        ys = [v[key] * scale for v in values]
        ax.bar(names, ys, color=colors)
        if scale == 1.0:
            ax.set_ylim(min(ys) * 0.97, max(ys) * 1.02)
        ax.set_title(title, fontsize=9)
        ax.tick_params(labelsize=8)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle("Anneals from one checkpoint, same steps and rows", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


def run_anneal(out: Path, scale: AnnealScale, *, progress: str = "auto") -> dict:
    """The whole experiment at an explicit scale (see the module doc)."""
    check_scale(scale)
    out = Path(out).resolve()
    started = time.perf_counter()
    files = write_data(out / "data", scale)
    tiny = scale.tiny
    print(f"anneal experiment: a stable phase of {tiny.steps} steps on general data, then {len(ARMS)} anneals of "
          f"{scale.anneal_steps} steps", flush=True)
    sweep = run_sweep_spec(out, "anneal", sweep_spec(files, scale, out / "cache"), progress=progress)
    checkpoint = eval_at(sweep.output / "prefix", tiny.steps)
    ends = {arm.name: eval_at(arm.run_dir) for arm in sweep.arms}
    s = summarize(checkpoint, ends)
    text = reading(s, scale.task_share)
    header = (f"Anneal experiment: a tiny Llama ({tiny.architecture['hidden_size']} wide, "
              f"{tiny.architecture['num_hidden_layers']} layers) trained from scratch on prose + code for {tiny.steps} "
              f"steps at a constant LR; from that checkpoint three anneals of {scale.anneal_steps} steps of "
              f"{tiny.batch_size} rows x {tiny.seq_len} tokens, LR linear to 0; task = prose or code? on "
              f"{scale.task_eval_items} held-out snippets; seed {scale.seed}")
    summary = {"scale": asdict(scale), **s, "reading": text, "wall_s": round(time.perf_counter() - started, 1)}
    lines = [header, "", *table(s), "", *text, "", f"This call took {summary['wall_s']:.0f} s (completed arms are reused)."]
    (out / "anneal.md").write_text("\n".join(["# Anneal experiment", "", *lines]) + "\n", encoding="utf-8")
    (out / "anneal.json").write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    plot(s, out / "anneal.png")
    print("\n" + "\n".join(lines) + f"\nwritten: {out / 'anneal.md'}, anneal.json, anneal.png", flush=True)
    return summary


def run_anneal_experiment(out: Path, *, quick: bool = False, seed: int = 0, task_share: float | None = None,
                          progress: str = "auto") -> dict:
    """The ready-made experiment: quick = a 64-wide tiny Llama, about 25 s on 2 CPU cores; full = a
    128-wide, 4-layer one for longer, about 3 minutes (measured: 23 s and 175 s)."""
    scale = replace(QUICK if quick else FULL, seed=seed)
    if task_share is not None:
        scale = replace(scale, task_share=task_share)
    return run_anneal(out, scale, progress=progress)
