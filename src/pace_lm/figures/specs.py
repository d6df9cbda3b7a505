"""Paper figures as sweeps of pace-train runs: the specs in conf/figures/, their runs and commands
(pace_lm.figures.sweep runs them).

A spec states only what differs from pace-train's defaults:

    description: one line for `pace-figure fig=list`
    hardware:    what one run needs, in words
    prepare:     [pace-data commands that make the data the runs read]
    plot:        {x: the swept key on the x axis, logx: bool, line: [keys], panel: key or null,
                  metric: a summary key (default final_val_loss), curves: bool (also each returned
                  model's validation loss against the step, and a table of its lowest over the
                  evaluations beside the final one)}
    common:      {override key: value} for every run
    runs:        [{override key: value or [values]}]: each entry is a grid, its lists swept (their product);
                 an entry's `with: {override key: value}` applies to its runs without naming them
    seeds:       [seeds] (optional): every run above once per seed, named `<run>_seed<S>`. The seed sets the
                 order of the training batches (and a model trained from scratch's initialization); the
                 data, their split and the validation batches are the same for every seed. Plots and
                 tables average over seeds (mean ± std) and pair runs of the same seed (plot.paired).

A spec is a shipped figure's id (conf/figures/<id>.yaml) or a file of the user's: `fig=PATH`, relative or
absolute, with or without `.yaml`; its id is the file's name, and its runs go under out_dir/<id> as a shipped
figure's do. The spec is checked whole when it is loaded: its keys, its seeds, plot's keys against its runs
(x, panel and line name keys a run sets or pace-train's config has; split and paired name its lines), and
each run's overrides as pace-train composes them (`build_config`), every error one line naming the file
and the run.

Keys are pace-train override keys: a config group (`optimizer: pace`) or a dotted value
(`optimizer.lr: 1e-3`). A list value is swept; a value that is itself a list is written nested
(`optimizer.betas: [[0.9, 0.95]]`). Each run is named after its entry's values, e.g. `pace_lr0.003_c0.15`,
and its record is `<out_dir>/<figure>/<run name>/record.json`.
"""

import fnmatch
import itertools
import os
import re
import shlex
from dataclasses import dataclass, field

from omegaconf import OmegaConf

from pace_lm import PaceLMError
from pace_lm.config.compose import CONF_DIR, GROUPS, SHORT, compose

FIG_DIR = os.path.join(CONF_DIR, "figures")
SPEC_KEYS = {"description", "hardware", "prepare", "plot", "common", "runs", "seeds", "theory"}
PLOT_KEYS = {"x", "logx", "line", "panel", "metric", "split", "paired", "curves"}


@dataclass
class Run:
    name: str
    values: dict  # this run's own keys (from its entry), in the entry's order
    overrides: list  # pace-train overrides: the figure's common ones, then the run's

    @property
    def keys(self):
        """The keys this run sets: its own and the figure's common ones."""
        return {o.split("=", 1)[0] for o in self.overrides}


@dataclass
class Figure:
    id: str
    description: str
    hardware: str
    prepare: list
    plot: dict
    runs: list = field(default_factory=list)
    theory: dict | None = None  # a figure of pace.theory, computed by pace_lm.figures.quadratic: no pace-train runs
    path: str = ""  # the spec's file


def list_figures():
    return sorted(f[:-5] for f in os.listdir(FIG_DIR) if f.endswith(".yaml"))


def spec_path(fig):
    """(id, path) of `fig`: a shipped figure's id, or the path of a spec file (with or without .yaml)."""
    if os.sep not in fig and "/" not in fig and not fig.endswith(".yaml"):
        path = os.path.join(FIG_DIR, f"{fig}.yaml")
        if not os.path.exists(path):
            raise PaceLMError(
                f"unknown figure {fig!r}; known: {', '.join(list_figures())} (or the path of a spec file of your own)"
            )
        return fig, path
    path = fig if fig.endswith(".yaml") else f"{fig}.yaml"
    if not os.path.isfile(path):
        raise PaceLMError(f"figure spec {path} does not exist (fig= takes a shipped figure's id or a spec file)")
    return os.path.basename(path)[: -len(".yaml")], os.path.abspath(path)


def load_figure(fig):
    """The figure `fig` (spec_path) with its runs expanded; an unknown id or a malformed spec is an error."""
    fig_id, path = spec_path(fig)
    try:
        spec = OmegaConf.to_container(OmegaConf.load(path))
    except Exception as e:  # a YAML error: yaml's and omegaconf's share no base class
        raise PaceLMError(f"figure spec {path}: not readable YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(spec, dict):
        raise PaceLMError(f"figure spec {path}: a mapping of {sorted(SPEC_KEYS)}, not {type(spec).__name__}")
    where = f"figure spec {path}"
    unknown = set(spec) - SPEC_KEYS
    if unknown:
        raise PaceLMError(f"{where}: unknown keys {sorted(unknown)}; known: {sorted(SPEC_KEYS)}")
    if not spec.get("description"):
        raise PaceLMError(f"{where}: no description (one line, for fig=list)")
    if "theory" in spec:
        missing = {"sde", "instances", "optimizer"} - set(spec["theory"] or {})
        if missing or set(spec) - {"description", "hardware", "theory"}:
            raise PaceLMError(
                f"{where}: a theory figure has description, hardware and theory "
                f"(sde, instances, optimizer){f'; theory lacks {sorted(missing)}' if missing else ''}"
            )
        return Figure(fig_id, spec["description"], spec.get("hardware", "not stated"), [], {}, [], spec["theory"], path)
    plot = {
        **dict(logx=False, line=None, panel=None, metric="final_val_loss", split={}, paired={}, curves=False),
        **(spec.get("plot") or {}),
    }
    if set(plot) - PLOT_KEYS or "x" not in plot:
        raise PaceLMError(f"{where}: plot needs x and takes only {sorted(PLOT_KEYS)}")
    entries, common = spec.get("runs") or [], spec.get("common") or {}
    if not isinstance(common, dict) or not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise PaceLMError(f"{where}: common must be a mapping of overrides and runs a list of them")
    common = [override(k, v) for k, v in common.items()]
    runs = []
    for entry in entries:
        fixed = [override(k, v) for k, v in (entry.pop("with", None) or {}).items()]
        for values in expand(entry):
            name = run_name(values)
            runs.append(Run(name, values, common + fixed + [override(k, v) for k, v in values.items()]))
    if not runs:
        raise PaceLMError(f"{where}: no runs")
    runs = with_seeds(runs, spec.get("seeds"), where)
    names = [r.name for r in runs]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise PaceLMError(f"{where}: runs with the same name {dupes}: two entries give the same values")
    fig = Figure(
        fig_id,
        spec["description"],
        spec.get("hardware", "not stated"),
        spec.get("prepare") or [],
        plot,
        runs,
        path=path,
    )
    check_plot(fig, where)
    return fig


def line_keys(plot, run):
    """The keys that name a run's line: plot.line's (else all the run's) that the run sets, but x, panel and seed."""
    return [k for k in (plot["line"] or run.values) if k in run.values and k not in (plot["x"], plot["panel"], "seed")]


def line_label(keys, value):
    """A line's label from `value(key)` of each of its keys: a group's choice by its name, another key as
    short=value (the plot reads the values from the records, the spec's check from the runs)."""
    return " ".join(str(value(k)) if k in GROUPS else f"{SHORT.get(k, k.rsplit('.', 1)[-1])}={value(k)}" for k in keys)


def check_plot(fig, where):
    """plot's keys against the runs: x, panel and line name keys a run sets or pace-train's config has (one
    composed run tells, only where a run does not set the key); split and paired name the runs' lines."""
    p = fig.plot
    keys = [("plot.x", p["x"])] + ([("plot.panel", p["panel"])] if p["panel"] else [])
    if p["line"] is not None and not isinstance(p["line"], list):
        raise PaceLMError(f"{where}: plot.line is a list of keys, not {p['line']!r}")
    keys += [("plot.line", k) for k in p["line"] or []]
    set_by_runs = {k for r in fig.runs for k in r.values.keys() | r.keys}
    unknown = [(name, k) for name, k in keys if k not in set_by_runs and k not in GROUPS and k != "seed"]
    if unknown:
        config = OmegaConf.to_container(_composed(fig, fig.runs[0], fig.runs[0].overrides))
        for name, key in unknown:
            node = config
            for part in str(key).split("."):
                node = node.get(part) if isinstance(node, dict) else None
            if node is None:
                raise PaceLMError(
                    f"{where}: {name}={key!r} is neither a key its runs set nor one of pace-train's "
                    f"config; its runs set {', '.join(sorted(set_by_runs - {'seed'}))}"
                )
    lines = {line_label(line_keys(p, r), r.values.get) for r in fig.runs}
    for line, parts in p["split"].items():
        if line not in lines or not isinstance(parts, dict):
            raise PaceLMError(
                f"{where}: plot.split's {line!r} is not a line of its runs ({sorted(lines)}), or "
                f"not a mapping of label: summary key"
            )
        lines = (lines - {line}) | set(parts)
    for line, others in p["paired"].items():
        bad = [n for n in [line, *(others if isinstance(others, list) else [others])] if n not in lines]
        if bad or not isinstance(others, list):
            raise PaceLMError(f"{where}: plot.paired names {bad or others!r}, not lines of its runs: {sorted(lines)}")


def with_seeds(runs, seeds, where):
    """Each run once per seed (`seed` a value of the run, so its name ends in `_seed<S>`); None: as they are."""
    if seeds is None:
        return runs
    if (
        not isinstance(seeds, list)
        or not seeds
        or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds)
        or len(set(seeds)) < len(seeds)
    ):
        raise PaceLMError(f"{where}: seeds must be a list of distinct integers, not {seeds!r}")
    if any("seed" in r.values for r in runs):
        raise PaceLMError(f"{where}: a run sets seed itself; with seeds: every run is run once per seed")
    return [
        Run(run_name({**r.values, "seed": s}), {**r.values, "seed": s}, [*r.overrides, override("seed", s)])
        for s in seeds
        for r in runs
    ]  # a seed's runs together: a sweep cut short has whole seeds


def expand(entry):
    """The runs of one grid entry: the product of its list values, in the entry's key order."""
    keys = list(entry)
    axes = [v if isinstance(v, list) else [v] for v in entry.values()]
    return [dict(zip(keys, combo)) for combo in itertools.product(*axes)]


def override(key, value):
    """`key=value` as Hydra parses it (a nested list is a list value)."""
    return f"{key}={_hydra_value(value)}"


def _hydra_value(v):
    if isinstance(v, bool):
        return str(v).lower()
    if v is None:
        return "null"
    if isinstance(v, list):
        return "[" + ",".join(_hydra_value(x) for x in v) + "]"
    if isinstance(v, str) and "${" not in v and re.search(r"""[\s,\[\](){}='"\\]""", v):
        return "'" + v.replace("\\", "\\\\").replace("'", "\\'") + "'"  # Hydra's quoted string
    return str(v)


def run_name(values):
    """A folder name from a run's values: groups by their choice, other keys by a short name."""
    parts = []
    for key, v in values.items():
        text = re.sub(r"[^\w.+-]+", "-", _hydra_value(v)).strip("-")
        parts.append(text if key in GROUPS else f"{SHORT.get(key, key.rsplit('.', 1)[-1])}{text}")
    return "_".join(parts)


def run_overrides(fig, run, out_dir, data=None, extra=()):
    """Every override of one run, ending with where its record goes; a run with checkpoints goes on."""
    data_override = [override("dataset.path", data)] if data else []
    return [
        *run.overrides,
        *data_override,
        "training.resume=auto",
        *extra,
        f"training.out_dir={os.path.join(out_dir, fig.id)}",
        f"run_name={run.name}",
    ]


def command(overrides):
    return " ".join(["pace-train", *(shlex.quote(o) for o in overrides)])


def select(fig, only=None):
    """The figure's runs whose name matches the glob `only` (all of them for None)."""
    chosen = [r for r in fig.runs if only is None or fnmatch.fnmatchcase(r.name, only)]
    if not chosen:
        raise PaceLMError(f"only={only!r} matches none of the runs of {fig.id}: {', '.join(r.name for r in fig.runs)}")
    return chosen


def check_extra(fig, extra):
    """Overrides given to pace-figure may not touch a key the figure sweeps: every run would get the same
    value, while the run names still show the spec's."""
    swept = {k for r in fig.runs for k in r.values}
    for item in extra:
        key = item.split("=", 1)[0].lstrip("+~")
        if key in swept:
            raise PaceLMError(
                f"{item!r}: {fig.id} sweeps {key} (its runs set it one by one); run another "
                f"figure, or pick runs with only="
            )


def check_data(fig, data):
    """`data=` is every run's dataset.path: refused where the spec sets the path itself (one per model)."""
    paths = sorted({o.split("=", 1)[1] for r in fig.runs for o in r.overrides if o.startswith("dataset.path=")})
    if data and paths:
        raise PaceLMError(
            f"{fig.id} reads its data from {', '.join(paths)} (prepare it there: pace-figure "
            f"fig={fig.id} lists how); data= would give every run the same data"
        )


def build_config(fig, run, out_dir, data=None, extra=()):
    """The run's validated config (a schema.Config), checked as pace-train checks it before doing any work; an
    error is one line naming the spec's file and the run."""
    from pace_lm.config.schema import validate

    return _composed(fig, run, run_overrides(fig, run, out_dir, data, extra), validate)


def _composed(fig, run, overrides, then=None):
    """compose(overrides) (and then(config, resolve=True)), an error one line naming the spec's file and the run."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        config = compose(overrides)
        return then(config, resolve=True) if then else config
    except (PaceLMError, HydraException, OmegaConfBaseException) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise PaceLMError(f"{fig.path or fig.id}, run {run.name}: {first}") from None


def check_jobs(opts, extra):
    """jobs= a positive int, devices= only with jobs and without training.device (before any work)."""
    jobs = opts["jobs"]
    if jobs is not None and not (jobs.isdigit() and int(jobs) >= 1):
        raise PaceLMError(f"jobs={jobs!r} must be a positive integer")
    if opts["devices"] and jobs is None:
        raise PaceLMError("devices= goes with jobs=N (the runs of one process use training.device)")
    if (jobs is not None or opts["devices"]) and not opts["run"]:
        raise PaceLMError("jobs= and devices= go with run=true")
    if opts["devices"] and any(e.split("=", 1)[0].lstrip("+~") == "training.device" for e in extra):
        raise PaceLMError("devices= sets each run's training.device: give one or the other")
