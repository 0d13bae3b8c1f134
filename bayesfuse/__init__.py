"""bayesfuse: Bayesian fusion of raters' segmentations and probability maps.

A model zoo in which every fusion model is written twice, as a declarative
PyMC model and as a hand-derived closed-form (VB or EM) solver, and the second
is checked against the first by NUTS.

Quick use::

    import bayesfuse
    result = bayesfuse.fuse(["rater1.nii.gz", "rater2.nii.gz", "rater3.nii.gz"], method="staple")
    result.consensus        # xarray.DataArray, foreground probability
    result.raters           # pandas.DataFrame, one row per rater
    result.save("out/")     # consensus.nii.gz, labels.nii.gz, raters.csv, result.nc
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("bayesfuse")
except PackageNotFoundError:  # running from a source tree
    __version__ = "0+unknown"

from .api import fuse
from .data import RaterMaps
from .errors import ConfigError, InputError, OutputExistsError
from .io import load_raters
from .models import get_model, list_models
from .result import FusionResult

__all__ = [
    "fuse",
    "load_raters",
    "RaterMaps",
    "FusionResult",
    "InputError",
    "ConfigError",
    "OutputExistsError",
    "get_model",
    "list_models",
    "__version__",
]
