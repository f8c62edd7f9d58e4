"""tools/mutate.py's test selection: a mutant runs only the mapped tests that execute its statement, and a line that
runs at import (where every test sees it) runs them all."""

import sys
import textwrap

import mutate

SOURCE = textwrap.dedent('''\
    LIMIT = 3


    def f(x,
          y=LIMIT):
        if (x >
                y):
            return g(
                x)
        total = sum(v for v in range(x))
        return total


    class K:
        width = 2 + LIMIT

        def m(self):
            return (lambda t: t + 1)(self.width)
    ''')


def _mutant(line):
    return mutate.Mutant(id=f"m:{line}:0", file="m.py", line=line, op="cmp", before="", after="", source="")


def test_lines_in_function_bodies_map_to_their_statement_and_import_time_lines_are_absent():
    spans = mutate.runtime_lines(SOURCE)
    assert 1 not in spans and 15 not in spans  # module constant, class body: run at import
    assert 4 not in spans and 5 not in spans  # signature and default value: run at import
    assert spans[6] == spans[7] == {6, 7}  # a compound statement's two-line header, without its body
    assert spans[8] == spans[9] == {8, 9}  # a statement over two lines
    assert spans[10] == {10}
    assert spans[18] == {18}  # a lambda's body inside a method


def test_select_tests_keeps_the_tests_that_run_any_line_of_the_statement_once_each():
    spans = mutate.runtime_lines(SOURCE)
    coverage = {"lines": {"t.py::a[1]": [6, 10], "t.py::a[2]": [7, 8], "t.py::b": [9, 11], "t.py::c": [18]}}
    assert mutate.select_tests(coverage, _mutant(7), spans) == ["t.py::a"]
    assert mutate.select_tests(coverage, _mutant(8), spans) == ["t.py::a", "t.py::b"]
    assert mutate.select_tests(coverage, _mutant(11), spans) == ["t.py::b"]
    assert mutate.select_tests(coverage, _mutant(10), spans) == ["t.py::a"]
    assert mutate.select_tests(coverage, _mutant(15), spans) is None  # import time: every mapped test
    assert mutate.select_tests({"lines": {"t.py::b": [11]}}, _mutant(18), spans) == []  # nothing runs it


def test_selected_tests_run_quickest_first_summing_a_tests_parameters():
    spans = mutate.runtime_lines(SOURCE)
    coverage = {"lines": {"t.py::a[1]": [8], "t.py::a[2]": [8], "t.py::b": [9], "t.py::c": [8]},
                "seconds": {"t.py::a[1]": 1.0, "t.py::a[2]": 1.5, "t.py::b": 2.0, "t.py::c": 0.1}}
    assert mutate.select_tests(coverage, _mutant(8), spans) == ["t.py::c", "t.py::b", "t.py::a"]


def test_line_trace_records_each_tests_lines_of_the_target_file_only(tmp_path, monkeypatch):
    import pytest

    target = tmp_path / "target_mod.py"
    target.write_text("def double(x):\n    if x > 2:\n        return 2 * x\n    return x\n")
    other = tmp_path / "other_mod.py"
    other.write_text("def one():\n    return 1\n")
    tests = tmp_path / "test_t.py"
    tests.write_text("import target_mod, other_mod\n\n\ndef test_small():\n    assert target_mod.double(1) == 1\n\n\n"
                     "def test_big():\n    assert target_mod.double(3) + other_mod.one() == 7\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    trace = mutate.LineTrace({str(target)})
    try:
        code = pytest.main([str(tests), "-q", "-p", "no:cacheprovider", "--rootdir", str(tmp_path),
                            "--import-mode=importlib"], plugins=[trace])
    finally:
        for name in ("target_mod", "other_mod"):
            sys.modules.pop(name, None)
    assert code == 0
    lines = {k.rsplit("::", 1)[1]: v for k, v in trace.lines.items()}
    assert lines == {"test_small": {2, 4}, "test_big": {2, 3}}
    assert set(trace.seconds) == set(trace.lines)


def test_import_time_assignments_run_first_the_tests_that_execute_a_line_naming_them():
    source = "SCALE = 2\n\n\ndef f(x):\n    return x * SCALE\n\n\ndef g(x):\n    return x\n"
    spans = mutate.runtime_lines(source)
    coverage = {"lines": {"t.py::a": [9], "t.py::b[1]": [5], "t.py::b[2]": [5, 9], "t.py::c": [9]}}
    assert mutate.likely_killers(coverage, _mutant(1), source, spans) == ["t.py::b"]
    assert mutate.likely_killers(coverage, _mutant(9), source, spans) == []  # not an assignment
