"""Is fusion training the same on another CPU? Dump the features once, train on each machine.

    python -m mmrec.benchmarks.cross_cpu_training dump features.npz     # where mmrec is installed
    python -m mmrec.benchmarks.cross_cpu_training train features.npz --output amd.json   # on every CPU
    python -m mmrec.benchmarks.cross_cpu_training compare amd.json xeon.json \
        --output benchmarks/results/cross_cpu_training.json

`train` needs only torch + numpy + this package's code (it ran on the lent H200 host's Intel
Xeon with AMX and on the AMD EPYC build machine); it writes per-seed held-out metrics, the final
loss and a hash of the weights, with that machine's provenance. `compare` joins the machines'
files (each keeps its own provenance) and the per-seed differences.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import torch

from .machine import RunStart, cpu_info, write_results

SEEDS = 5
METRICS = ("interest_accuracy", "interest_macro_f1", "alignment_pair_auc", "text_to_image_recall_at_1")


def dump(path: str) -> None:
    from mmrec.export.data import categories_of, image_hash, load_items, split
    from mmrec.export.features import encode_dataset
    from mmrec.export.models.image import load_image_encoder
    from mmrec.export.models.text import load_text_encoder, text_hidden_size
    from mmrec.preprocess import TOKENIZER_FILE, ServedContract

    text_model, folder = load_text_encoder()
    image_model, entry, _ = load_image_encoder()
    items = load_items()
    parts = split(items, [image_hash(i) for i in items])
    config = ServedContract(image_size=entry.image_size, image_mean=entry.mean, image_std=entry.std,
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
    cpu = cpu_info()
    report = {"cpu": cpu["model"], "amx": cpu["flags"]["amx_tile"], "torch": torch.__version__, "seeds": []}
    for k in range(SEEDS):
        model, loss = train_fusion(train_f, config, seed=SEED + k)
        weights = hashlib.sha256(b"".join(t.detach().numpy().tobytes() for t in model.state_dict().values()))
        metrics = evaluate_fusion(model, held, config.num_categories)
        report["seeds"].append({"seed": SEED + k, "weights_sha": weights.hexdigest()[:16], "loss": loss,
                                **{m: round(metrics[m], 4) for m in METRICS}})
        print(json.dumps(report["seeds"][-1]), flush=True)
    return report


WHAT = ("fusion head trained with 5 seeds on the same saved features (served recipe, this commit's split) "
        "on two CPUs; held-out metrics per seed")


def compare(machines: list[dict]) -> dict:
    """The machines' results side by side, and each seed's difference to the first machine."""
    first, others = machines[0], machines[1:]
    differences = []
    for k, seed in enumerate(first["seeds"]):
        for other in others:
            theirs = other["seeds"][k]
            if theirs["seed"] != seed["seed"]:
                raise ValueError(f"seed {k}: {seed['seed']} on {first['cpu']} but {theirs['seed']} on {other['cpu']}")
            differences.append({"seed": seed["seed"],
                                "macro_f1_diff_points": round(100 * abs(seed["interest_macro_f1"]
                                                                        - theirs["interest_macro_f1"]), 4),
                                "loss_rel_diff": abs(seed["loss"] - theirs["loss"]) / abs(seed["loss"])})
    return {"what": WHAT, "machines": machines, "per_seed_difference": differences,
            "max_macro_f1_difference_points": max((d["macro_f1_diff_points"] for d in differences), default=None)}


def save(output: Path, report: dict, start: RunStart) -> Path:
    """A machine's `train` result or the `compare` file, with its provenance."""
    return write_results(output, report, start, indent=2)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("dump").add_argument("features", type=Path)
    train_parser = sub.add_parser("train")
    train_parser.add_argument("features", type=Path)
    train_parser.add_argument("--output", type=Path, required=True, help="this machine's result (JSON)")
    compare_parser = sub.add_parser("compare")
    compare_parser.add_argument("machines", type=Path, nargs="+", help="`train` results, the reference first")
    compare_parser.add_argument("--output", type=Path, default=Path("benchmarks/results/cross_cpu_training.json"))
    args = parser.parse_args(argv)
    start = RunStart.now()
    if args.command == "dump":
        dump(str(args.features))
    elif args.command == "train":
        print(save(args.output, train(str(args.features)), start))
    else:
        print(save(args.output, compare([json.loads(p.read_text()) for p in args.machines]), start))
    return 0


if __name__ == "__main__":
    sys.exit(main())
