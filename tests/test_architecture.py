"""What docs/architecture.md promises about the layout: which module imports which, and the loop as small parts."""

import ast

import pytest
from source_tree import FLOORS, SRC, import_graph, imported, pipeline_modules


def floor(module):
    top = module.split(".")[0]
    return next(i for i, names in enumerate(FLOORS) if top in names.split())


def test_the_optimizer_never_imports_the_pipeline():
    for path in (SRC / "pace").rglob("*.py"):
        assert not {n for n in imported(path) if n.startswith("pace_lm")}, path


def test_the_folders_are_floors():
    """A pipeline module imports only from its own folder and the floors below (files and environment at the
    bottom, cli at the top): the folder names are the architecture."""
    assert {m.split(".")[0] for m in pipeline_modules()} == {n for names in FLOORS for n in names.split()}
    for module, deps in import_graph().items():
        up = sorted(d for d in deps if floor(d) > floor(module))
        assert not up, f"{module} imports {up} from a floor above"


def test_low_modules_import_no_training_code():
    """What reads records, composes configs or stores files imports no torch and no model code."""
    for module in (
        "figures.plots",
        "config.compose",
        "config.packages",
        "files.atomic",
        "files.marks",
        "run.records",
        "environment",
    ):
        names = imported(pipeline_modules()[module])
        assert "transformers" not in names, module
        if module != "environment":  # it asks torch for its version, inside a function
            assert "torch" not in names, module


def test_the_config_is_parsed_once():
    """Below the entry points only typed sections flow: omegaconf is imported by the config, the CLI and the
    figure specs alone, and the builders take schema objects, never a raw group to validate themselves."""
    users = sorted(m for m, p in pipeline_modules().items() if any(n.startswith("omegaconf") for n in imported(p)))
    assert users == ["cli", "config.compose", "config.schema", "figures.specs"]
    for module in ("models.lm", "models.optim", "models.averaging", "run.train"):
        names = {n.rsplit(".", 1)[-1] for n in imported(pipeline_modules()[module])}
        assert not names & {"validate_model", "validate_optimizer"}, module


def test_nothing_imports_the_training_loop_but_the_commands_and_the_sweep():
    assert sorted(m for m, deps in import_graph().items() if "run.train" in deps) == ["cli", "figures.sweep"]


def _functions(path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            a = node.args
            params = [x.arg for x in a.posonlyargs + a.args + a.kwonlyargs if x.arg not in ("self", "cls")]
            params += [f"*{x.arg}" for x in (a.vararg, a.kwarg) if x is not None]
            yield node.name, node.end_lineno - node.lineno + 1, params


@pytest.mark.parametrize("module", sorted(pipeline_modules()))
def test_every_pipeline_function_is_small(module):
    """No function of any pace_lm module over 60 lines or taking more than 6 parameters."""
    for name, lines, params in _functions(pipeline_modules()[module]):
        assert lines <= 60, f"{module}.{name} has {lines} lines"
        assert len(params) <= 6, f"{module}.{name}: {params}"


def test_the_module_graph_has_no_cycle():
    """No pace_lm module imports, at the top or inside a function, one that imports it back, however far
    round: registries live in the leaf config.registry, which the schema and the builders both import."""
    graph = import_graph()
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
    assert graph["config.registry"] == set()
    assert not graph["config.schema"] & {"models.optim", "models.lm", "run.distributed", "run.train"}


def test_the_optimizer_package_has_no_import_cycle():
    """pace's modules import one another downward only (the class, its plan and paths, the kernels, the
    leaves), at the top or inside a function."""
    modules = {p.stem: p for p in (SRC / "pace").glob("*.py") if p.stem != "__init__"}
    graph = {
        m: {n.split(".")[1] for n in imported(p) if n.startswith("pace.") and n.count(".") >= 1} & set(modules) - {m}
        for m, p in modules.items()
    }
    order = []

    def visit(module, path):
        for nxt in sorted(graph[module]):
            assert nxt not in path, f"import cycle: {' -> '.join(path + [nxt])}"
            visit(nxt, path + [nxt])
        order.append(module)

    for module in sorted(graph):
        visit(module, [module])
    assert graph["hyper"] == graph["rules"] == graph["notices"] == graph["tensors"] == graph["zero"] == set()
    assert graph["returned"] <= {"tensors", "zero"}  # the returned model knows no step path
    assert not {m for m in ("paths", "forloop", "foreach", "cpu_kernel", "triton_kernel") if "returned" in graph[m]}
    assert {m for m, deps in graph.items() if "optimizer" in deps} == {"theory"}  # it runs PACE on the quadratic


def test_the_step_paths_share_one_signature():
    """Every path pace.paths chooses is a function of one signature (torch.optim's single-tensor /
    multi-tensor / fused functions share theirs), so that the step calls each the same way."""
    import inspect

    from pace import cpu_kernel, foreach, forloop, triton_kernel

    paths = [forloop.step, foreach.step, cpu_kernel.step, triton_kernel.step]
    signatures = {str(inspect.signature(fn)) for fn in paths}
    assert signatures == {"(bucket, grads, hp, consts, *, pull, update_ema, stats)"}


def test_no_large_file_is_tracked_outside_the_records_and_figures():
    """The repository holds code, docs, committed run records and drawn figures: any other tracked file over
    1 MB (a wheel, a checkpoint, a dataset) is a mistake."""
    import subprocess

    root = SRC.parent
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=root, capture_output=True, check=True).stdout
    kept = ("tests/fixtures/results/", "docs/figures/")
    large = [
        name
        for name in listed.decode().split("\0")
        if name and not name.startswith(kept) and (root / name).is_file() and (root / name).stat().st_size > 1 << 20
    ]
    assert large == []


def test_no_test_file_imports_another():
    """What tests share lives in conftest.py and the named helper modules, never in another test file (whose
    import would collect its tests twice and tie the files' fates together)."""
    tests = {p.stem: p for p in (SRC.parent / "tests").glob("test_*.py")}
    assert {
        name: sorted(set(tests) & imported(path)) for name, path in tests.items() if set(tests) & imported(path)
    } == {}
