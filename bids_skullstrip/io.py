"""Reading T1w images defensively and writing outputs atomically on the input's exact grid."""

import gzip
import os
import warnings
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np

MAX_VOXELS = 2**28  # 1 GiB as float32: bounds memory on absurd inputs


class InputError(ValueError):
    """A problem with an input file, phrased for the user (one line, names the file)."""


def load_t1w(path):
    """Load a T1w NIfTI as (image, float32 3D data); raise InputError with a one-line reason."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: file not found")
    try:
        img = nib.load(str(path))
    except Exception as exc:  # nibabel raises many types for non-NIfTI content
        raise InputError(f"{path}: not a readable NIfTI image ({_short(exc)})") from None
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        raise InputError(f"{path}: not a NIfTI image ({type(img).__name__})")
    shape = img.shape
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if len(shape) == 4:
        raise InputError(f"{path}: 4D image with {shape[3]} volumes; a T1w must be a single 3D volume")
    if len(shape) != 3 or min(shape) < 2:
        raise InputError(f"{path}: image of shape {img.shape} is not a 3D volume")
    if int(np.prod(shape)) > MAX_VOXELS:
        raise InputError(f"{path}: image of shape {tuple(shape)} is too large (> {MAX_VOXELS} voxels)")
    affine = img.affine
    zooms = np.sqrt((affine[:3, :3] ** 2).sum(0))
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-6 or np.any(zooms < 1e-3):
        raise InputError(f"{path}: invalid voxel-to-world affine (zero, infinite or degenerate voxel sizes)")
    try:
        data = img.get_fdata(dtype=np.float32).reshape(shape)
    except (EOFError, zlib.error, gzip.BadGzipFile, OSError, ValueError) as exc:
        raise InputError(f"{path}: truncated or corrupt image data ({_short(exc)})") from None
    finite = np.isfinite(data)
    if not finite.all():
        if not finite.any():
            raise InputError(f"{path}: every voxel is NaN or infinite")
        warnings.warn(f"{path}: {int((~finite).sum())} NaN/infinite voxels set to 0", stacklevel=2)
        data = np.where(finite, data, 0.0).astype(np.float32)
    if float(data.max()) == float(data.min()):
        raise InputError(f"{path}: image is constant (every voxel = {float(data.min()):g})")
    return img, data


def geometry_warnings(img):
    """Human-readable doubts about an image's orientation information."""
    hdr = img.header
    msgs = []
    if isinstance(hdr, nib.Nifti1Header):
        scode, qcode = int(hdr["sform_code"]), int(hdr["qform_code"])
        if scode == 0 and qcode == 0:
            msgs.append("neither qform nor sform is set: orientation is a guess from the voxel sizes")
        elif scode > 0 and qcode > 0 and not np.allclose(hdr.get_sform(), hdr.get_qform(), atol=1e-3):
            msgs.append("qform and sform disagree; the sform was used (as nibabel, FSL and ANTs do)")
    return msgs


def _short(exc):
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:200]


def like(reference, data, dtype):
    """A new image with ``data`` on exactly the grid (shape, affine, qform/sform + codes) of ``reference``."""
    hdr = reference.header.copy()
    hdr.set_data_dtype(dtype)
    hdr.set_slope_inter(None, None)
    hdr["cal_min"], hdr["cal_max"] = 0, 0
    data = np.asarray(data).astype(dtype, copy=False).reshape(reference.shape[:3])
    if len(reference.shape) == 4:
        hdr.set_data_shape(data.shape)
    return type(reference)(data, None, header=hdr)


def atomic_save(img, path):
    """Write ``img`` to ``path`` via a temporary file in the same folder and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = ".nii.gz" if path.name.endswith(".nii.gz") else path.suffix
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name[: -len(suffix)]}{suffix}")
    try:
        nib.save(img, str(tmp))
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def atomic_write_text(path, text):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path
