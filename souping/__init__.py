"""Installed as ``brats_ugrip.souping``; imported as ``souping`` from a checkout, it is that same module."""
import brats_ugrip as _brats_ugrip

_brats_ugrip.alias_folder(__name__)
