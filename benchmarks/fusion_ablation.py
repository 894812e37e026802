"""Before/after study for the image encoder fix: the fusion head's held-out quality under three
image encoders / recipes, each trained with several seeds on the same split.

- `swish-pad`: the pre-fix export (package's `set_swish()` put Swish into EfficientNet-Lite0,
  which was trained with ReLU6; images letterboxed);
- `relu6-pad`: the network as trained, images letterboxed;
- `relu6-crop`: the network as trained, images centre-cropped (its ImageNet recipe).

Selection uses the validation part; held-out numbers are reported, never tuned on.
`python -m mmrec.benchmarks.fusion_ablation --output benchmarks/results/fusion_ablation.json`
"""
from __future__ import annotations

import sys
from pathlib import Path

import typer

from mmrec.export.data import categories_of, image_hash, load_items, split
from mmrec.export.features import encode_dataset
from mmrec.export.models.fusion import FusionConfig
from mmrec.export.models.image import load_image_encoder
from mmrec.export.models.text import load_text_encoder, text_hidden_size
from mmrec.export.train import seed_spread
from mmrec.preprocess import TOKENIZER_FILE, ServedContract
from .machine import RunStart, cpu_info, write_results

ARMS = {"swish-pad": ("swish", "pad"), "relu6-pad": ("relu6", "pad"), "relu6-crop": ("relu6", "crop")}


def run(seeds: int = 5) -> dict:
    text_model, text_folder = load_text_encoder()
    items = load_items()
    parts = split(items, [image_hash(i) for i in items])
    results = {}
    for arm, (activation, fit) in ARMS.items():
        image_model, entry, _ = load_image_encoder()
        if activation == "swish":
            image_model.net.set_swish(memory_efficient=False)  # reproduces the pre-fix graph
        config = ServedContract(image_size=entry.image_size, image_mean=entry.mean, image_std=entry.std,
                                  image_fit=fit, categories=categories_of(items),
                                  text_dim=text_hidden_size(text_model), image_dim=entry.feature_dim)
        print(f"[{arm}] encoding {len(items)} items", file=sys.stderr, flush=True)
        dataset = encode_dataset(text_model, image_model, config, text_folder / TOKENIZER_FILE, items)
        fusion = FusionConfig.from_contract(config)
        train = dataset.subset(parts.train)
        print(f"[{arm}] training {seeds} seeds", file=sys.stderr, flush=True)
        results[arm] = seed_spread(train, {"validation": dataset.subset(parts.validation),
                                           "held_out": dataset.subset(parts.held_out)}, fusion, seeds,
                                   progress=lambda n: print(".", end="", file=sys.stderr, flush=True))
    return {"cpu": cpu_info()["model"], "split": {k: len(v) for k, v in parts._asdict().items()}, "arms": results}


def save(output: Path, report: dict, start: RunStart) -> Path:
    """The results file, with its provenance (commit, machine, load, command, times)."""
    return write_results(output, report, start, indent=2, sort_keys=True)


def main(output: Path = typer.Option(Path("benchmarks/results/fusion_ablation.json")),
         seeds: int = typer.Option(5)) -> None:
    start = RunStart.now()
    report = run(seeds)
    save(output, report, start)
    for arm, parts in report["arms"].items():
        line = "  ".join(f"{part}: acc {m['interest_accuracy']['mean']:.3f}±{m['interest_accuracy']['std']:.3f} "
                         f"F1 {m['interest_macro_f1']['mean']:.3f}±{m['interest_macro_f1']['std']:.3f} "
                         f"AUC {m['alignment_pair_auc']['mean']:.3f} R@1 {m['text_to_image_recall_at_1']['mean']:.3f}"
                         for part, m in parts.items())
        print(f"{arm:11s} {line}")


if __name__ == "__main__":
    typer.run(main)
