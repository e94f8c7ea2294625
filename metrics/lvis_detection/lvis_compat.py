"""The official LVIS API (`pip install lvis==0.5.3`, github.com/lvis-dataset/lvis-api) with two compatibility fixes,
applied to that package only:

* `lvis/__init__.py` imports the visualiser (OpenCV, matplotlib); evaluation needs neither. When they are missing,
  the package is registered without running its `__init__` and the evaluation modules are imported directly.
* `LVISEval.accumulate` calls `np.float`, removed in numpy 1.24: `lvis.eval` sees numpy with `float` added back.
"""

import importlib
import importlib.util
import sys
import types

import numpy as np


class _NumpyWithFloat(types.ModuleType):
    """numpy, plus the `np.float` alias (= float) that lvis 0.5.3 still uses."""

    float = float

    def __getattr__(self, name):
        return getattr(np, name)


def load_lvis_api():
    """-> (LVIS, LVISResults, LVISEval) of the installed `lvis` package; ImportError with the install line if absent."""
    if importlib.util.find_spec("lvis") is None:
        raise ImportError("the lvis_detection metric needs the official LVIS API: pip install lvis==0.5.3")
    try:
        importlib.import_module("lvis")
    except ImportError:  # the visualiser's OpenCV / matplotlib: register the bare package, run only what evaluation needs
        sys.modules.pop("lvis", None)
        spec = importlib.util.find_spec("lvis")
        sys.modules["lvis"] = importlib.util.module_from_spec(spec)
    lvis_eval = importlib.import_module("lvis.eval")
    if not hasattr(np, "float"):
        lvis_eval.np = _NumpyWithFloat("numpy")
    return importlib.import_module("lvis.lvis").LVIS, importlib.import_module("lvis.results").LVISResults, lvis_eval.LVISEval
