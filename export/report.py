"""The export's numbers as markdown: models, variants, gates, fusion quality (and the encoder
before/after study).

`python -m mmrec.export.report REPOSITORY [--ablation benchmarks/results/fusion_ablation.json]`
prints them for any repository. README's block between the markers below is rendered with this
same `render`, but only from the committed record of an export
(`python -m mmrec.benchmarks.doc_blocks record-export REPOSITORY`, then `... render`), so the
numbers a reader sees trace to a results file with its commit and machine, never to a local
folder or a hand edit.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import typer

from mmrec import schema
from mmrec.release_manifest import Manifest, VariantRecord

BEGIN = "<!-- export-report:begin (python -m mmrec.benchmarks.doc_blocks render) -->"
END = "<!-- export-report:end -->"
ARM_TITLES = {"swish-pad": "before: Swish in every block, letterboxed (the pre-fix export)",
              "relu6-pad": "ReLU6 as trained, letterboxed",
              "relu6-crop": "ReLU6 as trained, centre crop (**served**)"}


def gate_numbers(gate: dict) -> str:
    """A gate's numbers in one line (README table and the export's printed table)."""
    numbers = f"cos {gate['mean_cosine']:.4f}"
    if gate.get("long_input_mean_cosine") is not None:
        numbers += f", 128-token cos {gate['long_input_mean_cosine']:.4f}"
    numbers += f", top-10 {gate['neighbour_agreement']:.3f}"
    if gate.get("macro_f1_fp32") is not None:
        numbers += f", macro-F1 {gate['macro_f1_fp32']:.3f}→{gate['macro_f1_variant']:.3f}"
    return numbers


def _gate(entry: VariantRecord) -> str:
    gate = entry.gate
    if entry.skipped:
        return f"not built: {entry.skipped}"
    if gate is None:
        return "–"
    return f"pass ({gate_numbers(gate)})" if gate["passed"] else f"**fails** ({gate_numbers(gate)}): left out"


def _size(count: int | None) -> str:
    if not count:
        return "–"
    return f"{count / 1e6:.1f} MB" if count >= 100_000 else f"{count} B"


def _mean_std(metric: dict) -> str:
    return f"{metric['mean']:.3f} ± {metric['std']:.3f}"


def models_table(manifest: Manifest) -> list[str]:
    lines = ["| model | variant | size | parity max \\|Δ\\| vs PyTorch | gate vs FP32 on held-out items |",
             "|---|---|---|---|---|"]
    order = [m for m in schema.ONNX_MODELS if m in manifest.models]
    for name in order + sorted(set(manifest.models) - set(order)):
        member = manifest.models[name]
        for variant, entry in member.variants.items():
            size = _size(entry.bytes)
            parity = (entry.parity or {}).get("max_abs_error")
            lines.append(f"| {name} | {variant}{' (served)' if variant == member.served_variant else ''} "
                         f"| {size} | {f'{parity:.1e}' if parity is not None else '–'} | {_gate(entry)} |")
    return lines


def quality_lines(manifest: Manifest) -> list[str]:
    training, dataset = manifest.training, manifest.inputs.dataset
    held = training["held_out"]
    lines = [f"Fusion head, split {dataset.train} train / {dataset.validation} validation / "
             f"{dataset.held_out} held-out items (stratified by category, duplicates grouped). "
             f"Served seed on the held-out items: interest accuracy {held['interest_accuracy']:.3f}, "
             f"macro-F1 {held['interest_macro_f1']:.3f}, alignment pair AUC {held['alignment_pair_auc']:.3f}, "
             f"text→image R@1 {held['text_to_image_recall_at_1']:.3f}."]
    spread = training.get("held_out_seed_spread")
    if spread:
        lines.append(f"Over {spread['seeds']} training seeds (mean ± std, what a difference must exceed to "
                     f"mean anything): accuracy {_mean_std(spread['interest_accuracy'])}, macro-F1 "
                     f"{_mean_std(spread['interest_macro_f1'])}, alignment AUC "
                     f"{_mean_std(spread['alignment_pair_auc'])}, R@1 {_mean_std(spread['text_to_image_recall_at_1'])}.")
    per_class = held["per_class"]
    lines += ["", "| held-out category | items | precision | recall | F1 |", "|---|---|---|---|---|"]
    lines += [f"| {c} | {s['support']} | {s['precision']:.2f} | {s['recall']:.2f} | {s['f1']:.2f} |"
              for c, s in per_class.items()]
    return lines


def ablation_lines(ablation: dict) -> list[str]:
    lines = [f"Image encoder before/after (`python -m mmrec.benchmarks.fusion_ablation`, "
             f"{ablation['arms'][next(iter(ablation['arms']))]['held_out']['seeds']} seeds each, same split, "
             f"{ablation['cpu']}):", "",
             "| image encoder | validation macro-F1 | held-out accuracy | held-out macro-F1 | "
             "alignment AUC | text→image R@1 |", "|---|---|---|---|---|---|"]
    arms = ablation["arms"]
    for arm in [a for a in ARM_TITLES if a in arms] + sorted(set(arms) - set(ARM_TITLES)):
        parts = arms[arm]
        v, h = parts["validation"], parts["held_out"]
        lines.append(f"| {ARM_TITLES.get(arm, arm)} | {_mean_std(v['interest_macro_f1'])} | "
                     f"{_mean_std(h['interest_accuracy'])} | {_mean_std(h['interest_macro_f1'])} | "
                     f"{_mean_std(h['alignment_pair_auc'])} | {_mean_std(h['text_to_image_recall_at_1'])} |")
    return lines


def tuning_lines(manifest: Manifest) -> list[str]:
    """What `mmrec tune` measured on the export machine and chose to serve."""
    tuning = manifest.tuning
    if not tuning:
        return []
    machine = tuning.machine
    lines = [f"Tuned on {machine.cpu} ({machine.usable_cores} cores; OpenVINO capabilities "
             f"{', '.join(machine.openvino_capabilities) or 'none'}): speed-up over ORT FP32, geometric mean "
             "over batch 1 and 32 of per-round ratios with its 95 % interval over paired rounds; served = the "
             "fastest whose interval lies above 1, unless ORT FP32 against itself (the A/A arm) differed.", "",
             "| member | variant | median ms | speed-up vs ORT FP32 [95 %] | faster |", "|---|---|---|---|---|"]
    decisions = tuning.decisions or {}
    for member, measured in tuning.members.items():
        for variant, m in measured.variants.items():
            served = " (served)" if tuning.chosen.get(member) == variant else ""
            s = m.speedup_vs_fp32
            bounds = f"[{s['low']:.2f}, {s['high']:.2f}]" if s["low"] is not None else "[too few rounds]"
            lines.append(f"| {member} | {variant}{served} | "
                         + " / ".join(f"{c}: {v:.1f}" for c, v in m.median_ms.items())
                         + f" | {s['point']:.2f}× {bounds} | {m.faster_than_fp32 or ''} |")
    lines += [""] + [f"- {member}: {(measured.aa or {}).get('why', 'no A/A arm')}; {decisions.get(member, '')}"
                     for member, measured in tuning.members.items()]
    return lines


def render(manifest: Manifest | Mapping[str, Any], ablation: dict | None) -> str:
    """The whole report; `manifest` may be the dict of a committed export record."""
    manifest = Manifest.of(manifest)
    lines = models_table(manifest) + [""] + quality_lines(manifest)
    if manifest.tuning:
        lines += [""] + tuning_lines(manifest)
    if ablation:
        lines += [""] + ablation_lines(ablation)
    return "\n".join(lines)


def main(repository: Path, ablation: Path = typer.Option(None)) -> None:
    print(render(Manifest.load(repository), json.loads(ablation.read_text()) if ablation else None))


if __name__ == "__main__":
    typer.run(main)
