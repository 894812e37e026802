"""Is fusion training the same on another CPU? Dump the features once, train on each machine.

    python -m mmrec.benchmarks.cross_cpu_training dump features.npz     # where mmrec is installed
    python -m mmrec.benchmarks.cross_cpu_training train features.npz    # on every CPU to compare

`train` needs only torch + numpy + this package's code (it ran on the lent H200 host's Intel
Xeon with AMX and on the AMD EPYC build machine); it prints per-seed held-out metrics, the final
loss and a hash of the weights. Results: benchmarks/results/cross_cpu_training.json.
"""
from __future__ import annotations

import hashlib
import json
import platform
import sys

import numpy as np
import torch

SEEDS = 5
METRICS = ("interest_accuracy", "interest_macro_f1", "alignment_pair_auc", "text_to_image_recall_at_1")


def dump(path: str) -> None:
    from mmrec.export.data import categories_of, image_hash, load_items, split
    from mmrec.export.features import encode_dataset
    from mmrec.export.models.image import load_image_encoder
    from mmrec.export.models.text import load_text_encoder, text_hidden_size
    from mmrec.preprocess import TOKENIZER_FILE, PreprocessConfig

    text_model, folder = load_text_encoder()
    image_model, entry, _ = load_image_encoder()
    items = load_items()
    parts = split(items, [image_hash(i) for i in items])
    config = PreprocessConfig(image_size=entry.image_size, image_mean=entry.mean, image_std=entry.std,
                              categories=categories_of(items), text_dim=text_hidden_size(text_model),
                              image_dim=entry.feature_dim)
    dataset = encode_dataset(text_model, image_model, config, folder / TOKENIZER_FILE, items)
    np.savez(path, text=dataset.features.text, image=dataset.features.image, labels=dataset.features.labels,
             **{f"rows_{name}": dataset.rows(part) for name, part in parts._asdict().items()})


def train(path: str) -> dict:
    from mmrec.export.features import ItemFeatures
    from mmrec.export.models.fusion import FusionConfig
    from mmrec.export.train import SEED, evaluate_fusion, train_fusion

    data = np.load(path)

    def part(name: str) -> ItemFeatures:
        rows = data[f"rows_{name}"]
        return ItemFeatures(data["text"][rows], data["image"][rows], data["labels"][rows])

    train_f, held = part("train"), part("held_out")
    config = FusionConfig(text_dim=data["text"].shape[1], image_dim=data["image"].shape[1],
                          num_categories=int(data["labels"].max()) + 1)
    cpuinfo = open("/proc/cpuinfo").read()
    cpu = next((l.split(":", 1)[1].strip() for l in cpuinfo.splitlines() if l.startswith("model name")),
               platform.processor())
    report = {"cpu": cpu, "amx": "amx_tile" in cpuinfo, "torch": torch.__version__, "seeds": []}
    for k in range(SEEDS):
        model, loss = train_fusion(train_f, config, seed=SEED + k)
        weights = hashlib.sha256(b"".join(t.detach().numpy().tobytes() for t in model.state_dict().values()))
        metrics = evaluate_fusion(model, held, config.num_categories)
        report["seeds"].append({"seed": SEED + k, "weights_sha": weights.hexdigest()[:16], "loss": loss,
                                **{m: round(metrics[m], 4) for m in METRICS}})
        print(json.dumps(report["seeds"][-1]), flush=True)
    return report


if __name__ == "__main__":
    command, file = sys.argv[1], sys.argv[2]
    if command == "dump":
        dump(file)
    else:
        print("RESULT", json.dumps(train(file)))
