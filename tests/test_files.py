"""The one YAML reader and the one file hash (brats_ugrip/files.py)."""
from __future__ import annotations

import hashlib

import pytest

from brats_ugrip.errors import ConfigError
from brats_ugrip.files import read_yaml, sha256_file


def test_read_yaml_reads_scientific_numbers_and_names_bad_files(tmp_path):
    good = tmp_path / "grid.yaml"
    good.write_text("grid:\n  optim.lr: [1e-3, 3.0e-4, '1e-2']\nname: x\n")
    assert read_yaml(good) == {"grid": {"optim.lr": [0.001, 0.0003, 0.01]}, "name": "x"}
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: <file>: not valid YAML"):
        read_yaml(bad)
    tagged = tmp_path / "tagged.yaml"
    tagged.write_text("a: !!python/object/apply:os.system ['touch pwned']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        read_yaml(tagged)
    assert not (tmp_path / "pwned").exists()
    with pytest.raises(ConfigError, match="grid not found"):
        read_yaml(tmp_path / "missing.yaml", "grid")


def test_sha256_file_is_the_digest_of_the_bytes(tmp_path):
    data = bytes(range(256)) * 5000  # more than one 1 MiB block
    path = tmp_path / "blob"
    path.write_bytes(data)
    assert sha256_file(path) == hashlib.sha256(data).hexdigest()
