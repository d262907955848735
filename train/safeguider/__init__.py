"""SafeGuider training: the published EOS-embedding classifier (guards/safeguider.py) on labelled prompts.

``data.py``: prompts (tinyworld guard split, or a ``prompt,label`` CSV) -> EOS embeddings of the frozen text
encoder; ``train.py``: the published recipe (SGD 1e-3, momentum 0.9, batch 32, 50 epochs, CE) in an
``accelerate`` loop; ``cli.py``: ``python -m train safeguider``. See README.md.
"""
