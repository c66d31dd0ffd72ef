"""brats-ugrip: BraTS segmentation sweeps, soups, ensembles and MLCube packages.

The ML library is this folder. The design's other parts live in the repository's top-level folders (``sweeps/``,
``slurm/``, ``souping/``, ``ensembling/``, ``synthetic/``, ``mlcube/``, ``tools/``, ``bench/``) and are this
package's sub-packages: ``brats_ugrip.sweeps``, ``brats_ugrip.souping``, ... The wheel maps them under
``brats_ugrip`` (``pyproject.toml``'s ``package-dir``), so nothing but ``brats_ugrip`` is installed at top level
(a top-level ``mlcube`` would shadow MedPerf's own package). In a source checkout the lines below make the same
names import from the top-level folders, so scripts, tests and an editable install all run the checkout's files.
"""
from pathlib import Path as _Path

_CHECKOUT = _Path(__file__).resolve().parent.parent
if (_CHECKOUT / "pyproject.toml").is_file() and (_CHECKOUT / "sweeps" / "__init__.py").is_file():
    __path__.append(str(_CHECKOUT))  # noqa: F821 — a package's __path__ is set before its __init__ runs
