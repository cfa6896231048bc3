"""Makes the chapters at the repository root importable from the tests, however pytest is started
(`python -m pytest -q` from the root adds it already; plain `pytest tests/` does not)."""
import os
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# What sigrl caches (label embeddings, image-check verdicts) goes to a folder of this test session, not the home folder.
os.environ.setdefault("SIGRL_CACHE", tempfile.mkdtemp(prefix="sigrl-tests-cache-"))
