"""The kernel builders live in :mod:`similarity.kernels`; this module keeps the documented path
``analyze.kernels.*`` working."""

from similarity.kernels import *  # noqa: F401,F403
