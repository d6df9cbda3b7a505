"""The walk of the config through the pipeline: which modules the run's config passes through, in order.

Runs one short pace-train run on the offline data (2 steps of the tiny model, checkpointed, then extended to
4 by a resume, so that the checkpoint's path is walked too) under a profiler that notes each call of a
pipeline function given the config or a section of it as an argument (a `schema` dataclass, or the composed
config). The walk is those functions in the order of their first call; consecutive ones in one module are
one stop. A move is a step from one stop to the next; a climb back is a move into a module the walk has
left before. Prints, for the new run and for its resume, the moves and climbs back (--show: the walk).

    python benchmarks/config_walk.py [--data data/offline] [--show]
"""

import argparse
import dataclasses
import sys
import tempfile

PIPELINE = "pace_lm."


def _is_config(value, schema):
    if dataclasses.is_dataclass(value) and type(value).__module__ == schema.__name__:
        return True
    return type(value).__name__ in ("DictConfig", "Config") and type(value).__module__.startswith("omegaconf")


def walk(cfg_overrides):
    from pace_lm.config import compose, schema
    from pace_lm.run.train import train

    walks = []

    def profiler(frame, event, arg):
        if event != "call":
            return
        module = frame.f_globals.get("__name__", "")
        if not module.startswith(PIPELINE):
            return
        code = frame.f_code
        args = [frame.f_locals.get(n) for n in code.co_varnames[: code.co_argcount + code.co_kwonlyargcount]]
        if any(_is_config(a, schema) for a in args):
            name = module[len(PIPELINE) :]
            stops, seen = walks[-1]
            if (name, code.co_name) in seen:  # a function is one stop, however often it is called
                return
            seen.add((name, code.co_name))
            if not stops or stops[-1][0] != name:
                stops.append((name, code.co_name))

    for overrides in cfg_overrides:
        cfg = compose.compose(overrides)
        walks.append(([], set()))
        sys.setprofile(profiler)
        try:
            train(cfg)
        finally:
            sys.setprofile(None)
    return [stops for stops, _ in walks]


def count(stops):
    """(moves, climbs back) of a walk: a climb back enters a module the walk has left before."""
    left, climbs = set(), 0
    for (prev, _), (name, _) in zip(stops, stops[1:]):
        left.add(prev)
        climbs += name in left
    return max(0, len(stops) - 1), climbs


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="data/offline")
    p.add_argument("--show", action="store_true", help="print each stop of the walk")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as out:
        base = [
            f"dataset.path={args.data}",
            f"training.out_dir={out}",
            "training.batch_size=4",
            "training.micro_batch_size=4",
            "training.eval_interval=2",
            "training.eval_batches=1",
            "training.log_interval=2",
            "training.progress=false",
            "training.device=cpu",
            "training.checkpoint.at_end=true",
            "run_name=walk",
        ]
        walks = walk([base + ["training.max_steps=2"], base + ["training.max_steps=4", "training.resume=true"]])
    for title, stops in zip(("a new run", "its resume"), walks):
        moves, climbs = count(stops)
        print(f"config walk of {title}: {len(stops)} stops, {moves} moves, {climbs} climbs back")
        if args.show:
            print("".join(f"  {name}.{fn}\n" for name, fn in stops), end="")


if __name__ == "__main__":
    main()
