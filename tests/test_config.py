"""Config errors list every problem at once, each with its key path."""

from __future__ import annotations

import pytest
import yaml

from keepmix.config import load_config, parse_config
from keepmix.errors import ConfigError


def base(tmp_path) -> dict:
    (tmp_path / "general.jsonl").write_text('{"text": "a"}\n')
    (tmp_path / "sql.jsonl").write_text('{"prompt": "q", "completion": "a"}\n')
    return {
        "model": {"name": "HuggingFaceTB/SmolLM2-135M"},
        "sources": [{"name": "general", "path": "general.jsonl"},
                    {"name": "sql", "path": "sql.jsonl", "format": "prompt_completion", "loss_on": "completion"}],
        "mixture": {"schedule": [{"at": 0.0, "weights": {"general": 0.7, "sql": 0.3}},
                                 {"at": 1.0, "weights": {"general": 0.2, "sql": 0.8}}]},
    }


def problems(tmp_path, data) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(data, source="run.yaml", base_dir=tmp_path)
    return info.value.problems


def test_valid_config_resolves_paths(tmp_path):
    cfg = parse_config(base(tmp_path), base_dir=tmp_path)
    assert cfg.resolve(cfg.sources[0].path) == str(tmp_path / "general.jsonl")
    assert cfg.resolve(cfg.model.name) == "HuggingFaceTB/SmolLM2-135M"  # a hub id stays an id


def test_every_problem_is_listed_with_its_key(tmp_path):
    data = base(tmp_path)
    data["mixture"]["schedule"][1]["weights"] = {"general": -0.2, "sqll": 0.8}
    data["mixture"]["schedule"][0]["at"] = 1.5
    data["mixture"]["floor"] = 0.6
    data["sources"].append({"name": "code", "path": "missing.jsonl"})
    found = problems(tmp_path, data)
    assert "mixture.schedule[1].weights.sqll: no source named 'sqll' (sources: general, sql, code)" in found
    assert "mixture.schedule[1].weights.general: weight must be >= 0 (got -0.2)" in found
    assert "mixture.schedule[0].at: must lie in [0, 1] (got 1.5)" in found
    assert any(p.startswith("mixture.floor: floors sum to 1.800") for p in found)
    assert any(p.startswith("sources[2].path: file not found:") and p.endswith("missing.jsonl") for p in found)
    assert len(found) == 5


def test_unknown_keys_and_wrong_types(tmp_path):
    data = base(tmp_path)
    data["train"] = {"stpes": 10, "lr": "fast", "batch_size": 0}
    data["sources"][0]["formatt"] = "text"
    found = problems(tmp_path, data)
    assert any(p.startswith("train.stpes: unknown key") for p in found)
    assert any(p.startswith("sources[0].formatt: unknown key") for p in found)
    assert any(p.startswith("train.lr: ") and "'fast'" in p for p in found)
    assert any(p.startswith("train.batch_size: ") and "greater than 0" in p for p in found)


def test_schedule_points_must_increase(tmp_path):
    data = base(tmp_path)
    data["mixture"]["schedule"][1]["at"] = 0.0
    assert problems(tmp_path, data) == [
        "mixture.schedule[1].at: points must be strictly increasing (got 0.0 after 0.0)"]


def test_error_message_names_the_file_and_lists_problems(tmp_path):
    data = base(tmp_path)
    data["mixture"]["schedule"][1]["weights"]["sqll"] = 1
    data["train"] = {"micro_batch_size": 3, "batch_size": 8}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    text = str(info.value)
    assert text.startswith(f"{path}: 2 problems in the config:")
    assert "  - mixture.schedule[1].weights.sqll: no source named 'sqll'" in text
    assert "  - train.micro_batch_size: must divide train.batch_size (8); got 3" in text


def test_yaml_syntax_error_names_the_line(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model:\n  name: x\nsources: [\n  {name: a\n")
    with pytest.raises(ConfigError, match=r"run\.yaml:\d+: 1 problem in the config:\n  - \(top level\)|run\.yaml:\d+"):
        load_config(path)


def test_overrides_apply_dotted_keys(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(base(tmp_path)))
    cfg = load_config(path, {"train.steps": 7, "mixture.floor": 0.1})
    assert cfg.train.steps == 7 and cfg.mixture.floor == 0.1


def test_every_shipped_example_config_parses():
    from pathlib import Path

    configs = sorted((Path(__file__).resolve().parents[1] / "examples").rglob("*.yaml"))
    assert configs
    from keepmix.sweep.spec import load_sweep

    for path in configs:
        if path.name.endswith("sweep.yaml"):
            load_sweep(path)  # a sweep file: every arm's config validated
        else:
            load_config(path)  # hub ids stay ids; local files must exist


def test_guard_problems_name_their_keys(tmp_path):
    data = base(tmp_path)
    data["sources"][0].update(floor=0.2, valid_docs=8)
    data["sources"][1]["valid_docs"] = 0
    data["mixture"]["guard"] = {"sources": ["general", "sql", "code"], "max_share": 0.1, "probe_docs": 16,
                                "metric": "acc"}
    found = problems(tmp_path, data)
    assert "mixture.guard.sources[2]: no source named 'code' (sources: general, sql)" in found
    assert "mixture.guard.sources: protects every source; at least one source must be left unprotected to give " \
           "up the share the guard adds" in found
    assert "mixture.guard.max_share: 0.1 is below the floor of general (0.2); it must be >= the floor of every " \
           "protected source" in found
    assert "mixture.guard.probe_docs: 16 is larger than the held-out set of general (8 documents, " \
           "sources[0].valid_docs); expected at most 8" in found
    assert "mixture.guard.sources: sql has no held-out documents (sources[1].valid_docs is 0 and no valid_path); " \
           "the guard's probe needs some" in found
    assert any(p.startswith("mixture.guard.metric: ") and "'acc'" in p for p in found)
    assert len(found) == 6


def test_guard_defaults_protect_the_floored_sources(tmp_path):
    from keepmix.config import guarded_sources

    data = base(tmp_path)
    data["mixture"]["guard"] = {}
    assert problems(tmp_path, data) == [
        "mixture.guard.sources: nothing to protect: no source has a floor > 0; name the sources to protect "
        "(sources: general, sql)"]
    data["sources"][0]["floor"] = 0.1
    assert problems(tmp_path, data) == [  # 5 % of general's one record
        "mixture.guard.sources: general has no held-out documents (sources[0].valid_docs of 1 records hold "
        "none); the guard's probe needs some"]
    data["sources"][0]["valid_docs"] = 16
    cfg = parse_config(data, base_dir=tmp_path)
    assert guarded_sources(cfg) == ["general"]
    assert cfg.mixture.guard.tolerance is None and cfg.mixture.guard.every == 10


def test_a_probe_larger_than_a_local_held_out_file_is_refused_before_reading_the_data(tmp_path):
    data = base(tmp_path)
    (tmp_path / "general_valid.jsonl").write_text('{"text": "a"}\n' * 3)
    (tmp_path / "sql_many.jsonl").write_text('{"prompt": "q", "completion": "a"}\n' * 40)
    data["sources"][0].update(floor=0.1, valid_path="general_valid.jsonl")
    data["sources"][1].update(path="sql_many.jsonl", valid_docs=0.1)
    data["mixture"]["guard"] = {"sources": ["general"], "probe_docs": 4}
    assert problems(tmp_path, data) == [
        "mixture.guard.probe_docs: 4 is larger than the held-out set of general (at most 3 documents, the "
        "records of sources[0].valid_path); expected at most 3"]
    data["mixture"]["guard"] = {"sources": ["sql"], "probe_docs": 5}
    assert problems(tmp_path, data) == [
        "mixture.guard.probe_docs: 5 is larger than the held-out set of sql (at most 4 documents, "
        "sources[1].valid_docs of 40 records); expected at most 4"]
