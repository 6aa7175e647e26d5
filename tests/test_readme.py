"""The README documents every config key and the commands it promises."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel

from keepmix.config import RunConfig

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def _models(annotation, in_list: bool = False):
    """(model class, inside a list?) for every keepmix config model an annotation holds."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        if annotation.__module__ == "keepmix.config":
            yield annotation, in_list
        return
    is_list = getattr(annotation, "__origin__", None) is list
    for arg in getattr(annotation, "__args__", ()):
        yield from _models(arg, in_list or is_list)


def config_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    keys = []
    for name, field in model.model_fields.items():
        if field.exclude:
            continue
        key = f"{prefix}{name}"
        keys.append(key)
        for sub, in_list in _models(field.annotation):
            keys += config_keys(sub, key + ("[]." if in_list else "."))
    return sorted(set(keys))


def test_every_config_key_is_documented():
    missing = [k for k in config_keys(RunConfig) if f"`{k}`" not in README]
    assert not missing, f"keys missing from the README's config reference: {missing}"


def test_readme_names_the_setup_commands():
    assert "make demo" in README and "make test" in README
    makefile = (Path(__file__).resolve().parents[1] / "Makefile").read_text()
    assert "\ndemo:" in makefile and "\ntest:" in makefile
