"""bids_skullstrip: skull-stripping of T1-weighted MRI as a BIDS App."""

__version__ = "0.1.0"
