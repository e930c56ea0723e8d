"""Fuzzing the input-loading path: whatever the bytes, ``load_image`` returns a valid 3D image or raises
``InputError`` with a one-line message naming the file -- never another exception.

Time-bounded: the default example counts keep the whole module under ~60 s on a busy 2-core machine.
Set ``FUZZ_SCALE=20`` (for instance) for a longer campaign. Crashes found are kept as tiny files in
``tests/regressions/`` (regenerate them with ``python tests/test_fuzz.py``), and every file there is
loaded by ``test_regressions``.
"""

import gzip
import json
import os
import sys
import tempfile
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from bids_skullstrip.discovery import DiscoveryError
from bids_skullstrip.nifti import MAX_VOXELS, InputError, load_image

SCALE = float(os.environ.get("FUZZ_SCALE", "1"))
REGRESSIONS = Path(__file__).parent / "regressions"
FUZZ = settings(max_examples=int(250 * SCALE), deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

_WORKDIR = Path(tempfile.mkdtemp(prefix="bids_skullstrip-fuzz-"))


def _base_image(kind="nifti1", dtype=np.int16, shape=(6, 7, 5)):
    rng = np.random.default_rng(0)
    data = (rng.random(shape) * 100 + 1).astype(dtype)
    affine = np.array([[-1.2, 0.1, 0, 30], [0.05, 1.0, 0.2, -40], [0, -0.1, 2.0, 10], [0, 0, 0, 1]])
    cls = nib.Nifti1Image if kind == "nifti1" else nib.Nifti2Image
    img = cls(data, affine)
    img.header.set_qform(affine, 1)
    img.header.set_sform(affine, 2)
    return img


BASES = {
    "nifti1": bytes(_base_image("nifti1").to_bytes()),
    "nifti2": bytes(_base_image("nifti2").to_bytes()),
    "nifti1-f32": bytes(_base_image("nifti1", np.float32).to_bytes()),
}
HEADER_DTYPES = {"nifti1": nib.nifti1.header_dtype, "nifti2": nib.nifti2.header_dtype,
                 "nifti1-f32": nib.nifti1.header_dtype}


def check_load(path):
    """The fuzz property. Returns 'ok' or 'error' so strategies can be sanity-checked."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            img, data = load_image(path)
        except InputError as exc:
            msg = str(exc)
            assert str(path) in msg, msg
            assert "\n" not in msg and len(msg) < 600, msg
            return "error"
    assert isinstance(img, (nib.Nifti1Image, nib.Nifti2Image))
    assert data.dtype == np.float32 and data.ndim == 3 and min(data.shape) >= 2
    assert data.size <= MAX_VOXELS
    assert np.isfinite(data).all() and data.max() > 0 and data.max() > data.min()
    assert np.isfinite(img.affine).all()
    for w in caught:
        text = str(w.message)
        if issubclass(w.category, UserWarning) and text.startswith(str(path)):
            assert "\n" not in text, text
    return "ok"


def _write(data, suffix, name="case"):
    path = _WORKDIR / f"{name}{suffix}"
    path.write_bytes(data)
    return path


# ---------------------------------------------------------------------------------------------------
# strategies
_FLOATS = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True, width=32),
    st.sampled_from([0.0, -0.0, 1e-30, -1.0, 1e30, float("nan"), float("inf"), 352.0, 1e9]),
)
_INTS = st.one_of(st.integers(-(2**15), 2**15 - 1), st.sampled_from([0, 1, -1, 2, 3, 4, 5, 7, 32767, -32768]))


@st.composite
def header_mutations(draw):
    """(base name, list of (field, index or None, value)) changes to apply to the raw header."""
    base = draw(st.sampled_from(sorted(BASES)))
    hdtype = HEADER_DTYPES[base]
    fields = [f for f in hdtype.names if f not in ("descrip", "aux_file", "intent_name", "db_name",
                                                    "data_type")]
    changes = []
    for _ in range(draw(st.integers(1, 4))):
        field = draw(st.sampled_from(fields))
        sub = hdtype[field]
        index = draw(st.integers(0, sub.shape[0] - 1)) if sub.shape else None
        base_dtype = sub.base
        if base_dtype.kind == "f":
            value = draw(_FLOATS)
        elif base_dtype.kind in "iu":
            info = np.iinfo(base_dtype)
            value = draw(st.one_of(_INTS, st.integers(int(info.min), int(info.max))))
            value = int(np.clip(value, info.min, info.max))
        else:  # bytes (magic, dim_info...)
            value = draw(st.binary(min_size=0, max_size=base_dtype.itemsize))
        changes.append((field, index, value))
    return base, changes


def apply_header_mutations(base, changes):
    raw = bytearray(BASES[base])
    hdr = np.ndarray((), dtype=HEADER_DTYPES[base], buffer=raw)
    with np.errstate(all="ignore"):
        for field, index, value in changes:
            if index is None:
                hdr[field] = value
            else:
                hdr[field][index] = value
    return bytes(raw)


@st.composite
def byte_mutations(draw):
    """Random overwrites / insertions / deletions / truncation of a valid file's bytes."""
    raw = bytearray(BASES[draw(st.sampled_from(sorted(BASES)))])
    for _ in range(draw(st.integers(1, 8))):
        op = draw(st.sampled_from(["set", "set-header", "insert", "delete"]))
        if op == "set-header":
            pos = draw(st.integers(0, 351))
            raw[pos] = draw(st.integers(0, 255))
        elif op == "set":
            pos = draw(st.integers(0, len(raw) - 1))
            raw[pos] = draw(st.integers(0, 255))
        elif op == "insert":
            pos = draw(st.integers(0, len(raw)))
            raw[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        elif len(raw) > 1:
            pos = draw(st.integers(0, len(raw) - 1))
            del raw[pos : pos + draw(st.integers(1, 16))]
    if draw(st.booleans()):
        raw = raw[: draw(st.integers(0, len(raw)))]
    return bytes(raw)


# ---------------------------------------------------------------------------------------------------
# properties
@FUZZ
@given(header_mutations(), st.booleans())
def test_fuzz_header_fields(mutation, gz):
    raw = apply_header_mutations(*mutation)
    check_load(_write(gzip.compress(raw) if gz else raw, ".nii.gz" if gz else ".nii", "hdr"))


@FUZZ
@given(byte_mutations(), st.booleans())
def test_fuzz_bytes(raw, gz):
    check_load(_write(gzip.compress(raw) if gz else raw, ".nii.gz" if gz else ".nii", "bytes"))


@settings(FUZZ, max_examples=int(120 * SCALE))
@given(st.sampled_from(sorted(BASES)), st.data())
def test_fuzz_gzip_stream(base, data):
    """Corrupt or truncated compressed streams (the "interrupted download" case)."""
    gz = bytearray(gzip.compress(BASES[base]))
    for _ in range(data.draw(st.integers(0, 4))):
        pos = data.draw(st.integers(0, len(gz) - 1))
        gz[pos] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):
        gz = gz[: data.draw(st.integers(0, len(gz)))]
    check_load(_write(bytes(gz), ".nii.gz", "gz"))


@settings(FUZZ, max_examples=int(60 * SCALE))
@given(st.binary(max_size=2048), st.sampled_from([".nii", ".nii.gz", ".img", ".mgz", ".json"]))
def test_fuzz_arbitrary_bytes(raw, suffix):
    """A file that was never an image (HTML error page, JSON, random bytes) under an image name."""
    check_load(_write(raw, suffix, "junk"))


@settings(FUZZ, max_examples=int(80 * SCALE))
@given(
    st.lists(st.integers(0, 9), min_size=1, max_size=7),
    st.sampled_from([np.uint8, np.int8, np.int16, np.uint16, np.int32, np.float32, np.float64]),
    st.one_of(st.none(), st.floats(-1e6, 1e6, allow_nan=False)),
    st.floats(-1e3, 1e3, allow_nan=False),
    st.sampled_from(["normal", "nan-some", "nan-all", "inf", "zeros", "negative"]),
)
def test_fuzz_valid_headers_odd_content(shape, dtype, slope, inter, content):
    """Well-formed files with odd shapes, dtypes, scaling and values."""
    shape = tuple(shape)
    assume(0 < int(np.prod(shape)) <= 4096)
    rng = np.random.default_rng(len(shape))
    data = (rng.random(shape) * 50).astype(dtype)
    if content != "normal" and np.dtype(dtype).kind == "f":
        flat = data.reshape(-1)
        if content == "nan-some":
            flat[:: 3] = np.nan
        elif content == "nan-all":
            flat[:] = np.nan
        elif content == "inf":
            flat[:: 2] = np.inf
    if content == "zeros":
        data[...] = 0
    elif content == "negative" and np.dtype(dtype).kind in "if":
        data = -np.abs(data) - 1
    img = nib.Nifti1Image(data, np.eye(4))
    path = _WORKDIR / "odd.nii.gz"
    raw = bytearray(img.to_bytes())
    if slope is not None:  # raw header values: nibabel refuses to *write* some of them
        hdr = np.ndarray((), dtype=nib.nifti1.header_dtype, buffer=raw)
        hdr["scl_slope"], hdr["scl_inter"] = slope, inter
    path.write_bytes(gzip.compress(bytes(raw)))
    outcome = check_load(path)
    spatial = shape + (1,) * (3 - len(shape)) if len(shape) < 3 else shape
    squeezed = list(shape)
    while len(squeezed) > 3 and squeezed[-1] == 1:
        squeezed.pop()
    if len(squeezed) != 3 or min(squeezed) < 2:
        assert outcome == "error", (shape, spatial)


def test_regressions():
    """Every crash kept from earlier fuzzing still loads cleanly or gives a clean InputError."""
    cases = sorted(p for p in REGRESSIONS.iterdir() if p.is_file() and p.suffix != ".md")
    assert cases, "tests/regressions/ is empty: run `python tests/test_fuzz.py`"
    for case in cases:
        check_load(case)


# ---------------------------------------------------------------------------------------------------
# crashes found by fuzzing (before io.py was hardened), kept as tiny generated files
def _regression_cases():
    """name -> bytes. Each crashed ``load_image`` with a non-InputError exception at some point."""
    n1 = "nifti1"
    cases = {
        # memmap offset overflow: OverflowError("Python int too large to convert to C long")
        "vox_offset_huge.nii": apply_header_mutations(n1, [("vox_offset", None, 1e30)]),
        # complex data: ComplexWarning + silently dropped imaginary part / RGB: DTypePromotionError
        "datatype_rgb24.nii": apply_header_mutations(n1, [("datatype", None, 128), ("bitpix", None, 24)]),
        "datatype_complex64.nii": apply_header_mutations(n1, [("datatype", None, 32), ("bitpix", None, 64)]),
        # nibabel "fixes" printed straight to stderr: invalid codes, sizeof_hdr, negative pixdim
        "qform_code_invalid.nii": apply_header_mutations(n1, [("qform_code", None, 11009),
                                                              ("sizeof_hdr", None, 0)]),
        # all intensities negative: core crashed later with ValueError("image has no positive voxels")
        "negative_only.nii": _negative_only(),
        # 5D with trailing singleton dimensions: rejected as "not 3D" although it is one volume
        "five_d_singleton.nii": _five_d_singleton(),
        # shape product overflowing int64 in np.prod (NIfTI-2 allows 64-bit dims)
        "nifti2_dims_overflow.nii": apply_header_mutations("nifti2", [("dim", 1, 2**40), ("dim", 2, 2**40),
                                                                      ("dim", 3, 2**40)]),
        # truncated download
        "truncated.nii.gz": gzip.compress(BASES[n1])[:200],
        # absurd voxel size (affine finite, 1e30 mm voxels): model grid of one voxel
        "pixdim_huge.nii": apply_header_mutations(n1, [("pixdim", 1, 1e30), ("sform_code", None, 0),
                                                       ("qform_code", None, 0)]),
    }
    return cases


def _negative_only():
    img = nib.Nifti1Image(-np.arange(1, 61, dtype=np.int16).reshape(3, 4, 5), np.eye(4))
    return bytes(img.to_bytes())


def _five_d_singleton():
    img = nib.Nifti1Image(np.arange(1, 61, dtype=np.int16).reshape(3, 4, 5, 1, 1), np.eye(4))
    return bytes(img.to_bytes())


def write_regressions():
    REGRESSIONS.mkdir(exist_ok=True)
    for name, raw in _regression_cases().items():
        (REGRESSIONS / name).write_bytes(raw)
    return sorted(_regression_cases())


# ---------------------------------------------------------------------------------------------------
# JSON: BIDS sidecars and --bids-filter-file (the app's JSON readers, when present)
def _json_readers():
    """(name, callable(path)) for every JSON-reading entry point of the app: the BIDS filter file and the
    metrics JSON the reports read back (which must never raise on content)."""
    from bids_skullstrip.discovery import load_bids_filters
    from bids_skullstrip.reports.common import load_record

    def as_metrics_file(path):
        """The text as a metrics JSON (its name says which image it is, as the reports find them)."""
        metrics = path.with_name("sub-01_desc-brain_metrics.json")
        metrics.write_bytes(path.read_bytes())
        return load_record(metrics, path.parent)

    return [("discovery.load_bids_filters", load_bids_filters), ("reports.common.load_record", as_metrics_file)]


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids, max_size=4),
    max_leaves=12,
)
_FILTER_KEYS = st.sampled_from(["t1w", "T1w", "anat", "session", "acquisition", "run", "suffix",
                                "datatype", "extension", "subject", "reconstruction", "invalid",
                                # the metrics JSON's keys
                                "bids_name", "flags", "warnings", "qc", "model", "runtime_s"])


@settings(FUZZ, max_examples=int(150 * SCALE))
@given(st.one_of(
    _JSON.map(json.dumps),
    st.dictionaries(_FILTER_KEYS, st.dictionaries(_FILTER_KEYS, _JSON, max_size=3) | _JSON,
                    max_size=3).map(json.dumps),
    st.binary(max_size=200).map(lambda b: b.decode("latin-1")),
))
def test_fuzz_json_readers(text):
    path = _write(text.encode("utf-8", "surrogatepass"), ".json", "filter")
    for name, reader in _json_readers():
        try:
            reader(path)
        except (InputError, DiscoveryError) as exc:  # the user-facing errors: one line each
            assert "\n" not in str(exc), (name, str(exc))


if __name__ == "__main__":
    print("\n".join(write_regressions()))
    sys.exit(0)
