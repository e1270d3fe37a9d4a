"""``python -m lightning_curvature``: the same as the ``lightning-curvature`` command."""

from lightning_curvature.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
