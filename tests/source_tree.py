"""The project's source tree as the code has it: its modules and which imports which (ast, not text)."""

import ast
from pathlib import Path

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


PIPELINE = SRC / "pace_lm"
FLOORS = ["files environment", "config", "data", "models", "run", "figures", "cli"]  # docs/architecture.md's


def pipeline_modules():
    """{dotted name under pace_lm (e.g. run.train): its path}."""
    out = {}
    for path in sorted(PIPELINE.rglob("*.py")):
        parts = path.relative_to(PIPELINE).with_suffix("").parts
        if parts[-1] != "__init__":
            out[".".join(parts)] = path
    return out


def import_graph():
    """{module: the pipeline modules it imports}, from the code."""
    modules = pipeline_modules()
    return {
        m: {n[len("pace_lm.") :] for n in imported(p) if n.startswith("pace_lm.")} & set(modules) - {m}
        for m, p in modules.items()
    }
