"""Every script that writes under benchmarks/results/ records where its numbers came from.

Each writer's own save function is called on a tiny report (no measuring), and its file must carry
the shared `provenance` record: commit + dirty flag, machine, load before/after, command line,
start and finish. A source scan keeps new writers from bypassing `write_results`.
"""
from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

from mmrec.benchmarks import machine
from mmrec.benchmarks.machine import PROVENANCE_FIELDS, PROVENANCE_KEY, RunStart

ROOT = Path(__file__).resolve().parents[1]


def _fusion_ablation(output: Path, report: dict, start: RunStart) -> Path:
    from mmrec.benchmarks import fusion_ablation

    return fusion_ablation.save(output / "fusion_ablation.json", report, start)


def _cross_cpu_training(output: Path, report: dict, start: RunStart) -> Path:
    from mmrec.benchmarks import cross_cpu_training

    return cross_cpu_training.save(output / "cross_cpu_training.json", report, start)


def _runtimes(output: Path, report: dict, start: RunStart) -> Path:
    from mmrec.benchmarks import runtimes

    return runtimes.save(output, report, start)


def _index_scan(output: Path, report: dict, start: RunStart) -> Path:
    from mmrec.benchmarks import index_scan

    return index_scan.save(output, report, start)


def _model_analyzer(output: Path, report: dict, start: RunStart) -> Path:
    from mmrec.benchmarks import model_analyzer

    return model_analyzer.save(output, report, start)


WRITERS = {"fusion_ablation": _fusion_ablation, "cross_cpu_training": _cross_cpu_training,
           "runtimes": _runtimes, "index_scan": _index_scan, "model_analyzer": _model_analyzer}


@pytest.fixture(scope="module")
def start() -> RunStart:
    return RunStart(started=machine.utc_now(), loadavg=machine.loadavg(), cpu_share=0.99)


def check_provenance(record: dict, start: RunStart) -> None:
    prov = record[PROVENANCE_KEY]
    assert set(PROVENANCE_FIELDS) <= set(prov), set(PROVENANCE_FIELDS) - set(prov)
    assert prov["git"] == machine.git_commit()
    if (ROOT / ".git").exists():  # a checkout, as in `make test`
        assert len(prov["git"]["commit"]) == 40 and isinstance(prov["git"]["dirty"], bool)
    assert prov["machine"]["cpu"]["model"] and prov["machine"]["cpu"]["usable_cores"] >= 1
    assert prov["loadavg"]["before"] == start.loadavg and isinstance(prov["loadavg"]["after"], list)
    assert prov["cpu_share"]["before"] == start.cpu_share
    assert prov["command"] and prov["packages"]["numpy"]
    assert prov["started"] == start.started <= prov["finished"]


@pytest.mark.parametrize("writer", sorted(WRITERS))
def test_every_results_writer_records_provenance(writer, tmp_path, start):
    path = WRITERS[writer](tmp_path, {"measured": [1.5, 2.5]}, start)
    record = json.loads(Path(path).read_text())
    assert record["measured"] == [1.5, 2.5]  # the report itself is kept as it was
    check_provenance(record, start)


def test_the_recorded_export_keeps_the_manifest_and_its_build(tmp_path):
    """README's export block renders from this record: the manifest as exported (with the
    commit under `build`) plus the provenance of the recording."""
    from mmrec.benchmarks.doc_blocks import record_export
    from mmrec.export.manifest import write_manifest
    from toy_manifest import toy_manifest

    repository = tmp_path / "repository"
    repository.mkdir()
    (repository / "preprocess.json").write_text("{}")
    write_manifest(repository, toy_manifest(target="portable"))
    before = RunStart.now()
    record = json.loads(record_export(repository, tmp_path / "export_report.json").read_text())
    assert record["manifest"]["target"] == "portable"
    assert record["manifest"]["build"] == machine.git_commit()
    prov = record[PROVENANCE_KEY]
    assert set(PROVENANCE_FIELDS) <= set(prov) and prov["started"] >= before.started


def test_cross_cpu_compare_finds_each_seeds_difference():
    from mmrec.benchmarks.cross_cpu_training import compare

    def machine_result(cpu: str, f1: float, loss: float) -> dict:
        return {"cpu": cpu, "amx": False, "torch": "x", "seeds": [
            {"seed": 7, "loss": loss, "interest_macro_f1": f1}, {"seed": 8, "loss": 1.0, "interest_macro_f1": 0.5}]}

    result = compare([machine_result("a", 0.80, 2.0), machine_result("b", 0.79, 2.0 * (1 + 1e-15))])
    assert [d["seed"] for d in result["per_seed_difference"]] == [7, 8]
    assert result["max_macro_f1_difference_points"] == pytest.approx(1.0)
    assert result["per_seed_difference"][0]["loss_rel_diff"] == pytest.approx(1e-15)
    with pytest.raises(ValueError, match="seed"):
        other = machine_result("c", 0.8, 2.0)
        other["seeds"][0]["seed"] = 9
        compare([machine_result("a", 0.8, 2.0), other])


# Functions under benchmarks/ that may write JSON without write_results, and why. A new results
# writer must go through write_results (or be listed here with its reason).
NOT_RESULTS = {
    ("machine.py", "write_results"): "write_results itself",
    ("perf_analyzer.py", "write_input_data"): "perf_analyzer's --input-data file, not a result",
    ("model_analyzer.py", "write_config"): "Model Analyzer's own config file, not a result",
    ("experiments.py", "main"): "A/B rows to a user-chosen --json path, not under benchmarks/results/",
    ("report.py", "write_json"): "bench.json: suite.run_bench sets its `provenance` (machine.provenance) before "
                                 "writing; a re-render keeps the measuring run's",
    ("reproducibility.py", "main"): "a comparison of two results files to a user-chosen --json path",
}
NOT_YET_ALIGNED: dict = {}


def _json_writes(tree: ast.AST) -> list[tuple[str, int]]:
    """(enclosing top-level function, line) of every JSON write: `x.write_text(json.dumps(...))`
    or `json.dump(...)`."""
    found = []
    for top in tree.body:
        owner = top.name if isinstance(top, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) else "<module>"
        for node in ast.walk(top):
            if not isinstance(node, ast.Call):
                continue
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            dumps_inside = any(isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr == "dumps"
                               for arg in node.args for n in ast.walk(arg))
            if (name == "write_text" and dumps_inside) or (name == "dump" and isinstance(func, ast.Attribute)
                                                           and getattr(func.value, "id", "") == "json"):
                found.append((owner, node.lineno))
    return found


def test_no_benchmark_writes_json_results_without_provenance():
    offenders = []
    for path in sorted((ROOT / "benchmarks").glob("*.py")):
        for owner, line in _json_writes(ast.parse(path.read_text())):
            if (path.name, owner) not in NOT_RESULTS and (path.name, owner) not in NOT_YET_ALIGNED:
                offenders.append(f"benchmarks/{path.name}:{line} ({owner})")
    assert not offenders, (f"JSON written without machine.write_results (so without provenance): {offenders}; "
                           "save results through write_results")


def test_the_exemptions_still_exist():
    """An exemption whose function no longer writes JSON is stale: drop it."""
    for module, function in {**NOT_RESULTS, **NOT_YET_ALIGNED}:
        path = ROOT / "benchmarks" / module
        if not path.exists():
            continue  # a module written in parallel may not be there yet
        assert function in {owner for owner, _ in _json_writes(ast.parse(path.read_text()))}, (module, function)


def test_the_tree_is_recorded_as_it_was_when_the_run_started(tmp_path):
    """A run writes its own outputs (bench writes benchmarks/results/tritonserver.log, a tracked
    file): the dirty flag must describe the code that was measured, taken before any of that."""
    clean = RunStart(started=machine.utc_now(), loadavg=machine.loadavg(), cpu_share=0.9,
                     git={"commit": "a" * 40, "dirty": False})
    record = json.loads(machine.write_results(tmp_path / "r.json", {"x": 1}, clean).read_text())
    assert record[PROVENANCE_KEY]["git"] == {"commit": "a" * 40, "dirty": False}
    assert RunStart.now().git == machine.git_commit()  # taken at the start by default
