"""The test suite's layout (tests/README.md): every test file is named after the module it tests
(tests/tools/where.py), and the marker lists of tests/conftest.py name files that exist."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import conftest

TESTS = Path(__file__).resolve().parent


def _where():
    spec = importlib.util.spec_from_file_location("where", TESTS / "tools" / "where.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_subject_is_the_longest_source_path_the_name_starts_with():
    where = _where()
    known = where.subjects()
    assert where.subject_of(name="test_serve_rollout_checks", known=known) == "serve_rollout_checks"
    assert where.subject_of(name="test_serve_rollout_checks_bounds", known=known) == "serve_rollout_checks"
    assert where.subject_of(name="test_attacks_evasion_apgd_ce_early_stop", known=known) == "attacks_evasion_apgd_ce"
    assert where.subject_of(name="test_decide_units", known=known) == "decide"  # a package without __init__.py
    assert where.subject_of(name="test_e2e_run_spine", known=known) == "e2e"
    assert where.subject_of(name="test_rollout_checks", known=known) is None  # the old flat name
    assert where.subject_of(name="test_servefoo", known=known) is None  # a prefix must end at an underscore


def test_a_misnamed_file_gets_a_suggestion_from_its_imports(tmp_path, caplog):
    where = _where()
    stray = tmp_path / "test_rollout_thing.py"
    stray.write_text("from safedl.serve.rollout.checks import x\nfrom safedl.serve.rollout.checks import y\n"
                     "from safedl.errors import ProfileError\n", encoding="utf-8")
    caplog.set_level("INFO", logger="where")
    assert where.check(files=[stray]) == 1
    assert "tests/test_serve_rollout_checks_<aspect>.py" in caplog.text


def test_every_test_file_is_named_after_its_subject():
    where = _where()
    known = where.subjects()
    misfits = [p.name for p in sorted(TESTS.glob("test_*.py")) if where.subject_of(name=p.stem, known=known) is None]
    assert misfits == [], f"rename these (python tests/tools/where.py FILE says where): {misfits}"


def test_marker_lists_name_existing_test_files():
    files = {p.stem for p in TESTS.glob("test_*.py")}
    for name in ("WHOLE_RUN_MODULES", "SERVICE_MODULES"):
        missing = sorted(set(getattr(conftest, name)) - files)
        assert missing == [], f"tests/conftest.py {name} names files that do not exist: {missing}"
