"""The test-only packages (requirements-dev.txt: open_clip, transformers, timm, torch_geometric, scikit-learn,
h5py, safetensors, ...). With requirements.txt alone the suite still runs: a test that compares with one of
them, or needs one to write its fixture, skips and names the package; everything else runs."""
import pytest


DISTRIBUTIONS = {"sklearn": "scikit-learn", "open_clip": "open_clip_torch"}  # import name -> what pip installs


def reason(package: str) -> str:
    name = package.split(".")[0]
    return f"needs {DISTRIBUTIONS.get(name, name)}, a test-only package (pip install -r requirements-dev.txt)"


def need(package: str):
    """The module `package`; where it is not installed, skip the calling test (at a test file's top level: the
    whole file) with a reason naming it."""
    return pytest.importorskip(package, reason=reason(package))


def have(package: str) -> bool:
    try:
        __import__(package)
    except ImportError:
        return False
    return True


class World(dict):
    """A fixture's dict of made files whose entries may be missing for want of a package: `needs` maps such a key
    to its package, and reading that key skips the reading test, naming the package."""

    def __init__(self, *args, needs=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.needs = needs or {}

    def __getitem__(self, key):
        value = super().__getitem__(key)
        if value is None and key in self.needs:
            pytest.skip(reason(self.needs[key]))
        return value
