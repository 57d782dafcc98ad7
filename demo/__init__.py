"""Demo data preparation (run from the repository root: python -m demo.tuxpaint); not an installed package."""
