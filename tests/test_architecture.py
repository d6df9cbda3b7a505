"""What docs/architecture.md promises about the layout: which module imports which, and the loop as small parts."""

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).parent.parent / "src"


def imported(path):
    """Every module `path` imports, at the top or inside a function; relative imports are not used here."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            out.add(node.module)
            out |= {f"{node.module}.{a.name}" for a in node.names}
    return out


def ours(names):
    return {n for n in names if n.split(".")[0] == "pace_lm" and n.count(".") == 1}


def test_the_optimizer_never_imports_the_pipeline():
    for path in (SRC / "pace").rglob("*.py"):
        assert not {n for n in imported(path) if n.startswith("pace_lm")}, path


@pytest.mark.parametrize("module, allowed", [
    ("plots", {"pace_lm.config.compose", "pace_lm.run.records", "pace_lm.files.marks", "pace_lm.PaceLMError"}),  # records only
    ("marks", {"pace_lm.PaceLMError"}),
    ("config", {"pace_lm.config.packages"}),                                          # no model code, no torch
    ("packages", {"pace_lm.PaceLMError", "pace_lm.run.records"}),
    ("records", {"pace_lm.files.atomic"}),
    ("atomic", set()),
])
def test_low_modules_import_only_what_they_own(module, allowed):
    names = imported(SRC / "pace_lm" / f"{module}.py")
    assert ours(names) <= allowed | {"pace_lm.PaceLMError"}, ours(names) - allowed
    if module in ("plots", "config", "packages"):
        assert "torch" not in names and "transformers" not in names


def test_nothing_imports_the_training_loop_but_the_commands_and_sweeps():
    for path in (SRC / "pace_lm").glob("*.py"):
        if "pace_lm.run.train" in imported(path):
            assert path.name in ("cli.py", "figures.py", "jobs.py"), path


def _functions(path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            a = node.args
            params = [x.arg for x in a.posonlyargs + a.args + a.kwonlyargs if x.arg not in ("self", "cls")]
            params += [f"*{x.arg}" for x in (a.vararg, a.kwarg) if x is not None]
            yield node.name, node.end_lineno - node.lineno + 1, params


@pytest.mark.parametrize("module", sorted(p.stem for p in (SRC / "pace_lm").glob("*.py")))
def test_every_pipeline_function_is_small(module):
    """No function of any pace_lm module over 60 lines or taking more than 6 parameters."""
    for name, lines, params in _functions(SRC / "pace_lm" / f"{module}.py"):
        assert lines <= 60, f"{module}.{name} has {lines} lines"
        assert len(params) <= 6, f"{module}.{name}: {params}"


def test_the_loop_has_its_named_parts():
    from pace_lm.run.train import Loop
    for part in ("run", "train_step", "log", "evaluate", "should_stop", "checkpoint", "resume", "summary"):
        assert callable(getattr(Loop, part)), part


def test_ci_runs_the_readme_set_up_and_the_whole_suite():
    """The README's test command is what .ci/run does, step for step, and neither leaves the slow tests out."""
    root = SRC.parent
    readme = [line for line in (root / "README.md").read_text().splitlines()
              if line.startswith("python3 -m venv") and "pytest" in line]
    assert len(readme) == 1
    steps = [s.strip() for s in readme[0].split("&&")][2:]  # after making and activating the venv

    def plain(line):
        return " ".join(w for w in line.split("#")[0].split() if w != "-q").removeprefix("python -m ")

    ci = [plain(line) for line in (root / ".ci" / "run").read_text().splitlines()
          if line.startswith(("python -m pip install", "python -m pytest"))]
    assert [plain(s) for s in steps] == ci
    assert ci[-1] == "pytest"  # the whole suite: `-m "not slow"` is the quick local loop


def test_the_module_graph_has_no_cycle():
    """No pace_lm module imports, at the top or inside a function, one that imports it back, however far
    round: registries live in the leaf pace_lm.config.registry, which the schema and the builders both import."""
    modules = {p.stem: p for p in (SRC / "pace_lm").glob("*.py") if p.stem != "__init__"}
    graph = {m: {n.split(".")[1] for n in ours(imported(p))} & set(modules) - {m} for m, p in modules.items()}
    state = {}

    def visit(module, path):
        state[module] = "open"
        for nxt in sorted(graph[module]):
            assert state.get(nxt) != "open", f"import cycle: {' -> '.join(path + [nxt])}"
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert graph["registry"] == set()
    assert not graph["schema"] & {"optim", "models", "distributed", "train"}


def test_the_optimizer_package_has_no_import_cycle():
    """pace's modules import one another downward only (the class, its plan and paths, the kernels, the
    leaves), at the top or inside a function."""
    modules = {p.stem: p for p in (SRC / "pace").glob("*.py") if p.stem != "__init__"}
    graph = {m: {n.split(".")[1] for n in imported(p) if n.startswith("pace.") and n.count(".") >= 1}
             & set(modules) - {m} for m, p in modules.items()}
    order = []

    def visit(module, path):
        for nxt in sorted(graph[module]):
            assert nxt not in path, f"import cycle: {' -> '.join(path + [nxt])}"
            visit(nxt, path + [nxt])
        order.append(module)

    for module in sorted(graph):
        visit(module, [module])
    assert graph["hyper"] == graph["plan"] == graph["rules"] == graph["notices"] == set()
    assert {m for m, deps in graph.items() if "optimizer" in deps} == {"theory"}  # it runs PACE on the quadratic


def test_the_step_paths_share_one_signature():
    """Every path pace.paths chooses is a function of one signature (torch.optim's single-tensor /
    multi-tensor / fused functions share theirs), so that the step calls each the same way."""
    import inspect

    from pace import cpu_kernel, foreach, forloop, triton_kernel
    paths = [forloop.step, foreach.step, cpu_kernel.step, triton_kernel.step]
    signatures = {str(inspect.signature(fn)) for fn in paths}
    assert signatures == {"(bucket, grads, hp, consts, *, pull, update_ema, stats)"}


def test_the_architecture_page_names_every_module():
    """docs/architecture.md's layout lists each module of both packages, and none that is gone."""
    page = (SRC.parent / "docs" / "architecture.md").read_text()
    layout = page[page.index("```\nsrc/pace/"):page.index("\ntests/")]  # the two packages' part of the tree
    listed = {w for line in layout.splitlines() for w in line.replace(",", " ").split() if w.endswith(".py")}
    have = {p.name for pkg in ("pace", "pace_lm") for p in (SRC / pkg).glob("*.py") if p.name != "__init__.py"}
    have |= {p.name for p in (SRC / "pace" / "integrations").glob("*.py") if p.name != "__init__.py"}
    assert listed == have, (sorted(have - listed), sorted(listed - have))


def test_no_large_file_is_tracked_outside_the_records_and_figures():
    """The repository holds code, docs, committed run records and drawn figures: any other tracked file over
    1 MB (a wheel, a checkpoint, a dataset) is a mistake."""
    import subprocess
    root = SRC.parent
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=root, capture_output=True, check=True).stdout
    kept = ("tests/fixtures/results/", "docs/figures/")
    large = [name for name in listed.decode().split("\0") if name and not name.startswith(kept)
             and (root / name).is_file() and (root / name).stat().st_size > 1 << 20]
    assert large == []
