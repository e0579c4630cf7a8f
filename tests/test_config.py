from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from flatlm.config import RunConfig, describe_keys, dump_yaml, flatten, load_config, run_identity_diff, to_dict
from flatlm.errors import FlatlmError

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_and_required_key_names() -> None:
    cfg = load_config()
    flat = flatten(to_dict(cfg))
    for key in ("output_dir", "seed", "train.max_steps", "checkpoint.every", "optim.name"):
        assert key in flat, key
    assert cfg.data.source == "stdlib" and cfg.model.name == "tiny" and cfg.optim.name == "adamw"


def test_yaml_then_overrides(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("seed: 5\ntrain:\n  max_steps: 7\n  micro_batch_size: 4\noptim:\n  lr: 1.0e-3\n")
    cfg = load_config(f, ["train.max_steps=30", "optim.hparams.betas=[0.9,0.99]", "data.paths=[a.txt, b.txt]"])
    assert cfg.seed == 5 and cfg.train.max_steps == 30 and cfg.train.micro_batch_size == 4
    assert cfg.optim.lr == pytest.approx(1e-3)
    assert cfg.optim.hparams == {"betas": [0.9, 0.99]}
    assert cfg.data.paths == ["a.txt", "b.txt"]


def test_scientific_notation_override() -> None:
    assert load_config(None, ["optim.lr=3e-4"]).optim.lr == pytest.approx(3e-4)


def test_unknown_key_names_key_valid_choices_and_closest() -> None:
    with pytest.raises(FlatlmError) as e:
        load_config(None, ["train.max_stepz=3"])
    msg = str(e.value)
    assert "'train.max_stepz'" in msg and "did you mean 'max_steps'" in msg and "train.micro_batch_size" in msg


def test_unknown_top_level_section() -> None:
    with pytest.raises(FlatlmError, match="unknown config key 'trian'.*did you mean 'train'"):
        load_config(None, ["trian.max_steps=3"])


def test_wrong_type_names_key() -> None:
    with pytest.raises(FlatlmError, match=r"invalid value for 'train.max_steps'.*integer.*'abc'"):
        load_config(None, ["train.max_steps=abc"])


def test_literal_lists_choices() -> None:
    with pytest.raises(FlatlmError, match="data.source.*'stdlib', 'stdlib_docs', 'files' or 'hf'"):
        load_config(None, ["data.source=web"])


def test_range_checked() -> None:
    with pytest.raises(FlatlmError, match="train.max_steps.*greater than 0"):
        load_config(None, ["train.max_steps=0"])


@pytest.mark.parametrize("bad", ["train.max_steps", "=3", "train..x=1"])
def test_malformed_override(bad: str) -> None:
    with pytest.raises(FlatlmError, match="dotted.key=value"):
        load_config(None, [bad])


def test_value_is_not_a_section() -> None:
    with pytest.raises(FlatlmError, match="invalid value for 'seed'.*integer"):
        load_config(None, ["seed.x=1"])
    with pytest.raises(FlatlmError, match="'seed' is a value"):
        load_config(None, ["seed=1", "seed.x=1"])


def test_missing_or_bad_yaml(tmp_path: Path) -> None:
    with pytest.raises(FlatlmError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(FlatlmError, match="mapping"):
        load_config(tmp_path / "list.yaml")


def test_dump_roundtrip() -> None:
    cfg = load_config(None, ["train.max_steps=12", "optim.hparams.eps=1e-10"])
    again = RunConfig.model_validate(yaml.safe_load(dump_yaml(cfg)))
    assert again == cfg


def test_run_identity_ignores_length_but_not_lr() -> None:
    a = to_dict(load_config(None, ["train.max_steps=10"]))
    b = to_dict(load_config(None, ["train.max_steps=20", "checkpoint.every=5"]))
    c = to_dict(load_config(None, ["optim.lr=1e-2"]))
    assert run_identity_diff(a, b) == []
    assert run_identity_diff(a, c) == ["optim.lr"]


def test_every_key_documented() -> None:
    rows = describe_keys()
    assert len(rows) > 30
    undocumented = [k for k, _, doc in rows if not doc]
    # Section fields themselves are expanded; every leaf key carries a docstring.
    assert undocumented == []


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path: Path) -> None:
    load_config(path)


def test_config_directory_is_called_a_directory(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text("seed: 1\n")
    with pytest.raises(FlatlmError, match=r"is a directory; pass a YAML file \(it holds a.yaml\)") as e:
        load_config(tmp_path)
    assert "does not exist" not in str(e.value)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["data.source=files"], r"^data.source=files needs data.paths, e.g."),
        (["data.source=hf"], r"^data.source=hf needs data.name"),
    ],
)
def test_a_source_without_its_input_fails_with_the_config(overrides: list[str], message: str) -> None:
    """Refused by load_config itself: before the CLI imports torch, let alone reads any data."""
    with pytest.raises(FlatlmError, match=message):
        load_config(None, overrides)


def test_default_yaml_is_the_default_job() -> None:
    """configs/default.yaml says it is what `flatlm train` runs: it must be, key for key (as written, not only as
    resolved), and it must still spell out the job (an emptied file would equal the defaults trivially)."""
    path = ROOT / "configs" / "default.yaml"
    assert load_config(path) == load_config()
    written = flatten(yaml.safe_load(path.read_text()))
    defaults = flatten(to_dict(load_config()))
    assert len(written) >= 20
    assert {k: v for k, v in written.items() if defaults.get(k, object()) != v} == {}


def test_log_interval_is_not_run_identity() -> None:
    a = to_dict(load_config(None, ["train.log_interval_s=5"]))
    assert run_identity_diff(to_dict(load_config()), a) == []


def test_exponent_floats_are_numbers_in_free_form_keys(tmp_path: Path) -> None:
    """PyYAML (YAML 1.1) reads 1e-8 as a string; optim.hparams.eps=1e-8 must reach the optimizer as a float."""
    f = tmp_path / "c.yaml"
    f.write_text("optim:\n  hparams:\n    eps: 1e-8\n")
    assert load_config(f).optim.hparams == {"eps": 1e-8}
    cfg = load_config(None, ["optim.hparams.eps=1e-8", "optim.hparams.betas=[0.9, 1E0]", "model.overrides.x=1e"])
    assert cfg.optim.hparams == {"eps": 1e-8, "betas": [0.9, 1.0]}
    assert cfg.model.overrides == {"x": "1e"}  # not a number: stays a string
