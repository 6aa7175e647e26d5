"""Key paths and grid expansion."""

import pytest

from keepmix.errors import ConfigError, KeepmixError
from keepmix.sweep.keys import get_key, parse_key, set_key, short_name, value_label
from keepmix.sweep.spec import load_sweep


def _cfg():
    return {"sources": [{"name": "prose"}, {"name": "code", "floor": 0.1}], "train": {"lr": 1e-4},
            "mixture": {"schedule": [{"at": 0.0, "weights": {"prose": 0.5, "code": 0.5}}]}}


def test_list_items_are_addressed_by_name_or_index():
    cfg = _cfg()
    assert parse_key("sources[code].kl_to_base") == ["sources", ("code",), "kl_to_base"]
    set_key(cfg, "sources[code].kl_to_base", 1.0)
    set_key(cfg, "mixture.schedule[0].weights.code", 0.9)
    set_key(cfg, "train.lr", 3e-4)
    set_key(cfg, "mixture.floor", 0.05)
    assert cfg["sources"][1] == {"name": "code", "floor": 0.1, "kl_to_base": 1.0}
    assert cfg["mixture"]["schedule"][0]["weights"]["code"] == 0.9
    assert get_key(cfg, "train.lr") == 3e-4 and get_key(cfg, "mixture.floor") == 0.05
    assert get_key(cfg, "sources[code].floor") == 0.1 and get_key(cfg, "sources[nope].floor", "x") == "x"


def test_mixture_weights_is_a_constant_schedule():
    cfg = _cfg()
    set_key(cfg, "mixture.weights", {"prose": 0.2, "code": 0.8})
    assert cfg["mixture"]["schedule"] == [{"at": 0.0, "weights": {"prose": 0.2, "code": 0.8}}]
    assert get_key(cfg, "mixture.weights") == {"prose": 0.2, "code": 0.8}


@pytest.mark.parametrize("path, message", [
    ("sources[sql].floor", r"sources has no item named 'sql' \(names: prose, code\)"),
    ("sources[5].floor", r"sources has 2 items, no index 5"),
    ("train.lr.peak", r"train\.lr is 0\.0001, not a mapping"),
    ("train[0]", r"train is .*, not a list"),
    ("train..lr", r"'' is not a key"),
])
def test_a_path_that_leads_nowhere_names_the_key(path, message):
    with pytest.raises(KeepmixError, match=message):
        set_key(_cfg(), path, 1)


def test_labels_are_folder_safe():
    assert short_name("sources[code].kl_to_base") == "code.kl_to_base"
    assert short_name("train.lr") == "lr"
    assert value_label({"prose": 0.25, "sql": 0.75}) == "prose25-sql75"
    assert value_label("a/b c") == "a_b_c"


def test_grid_expands_to_every_combination_and_random_draws_are_seeded(make_sweep):
    path = make_sweep(grid={"train.lr": [1e-3, 3e-3], "sources[qa].kl_to_base": [0.0, 0.5, 1.0]},
                      random={"n": 3, "seed": 7, "sources": ["general", "qa"]})
    sweep = load_sweep(path)
    names = [a.name for a in sweep.arms]
    assert len(names) == 9 and len(set(names)) == 9
    assert "lr=0.001_qa.kl_to_base=0.5" in names
    arm = next(a for a in sweep.arms if a.name == "lr=0.003_qa.kl_to_base=1")
    assert arm.config["train"]["lr"] == 3e-3 and arm.config["sources"][1]["kl_to_base"] == 1.0
    assert arm.run_dir == (path.parent / "sweep_out" / arm.name).resolve()
    draws = [a.settings["mixture.weights"] for a in sweep.arms if a.name.startswith("random-")]
    assert all(abs(sum(w.values()) - 1) < 1e-3 for w in draws)
    assert draws == [a.settings["mixture.weights"] for a in load_sweep(path).arms if a.name.startswith("random-")]


def test_unknown_keys_and_bad_values_are_reported_per_arm_before_any_arm_starts(make_sweep):
    path = make_sweep(arms={"typo": {"train.lrr": 1e-3}, "bad": {"train.lr": -1.0}, "good": {"train.lr": 1e-3}})
    with pytest.raises(ConfigError) as err:
        load_sweep(path)
    text = str(err.value)
    assert "arm typo: train.lrr: unknown key" in text and "arm bad: train.lr:" in text and "arm good" not in text
    assert not (path.parent / "sweep_out").exists()


@pytest.mark.parametrize("spec, message", [
    ({"grid": {}}, r"grid: the grid is empty"),
    ({"grid": {"train.lr": []}}, r"grid\.train\.lr: expected a non-empty list"),
    ({}, r"the sweep has no arms"),
    ({"grid": {"train.lr": [1e-3]}, "branch": {"at": 6}}, r"branch\.at: step 6 is beyond the run: train\.steps is 6"),
    ({"grid": {"train.lr": [1e-3]}, "gird": {}}, r"gird: unknown key"),
    ({"random": {"n": 2, "sources": ["sql"]}}, r"random\.sources: no source named 'sql'"),
    ({"arms": {"prefix": {}}}, r"cannot name an arm folder"),
])
def test_bad_sweep_files_are_one_clear_error(make_sweep, spec, message):
    path = make_sweep(**spec)
    with pytest.raises(KeepmixError, match=message):
        load_sweep(path)
    assert not (path.parent / "sweep_out").exists()
