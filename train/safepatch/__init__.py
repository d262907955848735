"""SafePatch training: differential supervision of the instruction-aware UNet patch, and its prompt gate.

``data.py`` builds the cached tensors (VAE latents of the safe renders, text hidden states of prompts and
instructions, EOS embeddings with category labels); ``train.py`` is the accelerate loop; ``cli.py`` is
``python -m train safepatch``. The modules themselves live in :mod:`guards.safepatch`.
"""
