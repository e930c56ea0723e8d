"""bids_skullstrip: skull-stripping of T1-weighted MRI as a BIDS App, and as a library.

    from bids_skullstrip import Skullstripper, skullstrip_file, init_t1w_wf

``Skullstripper`` (array and affine in, probability and mask out), ``skullstrip_file`` (a file in, files out,
with the ``skullstrip`` command's checks), ``ModelCard`` (what a set of weights is) and the nipype workflow
factories ``init_t1w_wf`` (one image) and ``init_ds_t1w_wf`` (its BIDS-Derivatives). Each is imported on first
use, so ``import bids_skullstrip`` stays cheap (no TensorFlow, no nipype).
"""

import importlib

__version__ = "0.4.0"

_PUBLIC = {
    "Skullstripper": "bids_skullstrip.model.predictor",
    "SkullstripResult": "bids_skullstrip.model.predictor",
    "ModelCard": "bids_skullstrip.model.card",
    "skullstrip_file": "bids_skullstrip.strip",
    "FileResult": "bids_skullstrip.strip",
    "init_t1w_wf": "bids_skullstrip.workflows.base",
    "init_ds_t1w_wf": "bids_skullstrip.workflows.base",
}
__all__ = ["__version__", *_PUBLIC]


def __getattr__(name):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'bids_skullstrip' has no attribute {name!r}")
    value = getattr(importlib.import_module(_PUBLIC[name]), name)
    globals()[name] = value  # imported once
    return value


def __dir__():
    return sorted(__all__)
