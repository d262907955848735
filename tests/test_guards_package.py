"""The torch-side guard package (``guards/``): one registry, one config schema per guard with one set of defaults,
atomic save/load that loads the committed weights unchanged, and the agreement of the train CLI defaults, the
config defaults and the manifest entry ``export`` writes from them."""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json

import pytest

import guards
from guards.config import ConfigError

from .conftest import ROOT, TINYWORLD

torch = pytest.importorskip("torch")

COMMITTED = ROOT / "models" / "guards" / "tinyworld"

MANIFEST_KEYS = {  # what the lean runtime reads, no more and no less (it has no defaults of its own)
    "safeguider": {"threshold", "beam_width", "max_depth", "qualify_score", "min_similarity", "output", "max_batch",
                   "mode", "on_no_qualifier"},
    "saferedir": {"graph", "check_every", "first_check", "threshold", "alpha", "steer_away", "steer_weight",
                  "steer_escalate", "escalate_threshold", "escalate_patch"},
    "safepatch": {"graph", "gate_output", "categories", "threshold", "instructions", "apply_uncond", "yield_to_redirect",
                  "patch_params", "unet_params"},
    "safectrl": {"ema_alpha", "start_step_fraction", "mask_threshold", "mask_gain", "coverage_threshold",
                 "blend_uncond", "latch_threshold", "latch_floor", "state_input", "state_output", "blend_input",
                 "categories", "mask_dilate"},
}

CLI_FROM_CONFIG = {  # train CLI options whose default is a config field's (taken from the schema, not retyped)
    "safeguider": {"min_similarity"},
    "saferedir": {"alpha", "check_every", "first_check", "threshold"},
    "safepatch": {"proj_dim"},
    "safectrl": {"start_step_fraction", "mask_threshold", "mask_gain", "latch_threshold", "latch_floor", "mask_dilate"},
}
CLI_OWN_DEFAULT = {  # same name, deliberately another value
    "safepatch": {"threshold"},         # None: calibrated on held-back prompts (train.pick_threshold)
    "safectrl": {"blend_layers"},       # a prefix spec ("up_blocks.1"), resolved to the layer names the config holds
}


def test_registry_order_and_modules():
    assert guards.GUARDS == ("safeguider", "saferedir", "safepatch", "safectrl")
    for name in guards.GUARDS:
        schema = guards.config_class(name)
        assert schema.NAME == name and guards.module(name).CONFIG is schema
    with pytest.raises(KeyError, match="unknown guard 'nope'"):
        guards.module("nope")


def test_train_and_export_use_the_registry():
    import export.build
    import export.guards
    import train.__main__ as train_main

    assert export.build.GUARDS is guards.GUARDS and export.guards.GUARDS is guards.GUARDS
    assert train_main.GUARDS is guards.GUARDS
    from runtime.guards import host_class  # the lean runtime finds a guard's host half by the manifest's name

    for name in guards.GUARDS:  # every registered guard has an exporter, a trainer and a host half
        assert callable(importlib.import_module(f"export.guards.{name}").prepare)
        assert callable(importlib.import_module(f"train.{name}.cli").main)
        assert host_class(name, "test").name == name


def test_manifest_guards_in_registry_order_checker_last():
    from export.build import guards_section
    from export.guards import GuardParts

    parts = {name: GuardParts(config={"n": i}) for i, name in enumerate(reversed(guards.GUARDS))}
    section = guards_section(parts, {"component": "image_checker"})
    assert list(section) == [*guards.GUARDS, "image_checker"] and section["safectrl"] == {"n": 0}
    assert list(guards_section({"safectrl": parts["safectrl"]}, None)) == ["safectrl"]


def test_train_never_imports_export_guards():
    from .test_layering import _modules

    bad = {str(p.relative_to(ROOT)): m for p in (ROOT / "train").rglob("*.py")
           for m in _modules(p) if m == "export.guards" or m.startswith("export.guards.")}
    assert not bad


@pytest.mark.parametrize("name", guards.GUARDS)
def test_committed_config_round_trip(name):
    config = guards.load_config(name, COMMITTED / name)
    again = type(config).from_dict(json.loads(json.dumps(config.to_dict())))
    assert again == config and again.to_dict() == config.to_dict()
    assert set(config.runtime()) == set(type(config).RUNTIME_KEYS)


@pytest.mark.parametrize("name", guards.GUARDS)
def test_unknown_or_missing_key_is_refused_in_one_line(name):
    data = guards.load_config(name, COMMITTED / name).to_dict()
    with pytest.raises(ConfigError, match="unknown key.*'threshhold'") as e:
        guards.config_class(name).from_dict({**data, "threshhold": 0.3}, source="x.json")
    assert "\n" not in str(e.value) and str(e.value).startswith("x.json: ")
    required = [f.name for f in dataclasses.fields(guards.config_class(name))
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    for key in required:
        with pytest.raises(ConfigError, match=f"lacks '{key}'"):
            guards.config_class(name).from_dict({k: v for k, v in data.items() if k != key})
    if name != "safeguider":
        with pytest.raises(ConfigError, match="a safeguider config given to"):
            guards.config_class(name).from_dict({**data, "_class_name": "safeguider"})


def _load_module(name, folder, unet=None):
    m = guards.module(name)
    if name == "safepatch":
        return m.load(folder)
    cls = getattr(m, {"safeguider": "SafeGuiderClassifier", "saferedir": "SafeRedir", "safectrl": "SafeCtrl"}[name])
    return cls.from_pretrained(folder, unet) if name == "safectrl" else cls.from_pretrained(folder)


@pytest.fixture(scope="module")
def backbone():
    from export.families import load_backbone

    torch.set_num_threads(1)
    return load_backbone(TINYWORLD)


@pytest.mark.parametrize("name", guards.GUARDS)
def test_committed_weights_load_and_save_bit_identically(name, tmp_path, backbone):
    from safetensors.torch import load_file

    loaded = _load_module(name, COMMITTED / name, backbone.unet)
    out = tmp_path / name
    if name == "safepatch":
        patch, gate, config = loaded
        guards.module(name).save(patch, gate, out, config, fp16=config.storage_dtype == "float16")
    else:
        loaded.save_pretrained(out)
    before, after = load_file(str(COMMITTED / name / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert guards.load_config(name, out) == guards.load_config(name, COMMITTED / name)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]  # no temp files left


def test_save_is_atomic(tmp_path, monkeypatch):
    import safetensors.torch

    from guards.safeguider import SafeGuiderClassifier, SafeGuiderConfig

    model = SafeGuiderClassifier(SafeGuiderConfig(hidden_size=8))
    model.save_pretrained(tmp_path)
    before = (tmp_path / "model.safetensors").read_bytes()

    def broken(tensors, filename, metadata=None):
        open(filename, "wb").write(b"half a file")
        raise OSError("disk full")
    monkeypatch.setattr(safetensors.torch, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        SafeGuiderClassifier(SafeGuiderConfig(hidden_size=8)).save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]


@pytest.mark.parametrize("name", guards.GUARDS)
def test_train_cli_defaults_are_the_config_defaults(name):
    parser = argparse.ArgumentParser()
    importlib.import_module(f"train.{name}.cli").add_arguments(parser)
    defaults = {a.dest: a.default for a in parser._actions}
    schema = guards.config_class(name)
    fields = {f.name: f.default for f in dataclasses.fields(schema)}
    shared = {d for d in defaults if d in fields} - CLI_OWN_DEFAULT.get(name, set())
    assert shared == CLI_FROM_CONFIG[name]
    for dest in shared:
        assert defaults[dest] == fields[dest], dest


def test_prepare_writes_the_configs_run_time_settings(backbone):
    """Every manifest entry has exactly the keys the runtime reads; the run-time settings are the config's; the
    committed SafeGuider, SafeRedir and SafeCtrl run with the schema's defaults (the CLI's too), but for the
    SafeGuider search floor tinyworld's weights were mined at (a dev choice; the schema keeps the paper's 0.1)."""
    from export.guards import prepare

    parts = prepare(list(guards.GUARDS), backbone, TINYWORLD)
    assert list(parts) == list(guards.GUARDS)
    for name, part in parts.items():
        config = guards.load_config(name, COMMITTED / name)
        assert set(part.config) == MANIFEST_KEYS[name], name
        settled = {"mode": "gate"} if name == "safeguider" else {}  # mode: auto, settled for the whole stack
        assert {k: part.config[k] for k in config.RUNTIME_KEYS} == {**config.runtime(), **settled}
        if name != "safepatch":  # SafePatch's threshold is calibrated at training time (0.9 committed)
            defaults = {f.name: f.default for f in dataclasses.fields(type(config))
                        if f.default is not dataclasses.MISSING}
            chosen = {"min_similarity": -0.3} if name == "safeguider" else {}
            assert {k: v for k, v in config.runtime().items() if k in defaults} == \
                {**{k: defaults[k] for k in config.RUNTIME_KEYS if k in defaults}, **chosen}
    # the committed SafeCtrl is the prompt-only one: its blend dilated, its hold floored (the dev choices)
    assert parts["safectrl"].config["mask_dilate"] == 1 and parts["safectrl"].config["latch_floor"] == 0.25
    assert parts["safectrl"].config["mask_threshold"] == guards.config_class("safectrl").mask_threshold == 0.07
    assert parts["safectrl"].config["mask_gain"] == 10.0
    assert parts["safepatch"].config["threshold"] == 0.9


def test_export_refuses_a_config_that_does_not_fit(tmp_path, backbone):
    """``export build --guards`` with a config.json holding a key the schema does not know: one-line bad input."""
    import shutil

    from export.guards import prepare
    from runtime.errors import BadInputError

    folder = tmp_path / "guards" / TINYWORLD.name / "saferedir"
    shutil.copytree(COMMITTED / "saferedir", folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "check_evry": 2}))
    with pytest.raises(BadInputError, match="--guards saferedir: .*unknown key.*'check_evry'") as e:
        prepare(["saferedir"], backbone, TINYWORLD, root=tmp_path / "guards")
    assert "\n" not in str(e.value)
