"""`python -m cxrbatch_training <command>`: the training commands (`cxrbatch training`)."""

from __future__ import annotations

from cxrbatch_training.cli import main

__all__ = ["main"]

if __name__ == "__main__":
    raise SystemExit(main())
