"""``train/loop.py``: the warm-up + cosine schedule every trainer uses (the same values the trainers computed
before it existed), atomic checkpoints, and ``--resume`` continuing to the same step count."""

from __future__ import annotations

import json
import math

import pytest

from .conftest import TINYWORLD

torch = pytest.importorskip("torch")


def _old_safepatch_factor(step, warmup, total):  # train/safepatch/train.py `_schedule` before train/loop.py
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))


@pytest.mark.parametrize("total,warmup", [(420, 50), (700, 50), (10, 0), (5, 5), (1, 0)])
def test_schedule_values(total, warmup):
    from train.loop import lr_schedule, warmup_cosine

    for step in range(total + 3):
        assert warmup_cosine(step, total, warmup) == _old_safepatch_factor(step, warmup, total)
    if warmup == 0:  # SafeCtrl stage 1's inline cosine: lr * 0.5 * (1 + cos(pi * step / steps))
        for step in range(total):
            assert math.isclose(warmup_cosine(step, total), 0.5 * (1 + math.cos(math.pi * step / total)), rel_tol=1e-15)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2e-4)
    sched, seen = lr_schedule(opt, total, warmup), []
    for _ in range(total):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == pytest.approx([2e-4 * warmup_cosine(s, total, warmup) for s in range(total)], rel=1e-12, abs=0)
    assert seen[0] == pytest.approx(2e-4 / warmup if warmup else 2e-4) and min(seen) >= 0


def _toy(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Dropout(0.5), torch.nn.Linear(8, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    from train.loop import lr_schedule

    return model, opt, lr_schedule(opt, 10, warmup=2)


def _steps(model, opt, sched, n):
    for _ in range(n):
        loss = model(torch.randn(16, 4)).pow(2).mean()  # global RNG: data and dropout
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()


def test_checkpoint_resume_continues_exactly(tmp_path):
    from train.loop import resume, save_checkpoint

    path = tmp_path / "ckpt.pt"
    assert resume(path, *_toy()[:2]) == (0, [], {})
    model, opt, sched = _toy()
    _steps(model, opt, sched, 3)
    save_checkpoint(path, model, opt, 3, [{"step": 3}], sched, stage=1)
    _steps(model, opt, sched, 4)                       # uninterrupted: 7 steps

    fresh, fresh_opt, fresh_sched = _toy(seed=1)       # another process: other init, other RNG
    step, log, extra = resume(path, fresh, fresh_opt, fresh_sched)
    assert (step, log, extra) == (3, [{"step": 3}], {"stage": 1})
    _steps(fresh, fresh_opt, fresh_sched, 4)
    for a, b in zip(model.state_dict().values(), fresh.state_dict().values()):
        assert torch.equal(a, b)
    assert fresh_opt.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]
    torch.save({"model": {}, "opt": {}, "step": 3, "log": []}, tmp_path / "old.pt")  # a pre-train/loop.py file
    with pytest.raises(ValueError, match="old.pt: not a checkpoint written by train/loop.py"):
        resume(tmp_path / "old.pt", fresh, fresh_opt)


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    import train.loop as loop

    model, opt, _ = _toy()
    path = tmp_path / "ckpt.pt"
    loop.save_checkpoint(path, model, opt, 1, [])
    before = path.read_bytes()

    def broken(obj, f):
        open(f, "wb").write(b"partial")
        raise KeyboardInterrupt
    monkeypatch.setattr(loop.torch, "save", broken)
    with pytest.raises(KeyboardInterrupt):
        loop.save_checkpoint(path, model, opt, 2, [])
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]


TRAINERS = {  # guard: (tiny options, the option that counts steps, where the checkpoint goes); the renderer path:
    # tiny sizes with no data step (the --data path runs end to end in tests/test_train_prompt_only.py)
    "safeguider": (["--prompts", "120", "--deletions", "1"], "--epochs", "out/checkpoint.pt"),
    "saferedir": (["--renderer", "--cache", "work", "--prompts", "4", "--pairs", "4", "--text-prompts", "10", "--batch", "8",
                   "--gen-steps", "0", "--ckpt-every", "2"], "--cls-steps", "work/stage1.pt"),
    "safepatch": (["--renderer", "--cache", "work", "--unsafe", "8", "--benign", "8", "--gate-prompts", "200", "--batch-size", "4",
                   "--save-every", "1"], "--steps", "out/checkpoint.pt"),
    "safectrl": (["--renderer", "--work", "work", "--pairs", "8", "--benign", "8", "--eval-pairs", "8", "--feature-draws", "1",
                  "--stage1-batch", "4", "--stage2-steps", "0"], "--stage1-steps", "work/stage1.pt"),
}


@pytest.fixture
def keep_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("guard", list(TRAINERS))
def test_trainer_resumes_to_the_same_step_count(guard, tmp_path, keep_threads):
    """``python -m train <guard>`` stopped after 1 step (epoch), then ``--resume`` with 3: the checkpoint reaches
    step 3, the log keeps the stopped run's entries, and the written weights load."""
    import guards
    from train.__main__ import main

    options, counter, ckpt = TRAINERS[guard]
    options = [str(tmp_path / o) if o in ("work", "out") else o for o in options]
    args = [guard, "--model", str(TINYWORLD), "--out", str(tmp_path / "out"), *options]
    assert main([*args, counter, "1"]) == 0
    first = torch.load(tmp_path / ckpt, weights_only=False)
    assert first["step"] == 1
    assert main([*args, counter, "3", "--resume"]) == 0
    state = torch.load(tmp_path / ckpt, weights_only=False)
    assert state["step"] == 3 and state["log"][:len(first["log"])] == first["log"]
    assert guards.load_config(guard, tmp_path / "out").NAME == guard
    if guard == "safeguider":
        history = json.loads((tmp_path / "out" / "train_log.json").read_text())["history"]
        assert [h["epoch"] for h in history] == [1, 2, 3] and history[0] == first["log"][0]
