"""SafePatch training: differential supervision of the instruction-aware UNet patch, and its prompt gate.

``data.py`` builds the cached tensors from a data folder of ``python -m train data`` (VAE latents of the kept safe
images, text hidden states of prompts and instructions, EOS embeddings with category labels); ``renderer.py`` the
same from tinyworld's renderer (``--renderer``, for comparison); ``train.py`` is the accelerate loop; ``cli.py`` is
``python -m train safepatch``. The modules themselves live in :mod:`guards.safepatch`.
"""
