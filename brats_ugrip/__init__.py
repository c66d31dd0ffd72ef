"""brats-ugrip: BraTS segmentation sweeps, soups, ensembles and MLCube packages.

The ML library is this folder. The design's other parts live in the repository's top-level folders (``sweeps/``,
``slurm/``, ``souping/``, ``ensembling/``, ``synthetic/``, ``mlcube/``, ``tools/``, ``bench/``) and are this
package's sub-packages: ``brats_ugrip.sweeps``, ``brats_ugrip.souping``, ... The wheel maps them under
``brats_ugrip`` (``pyproject.toml``'s ``package-dir``), so nothing but ``brats_ugrip`` is installed at top level
(a top-level ``mlcube`` would shadow MedPerf's own package). In a source checkout the lines below make the same
names import from the top-level folders, so scripts, tests and an editable install all run the checkout's files.

One file is one module object, whichever name imports it: in a checkout, ``import souping.soups`` gives the
module ``brats_ugrip.souping.soups`` (:class:`_FolderAliases`, and each folder's ``__init__.py`` hands its own
top-level name over), so a class, an enum or a patch is the same under both names.
"""
import importlib as _importlib
import importlib.abc as _abc
import importlib.machinery as _machinery
import importlib.util as _util
import sys as _sys
from pathlib import Path as _Path

FOLDERS = ("sweeps", "slurm", "souping", "ensembling", "synthetic", "mlcube", "tools", "bench")
"""The design's top-level folders: ``brats_ugrip.<folder>`` sub-packages."""

_CHECKOUT = _Path(__file__).resolve().parent.parent


class _Alias(_abc.Loader):
    """Loads ``<folder>.x`` as the module ``brats_ugrip.<folder>.x`` (imported once, under its real name)."""

    def __init__(self, target: str):
        self.target = target
        self.module = None
        self.spec = None

    def create_module(self, spec):  # noqa: ANN001, ANN201 — importlib's protocol
        self.module = _importlib.import_module(self.target)
        self.spec = self.module.__spec__
        return self.module

    def exec_module(self, module):  # noqa: ANN001, ANN201
        module.__spec__ = self.spec  # importlib set the alias's spec on it: the module keeps its own


class _FolderAliases(_abc.MetaPathFinder):
    """``import sweeps.monitoring.engine`` (and every other ``<folder>.*``) → the ``brats_ugrip.<folder>.*`` module."""

    def find_spec(self, fullname, path=None, target=None):  # noqa: ANN001, ANN201
        top = fullname.partition(".")[0]
        if top not in FOLDERS:
            return None
        if top == fullname:  # only where the name would be this checkout's folder anyway (never MedPerf's mlcube)
            found = _machinery.PathFinder.find_spec(top)
            if found is None or found.origin is None or _Path(found.origin).resolve().parent.parent != _CHECKOUT:
                return None
        elif _sys.modules.get(top) is not _sys.modules.get(f"brats_ugrip.{top}"):
            return None
        return _util.spec_from_loader(fullname, _Alias(f"brats_ugrip.{fullname}"))


def alias_folder(name: str) -> None:
    """Called by each folder's ``__init__.py``: imported as the top-level ``<folder>``, hand the name over to
    ``brats_ugrip.<folder>`` (the one module object of that file)."""
    if name in FOLDERS:
        _sys.modules[name] = _importlib.import_module(f"brats_ugrip.{name}")


if (_CHECKOUT / "pyproject.toml").is_file() and (_CHECKOUT / "sweeps" / "__init__.py").is_file():
    __path__.append(str(_CHECKOUT))  # noqa: F821 — a package's __path__ is set before its __init__ runs
    if not any(isinstance(finder, _FolderAliases) for finder in _sys.meta_path):
        _sys.meta_path.insert(0, _FolderAliases())
