"""conftest.py's lists of slow and fast tests name tests that exist: a renamed test would otherwise move between
the tiers without anyone seeing it."""
import ast

from conftest import FAST_IN_SLOW_FILES, ROOT, SLOW_FILES, SLOW_TESTS

TESTS = ROOT / "tests"


def names_of_tests(file):
    tree = ast.parse((TESTS / file).read_text())
    return {n.name for n in tree.body if isinstance(n, ast.FunctionDef) and n.name.startswith("test_")}


def test_every_listed_file_and_test_exists():
    assert all((TESTS / f).is_file() for f in SLOW_FILES), sorted(f for f in SLOW_FILES if not (TESTS / f).is_file())
    for entry in SLOW_TESTS | FAST_IN_SLOW_FILES:
        file, name = entry.split("::")
        assert (TESTS / file).is_file() and name.split("[")[0] in names_of_tests(file), entry
    assert all(e.split("::")[0] in SLOW_FILES for e in FAST_IN_SLOW_FILES)  # an exception to a slow file
    assert not {e for e in SLOW_TESTS if e.split("::")[0] in SLOW_FILES}  # already slow with its file


def test_the_fast_tier_keeps_one_tiny_run_of_the_trainer():
    assert "test_trainer.py" not in SLOW_FILES
    assert "test_trainer.py::test_run_directory_holds_every_output" not in SLOW_TESTS
