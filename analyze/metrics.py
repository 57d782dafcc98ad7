"""The metrics live in :mod:`similarity.metrics` (one level below ``train`` and ``analyze``);
this module keeps the documented paths ``analyze.metrics.get_metric``, ``analyze.metrics.METRICS``
and the metric functions working."""

from similarity.metrics import *  # noqa: F401,F403
from analyze.calibration import Calibration, calibrate  # noqa: F401  (analyze.metrics.calibrate)
