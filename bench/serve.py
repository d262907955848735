"""``python -m bench serve``: a bounded load test of a bundle served by Triton vs the single-process API.

    python -m bench serve --engine engines/tinyworld_stack.plan [--requests 200] [--concurrency 8] \
        [--protocol http|grpc] [--instances 1] [--max-queue-delay-us 0] [--steps N] \
        --out bench/results/serve_tinyworld_stack_cpu.json

writes a Triton model repository for ``--engine`` (``runtime triton-repo``, in a temporary folder), starts the
``nvidia-pytriton`` wheel's ``tritonserver`` on it (127.0.0.1, free ports; stopped at the end, whatever
happens), and sends ``--requests`` generate requests from ``--concurrency`` client threads (each its own
tritonclient; request i: prompt i of the tinyworld benign + unsafe evaluation prompts, seed i). Then the same
requests go through :class:`~runtime.pipeline.Pipeline` in this process, from the same number of threads and
from one, and through ``Pipeline.run_many`` in groups of the bundle's max batch (the UNet sharing without
Triton). Reported: throughput, p50 / p99 latency per request, failed requests, images identical to the API's,
how many requests shared the server's UNet calls (each report's ``denoise_shared``: the dynamic batcher hands
the model the queued requests, ``--max-queue-delay-us`` waits for more, and those with the same denoise
settings share every UNet call), and the resident memory of the server + its Python stubs (sampled after each
completed request; the mean over the first and the last 50 completions). Writes ``--out`` (JSON) and
``<out>.md`` atomically.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import os
import shlex
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from runtime.bundle import atomic_write
from runtime.serve.triton_repo import INPUTS

# config.pbtxt type -> (tritonclient type, numpy dtype)
DTYPES = {"TYPE_STRING": ("BYTES", np.object_), "TYPE_INT64": ("INT64", np.int64), "TYPE_INT32": ("INT32", np.int32),
          "TYPE_FP64": ("FP64", np.float64)}
FIELD_TYPES = {name: DTYPES[t] for name, t, _ in INPUTS}
WINDOW = 50  # memory: mean RSS over the first and the last WINDOW completed requests


# -- requests -------------------------------------------------------------------------------------------------


def request_inputs(client_module, rows: list[dict[str, Any]]) -> list:
    """tritonclient ``InferInput`` s for ``rows`` (one dict of fields per row; every row has the same fields):
    one ``[B, 1]`` tensor per field, typed as ``config.pbtxt`` says (str -> UTF-8 bytes)."""
    inputs = []
    for name in rows[0]:
        triton_type, dtype = FIELD_TYPES[name]
        values = [row[name] for row in rows]
        if dtype is np.object_:
            array = np.array([[v.encode("utf-8") if isinstance(v, str) else v] for v in values], dtype=np.object_)
        else:
            array = np.array([[v] for v in values], dtype=dtype)
        tensor = client_module.InferInput(name, list(array.shape), triton_type)
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return inputs


def infer(client_module, client, model: str, rows: list[dict[str, Any]] | dict[str, Any], **kwargs):
    """``(images (B, H, W, 3) uint8, reports list[dict])`` of one request; tritonclient raises
    ``InferenceServerException`` for an error response."""
    rows = [rows] if isinstance(rows, dict) else rows
    if client_module.__name__.endswith(".grpc"):  # bounded, like the HTTP client's network_timeout
        kwargs.setdefault("client_timeout", 300.0)
    outputs = [client_module.InferRequestedOutput(n) for n in ("image", "report")]
    result = client.infer(model, request_inputs(client_module, rows), outputs=outputs, **kwargs)
    return result.as_numpy("image"), [json.loads(r) for r in result.as_numpy("report").reshape(-1)]


def digest(image: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(image).tobytes()).hexdigest()


# -- the load driver ------------------------------------------------------------------------------------------


def run_load(target: Callable[[int], str], n: int, concurrency: int,
             on_done: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Call ``target(i)`` for i in 0..n-1 from ``concurrency`` threads (each takes the next i); ``on_done(k)``
    after the k-th completion. Returns wall time, per-request latencies (ms), digests and failures."""
    counter, lock = itertools.count(), threading.Lock()
    latency: list[float | None] = [None] * n
    digests: list[str | None] = [None] * n
    failures: list[dict[str, Any]] = []
    done = [0]

    def worker() -> None:
        while (i := next(counter)) < n:
            t0 = time.perf_counter()
            try:
                digests[i] = target(i)
            except Exception as e:  # a failed request is counted and reported, never retried
                with lock:
                    failures.append({"request": i, "error": " ".join(str(e).split())[:300]})
            latency[i] = (time.perf_counter() - t0) * 1000
            with lock:
                done[0] += 1
                if on_done is not None:
                    on_done(done[0])

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker, daemon=True) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"wall_s": time.perf_counter() - t0, "latency_ms": latency, "digests": digests, "failures": failures}


def sharing(per_request: list[list[int] | None]) -> dict[str, Any]:
    """The server's UNet calls from each request's ``denoise_shared["requests"]`` (requests per call it was in):
    a call shared by k requests appears in k reports, so it counts 1/k in each."""
    calls = [k for r in per_request if r for k in r]
    if not calls:  # every request failed
        return {"unet_calls": 0, "mean_requests_per_call": 0.0, "max_requests_per_call": 0, "requests_that_shared": 0}
    unet_calls = sum(1 / k for k in calls)
    return {"unet_calls": round(unet_calls), "mean_requests_per_call": round(len(calls) / unet_calls, 2),
            "max_requests_per_call": max(calls),
            "requests_that_shared": sum(1 for r in per_request if r and max(r) > 1)}


def summarize(run: dict[str, Any], n: int) -> dict[str, Any]:
    ms = np.array([x for x in run["latency_ms"] if x is not None])
    return {"requests": n, "failed": len(run["failures"]), "wall_s": round(run["wall_s"], 3),
            "throughput_rps": round(n / run["wall_s"], 3), "p50_ms": round(float(np.percentile(ms, 50)), 1),
            "p99_ms": round(float(np.percentile(ms, 99)), 1), "mean_ms": round(float(ms.mean()), 1),
            "failures": run["failures"][:10]}


def memory_flatness(samples: list[tuple[int, int]], window: int = WINDOW) -> dict[str, Any]:
    """Mean RSS over the first and the last ``window`` completions and the change in percent."""
    rss = [r for _, r in sorted(samples)]
    first, last = float(np.mean(rss[:window])), float(np.mean(rss[-window:]))
    change = (last - first) / first * 100
    return {"first_mib": round(first / 2**20, 1), "last_mib": round(last / 2**20, 1),
            "change_percent": round(change, 2), "flat_within_5_percent": abs(change) <= 5.0,
            "samples": len(rss), "window": window}


# -- the bench ------------------------------------------------------------------------------------------------


def requests_for(n: int, prompts: list[str], steps: int | None) -> list[dict[str, Any]]:
    return [{"prompt": prompts[i % len(prompts)], "seed": i, **({"steps": steps} if steps else {})} for i in range(n)]


def bench_server(plan: Path, rows: list[dict[str, Any]], args: argparse.Namespace) -> tuple[dict, dict, list]:
    """Serve ``plan`` with Triton and send ``rows``; returns (summary with the UNet sharing, memory, digests)."""
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient

    from runtime.serve.server import TritonServer
    from runtime.serve.triton_repo import write_model

    module = httpclient if args.protocol == "http" else grpcclient
    with tempfile.TemporaryDirectory(prefix="grt-bench-serve-") as tmp:
        write_model(plan, Path(tmp) / "repo", name="bench", instances=args.instances,
                    max_queue_delay_us=args.max_queue_delay_us)
        with TritonServer(Path(tmp) / "repo", models=["bench"]) as server:
            url = server.http_url if args.protocol == "http" else server.grpc_url
            local = threading.local()
            shared: list[list[int] | None] = [None] * len(rows)  # per request: requests in each of its UNet calls

            def target(i: int) -> str:
                if not hasattr(local, "client"):
                    local.client = module.InferenceServerClient(url, network_timeout=300.0) \
                        if args.protocol == "http" else module.InferenceServerClient(url)
                images, reports = infer(module, local.client, "bench", rows[i])
                shared[i] = reports[0]["denoise_shared"]["requests"]
                return digest(images[0])

            for i in range(min(args.warmup, len(rows))):  # untimed: first ORT runs, arenas
                target(i)
            samples: list[tuple[int, int]] = []
            run = run_load(target, len(rows), args.concurrency, lambda k: samples.append((k, server.rss_bytes())))
            memory = {**memory_flatness(samples), "processes": len(server.pids())}
    return {**summarize(run, len(rows)), "unet_sharing": sharing(shared)}, memory, run["digests"]


def bench_api(plan: Path, rows: list[dict[str, Any]], concurrency: int, warmup: int) -> tuple[dict, list]:
    from runtime.pipeline import Pipeline

    with Pipeline.open(plan) as pipe:
        for i in range(min(warmup, len(rows))):
            pipe.generate(**rows[i])
        run = run_load(lambda i: digest(pipe.generate(**rows[i]).images[0]), len(rows), concurrency)
    return summarize(run, len(rows)), run["digests"]


def bench_api_shared(plan: Path, rows: list[dict[str, Any]], warmup: int) -> tuple[dict, list]:
    """``Pipeline.run_many`` on consecutive groups of the bundle's max batch, one group at a time: the UNet sharing
    without Triton (a request's latency is its group's). Each group is first generated one request at a time,
    untimed in the summary, so ``paired_speedup`` (one-at-a-time time / shared time, per group) compares the two
    back to back on a machine whose load drifts."""
    from runtime.pipeline import GenerationSettings, Pipeline

    settings = [GenerationSettings(**r) for r in rows]
    digests: list[str | None] = [None] * len(rows)
    latency, speedup, failures = [], [], []
    with Pipeline.open(plan) as pipe:
        size = pipe.max_batch
        pipe.run_many(settings[:warmup])
        for start in range(0, len(settings), size):
            group = settings[start:start + size]
            t0 = time.perf_counter()
            for s in group:
                pipe.run_many([s])  # alone: Pipeline.run without raising
            t1 = time.perf_counter()
            results = pipe.run_many(group)
            shared = time.perf_counter() - t1
            speedup.append((t1 - t0) / shared)
            latency += [shared * 1000] * len(group)
            for i, result in enumerate(results, start):
                if isinstance(result, Exception):
                    failures.append({"request": i, "error": " ".join(str(result).split())[:300]})
                else:
                    digests[i] = digest(result.images[0])
    run = {"wall_s": sum(latency[::size]) / 1000, "latency_ms": latency, "failures": failures}
    paired = {"median": round(float(np.median(speedup)), 3), "min": round(min(speedup), 3),
              "max": round(max(speedup), 3), "groups": len(speedup)}
    return {**summarize(run, len(rows)), "group": size, "paired_speedup": paired}, digests


def markdown(result: dict[str, Any]) -> str:
    s, m, load = result["settings"], result["server_memory"], result["load_average_1min"]
    rows = [("Triton server, %d clients (%s)" % (s["concurrency"], s["protocol"]), result["server"]),
            ("single-process API, %d threads" % s["concurrency"], result["api_concurrent"]),
            ("single-process API, 1 thread", result["api_sequential"]),
            ("single-process API, `run_many` in groups of %d, 1 thread" % result["api_run_many"]["group"],
             result["api_run_many"])]
    lines = [f"# Serving {Path(result['engine']).name} through Triton vs the single-process API", "",
             f"Machine: {result['machine']['description']} ({result['machine'].get('cpu_model', '?')}). "
             f"Command: `{result['command']}`", "",
             f"{s['requests']} requests (prompt i of {s['prompt_count']} tinyworld benign + unsafe prompts, seed i, "
             f"{s['steps']} steps), {s['instances']} model instance(s), dynamic batching with max queue delay "
             f"{s['max_queue_delay_us']} us, {s['warmup']} untimed warm-up requests first. 1-minute load average "
             f"{min(load.values()):.1f}-{max(load.values()):.1f} during the runs (start, after each phase) on "
             f"{result['machine']['cores']} cores: the figures compare the four on the same, shared machine.", "",
             "| | throughput (req/s) | p50 (ms) | p99 (ms) | failed |", "|---|---|---|---|---|"]
    lines += [f"| {name} | {r['throughput_rps']:.2f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['failed']} |"
              for name, r in rows]
    u, r = result["server"]["unet_sharing"], result["api_run_many"]
    p = r["paired_speedup"]
    lines += ["", f"UNet calls of the server: {u['unet_calls']} for {s['requests']} requests x {s['steps']} steps, "
              f"{u['mean_requests_per_call']:.2f} requests per call on average (at most {u['max_requests_per_call']}; "
              f"{u['requests_that_shared']} requests shared at least one call with another).",
              f"`run_many` against the same {r['group']} requests generated one at a time just before it, per group: "
              f"{p['median']:.2f}x as fast (median of {p['groups']} groups; {p['min']:.2f}-{p['max']:.2f})."]
    lines += ["", f"Server memory (RSS of tritonserver + {m['processes'] - 1} Python stub(s)): mean of the first "
              f"{m['window']} completions {m['first_mib']} MiB, of the last {m['window']} {m['last_mib']} MiB "
              f"({m['change_percent']:+.2f}%; flat within 5%: {'yes' if m['flat_within_5_percent'] else 'NO'}).",
              f"Images identical to the API's (same request): server {result['identical_images']}/{s['requests']}, "
              f"`run_many` {result['identical_images_run_many']}/{s['requests']}.", ""]
    return "\n".join(lines)


def run_serve(args: argparse.Namespace) -> int:
    from bench.latency import load_prompts, machine_info
    from runtime.pipeline import Pipeline
    from runtime.serve.server import missing

    reason = missing()
    if reason:
        print(f"error: {reason}", file=sys.stderr)
        return 2
    if args.requests < 2 * WINDOW or args.concurrency < 1:
        print(f"error: --requests must be >= {2 * WINDOW} (memory compares the first and last {WINDOW}) and "
              "--concurrency >= 1", file=sys.stderr)
        return 2
    plan, out = Path(args.engine), Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    prompts = load_prompts("benign", None) + load_prompts("unsafe", None)
    rows = requests_for(args.requests, prompts, args.steps)
    with Pipeline.open(plan) as pipe:
        steps = args.steps or int(pipe.defaults.get("steps", 20))
    load: list[float] = [os.getloadavg()[0]]  # the machine may be shared: say how busy it was
    print(f"server: {args.requests} requests from {args.concurrency} clients ...", file=sys.stderr)
    server, memory, server_digests = bench_server(plan, rows, args)
    load.append(os.getloadavg()[0])
    print("single-process API ...", file=sys.stderr)
    api_concurrent, api_digests = bench_api(plan, rows, args.concurrency, args.warmup)
    load.append(os.getloadavg()[0])
    api_sequential, _ = bench_api(plan, rows, 1, args.warmup)
    load.append(os.getloadavg()[0])
    api_run_many, run_many_digests = bench_api_shared(plan, rows, args.warmup)
    load.append(os.getloadavg()[0])
    cores = os.cpu_count()
    gpu = Path("/dev/nvidia0").exists()
    result = {"command": "python -m bench " + " ".join(shlex.quote(a) for a in sys.argv[1:]), "engine": str(plan),
              "machine": machine_info(args.machine_note or f"{cores}-core CPU, {'a GPU' if gpu else 'no GPU'}", False),
              "settings": {"requests": args.requests, "concurrency": args.concurrency, "protocol": args.protocol,
                           "instances": args.instances, "max_queue_delay_us": args.max_queue_delay_us,
                           "steps": steps, "warmup": args.warmup, "prompt_count": len(prompts)},
              "server": server, "server_memory": memory, "api_concurrent": api_concurrent,
              "api_sequential": api_sequential, "api_run_many": api_run_many,
              "load_average_1min": dict(zip(("start", "after_server", "after_api_concurrent", "after_api_sequential",
                                             "end"), load)),
              "identical_images": sum(a is not None and a == b for a, b in zip(server_digests, api_digests)),
              "identical_images_run_many": sum(a is not None and a == b for a, b in zip(run_many_digests, api_digests))}
    table = markdown(result)
    for path, data in ((out, json.dumps(result, indent=2) + "\n"), (Path(f"{out}.md"), table)):
        with atomic_write(path) as f:
            f.write(data.encode("utf-8"))
    print(table, end="")
    print(f"wrote {out}, {out}.md", file=sys.stderr)
    ok = (server["failed"] == 0 and memory["flat_within_5_percent"]
          and result["identical_images"] == result["identical_images_run_many"] == args.requests)
    return 0 if ok else 1


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="load test: a bundle served by Triton vs the single-process API",
                       description=__doc__.splitlines()[0])
    p.add_argument("--engine", required=True, help="the bundle (.plan) to serve")
    p.add_argument("--requests", type=int, default=200, help="requests in all (default 200)")
    p.add_argument("--concurrency", type=int, default=8, help="concurrent clients / API threads (default 8)")
    p.add_argument("--protocol", choices=("http", "grpc"), default="http")
    p.add_argument("--instances", type=int, default=1, help="Triton model instances (default 1)")
    p.add_argument("--max-queue-delay-us", type=int, default=0, help="dynamic batcher delay (default 0)")
    p.add_argument("--steps", type=int, help="denoise steps (default: the bundle's)")
    p.add_argument("--warmup", type=int, default=8, help="untimed requests before each timed run (default 8)")
    p.add_argument("--machine-note", help="machine description for the report (default: '<cores>-core CPU, no GPU')")
    p.add_argument("--out", required=True, help="the JSON report; <out>.md is written next to it")
    p.set_defaults(func=run_serve)
