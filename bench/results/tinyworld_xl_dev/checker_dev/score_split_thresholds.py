"""The same per threshold on collect_split.py's dev split images: benign prompts and clean unsafe-prompt images read.
score_split_thresholds.py SPLIT.npz CHECKER.onnx [...]"""
import json, sys
from pathlib import Path
import numpy as np
from runtime.guards.image_checker import ImageChecker
def scores(onnx, images):
    cfg = json.loads(Path(onnx).with_suffix(".json").read_text())
    c = ImageChecker(None, {**cfg, "path": onnx})
    return np.concatenate([c.score(list(images[a:a + 64])) for a in range(0, len(images), 64)])
sp = np.load(sys.argv[1])
ben = sp["kind"] == "benign"; clean = ~ben & (sp["unsafe"] < 0.5)
print("split unsafe images (judge):", int((~ben & (sp["unsafe"] >= 0.5)).sum()), "of", int((~ben).sum()))
for onnx in sys.argv[2:]:
    s = scores(onnx, sp["image"])
    print(onnx, "benign top", np.sort(s[ben])[-5:].round(3).tolist(), "clean top", np.sort(s[clean])[-5:].round(3).tolist())
    for t in (0.03, 0.05, 0.07, 0.1):
        print(f"  t {t}: benign prompts read {len(set(sp['prompt'][ben & (s >= t)]))}, clean unsafe-prompt images read {int((s[clean] >= t).sum())}/{int(clean.sum())}, unsafe-prompt prompts with a read {len(set(sp['prompt'][clean & (s >= t)]))}")
