"""Reading structural images (T1w, T2w, FLAIR, ...) defensively and writing outputs atomically on the input's
exact grid.

``load_image`` either returns a usable 3D volume or raises ``InputError`` whose message is one line that
names the file and the problem; it never lets another exception type escape (this is fuzz-tested in
``tests/test_fuzz.py``). Doubts that do not stop processing are issued as ``warnings.warn`` messages,
each naming the file. See ``docs/robustness.md`` for every case and the exact message.
"""

import contextlib
import logging
import math
import os
import re
import secrets
import socket
import time
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
from isal import igzip

# The largest |intensity| an image may have: float32 holds up to 3.4e38 (a float64 image beyond was read as
# infinite) and underflows below 1e-38 (read as constant), the resampling's sums overflowed near 1e38 (RuntimeWarnings
# on the console); no scanner writes such values.
INTENSITY_RANGE = (1e-30, 1e35)
# 2**27 voxels = 512**3 (e.g. a 0.5 mm isotropic 256 mm cube): 512 MiB as float32. Peak memory of the
# core path is a small multiple of this (see docs/robustness.md), so it stays bounded on absurd inputs.
MAX_VOXELS = 2**27
MIN_VOXEL_MM = 1e-3
MAX_VOXEL_MM = 100.0  # a head image with 10 cm voxels is a broken header, not a scan
# a voxel's volume over that of a box of its edges (1: orthogonal axes; a 45-degree shear 0.71); below this the
# axes are nearly parallel: a broken header (red-team 10a: an empty mask and "no brain found")
MIN_SQUARENESS = 0.1
_SUPPORTED_KINDS = "iuf"  # signed/unsigned ints and floats; complex and RGB are not MR magnitudes
# A head image has hundreds of grey levels even stored as uint8; a mask or a segmentation has a handful.
LABEL_IMAGE_LEVELS = 16
_TMP_PREFIX = ".tmp-"
# A temporary file's name says who writes it (".tmp-<pid>-<random>@<host>@<name>"), so that a later run can
# remove those of a writer that was killed (SIGKILL, the kernel's OOM killer): at once when the writer was a
# process of this host that is gone, else (another node, an earlier version's ".tmp-<pid>-<random>-<name>") once
# nobody has written to it for this long; writing one file takes seconds.
_TMP_NAME = re.compile(r"\.tmp-(\d+)-[0-9a-f]{8}(?:@([^@/]+)@|-)")
STALE_TMP_S = 600.0


class InputError(ValueError):
    """A problem with an input file, phrased for the user (one line, names the file)."""


def _short(exc):
    text = " ".join(str(exc).split())
    return (text or type(exc).__name__)[:200]


@contextlib.contextmanager
def _nibabel_messages():
    """Collect nibabel's header fix-up messages instead of letting them print to stderr."""
    logger = nib.imageglobals.logger
    collected = []

    class _Collect(logging.Handler):
        def emit(self, record):
            if record.levelno >= logging.WARNING or QFAC_FIX in record.getMessage():
                collected.append(" ".join(record.getMessage().split()))

    saved_handlers, saved_propagate, saved_level = list(logger.handlers), logger.propagate, logger.level
    handler = _Collect(level=logging.DEBUG)
    logger.handlers = [handler]
    logger.propagate = False
    logger.setLevel(logging.INFO)  # nibabel's qfac fix is an INFO record
    try:
        yield collected
    finally:
        logger.handlers = saved_handlers
        logger.propagate = saved_propagate
        logger.setLevel(saved_level)


def load_header(path):
    """``nib.load`` of a raw image whose header alone is wanted (its grid, to write outputs on or size a job), without
    nibabel's header fix-up lines on the console: ``load_image`` says them once, naming the file (the app printed
    each of them six times, naming nothing: red-team 18)."""
    with _nibabel_messages():
        return nib.load(str(path))


# nibabel reads a qfac (pixdim[0]) of 0 as 1, as the NIfTI standard says, and logs it at INFO. It is named when the
# qform is what orients the image (no sform): with a qfac that should have been -1 the head is read upside down.
QFAC_FIX = "(qfac) should be 1 (default) or -1"


_GZIP_MAGIC = b"\x1f\x8b"
_CONVERT_HINTS = {
    "MGHImage": "convert it to NIfTI first (e.g. mri_convert T1.mgz T1.nii.gz)",
    "Nifti1Pair": "a .hdr/.img pair: convert it to a single .nii or .nii.gz file first (e.g. fslchfiletype "
                  "NIFTI_GZ)",
    "Nifti2Pair": "a .hdr/.img pair: convert it to a single .nii or .nii.gz file first",
}


def _starts_with(path, magic):
    try:
        with open(path, "rb") as f:
            return f.read(len(magic)) == magic
    except OSError:
        return False


def spatial_shape(shape):
    """The 3D shape of an image that is 3D up to trailing singleton dimensions, else None."""
    shape = tuple(int(s) for s in shape)
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    return shape if len(shape) == 3 else None


def load_image(path):
    """Load a structural NIfTI (any contrast) as (image, float32 3D data); raise InputError with a one-line reason.

    - a 4D image with one volume (or trailing singleton dimensions) is treated as 3D;
    - NaN/infinite voxels are set to 0 with a warning (all of them: error);
    - the image must have some positive, non-constant intensities.
    """
    path = Path(path)
    try:
        if not path.exists():
            raise InputError(f"{path}: file not found")
        if path.is_dir():
            raise InputError(f"{path}: is a directory, not a NIfTI file")
        if not path.is_file():
            raise InputError(f"{path}: not a regular file (a pipe, socket or device): give a NIfTI file")
        if not os.access(path, os.R_OK):
            raise InputError(f"{path}: permission denied (cannot read the file)")
        if path.stat().st_size == 0:
            raise InputError(f"{path}: empty file (0 bytes)")
    except OSError as exc:
        raise InputError(f"{path}: cannot access the file ({_short(exc)})") from None

    if path.name.endswith(".nii") and _starts_with(path, _GZIP_MAGIC):
        raise InputError(f"{path}: the file is gzip-compressed but named .nii; rename it to "
                         f"{path.name}.gz")
    with _nibabel_messages() as fixes:
        try:
            img = nib.load(str(path), mmap=False)  # never a view of the input file
        except Exception as exc:  # nibabel raises many types for non-NIfTI content
            raise InputError(f"{path}: not a readable NIfTI image ({_short(exc)})") from None
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        hint = _CONVERT_HINTS.get(type(img).__name__, "convert it to a single .nii or .nii.gz file first")
        raise InputError(f"{path}: not a NIfTI image but {type(img).__name__}; {hint}")
    hdr, offset = img.header, getattr(img.dataobj, "offset", None)  # the loaded header's vox_offset is reset to 0
    if hdr["magic"].item() == hdr.single_magic and offset is not None and offset < hdr.single_vox_offset:
        # nibabel reads the voxels of a vox_offset of 0 from the file's first byte, the header's: a head shifted by
        # 176 voxels came out, its mask 16 mm off (red-team 18); 1-351 it refuses
        raise InputError(f"{path}: not a readable NIfTI image (vox_offset {offset}: the voxels of a single-file NIfTI "
                         f"start at byte {hdr.single_vox_offset} or later; where they start is not known)")
    qform_orients = isinstance(img.header, nib.Nifti1Header) and int(img.header["sform_code"]) == 0
    for msg in dict.fromkeys(fixes):
        if QFAC_FIX not in msg:
            warnings.warn(f"{path}: invalid header field fixed on load: {msg}", stacklevel=2)
        elif qform_orients:
            warnings.warn(f"{path}: invalid header field fixed on load: {msg}; the qform orients this image (no "
                          "sform): check that the head is not upside down", stacklevel=2)

    try:
        dtype = np.dtype(img.get_data_dtype())
    except Exception as exc:
        raise InputError(f"{path}: unreadable data type in the header ({_short(exc)})") from None
    if dtype.kind not in _SUPPORTED_KINDS:
        raise InputError(f"{path}: unsupported voxel data type {dtype} (a structural image needs "
                         "integer or float intensities)")

    shape = spatial_shape(img.shape)
    if shape is None and len(img.shape) >= 4:
        raise InputError(f"{path}: {len(img.shape)}D image of shape {tuple(img.shape)} with "
                         f"{math.prod(img.shape[3:])} volumes; a structural image must be a single 3D volume")
    if shape is not None and len(shape) == 3 and sorted(shape)[:2] != [1, 1] and min(shape) == 1:
        raise InputError(f"{path}: image of shape {tuple(img.shape)} is a single slice; a 3D volume of the head is "
                         "needed")
    if shape is None or min(shape) < 2:
        raise InputError(f"{path}: image of shape {tuple(img.shape)} is not a 3D volume")
    if math.prod(shape) > MAX_VOXELS:
        raise InputError(f"{path}: image of shape {shape} is too large ({math.prod(shape)} voxels > "
                         f"{MAX_VOXELS}); crop or downsample it first")

    try:
        affine = np.asarray(img.affine, dtype=np.float64)
        zooms = nib.affines.voxel_sizes(affine)
        # voxel axes nearly parallel (each of a valid length): voxels of almost no volume, nothing a scanner writes
        squareness = abs(np.linalg.det(affine[:3, :3])) / float(np.prod(zooms))
        valid = bool(np.all(np.isfinite(affine)) and abs(np.linalg.det(affine[:3, :3])) > 1e-9
                     and np.all(zooms >= MIN_VOXEL_MM) and np.all(zooms <= MAX_VOXEL_MM)
                     and squareness >= MIN_SQUARENESS)
    except Exception:
        valid = False
    if not valid:
        raise InputError(f"{path}: invalid voxel-to-world affine (zero, infinite, degenerate, axes nearly parallel "
                         f"or absurd voxel sizes; they must be within {MIN_VOXEL_MM:g}-{MAX_VOXEL_MM:g} mm)")

    try:
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore")  # overflow while scaling shows up as inf, handled below
            data = np.asarray(img.dataobj, dtype=np.float32).reshape(shape)
    except MemoryError:
        raise InputError(f"{path}: not enough memory to read an image of shape {shape}") from None
    except Exception as exc:  # truncated gzip, short file, bad offset...: nibabel raises many types
        raise InputError(f"{path}: truncated or corrupt image data ({_short(exc)})") from None

    finite = np.isfinite(data)
    everywhere = bool(finite.all())
    lo, hi = (float(data.min()), float(data.max())) if everywhere else (0.0, 0.0)
    if lo == hi:  # NaN or inf, or a constant: as read, or only once in float32 (beyond its range)?
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore")
            raw = np.asanyarray(img.dataobj).reshape(shape)
        read = np.isfinite(raw)
        largest = float(np.abs(raw[read]).max()) if read.any() else 0.0
        if np.count_nonzero(read) > np.count_nonzero(finite) or (largest and not data.any()):
            _check_range(path, largest)
        del raw, read
    if not everywhere:
        n_bad = int(data.size - np.count_nonzero(finite))
        if n_bad == data.size:
            raise InputError(f"{path}: every voxel is NaN or infinite")
        warnings.warn(f"{path}: {n_bad} NaN/infinite voxels set to 0", stacklevel=2)
        data[~finite] = 0.0
        lo, hi = float(data.min()), float(data.max())
    del finite
    _check_range(path, max(abs(lo), abs(hi)))
    if lo == hi:
        raise InputError(f"{path}: image is constant (every voxel = {lo:g})")
    if hi <= 0:
        raise InputError(f"{path}: image has no positive intensities (max = {hi + 0.0:g})")
    levels = np.unique(data[::3, ::3, ::3]).size  # a subsample: a 256^3 image in ~30 ms
    if levels <= LABEL_IMAGE_LEVELS:
        warnings.warn(f"{path}: only {levels} distinct intensities: a mask or label image rather than a "
                      "structural image?", stacklevel=2)
    return img, data


_UNIT_NAMES = {"meter": "m", "micron": "µm"}
# A head is 120-300 mm across. A field of view ten times that, or narrower than a brain in every direction,
# comes from wrong voxel sizes (or units) in the header; one thinner than a brain in one direction is a slab.
HEAD_FOV_MM = (60.0, 1000.0)
SLAB_MM = 40.0


def _check_range(path, largest):
    """An InputError where the image's largest |intensity| is outside what the app computes with in float32."""
    if largest and not INTENSITY_RANGE[0] <= largest <= INTENSITY_RANGE[1]:
        raise InputError(f"{path}: intensities as large as {largest:.3g}: outside the {INTENSITY_RANGE[0]:g} to "
                         f"{INTENSITY_RANGE[1]:g} the app computes with; rescale the image")


def geometry_warnings(img):
    """Human-readable doubts about an image's orientation information (no file name: callers add it)."""
    hdr = img.header
    msgs = []
    if isinstance(hdr, nib.Nifti1Header):  # Nifti2Header is a subclass
        scode, qcode = int(hdr["sform_code"]), int(hdr["qform_code"])
        if scode == 0 and qcode == 0:
            msgs.append("neither qform nor sform is set: orientation is a guess from the voxel sizes")
        elif scode > 0 and qcode > 0:
            try:
                agree = np.allclose(hdr.get_sform(), hdr.get_qform(), atol=1e-3)
            except Exception:
                agree = False
            if not agree:
                msgs.append("qform and sform disagree; the sform was used (as nibabel, FSL and ANTs do)")
        try:
            unit = hdr.get_xyzt_units()[0]
        except Exception:
            unit = "unknown"
        if unit in _UNIT_NAMES:
            msgs.append(f"spatial units are {_UNIT_NAMES[unit]} in the header; treated as mm (as most "
                        "tools do)")
    zooms = nib.affines.voxel_sizes(img.affine)
    extent = np.asarray(spatial_shape(img.shape) or img.shape[:3]) * zooms
    fov = "x".join(f"{e:.0f}" for e in extent)
    if not HEAD_FOV_MM[0] <= extent.max() <= HEAD_FOV_MM[1]:
        msgs.append(f"field of view {fov} mm (voxels {'x'.join(f'{z:g}' for z in zooms)} mm) is not the size of "
                    "a head: check the voxel sizes in the header")
    elif extent.min() < SLAB_MM:
        msgs.append(f"field of view {fov} mm is a slab, thinner than a brain: the mask cannot hold the whole brain")
    return msgs


def like(reference, data, dtype):
    """A new image with ``data`` on exactly the grid (shape, affine, qform/sform + codes) of ``reference``.

    A 4D single-volume reference gives a 3D output on the same grid. Spatial units the reference leaves
    unknown are written as mm, which is how they were read (and what the BIDS validator asks for).
    """
    hdr = reference.header.copy()
    xyz, t = hdr.get_xyzt_units()
    if xyz == "unknown":
        hdr.set_xyzt_units(xyz="mm", t=t)
    hdr.set_data_dtype(dtype)
    hdr.set_slope_inter(None, None)
    hdr["cal_min"], hdr["cal_max"] = 0, 0
    shape = spatial_shape(reference.shape) or tuple(reference.shape[:3])
    data = np.asarray(data).astype(dtype, copy=False).reshape(shape)
    if tuple(reference.shape) != shape:
        hdr.set_data_shape(shape)
    return type(reference)(data, None, header=hdr)


def tmp_sibling(path, suffix=""):
    """A unique hidden sibling of ``path`` (same folder, so the final rename is atomic)."""
    token = f"{_TMP_PREFIX}{os.getpid()}-{secrets.token_hex(4)}@{_host()}@"
    stem = path.name[: len(path.name) - len(suffix)] if suffix else path.name
    stem = stem[: 200 - len(token) - len(suffix)]  # stay under NAME_MAX
    return path.with_name(f"{token}{stem}{suffix}")


def _host():
    return (socket.gethostname() or "localhost").replace("@", "_").replace("/", "_")[:64]


def _writer_gone(name, mtime, now):
    import psutil

    owner = _TMP_NAME.match(name)
    if not owner:  # not a name of ours
        return False
    if owner[2] == _host():
        pid = int(owner[1])
        if pid == os.getpid():
            return False
        try:  # a SIGKILLed worker whose parent died too stays a zombie until init reaps it: gone as well
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        except psutil.Error:  # alive, another user's
            pass
    return now - mtime > STALE_TMP_S


def remove_stale_temporaries(folder):
    """Remove the temporary files (``tmp_sibling``) under ``folder`` whose writer is gone; the number removed."""
    removed, now = 0, time.time()
    for root, _, files in os.walk(folder):
        for name in files:
            if not name.startswith(_TMP_PREFIX):
                continue
            path = os.path.join(root, name)
            with contextlib.suppress(OSError):
                if _writer_gone(name, os.lstat(path).st_mtime, now):
                    os.unlink(path)
                    removed += 1
    return removed


def remove_temporaries_of(paths):
    """Remove the temporary files (``tmp_sibling``) of ``paths``, whoever wrote them: for a caller that holds the
    lock of the files (a writer on another host, or in an earlier container whose host name was another, is
    known to be gone only that way); the number removed."""
    removed = 0
    for path in map(Path, paths):
        with contextlib.suppress(OSError):
            for tmp in path.parent.glob(f"{_TMP_PREFIX}*"):
                owner = _TMP_NAME.match(tmp.name)
                if owner and tmp.name[owner.end():] == path.name:
                    tmp.unlink()
                    removed += 1
    return removed


def _fsync(path):
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_file(path):
    """A temporary sibling of ``path`` to write, renamed to ``path`` when the block ends without an error.

    The final name appears only when the file is complete; a crash leaves at most a hidden ``.tmp-*``
    file. The temporary name keeps the extension (.nii.gz, .svg...), which some writers go by.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = ".nii.gz" if path.name.endswith(".nii.gz") else path.suffix
    tmp = tmp_sibling(path, suffix)
    try:
        yield tmp
        _fsync(tmp)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()


def save(img, path):
    """``nib.save`` of a single-file NIfTI image, gzip-compressed by ISA-L where ``path`` ends in .gz: the bytes
    inside are nibabel's, the compression ten times faster than zlib's at nibabel's level (a float32 1 mm head:
    0.04 s against 0.45 s, the file 0.5 % larger): zlib made writing an image's outputs a fifth of its CPU time."""
    if not str(path).endswith(".gz"):
        nib.save(img, str(path))
        return
    # the gzip header as nibabel writes it, without the (temporary) file's name and time, which the BIDS
    # validator warns about
    with open(path, "wb") as raw, igzip.IGzipFile(filename="", mode="wb", fileobj=raw, compresslevel=1,
                                                   mtime=0) as stream:
        img.to_file_map(img.make_file_map({"image": stream}))


def atomic_save(img, path):
    """Write the image ``img`` to ``path`` atomically (``atomic_file``)."""
    with atomic_file(path) as tmp:
        save(img, tmp)
    return Path(path)


def atomic_write_text(path, text):
    """Write ``text`` to ``path`` atomically (readers never see half a file)."""
    with atomic_file(path) as tmp:
        tmp.write_text(text)
    return Path(path)
