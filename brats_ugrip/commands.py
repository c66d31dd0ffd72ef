"""The ``brats-ugrip`` command: one entry point whose sub-commands are the project's tools.

    brats-ugrip launch GRID --sweep-dir DIR        (= python sweeps/launch.py GRID --sweep-dir DIR)
    brats-ugrip monitor DIR --summary              (= python sweeps/monitor.py DIR --summary)
    brats-ugrip greedy-soup --ckpts DIR ...        (= python souping/greedy.py --ckpts DIR ...)

Each sub-command is the tool's own ``main(argv)``, imported only when it is chosen, so ``brats-ugrip --help`` and
every ``brats-ugrip TOOL --help`` answer at once, without importing torch.
"""
from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

COMMANDS: dict[str, tuple[str, str]] = {
    # name: (module with main(argv), one-line description)
    "phantoms": ("brats_ugrip.synthetic.phantom", "write BraTS-named synthetic phantoms"),
    "synthesize": ("brats_ugrip.synthetic.synthesize", "label-conditioned synthetic cases"),
    "make-datalist": ("brats_ugrip.tools.make_datalist", "datalist JSON with folds (and a test split) from case folders"),
    "check-data": ("brats_ugrip.tools.check_data", "every problem of every case of a datalist"),
    "integrate-cases": ("brats_ugrip.tools.integrate_cases", "add checked cases to a datalist"),
    "sample-cases": ("brats_ugrip.tools.sample_cases", "sample synthetic cases into a datalist"),
    "evaluate": ("brats_ugrip.tools.evaluate", "BraTS metrics of predicted label maps against references"),
    "doctor": ("brats_ugrip.tools.doctor", "node check before a sweep: GPU, step and loader speed, inference, cache"),
    "train": ("brats_ugrip.train", "train one run from a config YAML"),
    "infer": ("brats_ugrip.infer", "predict label maps with a checkpoint"),
    "launch": ("brats_ugrip.sweeps.launch", "grid YAML → validated runs → job arrays (local or SLURM)"),
    "monitor": ("brats_ugrip.sweeps.monitor", "live dashboard; retries, resumes and collects a sweep"),
    "greedy-soup": ("brats_ugrip.souping.greedy", "greedy weight soup selected on a held-out fold"),
    "uniform-soup": ("brats_ugrip.souping.uniform", "uniform weight soup"),
    "ensemble": ("brats_ugrip.ensembling.cli", "per-channel weighted ensembles: fit, predict"),
    "compare": ("brats_ugrip.tools.compare", "rank candidates as BraTS does, with intervals and p-values"),
    "compare-soups": ("brats_ugrip.tools.compare_soups", "one test table: best ingredient, soups, ensemble, ranked"),
    "mlcube-build": ("brats_ugrip.mlcube.build", "build a MedPerf MLCube package"),
    "mlcube-check": ("brats_ugrip.mlcube.check", "run a package's infer task on cases and check every output"),
    "export": ("brats_ugrip.mlcube.export", "ONNX / Triton export of a checkpoint or an ensemble spec"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {text}" for name, (_, text) in COMMANDS.items()]
    return ("usage: brats-ugrip COMMAND [ARGS ...]   (brats-ugrip COMMAND --help for its options)\n\ncommands:\n"
            + "\n".join(lines))


def main(argv: Sequence[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(usage())
        sys.exit(0 if args else 2)
    name, rest = args[0], args[1:]
    if name not in COMMANDS:
        print(f"brats-ugrip: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        sys.exit(2)
    from brats_ugrip.cli import run

    module = importlib.import_module(COMMANDS[name][0])
    sys.argv[0] = f"brats-ugrip {name}"
    run(module.main, rest)


if __name__ == "__main__":
    main()
