#!/usr/bin/env python3
"""Generate the small, redistributable sample BIDS dataset ``data/sample_bids``.

The heads come only from Debian packages whose licences allow redistribution:

* ``mricron-data``: the Colin27 single-subject head ``ch2.nii.gz``
  (BSD-3-Clause per /usr/share/doc/mricron-data/copyright).
* ``insighttoolkit4-examples``: the 3D T1-weighted head
  ``KmeansTest_T1UCharRaw.nii.gz`` (Apache-2.0 per
  /usr/share/doc/insighttoolkit4-examples/copyright).

Each image is resampled (trilinear, scipy.ndimage) onto a new voxel grid with its
own orientation, voxel size, field of view, obliquity and data type, so that the
dataset exercises the input-handling paths of a BIDS App. The output is fully
deterministic: no random numbers are used and every ``.nii.gz`` is gzipped with
``mtime=0`` and no embedded file name, so re-running gives byte-identical files.

Usage::

    apt-get install mricron-data insighttoolkit4-examples
    python data/make_sample_bids.py [--out data/sample_bids]

Only the standard library, numpy, scipy and nibabel are used.
"""
from __future__ import annotations

import argparse
import gzip
import json
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "data" / "sample_bids"

COLIN_PKG = "mricron-data"
COLIN_CANDIDATES = [
    Path("/usr/share/mricron/templates/ch2.nii.gz"),
    Path("/usr/share/mricron/ch2.nii.gz"),
    Path("/usr/share/mricron-data/templates/ch2.nii.gz"),
]
COLIN_COPYRIGHT = Path("/usr/share/doc/mricron-data/copyright")

ITK_PKG = "insighttoolkit4-examples"
ITK_CANDIDATES = [
    Path("/usr/share/doc/insighttoolkit4-examples/examples/Data/KmeansTest_T1UCharRaw.nii.gz"),
]
ITK_COPYRIGHT = Path("/usr/share/doc/insighttoolkit4-examples/copyright")

BIDS_VERSION = "1.10.0"

# Orientation letter -> world (RAS+) unit vector.
_AXIS_VEC = {
    "R": (1, 0, 0), "L": (-1, 0, 0),
    "A": (0, 1, 0), "P": (0, -1, 0),
    "S": (0, 0, 1), "I": (0, 0, -1),
}


class MissingSourceError(RuntimeError):
    """A Debian package that provides a source head is not installed."""


def find_source(candidates: list[Path], pkg: str) -> Path:
    for path in candidates:
        if path.is_file():
            return path
    raise MissingSourceError(
        f"{candidates[0].name} not found: Debian package '{pkg}' is not installed; "
        f"run: apt-get update && apt-get install -y {COLIN_PKG} {ITK_PKG}"
    )


# --------------------------------------------------------------------------- geometry

def rotation(deg_x: float = 0.0, deg_y: float = 0.0, deg_z: float = 0.0) -> np.ndarray:
    """World-space rotation Rz @ Ry @ Rx (degrees)."""
    ax, ay, az = np.deg2rad([deg_x, deg_y, deg_z])
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def head_points(data: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """World coordinates (N, 3) of the surface voxels of the head, i.e. of the
    largest connected non-zero component (both sources have an exactly zero
    background), pushed out by half a source-voxel diagonal so that the whole
    extent of every head voxel is covered."""
    mask = data > 0
    labels, n = ndimage.label(mask)
    if n > 1:
        sizes = np.bincount(labels.ravel())
        sizes[0] = 0
        mask = labels == int(np.argmax(sizes))
    surface = mask & ~ndimage.binary_erosion(mask)
    ijk = np.argwhere(surface).astype(float)
    centre = ijk.mean(0)
    # push each point half a voxel outward along every axis (towards the outside)
    ijk += 0.5 * np.sign(ijk - centre)
    return nib.affines.apply_affine(affine, ijk)


def grid_for(points: np.ndarray, axcodes: str, zooms, rot: np.ndarray, pad_lo, pad_hi):
    """Build (shape, affine) of a grid with the given axis codes / voxel sizes and
    world rotation that contains ``points`` plus per-axis padding (mm) at the
    low-index end (``pad_lo``) and high-index end (``pad_hi``)."""
    zooms = np.asarray(zooms, float)
    dirs = np.array([_AXIS_VEC[c] for c in axcodes], float).T  # columns = axis directions
    basis = rot @ dirs  # world direction of each voxel axis (unit vectors)
    coords = points @ basis  # mm along each voxel axis
    lo = coords.min(0) - np.asarray(pad_lo, float)
    hi = coords.max(0) + np.asarray(pad_hi, float)
    shape = np.ceil((hi - lo) / zooms).astype(int) + 1
    # Centre the grid on the (padded) extent.
    centre_mm = (lo + hi) / 2.0
    origin_mm = centre_mm - zooms * (shape - 1) / 2.0
    affine = np.eye(4)
    affine[:3, :3] = basis * zooms
    affine[:3, 3] = basis @ origin_mm
    return tuple(int(s) for s in shape), affine


def resample(data: np.ndarray, src_affine: np.ndarray, shape, dst_affine: np.ndarray) -> np.ndarray:
    """Trilinear resampling of ``data`` onto the destination grid (zeros outside)."""
    vox2vox = np.linalg.inv(src_affine) @ dst_affine
    return ndimage.affine_transform(
        data.astype(np.float32), vox2vox[:3, :3], offset=vox2vox[:3, 3],
        output_shape=tuple(shape), order=1, mode="constant", cval=0.0,
        output=np.float32,
    )


def bias_field(shape, affine, direction, strength: float) -> np.ndarray:
    """Smooth multiplicative field 1 +/- strength varying linearly (then tapered by a
    cosine) along a world direction, mimicking receive-coil inhomogeneity."""
    ijk = np.indices(shape, dtype=np.float32).reshape(3, -1).T
    xyz = nib.affines.apply_affine(affine, ijk)
    d = np.asarray(direction, float)
    d /= np.linalg.norm(d)
    t = xyz @ d
    t = (t - t.min()) / max(t.max() - t.min(), 1e-6)  # 0..1
    return (1.0 + strength * np.sin(np.pi * (t - 0.5))).reshape(shape).astype(np.float32)


# --------------------------------------------------------------------------- writing

def cast(data: np.ndarray, dtype) -> np.ndarray:
    dtype = np.dtype(dtype)
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        return np.clip(np.rint(data), info.min, info.max).astype(dtype)
    # float: quantise to 1/4 so low mantissa bits are zero (compresses much
    # better, still non-integer data)
    return (np.rint(data * 4.0) / 4.0).astype(dtype)


def save_nifti(path: Path, data: np.ndarray, affine: np.ndarray, descrip: str) -> None:
    img = nib.Nifti1Image(data, affine)
    hdr = img.header
    hdr.set_data_dtype(data.dtype)
    hdr.set_xyzt_units("mm", "sec")
    img.set_qform(affine, code=1)  # scanner
    img.set_sform(affine, code=1)  # scanner
    hdr["descrip"] = descrip.encode("ascii")[:79]
    hdr["aux_file"] = b""
    if data.dtype.kind in "iu":
        hdr["cal_min"], hdr["cal_max"] = 0, 0
    raw = img.to_bytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    # mtime=0 and no file name in the gzip header -> byte-identical re-runs.
    path.write_bytes(gzip.compress(raw, compresslevel=9, mtime=0))


def write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


# --------------------------------------------------------------------------- cases

# Each case: source head, BIDS path stem, target axis codes / voxel size / dtype,
# obliquity, padding and intensity treatment.
CASES = [
    dict(
        stem="sub-01/ses-1/anat/sub-01_ses-1_T1w",
        source="colin",
        axcodes="RAS", zooms=(1.0, 1.0, 1.0), rot=(0, 0, 0),
        pad_lo=(3, 3, 2), pad_hi=(3, 3, 6),
        dtype="uint8", scale=1.0, bias=None,
        what="Colin27 head, 1 mm isotropic, RAS, uint8, axis-aligned, tight field of view.",
    ),
    dict(
        stem="sub-01/ses-2/anat/sub-01_ses-2_acq-oblique_T1w",
        source="colin",
        axcodes="LAS", zooms=(1.2, 1.2, 1.2), rot=(12.0, 0.0, 5.0),
        pad_lo=(20, 14, 30), pad_hi=(20, 24, 12),
        dtype="int16", scale=1.0, bias=((0.3, 1.0, 0.6), 0.12),
        what=("Colin27 head, 1.2 mm isotropic, LAS, int16, oblique (12 deg about the "
              "left-right axis, then 5 deg about the inferior-superior axis), smooth "
              "+/-12 % intensity inhomogeneity, generous asymmetric padding."),
    ),
    dict(
        stem="sub-02/anat/sub-02_T1w",
        source="itk", snap=True,
        axcodes="LSA", zooms=(2.0, 2.0, 3.0), rot=(0, 0, 0),
        pad_lo=(8, 8, 9), pad_hi=(8, 8, 9),
        dtype="int16", scale=1.0, bias=None,
        what=("ITK KmeansTest T1 head on its native voxel grid (2 x 2 x 3 mm, coronal "
              "slices, LSA axis order), original intensities, int16; only re-centred, "
              "cropped to the head and zero-padded (no interpolation)."),
    ),
    dict(
        stem="sub-03/anat/sub-03_run-1_T1w",
        source="itk",
        axcodes="PSR", zooms=(2.0, 2.0, 2.0), rot=(0, 0, 0),
        pad_lo=(3, 2, 3), pad_hi=(3, 3, 3),
        dtype="float32", scale=1000.0 / 255.0, bias=((0.0, 0.0, 1.0), 0.08),
        what=("ITK KmeansTest T1 head resampled to 2 mm isotropic, PSR axis order "
              "(sagittal slices), float32 (0-1000 range, non-integer values), tight field "
              "of view, +/-8 % inferior-superior inhomogeneity."),
    ),
]


# Source metadata (for sidecars). Colin27: Holmes et al. 1998, 27 scans of one
# healthy male on a 1.5 T Philips scanner. The ITK example's acquisition is not
# documented, so no scanner fields are claimed for it.
SIDECARS = {
    "colin": {
        "MagneticFieldStrength": 1.5,
        "Manufacturer": "Philips",
    },
    "itk": {},
}


def load_sources():
    colin_path = find_source(COLIN_CANDIDATES, COLIN_PKG)
    sources = {}
    img = nib.load(str(colin_path))
    sources["colin"] = dict(
        path=colin_path,
        data=np.asanyarray(img.dataobj).astype(np.float32),
        affine=img.affine,
    )
    # Both heads are required so that the dataset is always the same.
    itk_path = find_source(ITK_CANDIDATES, ITK_PKG)
    if itk_path is not None:
        img = nib.load(str(itk_path))
        data = np.asanyarray(img.dataobj).astype(np.float32)
        # The file's affine puts the head far from the world origin (origin at a
        # corner, 254 mm off); re-centre it so the head is near (0, 0, 0) like a
        # scanner-space image, keeping the orientation and voxel size.
        aff = img.affine.copy()
        centre = nib.affines.apply_affine(aff, (np.array(data.shape) - 1) / 2.0)
        aff[:3, 3] -= centre
        sources["itk"] = dict(path=itk_path, data=data, affine=aff)
    return sources


def make_images(out: Path, sources) -> list[dict]:
    made = []
    for case in CASES:
        if case["source"] not in sources:
            print(f"skipping {case['stem']}: {ITK_PKG} not installed", file=sys.stderr)
            continue
        src = sources[case["source"]]
        pts = head_points(src["data"], src["affine"])
        shape, affine = grid_for(pts, case["axcodes"], case["zooms"], rotation(*case["rot"]),
                                 case["pad_lo"], case["pad_hi"])
        if case.get("snap"):
            # Shift the grid by < 1 voxel so it coincides with the source grid:
            # resampling is then an exact crop/pad of the original voxels.
            vox2vox = np.linalg.inv(src["affine"]) @ affine
            vox2vox[:3, 3] = np.rint(vox2vox[:3, 3])
            affine = src["affine"] @ vox2vox
        vol = resample(src["data"], src["affine"], shape, affine)
        vol *= np.float32(case["scale"])
        if case["bias"] is not None:
            direction, strength = case["bias"]
            vol *= bias_field(shape, affine, direction, strength)
        vol = cast(vol, case["dtype"])
        nii = out / f"{case['stem']}.nii.gz"
        save_nifti(nii, vol, affine, f"bids_skullstrip sample: {src['path'].name} resampled")
        sidecar = dict(SIDECARS[case["source"]])
        write_json(out / f"{case['stem']}.json", sidecar)
        made.append(dict(case=case, path=nii, shape=shape, affine=affine, dtype=vol.dtype))
    return made


# --------------------------------------------------------------------------- metadata

def copyright_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except OSError:
        return f"(copyright file {path} not available when this dataset was generated)\n"


def debian_version(pkg: str) -> str | None:
    """Installed version of a Debian package, or None if dpkg-query is unavailable."""
    try:
        res = subprocess.run(["dpkg-query", "-W", "-f=${Version}", pkg],
                             capture_output=True, text=True, check=False)
    except OSError:
        return None
    return res.stdout.strip() or None


def source_datasets(have_itk: bool) -> list[dict]:
    out = []
    for pkg in [COLIN_PKG] + ([ITK_PKG] if have_itk else []):
        entry = {"URL": f"https://packages.debian.org/{pkg}"}
        version = debian_version(pkg)
        if version:
            entry["Version"] = version
        out.append(entry)
    return out


def write_metadata(out: Path, made: list[dict], have_itk: bool) -> None:
    refs = [
        "Holmes CJ, Hoge R, Collins L, Woods R, Toga AW, Evans AC (1998). Enhancement of "
        "MR images using registration for signal averaging. J Comput Assist Tomogr "
        "22(2):324-333. (Colin27 head, distributed as ch2.nii.gz in MRIcron / Debian "
        "package mricron-data)",
        "MRIcron, Chris Rorden: https://github.com/neurolabusc/MRIcron",
    ]
    if have_itk:
        refs.append(
            "Insight Toolkit (ITK) example data KmeansTest_T1UCharRaw.nii.gz, Insight Software "
            "Consortium, Apache-2.0 (Debian package insighttoolkit4-examples): https://itk.org"
        )
    licence = "BSD-3-Clause AND Apache-2.0" if have_itk else "BSD-3-Clause"
    write_json(out / "dataset_description.json", {
        "Name": "bids_skullstrip sample dataset (redistributable template-derived T1w heads)",
        "BIDSVersion": BIDS_VERSION,
        "DatasetType": "raw",
        "License": licence,
        "Authors": [
            "bids_skullstrip developers",
            "Colin J. Holmes et al. (Colin27 source head)",
            "Chris Rorden (MRIcron distribution of Colin27)",
        ] + (["Insight Software Consortium (ITK example head)"] if have_itk else []),
        "HowToAcknowledge": (
            "These images are resampled copies of publicly redistributable heads: cite "
            "Holmes et al. 1998 for Colin27 (via MRIcron/mricron-data, BSD-3-Clause)"
            + (" and acknowledge the Insight Toolkit (ITK) example data (Apache-2.0)" if have_itk else "")
            + ". See LICENSE and README."
        ),
        "ReferencesAndLinks": refs,
        "SourceDatasets": source_datasets(have_itk),
        "GeneratedBy": [{
            "Name": "make_sample_bids.py",
            "Description": "Resamples Debian-packaged template heads onto varied voxel grids "
                           "(see README); part of the bids_skullstrip repository.",
        }],
    })

    subjects = sorted({m["case"]["stem"].split("/")[0] for m in made})
    source_of = {}
    for m in made:
        source_of[m["case"]["stem"].split("/")[0]] = m["case"]["source"]
    rows = ["participant_id\tsex\tsource_head"]
    for sub in subjects:
        if source_of[sub] == "colin":
            rows.append(f"{sub}\tM\tColin27")
        else:
            rows.append(f"{sub}\tn/a\tITK_KmeansTest_T1")
    write_text(out / "participants.tsv", "\n".join(rows) + "\n")
    write_json(out / "participants.json", {
        "sex": {
            "Description": "sex of the person whose head the images were derived from",
            "Levels": {"M": "male", "F": "female"},
        },
        "source_head": {
            "Description": "which redistributable source head the images were resampled from "
                           "(several participants may share the same real person)",
            "Levels": {
                "Colin27": "Colin27 single-subject average (ch2.nii.gz, Debian mricron-data)",
                "ITK_KmeansTest_T1": "ITK example KmeansTest_T1UCharRaw.nii.gz "
                                     "(Debian insighttoolkit4-examples)",
            },
        },
    })

    table = ["| file | source | shape | voxel size (mm) | orientation | dtype | notes |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for m in made:
        zooms = np.sqrt((m["affine"][:3, :3] ** 2).sum(0))
        table.append(
            f"| `{m['case']['stem']}.nii.gz` | {m['case']['source']} | "
            f"{' x '.join(map(str, m['shape']))} | {' x '.join(f'{z:g}' for z in zooms)} | "
            f"{''.join(nib.aff2axcodes(m['affine']))} | {m['dtype']} | {m['case']['what']} |"
        )

    itk_para = (
        "* **ITK KmeansTest T1** (`KmeansTest_T1UCharRaw.nii.gz`, shipped by the Debian package\n"
        "  `insighttoolkit4-examples`, Apache-2.0, Copyright 1999-2011 Insight Software\n"
        "  Consortium): a real 3D T1-weighted head scan at 2 x 2 x 3 mm used as ITK example data.\n"
        "  Its acquisition parameters are not documented, so its sidecars claim none.\n"
        if have_itk else ""
    )
    readme = f"""# bids_skullstrip sample dataset

A tiny BIDS dataset for testing and demonstrating the `bids_skullstrip` BIDS App.
**The images are not original acquisitions.** Every T1w image was derived from a
publicly redistributable head image by resampling it onto a new voxel grid, to give
the app realistic variety in orientation, voxel size, obliquity, field of view and
data type. Several "participants" are the same real person (see `participants.tsv`,
column `source_head`). Do not use this dataset for any scientific purpose.

## Sources

* **Colin27** (`ch2.nii.gz`, shipped by the Debian package `mricron-data`; the Debian
  copyright file lists MRIcron's files, including this template, under BSD-3-Clause,
  Copyright 2006-2010 Chris Rorden): the average of 27 T1-weighted 1.5 T scans of one
  healthy male (Holmes et al., 1998, J Comput Assist Tomogr 22(2):324-333), 1 mm
  isotropic, already in MNI-like space. Sidecar values `MagneticFieldStrength` (1.5) and
  `Manufacturer` (Philips) describe those original scans.
{itk_para}
See `LICENSE` for the full licence texts and copyright notices.

## How the images were made

`data/make_sample_bids.py` in the bids_skullstrip repository (stdlib + numpy + scipy +
nibabel) builds, for each image, a target grid with the given axis order, voxel size and
rotation that contains the whole head (all non-zero source voxels) plus some padding,
resamples the source with trilinear interpolation (`scipy.ndimage.affine_transform`,
zero outside the source), optionally scales the intensities and multiplies by a smooth
synthetic intensity inhomogeneity, and stores the result with the stated data type.
qform and sform are both set to the same affine with code 1 (scanner). No random numbers
are used; `.nii.gz` files are gzipped with mtime 0, so re-running the script gives
identical files. Regenerate with:

    apt-get install mricron-data insighttoolkit4-examples
    python data/make_sample_bids.py --out data/sample_bids

## Images

{chr(10).join(table)}
"""
    write_text(out / "README", readme)

    def subs_of(source: str) -> str:
        return ", ".join(sorted({m["case"]["stem"].split("/")[0] for m in made
                                 if m["case"]["source"] == source}))

    colin_notice = copyright_text(COLIN_COPYRIGHT)
    parts = [
        "Licences of the images in this dataset\n"
        "=======================================\n\n"
        "The images are derived (resampled) works of the source heads below; each keeps its\n"
        "source's licence. This dataset as a whole: " + licence + ".\n\n",
        f"1. Colin27 head (ch2.nii.gz) -- used for {subs_of('colin')}\n"
        "------------------------------------------------------------\n"
        "Taken from the Debian package mricron-data. Upstream: MRIcron by Chris Rorden.\n"
        "Colin27 itself: Holmes CJ et al. (1998) J Comput Assist Tomogr 22(2):324-333,\n"
        "Montreal Neurological Institute.\n"
        "The package's copyright file (/usr/share/doc/mricron-data/copyright) states\n"
        "\"Files: * / Copyright: Copyright 2006-2010, Chris Rorden / License: BSD-3-clause\".\n"
        "Verbatim copy of that copyright file follows.\n\n",
        colin_notice.rstrip("\n") + "\n\n",
    ]
    if have_itk:
        parts += [
            f"2. ITK example head (KmeansTest_T1UCharRaw.nii.gz) -- used for {subs_of('itk')}\n"
            "-----------------------------------------------------------------------\n"
            "Taken from the Debian package insighttoolkit4-examples (examples/Data).\n"
            "The package's copyright file (/usr/share/doc/insighttoolkit4-examples/copyright)\n"
            "states for these files:\n\n"
            "  Files: *\n"
            "  Copyright: Copyright 1999-2011 Insight Software Consortium\n"
            "  License: Apache-2.0\n\n"
            "(Its header note that Debian's ITK *binaries* are GPL because they link FFTW does\n"
            "not concern these data files.)\n\n"
            "Licensed under the Apache License, Version 2.0 (the \"License\"); you may not use\n"
            "this file except in compliance with the License. You may obtain a copy of the\n"
            "License at\n\n"
            "    http://www.apache.org/licenses/LICENSE-2.0\n\n"
            "Unless required by applicable law or agreed to in writing, software distributed\n"
            "under the License is distributed on an \"AS IS\" BASIS, WITHOUT WARRANTIES OR\n"
            "CONDITIONS OF ANY KIND, either express or implied. See the License for the\n"
            "specific language governing permissions and limitations under the License.\n\n"
            "Modification notice: the image was re-centred, cropped/zero-padded, resampled\n"
            "and re-stored as NIfTI (see README) by make_sample_bids.py (bids_skullstrip).\n",
        ]
    write_text(out / "LICENSE", "".join(parts))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT,
                    help=f"output BIDS directory (default: {DEFAULT_OUT.relative_to(REPO_ROOT)})")
    args = ap.parse_args(argv)
    try:
        sources = load_sources()
    except MissingSourceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    out = args.out
    if out.exists():
        # Only ever remove something that looks like a dataset we made.
        if not (out / "dataset_description.json").is_file() and any(out.iterdir()):
            print(f"error: {out} exists and is not a BIDS dataset; refusing to overwrite",
                  file=sys.stderr)
            return 1
        shutil.rmtree(out)
    out.mkdir(parents=True)
    made = make_images(out, sources)
    write_metadata(out, made, have_itk="itk" in sources)
    total = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    for m in made:
        print(f"{m['path'].relative_to(out)}  {m['shape']}  "
              f"{''.join(nib.aff2axcodes(m['affine']))}  {m['dtype']}")
    print(f"wrote {out} ({total / 1e6:.2f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
