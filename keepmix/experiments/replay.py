"""The replay experiment: how much of the old domain must a continued pre-training replay (docs/EXPERIMENTS.md).

Contract of `run_replay_experiment(out, quick=False, seeds=None, seed=0, shares=None, progress="auto")`:
- domain A is English prose (the Python language reference, `pydoc_data.topics`), domain B is Python
  source (the standard library); both are split into train and held-out by topic / module
  (`keepmix.demo.data.build_demo_data`), written to `<out>/data/`, with one BPE tokenizer trained on both;
- for every seed, one `keepmix sweep` (`<out>/seed-<s>.yaml`, arms in `<out>/seed-<s>/`): its branch
  prefix trains a tiny Llama from scratch on A alone (constant LR after warmup); every arm starts from
  that checkpoint (fresh AdamW, re-warmup, cosine decay) and trains the same steps of the same rows on B
  with a share r of A replayed (mixture {A: r, B: 1 - r}), one arm per share;
- reads A's and B's held-out loss and token accuracy after A (the prefix's eval at its last step) and at
  the end of each arm, and reports each share's mean over seeds with its 95% Student-t interval
  (mean ± t(n-1) · sd / √n), plus A's loss rise (end minus after-A, paired per seed);
- prints the table and a reading computed from the numbers, writes `<out>/replay.md`, `replay.json`,
  `replay.png`, and returns the summary. Same seed(s) and scale: the same numbers (completed arms reused).
`run_replay(out, scale)` takes the scale explicitly (tests use it). Shares must lie in [0, 1) and differ.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from keepmix.diagnostics.stats import seed_interval
from keepmix.errors import KeepmixError
from keepmix.experiments.sweepfile import eval_at, run_sweep_spec
from keepmix.experiments.tiny import TINY_FULL, TINY_QUICK, TinyModel, train_tokenizer

OLD, NEW = "prose", "code"  # domain A (learned first) and domain B (the continued pre-training)
METRICS = ("loss", "token_acc")
# Ibrahim et al. 2024 (arXiv:2403.08763), 405M model, Pile -> German: Pile validation loss by replay share
PUBLISHED_OLD_LOSS = {0.0: 3.56, 0.05: 2.57, 0.25: 2.33, 0.5: 2.24}


@dataclass(frozen=True)
class ReplayScale:
    tiny: TinyModel  # the model; tiny.steps = the steps on domain A
    steps_b: int  # steps of every arm (the same budget: steps x batch_size rows)
    shares: tuple[float, ...] = (0.0, 0.01, 0.05, 0.1, 0.25, 0.5)
    seeds: tuple[int, ...] = (0, 1, 2)
    warmup: int = 4  # steps, of the A phase and of each arm
    min_lr_ratio: float = 0.1
    code_docs: int = 1200  # B training documents (a sample of the stdlib's chunks)
    chunk_chars: int = 600
    threads: int | None = 1  # a tiny model gains nothing from more CPU threads


QUICK = ReplayScale(tiny=replace(TINY_QUICK, steps=200, valid_docs=32), steps_b=100, shares=(0.0, 0.05, 0.25, 0.5),
                    code_docs=600)
FULL = ReplayScale(tiny=replace(TINY_FULL, steps=300, valid_docs=48), steps_b=100)


def check_scale(scale: ReplayScale) -> None:
    problems = [f"share {r!r} lies outside [0, 1) (the share of A replayed; 1 would leave no B at all)"
                for r in scale.shares if not isinstance(r, (int, float)) or isinstance(r, bool) or not 0 <= r < 1]
    if len(set(scale.shares)) != len(scale.shares):
        problems.append(f"shares {list(scale.shares)} repeat a value; each share is one arm")
    if not scale.shares:
        problems.append("no shares: give at least one replay share")
    if not scale.seeds or len(set(scale.seeds)) != len(scale.seeds):
        problems.append(f"seeds {list(scale.seeds)}: expected one or more different seeds")
    if scale.steps_b < 1 or scale.tiny.steps < 1:
        problems.append(f"steps: A {scale.tiny.steps}, B {scale.steps_b}; expected at least 1 each")
    if problems:
        raise KeepmixError("replay experiment: " + "; ".join(problems))


def arm_name(share: float) -> str:
    return f"replay-{100 * share:g}"


def write_data(folder: Path, scale: ReplayScale) -> dict[str, Path]:
    """A and B, train and held out, and the tokenizer trained on both training sets."""
    from keepmix.demo.data import build_demo_data

    data = build_demo_data(folder, seed=0, prose_chunk_chars=scale.chunk_chars, code_chunk_chars=scale.chunk_chars,
                           code_max_docs=scale.code_docs, code_valid_docs=scale.tiny.valid_docs)
    texts = [json.loads(line)["text"] for path in (data.prose_train, data.code_train)
             for line in path.read_text(encoding="utf-8").splitlines()]
    tokenizer = train_tokenizer(texts, scale.tiny.vocab_size, folder / "tokenizer")
    return {"tokenizer": tokenizer, "prose_train": data.prose_train, "prose_valid": data.prose_valid,
            "code_train": data.code_train, "code_valid": data.code_valid}


def sweep_spec(files: dict[str, Path], scale: ReplayScale, seed: int, cache: Path) -> dict:
    """One seed's sweep: the A prefix, then one arm per replay share."""
    tiny = scale.tiny
    run = {"model": {"init": "scratch", "tokenizer": str(files["tokenizer"]), "architecture": dict(tiny.architecture)},
           "sources": [{"name": OLD, "path": str(files["prose_train"]), "valid_path": str(files["prose_valid"])},
                       {"name": NEW, "path": str(files["code_train"]), "valid_path": str(files["code_valid"])}],
           "mixture": {"schedule": [{"at": 0.0, "weights": {OLD: 0.0, NEW: 1.0}}]},
           "train": {"seq_len": tiny.seq_len, "batch_size": tiny.batch_size, "steps": tiny.steps + scale.steps_b,
                     "lr": tiny.lr, "lr_schedule": "cosine", "warmup": scale.warmup,
                     "min_lr_ratio": scale.min_lr_ratio, "seed": seed, "threads": scale.threads,
                     "checkpoint_every": None, "keep_checkpoints": 1},
           "eval": {"every": None, "batch_size": 16, "kl_to_base": False},
           "cache_dir": str(cache)}
    return {"run": run, "output": f"seed-{seed}",
            "arms": {arm_name(r): {"mixture.weights": {OLD: float(r), NEW: round(1.0 - r, 6)}} for r in scale.shares},
            "branch": {"at": tiny.steps, "optimizer": False,
                       "set": {"mixture.weights": {OLD: 1.0, NEW: 0.0}, "train.lr_schedule": "constant",
                               "eval.every": tiny.steps}},
            "answer": {"task": [f"valid/{NEW}/token_acc"], "keep": [f"valid/{OLD}/token_acc"]}}


# ---- the curve --------------------------------------------------------------------------------------

def _key(source: str, metric: str) -> str:
    return f"valid/{source}/{metric}"


def _stat(values: list[float]) -> dict:
    mean, lo, hi = seed_interval(values)
    return {"mean": mean, "lo": lo, "hi": hi, "values": values}


def curve(per_seed: dict[int, dict]) -> dict:
    """per_seed: {seed: {"after_a": metrics, "arms": {share: metrics}}} → the curve with intervals."""
    seeds = sorted(per_seed)
    shares = sorted(per_seed[seeds[0]]["arms"])
    keys = [_key(s, m) for s in (OLD, NEW) for m in METRICS]
    after = {k: _stat([per_seed[s]["after_a"][k] for s in seeds]) for k in keys}
    rows = []
    for r in shares:
        row = {"share": r, **{k: _stat([per_seed[s]["arms"][r][k] for s in seeds]) for k in keys}}
        row["old_loss_rise"] = _stat([per_seed[s]["arms"][r][_key(OLD, "loss")] - per_seed[s]["after_a"][_key(OLD, "loss")]
                                      for s in seeds])
        rows.append(row)
    return {"seeds": seeds, "after_a": after, "rows": rows}


def gap_closed(losses: dict[float, float]) -> dict[float, float]:
    """The share of the 0 % → largest-share old-domain loss gap that each share closes (0 % = 0, max = 1)."""
    top = max(losses)
    if 0.0 not in losses or top == 0.0 or losses[0.0] == losses[top]:
        return {}
    return {r: (losses[0.0] - v) / (losses[0.0] - losses[top]) for r, v in losses.items()}


def _f(x: float, spec: str = ".3f") -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def _cell(stat: dict, spec: str = ".3f", scale: float = 1.0) -> str:
    if math.isnan(stat["lo"]):
        return _f(stat["mean"] * scale, spec)
    return f"{_f(stat['mean'] * scale, spec)} [{_f(stat['lo'] * scale, spec)}, {_f(stat['hi'] * scale, spec)}]"


def table(c: dict) -> list[str]:
    lines = ["| replay of A | A loss | A loss rise | A token acc (%) | B loss | B token acc (%) |",
             "|---|---|---|---|---|---|"]
    a = c["after_a"]
    lines.append(f"| after A (before B) | {_cell(a[_key(OLD, 'loss')])} | 0 | {_cell(a[_key(OLD, 'token_acc')], '.1f', 100)} | "
                 f"{_cell(a[_key(NEW, 'loss')])} | {_cell(a[_key(NEW, 'token_acc')], '.1f', 100)} |")
    for row in c["rows"]:
        lines.append(f"| {100 * row['share']:g} % | {_cell(row[_key(OLD, 'loss')])} | {_cell(row['old_loss_rise'], '+.3f')} | "
                     f"{_cell(row[_key(OLD, 'token_acc')], '.1f', 100)} | {_cell(row[_key(NEW, 'loss')])} | "
                     f"{_cell(row[_key(NEW, 'token_acc')], '.1f', 100)} |")
    return lines


def reading(c: dict) -> list[str]:
    """Sentences computed from the curve, whatever it says."""
    rows = {row["share"]: row for row in c["rows"]}
    lo_share, hi_share = min(rows), max(rows)
    a_loss = _key(OLD, "loss")
    after = c["after_a"][a_loss]["mean"]
    lo, hi = rows[lo_share], rows[hi_share]
    out = [f"After A the model's held-out A loss is {after:.3f}. Trained on B with {100 * lo_share:g} % replay it "
           f"ends at {lo[a_loss]['mean']:.3f} ({lo['old_loss_rise']['mean']:+.3f}); with {100 * hi_share:g} % replay "
           f"at {hi[a_loss]['mean']:.3f} ({hi['old_loss_rise']['mean']:+.3f})."]
    rise0 = lo["old_loss_rise"]["mean"]
    if rise0 > 0:
        parts = [f"{100 * r:g} % removes {100 * (rise0 - row['old_loss_rise']['mean']) / rise0:.0f} %"
                 for r, row in rows.items() if r != lo_share]
        out.append(f"Of the A-loss rise at {100 * lo_share:g} % replay, " + ", ".join(parts) + ".")
    else:
        out.append(f"A's loss did not rise at {100 * lo_share:g} % replay: there was no forgetting to prevent "
                   f"at this scale.")
    b_loss = _key(NEW, "loss")
    ref = lo[b_loss]
    worse = [r for r, row in rows.items() if r != lo_share and not math.isnan(ref["hi"]) and row[b_loss]["mean"] > ref["hi"]]
    first = min(worse) if worse else None
    b_change = {r: 100 * (row[b_loss]["mean"] - ref["mean"]) / ref["mean"] for r, row in rows.items()}
    out.append("B's held-out loss changes by " + ", ".join(f"{v:+.1f} % at {100 * r:g} %" for r, v in b_change.items()
                                                        if r != lo_share)
               + f" against {100 * lo_share:g} % replay; " +
               (f"it first leaves the {100 * lo_share:g} % arm's interval at {100 * first:g} % replay."
                if first is not None else
                f"no share leaves the {100 * lo_share:g} % arm's interval." if not math.isnan(ref["hi"]) else
                "(one seed: no interval to compare with)."))
    mine = gap_closed({r: row[a_loss]["mean"] for r, row in rows.items()})
    theirs = gap_closed(PUBLISHED_OLD_LOSS)
    common = [r for r in (0.05, 0.25) if r in mine]
    if common and hi_share == 0.5:
        out.append("Share of the 0 % → 50 % A-loss gap closed: " + ", ".join(
            f"{100 * r:g} % replay {100 * mine[r]:.0f} % here vs {100 * theirs[r]:.0f} % in Ibrahim et al. 2024" for r in common)
            + ".")
    return out


def plot(c: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 6.4))
    axes = fig.subplots(2, 2)
    xs = [100 * row["share"] for row in c["rows"]]
    for i, (source, label) in enumerate(((OLD, "A (prose, learned first)"), (NEW, "B (code, continued on)"))):
        for j, metric in enumerate(METRICS):
            ax, key, scale = axes[j][i], _key(source, metric), 100.0 if metric == "token_acc" else 1.0
            mean = [row[key]["mean"] * scale for row in c["rows"]]
            err = [[(row[key]["mean"] - row[key]["lo"]) * scale for row in c["rows"]],
                   [(row[key]["hi"] - row[key]["mean"]) * scale for row in c["rows"]]]
            err = None if any(math.isnan(e) for e in err[0]) else err
            ax.errorbar(xs, mean, yerr=err, marker="o", capsize=3, color="tab:blue" if source == OLD else "tab:orange",
                        label="end of the B phase")
            ax.axhline(c["after_a"][key]["mean"] * scale, color="grey", linestyle="--", label="after A")
            ax.set_xscale("symlog", linthresh=1)
            ax.set_xlim(-0.2, 1.25 * max(xs) if max(xs) > 0 else 1)
            ax.set_xticks(xs, [f"{x:g}" for x in xs])
            ax.set_title(f"{label}: held-out {'token accuracy (%)' if scale != 1 else 'loss'}", fontsize=9)
            ax.set_xlabel("replay of A (% of the B phase's rows)", fontsize=8)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    fig.suptitle(f"Replay curve: mean over {len(c['seeds'])} seeds, bars = 95% t-interval", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


# ---- the experiment ---------------------------------------------------------------------------------

def run_replay(out: Path, scale: ReplayScale, *, progress: str = "auto") -> dict:
    """The whole experiment at an explicit scale (see the module doc)."""
    check_scale(scale)
    out = Path(out).resolve()
    started = time.perf_counter()
    files = write_data(out / "data", scale)
    per_seed = {}
    for seed in scale.seeds:
        print(f"replay experiment: seed {seed}: A for {scale.tiny.steps} steps, then {len(scale.shares)} arms "
              f"of {scale.steps_b} steps on B", flush=True)
        sweep = run_sweep_spec(out, f"seed-{seed}", sweep_spec(files, scale, seed, out / "cache"), progress=progress)
        arms = {arm.name: arm for arm in sweep.arms}
        per_seed[seed] = {"after_a": eval_at(sweep.output / "prefix", scale.tiny.steps),
                          "arms": {r: eval_at(arms[arm_name(r)].run_dir) for r in scale.shares}}
    c = curve(per_seed)
    text = reading(c)
    tiny = scale.tiny
    header = (f"Replay experiment: a tiny Llama ({tiny.architecture['hidden_size']} wide, "
              f"{tiny.architecture['num_hidden_layers']} layers) learns A = prose for {tiny.steps} steps, then B = "
              f"Python source for {scale.steps_b} steps of {tiny.batch_size} rows x {tiny.seq_len} tokens with each "
              f"replay share of A; {len(scale.seeds)} seeds; cells are mean [95% t-interval over seeds]")
    summary = {"scale": asdict(scale), "curve": c, "reading": text, "published_old_loss": PUBLISHED_OLD_LOSS,
               "gap_closed": {"keepmix": gap_closed({row["share"]: row[_key(OLD, "loss")]["mean"] for row in c["rows"]}),
                              "ibrahim_2024": gap_closed(PUBLISHED_OLD_LOSS)},
               "wall_s": round(time.perf_counter() - started, 1)}
    lines = [header, "", *table(c), "", *text, "", f"This call took {summary['wall_s']:.0f} s (completed arms are reused)."]
    (out / "replay.md").write_text("\n".join(["# Replay experiment", "", *lines]) + "\n", encoding="utf-8")
    (out / "replay.json").write_text(json.dumps(summary, indent=1, default=str) + "\n", encoding="utf-8")
    plot(c, out / "replay.png")
    print("\n" + "\n".join(lines) + f"\nwritten: {out / 'replay.md'}, replay.json, replay.png", flush=True)
    return summary


def run_replay_experiment(out: Path, *, quick: bool = False, seeds: int | None = None, seed: int = 0,
                          shares: list[float] | None = None, progress: str = "auto") -> dict:
    """The ready-made experiment: quick = a 64-wide tiny Llama, 4 shares x 3 seeds, about 1 minute on 2 CPU
    cores; full = a 128-wide, 4-layer one, 6 shares x 3 seeds, about 7 minutes (measured: 64 s and 404 s).
    seeds: how many (seed, seed + 1, ...); shares: the replay shares in [0, 1)."""
    scale = QUICK if quick else FULL
    if seeds is not None:
        if seeds < 1:
            raise KeepmixError(f"--seeds {seeds}: expected 1 or more (2 or more for an interval)")
        scale = replace(scale, seeds=tuple(range(seed, seed + seeds)))
    elif seed:
        scale = replace(scale, seeds=tuple(s + seed for s in scale.seeds))
    if shares is not None:
        scale = replace(scale, shares=tuple(shares))
    return run_replay(out, scale, progress=progress)
