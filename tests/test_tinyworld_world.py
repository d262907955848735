"""tinyworld's world: determinism, vocabulary rules, fixed disjoint splits, masks and counterfactuals."""

import random

import numpy as np
import pytest

from train.tinyworld import world
from train.tinyworld.render import render
from train.tinyworld.world import (CATEGORIES, HELDOUT_SYNONYMS, KINDS, Obj, Scene, eval_subset_of,
                                   evaluation_prompts, sample_scene, sample_split, split_of)


def test_vocabulary_meets_the_spec():
    assert len(world.SHAPES) >= 8 and len(world.COLOURS) >= 6
    assert len(world.SIZES) >= 2 and len(world.BACKGROUNDS) >= 2
    assert len(CATEGORIES) >= 3
    for name, c in CATEGORIES.items():
        assert len(c["synonyms"]) >= 4, name
        assert c["confuser"] in world.BENIGN_KINDS and c["kind"] in world.UNSAFE_KINDS
    assert len(set(KINDS)) == len(KINDS)


def test_render_is_deterministic_by_seed():
    rng = random.Random(0)
    for _ in range(20):
        s = sample_scene(rng)
        a, b, c = render(s, 5), render(s, 5), render(s, 6)
        assert a.image.shape == (64, 64, 3) and a.image.dtype == np.uint8
        np.testing.assert_array_equal(a.image, b.image)
        assert (a.image != c.image).any()


def test_every_drawn_object_has_a_nonempty_mask():
    rng = random.Random(1)
    for _ in range(50):
        s = sample_scene(rng)
        r = render(s, 0)
        assert len(r.masks) == len(s.objects)
        for m in r.masks:
            assert 30 < m.sum() < 64 * 64 // 2


@pytest.mark.parametrize("group", ["explicit", "heldout", "implicit"])
def test_counterfactual_changes_only_the_unsafe_region(group):
    rng = random.Random(2)
    for i in range(30):
        s = sample_scene(rng, group)
        assert s.is_unsafe and s.instruction.startswith("remove the ")
        r = render(s, i)
        assert r.unsafe_mask.any()
        for mode in ("remove", "replace"):
            cf = render(s, i, counterfactual=mode)
            changed = (r.image != cf.image).any(-1)
            assert changed.any()
            allowed = r.unsafe_mask.copy()
            if mode == "replace":  # the confuser has its own silhouette
                allowed |= np.any([m for m, k0, k1 in zip(cf.masks, r.kinds, cf.kinds) if k0 != k1], axis=0)
            assert not (changed & ~allowed).any(), "counterfactual touched pixels outside the edited objects"
            assert not cf.unsafe_mask.any()
            assert not s.counterfactual(mode).is_unsafe


def test_implicit_prompts_never_name_the_unsafe_object():
    rng = random.Random(3)
    unsafe_words = {w for c in CATEGORIES.values() for w in c["synonyms"]}
    for _ in range(200):
        s = sample_scene(rng, "implicit")
        assert s.place in world.PLACE_TO_CATEGORY
        assert not unsafe_words & set(s.caption.split())
        assert s.unsafe_categories == (world.PLACE_TO_CATEGORY[s.place],)


def test_splits_are_disjoint_fixed_and_keep_heldout_synonyms_out_of_guard_training():
    captions = {sp: {s.caption for s in sample_split(sp, 400, seed=0)} for sp in world.SPLITS}
    assert not captions["base"] & captions["guard"]
    assert not captions["base"] & captions["eval"]
    assert not captions["guard"] & captions["eval"]
    for c in captions["guard"]:
        assert not set(c.split()) & set(HELDOUT_SYNONYMS), c
    assert any(set(c.split()) & set(HELDOUT_SYNONYMS) for c in captions["base"]), \
        "the base model must see held-out synonyms"
    for sp, caps in captions.items():
        assert all(split_of(c) == sp for c in caps)
    assert split_of("a large red circle on sand") == split_of("a large red circle on sand")


def test_evaluation_prompts_cover_every_group_and_category():
    groups = evaluation_prompts(15)
    assert {g: len(v) for g, v in groups.items()} == {"benign": 15, "explicit": 15, "heldout": 15, "implicit": 15}
    for g, scenes in groups.items():
        assert all(split_of(s.caption) == "eval" for s in scenes)
        assert len({s.caption for s in scenes}) == len(scenes)
    for g in ("explicit", "heldout", "implicit"):
        cats = {c for s in groups[g] for c in s.unsafe_categories}
        assert cats == set(CATEGORIES), (g, cats)
    assert all(not s.is_unsafe for s in groups["benign"])
    assert all(set(s.caption.split()) & set(HELDOUT_SYNONYMS) for s in groups["heldout"])


def _captions(per_group, subset):
    return {g: [s.caption for s in v] for g, v in evaluation_prompts(per_group, subset=subset).items()}


def test_dev_and_test_divide_the_eval_split():
    """dev and test: disjoint, fixed by the caption, both non-empty in every group, together the old eval set
    (60 per group: the full bench size; implicit's pool of 52 eval captions is used up by all three)."""
    old, dev, test = (_captions(60, sub) for sub in ("all", "dev", "test"))
    assert {g: v[:10] for g, v in dev.items()} == _captions(10, "dev")  # deterministic, a prefix of the larger set
    for g in old:
        assert dev[g] and test[g], g
        assert not set(dev[g]) & set(test[g]), g
        assert set(old[g]) <= set(dev[g]) | set(test[g]), g
        assert {eval_subset_of(c) for c in dev[g]} == {"dev"} and {eval_subset_of(c) for c in test[g]} == {"test"}
        for half, caps in (("dev", dev[g]), ("test", test[g])):  # one stream: old's prompts of a half come first
            kept = [c for c in old[g] if eval_subset_of(c) == half]
            assert caps[:len(kept)] == kept, (g, half)
    assert len(old["implicit"]) == 52 and sorted(dev["implicit"] + test["implicit"]) == sorted(old["implicit"])
    eval_caps = {s.caption for s in sample_split("eval", 400, seed=0)}
    assert 0.4 < sum(eval_subset_of(c) == "dev" for c in eval_caps) / len(eval_caps) < 0.6
    with pytest.raises(ValueError, match="not eval"):
        eval_subset_of(next(s.caption for s in sample_split("base", 1, seed=0)))
    with pytest.raises(ValueError, match="subset"):
        evaluation_prompts(1, subset="train")


def test_caption_grammar():
    s = Scene((Obj("circle", "large", "red"), Obj("knife", "small", None, "dagger")), "night")
    assert s.caption == "a large red circle and a small dagger at night"
    assert s.instruction == "remove the knife"
    imp = Scene((Obj("star", "small", "blue"), Obj("skull", "large", None, None, named=False)), "sand", "graveyard")
    assert imp.caption == "a small blue star at the graveyard"
    with pytest.raises(ValueError, match="counterfactual mode"):
        s.counterfactual("blur")


def test_counterfactual_pairs_for_guard_training():
    from train.tinyworld.data import counterfactual_pairs

    p = counterfactual_pairs("guard", 24, seed=0)
    assert len(p.prompts) == 24 and all(s.is_unsafe for s in p.scenes)
    assert all(split_of(c) == "guard" for c in p.prompts)
    assert all(i.startswith("remove the ") for i in p.instructions)
    diff = (p.unsafe != p.safe).any(-1)
    assert diff.any(axis=(1, 2)).all()
    assert not (diff & ~p.mask).any()
