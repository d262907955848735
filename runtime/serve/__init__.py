"""Serving bundles through NVIDIA Triton Inference Server (issue 19).

* :mod:`runtime.serve.triton_repo` writes a model repository for one bundle (``runtime triton-repo``);
* :mod:`runtime.serve.model` is the Python-backend model it copies there (``1/model.py``): it opens the bundle
  once per instance with the lean :class:`~runtime.pipeline.Pipeline` and answers generate requests;
* :mod:`runtime.serve.server` finds the ``tritonserver`` binary of the ``nvidia-pytriton`` wheel, assembles its
  Python backend folder and starts / stops a server bound to 127.0.0.1 (tests and ``python -m bench serve``).

Nothing here imports tritonclient, and only ``model.py`` imports ``triton_python_backend_utils`` (it exists
inside Triton's Python stub only); ``runtime generate`` never imports this package.
"""
