"""Entry points: `pace-train` (Hydra) and `pace-data` (argparse). They parse and dispatch, nothing more."""

import argparse
import json
import sys

import hydra
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from pace_lm import PaceLMError
from pace_lm.config import CONF_DIR  # importing it registers the ${pkgdir:...} resolver


@hydra.main(version_base=None, config_path=CONF_DIR, config_name="train")
def _train_app(cfg: DictConfig):
    from pace_lm.train import train
    try:
        record = train(cfg)
    except (PaceLMError, OmegaConfBaseException) as e:
        print(f"pace-train: error: {e}", file=sys.stderr)
        sys.exit(2)
    s = record["summary"]
    print(f"pace-train: {cfg.run_name}: final_val_loss {s['final_val_loss']:.4f} ({s['returned']} returned), "
          f"final iterate {s['vanilla_val_loss']:.4f}; record {cfg.training.out_dir}/{cfg.run_name}/record.json")


def train_main():
    """pace-train [overrides]: train one run (see `pace-train --help` and the README)."""
    _train_app()


def data_main(argv=None):
    """pace-data: tokenize a dataset once into a folder pace-train reads (dataset.path)."""
    from pace_lm.data import DEFAULT_SEQ_LEN, PRESETS, prepare
    p = argparse.ArgumentParser(
        prog="pace-data",
        description="Prepare a tokenized dataset for pace-train. With no --source and no --tokenizer: "
                    "the offline corpus (the Python standard library's docs) and a tokenizer trained on it. "
                    "With --tokenizer and no --source: smoltalk (sft) or FineWeb (pretrain) from the hub.")
    p.add_argument("--source", help=f"'offline', {', '.join(repr(k) for k in PRESETS)}, a hub dataset id, "
                                    "or local .json/.jsonl/.parquet file(s) (a file or a folder)")
    p.add_argument("--out", help="output folder (default: data/<source>)")
    p.add_argument("--mode", choices=["sft", "pretrain"], default="sft",
                   help="sft: ChatML conversations, only assistant replies trained; pretrain: text + EOS "
                        "packed into blocks (default: sft)")
    p.add_argument("--tokenizer", help="hub id or local folder of the model's tokenizer (default with "
                                       "--source offline: a BPE tokenizer trained offline)")
    p.add_argument("--gguf-file", help="load the tokenizer from this GGUF file in the --tokenizer folder")
    p.add_argument("--revision", help="dataset revision (commit, tag or branch) to pin on the hub")
    p.add_argument("--name", help="dataset config name on the hub (e.g. 'all' for smoltalk)")
    p.add_argument("--split", default="train", help="split to read (default: train)")
    p.add_argument("--max-seq-len", type=int, help="truncate (sft) or block length (pretrain); default: "
                   + ", ".join(f"{k} {v}" for k, v in DEFAULT_SEQ_LEN.items()))
    p.add_argument("--val-size", type=int, help="validation examples (documents in pretrain mode) held "
                                                "out; default: min(1000, 10%%)")
    p.add_argument("--seed", type=int, default=0, help="seed of the train/validation split (default: 0)")
    p.add_argument("--num-proc", type=int, help="processes for tokenization")
    p.add_argument("--max-tokens", type=int, help="pretrain: stream the source and stop after this many "
                                                  "training tokens")
    p.add_argument("--text-field", default="text", help="text column for pretraining (default: text)")
    p.add_argument("--overwrite", action="store_true", help="replace prepared data already in --out")
    args = p.parse_args(argv)

    source = args.source or ("offline" if args.tokenizer is None else
                             "smoltalk" if args.mode == "sft" else "fineweb")
    if source in PRESETS and PRESETS[source]["mode"] != args.mode:
        p.error(f"--source {source} is {PRESETS[source]['mode']} data; pass --mode {PRESETS[source]['mode']}")
    out = args.out or (f"data/{source}" + ("_pretrain" if source == "offline" and args.mode == "pretrain" else "")
                       if source == "offline" or source in PRESETS else None)
    if out is None:
        p.error("--out is required for this --source")
    try:
        meta = prepare(out, source=source, mode=args.mode, tokenizer=args.tokenizer, gguf_file=args.gguf_file,
                       revision=args.revision, name=args.name, split=args.split, max_seq_len=args.max_seq_len,
                       val_size=args.val_size, seed=args.seed, num_proc=args.num_proc,
                       max_tokens=args.max_tokens, text_field=args.text_field, overwrite=args.overwrite)
    except PaceLMError as e:
        print(f"pace-data: error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"pace-data: wrote {out}: {json.dumps(meta['counts'])}; trained token fraction "
          f"{meta['trained_token_fraction']:.3f}")
