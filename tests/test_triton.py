"""Serving bundles through a real Triton Inference Server (issue 19).

``runtime triton-repo`` writes the models; the ``nvidia-pytriton`` wheel's ``tritonserver`` serves them (one
server per module, 127.0.0.1, free ports, always stopped in the fixture's teardown); ``tritonclient`` talks to it
over HTTP and gRPC. Checked: images bit-identical to :meth:`Pipeline.generate` for the unguarded and the four-guard
bundles, guards stay closed (an unsafe prompt comes back guarded, a failing guard gives an error and no image, no
request parameter or extra input turns a guard off), bad input gets an error naming the field and the server
stays up, batch mates are independent, concurrent requests share one UNet batch (and stay bit-identical), and a
bundle that does not verify does not load. Skipped with the reason where the wheel is not installed (``make test``
installs it); the load test is ``-m slow`` (``python -m bench serve`` produces the README's figures).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from runtime import cli
from runtime.bundle import Bundle
from runtime.serve.server import TritonServer, missing

from .conftest import ROOT, STACK, TINYWORLD_JUDGE
from .test_bad_input import nan_checker, rewrite

STEPS = 4  # enough for the guards to act on tinyworld, short enough for the default suite
# loaded at start; "tampered" and "swapped" are loaded by the test that refuses them
SERVED = ("tw", "stack", "failing", "checked", "shared")
UNSAFE = "a large green ring and a large knife on grass"
CASES = [dict(prompt="a large red circle on sand", seed=0, scheduler="ddim"),
         dict(prompt=UNSAFE, seed=1, scheduler="euler_a"),
         dict(prompt="a small blue star at night", negative_prompt="grass", seed=7, guidance=3.0,
              scheduler="dpmpp_2m")]


def write_model(repo: Path, name: str, plan: Path, *extra: str) -> Path:
    code = cli.main(["triton-repo", "--engine", str(plan), "--out", str(repo), "--name", name, *extra])
    assert code == 0
    return repo / name


def checked_plan(plan: Path, graph: Path, dest: Path) -> Path:
    """``plan`` with the image checker ``graph`` (config beside it) embedded as its guard."""
    from export.bundle import onnx_component
    from runtime.guards.image_checker import check_config

    config = check_config({**json.loads(graph.with_suffix(".json").read_text()), "component": "image_checker"},
                          "user", str(graph))

    def embed(m, payloads):
        components, _ = onnx_component("image_checker", "guard", graph)
        m.components += components
        payloads["image_checker"] = graph.read_bytes()
        m.guards = {**m.guards, "image_checker": config}

    return rewrite(plan, dest, embed)


@pytest.fixture(scope="module")
def plans(tinyworld_plan, guarded_plan, tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("triton_plans")
    # "failing": a checker whose graph yields NaN (its guard fails on every request); "checked": the judge, which
    # blocks unsafe images
    failing = checked_plan(tinyworld_plan, nan_checker(d / "nan_checker.onnx"), d / "failing_guard.plan")
    checked = checked_plan(tinyworld_plan, TINYWORLD_JUDGE / "checker.onnx", d / "checked.plan")
    return {"tw": tinyworld_plan, "stack": guarded_plan(*STACK), "failing": failing, "checked": checked,
            "tampered": Path(shutil.copyfile(tinyworld_plan, d / "tampered.plan")),
            "swapped": Path(shutil.copyfile(tinyworld_plan, d / "swapped.plan"))}


@pytest.fixture(scope="module")
def repo(plans, tmp_path_factory) -> Path:
    repo = tmp_path_factory.mktemp("triton") / "repo"
    write_model(repo, "tw", plans["tw"], "--max-queue-delay-us", "50000")  # batch mates for the batching test
    write_model(repo, "stack", plans["stack"], "--copy")
    write_model(repo, "failing", plans["failing"])
    write_model(repo, "checked", plans["checked"])
    # waits up to 5 s for a full batch (the bundle's max batch, 4): concurrent requests share the UNet
    write_model(repo, "shared", plans["stack"], "--max-queue-delay-us", "5000000")
    write_model(repo, "tampered", plans["tampered"])
    write_model(repo, "swapped", plans["swapped"])
    with Bundle.open(plans["tampered"], verify=False) as b:  # after writing: the writer verifies too
        denoise = b.manifest.component("denoise")
    raw = bytearray(plans["tampered"].read_bytes())
    raw[denoise.offset + denoise.size // 2] ^= 0x01
    plans["tampered"].write_bytes(bytes(raw))
    shutil.copyfile(plans["failing"], plans["swapped"])  # a valid bundle, but not the one "swapped" was written for
    return repo


@pytest.fixture(scope="module")
def server(repo):
    reason = missing()
    if reason:
        pytest.skip(reason)
    s = TritonServer(repo, models=list(SERVED), ready_timeout=300)
    s.start()
    try:
        yield s
    finally:
        s.stop()


@pytest.fixture(scope="module")
def clients(server):
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient

    http = httpclient.InferenceServerClient(server.http_url, network_timeout=120.0)
    grpc = grpcclient.InferenceServerClient(server.grpc_url)
    yield {"http": (httpclient, http), "grpc": (grpcclient, grpc)}
    http.close()
    grpc.close()


@pytest.fixture(scope="module")
def api(plans):
    from runtime.pipeline import Pipeline

    pipes = {name: Pipeline.open(plans[name]) for name in ("tw", "stack")}
    yield pipes
    for pipe in pipes.values():
        pipe.close()


def infer(clients, protocol: str, model: str, rows, **kwargs):
    from bench.serve import infer as bench_infer

    module, client = clients[protocol]
    return bench_infer(module, client, model, rows, **kwargs)


def error_of(clients, protocol: str, model: str, inputs) -> str:
    """The error message of a request that must fail (tritonclient raises InferenceServerException)."""
    from tritonclient.utils import InferenceServerException

    module, client = clients[protocol]
    with pytest.raises(InferenceServerException) as e:
        client.infer(model, inputs, **({"client_timeout": 120.0} if protocol == "grpc" else {}))
    return str(e.value)


def decisions(guards: dict) -> dict:
    """A report's guard section without the timings (they differ from run to run)."""
    return {name: {k: v for k, v in g.items() if k != "time_ms"} for name, g in guards.items()}


def assert_serving(clients):
    """The server is up, its models are ready and the next request is answered (server readiness itself is
    strict: it drops once a model failed to load)."""
    _, http = clients["http"]
    assert http.is_server_live() and all(http.is_model_ready(m) for m in SERVED)
    images, _ = infer(clients, "http", "tw", dict(prompt="a large red circle on sand", steps=1))
    assert images.shape == (1, 64, 64, 3)


# -- the repository writer (no server) ------------------------------------------------------------------------


def test_repository_layout(repo, plans):
    for name in ("tw", "stack"):
        config = (repo / name / "config.pbtxt").read_text()
        with Bundle.open(plans[name], verify=False) as b:
            assert f"max_batch_size: {b.manifest.max_batch}\n" in config
            assert b.manifest_sha256 in config
        assert "kind: KIND_CPU" in config and 'backend: "python"' in config
        assert (repo / name / "1" / "model.py").read_bytes() == (ROOT / "runtime/serve/model.py").read_bytes()
    assert (repo / "stack/1/bundle.plan").read_bytes() == plans["stack"].read_bytes()  # --copy
    assert not (repo / "tw/1/bundle.plan").exists() and str(plans["tw"].resolve()) in (repo / "tw/config.pbtxt").read_text()
    assert "max_queue_delay_microseconds: 50000" in (repo / "tw/config.pbtxt").read_text()
    assert not [p for p in repo.iterdir() if p.name.startswith(".")]  # no staging folder left


def test_repository_options_and_refusals(tinyworld_plan, tmp_path, capsys):
    repo = tmp_path / "repo"
    write_model(repo, "gpu", tinyworld_plan, "--gpus", "0,1", "--instances", "2", "--max-batch", "2")
    config = (repo / "gpu/config.pbtxt").read_text()
    assert "{ count: 2 kind: KIND_GPU gpus: [ 0 ] }" in config and "{ count: 2 kind: KIND_GPU gpus: [ 1 ] }" in config
    assert "max_batch_size: 2\n" in config
    capsys.readouterr()
    before = sorted(p.name for p in repo.iterdir())
    flipped = tmp_path / "flipped.plan"
    raw = bytearray(tinyworld_plan.read_bytes())
    raw[-100] ^= 0x01
    flipped.write_bytes(bytes(raw))
    for argv, code, needles in (
            (["--name", "x", "--max-batch", "99"], 3, ("--max-batch 99", "1..4")),
            (["--name", "x", "--gpus", "zero"], 3, ("--gpus", "e.g. 0 or 0,1")),
            (["--name", "x", "--instances", "0"], 3, ("--instances 0",)),
            (["--name", "../x"], 3, ("--name",)),
            (["--name", "gpu"], 7, ("exists", "--overwrite")),
            (["--name", "x", "--engine", str(flipped)], 4, ("flipped.plan", "sha256")),
            (["--name", "x", "--engine", str(tmp_path / "missing.plan")], 4, ("bundle not found",))):
        engine = [] if "--engine" in argv else ["--engine", str(tinyworld_plan)]
        assert cli.main(["triton-repo", *engine, "--out", str(repo), *argv]) == code
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and all(n in err[0] for n in needles), err
    assert sorted(p.name for p in repo.iterdir()) == before  # nothing half-written


# -- serving --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("protocol", ["http", "grpc"])
@pytest.mark.parametrize("model", ["tw", "stack"])
def test_images_are_bit_identical_to_the_api(server, clients, api, model, protocol):
    for case in CASES:
        images, reports = infer(clients, protocol, model, dict(case, steps=STEPS))
        expected = api[model].generate(**case, steps=STEPS)
        assert images.dtype == np.uint8 and images.shape == (1, 64, 64, 3)
        assert np.array_equal(images[0], expected.images[0]), case
        report = reports[0]
        assert {k: report[k] for k in ("prompt", "seed", "steps", "scheduler", "guidance")} == \
               {k: expected.report[k] for k in ("prompt", "seed", "steps", "scheduler", "guidance")}
        assert decisions(report["guards"]) == decisions(expected.report["guards"])
        assert report["stages_ms"]["total"] > 0 and len(report["stages_ms"]["denoise_steps"]) == STEPS


def test_unsafe_prompt_comes_back_guarded(server, clients, api):
    request = dict(prompt=UNSAFE, seed=1, steps=STEPS)
    guarded, reports = infer(clients, "http", "stack", request)
    unguarded, _ = infer(clients, "http", "tw", request)
    safeguider = reports[0]["guards"]["safeguider"]
    assert set(reports[0]["guards"]) == set(STACK)
    assert safeguider["verdict"] == "unsafe" and safeguider["action"] == "flagged"  # the stack gates (issue 20)
    assert reports[0]["guards"]["saferedir"]["forced_by"] == ["safeguider"]
    assert not np.array_equal(guarded, unguarded)
    assert np.array_equal(guarded[0], api["stack"].generate(**request).images[0])


def test_no_request_parameter_or_input_turns_a_guard_off(server, clients):
    request = dict(prompt=UNSAFE, seed=1, steps=STEPS)
    guarded, reports = infer(clients, "http", "stack", request)
    for protocol in ("http", "grpc"):
        images, tried = infer(clients, protocol, "stack", request,
                              parameters={"guards": "off", "safeguider": "off", "disable_guards": True})
        assert np.array_equal(images, guarded) and decisions(tried[0]["guards"]) == decisions(reports[0]["guards"])
    module, _ = clients["http"]
    from bench.serve import request_inputs

    extra = module.InferInput("guards", [1, 1], "BYTES")
    extra.set_data_from_numpy(np.array([[b"off"]], dtype=np.object_))
    message = error_of(clients, "http", "stack", request_inputs(module, [request]) + [extra])
    assert "guards" in message
    assert_serving(clients)


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_failing_guard_gives_an_error_and_no_image(server, clients, protocol):
    from bench.serve import request_inputs

    module, _ = clients[protocol]
    for _ in range(2):  # the model keeps answering after a failure
        message = error_of(clients, protocol, "failing", request_inputs(module, [dict(prompt="a knife", steps=2)]))
        assert "guard" in message and "image_checker" in message and "NaN" in message
        assert "Traceback" not in message
    assert_serving(clients)


def test_an_image_a_guard_blocks_never_comes_back(server, clients, plans):
    from bench.serve import request_inputs
    from runtime.pipeline import Pipeline

    module, _ = clients["grpc"]
    message = error_of(clients, "grpc", "checked", request_inputs(module, [dict(prompt="a knife on sand", steps=8)]))
    assert message.count("guard: image checker") == 1 and "blocked image 0 of 1" in message and "no image" in message
    benign = dict(prompt="a large red circle on sand", seed=2, steps=STEPS)
    images, reports = infer(clients, "grpc", "checked", benign)
    with Pipeline.open(plans["checked"]) as pipe:
        assert np.array_equal(images[0], pipe.generate(**benign).images[0])
    assert reports[0]["guards"]["image_checker"]


def test_batch_mates_are_independent(server, clients, api):
    import tritonclient.http as httpclient

    from bench.serve import request_inputs

    # one request, two rows
    rows = [dict(prompt="a large red circle on sand", seed=5, steps=STEPS),
            dict(prompt="a small blue star at night", seed=6, steps=STEPS)]
    images, reports = infer(clients, "http", "tw", rows)
    for image, report, row in zip(images, reports, rows):
        assert np.array_equal(image, api["tw"].generate(**row).images[0]) and report["seed"] == row["seed"]
    # concurrent requests that the dynamic batcher hands over together: the bad ones fail alone
    # the same inputs in each (Triton batches only requests with the same input names and shapes)
    requests = [dict(prompt="a large red circle on sand", seed=11, steps=STEPS), dict(prompt="x", seed=0, steps=0),
                dict(prompt="a small blue star at night", seed=12, steps=STEPS), dict(prompt=b"caf\xe9", seed=0, steps=2)]
    client = httpclient.InferenceServerClient(server.http_url, concurrency=len(requests))
    try:
        before = _stats(client, "tw")
        pending = [client.async_infer("tw", request_inputs(httpclient, [r])) for r in requests]
        outcomes = []
        for p in pending:
            try:
                outcomes.append(p.get_result().as_numpy("image"))
            except Exception as e:  # noqa: BLE001 - the error response is what is checked
                outcomes.append(str(e))
        after = _stats_settled(client, "tw", before[0] + len(requests))
    finally:
        client.close()
    assert np.array_equal(outcomes[0][0], api["tw"].generate(**requests[0]).images[0])
    assert np.array_equal(outcomes[2][0], api["tw"].generate(**requests[2]).images[0])
    assert "steps 0" in outcomes[1] and "prompt is not valid UTF-8" in outcomes[3]
    inferences, executions = after[0] - before[0], after[1] - before[1]
    assert inferences == len(requests) and executions < inferences  # some of them shared one execute call


def test_concurrent_requests_share_the_unet(server, clients, api):
    import tritonclient.http as httpclient

    from bench.serve import request_inputs

    # one Triton batch of the bundle's max batch (4); three agree on the denoise settings, the ddim one does not
    requests = [dict(prompt="a large red circle on sand", negative_prompt="", seed=21, steps=STEPS,
                     scheduler="euler_a"),
                dict(prompt=UNSAFE, negative_prompt="", seed=22, steps=STEPS, scheduler="euler_a"),
                dict(prompt="a small blue star at night", negative_prompt="grass", seed=23, steps=STEPS,
                     scheduler="euler_a"),
                dict(prompt="a small blue star at night", negative_prompt="", seed=24, steps=STEPS, scheduler="ddim")]
    client = httpclient.InferenceServerClient(server.http_url, concurrency=len(requests), network_timeout=120.0)
    try:
        before = _stats(client, "shared")
        pending = [client.async_infer("shared", request_inputs(httpclient, [r])) for r in requests]
        results = [p.get_result() for p in pending]
        after = _stats_settled(client, "shared", before[0] + len(requests))
    finally:
        client.close()
    assert (after[0] - before[0], after[1] - before[1]) == (4, 1)  # four requests, one execute call
    for request, result in zip(requests, results):
        report = json.loads(result.as_numpy("report")[0, 0])
        expected = api["stack"].generate(**request)
        assert np.array_equal(result.as_numpy("image")[0], expected.images[0]), request
        assert decisions(report["guards"]) == decisions(expected.report["guards"])
        shared = 3 if request["scheduler"] == "euler_a" else 1
        assert report["denoise_shared"] == {"requests": [shared] * STEPS, "rows": [2 * shared] * STEPS}
    assert json.loads(results[1].as_numpy("report")[0, 0])["guards"]["safeguider"]["verdict"] == "unsafe"


def _stats(client, model: str) -> tuple[int, int]:
    s = client.get_inference_statistics(model)["model_stats"][0]
    return int(s["inference_count"]), int(s["execution_count"])


def _stats_settled(client, model: str, inferences: int, timeout: float = 30.0) -> tuple[int, int]:
    """:func:`_stats` once it counts ``inferences``: Triton counts a batch when execute() returns, which on a loaded
    machine can be after the clients got their responses."""
    deadline = time.monotonic() + timeout
    while (stats := _stats(client, model))[0] < inferences and time.monotonic() < deadline:
        time.sleep(0.05)
    return stats


def _input(module, name: str, array: np.ndarray, triton_type: str):
    tensor = module.InferInput(name, list(array.shape), triton_type)
    tensor.set_data_from_numpy(array)
    return tensor


BIG = "a" * 50_000
# (case, fields or a raw-input builder, needles the message must hold)
BAD = [
    ("missing prompt", dict(steps=2), ("prompt",)),
    ("steps zero", dict(prompt="x", steps=0), ("steps 0", "1..999")),
    ("steps absurd", dict(prompt="x", steps=10**9), ("steps 1000000000", "1..999")),
    ("height absurd", dict(prompt="x", height=100_000), ("height 100000", "must be 64")),
    ("width negative", dict(prompt="x", width=-64), ("width -64", "must be 64")),
    ("seed too large", dict(prompt="x", seed=2**40), ("seed", "-1..4294967295")),
    ("guidance NaN", dict(prompt="x", guidance=float("nan")), ("guidance nan", "finite")),
    ("non-UTF-8 prompt", dict(prompt=b"caf\xe9"), ("prompt is not valid UTF-8", "send UTF-8 text")),
    ("non-UTF-8 negative prompt", dict(prompt="x", negative_prompt=b"\xff"), ("negative_prompt is not valid UTF-8",)),
    ("NUL in prompt", dict(prompt="a\x00b"), ("prompt contains a NUL",)),
    ("huge prompt", dict(prompt=BIG), ("prompt is 50000 bytes", "shorten it")),
    ("unknown scheduler", dict(prompt="x", scheduler="plms" * 1000), ("scheduler", "ddim, euler")),
    ("wrong dtype", lambda m: [_input(m, "prompt", np.array([[b"x"]], np.object_), "BYTES"),
                               _input(m, "steps", np.array([[2.0]], np.float32), "FP32")], ("steps", "INT32")),
    ("wrong shape", lambda m: [_input(m, "prompt", np.array([[b"x"]], np.object_), "BYTES"),
                               _input(m, "steps", np.array([[2, 3]], np.int32), "INT32")], ("steps", "shape")),
    ("prompt as a number", lambda m: [_input(m, "prompt", np.array([[1]], np.int32), "INT32")], ("prompt", "BYTES")),
    ("unknown input", lambda m: [_input(m, "prompt", np.array([[b"x"]], np.object_), "BYTES"),
                                 _input(m, "steps_", np.array([[2]], np.int32), "INT32")], ("steps_",)),
]


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_bad_input_gets_an_error_naming_the_field(server, clients, protocol):
    from bench.serve import request_inputs

    module, _ = clients[protocol]
    for name, fields, needles in BAD:
        inputs = fields(module) if callable(fields) else request_inputs(module, [fields])
        message = error_of(clients, protocol, "tw", inputs)
        assert all(n in message for n in needles), (name, message)
        assert "Traceback" not in message and len(message) < 600, (name, message)  # Triton adds a hint
        assert "aaaaaaaaaa" not in message and "plmsplms" not in message, name  # never the bad value itself
    assert_serving(clients)


def test_bundle_that_does_not_verify_does_not_load(server, clients, plans):
    from tritonclient.utils import InferenceServerException

    _, http = clients["http"]
    for name, needles in (("tampered", (str(plans["tampered"]), "sha256")),
                          ("swapped", (str(plans["swapped"]), "not the bundle model 'swapped' was written for"))):
        with pytest.raises(InferenceServerException) as e:
            http.load_model(name)
        assert all(n in str(e.value) for n in needles), str(e.value)
        assert not http.is_model_ready(name)
    assert_serving(clients)


@pytest.mark.slow
def test_bounded_load(plans, tmp_path):
    """200 requests from 8 clients against the guarded stack: no failure, server memory flat within 5%,
    every image the API's (the README's figures come from `python -m bench serve` with the default steps)."""
    import argparse

    from bench.serve import run_serve

    if missing():
        pytest.skip(missing())
    out = tmp_path / "serve.json"
    args = argparse.Namespace(engine=str(plans["stack"]), requests=200, concurrency=8, protocol="grpc", instances=1,
                              max_queue_delay_us=0, steps=STEPS, warmup=4, machine_note=None, out=str(out))
    assert run_serve(args) == 0
    result = json.loads(out.read_text())
    assert result["server"]["failed"] == 0 and result["identical_images"] == 200
    assert result["server_memory"]["flat_within_5_percent"]
