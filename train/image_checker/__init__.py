"""A learned post-hoc image checker trained the way a deployer can (issue 20): from the data step's material only.

``python -m train image-checker --data DATA_DIR --out DIR`` trains a small CNN on the backbone's own images: the
unsafe prompts' images the judge called unsafe (positives, one output per unsafe category), the kept safe-prompt
images and the benign images (negatives), and blends of each kept pair inside its derived mask (a half-drawn object,
unsafe once at least half of it is there). It writes ``checker.onnx`` + ``checker.json`` (the runtime's image-checker
format, :mod:`runtime.guards.image_checker`), which ``python -m export build --checker`` embeds. It is not the
judge: another network, trained on generated images rather than renders, on the judge's labels only where the data
step already asked it.
"""
