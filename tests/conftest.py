"""Makes the chapters at the repository root importable from the tests, however pytest is started
(`python -m pytest -q` from the root adds it already; plain `pytest tests/` does not)."""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
