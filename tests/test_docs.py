"""What the README and docs/ say, checked against what the software does: the commands, the tables and
figures the commands print and draw from the committed records, and the architecture page's layout and
import map against the code."""

import json
from pathlib import Path

import pytest
from conftest import blocks
from source_tree import SRC, import_graph, pipeline_modules

from pace_lm.figures.plots import plot_figure
from pace_lm.figures.specs import load_figure
from pace_lm.run.records import read_record

FIXTURES = Path(__file__).parent / "fixtures" / "results"
README = Path(__file__).parent.parent / "README.md"
FIGURES_DOC = README.parent / "docs" / "figures.md"


# ---- docs/architecture.md: the layout and the import map are the code's ---------------------------------------


def documented_map():
    """{module: the modules docs/architecture.md says it imports}: its import map's code block."""
    page = (SRC.parent / "docs" / "architecture.md").read_text()
    block = page[page.index("Each module and the pipeline modules it imports") :]
    block = block[block.index("```\n") + 4 : block.index("\n```", block.index("```\n") + 4)]
    out = {}
    for line in block.splitlines():
        module, _, deps = line.partition(" ")
        out[module] = {d.strip() for d in deps.split(",") if d.strip()}
    return out


def test_the_architecture_pages_import_map_is_the_codes():
    """docs/architecture.md's import map lists every pipeline module with exactly the modules it imports."""
    real, documented = import_graph(), documented_map()
    assert set(documented) == set(real), (sorted(set(real) - set(documented)), sorted(set(documented) - set(real)))
    wrong = {
        m: dict(missing=sorted(real[m] - documented[m]), extra=sorted(documented[m] - real[m]))
        for m in real
        if real[m] != documented[m]
    }
    assert not wrong, wrong


def test_ci_runs_the_readme_set_up_and_the_whole_suite():
    """The README's test command is what .ci/run does, step for step, and neither leaves the slow tests out."""
    root = SRC.parent
    readme = [
        line
        for line in (root / "README.md").read_text().splitlines()
        if line.startswith("python3 -m venv") and "pytest" in line
    ]
    assert len(readme) == 1
    steps = [s.strip() for s in readme[0].split("&&")][2:]  # after making and activating the venv

    def plain(line):
        return " ".join(w for w in line.split("#")[0].split() if w != "-q").removeprefix("python -m ")

    ci = [
        plain(line)
        for line in (root / ".ci" / "run").read_text().splitlines()
        if line.startswith(("python -m pip install", "python -m pytest"))
    ]
    assert [plain(s) for s in steps] == ci
    assert ci[-1] == "pytest"  # the whole suite: `-m "not slow"` is the quick local loop


def test_the_architecture_page_names_every_module():
    """docs/architecture.md's layout lists each module of both packages under its folder, and none that is gone."""
    page = (SRC.parent / "docs" / "architecture.md").read_text()
    layout = page[page.index("```\nsrc/pace/") : page.index("\ntests/")]  # the two packages' part of the tree
    listed, folder = set(), None
    for line in layout.splitlines():
        words = line.split()
        if not words or line.startswith("src/"):
            continue
        indent = len(line) - len(line.lstrip())
        if words[0].endswith("/") and indent == 2:
            folder = words[0].rstrip("/")
        elif indent == 2:
            folder = None
        owner = folder if indent == 4 or words[0].endswith("/") else None  # a folder's own line may list its files
        listed |= {(owner, w) for w in line.replace(",", " ").split() if w.endswith(".py")}
    have = {(None, p.name) for p in (SRC / "pace").glob("*.py") if p.name != "__init__.py"}
    have |= {("integrations", p.name) for p in (SRC / "pace" / "integrations").glob("*.py") if p.name != "__init__.py"}
    have |= {(m.rsplit(".", 1)[0] if "." in m else None, m.rsplit(".", 1)[-1] + ".py") for m in pipeline_modules()}
    assert listed == have, (sorted(have - listed, key=str), sorted(listed - have, key=str))


def test_every_module_has_its_test_file():
    """docs/architecture.md's test map names each module of both packages, and lists every test file there is."""
    page = (SRC.parent / "docs" / "architecture.md").read_text()
    section = page[page.index("## The tests: one file per module or named behaviour") :]
    start = section.index("```\n") + 4
    block = section[start : section.index("\n```", start)]
    entries = {line.split()[0]: line.split(None, 1)[1] for line in block.splitlines()}
    files = {p.name for p in (SRC.parent / "tests").glob("test_*.py")}
    assert set(entries) == files, (sorted(files - set(entries)), sorted(set(entries) - files))
    named = {w.rstrip(":") for text in entries.values() for w in text.split(":")[0].split()}
    modules = {"pace_lm." + m for m in pipeline_modules()}
    modules |= {
        ".".join(p.relative_to(SRC).with_suffix("").parts)
        for p in (SRC / "pace").rglob("*.py")
        if p.name != "__init__.py"
    }
    assert not modules - named, sorted(modules - named)
    assert not {w for w in named if w.startswith(("pace.", "pace_lm."))} - modules  # none that is gone


# ---- the README and docs/figures.md: each table as the command prints it from the committed records ------


@pytest.mark.parametrize(
    "fig_id, page",
    [
        ("demo", FIGURES_DOC),
        ("lawa_high_lr", FIGURES_DOC),
        ("smollm2_sft", README),
        ("schedules_cpu", README),
        ("smollm2_sft_low_lr", README),
        ("bf16_modes", README.parent / "docs" / "optimizer.md"),
    ],
)
def test_the_docs_show_the_figure_as_the_command_prints_it(tmp_path, fig_id, page):
    text, _ = plot_figure(load_figure(fig_id), str(FIXTURES), str(tmp_path))
    for block in blocks(text):  # each table whole, as printed (prose and plots may stand between them)
        assert block in page.read_text(), (
            f"{page.name}'s {fig_id} table differs from `pace-figure fig={fig_id} plot=true`"
        )
    png = f"figures/{fig_id}.png" if page.parent.name == "docs" else f"docs/figures/{fig_id}.png"  # from the page
    assert f"]({png})" in page.read_text() and (page.parent / png).exists()


def readme_section(title):
    text = README.read_text()
    start = text.index(f"## {title}\n")
    return text[start : text.index("\n## ", start + 1)]


@pytest.mark.parametrize(
    "fig_id, runs", [("schedules_cpu", 42), ("smollm2_sft_low_lr", 27), ("smollm2_sft", 27), ("gemma3_sft_cell", 6)]
)
def test_the_results_section_is_the_committed_records(tmp_path, fig_id, runs):
    """The README's Results lead with the figure where every method works: each real-model figure whole,
    every run of its grid, and its untrained model's loss, the reference the prose compares to."""
    results = readme_section("Results")
    text, _ = plot_figure(load_figure(fig_id), str(FIXTURES), str(tmp_path))
    assert all(block in results for block in blocks(text))
    assert f"{runs} of {runs} runs complete." in text  # every run of the grid
    pretrained = json.loads((FIXTURES / fig_id / "pretrained.json").read_text())["val_loss"]
    assert f"{pretrained:.4f}" in results


def test_the_results_lead_with_the_figures_where_fine_tuning_works(tmp_path):
    """schedules_cpu (200 steps, three schedules) first, then smollm2_sft_low_lr (50 steps, constant lr),
    whose cells it compares with; AdamW itself improved on the untrained model in every run of both."""
    results = readme_section("Results")
    assert results.index("`schedules_cpu`") < results.index("smollm2_sft_low_lr") < results.index("`smollm2_sft`")
    for fig_id in ("schedules_cpu", "smollm2_sft_low_lr"):
        pretrained = json.loads((FIXTURES / fig_id / "pretrained.json").read_text())["val_loss"]
        for path in (FIXTURES / fig_id).glob("ema_*/record.json"):
            assert read_record(path)["summary"]["vanilla_val_loss"] < pretrained, path


def test_the_from_scratch_figures_paired_rows_are_in_the_results(tmp_path):
    results = readme_section("Results")
    for fig_id in ("demo", "lawa_high_lr"):
        text, _ = plot_figure(load_figure(fig_id), str(FIXTURES), str(tmp_path))
        paired = [line for line in text.splitlines() if " − " in line]
        assert len(paired) == 2 and all(line in results for line in paired), fig_id


def test_the_readme_main_job_table_is_the_committed_seed_0_within_its_tolerance():
    """What the README says the main job prints: each returned model within 1e-4 (relative, as the README
    states) of the committed smollm2_sft records of seed 0 at lr 3e-4, printed to 4 decimals."""
    section = README.read_text().split("**The main job**")[1].split("**The tests**")[0]
    rows = {
        r.split(" | ")[0][2:]: r.split(" | ")[1].strip("*| ")
        for r in section.splitlines()
        if r.startswith("| ") and " − " not in r and "lr=" not in r
    }
    fig = load_figure("smollm2_quick")
    want = {}
    for run in fig.runs:
        summary = read_record(FIXTURES / "smollm2_sft" / run.name / "record.json")["summary"]
        for line, key in (
            fig.plot["split"].get(run.values["optimizer"]) or {run.values["optimizer"]: "final_val_loss"}
        ).items():
            want[line] = summary[key]
    want["untrained model"] = json.loads((FIXTURES / "smollm2_sft" / "pretrained.json").read_text())["val_loss"]
    assert rows.keys() == want.keys()
    for line, value in want.items():
        assert abs(float(rows[line]) - value) <= 1e-4 * value + 5e-5, (line, rows[line], value)
    assert float(rows["adamw"]) < float(rows["untrained model"]) and float(rows["pace"]) < float(rows["ema"])


def test_the_readme_shows_the_committed_quadratic_figure(tmp_path):
    from pathlib import Path

    from pace_lm.figures.quadratic import plot_quadratic, table
    from pace_lm.figures.specs import load_figure

    fixtures = Path(__file__).parent / "fixtures" / "results"
    record = json.loads((fixtures / "quadratic" / "record.json").read_text())
    spec = load_figure("quadratic").theory
    assert record["config"] == spec  # the committed record is the shipped spec's
    page = (Path(__file__).parents[1] / "docs" / "figures.md").read_text()
    assert table(spec, record) in page
    text, _ = plot_quadratic(spec, str(fixtures), str(tmp_path))
    assert text == table(spec, record)
    st = record["results"]["stationary"]["stationary"]
    assert st["pace_c3000"] < st["pace_c1000"] < st["pace_c100"] < st["ema"] < st["adamw"]
