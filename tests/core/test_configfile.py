"""lyco_core.configfile: TOML reading, --set overrides and one-line validation errors (shared by every config)."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import BaseModel, ConfigDict

from lyco_core.configfile import apply_overrides, read_toml, validate
from lyco_core.errors import InvalidConfigError, NotFoundError


class Inner(BaseModel):
    model_config = ConfigDict(extra="forbid")
    epochs: int = 1
    tags: list[str] = []


class Outer(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    train: Inner = Inner()


def test_overrides_parse_toml_values_and_leave_the_input_alone() -> None:
    doc = {"name": "a", "train": {"epochs": 2}}
    out = apply_overrides(doc, ["train.epochs=5", 'train.tags=["x", "y"]', "name=plain text", "new.deep.key=1.5"])
    assert out == {"name": "plain text", "train": {"epochs": 5, "tags": ["x", "y"]}, "new": {"deep": {"key": 1.5}}}
    assert doc == {"name": "a", "train": {"epochs": 2}}
    with pytest.raises(InvalidConfigError, match="expected key=value"):
        apply_overrides(doc, ["train.epochs"])


def test_validation_errors_name_the_key(tmp_path: Path) -> None:
    assert validate(Outer, {"name": "n", "train": {"epochs": 3}}).train.epochs == 3
    with pytest.raises(InvalidConfigError, match=r"^cfg\.toml: unknown key 'train\.epoch'$"):
        validate(Outer, {"name": "n", "train": {"epoch": 3}}, "cfg.toml")
    with pytest.raises(InvalidConfigError, match=r"missing key 'name'"):
        validate(Outer, {}, "cfg.toml")
    with pytest.raises(InvalidConfigError, match=r"train\.epochs: "):
        validate(Outer, {"name": "n", "train": {"epochs": "many"}}, "cfg.toml")


def test_read_toml_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(NotFoundError, match="no such config file"):
        read_toml(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("name = \n")
    with pytest.raises(InvalidConfigError, match=r"bad\.toml: not valid TOML"):
        read_toml(bad)
    good = tmp_path / "good.toml"
    good.write_text('name = "x"\n[train]\nepochs = 4\n')
    assert read_toml(good) == {"name": "x", "train": {"epochs": 4}}
