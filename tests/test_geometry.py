"""Geometry guarantees of the core path (``Skullstripper`` + ``nifti.like``/``atomic_save``), no nipype.

1. Outputs keep the input's shape, affine, qform/sform and their codes exactly (bitwise header fields),
   for all 48 axis-aligned orientations, oblique affines, anisotropic voxels, tiny and huge fields of
   view, every common dtype (incl. scaled ints), NIfTI-1/2, 4D single-volume inputs.
2. The world-space content decides the mask, not the voxel order: a head permuted/flipped (affine
   adjusted) gives the same mask once mapped back; a head arbitrarily rotated/resampled (hypothesis)
   gives a mask that maps back onto the original run's mask.

Models: ``BlobModel`` is a deterministic stand-in for the network (smoothed intensity -> "brain"
probability); it makes the invariance tests exact and fast. The same tests run with the bundled model
when its weights exist (``real_model`` fixture), plus mask-agreement checks against silver masks.
Heads are downsampled to ~2 mm first (the model works at 2 mm anyway).
"""

import functools
import itertools
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from _ci import needs, unavailable
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy import ndimage as ndi

from bids_skullstrip import nifti as io
from bids_skullstrip.model.predictor import Skullstripper

DATA = Path(__file__).parents[1].parent / "shared" / "data"
HEADS = DATA / "heads"
FULL = os.environ.get("BIDS_SKULLSTRIP_FULL_TESTS", "") not in ("", "0")

pytestmark = needs(HEADS / "colin27" / "T1w.nii.gz", "the shared heads")


# ---------------------------------------------------------------------------------------------------
# helpers
class BlobModel:
    """Deterministic stand-in for the U-Net: a smooth blob from the normalised model-grid intensities."""

    def __call__(self, x, training=False):
        v = np.asarray(x, dtype=np.float32)[0, ..., 0]
        s = ndi.gaussian_filter(v, 1.5, mode="constant")
        p = 1.0 / (1.0 + np.exp(-(s - 0.3) * 25.0))
        return p[None, ..., None].astype(np.float32)


class MemoModel:
    """Runs a real network, reusing its output when the model-grid input is the same (within 1e-5).

    The network is a deterministic function of its input, so this only skips recomputing identical
    work: any orientation whose model-grid volume differs is run through the network for real.
    """

    def __init__(self, model):
        self.model, self.cache, self.calls = model, [], 0

    def __call__(self, x, training=False):
        x = np.asarray(x)
        for seen, out in self.cache:
            if seen.shape == x.shape and np.max(np.abs(seen - x)) < 1e-5:
                return out
        self.calls += 1
        out = np.asarray(self.model(x, training=False))
        self.cache.append((x.copy(), out))
        return out


def dice(a, b):
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    total = a.sum() + b.sum()
    return 1.0 if total == 0 else 2.0 * np.logical_and(a, b).sum() / total


def downsample(data, affine, target_mm=2.0, *, is_mask=False):
    """Block-average to ~target_mm voxels (integer factors); the affine follows exactly."""
    zooms = np.sqrt((affine[:3, :3] ** 2).sum(0))
    f = np.maximum(1, np.round(target_mm / zooms).astype(int))
    shape = (np.array(data.shape) // f) * f
    d = np.asarray(data, np.float32)[: shape[0], : shape[1], : shape[2]]
    d = d.reshape(shape[0] // f[0], f[0], shape[1] // f[1], f[1], shape[2] // f[2], f[2]).mean((1, 3, 5))
    scale = np.eye(4)
    scale[:3, :3] = np.diag(f)
    scale[:3, 3] = (f - 1) / 2.0
    return (d >= 0.5 if is_mask else d), affine @ scale


@functools.lru_cache(maxsize=8)
def head(name="colin27", target_mm=2.0):
    """(data float32, affine, silver mask bool) of a real head at ~target_mm."""
    img = nib.load(str(HEADS / name / "T1w.nii.gz"))
    mask = nib.load(str(HEADS / name / "mask_silver.nii.gz"))
    data, affine = downsample(img.get_fdata(dtype=np.float32), img.affine, target_mm)
    silver, _ = downsample(mask.get_fdata(dtype=np.float32), mask.affine, target_mm, is_mask=True)
    data.setflags(write=False)
    silver.setflags(write=False)
    return data, affine, silver


ORIENTATIONS = [(p, f) for p in itertools.permutations(range(3)) for f in itertools.product((0, 1), repeat=3)]


def reorient(data, affine, perm, flips):
    """Permute/flip the voxel array; the new affine keeps every voxel at the same world position."""
    out = np.transpose(data, perm)
    new_to_old = np.zeros((4, 4))
    new_to_old[3, 3] = 1
    for k, (axis, flip) in enumerate(zip(perm, flips)):
        if flip:
            new_to_old[axis, k] = -1
            new_to_old[axis, 3] = out.shape[k] - 1
        else:
            new_to_old[axis, k] = 1
    out = out[tuple(slice(None, None, -1) if f else slice(None) for f in flips)]
    return np.ascontiguousarray(out), affine @ new_to_old


def undo_reorient(volume, perm, flips):
    volume = volume[tuple(slice(None, None, -1) if f else slice(None) for f in flips)]
    return np.transpose(volume, np.argsort(perm))


def nifti(data, affine, *, dtype=None, qcode=1, scode=1, cls=nib.Nifti1Image):
    data = np.asarray(data) if dtype is None else np.asarray(data).astype(dtype)
    img = cls(data, affine)
    img.header.set_qform(affine if qcode else None, qcode)
    img.header.set_sform(affine if scode else None, scode)
    return img


GRID_FIELDS = ("dim", "pixdim", "qform_code", "sform_code", "quatern_b", "quatern_c", "quatern_d",
               "qoffset_x", "qoffset_y", "qoffset_z", "srow_x", "srow_y", "srow_z", "dim_info")


def assert_same_grid(out, ref, *, ndim=3):
    """``out`` (as written to disk and read back) sits exactly on ``ref``'s grid."""
    ho, hr = out.header, ref.header
    assert out.shape == ref.shape[:ndim]
    for field in GRID_FIELDS:
        a, b = np.asarray(ho[field]), np.asarray(hr[field])
        if field == "dim":
            a, b = a[1:4], b[1:4]
        if field == "pixdim":
            a, b = a[:4], b[:4]
        assert np.array_equal(a, b, equal_nan=True), (field, a, b)
    assert np.array_equal(out.affine, ref.affine)
    (xyz_out, t_out), (xyz_ref, t_ref) = ho.get_xyzt_units(), hr.get_xyzt_units()
    assert t_out == t_ref and xyz_out == (xyz_ref if xyz_ref != "unknown" else "mm"), (xyz_out, xyz_ref)
    for coded in ("get_qform", "get_sform"):
        (ma, ca), (mb, cb) = getattr(ho, coded)(coded=True), getattr(hr, coded)(coded=True)
        assert ca == cb
        assert (ma is None and mb is None) or np.array_equal(ma, mb)


def roundtrip_outputs(ref, result, tmp_path):
    """Save mask (uint8) and probability (float32) like the app does; read them back from disk."""
    m = io.atomic_save(io.like(ref, result.mask, np.uint8), tmp_path / "x_desc-brain_mask.nii.gz")
    p = io.atomic_save(io.like(ref, result.probability, np.float32), tmp_path / "x_probseg.nii.gz")
    assert not [f for f in tmp_path.iterdir() if f.name.startswith(".tmp-")]
    return nib.load(str(m)), nib.load(str(p))


def check_result(result, shape):
    assert result.mask.shape == tuple(shape) and result.mask.dtype == np.uint8
    assert set(np.unique(result.mask)) <= {0, 1}
    assert result.probability.shape == tuple(shape) and result.probability.dtype == np.float32
    assert np.isfinite(result.probability).all()
    assert result.probability.min() >= 0 and result.probability.max() <= 1


@functools.lru_cache(maxsize=1)
def _bundled_model():
    from bids_skullstrip.model.inference import WEIGHTS_FILE, load_model

    if not WEIGHTS_FILE.exists():
        return None
    return load_model()


@pytest.fixture(scope="module")
def real_model():
    model = _bundled_model()
    if model is None:  # they ship in the package: in CI the test fails instead
        unavailable("real-model", "bundled model weights not found (bids_skullstrip/model/weights/)")
    return model


@functools.lru_cache(maxsize=8)
def reference_run(name="colin27", model_kind="blob", target_mm=2.0):
    data, affine, _ = head(name, target_mm)
    model = BlobModel() if model_kind == "blob" else _bundled_model()
    return Skullstripper(networks=model).mask(data, affine)


# ---------------------------------------------------------------------------------------------------
# 48 axis-aligned orientations
def test_reorient_helper_keeps_world_positions():
    data, affine, _ = head()
    for perm, flips in ORIENTATIONS:
        out, new_affine = reorient(data, affine, perm, flips)
        j = np.array([3, 5, 7])
        i = (np.linalg.inv(affine) @ new_affine @ np.r_[j, 1])[:3].round().astype(int)
        assert out[tuple(j)] == data[tuple(i)]
        assert np.array_equal(undo_reorient(out, perm, flips), data)
    assert len({nib.aff2axcodes(reorient(data, affine, p, f)[1]) for p, f in ORIENTATIONS}) == 48


@pytest.mark.parametrize("perm,flips", ORIENTATIONS, ids=[f"{''.join(map(str, p))}-{''.join(map(str, f))}"
                                                          for p, f in ORIENTATIONS])
def test_48_orientations_same_mask_and_exact_grid(perm, flips, tmp_path):
    data, affine, _ = head(target_mm=3.0)
    ref = reference_run(target_mm=3.0)
    vol, new_affine = reorient(data, affine, perm, flips)
    img = nifti(vol, new_affine, dtype=np.float32, qcode=1, scode=2)
    loaded, loaded_data = io.load_image(_save(img, tmp_path / "in.nii"))
    result = Skullstripper(networks=BlobModel()).mask(loaded_data, loaded.affine)
    check_result(result, vol.shape)
    # every orientation is computed on the same RAS-ordered voxels: bit-identical results
    assert np.array_equal(undo_reorient(result.mask, perm, flips), ref.mask)
    assert np.array_equal(undo_reorient(result.probability, perm, flips), ref.probability)
    mask_img, prob_img = roundtrip_outputs(loaded, result, tmp_path)
    assert_same_grid(mask_img, loaded)
    assert_same_grid(prob_img, loaded)
    assert mask_img.get_data_dtype() == np.uint8 and prob_img.get_data_dtype() == np.float32
    assert np.array_equal(np.asanyarray(mask_img.dataobj), result.mask)


# ---------------------------------------------------------------------------------------------------
# fast paths compute what the plain scipy routines compute
@pytest.mark.parametrize("mode", ["constant", "nearest"])
@pytest.mark.parametrize("zoom,shift,sigma", [((2.0, 2.0, 2.0), (-3.2, 0.5, 7.0), (0.5, 0.5, 0.5)),
                                              ((0.5, 0.75, 1.0), (-1.3, 2.2, -0.4), (0.0, 0.0, 0.0)),
                                              ((1.5, 3.0, 1.0), (0.0, -5.0, 2.5), (0.25, 1.0, 0.0))])
def test_separable_resampling_matches_scipy(mode, zoom, shift, sigma):
    from bids_skullstrip.geometry import _resample

    volume = ndi.gaussian_filter(np.random.default_rng(3).random((23, 31, 17)), 1.5).astype(np.float32)
    vox = np.eye(4)
    vox[:3, :3] = np.diag(zoom)
    vox[:3, 3] = shift
    out_shape = (19, 13, 21)
    reference = ndi.affine_transform(ndi.gaussian_filter(volume, sigma, mode="nearest"), vox[:3, :3], vox[:3, 3],
                                     output_shape=out_shape, order=1, mode=mode, prefilter=False)
    fast = _resample(volume, vox, out_shape, mode=mode, sigma=sigma)
    assert fast.shape == out_shape and fast.dtype == np.float32
    assert np.abs(fast - reference).max() < 1e-5


@pytest.mark.parametrize("zoom,shift,sigma", [((2.0, 2.0, 2.0), (9.7, 12.5, 8.0), (0.5, 0.5, 0.5)),
                                              ((1.0, 0.5, 1.5), (20.3, 14.2, 3.1), (1.5, 0.0, 0.25))])
def test_separable_resampling_of_a_part_and_of_a_view(zoom, shift, sigma):
    """An output that reads the middle of a larger volume (the brain box of a head) is computed from that part
    only, and a flipped, transposed view (a RAS-ordered LIA image) needs no copy: the same values as scipy."""
    from bids_skullstrip.geometry import _resample

    stored = ndi.gaussian_filter(np.random.default_rng(5).random((40, 70, 50)), 1.5).astype(np.float32)
    volume = np.flip(stored, 1).transpose(2, 0, 1)  # (50, 40, 70), not contiguous
    vox = np.eye(4)
    vox[:3, :3] = np.diag(zoom)
    vox[:3, 3] = shift
    out_shape = (9, 11, 13)
    reference = ndi.affine_transform(ndi.gaussian_filter(np.ascontiguousarray(volume), sigma, mode="nearest"),
                                     vox[:3, :3], vox[:3, 3], output_shape=out_shape, order=1, mode="constant",
                                     prefilter=False)
    fast = _resample(volume, vox, out_shape, mode="constant", sigma=sigma)
    assert fast.shape == out_shape and fast.dtype == np.float32
    assert np.abs(fast - reference).max() < 1e-5


@pytest.mark.parametrize("oblique", [False, True], ids=["separable", "oblique"])
@pytest.mark.parametrize("zoom,shift,sigma", [((2.0, 2.0, 2.0), (-0.4, 0.5, 7.0), (0.5, 0.5, 0.5)),
                                              ((0.5, 0.75, 1.0), (-1.3, 2.2, -0.4), (0.0, 0.0, 0.0))])
def test_box_resampling_reads_each_edge_voxel_up_to_its_outer_face(oblique, zoom, shift, sigma):
    """``mode="box"``, both paths: points between an outermost voxel's centre and its outer face read that
    voxel (the sample moved onto its centre), points further out read zero."""
    from bids_skullstrip.geometry import _resample

    volume = 1.0 + ndi.gaussian_filter(np.random.default_rng(3).random((23, 31, 17)), 1.5).astype(np.float32)
    vox = np.eye(4)
    vox[:3, :3] = np.diag(zoom)
    vox[:3, 3] = shift
    if oblique:
        vox[0, 1], vox[2, 0] = 0.053, -0.097  # no sample exactly on a face (a rounding tie)
    out_shape = (19, 13, 21)
    coords = (vox[:3, :3] @ np.indices(out_shape).reshape(3, -1) + vox[:3, 3:]).astype(np.float64)
    for axis, n in enumerate(volume.shape):
        inside = np.clip(coords[axis], 0, n - 1)
        coords[axis] = np.where(np.abs(coords[axis] - inside) <= 0.5, inside, coords[axis])
    reference = ndi.map_coordinates(ndi.gaussian_filter(volume, sigma, mode="nearest"), coords, order=1,
                                    mode="constant", prefilter=False).reshape(out_shape)
    got = _resample(volume, vox, out_shape, mode="box", sigma=sigma)
    assert np.abs(got - reference).max() < 1e-5
    assert (got > 0).sum() > (_resample(volume, vox, out_shape, mode="constant", sigma=sigma) > 0).sum()


@pytest.mark.parametrize("rotation_deg", [0.0, 7.0])
def test_a_2d_stacks_edge_slices_reach_the_model_grid_as_whole_slabs(rotation_deg):
    """A stack of 4 mm slices (an axial FLAIR ending at the vertex): on the 2 mm model grid the image reaches
    the outer faces of its first and last slices, not only their centres, so brain that fills an edge slice is
    seen over the slice's whole thickness."""
    from bids_skullstrip.geometry import to_model_grid

    shape, voxel = (40, 48, 9), np.array([2.5, 2.5, 4.0])
    affine = np.diag([*voxel, 1.0])
    affine[:3, 3] = (0.3, -0.7, 1.0)  # model voxel centres a quarter slab off the slabs' faces
    if rotation_deg:
        a = np.deg2rad(rotation_deg)
        affine[:3, :3] = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]]) @ affine[:3, :3]
    volume, grid = to_model_grid(np.ones(shape, np.float32), affine)
    world = grid.affine @ np.vstack([np.indices(grid.shape).reshape(3, -1), np.ones((1, volume.size))])
    native = (np.linalg.inv(affine) @ world)[:3].reshape(3, *grid.shape)
    deep = np.all((native >= -0.45) & (native <= np.array(shape)[:, None, None, None] - 0.55), axis=0)
    beyond = np.any((native < -0.55) | (native > np.array(shape)[:, None, None, None] - 0.45), axis=0)
    past_centres = deep & ((native[2] < 0) | (native[2] > shape[2] - 1))  # the half slabs outside the centres
    assert past_centres.sum() > 0.05 * deep.sum()
    np.testing.assert_allclose(volume[deep], 1.0, atol=1e-5)
    assert np.all(volume[beyond] == 0.0)


@pytest.mark.parametrize("dtype", [np.float32, np.uint8])
def test_block_reduce_is_the_block_mean(dtype):
    from bids_skullstrip.geometry import block_reduce

    data = (np.random.default_rng(6).random((41, 30, 23)) * 200).astype(dtype)
    affine = np.diag([0.5, 1.0, 0.25, 1.0])
    reduced, coarse = block_reduce(data, affine, 4.0)  # blocks of 4 x 2 x 8 voxels, ragged ends dropped
    expected = data[:40, :30, :16].reshape(10, 4, 15, 2, 2, 8).mean(axis=(1, 3, 5))
    assert reduced.dtype == np.float32 and reduced.shape == (10, 15, 2)
    assert np.abs(reduced - expected).max() < 1e-4
    assert np.allclose(coarse[:3, :3], np.diag([2.0, 2.0, 2.0])) and np.allclose(coarse[:3, 3], [0.75, 0.5, 0.875])


@pytest.mark.parametrize("fraction", [0.2, 0.5, 0.8])
def test_fill_holes_matches_scipy(fraction):
    from bids_skullstrip.postproc import fill_holes

    rng = np.random.default_rng(int(fraction * 10))
    field = ndi.gaussian_filter(rng.random((41, 37, 29)), 1.2)
    mask = field > np.quantile(field, 1 - fraction)
    mask[10:30, 10:30, 8:20] |= True
    mask[15:20, 15:20, 12:15] = False  # at least one hole
    assert np.array_equal(fill_holes(mask), ndi.binary_fill_holes(mask))
    assert fill_holes(mask)[17, 17, 13]


def _save(img, path):
    nib.save(img, str(path))
    return path


def test_48_orientations_real_model(real_model):
    """The bundled network: every orientation's mask maps back onto the original one (Dice >= 0.98)."""
    data, affine, silver = head()
    from bids_skullstrip.model.inference import BrainNetworks

    memo = BrainNetworks(MemoModel(real_model.locator), MemoModel(real_model.segmenter))
    ref = Skullstripper(networks=memo).mask(data, affine)
    assert dice(ref.mask, silver) >= 0.85, "the bundled model should find the brain of colin27"
    for perm, flips in ORIENTATIONS:
        vol, new_affine = reorient(data, affine, perm, flips)
        result = Skullstripper(networks=memo).mask(vol, new_affine)
        check_result(result, vol.shape)
        d = dice(undo_reorient(result.mask, perm, flips), ref.mask)
        assert d >= 0.98, (perm, flips, d)
    assert memo.locator.calls <= 48 and memo.segmenter.calls <= 48


# ---------------------------------------------------------------------------------------------------
# headers: codes, oblique, NIfTI-2, 4D single volume, dtypes
def _oblique(affine, degrees=(17.0, -9.0, 23.0), shear=0.0):
    ax, ay, az = np.deg2rad(degrees)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    out = affine.copy()
    out[:3, :3] = rx @ ry @ rz @ affine[:3, :3]
    out[0, 1] += shear
    return out


HEADER_CASES = {
    "q1-s1": dict(qcode=1, scode=1),
    "q0-s4": dict(qcode=0, scode=4),
    "q2-s0": dict(qcode=2, scode=0),
    "q0-s0": dict(qcode=0, scode=0),
    "nifti2": dict(qcode=1, scode=2, cls=nib.Nifti2Image),
}


@pytest.mark.parametrize("case", sorted(HEADER_CASES))
@pytest.mark.parametrize("oblique", [False, True], ids=["straight", "oblique"])
def test_header_codes_and_oblique_kept_exactly(case, oblique, tmp_path):
    data, affine, _ = head()
    aff = _oblique(affine) if oblique else affine
    img = nifti(data, aff, dtype=np.int16, **HEADER_CASES[case])
    loaded, vol = io.load_image(_save(img, tmp_path / "in.nii.gz"))
    result = Skullstripper(networks=BlobModel()).mask(vol, loaded.affine)
    check_result(result, vol.shape)
    assert result.mask.sum() > 1000
    for out in roundtrip_outputs(loaded, result, tmp_path):
        assert_same_grid(out, loaded)
        assert type(out.header) is type(loaded.header)


@pytest.mark.parametrize("case", sorted(HEADER_CASES))
@pytest.mark.parametrize("dtype", [np.uint8, np.int16, np.float32])
def test_outputs_hold_the_bytes_nibabel_writes(case, dtype, tmp_path):
    """The app's faster gzip (ISA-L) changes how the bytes are compressed, never which bytes: a .nii.gz it writes
    decompresses to what nibabel's own writer puts in the file, and any gzip reader reads it."""
    import gzip

    data, affine, _ = head()
    img = nifti(data[:20] * 0.37, _oblique(affine), dtype=dtype, **HEADER_CASES[case])
    ours, theirs = tmp_path / "ours.nii.gz", tmp_path / "theirs.nii.gz"
    io.save(img, ours)
    nib.save(img, str(theirs))
    written = ours.read_bytes()
    assert gzip.decompress(written) == gzip.decompress(theirs.read_bytes())
    flags, mtime = written[3], written[4:8]
    assert flags == 0 and mtime == b"\0\0\0\0", "a file name or time in the gzip header: the BIDS validator warns"
    io.save(img, tmp_path / "plain.nii")
    assert (tmp_path / "plain.nii").read_bytes() == gzip.decompress(theirs.read_bytes())


def test_contradictory_qform_sform_uses_sform(tmp_path):
    data, affine, _ = head()
    img = nifti(data, affine, dtype=np.float32, qcode=1, scode=2)
    shifted = affine.copy()
    shifted[:3, 3] += [30.0, -20.0, 10.0]
    img.header.set_qform(_oblique(shifted), 1)  # the qform says something else
    loaded, vol = io.load_image(_save(img, tmp_path / "in.nii.gz"))
    assert np.allclose(loaded.affine, affine)
    assert any("sform was used" in m for m in io.geometry_warnings(loaded))
    result = Skullstripper(networks=BlobModel()).mask(vol, loaded.affine)
    assert dice(result.mask, reference_run().mask) >= 0.999
    for out in roundtrip_outputs(loaded, result, tmp_path):
        assert_same_grid(out, loaded)  # both forms (the "wrong" qform too) are kept as they were


def test_4d_single_volume_gives_3d_outputs_on_same_grid(tmp_path):
    data, affine, _ = head()
    img = nifti(data[..., None], affine, dtype=np.int16, qcode=1, scode=1)
    loaded, vol = io.load_image(_save(img, tmp_path / "in.nii.gz"))
    assert vol.shape == data.shape
    result = Skullstripper(networks=BlobModel()).mask(vol, loaded.affine)
    for out in roundtrip_outputs(loaded, result, tmp_path):
        assert_same_grid(out, loaded, ndim=3)
        assert out.ndim == 3


DTYPES = {
    "uint8": (np.uint8, None),
    "int16": (np.int16, None),
    "uint16": (np.uint16, None),
    "int32": (np.int32, None),
    "float32": (np.float32, None),
    "float64": (np.float64, None),
    # scalings that keep the whole intensity range (scaled ints store it, they do not clip it)
    "int16-scaled": (np.int16, (0.0123, -5.0)),
    "uint8-scaled": (np.uint8, (1.1, -22.0)),
}


@pytest.mark.parametrize("name", sorted(DTYPES))
def test_dtypes(name, tmp_path):
    dtype, scaling = DTYPES[name]
    data, affine, _ = head()
    scaled = data / data.max() * (250 if dtype == np.uint8 else (300 if scaling else 3000))
    stored = scaled if np.dtype(dtype).kind == "f" else np.round(scaled)
    img = nifti(stored.astype(dtype), affine, qcode=1, scode=1)
    if scaling:
        stored = np.clip(np.round((scaled - scaling[1]) / scaling[0]), *_range(dtype))
        img = nifti(stored.astype(dtype), affine, qcode=1, scode=1)
        img.header.set_slope_inter(*scaling)
    loaded, vol = io.load_image(_save(img, tmp_path / "in.nii.gz"))
    assert vol.dtype == np.float32
    if scaling:
        assert np.allclose(vol, stored * scaling[0] + scaling[1], rtol=1e-5, atol=1e-3)
        assert np.isclose(loaded.dataobj.slope, scaling[0]) and np.isclose(loaded.dataobj.inter, scaling[1])
    result = Skullstripper(networks=BlobModel()).mask(vol, loaded.affine)
    check_result(result, vol.shape)
    assert dice(result.mask, reference_run().mask) >= 0.97, name
    mask_img, prob_img = roundtrip_outputs(loaded, result, tmp_path)
    for out in (mask_img, prob_img):
        assert_same_grid(out, loaded)
        assert out.header.get_slope_inter() == (None, None)  # input scaling not applied to outputs
    assert np.array_equal(np.asanyarray(mask_img.dataobj), result.mask)
    assert np.allclose(np.asanyarray(prob_img.dataobj), result.probability)


def _range(dtype):
    info = np.iinfo(dtype)
    return info.min, info.max


# ---------------------------------------------------------------------------------------------------
# anisotropic voxels, fields of view
def resample_to(data, affine, new_affine, new_shape, order=1):
    vox = np.linalg.inv(affine) @ new_affine
    return ndi.affine_transform(np.asarray(data, np.float32), vox[:3, :3], vox[:3, 3],
                                output_shape=tuple(int(s) for s in new_shape), order=order,
                                mode="constant", cval=0.0)


def world_box(mask, affine, margin_mm=0.0):
    idx = np.argwhere(mask)
    lo, hi = idx.min(0), idx.max(0)
    corners = np.array([[a, b, c, 1.0] for a in (lo[0], hi[0]) for b in (lo[1], hi[1]) for c in (lo[2], hi[2])])
    world = (affine @ corners.T).T[:, :3]
    return world.min(0) - margin_mm, world.max(0) + margin_mm


def grid_covering(lo, hi, rotation, voxel_mm):
    """An affine (rotation @ diag(voxel_mm)) and shape whose grid covers the world box [lo, hi]."""
    corners = np.array([[a, b, c] for a in (lo[0], hi[0]) for b in (lo[1], hi[1]) for c in (lo[2], hi[2])])
    local = corners @ rotation  # coordinates along the new axes (rotation is orthonormal)
    start, stop = local.min(0), local.max(0)
    shape = np.ceil((stop - start) / voxel_mm).astype(int) + 1
    aff = np.eye(4)
    aff[:3, :3] = rotation @ np.diag(voxel_mm)
    aff[:3, 3] = rotation @ start
    return aff, tuple(int(s) for s in shape)


def world_centroid(mask, affine):
    return (affine @ np.r_[np.argwhere(mask).mean(0), 1.0])[:3]


def assert_same_place(mask, affine, ref_mask, ref_affine, *, tol_mm=1.0):
    """A shifted or mirrored mask (the classic lost-sform bug) moves the centroid by centimetres."""
    shift = np.linalg.norm(world_centroid(mask, affine) - world_centroid(ref_mask, ref_affine))
    assert shift <= tol_mm, f"mask centroid moved by {shift:.2f} mm"


def map_back(mask, affine, ref_affine, ref_shape):
    return resample_to(mask.astype(np.float32), affine, ref_affine, ref_shape, order=1) >= 0.5


@pytest.mark.parametrize("voxel_mm,rotation_deg", [
    ((0.5, 0.5, 5.0), (0, 0, 0)),
    ((5.0, 0.5, 0.5), (0, 0, 0)),
    ((0.9, 4.0, 1.2), (10, 0, -15)),
], ids=["axial-thick", "sagittal-thick", "oblique-aniso"])
def test_anisotropic_voxels(voxel_mm, rotation_deg, tmp_path):
    data, affine, silver = head()
    ref = reference_run()
    lo, hi = world_box(data > 0.1 * data.max(), affine, margin_mm=4)
    rot = _oblique(np.eye(4), rotation_deg)[:3, :3]
    new_affine, shape = grid_covering(lo, hi, rot, np.array(voxel_mm))
    vol = resample_to(data, affine, new_affine, shape)
    img = nifti(vol, new_affine, dtype=np.float32, qcode=1, scode=1)
    loaded, v = io.load_image(_save(img, tmp_path / "in.nii"))
    result = Skullstripper(networks=BlobModel()).mask(v, loaded.affine)
    check_result(result, shape)
    for out in roundtrip_outputs(loaded, result, tmp_path):
        assert_same_grid(out, loaded)
    back = map_back(result.mask, new_affine, affine, data.shape)
    assert_same_place(result.mask, new_affine, ref.mask, affine)
    assert dice(back, ref.mask) >= (0.93 if max(voxel_mm) >= 5 else 0.95)


@pytest.mark.parametrize("shape", [(2, 2, 2), (3, 9, 4), (12, 12, 12), (64, 64, 2)])
def test_tiny_fields_of_view(shape, tmp_path):
    """A few voxels of a head (or of noise): no crash, outputs on the same grid (maybe empty)."""
    data, affine, _ = head()
    c = np.array(data.shape) // 2
    start = np.maximum(c - np.array(shape) // 2, 0)
    block = data[start[0] : start[0] + shape[0], start[1] : start[1] + shape[1], start[2] : start[2] + shape[2]]
    shift = np.eye(4)
    shift[:3, 3] = start
    img = nifti(block, affine @ shift, dtype=np.float32, qcode=1, scode=1)
    loaded, vol = io.load_image(_save(img, tmp_path / "in.nii.gz"))
    result = Skullstripper(networks=BlobModel()).mask(vol, loaded.affine)
    check_result(result, block.shape)
    for out in roundtrip_outputs(loaded, result, tmp_path):
        assert_same_grid(out, loaded)


def test_large_field_of_view_zero_padded(tmp_path):
    """The head in the corner of a 480 mm FOV (zeros around it): the same mask as the tight FOV."""
    data, affine, _ = head()
    ref = reference_run()
    big = np.zeros((240, 240, 240), np.float32)
    off = np.array([150, 20, 110])
    big[off[0] : off[0] + data.shape[0], off[1] : off[1] + data.shape[1], off[2] : off[2] + data.shape[2]] = data
    shift = np.eye(4)
    shift[:3, 3] = -off
    big_affine = affine @ shift
    img = nifti(big, big_affine, dtype=np.float32, qcode=1, scode=1)
    loaded, vol = io.load_image(_save(img, tmp_path / "in.nii"))
    result = Skullstripper(networks=BlobModel()).mask(vol, loaded.affine)
    check_result(result, big.shape)
    inner = result.mask[off[0] : off[0] + data.shape[0], off[1] : off[1] + data.shape[1],
                        off[2] : off[2] + data.shape[2]]
    assert inner.sum() >= 0.995 * result.mask.sum()  # the stand-in's blob may spill past the old FOV edge
    assert dice(inner, ref.mask) >= 0.98
    # within 1 mm, not 0.03 mm: the tight field of view ends in head voxels, which the antialiasing extends past
    # its edge ("nearest") where the big one has zeros, and the half-voxel-shifted view samples that edge
    # (padded with zeros, the tight head gives the big one's mask to 0.03 mm)
    assert_same_place(result.mask, big_affine, ref.mask, affine, tol_mm=1.0)
    for out in roundtrip_outputs(loaded, result, tmp_path):
        assert_same_grid(out, loaded)


@pytest.mark.skipif(not FULL, reason="slow (~30 s): set BIDS_SKULLSTRIP_FULL_TESTS=1")
def test_fine_voxels_large_image():
    """0.8 mm isotropic over the whole head (~14 M voxels): the same mask as at 2 mm."""
    data, affine, _ = head()
    ref = reference_run()
    lo, hi = world_box(data > 0.1 * data.max(), affine, margin_mm=2)
    new_affine, shape = grid_covering(lo, hi, np.eye(3), np.array([0.8, 0.8, 0.8]))
    vol = resample_to(data, affine, new_affine, shape)
    result = Skullstripper(networks=BlobModel()).mask(vol, new_affine)
    check_result(result, shape)
    assert_same_place(result.mask, new_affine, ref.mask, affine)
    back = map_back(result.mask, new_affine, affine, data.shape)
    assert dice(back, ref.mask) >= 0.95


# ---------------------------------------------------------------------------------------------------
# property: arbitrary rotation + resampling of a real head
@st.composite
def random_grids(draw):
    q = np.array([draw(st.floats(-1, 1)) for _ in range(4)])
    if np.linalg.norm(q) < 1e-3:
        q = np.array([1.0, 0, 0, 0])
    a, b, c, d = q / np.linalg.norm(q)
    rot = np.array([[a * a + b * b - c * c - d * d, 2 * (b * c - a * d), 2 * (b * d + a * c)],
                    [2 * (b * c + a * d), a * a - b * b + c * c - d * d, 2 * (c * d - a * b)],
                    [2 * (b * d - a * c), 2 * (c * d + a * b), a * a - b * b - c * c + d * d]])
    if draw(st.booleans()):
        rot[:, 0] *= -1  # a left-handed voxel grid (det < 0), as most radiological files are
    voxel = np.array([draw(st.sampled_from([1.2, 1.5, 2.0, 2.5, 3.0])) for _ in range(3)])
    margin = draw(st.sampled_from([4.0, 15.0, 40.0]))
    return rot, voxel, margin


# derandomize: CI sees the same examples every run; BIDS_SKULLSTRIP_FULL_TESTS=1 explores more of them.
@settings(max_examples=8 if not FULL else 60, deadline=None, database=None, derandomize=not FULL,
          suppress_health_check=[HealthCheck.too_slow])
@given(random_grids())
def test_property_arbitrary_reorient_resample(grid):
    rot, voxel, margin = grid
    data, affine, _ = head()
    ref = reference_run()
    lo, hi = world_box(data > 0.1 * data.max(), affine, margin_mm=margin)
    new_affine, shape = grid_covering(lo, hi, rot, voxel)
    vol = resample_to(data, affine, new_affine, shape)
    result = Skullstripper(networks=BlobModel()).mask(vol, new_affine)
    check_result(result, shape)
    assert_same_place(result.mask, new_affine, ref.mask, affine)
    back = map_back(result.mask, new_affine, affine, data.shape)
    assert dice(back, ref.mask) >= 0.95, (voxel, margin)


@settings(max_examples=4 if not FULL else 30, deadline=None, database=None, derandomize=not FULL,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(random_grids())
def test_property_arbitrary_reorient_resample_real_model(real_model, grid):
    rot, voxel, margin = grid
    data, affine, silver = head()
    ref = reference_run(model_kind="real")
    lo, hi = world_box(data > 0.1 * data.max(), affine, margin_mm=margin)
    new_affine, shape = grid_covering(lo, hi, rot, voxel)
    vol = resample_to(data, affine, new_affine, shape)
    result = Skullstripper(networks=real_model).mask(vol, new_affine)
    # A learned network is not exactly rotation-invariant (seen: 1.2 mm at a 59 degree tilt); the bugs this
    # guards against (lost sform, flipped axis) move the mask by centimetres.
    assert_same_place(result.mask, new_affine, ref.mask, affine, tol_mm=3.0)
    back = map_back(result.mask, new_affine, affine, data.shape)
    assert dice(back, ref.mask) >= 0.95, (voxel, margin)
    assert dice(back, silver) >= 0.85
