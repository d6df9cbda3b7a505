"""Entry points: `pace-train` (Hydra), `pace-data` (argparse) and `pace-figure` (key=value, as Hydra's).
Each parses its arguments (usage, unknown or malformed ones refused in one line), dispatches to the
pipeline, and turns what comes back into what a user sees: the one-line errors and warnings, a multirun's
failed runs, pace-data's summary, pace-figure's commands, status and plots, and the exit code."""

import argparse
import json
import os
import re
import sys
import warnings

import hydra
from hydra.errors import HydraException
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from pace_lm import PaceLMError
from pace_lm.config.compose import CONF_DIR  # importing it registers the ${pkgdir:...} resolver


def one_line_warnings(prog):
    """Warnings raised in this package printed as one line, `prog: warning: ...`, not Python's report with
    the source line; those of other libraries as Python prints them."""
    ours = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # src/: pace and pace_lm
    default = warnings.formatwarning

    def one_line(message, category, filename, lineno, line=None):
        if os.path.abspath(filename).startswith(ours + os.sep):
            return f"{prog}: warning: {message}\n"
        return default(message, category, filename, lineno, line)

    warnings.formatwarning = one_line


TRAIN_USAGE = """usage: pace-train [group=choice ...] [key=value ...] [--cfg job] [-m a=x,y ...]

Train one run; its record goes to <training.out_dir>/<run_name>/record.json (see the README).

  group=choice        a shipped config of a group:
{groups}
  key=value           any key of the config, e.g. training.max_steps=500 optimizer.lr=3e-4
  --cfg job           print the composed config (every key, with its value) and run nothing
  -m a=x,y b=u,v      a multirun: one run per combination, one after another; a failed run does not stop
                      the others, and the failures are listed at the end (exit 2)
  --hydra-help        Hydra's own flags"""


def train_usage():
    """pace-train --help: the groups a run can choose (pace_lm/conf/<group>/), each with its choices."""
    from pace_lm.config.compose import GROUPS

    lines = [
        f"                      {g}: "
        + ", ".join(sorted(f[:-5] for f in os.listdir(os.path.join(CONF_DIR, g)) if f.endswith(".yaml")))
        for g in GROUPS
    ]
    return TRAIN_USAGE.format(groups="\n".join(lines))


_FAILED = []  # a multirun's failed runs: (run_name, error), in order


@hydra.main(version_base=None, config_path=CONF_DIR, config_name="train")
def _train_app(cfg: DictConfig):
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from pace_lm.run.train import Interrupted, train

    multirun = HydraConfig.get().mode == RunMode.MULTIRUN
    try:
        record = train(cfg)
    except Interrupted as e:  # checkpointed: exit as a process the signal ended would (128 + its number)
        print(f"pace-train: {e}", file=sys.stderr)
        sys.exit(128 + e.signum)
    except (PaceLMError, OmegaConfBaseException) as e:
        print(f"pace-train: error: {e}", file=sys.stderr)
        if not multirun:
            sys.exit(2)
        return _FAILED.append((cfg.run_name, str(e)))
    except Exception as e:  # a crash in one run of a multirun: its record says failed; the others go on
        if not multirun:
            raise
        print(f"pace-train: error: {cfg.run_name}: {type(e).__name__}: {e}", file=sys.stderr)
        return _FAILED.append((cfg.run_name, f"{type(e).__name__}: {e}"))
    if os.environ.get("RANK", "0") != "0":  # under torchrun, rank 0 speaks for the run
        return
    s = record["summary"]
    print(
        f"pace-train: {cfg.run_name}: final_val_loss {s['final_val_loss']:.4f} ({s['returned']} returned), "
        f"final iterate {s['vanilla_val_loss']:.4f}; record {cfg.training.out_dir}/{cfg.run_name}/record.json"
    )


def train_main():
    """pace-train [overrides]: train one run, or a multirun (see `pace-train --help` and the README). The
    arguments are checked first, every run of a multirun composed, so that a mistake is one line naming the
    key (and the choices), exit 2, before anything runs or is written."""
    from hydra._internal.utils import get_args_parser  # Hydra's own command line

    one_line_warnings("pace-train")
    argv = sys.argv[1:]
    args = get_args_parser().parse_intermixed_args(argv)  # flags anywhere, e.g. `lr=1,2 -m seed=0,1`
    flags = list(argv)
    for override in args.overrides:
        flags.remove(override)
    sys.argv[1:] = flags + args.overrides  # as Hydra parses it: the flags, then the overrides
    if args.help:
        print(train_usage())
        return
    try:
        _check_train_args(args)
    except PaceLMError as e:
        print(f"pace-train: error: {e}", file=sys.stderr)
        sys.exit(2)
    except (HydraException, OmegaConfBaseException) as e:
        print(f"pace-train: error: {override_error(e)}", file=sys.stderr)
        sys.exit(2)
    _train_app()
    if _FAILED:
        print(
            f"pace-train: {len(_FAILED)} run(s) of the multirun failed: "
            + "; ".join(f"{name} ({why})" for name, why in _FAILED),
            file=sys.stderr,
        )
        sys.exit(2)


def _check_train_args(args):
    """Refuse what Hydra would refuse (an unknown --config-name, a bad override in any run of a multirun)
    before Hydra runs or writes anything. Hydra's own keys and a user's --config-dir are left to Hydra."""
    from pace_lm.config.compose import compose

    modes = [
        flag
        for flag, on in (
            ("--run", args.run),
            ("--multirun", args.multirun),
            ("--cfg", args.cfg),
            ("--info", args.info),
            ("--shell-completion", args.shell_completion),
        )
        if on
    ]
    if len(modes) > 1:
        raise PaceLMError(f"{' and '.join(modes)}: give one of them (--cfg job prints a single run's config)")
    if args.hydra_help or args.info or args.shell_completion or args.config_dir or args.config_path:
        return
    name = args.config_name or "train"
    if not os.path.isfile(os.path.join(CONF_DIR, f"{name}.yaml")):
        shipped = sorted(f[:-5] for f in os.listdir(CONF_DIR) if f.endswith(".yaml"))
        raise PaceLMError(
            f"--config-name {name}: no such config; pace-train's: {', '.join(shipped)} "
            f"(a config of your own: --config-dir DIR --config-name NAME)"
        )
    if any(a.lstrip("+~").startswith("hydra.") for a in args.overrides):
        return
    for job in _jobs(args.overrides, args.multirun):
        compose(job, config_name=name)


def _jobs(overrides, multirun):
    """The override lists of each run: one, or a multirun's combinations (as Hydra's basic sweeper makes them)."""
    if not multirun:
        return [overrides]
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides=overrides)
    return [job for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]


def override_error(e):
    """Hydra's report of a bad override as one line: the key, and the choices of a config group."""
    from pace_lm.config.compose import GROUPS

    text = str(e).strip()
    first = text.splitlines()[0] if text else type(e).__name__
    match = re.match(r"Could not override '([^']+)'", first)
    if match:
        key = match.group(1)
        hint = (
            "; an argument of a scratch model's architecture is +model.config.KEY=VALUE"
            if key.startswith("model.")
            else ""
        )
        return f"{key} is not a key of pace-train's config (pace-train --cfg job lists every key){hint}"
    match = re.search(r"Could not find '([\w]+)/([^']+)'", text)
    if match and match.group(1) in GROUPS:
        group, choice = match.groups()
        options = getattr(e, "options", None) or sorted(
            f[:-5] for f in os.listdir(os.path.join(CONF_DIR, group)) if f.endswith(".yaml")
        )
        return f"{group}={choice}: no such {group}; choose one of {', '.join(options)}"
    return first


def data_main(argv=None):
    """pace-data: tokenize a dataset once into a folder pace-train reads (dataset.path)."""
    from pace_lm.data.formats import parse_columns
    from pace_lm.data.prepare import PRESETS, Request, prepare

    one_line_warnings("pace-data")
    p = _data_parser()
    args = p.parse_args(argv)

    source = args.source or ("offline" if args.tokenizer is None else "smoltalk" if args.mode == "sft" else "fineweb")
    if source in PRESETS and PRESETS[source]["mode"] != args.mode:
        p.error(f"--source {source} is {PRESETS[source]['mode']} data; pass --mode {PRESETS[source]['mode']}")
    out = args.out or (
        f"data/{source}" + ("_pretrain" if source == "offline" and args.mode == "pretrain" else "")
        if source == "offline" or source in PRESETS
        else None
    )
    if out is None:
        p.error("--out is required for this --source")
    try:
        request = Request(
            source=source,
            mode=args.mode,
            tokenizer=args.tokenizer,
            gguf_file=args.gguf_file,
            revision=args.revision,
            name=args.name,
            split=args.split,
            max_seq_len=args.max_seq_len,
            val_size=args.val_size,
            seed=args.seed,
            max_tokens=args.max_tokens,
            text_field=args.text_field,
            format=args.format,
            train_tool_turns=args.train_tool_turns,
            train_split=args.train_split,
            validation_split=args.validation_split,
            columns=parse_columns(args.columns) if args.columns else None,
        )
        meta = prepare(out, request, num_proc=args.num_proc, overwrite=args.overwrite)
    except PaceLMError as e:
        print(f"pace-data: error: {e}", file=sys.stderr)
        sys.exit(2)
    _data_summary(out, meta)


def _data_parser():
    """pace-data's arguments."""
    from pace_lm.data.formats import FORMATS
    from pace_lm.data.prepare import DEFAULT_SEQ_LEN, PRESETS

    p = argparse.ArgumentParser(
        prog="pace-data",
        description="Prepare a tokenized dataset for pace-train. With no --source and no --tokenizer: "
        "the offline corpus (the Python standard library's docs) and a tokenizer trained on it. "
        "With --tokenizer and no --source: smoltalk (sft) or FineWeb (pretrain) from the hub.",
    )
    p.add_argument(
        "--source",
        help=f"'offline', {', '.join(repr(k) for k in PRESETS)}, a hub dataset id, "
        "or local .json/.jsonl/.parquet/.csv file(s), any of them .gz (a file, or a "
        "folder and its subfolders: files named after splits, as the hub's "
        "data/train-00000-of-00001.parquet, are kept as the splits)",
    )
    p.add_argument(
        "--format",
        choices=FORMATS,
        help="sft: the rows' conversation format (default: told by each row's fields; see docs/pipeline.md)",
    )
    p.add_argument(
        "--train-tool-turns", action="store_true", help="sft: train tool turns too (default: masked, as user turns are)"
    )
    p.add_argument("--out", help="output folder (default: data/<source>)")
    p.add_argument(
        "--mode",
        choices=["sft", "pretrain"],
        default="sft",
        help="sft: ChatML conversations, only assistant replies trained; pretrain: text + EOS "
        "packed into blocks (default: sft)",
    )
    p.add_argument(
        "--tokenizer",
        help="hub id or local folder of the model's tokenizer (default with "
        "--source offline: a BPE tokenizer trained offline)",
    )
    p.add_argument("--gguf-file", help="load the tokenizer from this GGUF file in the --tokenizer folder")
    p.add_argument("--revision", help="dataset revision (commit, tag or branch) to pin on the hub")
    p.add_argument("--name", help="dataset config name on the hub (e.g. 'all' for smoltalk)")
    _add_split_args(p, DEFAULT_SEQ_LEN)
    return p


def _add_split_args(p, default_seq_len):
    """pace-data's arguments for what is read of the source and how it is split and cut."""
    p.add_argument("--split", default="train", help="split to read (default: train)")
    p.add_argument(
        "--columns",
        help="sft: a table's columns as one exchange, ROLE=COLUMN for prompt and response "
        "(and optionally context, system), e.g. prompt=question,response=answer",
    )
    p.add_argument(
        "--train-split", help="a local folder's split to train on, e.g. train_sft (default: its one train split)"
    )
    p.add_argument(
        "--validation-split",
        help="a local folder's split to validate on, e.g. test_sft (default: its "
        "one validation split, else its one test split)",
    )
    p.add_argument(
        "--max-seq-len",
        type=int,
        help="truncate (sft) or block length (pretrain); default: "
        + ", ".join(f"{k} {v}" for k, v in default_seq_len.items()),
    )
    p.add_argument(
        "--val-size",
        type=int,
        help="validation examples (documents in pretrain mode) held out; default: min(1000, 10%%)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the train/validation split (default: 0)")
    p.add_argument("--num-proc", type=int, help="processes for tokenization")
    p.add_argument(
        "--max-tokens", type=int, help="pretrain: stream the source and stop after this many training tokens"
    )
    p.add_argument("--text-field", default="text", help="text column for pretraining (default: text)")
    p.add_argument("--overwrite", action="store_true", help="replace prepared data already in --out")


def _data_summary(out, meta):
    """What pace-data made: its warnings (stderr), then one line of counts, formats and splits."""
    for warning in meta["warnings"]:
        print(f"pace-data: warning: {warning}", file=sys.stderr)
    read = ", ".join(f"{n} {fmt}" for fmt, n in meta["formats"].items())
    print(
        f"pace-data: wrote {out}: {json.dumps(meta['counts'])}; trained token fraction "
        f"{meta['trained_token_fraction']:.3f}"
        + (f"; rows read as {read}" if read else "")
        + f"; validation: {meta['splits']}"
    )


FIGURE_ARGS = dict(
    fig=None,
    run=False,
    plot=False,
    data=None,
    out_dir="runs/figures",
    plot_dir=None,
    only=None,
    steps=None,
    jobs=None,
    devices=None,
    status=False,
)
FIGURE_USAGE = """usage: pace-figure fig=ID|list [run=true [jobs=N [devices=D,...]]] [plot=true] [status=true]
                   [data=PATH] [out_dir=runs/figures] [plot_dir=PATH] [only=GLOB] [steps=KEY,...]
                   [pace-train overrides ...]

  fig=list            the figures: id, number of runs, what each shows, the hardware a run needs
  fig=ID              print the figure's pace-train commands, one per line (nothing runs)
  run=true            train them one after another; runs already complete are kept (a sweep resumes)
  jobs=N              with run=true: N runs at a time, each a pace-train process (its output in its run
                      folder's train.log); the data are prepared first; SIGTERM / SIGINT stops them all
                      with checkpoints, and the same command resumes them
  devices=D,...       with jobs: the runs go round-robin over these devices (training.device), e.g.
                      devices=cuda:0,cuda:1; by default every run uses its own training.device
  plot=true           read the records; write ID.png, ID.svg and ID.md (a table) and print the table
  status=true         a line per run from its record and lock (not started, running, complete, interrupted,
                      failed, diverged, died), then the totals; safe while the sweep runs
  data=PATH           prepared data for every run (dataset.path), for figures that do not set it
  out_dir=DIR         records go to DIR/ID/<run>/record.json (default: runs/figures)
  plot_dir=DIR        where the plot files go (default: the figure's folder under out_dir)
  only=GLOB           just the runs whose name matches, e.g. only='pace_*'
  steps=KEY,...       with plot=true, also ID_steps.png/.svg: step-log keys against the step, a line per
                      run (mean over seeds), e.g. steps=lambda_mean,frac_clipped (optimizer.log_stats=true)
  other key=value     a pace-train override added to every run, e.g. training.device=cuda"""


def _parse_figure_args(argv):
    opts, extra = dict(FIGURE_ARGS), []
    for arg in argv:
        key, eq, value = arg.partition("=")
        if not eq:
            raise PaceLMError(f"{arg!r} is not key=value\n{FIGURE_USAGE}")
        if key in ("run", "plot", "status"):
            if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise PaceLMError(f"{key}={value!r} must be true or false")
            opts[key] = value.lower() in ("true", "1", "yes")
        elif key in opts:
            opts[key] = value or None
        elif key in ("run_name", "training.out_dir"):
            raise PaceLMError(f"{key} is set by pace-figure for each run (use out_dir=)")
        else:
            extra.append(arg)
    if not opts["fig"]:
        raise PaceLMError(f"fig= is required\n{FIGURE_USAGE}")
    return opts, extra


def figure_main(argv=None):
    """pace-figure: a paper figure as a sweep of pace-train runs: its commands, running them, its plot."""
    argv = sys.argv[1:] if argv is None else argv
    one_line_warnings("pace-figure")
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(FIGURE_USAGE)
        return
    try:
        _figure(*_parse_figure_args(argv))
    except PaceLMError as e:
        print(f"pace-figure: error: {e}", file=sys.stderr)
        sys.exit(128 + e.signum if hasattr(e, "signum") else 2)  # train.Interrupted: as the signal would
    except (HydraException, OmegaConfBaseException) as e:
        print(f"pace-figure: error: {e}", file=sys.stderr)
        sys.exit(2)


def _figure(opts, extra):
    from pace_lm.figures.specs import check_extra, check_jobs, list_figures, load_figure

    if opts["fig"] == "list":
        figs = [load_figure(f) for f in list_figures()]
        width = max(len(f.id) for f in figs)
        for f in figs:
            runs = "theory" if f.theory is not None else f"{len(f.runs):>3} runs"
            print(f"{f.id:<{width}}  {runs:>8}  {f.description}  [{f.hardware}]")
        return
    fig = load_figure(opts["fig"])
    if fig.theory is not None:
        return _theory_figure(fig, opts)
    check_extra(fig, extra)
    check_jobs(opts, extra)
    if opts["status"]:
        return _status(fig, opts, extra)
    if not (opts["run"] or opts["plot"]):
        return _print_commands(fig, opts, extra)
    if opts["run"]:
        _run_figure(fig, opts, extra)
    if opts["plot"]:
        from pace_lm.figures.plots import plot_figure

        text, paths = plot_figure(fig, opts["out_dir"], opts["plot_dir"])
        if opts["steps"]:
            from pace_lm.figures.plots import plot_steps

            stem = os.path.join(opts["plot_dir"] or os.path.join(opts["out_dir"], fig.id), f"{fig.id}_steps")
            paths += plot_steps(fig, opts["out_dir"], opts["steps"].split(","), stem)
        print(text)
        print(f"pace-figure: wrote {', '.join(paths)}")


def _print_commands(fig, opts, extra):
    """pace-figure fig=ID: the figure's pace-train commands, each composed first; nothing runs."""
    from pace_lm.figures.specs import build_config, check_data, command, run_overrides, select

    check_data(fig, opts["data"])
    print(f"# {fig.id}: {fig.description}\n# hardware: {fig.hardware}")
    for cmd in fig.prepare:
        print(f"# data, once: {cmd}")
    for run in select(fig, opts["only"]):
        build_config(fig, run, opts["out_dir"], opts["data"], extra)  # every printed command composes
        print(command(run_overrides(fig, run, opts["out_dir"], opts["data"], extra)))


def _run_figure(fig, opts, extra):
    """pace-figure run=true: the sweep, its counts in one line; a failed run fails the command."""
    from pace_lm.figures.sweep import keep_pretrained_loss, run_sweep

    keep_pretrained_loss(fig, opts, extra, log=lambda m: print(f"pace-figure: {m}", flush=True))
    status = run_sweep(fig, opts, extra, log=lambda m: print(m, flush=True))
    counts = {s: list(status.values()).count(s) for s in dict.fromkeys(status.values())}
    print(
        f"pace-figure: {fig.id}: "
        + ", ".join(f"{n} {s}" for s, n in counts.items())
        + f"; records under {opts['out_dir']}/{fig.id}"
    )
    failed = [name for name, s in status.items() if s == "failed"]
    if failed:  # the sweep goes on past a failed run; as a whole it did not succeed
        raise PaceLMError(
            f"{len(failed)} run(s) failed ({', '.join(failed)}): their records (and train.log) "
            f"say why; run the same command to resume them"
        )


def _status(fig, opts, extra):
    """status=true: a line per run of the figure (only=GLOB: some), then the totals."""
    from pace_lm.figures.specs import select
    from pace_lm.run.state import STATES, run_state

    if opts["run"] or opts["plot"] or extra:
        raise PaceLMError("status=true only reads the records: give it with fig=, out_dir= and only= alone")
    counts = dict.fromkeys(STATES, 0)
    for run in select(fig, opts["only"]):
        state, detail = run_state(os.path.join(opts["out_dir"], fig.id, run.name))
        counts[state] += 1
        print(f"{fig.id}/{run.name}: {state}" + (f": {detail}" if detail else ""))
    print(
        f"pace-figure: {fig.id}: "
        + ", ".join(f"{n} {s}" for s, n in counts.items() if n)
        + f" ({sum(counts.values())} runs under {opts['out_dir']}/{fig.id})"
    )


def _theory_figure(fig, opts):
    """fig=quadratic: no pace-train runs; its numbers are computed in-process (seconds) into one record."""
    from pace_lm.figures.quadratic import plot_quadratic, run_quadratic

    if not (opts["run"] or opts["plot"]):
        print(f"# {fig.id}: {fig.description}\n# hardware: {fig.hardware}\npace-figure fig={fig.id} run=true plot=true")
        return
    if opts["run"]:
        run_quadratic(fig.theory, opts["out_dir"], log=lambda m: print(m, flush=True))
    if opts["plot"]:
        text, paths = plot_quadratic(fig.theory, opts["out_dir"], opts["plot_dir"])
        print(text)
        print(f"pace-figure: wrote {', '.join(paths)}")
