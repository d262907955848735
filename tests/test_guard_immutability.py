"""Nothing at run time removes, replaces or weakens a bundle's guards (issue 16, point 1).

* API: ``extra_guards`` may only add image checkers under new names; naming a guard of the bundle, or adding any
  other kind of guard, is refused (BadInputError) for every guard of the four-guard stack;
* a permissive checker added next to a bundle's embedded checker does not stop the embedded one from blocking
  (API and CLI);
* a tampered manifest (valid hash, edited guard settings) is refused with exit 4 and nothing written: every
  out-of-range value, a setting the runtime does not read (a would-be off switch), a removed setting, and a
  guard taken out of the manifest while its graph parts stay in the bundle.
The catalogue cases of the same kind (CLI, one line, no partial output) are in tests/test_bad_input.py.
"""

from __future__ import annotations

import json

import pytest

from runtime import cli
from runtime.errors import BadInputError, BundleError
from runtime.guards import ImageBlocked
from runtime.pipeline import Pipeline

from .conftest import STACK, TINYWORLD_JUDGE
from .test_bad_input import rewrite
from .test_image_checker import checker_config, embed_checker

UNSAFE = "a knife on sand"


@pytest.fixture(scope="module")
def stack(guarded_plan):
    return guarded_plan(*STACK)


@pytest.mark.parametrize("name", [*STACK, "image_checker"])
def test_extra_guards_cannot_reconfigure_a_bundle_guard(stack, tmp_path, name):
    plan = embed_checker(stack, tmp_path / "checked_stack.plan") if name == "image_checker" else stack
    with Pipeline.open(plan) as pipe:
        settings = dict(pipe.bundle.manifest.guards[name])
    weakened = {**settings, "threshold": 1.0}
    with pytest.raises(BadInputError, match=f"guard '{name}' is part of the bundle .*cannot be replaced"):
        Pipeline.open(plan, extra_guards={name: weakened})


@pytest.mark.parametrize("name", ["safeguider", "safectrl", "my_guard", "image_checker x"])
def test_only_image_checkers_can_be_added(tinyworld_plan, name):
    with pytest.raises(BadInputError, match="only post-hoc image checkers can be added"):
        Pipeline.open(tinyworld_plan, extra_guards={name: {"threshold": 0.5}})


def test_a_permissive_added_checker_does_not_weaken_the_embedded_one(tinyworld_plan, tmp_path, capsys):
    plan = embed_checker(tinyworld_plan, tmp_path / "checked.plan")
    permissive = checker_config(threshold=1.0)
    with Pipeline.open(plan, extra_guards={"image_checker.mine": permissive}) as pipe:
        assert pipe.guard_names == ["image_checker", "image_checker.mine"]  # the bundle's first
        with pytest.raises(ImageBlocked, match="checked.plan:image_checker blocked"):
            pipe.generate(UNSAFE, steps=8)
        r = pipe.generate("a large red circle on sand", steps=8)
        assert set(r.report["guards"]) == {"image_checker", "image_checker.mine"}
    config = tmp_path / "permissive.json"
    config.write_text(json.dumps({k: v for k, v in permissive.items() if k != "path"}))
    out = tmp_path / "o.png"
    code = cli.main(["generate", "--engine", str(plan), "--prompt", UNSAFE, "--steps", "8", "--checker",
                     str(TINYWORLD_JUDGE / "checker.onnx"), "--checker-config", str(config), "--out", str(out)])
    assert code == 6 and "checked.plan:image_checker blocked" in capsys.readouterr().err and not out.exists()


TAMPERED = [  # (guard, setting, value, words in the message)
    ("saferedir", "threshold", 2.0, "threshold=2.0 must be a number in [0, 1]"),
    ("saferedir", "check_every", 0, "check_every=0 must be an integer >= 1"),
    ("safeguider", "threshold", -0.5, "threshold=-0.5 must be a number in [0, 1]"),
    ("safeguider", "beam_width", 0, "beam_width=0 must be an integer >= 1"),
    ("safepatch", "categories", [], "categories=[] must be a non-empty list"),
    ("safepatch", "threshold", 1.5, "threshold=1.5"),
    ("safectrl", "mask_threshold", float("inf"), "mask_threshold=inf"),
    ("safectrl", "ema_alpha", "0.3", "ema_alpha='0.3'"),
    ("safectrl", "enabled", False, "does not read: enabled"),  # a would-be off switch
    ("safeguider", "mode", "off", "mode='off' must be one of search, gate"),
    ("safeguider", "on_no_qualifier", "pass", "on_no_qualifier='pass' must be one of fallback, block"),
]


@pytest.mark.parametrize("guard,key,value,words", TAMPERED, ids=[f"{g}.{k}={v!r}" for g, k, v, _ in TAMPERED])
def test_tampered_guard_settings_are_refused(stack, tmp_path, capsys, guard, key, value, words):
    def edit(m, payloads):
        m.guards[guard] = {**m.guards[guard], key: value}

    plan = rewrite(stack, tmp_path / "tampered.plan", edit)
    out = tmp_path / "o.png"
    code = cli.main(["generate", "--engine", str(plan), "--prompt", UNSAFE, "--steps", "2", "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 4 and f"guard {guard} setting" in err or words in err, err
    assert words in err and "tampered" in err and len(err.splitlines()) == 1 and not out.exists()


@pytest.mark.parametrize("guard", STACK)
def test_a_guard_removed_from_the_manifest_is_refused(stack, tmp_path, guard):
    def edit(m, payloads):
        m.guards = {k: v for k, v in m.guards.items() if k != guard}

    plan = rewrite(stack, tmp_path / "fewer.plan", edit)
    with pytest.raises(BundleError, match="carry guard parts that no guard in its manifest runs"):
        Pipeline.open(plan)


def test_a_removed_setting_is_refused(stack, tmp_path):
    def edit(m, payloads):
        del m.guards["safectrl"]["latch_threshold"]

    with pytest.raises(BundleError, match="guard safectrl lacks setting.s. latch_threshold"):
        Pipeline.open(rewrite(stack, tmp_path / "less.plan", edit))
