"""Training curves of a run from its RUN_DIR/log.jsonl (the drawing is support/curves.py's, which train.py
also calls at the end of every invocation).

    python -m tools.plot runs/zsl-toy                 # -> runs/zsl-toy/curves.png
    python -m tools.plot RUN_DIR --zsl-groups --out zsl_groups.png    # ZSL by group, each branch
"""
import sys

from support.curves import main

if __name__ == "__main__":
    sys.exit(main())
