"""Triton Python-backend model that serves one ``.plan`` bundle with the lean :class:`~runtime.pipeline.Pipeline`.

``runtime triton-repo`` copies this file to ``REPO/NAME/1/model.py`` (the request contract is in
:mod:`runtime.serve.triton_repo`). It imports only the lean runtime, numpy and ``triton_python_backend_utils``
(which exists inside Triton's Python stub only), so the stub's ``PYTHONPATH`` must reach the ``runtime`` package.

* ``initialize``: each instance (its own stub process) opens the bundle once, checks every payload's sha256 and
  that it is the bundle the repository was written for (the manifest hash in ``config.pbtxt``): a bundle that
  does not verify makes the model fail to load with a message naming it.
* ``execute``: every request gets its own response. Each request's rows are checked first (a bad request is an
  error response for that request only, before anything is generated); then every row of every good request
  goes to ONE ``Pipeline.run_many`` call, which generates the rows that agree on the denoise settings (steps,
  guidance, scheduler, karras, height, width) in lockstep, sharing every UNet call, at most the bundle's max
  batch of images per group. Each row keeps its own prompt, seed and guards, so its image is bit-identical to
  ``Pipeline.generate`` on ONNX Runtime CPU; its report's ``denoise_shared`` says how many requests shared each
  UNet call. A guard error or NaN in a row (fail closed) or a blocked image fails that row's request only, with
  no image: its batch mates and later requests are served as usual.
* Guards: the bundle's guards run as the manifest says. The model reads only the inputs in its config and no
  request parameter, so no request can turn a guard off; an image comes back only when every guard passed it.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path

# Triton's stub runs Python isolated (it ignores PYTHONPATH): honour it here, ahead of the stub's own
# site-packages, so the runtime and its dependencies come from the environment the server was started for.
sys.path[:0] = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p not in sys.path]

import numpy as np  # noqa: E402
import triton_python_backend_utils as pb_utils  # noqa: E402

from runtime.errors import BadInputError, BundleError, RuntimeToolError  # noqa: E402
from runtime.pipeline import GenerationSettings, Pipeline  # noqa: E402
from runtime.schedulers import SCHEDULERS  # noqa: E402

TEXT_FIELDS = ("prompt", "negative_prompt", "scheduler")
NUMBER_FIELDS = {"seed": int, "steps": int, "guidance": float, "height": int, "width": int}
MAX_TEXT_BYTES = 4 * 10_000  # the pipeline's 10 000-character limit in UTF-8's worst case: decode no more


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        self.name = config["name"]
        path = Path(params["bundle"])
        if not path.is_absolute():  # --copy: beside this file, in the version folder
            path = Path(args["model_repository"]) / args["model_version"] / path
        if args.get("model_instance_kind") == "GPU":  # each instance is its own stub process: pin its GPU
            os.environ["CUDA_VISIBLE_DEVICES"] = str(args["model_instance_device_id"])
        self.pipe = Pipeline.open(path, backend=params.get("backend", "auto"), verify=True)
        actual, expected = self.pipe.bundle.manifest_sha256, params.get("bundle_manifest_sha256")
        if actual != expected:
            self.pipe.close()
            raise BundleError(f"{path} is not the bundle model {self.name!r} was written for (manifest sha256 "
                              f"{actual[:12]}..., expected {str(expected)[:12]}...): re-run `runtime triton-repo` "
                              "for this bundle")
        pb_utils.Logger.log_info(f"model {self.name}: bundle {path} verified, guards "
                                 f"{', '.join(self.pipe.guard_names) or 'none'}, backend {self.pipe.backend}")

    def execute(self, requests):
        rows = [self._rows(request) for request in requests]  # each request's settings, or its error response
        batch = [s for r in rows if isinstance(r, list) for s in r]
        try:
            results = iter(self.pipe.run_many(batch))
        except Exception:  # a bug in the shared loop: every request in it fails closed
            return [self._internal_error() if isinstance(r, list) else r for r in rows]
        return [_respond([next(results) for _ in r]) if isinstance(r, list) else r for r in rows]

    def finalize(self):
        self.pipe.close()

    # -- one request ------------------------------------------------------------------------------------------

    def _rows(self, request):
        """The request's resolved settings, one per row (every row checked before any is generated), or its
        error response."""
        try:
            rows = [self.pipe.resolve(s) for s in _settings(request)]
            if len({(s.height, s.width) for s in rows}) > 1:
                raise BadInputError("height and width must be the same in every row of one request: send other "
                                    "sizes as separate requests")
            return rows
        except RuntimeToolError as e:
            return _failure(e)
        except Exception:
            return self._internal_error()

    def _internal_error(self):
        """A bug's response: the details go to the server log, never to the client."""
        pb_utils.Logger.log_error(f"model {self.name}: {traceback.format_exc()}")
        return _error(f"internal error in model {self.name}: see the server log", False)


def _respond(results):
    """One request's response from its rows' results: the images, or the first row's error (no image)."""
    failed = [r for r in results if isinstance(r, RuntimeToolError)]
    if failed:
        return _failure(failed[0])
    images = np.stack([r.images[0] for r in results])
    reports = np.array([[json.dumps(r.report).encode("utf-8")] for r in results], dtype=np.object_)
    return pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("image", images),
                                                      pb_utils.Tensor("report", reports)])


def _failure(e: RuntimeToolError):
    """Bad input, a guard failure or NaN (fail closed), a blocked image: the error labelled by its exit code."""
    label = e.exit_code.name.lower().replace("_", " ")
    return _error(f"{label}: {e}", isinstance(e, BadInputError))


def _error(message: str, bad_input: bool):
    """An error response: INVALID_ARG (HTTP 400) for bad input, INTERNAL (500) otherwise."""
    code = getattr(pb_utils.TritonError, "INVALID_ARG" if bad_input else "INTERNAL", None)
    error = pb_utils.TritonError(message) if code is None else pb_utils.TritonError(message, code)
    return pb_utils.InferenceResponse(error=error)


def _settings(request) -> list[GenerationSettings]:
    """One :class:`GenerationSettings` per row of the request's ``[B, 1]`` inputs (absent: None, the
    bundle's default; Triton has already checked names, types and shapes against config.pbtxt)."""
    columns = {}
    for name in (*TEXT_FIELDS, *NUMBER_FIELDS):
        tensor = pb_utils.get_input_tensor_by_name(request, name)
        if tensor is not None:
            columns[name] = tensor.as_numpy().reshape(-1)
    if "prompt" not in columns:
        raise BadInputError("prompt is missing: send a BYTES input 'prompt' with UTF-8 text")
    rows = []
    for i in range(len(columns["prompt"])):
        values = {name: _text(name, col[i]) if name in TEXT_FIELDS else NUMBER_FIELDS[name](col[i])
                  for name, col in columns.items()}
        if "negative_prompt" not in values:
            values["negative_prompt"] = ""
        if "seed" not in values:
            values["seed"] = 0  # the API's default: a request without a seed is reproducible
        scheduler = values.get("scheduler")
        if scheduler is not None and scheduler not in SCHEDULERS:
            raise BadInputError(f"scheduler is not one this model runs: choose one of {', '.join(SCHEDULERS)}")
        rows.append(GenerationSettings(**values))
    return rows


def _text(name: str, value) -> str:
    """A BYTES element as UTF-8 text; the error names the field, never echoes the bytes."""
    if not isinstance(value, (bytes, np.bytes_)):
        raise BadInputError(f"{name} must be UTF-8 bytes (Triton BYTES): send text")
    if len(value) > MAX_TEXT_BYTES:
        raise BadInputError(f"{name} is {len(value)} bytes, more than the 10000 characters allowed: shorten it")
    try:
        return bytes(value).decode("utf-8")
    except UnicodeDecodeError:
        raise BadInputError(f"{name} is not valid UTF-8 (undecodable bytes): send UTF-8 text") from None
