"""The session export in the background (tests/session_export.py): tests that need no export run
first, the export process is started only when a selected test needs it, and it never outlives
the session, however the session ends."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from session_export import BackgroundExport, ExportFailed

TESTS = Path(__file__).resolve().parent

INNER_CONFTEST = """
import pytest

@pytest.fixture(scope="session")
def exported_repository(tmp_path_factory):
    return tmp_path_factory.mktemp("fake-export")

@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(items):
    from session_export import order_for_export
    items[:] = order_for_export(items)
"""

INNER_TESTS = {
    "test_a_mixed.py": """
        import pytest

        SPLIT_SAFE_FIXTURES = ("cheap",)

        @pytest.fixture(scope="module")
        def shared():
            return 1

        @pytest.fixture(scope="module")
        def cheap():
            return 2

        @pytest.fixture
        def via(exported_repository):  # needs the export through another fixture
            return exported_repository

        def test_needs(via, shared): pass
        def test_shares_with_an_export_test(shared): pass
        def test_shares_a_cheap_fixture(cheap): pass
        def test_alone(): pass

        class TestKind:
            def test_in_class(self): pass
            def test_in_class_needs(self, exported_repository): pass
    """,
    "test_b_export.py": """
        def test_direct(exported_repository): pass
    """,
    "test_c_plain.py": """
        def test_one(): pass
        def test_two(): pass
    """,
}


def _inner_session(tmp_path: Path, files: dict[str, str], conftest: str, *args: str,
                   env: dict | None = None) -> subprocess.CompletedProcess:
    """pytest in a fresh folder (its own rootdir: none of this suite's options) with
    session_export.py importable beside its conftest."""
    shutil.copy(TESTS / "session_export.py", tmp_path / "session_export.py")
    (tmp_path / "conftest.py").write_text(conftest)
    for name, text in files.items():
        (tmp_path / name).write_text(textwrap.dedent(text))
    run_env = {k: v for k, v in os.environ.items() if k != "MMREC_TEST_REPOSITORY"}
    run_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args],
                          cwd=tmp_path, env=run_env, capture_output=True, text=True, timeout=120)


def test_tests_without_the_export_run_first_unless_they_share_a_module_fixture(tmp_path):
    result = _inner_session(tmp_path, INNER_TESTS, INNER_CONFTEST, "-v")
    assert result.returncode == 0, result.stdout + result.stderr
    ran = [line.split(" ")[0] for line in result.stdout.splitlines() if " PASSED" in line]
    assert ran == [
        "test_a_mixed.py::test_shares_a_cheap_fixture",  # its module marks `cheap` safe to build twice
        "test_a_mixed.py::test_alone",
        "test_a_mixed.py::TestKind::test_in_class",
        "test_c_plain.py::test_one",
        "test_c_plain.py::test_two",
        "test_a_mixed.py::test_needs",
        "test_a_mixed.py::test_shares_with_an_export_test",  # stays: `shared` would be built twice
        "test_a_mixed.py::TestKind::test_in_class_needs",
        "test_b_export.py::test_direct",
    ]
    # a -k selection is ordered the same way among what it keeps
    result = _inner_session(tmp_path, INNER_TESTS, INNER_CONFTEST, "-v", "-k", "alone or direct or one")
    ran = [line.split(" ")[0] for line in result.stdout.splitlines() if " PASSED" in line]
    assert ran == ["test_a_mixed.py::test_alone", "test_c_plain.py::test_one", "test_b_export.py::test_direct"]


# the real conftest, plus a report of whether the export process is still there when the session
# finishes (before pytest exits: the export also dies with its parent, which would hide a missing stop)
AT_FINISH = """

def pytest_sessionfinish(session):
    import json, os
    export = session.config.stash.get(BACKGROUND_EXPORT, None)
    running = export is not None and export._proc.poll() is None
    with open(os.environ["REPORT"], "a") as f:
        f.write(json.dumps({"running_at_finish": running}) + "\\n")
"""

# a first test that reports the export process and then ends the session (-x failure or Ctrl-C)
ENDS_EARLY = """
    import json, os
    import pytest
    from conftest import BACKGROUND_EXPORT

    def test_first(request):
        export = request.config.stash.get(BACKGROUND_EXPORT, None)
        with open(os.environ["REPORT"], "a") as f:
            f.write(json.dumps({"pid": export.pid if export else None}) + "\\n")
        if os.environ["END"] == "interrupt":
            raise KeyboardInterrupt
        assert False, "ends the session under -x"

    def test_later(exported_repository):
        pass
"""


@pytest.mark.parametrize("end", ["failure", "interrupt"])
def test_the_export_process_is_stopped_when_the_session_ends_early(tmp_path, end):
    report = tmp_path / "report.jsonl"
    conftest = (TESTS / "conftest.py").read_text() + AT_FINISH
    result = _inner_session(tmp_path, {"test_ends.py": ENDS_EARLY}, conftest, "-x",
                            env={"REPORT": str(report), "END": end})
    assert result.returncode in (1, 2), result.stdout + result.stderr  # failed / interrupted
    first, finish = [json.loads(line) for line in report.read_text().splitlines()]
    assert first["pid"], "a selected test needs the export: it was started before the first test"
    assert finish == {"running_at_finish": False}, "stopped when the test loop ended"
    assert not _group_alive(first["pid"]), "no process is left in the export's group"


def test_no_export_process_when_no_selected_test_needs_it(tmp_path):
    report = tmp_path / "report.jsonl"
    result = _inner_session(tmp_path, {"test_ends.py": ENDS_EARLY}, (TESTS / "conftest.py").read_text(), "-x",
                            "-k", "first", env={"REPORT": str(report), "END": "failure"})
    assert result.returncode == 1, result.stdout + result.stderr
    assert json.loads(report.read_text()) == {"pid": None}


# --------------------------------------------------------------------------- BackgroundExport


def _stat(pid: int) -> tuple[str, int] | None:
    """(state, process group) of a process from /proc, None once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return fields[0], int(fields[2])


def _alive(pid: int) -> bool:
    """Running or sleeping: neither gone nor a zombie waiting for whoever adopted it."""
    stat = _stat(pid)
    return stat is not None and stat[0] not in ("Z", "X")


def _group_alive(pgid: int) -> bool:
    pids = [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()]
    return any(_alive(pid) for pid in pids if (_stat(pid) or ("", -1))[1] == pgid)


def _python(code: str) -> list[str]:
    return [sys.executable, "-c", textwrap.dedent(code)]


def test_a_finished_export_returns_its_repository(tmp_path):
    export = BackgroundExport(tmp_path / "repo", tmp_path / "log", _python("print('built')"))
    export.start()
    assert export.wait(timeout_s=60) == tmp_path / "repo"
    export.stop()  # finished: nothing to stop, no error


def _failure(export: BackgroundExport, timeout_s: float) -> str:
    """Start the export and return the message `wait` fails with."""
    export.start()
    with pytest.raises(ExportFailed) as failed:
        export.wait(timeout_s=timeout_s)
    return str(failed.value)


def test_a_failed_export_fails_with_the_tail_of_its_log(tmp_path):
    message = _failure(BackgroundExport(tmp_path / "repo", tmp_path / "log",
                                        _python("import sys; print('gate failed: fusion recall'); sys.exit(3)")), 60)
    assert "exited with code 3" in message and "gate failed: fusion recall" in message


def test_stop_ends_the_export_and_every_worker_it_started(tmp_path):
    pids = tmp_path / "pids"
    export = BackgroundExport(tmp_path / "repo", tmp_path / "log", _python(f"""
        import os, subprocess, sys, time
        worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        open({str(pids)!r}, "w").write(f"{{os.getpid()}} {{worker.pid}}")
        time.sleep(600)
    """))
    export.start()
    for _ in range(200):
        if pids.is_file() and pids.read_text():
            break
        time.sleep(0.05)
    leader, worker = map(int, pids.read_text().split())
    export.stop(grace_s=5)
    assert not _group_alive(leader) and not _alive(worker)


def test_an_export_past_its_time_is_stopped_and_reported(tmp_path):
    export = BackgroundExport(tmp_path / "repo", tmp_path / "log",
                              _python("import time; print('training fusion', flush=True); time.sleep(600)"))
    message = _failure(export, 1.0)
    assert "ran past 1 s" in message and "training fusion" in message
    assert not _group_alive(export.pid)
