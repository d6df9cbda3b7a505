"""A figure from its run records: the metric against the swept key, one line per method, and the same
numbers as a markdown table. Reads records only; never trains (and never imports the training code).

Every value shown comes from a record: x, line and panel from the run's resolved config, the metric
from its summary. Runs that differ only in `seed` are averaged (the table gives mean ± std and n).
`plot.split: {line: {label: summary key}}` draws several lines from each run of one line: one AdamW run
that keeps its EMA, LAWA and SWA gives four returned models, all from the same iterates.
`plot.paired: {line: [other lines]}` adds a table of per-seed differences (line − other, paired on the
seed), with the number of seeds whose difference is negative.
`plot.curves: true` adds, from the same records' eval logs, each returned model's validation loss against
the step (`<id>_curves.png`, a panel per x, mean over seeds) and a table of the lowest value over the
evaluations beside the final one: the same evaluations for every method, no stopping step chosen for one.

A figure that fine-tunes a pretrained model keeps its untrained model's loss beside its records
(records.PRETRAINED_LOSS): every table has it as a row and every plot as a line, and a cell whose mean
ended above it is marked (FAILED_MARK in a table, a red ring on a plot): fine-tuning failed there.
"""

import math
import os
import re
import statistics

from pace_lm import PaceLMError
from pace_lm.config.compose import GROUPS, SHORT
from pace_lm.figures.specs import line_keys, line_label
from pace_lm.files import marks
from pace_lm.run.records import RECORD, read_pretrained_loss, read_record

MISSING = "–"
UNTRAINED = "untrained model"
FAILED_MARK = "†"
FAILED = "above the untrained model: fine-tuning failed here"
LOWER = "lower is better"
DASHES = ["-", "--", ":", "-."]  # a line's dashes and marker by the rest of its label (_styles)
MARKERS = ["o", "s", "^", "D"]
LEGEND_INSIDE = 8  # legend entries that fit inside the axes


def collect(fig, out_dir):
    """One row per run of the figure: its record's status and value, and where it goes on the plot."""
    p = fig.plot
    rows = []
    for run in fig.runs:
        path = os.path.join(out_dir, fig.id, run.name, RECORD)
        try:
            record = read_record(path)
        except FileNotFoundError:
            record = dict(status="missing", config=None)
        except ValueError as e:
            raise PaceLMError(f"{path} is not a readable record: {e}") from e
        config = record.get("config")
        row = dict(
            run=run.name,
            status=record["status"],
            # a run that sets no x (e.g. AdamW in a sweep of c) is a reference line across the xs; x set in
            # the figure's common keys is every run's x
            reference=p["x"] not in run.keys,
            seed=_get(config, "seed") if config else run.values.get("seed"),
            x=_get(config, p["x"]) if config else run.values.get(p["x"]),
            panel=_get(config, p["panel"]) if config and p["panel"] else run.values.get(p["panel"]),
            line=line_label(
                line_keys(p, run), lambda k, config=config, run=run: _get(config, k) if config else run.values[k]
            ),
        )
        for label, key in (p["split"].get(row["line"]) or {row["line"]: p["metric"]}).items():
            curve = _curve(record, key)
            rows.append(
                dict(
                    row,
                    line=label,
                    value=_value(record, key, path, fig),
                    curve=curve,
                    lowest=min((v for _, v in curve), default=None) if record["status"] == "complete" else None,
                )
            )
    return rows


def eval_key(summary_key):
    """The eval-log key of a summary key: the returned model's final_val_loss is logged as val_loss."""
    return "val_loss" if summary_key == "final_val_loss" else summary_key


def _curve(record, key):
    """[(step, value)] of summary key `key` over the record's evaluations."""
    logged = eval_key(key)
    return [(e["step"], e[logged]) for e in record.get("eval_logs") or [] if e.get(logged) is not None]


def _value(record, key, path, fig):
    if record["status"] != "complete":
        return None
    value = (record.get("summary") or {}).get(key)
    if value is None:
        raise PaceLMError(f"{path} has no summary.{key} (plot of {fig.id})")
    return value


def _get(config, key):
    """A value of a resolved config by override key; a group stands for its choice (`optimizer.name`)."""
    if key in GROUPS:
        key = f"{key}.name"
    node = config
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _cells(rows):
    """{(panel, line): {x: [rows]}} in the order the spec lists them."""
    cells = {}
    for r in rows:
        cells.setdefault((r["panel"], r["line"]), {}).setdefault(r["x"], []).append(r)
    return cells


def _summary(rows, field="value"):
    """(mean, std or None, n complete, n diverged) of one cell's `field` (value: the final; lowest)."""
    values = [r[field] for r in rows if r[field] is not None]
    diverged = sum(r["status"] == "diverged" for r in rows)
    if not values:
        return None, None, 0, diverged
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None, len(values), diverged


def _xs(rows, fig):
    xs = list(dict.fromkeys(r["x"] for r in rows if not r["reference"]))
    return sorted(xs) if all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in xs) else xs


def table(fig, rows, field="value", untrained=None):
    """The figure as markdown: per panel, one row per line, one column per x; the best of a column in bold;
    the untrained model's loss (`untrained`, if any) as a row, and a cell above it marked FAILED_MARK.
    field="lowest": the lowest over the evaluations instead of the final value (no paired table, no count)."""
    metric = fig.plot["metric"] if field == "value" else f"lowest {eval_key(fig.plot['metric'])} over the evaluations"
    out, failed = [], False
    for panel in dict.fromkeys(r["panel"] for r in rows):
        prow = [r for r in rows if r["panel"] == panel]
        xs = _xs(prow, fig)
        if panel is not None:
            out.append(f"**{fig.plot['panel']} = {panel}**\n")
        out.append(f"| {metric} ({LOWER}) | " + " | ".join(f"{_short(fig.plot['x'])}={x}" for x in xs) + " |")
        out.append("|---|" + "---|" * len(xs))
        cells = {line: c for (p, line), c in _cells(prow).items() if p == panel}
        best = {
            x: min(
                (_summary(c[x], field)[0] for c in cells.values() if x in c and _summary(c[x], field)[0] is not None),
                default=None,
            )
            for x in xs
        }
        for line, c in cells.items():
            if all(r["reference"] for rs in c.values() for r in rs):  # no x of its own: the same in every column
                ref = next(iter(c.values()))
                texts = [_fmt(ref, None, field, untrained)] * len(xs)
            else:
                texts = [_fmt(c.get(x, []), best[x], field, untrained) for x in xs]
            failed = failed or any(FAILED_MARK in t for t in texts)
            out.append(f"| {line} | " + " | ".join(texts) + " |")
        if untrained is not None:
            out.append(f"| {UNTRAINED} | " + " | ".join([f"{untrained:.4f}"] * len(xs)) + " |")
        out.append("")
    if failed:
        out.append(f"{FAILED_MARK} {FAILED} (the {UNTRAINED} scores {untrained:.4f}; {LOWER}).\n")
    if field != "value":
        return "\n".join(out)
    if fig.plot["paired"]:
        out.extend(paired_table(fig, rows))
    status = list({r["run"]: r["status"] for r in rows}.values())  # a split run has several rows
    out.append(
        f"{status.count('complete')} of {len(status)} runs complete"
        + "".join(f", {status.count(s)} {s}" for s in ("diverged", "running", "failed", "missing") if s in status)
        + "."
    )
    return "\n".join(out)


def paired(rows, line, other):
    """{(panel, x): [(seed, line's value − other's value)]} over the seeds where both runs are complete."""
    by_key = {(r["panel"], r["x"], r["line"], r["seed"]): r["value"] for r in rows if r["value"] is not None}
    out = {}
    for (panel, x, name, seed), value in by_key.items():
        theirs = by_key.get((panel, x, other, seed))
        if name == line and theirs is not None:
            out.setdefault((panel, x), []).append((seed, value - theirs))
    return out


def best_x(rows, line, panel):
    """The x where `line`'s mean (over its complete seeds) is lowest in `panel`; None if it has none."""
    means = {}
    for r in rows:
        if r["line"] == line and r["panel"] == panel and r["value"] is not None:
            means.setdefault(r["x"], []).append(r["value"])
    return min(means, key=lambda x: statistics.fmean(means[x])) if means else None


def paired_at_best(rows, line, other, panel):
    """(line's best x, other's best x, [(seed, line's value there − other's value there)]): each line at its
    own best x (its own tuned lr), over the seeds where both runs are complete."""
    xa, xb = best_x(rows, line, panel), best_x(rows, other, panel)
    values = {
        (r["line"], r["x"], r["seed"]): r["value"] for r in rows if r["panel"] == panel and r["value"] is not None
    }
    seeds = sorted({seed for (name, x, seed) in values if (name, x) == (line, xa)}, key=str)
    diffs = [(s, values[line, xa, s] - values[other, xb, s]) for s in seeds if (other, xb, s) in values]
    return xa, xb, diffs


def paired_table(fig, rows):
    """Markdown rows: per pair and x, the mean ± std of the per-seed differences and how many are < 0; where
    there are several xs, a last column with each line at its own best x (the lowest mean)."""
    lines = set(r["line"] for r in rows)
    pairs = [(a, b) for a, others in fig.plot["paired"].items() for b in others]
    unknown = sorted({n for pair in pairs for n in pair} - lines)
    if unknown:
        raise PaceLMError(f"plot.paired of {fig.id} names lines {unknown}; its lines: {sorted(lines)}")
    out = []
    for panel in dict.fromkeys(r["panel"] for r in rows):
        xs = _xs([r for r in rows if r["panel"] == panel], fig)
        x = _short(fig.plot["x"])
        at_best = [f"each at its best {x}"] if len(xs) > 1 else []
        out.append("| paired difference (per seed) | " + " | ".join([f"{x}={v}" for v in xs] + at_best) + " |")
        out.append("|---|" + "---|" * (len(xs) + len(at_best)))
        for a, b in pairs:
            diffs = paired(rows, a, b)
            texts = [_fmt_diff(diffs.get((panel, v), [])) for v in xs]
            if at_best:
                xa, xb, best = paired_at_best(rows, a, b, panel)
                texts.append(_fmt_diff(best) + (f", at {x} {xa} and {xb}" if best else ""))
            out.append(f"| {a} − {b} | " + " | ".join(texts) + " |")
        out.append("")
    return out


def _fmt_diff(diffs):
    """'mean ± std, k/n < 0' of one cell's per-seed differences."""
    if not diffs:
        return MISSING
    values = [d for _, d in diffs]
    std = f" ± {statistics.stdev(values):.4f}" if len(values) > 1 else ""
    return f"{statistics.fmean(values):+.4f}{std} ({sum(v < 0 for v in values)}/{len(values)} seeds < 0)"


def _short(key):
    return key if key in GROUPS else SHORT.get(key, key.rsplit(".", 1)[-1])


def _fmt(rows, best, field="value", untrained=None):
    mean, std, n, diverged = _summary(rows, field)
    if mean is None:
        return "diverged" if diverged else MISSING
    text = f"{mean:.4f}" + (f" ± {std:.4f} (n={n})" if std is not None else "")
    text += f" ({diverged} diverged)" if diverged else ""
    text = f"**{text}**" if best is not None and math.isclose(mean, best) else text
    return text + f" {FAILED_MARK}" if untrained is not None and mean > untrained else text


def plot(fig, rows, stem, untrained=None):
    """Write `stem`.png and `stem`.svg: one panel per panel value, the metric against x, a line per line (a
    figure of one x: a labelled point per line); error bars where there are seeds to spread; the untrained
    model's loss as a line, and a red ring on each point above it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = list(dict.fromkeys(r["panel"] for r in rows))
    width, entries = _legend_room(rows, untrained, 5.2)
    fig_, axes = plt.subplots(1, len(panels), figsize=(width * len(panels), 4), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        prow = [r for r in rows if r["panel"] == panel]
        lines = {line: c for (p, line), c in _cells(prow).items() if p == panel}
        xs = _xs(prow, fig)
        if len(xs) == 1:
            _draw_one_x(ax, fig, lines, xs[0], untrained)
        else:
            _draw_lines(ax, fig, lines, xs, untrained)
        if untrained is not None:
            ax.axhline(untrained, color="0.35", ls=":", lw=1.4, label=f"{UNTRAINED} ({untrained:.4f})")
        ax.set_ylabel(f"{fig.plot['metric'].replace('_', ' ')} ({LOWER})")
        seeds = sorted({r["seed"] for r in prow if r["value"] is not None and r["seed"] is not None})
        title = fig.id + (f": {fig.plot['panel']} = {panel}" if panel is not None else "")
        ax.set_title(
            title
            + (f" ({len(seeds)} seeds, mean ± std)" if len(seeds) > 1 else f" (seed {seeds[0]})" if seeds else ""),
            fontsize=10,
        )
        ax.grid(alpha=0.3)
        _legend(ax, entries)
    return save_plot(fig_, stem)


def _draw_lines(ax, fig, lines, xs, untrained):
    numeric = all(isinstance(x, (int, float)) for x in xs)
    failed = []
    styles = _styles(lines)
    for k, (line, c) in enumerate(lines.items()):
        color, dashes, marker = styles[line]
        if all(r["reference"] for rs in c.values() for r in rs):  # e.g. AdamW in a sweep of kappa
            mean = _summary(next(iter(c.values())))[0]
            if mean is not None:
                ax.axhline(mean, color=color, ls="--", lw=1.2, label=f"{line} (no {_short(fig.plot['x'])})")
            continue
        pts = [(x, _summary(c[x])) for x in xs if x in c]
        done = [(x, s[0], s[1]) for x, s in pts if s[0] is not None]
        pos = (lambda x: x) if numeric else (lambda x, k=k: xs.index(x) + 0.08 * (k - (len(lines) - 1) / 2))
        if done:
            spread = any(sd is not None for _, _, sd in done)
            ax.errorbar(
                [pos(x) for x, _, _ in done],
                [m for _, m, _ in done],
                yerr=[sd or 0.0 for _, _, sd in done] if spread else None,
                color=color,
                ls=dashes,
                marker=marker,
                ms=5,
                lw=1.6 if numeric else 0,
                capsize=3 if spread else 0,
                elinewidth=1,
                label=line,
            )
            failed += [(pos(x), m) for x, m, _ in done if untrained is not None and m > untrained]
        div = [x for x, s in pts if s[0] is None and s[3]]
        if div:  # a diverged run has no loss: marked at the top edge
            ax.plot(
                [pos(x) for x in div],
                [1.0] * len(div),
                "x",
                color=color,
                ms=8,
                mew=2,
                clip_on=False,
                transform=ax.get_xaxis_transform(),
                label=f"{line}: diverged",
            )
    _ring(ax, failed)
    if numeric and fig.plot["logx"]:
        ax.set_xscale("log")
    if numeric:
        ax.set_xticks(xs, [f"{x:g}" for x in xs])
        ax.minorticks_off()
    else:
        ax.set_xticks(range(len(xs)), [str(x) for x in xs])
    ax.set_xlabel(fig.plot["x"])


def _draw_one_x(ax, fig, lines, x, untrained):
    """A figure of one x (one lr): each line a labelled point on a categorical axis, its value written beside it."""
    failed = []
    for k, c in enumerate(lines.values()):
        mean, std, n, diverged = _summary(c.get(x, []))
        if mean is None:
            continue
        ax.errorbar(
            [k],
            [mean],
            yerr=[std] if std is not None else None,
            color=_color(k),
            marker="o",
            ms=7,
            capsize=4 if std is not None else 0,
            lw=0,
            elinewidth=1,
        )
        ax.annotate(f"{mean:.4f}", (k, mean), xytext=(8, 0), textcoords="offset points", va="center", fontsize=8)
        if untrained is not None and mean > untrained:
            failed.append((k, mean))
    _ring(ax, failed)
    ax.set_xticks(range(len(lines)), list(lines), fontsize=8)
    ax.set_xlim(-0.6, len(lines) - 0.2)
    ax.set_xlabel(f"method, at {_short(fig.plot['x'])}={x:g}" if isinstance(x, float) else f"method, at {x}")


def _color(k):
    """The k-th line's color: matplotlib's cycle without its red (C3), which marks a failed cell."""
    return f"C{k if k < 3 else k + 1}"


def _styles(lines):
    """{line: (color, dashes, marker)}: a line's first word (its method) picks the color and the rest of its
    label (e.g. its schedule) the dashes and marker, so that a figure of methods x schedules reads by both."""
    parts = {line: line.partition(" ")[::2] for line in lines}  # (method, the rest)
    heads = list(dict.fromkeys(head for head, _ in parts.values()))
    tails = list(dict.fromkeys(tail for _, tail in parts.values()))
    styles = {}
    for line, (head, tail) in parts.items():
        k = tails.index(tail)
        styles[line] = _color(heads.index(head)), DASHES[k % len(DASHES)], MARKERS[k % len(MARKERS)]
    return styles


def _legend_room(rows, untrained, width):
    """(a panel's width, the legend's entries): wider by the legend's room where it goes beside the axes."""
    entries = len({r["line"] for r in rows}) + (untrained is not None)
    return width + (2.4 if entries > LEGEND_INSIDE else 0), entries


def _legend(ax, entries):
    """The legend inside the axes, or beside them where it would cover the lines (more than LEGEND_INSIDE);
    none where nothing is labelled (one x and no untrained model: each point has its tick)."""
    if not ax.get_legend_handles_labels()[0]:
        return
    if entries > LEGEND_INSIDE:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    else:
        ax.legend(fontsize=7)


def _ring(ax, points):
    if points:
        ax.scatter(
            [p for p, _ in points],
            [m for _, m in points],
            s=190,
            facecolors="none",
            edgecolors="red",
            linewidths=1.6,
            zorder=5,
            label=FAILED,
        )


def save_plot(fig_, stem, dpi=150):
    """`stem`.png and `stem`.svg of a matplotlib figure, without dates, so that a redraw is byte-identical,
    marked as pace-figure's (marks.figure_outputs): a file of that name that is not is never replaced."""
    import matplotlib.pyplot as plt

    fig_.tight_layout()
    check_outputs([f"{stem}.png", f"{stem}.svg"])
    os.makedirs(os.path.dirname(os.path.abspath(stem)), exist_ok=True)
    paths = []
    source = marks.FIGURE_SOURCE
    for ext, meta in (("png", {"Software": None, "Source": source}), ("svg", {"Date": None, "Source": source})):
        paths.append(f"{stem}.{ext}")
        fig_.savefig(paths[-1], dpi=dpi, metadata=meta)
    plt.close(fig_)
    return paths


def write_table(path, text):
    """A figure's markdown table, marked as pace-figure's (its last line)."""
    with open(path, "w") as f:
        f.write(f"{text}\n\nDrawn from the run records ({marks.FIGURE_SOURCE})\n")


def check_outputs(paths):
    why = marks.figure_outputs(paths)
    if why is not None:
        raise PaceLMError(f"{why}: a figure is written only over pace-figure's own files; choose another plot_dir")


def step_series(fig, out_dir, key):
    """{run name without its seed: [(step, mean over seeds)]} of step-log `key` (e.g. lambda_mean, which
    pace-train logs with optimizer.log_stats=true), over the steps every seed of that run logged it."""
    series = {}
    for run in fig.runs:
        path = os.path.join(out_dir, fig.id, run.name, RECORD)
        if not os.path.exists(path):
            continue
        logs = [e for e in read_record(path).get("step_logs", []) if key in e]
        label = re.sub(r"_seed\d+$", "", run.name)
        series.setdefault(label, []).append({e["step"]: e[key] for e in logs})
    out = {}
    for label, per_seed in series.items():
        steps = sorted(set.intersection(*(set(s) for s in per_seed)))
        if steps:
            out[label] = [(t, statistics.fmean(s[t] for s in per_seed)) for t in steps]
    return out


def plot_steps(fig, out_dir, keys, stem):
    """Write `stem`.png and .svg: one panel per step-log key, the key against the step, a line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    found = {key: step_series(fig, out_dir, key) for key in keys}
    missing = [key for key, series in found.items() if not series]
    if missing:
        raise PaceLMError(
            f"no record of {fig.id} under {os.path.join(out_dir, fig.id)} has step logs of "
            f"{', '.join(missing)} (PACE's statistics need optimizer.log_stats=true)"
        )
    fig_, axes = plt.subplots(1, len(keys), figsize=(5.2 * len(keys), 4), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for label, points in found[key].items():
            ax.plot([t for t, _ in points], [v for _, v in points], marker=".", label=label)
        ax.set_xlabel("step")
        ax.set_ylabel(key.replace("_", " "))
        ax.set_title(f"{fig.id}: {key}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return save_plot(fig_, stem)


def plot_curves(fig, rows, stem, untrained=None):
    """Write `stem`.png and .svg: per x (and panel), each line's value over the evaluations, mean over seeds
    (the steps every seed evaluated), and the untrained model's loss as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [
        (panel, x)
        for panel in dict.fromkeys(r["panel"] for r in rows)
        for x in _xs([r for r in rows if r["panel"] == panel], fig)
    ]
    width, entries = _legend_room(rows, untrained, 4.6)
    fig_, axes = plt.subplots(1, len(keys), figsize=(width * len(keys), 4), squeeze=False)
    for ax, (panel, x) in zip(axes[0], keys):
        cells = {line: c.get(x, []) for (p, line), c in _cells([r for r in rows if r["panel"] == panel]).items()}
        styles = _styles(cells)
        for line, cell in cells.items():
            curves = [dict(r["curve"]) for r in cell if r["status"] == "complete" and r["curve"]]
            steps = sorted(set.intersection(*(set(c) for c in curves))) if curves else []
            if steps:
                ax.plot(
                    steps,
                    [statistics.fmean(c[t] for c in curves) for t in steps],
                    color=styles[line][0],
                    ls=styles[line][1],
                    marker=styles[line][2],
                    ms=4,
                    label=f"{line} (n={len(curves)})",
                )
        if untrained is not None:
            ax.axhline(untrained, color="0.35", ls=":", lw=1.4, label=f"{UNTRAINED} ({untrained:.4f})")
        ax.set_xlabel("step")
        ax.set_ylabel(f"{eval_key(fig.plot['metric']).replace('_', ' ')} ({LOWER})")
        ax.set_title(f"{_short(fig.plot['x'])}={x}" + (f", {fig.plot['panel']} = {panel}" if panel is not None else ""))
        ax.grid(alpha=0.3)
        _legend(ax, entries)
    return save_plot(fig_, stem)


def plot_figure(fig, out_dir, plot_dir=None):
    """Read the figure's records under out_dir; write its PNG, SVG and markdown table; return the table."""
    rows = collect(fig, out_dir)
    if not any(r["value"] is not None or r["status"] == "diverged" for r in rows):
        raise PaceLMError(
            f"no finished runs of {fig.id} under {os.path.join(out_dir, fig.id)}: "
            f"train them first (pace-figure fig={fig.id} run=true)"
        )
    stem = os.path.join(plot_dir or os.path.join(out_dir, fig.id), fig.id)
    check_outputs([f"{stem}{part}.{ext}" for part in ("", "_curves") for ext in ("png", "svg")] + [f"{stem}.md"])
    untrained = read_pretrained_loss(os.path.join(out_dir, fig.id))
    text = table(fig, rows, untrained=untrained)
    paths = plot(fig, rows, stem, untrained)
    if fig.plot["curves"]:
        text += "\n\n" + table(fig, rows, "lowest", untrained)
        paths += plot_curves(fig, rows, f"{stem}_curves", untrained)
    write_table(f"{stem}.md", f"{fig.description}\n\n{text}")
    return text, [*paths, f"{stem}.md"]
