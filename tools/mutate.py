"""Mutation testing for the maths packages (attention/, inversion/, masks/): plant one small bug at a time and check
that the mapped test files fail. Stdlib + the venv's pytest; not part of CI (minutes to hours).

    .venv/bin/python tools/mutate.py list attention/p2p.py            # the mutants it would plant
    nice -n 10 .venv/bin/python tools/mutate.py run attention/p2p.py inversion/ddim.py --out out/mutation
    .venv/bin/python tools/mutate.py run --planted --out out/planted  # the realistic bugs of issue 22
    .venv/bin/python tools/mutate.py verify out/mutation/results.jsonl # re-run survivors in a fresh process
    .venv/bin/python tools/mutate.py report out/mutation/results.jsonl > docs/mutation_run.md
    .venv/bin/python tools/mutate.py run --sample 5 --seed 0 --out out/sample   # 5 mutants per file, seeded

The real files are never edited: the tree is copied to a temporary folder and the host (tools/comfy_host.py) loads
the pack from that copy. Two ways of running a mutant:
- `fork` (default, fast): the ComfyUI host is booted once; per mutant a forked child executes the mutated module's
  source in the loaded module's namespace, rebinds the names other pack modules imported from it
  (`from .p2p import local_blend_mask`), runs pytest in-process and exits. Defaults captured at import time in
  *other* modules keep the old value, so a `fork` survivor is only a candidate: `verify` re-runs it;
- `subprocess` (exact, slow): the mutated file is written into the copy and pytest runs in a fresh process.
In fork mode a mutant runs only the mapped tests that execute its statement (one traced baseline run per file,
cached in OUT; `--all-tests` runs them all): a test that never executes a line cannot see a mutant on it. Lines that
run at import get every mapped test; a line that no mapped test executes is an `uncovered` survivor.
A mutant is killed when the tests fail (or error), survived when they pass, timeout when they run past the limit
(counted as killed, the usual convention: an infinite loop is a detected bug).

Operators (names in the report): cmp (`<` `<=` `>` `>=` `==` `!=` flipped to the neighbour), arith (binary `+`/`-`
swapped), sign (unary minus dropped), int (integer literal +1 / -1: off-by-one on indices, steps, sizes), const (a
float literal doubled, 0.0 -> 1.0), swap (min/max, floor/ceil, any/all, argmin/argmax, True/False, and/or, ...),
args (the first two positional arguments of a call swapped), transpose (`.transpose(..)` / `.T` / `.mT` dropped,
an einsum operand's last two indices swapped). Lines that raise, log, warn or assert are not mutated, nor lines
marked `# no mutate`.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import difflib
import importlib
import importlib.util
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import tokenize
from dataclasses import asdict, dataclass

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("attention", "inversion", "masks")
FAST = ["tests/test_boundaries.py"]
ROUNDTRIP = "tests/test_inversion_core.py::test_roundtrip_is_exact_with_constant_epsilon"
# Test files (or node ids) run for a mutant of each module, fastest first: pytest stops at the first failure, so a
# killed mutant costs little and a survivor runs them all. The slow model-level tests are left out on purpose (the
# run must fit a shared CPU); modules not listed run FAST plus every test file that names them in pkg("...").
MASKS = [f"tests/test_masks.py::{t}" for t in (
    "test_block_masks_map_exactly_onto_the_latent_grid_and_back", "test_mask_batches_broadcast_and_mismatches_are_clear",
    "test_non_divisible_sizes_use_area_coverage", "test_local_blend_recovers_the_planted_object",
    "test_local_blend_matches_the_edit_samplers_mask", "test_degenerate_maps_are_documented_and_never_nan")]
TEST_MAP = {
    "attention/core.py": FAST + ["tests/test_cpam_math.py", "tests/test_p2p_math.py"],
    "attention/layers.py": FAST,
    "attention/p2p.py": FAST + ["tests/test_p2p_math.py"] + MASKS,
    "attention/seq_align.py": FAST + ["tests/test_p2p_math.py"],
    "inversion/ddim.py": FAST + [ROUNDTRIP],
    "inversion/null_text.py": FAST + [ROUNDTRIP],
    "inversion/schedule.py": FAST + [ROUNDTRIP],
    "masks/ops.py": FAST + MASKS,
    "masks/local_blend.py": FAST + MASKS,
    "inversion/direct.py": FAST + ["tests/test_inversion_core.py", "tests/test_edit_integration.py"],
    "inversion/edit.py": FAST + ["tests/test_edit_integration.py", "tests/test_mag_math.py", "tests/test_fusion.py",
                                 "tests/test_flux.py"],
    "masks/from_attention.py": FAST + ["tests/test_masks.py", "tests/test_dpl_background.py"],
    "attention/store.py": FAST + ["tests/test_masks.py"],
    "masks/preview.py": FAST + ["tests/test_masks.py"],
    # Flux: these tests need ComfyUI 0.3.x (run with COMFYUI_PATH pointing at it)
    "inversion/flow.py": FAST + ["tests/test_flux.py"],
    "attention/kvedit.py": FAST + ["tests/test_flux_attention.py"],
    "attention/joint.py": FAST + ["tests/test_flux_attention.py"],
    "inversion/instant.py": FAST + ["tests/test_bad_inputs.py", "tests/test_families_techniques.py",
                                    "tests/test_instdiffedit.py",
                                    "tests/test_packaging.py::test_numeric_defaults_lie_in_their_range_and_match_the_"
                                    "function_defaults"],
    "inversion/dpl.py": FAST + ["tests/test_dpl_edit.py", "tests/test_dpl_math.py", "tests/test_dpl.py",
                                "tests/test_dpl_steps.py", "tests/test_dpl_background.py"],
}
# Modules not in TEST_MAP run FAST plus the test files that name them; these files reach them only through nodes and
# are added (Flux inversion runs engine.invert_image's flow branch; the node's negative_words_prompt runs MAG-Edit's
# negative-prompt pass).
ALSO = {"inversion/engine.py": ["tests/test_flux.py"], "attention/mag.py": ["tests/test_mag_words.py"]}
# The realistic one-line bugs of issue 22 that the suite used to miss: (file, text, replacement).
PLANTED = [
    ("inversion/ddim.py", "x_in = x * scale", "x_in = x"),
    ("inversion/null_text.py", "NULL_TEXT_EARLY_STOP = 1e-5", "NULL_TEXT_EARLY_STOP = 1e-4"),
    ("attention/p2p.py", '"hnw,wt->hnt"', '"hnw,tw->hnt"'),
    ("attention/p2p.py", "call.site.level >= self.self_min_level", "call.site.level <= self.self_min_level"),
    ("attention/p2p.py", "(m > threshold)", "(m >= threshold)"),
    ("attention/p2p.py", "if ctx.step < int(self.start", "if ctx.step <= int(self.start"),
    ("masks/ops.py", "(grid >= BINARY_COVERAGE)", "(grid > BINARY_COVERAGE)"),
    ("attention/layers.py", "h, w, level = (h + 1) // 2, (w + 1) // 2, level // 2",
     "h, w, level = h // 2, w // 2, level // 2"),
]
CMP = {"<": "<=", "<=": "<", ">": ">=", ">=": ">", "==": "!=", "!=": "=="}
SWAPS = {"min": "max", "max": "min", "minimum": "maximum", "maximum": "minimum", "amin": "amax", "amax": "amin",
         "floor": "ceil", "ceil": "floor", "any": "all", "all": "any", "argmin": "argmax", "argmax": "argmin",
         "True": "False", "False": "True", "and": "or", "or": "and", "clamp_min": "clamp_max",
         "clamp_max": "clamp_min", "topk": "topk", "float": "float"}
SKIP_LINE_STARTS = ("raise ", "logger.", "log.", "logging.", "warn(", "common.warn(", "assert ", "LOG.", "_LOG.")
UNARY_BEFORE = {"(", "[", "{", ",", "=", ":", "return", "**", "*", "/", "+", "-", "<", ">", "<=", ">=", "==", "!=",
                "and", "or", "not", "if", "else", "in", "lambda", "%", "//", "@"}


@dataclass
class Mutant:
    id: str
    file: str
    line: int
    op: str
    before: str
    after: str
    source: str  # the whole mutated file


# ------------------------------------------------------------------------------------------------ generation
def _replace(lines: list[str], row: int, col: int, end_col: int, new: str) -> str:
    out = list(lines)
    text = out[row - 1]
    out[row - 1] = text[:col] + new + text[end_col:]
    return "".join(out)


def _skipped(line: str) -> bool:
    s = line.strip()
    return s.startswith(SKIP_LINE_STARTS) or "# no mutate" in line or s.startswith(("def ", "class ", "@"))


def _docstring_lines(tree: ast.AST) -> set[int]:
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value,
                                                                                                    str):
                lines.update(range(first.lineno, first.end_lineno + 1))
    return lines


def _annotation_spans(tree: ast.AST) -> set[tuple[int, int]]:
    """(line, col) of tokens inside annotations (`x: int = 1` mutates the 1, not the int)."""
    spans = set()
    for node in ast.walk(tree):
        ann = getattr(node, "annotation", None) or getattr(node, "returns", None)
        for a in (ann,) if ann is not None else ():
            for sub in ast.walk(a):
                if hasattr(sub, "lineno"):
                    spans.add((sub.lineno, sub.col_offset))
    return spans


def generate(rel: str, source: str) -> list[Mutant]:
    """Every mutant of one file, in source order."""
    lines = source.splitlines(keepends=True)
    tree = ast.parse(source)
    skip_rows = _docstring_lines(tree)
    annotations = _annotation_spans(tree)
    found: list[tuple[int, int, str, str, str, str]] = []  # (row, col, op, before, after, source)

    def add(row, col, end_col, op, new):
        if row in skip_rows or _skipped(lines[row - 1]):
            return
        before = lines[row - 1].rstrip("\n")
        mutated = _replace(lines, row, col, end_col, new)
        after = mutated.splitlines()[row - 1]
        if after != before:
            found.append((row, col, op, before.strip(), after.strip(), mutated))

    toks = list(tokenize.generate_tokens(io.StringIO(source).readline))
    prev = None
    for tok in toks:
        (row, col), (_erow, end_col), text = tok.start, tok.end, tok.string
        if tok.type == tokenize.OP and text in CMP:
            add(row, col, end_col, "cmp", CMP[text])
        elif tok.type == tokenize.OP and text in ("+", "-"):
            unary = prev is None or prev.string in UNARY_BEFORE or prev.type in (tokenize.NEWLINE, tokenize.NL,
                                                                                tokenize.INDENT)
            if unary and text == "-":
                add(row, col, end_col, "sign", "")
            elif not unary:
                add(row, col, end_col, "arith", "-" if text == "+" else "+")
        elif tok.type == tokenize.NUMBER and (row, col) not in annotations:
            try:
                value = ast.literal_eval(text)
            except ValueError:
                value = None
            if isinstance(value, int) and not isinstance(value, bool):
                add(row, col, end_col, "int", str(value + 1))
                add(row, col, end_col, "int", str(value - 1) if value > 0 else "(-1)")
            elif isinstance(value, float):
                add(row, col, end_col, "const", repr(value * 2) if value else "1.0")
        elif tok.type == tokenize.NAME and text in SWAPS and SWAPS[text] != text:
            if text in ("min", "max", "any", "all", "float") and prev is not None and prev.string == "def":
                pass
            else:
                add(row, col, end_col, "swap", SWAPS[text])
        if tok.type not in (tokenize.COMMENT, tokenize.NL):
            prev = tok

    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and node.lineno == node.end_lineno:
            pos = [a for a in node.args if not isinstance(a, ast.Starred)]
            if len(pos) >= 2 and pos[0].lineno == pos[1].end_lineno:
                a, b = pos[0], pos[1]
                ta = ast.get_source_segment(source, a)
                tb = ast.get_source_segment(source, b)
                if ta and tb and ta != tb:
                    line = lines[a.lineno - 1]
                    new_line = line[:a.col_offset] + tb + line[a.end_col_offset:b.col_offset] + ta + \
                        line[b.end_col_offset:]
                    add(a.lineno, 0, len(line.rstrip("\n")), "args", new_line.rstrip("\n"))
            func = node.func
            if isinstance(func, ast.Attribute) and func.attr == "transpose" and node.lineno == func.value.end_lineno:
                recv = ast.get_source_segment(source, func.value)
                line = lines[node.lineno - 1]
                add(node.lineno, node.col_offset, node.end_col_offset, "transpose", recv)
                del line
            if isinstance(func, ast.Attribute) and func.attr == "einsum" and node.args and \
                    isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
                spec = node.args[0].value
                ins, _, out = spec.partition("->")
                ops = ins.split(",")
                for i, o in enumerate(ops):
                    if len(o) >= 2 and o[-1] != o[-2] and "." not in o:
                        swapped = ops[:i] + [o[:-2] + o[-1] + o[-2]] + ops[i + 1:]
                        s = node.args[0]
                        add(s.lineno, s.col_offset, s.end_col_offset, "transpose",
                            repr(",".join(swapped) + "->" + out))
        elif isinstance(node, ast.Attribute) and node.attr in ("T", "mT") and node.lineno == node.end_lineno:
            recv = ast.get_source_segment(source, node.value)
            add(node.lineno, node.col_offset, node.end_col_offset, "transpose", recv)

    found.sort(key=lambda f: (f[0], f[1]))
    stem = rel.replace("/", ".").removesuffix(".py")
    return [Mutant(f"{stem}:{row}:{k}", rel, row, op, before, after, src)
            for k, (row, _col, op, before, after, src) in enumerate(found)]


def planted() -> list[Mutant]:
    out = []
    for k, (rel, old, new) in enumerate(PLANTED):
        with open(os.path.join(REPO, rel), encoding="utf-8") as f:
            source = f.read()
        if source.count(old) != 1:
            raise SystemExit(f"planted edit {k}: {old!r} occurs {source.count(old)} times in {rel} (expected once)")
        row = source[:source.index(old)].count("\n") + 1
        mutated = source.replace(old, new)
        out.append(Mutant(f"planted:{k}", rel, row, "planted", source.splitlines()[row - 1].strip(),
                          mutated.splitlines()[row - 1].strip(), mutated))
    return out


def sample(mutants: list[Mutant], per_file: int, seed: int) -> list[Mutant]:
    """A uniform random sample of `per_file` mutants of each file (all of a file with fewer), in source order; the
    same seed and sources give the same sample."""
    import random

    out = []
    for rel in dict.fromkeys(m.file for m in mutants):
        mine = [m for m in mutants if m.file == rel]
        rng = random.Random(f"{seed}:{rel}")
        keep = set(rng.sample(range(len(mine)), min(per_file, len(mine))))
        out += [m for i, m in enumerate(mine) if i in keep]
    return out


def tests_for(rel: str) -> list[str]:
    if rel in TEST_MAP:
        return TEST_MAP[rel]
    dotted = rel.removesuffix(".py").replace("/", ".")
    names = list(FAST)
    for name in sorted(os.listdir(os.path.join(REPO, "tests"))):
        path = os.path.join(REPO, "tests", name)
        if name.startswith("test_") and name.endswith(".py") and f"tests/{name}" not in names:
            with open(path, encoding="utf-8") as f:
                if f'"{dotted}"' in f.read():
                    names.append(f"tests/{name}")
    return names + [t for t in ALSO.get(rel, []) if t not in names]


def diff(m: Mutant) -> str:
    with open(os.path.join(REPO, m.file), encoding="utf-8") as f:
        original = f.read()
    return "".join(difflib.unified_diff(original.splitlines(keepends=True), m.source.splitlines(keepends=True),
                                        f"a/{m.file}", f"b/{m.file}", n=1))


# ------------------------------------------------------------------------------------------------ running
def copy_tree(dest_root: str) -> str:
    """Copy of the repository (sources, tests, tools; no .git / venv / caches) under `dest_root`/attention_edit."""
    dest = os.path.join(dest_root, "attention_edit")
    shutil.copytree(REPO, dest, ignore=shutil.ignore_patterns(".git", ".venv", "__pycache__", "out", "*.pyc",
                                                              ".pytest_cache", ".ruff_cache"))
    return dest


def pytest_args(tests: list[str], root: str) -> list[str]:
    return [os.path.join(root, t) for t in tests] + ["-x", "-q", "-p", "no:cacheprovider", "--rootdir", root,
                                                     "-W", "ignore"]


def _fork(log: str, body) -> int:
    """Run `body()` in a forked child with its output in `log`; the child exits with its return code (4 when it
    raises: a mutant that breaks the import is a killed mutant). Returns the child's pid."""
    pid = os.fork()
    if pid == 0:  # child
        code = 3
        try:
            fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            code = body()
        except BaseException as e:  # noqa: BLE001
            print(f"mutate: {type(e).__name__}: {e}", flush=True)
            code = 4
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    return pid


class ForkRunner:
    """Boots the host once in this process (from the copy) and runs each mutant in a forked child."""

    def __init__(self, root: str):
        self.root = root
        os.chdir(root)
        sys.path[:0] = [os.path.join(root, "tests"), os.path.join(root, "tools")]
        with contextlib.redirect_stdout(io.StringIO()):
            import conftest  # noqa: F401  (boots the host and loads the pack from the copy)
        self.host = conftest.HOST
        self.prefix = self.host.pack.__name__ + "."

    def _apply(self, m: Mutant) -> None:
        dotted = m.file.removesuffix(".py").replace("/", ".")
        mod = self.host.module(dotted)
        old = dict(vars(mod))
        # the tree is a temporary copy: the child writes the mutant into it and re-runs the module in place
        with open(mod.__file__, "w", encoding="utf-8") as f:
            f.write(m.source)
        cached = importlib.util.cache_from_source(mod.__file__)
        if os.path.exists(cached):
            os.remove(cached)  # a same-size edit within the same second would otherwise reload the old bytecode
        sys.dont_write_bytecode = True
        importlib.reload(mod)
        new = vars(mod)
        changed = {k: (v, new[k]) for k, v in old.items() if k in new and new[k] is not v}
        for name, other in list(sys.modules.items()):
            if other is mod or not name.startswith(self.prefix) or other is None:
                continue
            ns = vars(other)
            for k, (was, now) in changed.items():
                if ns.get(k) is was:
                    ns[k] = now

    def coverage(self, rel: str, tests: list[str], log: str) -> dict:
        """One traced run of `tests` in a forked child: {"lines": {test id: lines of `rel` it ran}, "seconds": ...}."""
        import pytest

        mod = self.host.module(rel.removesuffix(".py").replace("/", "."))
        out = os.path.join(os.path.dirname(log), "coverage.json")

        def traced() -> int:
            trace = LineTrace({mod.__file__, os.path.realpath(mod.__file__)})
            code = int(pytest.main(pytest_args(tests, self.root), plugins=[trace]))
            with open(out, "w", encoding="utf-8") as f:
                json.dump({"lines": {k: sorted(v) for k, v in trace.lines.items()}, "seconds": trace.seconds}, f)
            return code

        _, status = os.waitpid(_fork(log, traced), 0)
        if os.waitstatus_to_exitcode(status) != 0:
            raise SystemExit(f"baseline fails for {tests}:\n{_tail(log, 30)}")
        with open(out, encoding="utf-8") as f:
            return json.load(f)

    def run(self, m: Mutant | None, tests: list[str], timeout: float, log: str,
            first: list[str] | None = None) -> tuple[str, float]:
        """`first`: tests run in a session of their own before `tests` (pytest merges a node id given together with
        its file back into file order, so an order is only kept by separate sessions)."""
        import pytest

        def mutated() -> int:
            if m is not None:
                self._apply(m)
            code = int(pytest.main(pytest_args(first, self.root))) if first else 0
            return code or int(pytest.main(pytest_args(tests, self.root)))

        start = time.monotonic()
        pid = _fork(log, mutated)
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                code = os.waitstatus_to_exitcode(status)
                return ("survived" if code == 0 else "killed"), time.monotonic() - start
            if time.monotonic() - start > timeout:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                return "timeout", time.monotonic() - start
            time.sleep(0.05)


class LineTrace:
    """pytest plugin: the lines of one source file that each test executes (stdlib `sys.settrace`, the target file's
    frames only). Tests that never execute a line cannot see a mutant on it, so a mutant need only run those that do."""

    def __init__(self, paths: set[str]):
        self.paths = paths
        self.current: str | None = None
        self.lines: dict[str, set[int]] = {}
        self.seconds: dict[str, float] = {}
        self._start = 0.0

    def _call(self, frame, event, arg):
        return self._line if frame.f_code.co_filename in self.paths else None

    def _line(self, frame, event, arg):
        if event == "line" and self.current is not None:
            self.lines[self.current].add(frame.f_lineno)
        return self._line

    # pytest hooks (this object is registered as a plugin): trace from each test's setup to its teardown
    def pytest_runtest_logstart(self, nodeid, location):
        import threading

        self.current = nodeid
        self.lines.setdefault(nodeid, set())
        self._start = time.monotonic()
        sys.settrace(self._call)
        threading.settrace(self._call)

    def pytest_runtest_logfinish(self, nodeid, location):
        import threading

        sys.settrace(None)
        threading.settrace(None)
        self.current = None
        self.seconds[nodeid] = self.seconds.get(nodeid, 0.0) + time.monotonic() - self._start


def runtime_lines(source: str) -> dict[int, set[int]]:
    """line -> the lines of its innermost statement (a compound statement: its header), for every line inside a
    function or lambda body. Lines outside (module level, class bodies, signatures, decorators) run at import, where
    every test sees them: they are absent and get every mapped test."""
    tree = ast.parse(source)
    bodies: list[tuple[int, int]] = []
    stmts: list[tuple[int, int]] = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            bodies.append((node.body[0].lineno, node.body[-1].end_lineno))
        elif isinstance(node, ast.Lambda):
            bodies.append((node.body.lineno, node.body.end_lineno))
        if isinstance(node, ast.stmt):
            end = node.end_lineno
            inner = [c for f in ("body", "orelse", "finalbody", "handlers", "cases") for c in getattr(node, f, [])
                     if isinstance(c, ast.AST) and hasattr(c, "lineno")]
            if inner:
                end = max(node.lineno, min(c.lineno for c in inner) - 1)
            stmts.append((node.lineno, end))
    out: dict[int, set[int]] = {}
    for lo, hi in bodies:
        for line in range(lo, hi + 1):
            spans = [s for s in stmts if s[0] <= line <= s[1]]
            lo_s, hi_s = min(spans, key=lambda s: s[1] - s[0]) if spans else (line, line)
            out[line] = set(range(lo_s, hi_s + 1))
    return out


def base_id(nodeid: str) -> str:
    """A pytest node id without its parameters: what a mutant's run selects (every parametrisation of the test)."""
    return nodeid.split("[")[0]


def traced_seconds(coverage: dict) -> dict[str, float]:
    """Traced seconds per `base_id` (a test's parameters summed)."""
    seconds: dict[str, float] = {}
    for nodeid, took in coverage.get("seconds", {}).items():
        seconds[base_id(nodeid)] = seconds.get(base_id(nodeid), 0.0) + took
    return seconds


def tests_running(coverage: dict, lines: set[int]) -> list[str]:
    """The traced tests that executed any of `lines`, as `base_id`s, once each, quickest first (`traced_seconds`; ties
    in run order): a run stops at its first failure, so a mutant is killed sooner."""
    ids = list(dict.fromkeys(base_id(nodeid) for nodeid, ran in coverage["lines"].items() if lines & set(ran)))
    seconds = traced_seconds(coverage)
    return sorted(ids, key=lambda i: seconds.get(i, 0.0))


def select_tests(coverage: dict, m: Mutant, spans: dict[int, set[int]]) -> list[str] | None:
    """The mapped tests (pytest ids without parameters, quickest first) that execute the mutated statement; None when
    the line runs at import (every mapped test)."""
    if m.line not in spans:
        return None
    return tests_running(coverage, spans[m.line])


def likely_killers(coverage: dict, m: Mutant, source: str, spans: dict[int, set[int]]) -> list[str]:
    """For a mutant on an import-time assignment (`NAME = ...`, a class field): the mapped tests that execute a line
    naming what it assigns. They run first; every mapped test still runs after them, so this only orders."""
    tree = ast.parse(source)
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Assign, ast.AnnAssign)) and node.lineno <= m.line <= node.end_lineno:
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {t.id for t in targets if isinstance(t, ast.Name)}
    if not names:
        return []
    pattern = re.compile(r"\b(" + "|".join(sorted(names)) + r")\b")
    return tests_running(coverage, {i for i, text in enumerate(source.splitlines(), 1) if i in spans
                                    and pattern.search(text)})


class SubprocessRunner:
    """Writes the mutated file into the copy and runs pytest in a fresh interpreter (exact, slow)."""

    def __init__(self, root: str):
        self.root = root

    def run(self, m: Mutant | None, tests: list[str], timeout: float, log: str) -> tuple[str, float]:
        path = os.path.join(self.root, m.file) if m else None
        original = None
        if m is not None:
            with open(path, encoding="utf-8") as f:
                original = f.read()
            with open(path, "w", encoding="utf-8") as f:
                f.write(m.source)
        start = time.monotonic()
        try:
            with open(log, "w") as out:
                proc = subprocess.run([sys.executable, "-m", "pytest", *pytest_args(tests, self.root)], cwd=self.root,
                                      stdout=out, stderr=subprocess.STDOUT, timeout=timeout,
                                      env={**os.environ, "OMP_NUM_THREADS": "1"})
            status = "survived" if proc.returncode == 0 else "killed"
        except subprocess.TimeoutExpired:
            status = "timeout"
        finally:
            if original is not None:
                with open(path, "w", encoding="utf-8") as f:
                    f.write(original)
        return status, time.monotonic() - start


def _tail(path: str, n: int = 6) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            lines = [ln.rstrip() for ln in f if ln.strip()]
    except OSError:
        return ""
    failed = [ln for ln in lines if ln.startswith(("FAILED", "ERROR", "mutate:"))]
    return "\n".join((failed or lines)[-n:])


def _coverage_for(runner: ForkRunner, rel: str, tests: list[str], out_dir: str, log: str) -> dict:
    """The traced baseline of `rel`'s tests, cached in OUT (keyed by the source, the test list and the test files'
    contents: an edit of either traces again)."""
    import hashlib

    digest = hashlib.sha256("\n".join(tests).encode())
    for path in [rel] + sorted({t.split("::")[0] for t in tests} | {"tests/conftest.py"}):
        with open(os.path.join(REPO, path), "rb") as f:
            digest.update(f.read())
    key = digest.hexdigest()[:16]
    path = os.path.join(out_dir, f"coverage_{rel.replace('/', '_')}_{key}.json")
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    start = time.monotonic()
    cov = runner.coverage(rel, tests, log)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(cov, f)
    print(f"traced {rel} under {len(cov['lines'])} tests: {time.monotonic() - start:.1f}s", flush=True)
    return cov


def _record(results: str, m: Mutant, status: str, took: float, tests: list[str], mode: str, log: str, note: str = "",
            **extra) -> None:
    """Append one mutant's result to OUT/results.jsonl and print it."""
    rec = {**{k: v for k, v in asdict(m).items() if k != "source"}, "status": status, "seconds": round(took, 1),
           "tests": tests, "mode": mode, "diff": diff(m) if status == "survived" else "",
           "failure": _tail(log) if status == "killed" else "", **extra}
    with open(results, "a", encoding="utf-8") as f:
        f.write(json.dumps(rec) + "\n")
    print(f"{status:8s} {took:6.1f}s {m.id} [{m.op}] {m.after}{note}", flush=True)


def run_mutants(mutants: list[Mutant], out_dir: str, mode: str, timeout: float | None, tests_override=None,
                resume: bool = True, select: bool = True) -> None:
    out_dir = os.path.abspath(out_dir)  # the fork runner works inside the copy
    os.makedirs(out_dir, exist_ok=True)
    results = os.path.join(out_dir, "results.jsonl")
    done = set()
    if resume and os.path.exists(results):  # resume: skip mutants already recorded
        with open(results, encoding="utf-8") as f:
            done = {json.loads(ln)["id"] for ln in f if ln.strip()}
    tmp = tempfile.mkdtemp(prefix="attnedit_mutate_")
    root = copy_tree(tmp)
    runner = ForkRunner(root) if mode == "fork" else SubprocessRunner(root)
    log = os.path.join(tmp, "pytest.log")
    baselines: dict[tuple[str, ...], float] = {}
    coverages: dict[str, dict] = {}
    spans: dict[str, dict[int, set[int]]] = {}
    sources: dict[str, str] = {}
    try:
        for m in mutants:
            if m.id in done:
                continue
            tests = tests_override or tests_for(m.file)
            key = tuple(tests)
            first: list[str] = []
            if select and mode == "fork":  # only the mapped tests that execute the mutated statement
                if m.file not in coverages:
                    with open(os.path.join(REPO, m.file), encoding="utf-8") as f:
                        sources[m.file] = f.read()
                    spans[m.file] = runtime_lines(sources[m.file])
                    coverages[m.file] = _coverage_for(runner, m.file, tests, out_dir, log)
                chosen = select_tests(coverages[m.file], m, spans[m.file])
                if chosen == []:  # no mapped test runs this line: nothing can see the mutant
                    _record(results, m, "survived", 0.0, [], mode, log, " (no test runs this line)", uncovered=True)
                    continue
                if chosen:
                    seconds = traced_seconds(coverages[m.file])
                    took_all = sum(seconds.get(t, 0.0) for t in chosen)
                    status, took = runner.run(m, chosen, timeout or 3 * took_all + 30, log)
                    _record(results, m, status, took, chosen, mode, log, f" ({len(chosen)} tests)")
                    continue
                first = likely_killers(coverages[m.file], m, sources[m.file], spans[m.file])
                # the traced run passed every mapped test: it is the baseline (traced, so a generous timeout)
                baselines.setdefault(key, sum(coverages[m.file]["seconds"].values()))
            if key not in baselines:
                status, took = runner.run(None, tests, 3600, log)
                if status != "survived":
                    raise SystemExit(f"baseline fails for {tests}:\n{_tail(log, 30)}")
                baselines[key] = took
                print(f"baseline {' '.join(tests)}: {took:.1f}s", flush=True)
            limit = timeout or 3 * baselines[key] + 20
            status, took = runner.run(m, tests, limit, log, first) if first else runner.run(m, tests, limit, log)
            _record(results, m, status, took, tests, mode, log)
    finally:
        os.chdir(REPO)
        shutil.rmtree(tmp, ignore_errors=True)


def load(results: str) -> list[dict]:
    with open(results, encoding="utf-8") as f:
        recs = [json.loads(ln) for ln in f if ln.strip()]
    last = {r["id"]: r for r in recs}  # a later record (verify) replaces an earlier one
    return list(last.values())


def report(results: str) -> str:
    recs = load(results)
    by_file: dict[str, dict[str, int]] = {}
    for r in recs:
        by_file.setdefault(r["file"], {"killed": 0, "survived": 0, "timeout": 0})[r["status"]] += 1
    out = ["| file | mutants | killed | timeout | survived | score |", "|---|---|---|---|---|---|"]
    tot = {"killed": 0, "survived": 0, "timeout": 0}
    for f in sorted(by_file):
        c = by_file[f]
        n = sum(c.values())
        for k in tot:
            tot[k] += c[k]
        out.append(f"| {f} | {n} | {c['killed']} | {c['timeout']} | {c['survived']} | "
                   f"{100 * (c['killed'] + c['timeout']) / n:.1f}% |")
    n = sum(tot.values())
    if n:
        out.append(f"| **all** | {n} | {tot['killed']} | {tot['timeout']} | {tot['survived']} | "
                   f"**{100 * (tot['killed'] + tot['timeout']) / n:.1f}%** |")
    out += ["", "## Survivors", ""]
    for r in recs:
        if r["status"] == "survived":
            out += [f"### {r['id']} [{r['op']}] ({r['mode']})", "```diff", r["diff"].rstrip(), "```", ""]
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    ls = sub.add_parser("list", help="print the mutants of the given files")
    ls.add_argument("files", nargs="*")
    ls.add_argument("--ops", help="comma-separated operators to keep")
    rn = sub.add_parser("run", help="run mutants; results appended to OUT/results.jsonl (resumable)")
    rn.add_argument("files", nargs="*", help="files under attention/ inversion/ masks/ (default: all)")
    rn.add_argument("--planted", action="store_true", help="run issue 22's planted bugs instead")
    rn.add_argument("--ops", help="comma-separated operators to keep")
    rn.add_argument("--lines", help="only mutants on these lines, e.g. 40-60")
    rn.add_argument("--out", default=os.path.join(REPO, "out", "mutation"))
    rn.add_argument("--mode", choices=("fork", "subprocess"), default="fork")
    rn.add_argument("--timeout", type=float, help="seconds per mutant (default 3 x baseline + 20)")
    rn.add_argument("--tests", nargs="*", help="test files to run instead of the mapped ones")
    rn.add_argument("--all-tests", action="store_true",
                    help="run every mapped test for each mutant (default in fork mode: only those that execute the "
                         "mutated statement, found by one traced baseline run)")
    rn.add_argument("--sample", type=int, default=0,
                    help="a seeded uniform sample of this many mutants per file (0: all); the estimate of a whole run")
    rn.add_argument("--seed", type=int, default=0, help="seed of --sample")
    rn.add_argument("--survivors", action="store_true",
                    help="re-run only the survivors recorded in OUT/results.jsonl (after adding tests)")
    vf = sub.add_parser("verify", help="re-run the survivors of a results file in subprocess mode")
    vf.add_argument("results")
    vf.add_argument("--timeout", type=float)
    rp = sub.add_parser("report", help="markdown summary of a results file (per file, survivors with diffs)")
    rp.add_argument("results")
    args = ap.parse_args(argv)

    def select(files, ops, lines=None):
        if not files:
            files = sorted(os.path.relpath(os.path.join(d, f), REPO) for p in PACKAGES
                           for d, _s, fs in os.walk(os.path.join(REPO, p)) for f in fs if f.endswith(".py"))
        out = []
        for rel in files:
            with open(os.path.join(REPO, rel), encoding="utf-8") as f:
                out += generate(rel, f.read())
        if ops:
            out = [m for m in out if m.op in ops.split(",")]
        if lines:
            lo, _, hi = lines.partition("-")
            out = [m for m in out if int(lo) <= m.line <= int(hi or lo)]
        return out

    if args.cmd == "list":
        for m in select(args.files, args.ops):
            print(f"{m.id} [{m.op}] {m.before}  ->  {m.after}")
        return 0
    if args.cmd == "report":
        sys.stdout.write(report(args.results))
        return 0
    if args.cmd == "verify":
        survivors = [r for r in load(args.results) if r["status"] == "survived" and r["mode"] == "fork"]
        index = {}
        for rel in {r["file"] for r in survivors}:
            with open(os.path.join(REPO, rel), encoding="utf-8") as f:
                index.update({m.id: m for m in generate(rel, f.read())})
        index.update({m.id: m for m in planted()})
        todo = [index[r["id"]] for r in survivors if r["id"] in index]
        out_dir = os.path.dirname(os.path.abspath(args.results))
        # subprocess records are appended under the same ids and replace the fork ones in `report`
        verify_dir = tempfile.mkdtemp(prefix="attnedit_verify_")
        run_mutants(todo, verify_dir, "subprocess", args.timeout)
        with open(os.path.join(verify_dir, "results.jsonl"), encoding="utf-8") as src, \
                open(os.path.join(out_dir, os.path.basename(args.results)), "a", encoding="utf-8") as dst:
            dst.write(src.read())
        shutil.rmtree(verify_dir, ignore_errors=True)
        return 0
    mutants = planted() if args.planted else select(args.files, args.ops, args.lines)
    if args.sample:
        mutants = sample(mutants, args.sample, args.seed)
    if args.survivors:
        alive = {r["id"] for r in load(os.path.join(args.out, "results.jsonl")) if r["status"] == "survived"}
        mutants = [m for m in mutants if m.id in alive]
    run_mutants(mutants, args.out, args.mode, args.timeout, args.tests, resume=not args.survivors,
                select=not args.all_tests)
    return 0


if __name__ == "__main__":
    sys.exit(main())
