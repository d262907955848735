"""The shared data step: prompts -> guard training material from the backbone and a judge only (no renderer).

``python -m train data`` (:mod:`.step`) writes a data folder that :func:`.load.load_data` reads. One concern per
module: :mod:`.prompts` (paired CSVs, rule files, prompt CSVs), :mod:`.judge` (the ONNX image judge),
:mod:`.generate` (the backbone's aligned generations and trajectories, candidate selection), :mod:`.masks`
(derived and few-shot SafeCtrl masks), :mod:`.step` (the command and the folder it writes), :mod:`.load` (the
reader). ``train/data/README.md`` documents the CLI, the formats, the exit codes and the tinyworld figures.
"""
