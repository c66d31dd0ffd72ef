"""Train one run: ``python -m brats_ugrip.train CONFIG.yaml [--set key.path=value ...] [--run-dir DIR]``.

The config is validated (unknown keys, types, values; then the datalist, fold and patch size) before anything
heavy starts. Rerunning the same command resumes from ``RUN_DIR/checkpoints/last.ckpt``. See
``brats_ugrip.training`` for what a run directory holds.
"""
from __future__ import annotations

import argparse
from collections.abc import Sequence

import yaml

from brats_ugrip.cli import console, run
from brats_ugrip.config import load_config
from brats_ugrip.data import Datalist
from brats_ugrip.training_cases import check_run_data


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m brats_ugrip.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="run config YAML (e.g. experiments/train_tiny_cpu.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                        help="override a config value, e.g. --set optim.lr=3e-4 (repeatable; values are YAML)")
    parser.add_argument("--run-dir", help="run directory (default: run_dir in the config)")
    parser.add_argument("--check", action="store_true",
                        help="validate the config and its datalist (paths, fold, patch size; image headers only, no "
                             "image data), print the config resolved, and exit")
    args = parser.parse_args(argv)
    config = load_config(args.config, args.overrides)
    if args.check:
        # What a real start checks of the data before anything heavy: a missing datalist or fold fails here too.
        check_run_data(config, Datalist.load(config.data.datalist, config.data.data_root))
        print(yaml.safe_dump(config.to_dict(), sort_keys=False), end="")
        print(f"# config hash {config.hash()}")
        return 0
    from pytorch_lightning.utilities import rank_zero_only  # heavy imports only once the config is valid

    from brats_ugrip.training import train

    summary = train(config, args.run_dir)
    if rank_zero_only.rank == 0:  # once per run, not per process of a multi-process (DDP) run
        console.print(f"[bold green]done[/] {summary['epochs']} epochs, best val mean Dice "
                      f"{summary['best_val_dice'] if summary['best_val_dice'] is not None else float('nan'):.4f} "
                      f"(epoch {summary['best_epoch']}) → {summary['best_checkpoint']}")
    return 0


if __name__ == "__main__":
    run(main)
