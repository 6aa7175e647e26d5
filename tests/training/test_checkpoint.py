"""Checkpoint manifests: every file's size and checksum, verified before a resume trusts the folder."""

from __future__ import annotations

import json

import pytest
import torch

from keepmix.errors import KeepmixError
from keepmix.training import checkpoint as ckpt


def _save(root, step, value=1.0):
    weights = {"w": torch.full((64, 64), value), "b": torch.arange(8.0)}
    return ckpt.save_checkpoint(root, step, weights=weights, optimizer={"state": {}, "param_groups": []},
                                scheduler={"last_epoch": step}, state={"step": step}, keep=5,
                                extra_files={"config.yaml": "train: {steps: 9}\n"})


def test_the_manifest_lists_every_file_with_size_and_checksum(tmp_path):
    path = _save(tmp_path, 3)
    manifest = json.loads((path / ckpt.MANIFEST).read_text())
    names = {p.name for p in path.iterdir()} - {ckpt.MARKER, ckpt.MANIFEST}
    assert set(manifest["files"]) == names == {"weights.safetensors", "optimizer.pt", "scheduler.pt", "rng.pt",
                                               "state.json", "config.yaml"}
    for name, entry in manifest["files"].items():
        assert entry["size"] == (path / name).stat().st_size
    assert ckpt.verify_checkpoint(path) is None
    loaded = ckpt.read_checkpoint(path)
    assert torch.equal(loaded["weights"]["w"], torch.full((64, 64), 1.0))
    assert loaded["config"] == {"train": {"steps": 9}} and loaded["state"] == {"step": 3}


@pytest.mark.parametrize("name", ["weights.safetensors", "optimizer.pt", "scheduler.pt", "rng.pt", "state.json",
                                  "config.yaml"])
def test_one_flipped_byte_in_any_file_is_named(tmp_path, name):
    path = _save(tmp_path, 3)
    data = bytearray((path / name).read_bytes())
    data[len(data) // 2] ^= 0x01
    (path / name).write_bytes(bytes(data))
    assert ckpt.verify_checkpoint(path) == f"{name} does not match its checksum (its bytes were altered)"
    with pytest.raises(KeepmixError, match=f"checkpoint is damaged: {name} does not match"):
        ckpt.read_checkpoint(path)


def test_the_newest_intact_checkpoint_is_found_past_damaged_ones(tmp_path):
    _save(tmp_path, 2, 2.0)
    _save(tmp_path, 4, 4.0)
    six = _save(tmp_path, 6, 6.0)
    (six / "optimizer.pt").unlink()
    four = ckpt.step_dir(tmp_path, 4)
    (four / "weights.safetensors").write_bytes(b"")
    found = ckpt.intact_checkpoint(tmp_path)
    assert found.path == ckpt.step_dir(tmp_path, 2)
    assert torch.equal(found.loaded["weights"]["w"], torch.full((64, 64), 2.0))
    assert [(p.name, why) for p, why in found.damaged] == [
        ("step-00000006", "optimizer.pt is missing"),
        ("step-00000004", f"weights.safetensors has 0 bytes, the manifest says "
                          f"{json.loads((four / ckpt.MANIFEST).read_text())['files']['weights.safetensors']['size']} "
                          f"(truncated or overwritten)"),
    ]
    for p in (six, four, ckpt.step_dir(tmp_path, 2)):
        (p / ckpt.MARKER).unlink()
    assert ckpt.intact_checkpoint(tmp_path).path is None
