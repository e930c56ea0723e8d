"""Report figures: a slice mosaic of the T1w with the brain-mask contour and the uncertain probability band.

Images are reoriented to RAS for display only, so every figure reads the same way whatever the voxel order of
the input: neurological convention (subject's left on the left of axial and coronal views; anterior up in axial
views, superior up in coronal and sagittal views, anterior to the right in sagittal views), labelled L/R, P/A.

SVG figures are written directly (one small 8-bit palette PNG per panel + simplified vector contours) to keep
them small (typically 100-250 kB for 18 panels); the group thumbnails are PNGs drawn with matplotlib (Agg).
"""

import base64
import io
from pathlib import Path
from xml.sax.saxutils import escape

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402 (a matplotlib dependency)
from scipy import ndimage as ndi  # noqa: E402

from ..nifti import atomic_file  # noqa: E402

MASK_COLOR = "#ff3b30"
BAND_RGB = (255, 204, 0)
BAND_ALPHA = 0.45
N_CUTS = 6
MARGIN_MM = 12.0
PX_PER_MM = 1.0  # SVG user units per mm (the SVG scales; raster resolution stays native)
GRAY_LEVELS = 64  # palette: 0..63 gray, 64..127 the same grays blended with the band colour
MAX_PIXELS = 360_000  # raster budget of a whole mosaic (panels are downsampled beyond it)
MAX_SVG_BYTES = 290_000  # an SVG larger than this is redone with a smaller raster budget

# row order and the RAS axis each row cuts: axial (z), coronal (y), sagittal (x)
ROWS = (("axial", 2), ("coronal", 1), ("sagittal", 0))
SIDE_LABELS = {2: ("L", "R"), 1: ("L", "R"), 0: ("P", "A")}


def _load_ras(path):
    img = nib.as_closest_canonical(nib.load(str(path)))
    data = np.asarray(img.dataobj, dtype=np.float32)
    if data.ndim == 4:
        data = data[..., 0]
    return data, np.asarray(img.header.get_zooms()[:3], dtype=float)


def _window(t1, mask):
    """Display window: dark end at the darkest brain tissue (hides background noise), bright end at 99.5 %."""
    if mask is not None and mask.sum() > 100:
        vals = t1[mask]
        lo, hi = np.percentile(vals, [0.5, 99.5])
        # dark end: hide background noise (also when a bad mask includes background); keep WM unsaturated
        lo = max(0.8 * lo, 0.12 * float(np.median(vals)))
        hi = lo + 1.15 * (hi - lo)
    else:
        vals = t1[t1 > np.percentile(t1, 50)]
        lo, hi = np.percentile(vals if vals.size else t1, [1, 99.5])
    return float(lo), float(hi if hi > lo else lo + 1)


def _crop(mask, zooms, shape):
    """Bounding box (slices) of the mask + margin, or the whole image."""
    if mask is None or not mask.any():
        return tuple(slice(0, n) for n in shape)
    out = []
    for a in range(3):
        idx = np.nonzero(mask.any(axis=tuple(b for b in range(3) if b != a)))[0]
        m = int(np.ceil(MARGIN_MM / zooms[a]))
        out.append(slice(max(0, int(idx[0]) - m), min(shape[a], int(idx[-1]) + m + 1)))
    return tuple(out)


def _cuts(mask, axis, n, size):
    """n slice indices spread over the mask's extent along ``axis`` (the extreme tips are skipped)."""
    if mask is not None and mask.any():
        idx = np.nonzero(mask.any(axis=tuple(b for b in range(3) if b != axis)))[0]
        lo, hi = int(idx[0]), int(idx[-1])
    else:
        lo, hi = 0, size - 1
    # one cut: through the middle of the brain, where its contour says most (not near its edge)
    return [int(round(lo + (hi - lo) * f)) for f in ([0.5] if n == 1 else np.linspace(0.12, 0.88, n))]


def _slice(vol, axis, k):
    """2D slice, rows = vertical display axis from bottom (row 0) to top, columns = horizontal axis."""
    if axis == 2:
        return vol[:, :, k].T
    if axis == 1:
        return vol[:, k, :].T
    return vol[k, :, :].T


def _rdp(points, tol):
    """Ramer-Douglas-Peucker simplification of a polyline (N, 2)."""
    if len(points) < 3:
        return points
    keep = np.zeros(len(points), bool)
    keep[0] = keep[-1] = True
    stack = [(0, len(points) - 1)]
    while stack:
        i, j = stack.pop()
        if j <= i + 1:
            continue
        a, b = points[i], points[j]
        seg = b - a
        norm = np.hypot(*seg)
        rel = points[i + 1:j] - a
        if norm == 0:
            d = np.hypot(rel[:, 0], rel[:, 1])
        else:
            d = np.abs(seg[0] * rel[:, 1] - seg[1] * rel[:, 0]) / norm
        k = int(np.argmax(d))
        if d[k] > tol:
            keep[i + 1 + k] = True
            stack += [(i, i + 1 + k), (i + 1 + k, j)]
    return points[keep]


def _contours(m2d, dx, dy, tol_mm):
    """Mask contour lines (list of (N, 2) arrays in mm, y up) of a 2D binary slice."""
    import contourpy  # a matplotlib dependency

    if not m2d.any() or m2d.all():
        return []
    ny, nx = m2d.shape
    gen = contourpy.contour_generator((np.arange(nx) + 0.5) * dx, (np.arange(ny) + 0.5) * dy,
                                      m2d.astype(np.float32), line_type="Separate")
    return [_rdp(line, tol_mm) for line in gen.lines(0.5) if len(line) >= 3]


def _load_all(t1w_path, mask_path, prob_path):
    t1, zooms = _load_ras(t1w_path)
    mask = _load_ras(mask_path)[0] > 0 if mask_path else None
    prob = _load_ras(prob_path)[0] if prob_path else None
    return t1, zooms, mask, prob


def _panels(volumes, n_cuts, max_pixels=MAX_PIXELS):
    t1, zooms, mask, prob = volumes
    for name, arr in (("mask", mask), ("probability", prob)):
        if arr is not None and arr.shape != t1.shape:
            raise ValueError(f"{name} grid {arr.shape} differs from the T1w grid {t1.shape}")
    lo, hi = _window(t1, mask)
    box = _crop(mask, zooms, t1.shape)
    # Downsample the rasters (not the contours) when the mosaic would exceed the pixel budget.
    sizes = [t1[box].shape[a] for a in range(3)]
    total = n_cuts * (sizes[0] * sizes[1] + sizes[0] * sizes[2] + sizes[1] * sizes[2])
    factor = min(1.0, float(np.sqrt(max_pixels / max(total, 1))))
    rows = []
    for name, axis in ROWS:
        h_axes = [a for a in range(3) if a != axis]  # (horizontal, vertical) RAS axes of the slice
        dx, dy = zooms[h_axes[0]], zooms[h_axes[1]]
        cut_box = tuple(box[a] for a in h_axes)
        panels = []
        for k in _cuts(mask, axis, n_cuts, t1.shape[axis]):
            g = _slice(t1, axis, k)[cut_box[1], cut_box[0]]
            h_mm, w_mm = g.shape[0] * dy, g.shape[1] * dx  # physical size, whatever the raster size
            band = None
            if prob is not None:
                p = _slice(prob, axis, k)[cut_box[1], cut_box[0]]
                band = (p > 0.1) & (p < 0.9)
            if factor < 1:
                g = ndi.zoom(g, factor, order=1)
                if band is not None:
                    band = ndi.zoom(band.astype(np.uint8), np.divide(g.shape, band.shape), order=0) > 0
            gray = np.clip((g - lo) / (hi - lo), 0, 1)
            idx = np.round(gray * (GRAY_LEVELS - 1)).astype(np.uint8)
            lines, brain = [], None
            if mask is not None:
                m = _slice(mask, axis, k)[cut_box[1], cut_box[0]]
                lines = _contours(m, dx, dy, tol_mm=0.35 * min(dx, dy))
                inside = m if factor >= 1 else ndi.zoom(m.astype(np.uint8), np.divide(idx.shape, m.shape), order=0) > 0
                brain = np.where(inside, idx, 0).astype(np.uint8)  # the skull-stripped image, same raster
            if band is not None:
                idx[band] += GRAY_LEVELS
            panels.append({"index": idx, "brain": brain, "lines": lines, "w_mm": w_mm, "h_mm": h_mm,
                           "cut": int(k)})
        rows.append({"name": name, "axis": axis, "panels": panels})
    return rows


def _palette():
    pal = []
    for band in (False, True):
        for i in range(GRAY_LEVELS):
            v = i * 255.0 / (GRAY_LEVELS - 1)
            rgb = [v, v, v]
            if band:
                rgb = [(1 - BAND_ALPHA) * v + BAND_ALPHA * c for c in BAND_RGB]
            pal += [int(round(c)) for c in rgb]
    return pal


def _png_bytes(index):
    im = Image.fromarray(np.ascontiguousarray(index[::-1]), mode="P")  # row 0 = top in PNG
    im.putpalette(_palette())
    buf = io.BytesIO()
    im.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def _fmt(v):
    return f"{v:.1f}".rstrip("0").rstrip(".")


def _write_svg(rows, out, title, *, skull_stripped=False):
    """Every row is scaled to the same width (rows of one figure then differ in mm per unit, as in
    fMRIPrep's mosaics); all coordinates in SVG user units. ``skull_stripped``: the brain alone, without
    contour or band, on exactly the same layout (the report shows one over the other)."""
    gap = 2.0
    width = 900.0
    title_h = 16.0 if title else 0.0
    layout = []
    for r in rows:
        row_mm = sum(p["w_mm"] for p in r["panels"])
        scale = (width - gap * (len(r["panels"]) - 1)) / row_mm  # units per mm in this row
        layout.append((scale, max(p["h_mm"] for p in r["panels"]) * scale))
    height = title_h + sum(h for _, h in layout) + gap * (len(rows) - 1)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {_fmt(width)} {_fmt(height)}" '
             f'width="{_fmt(width)}" height="{_fmt(height)}" font-family="sans-serif">',
             '<rect width="100%" height="100%" fill="black"/>']
    if title:
        parts.append(f'<text x="{_fmt(width / 2)}" y="12" fill="white" font-size="11" '
                     f'text-anchor="middle">{escape(title)}</text>')
    y0 = title_h
    for r, (s, row_h) in zip(rows, layout):
        x0 = 0.0
        for i, p in enumerate(r["panels"]):
            w, h = p["w_mm"] * s, p["h_mm"] * s
            top = y0 + (row_h - h) / 2
            data = base64.b64encode(_png_bytes(p["brain" if skull_stripped else "index"])).decode("ascii")
            parts.append(f'<g><title>{r["name"]} slice {p["cut"]}</title>'
                         f'<image x="{_fmt(x0)}" y="{_fmt(top)}" width="{_fmt(w)}" height="{_fmt(h)}" '
                         f'preserveAspectRatio="none" href="data:image/png;base64,{data}"/>')
            if p["lines"] and not skull_stripped:
                d = []
                for line in p["lines"]:
                    pts = np.round(np.c_[x0 + line[:, 0] * s, top + h - line[:, 1] * s], 1)
                    rel = np.round(np.diff(pts, axis=0), 1)
                    d.append(f"M{_fmt(pts[0, 0])} {_fmt(pts[0, 1])}l"
                             + " ".join(f"{_fmt(a)} {_fmt(b)}" for a, b in rel))
                parts.append(f'<path d="{"".join(d)}" fill="none" stroke="{MASK_COLOR}" '
                             f'stroke-width="1.2" stroke-linejoin="round"/>')
            if i == 0:
                left, right = SIDE_LABELS[r["axis"]]
                for tx, anchor, lab in ((x0 + 2, "start", left), (x0 + w - 2, "end", right)):
                    parts.append(f'<text x="{_fmt(tx)}" y="{_fmt(top + 10)}" fill="white" font-size="10" '
                                 f'text-anchor="{anchor}">{lab}</text>')
                parts.append(f'<text x="{_fmt(x0 + w / 2)}" y="{_fmt(top + h - 3)}" fill="white" '
                             f'font-size="9" text-anchor="middle">{r["name"]}</text>')
            parts.append("</g>")
            x0 += w + gap
        y0 += row_h + gap
    parts.append("</svg>\n")
    out.write_text("\n".join(parts))


def _atomic(out_file, writer):
    with atomic_file(out_file) as tmp:
        writer(tmp)
    return str(out_file)


def plot_mask_mosaic(t1w_path, mask_path, prob_path, out_file, *, brain_file=None, n_cuts=N_CUTS, title=None):
    """Mosaic (rows: axial, coronal, sagittal; ``n_cuts`` slices each) of the (N4-corrected) T1w with the
    brain-mask contour (red) and the uncertain band of the probability map, 0.1 < p < 0.9 (yellow); and, in
    ``brain_file``, the same mosaic of the skull-stripped image (the "after" of the report's before/after).

    ``prob_path`` may be None (no band). SVGs, written atomically; returns ``out_file``.
    """
    for path in (out_file, brain_file):
        if path is not None and Path(path).suffix.lower() != ".svg":
            raise ValueError(f"{path}: a mosaic is an .svg file")
    volumes = _load_all(t1w_path, mask_path, prob_path)
    chosen = {}

    def write(tmp):
        budget = MAX_PIXELS
        for _ in range(4):
            chosen["rows"] = _panels(volumes, n_cuts, budget)
            _write_svg(chosen["rows"], tmp, title)
            size = tmp.stat().st_size
            if size <= MAX_SVG_BYTES:
                break
            budget = int(budget * 0.85 * MAX_SVG_BYTES / size)

    _atomic(out_file, write)
    if brain_file is not None and mask_path is not None:
        _atomic(brain_file, lambda tmp: _write_svg(chosen["rows"], tmp, title, skull_stripped=True))
    return str(out_file)


def plot_thumbnail(t1w_path, mask_path, out_file):
    """Small PNG for tables: one mid-brain axial, coronal and sagittal slice with the mask contour."""
    rows = _panels(_load_all(t1w_path, mask_path, None), n_cuts=1)
    pal = np.asarray(_palette(), dtype=np.uint8).reshape(-1, 3)
    widths = [r["panels"][0]["w_mm"] for r in rows]
    height = max(r["panels"][0]["h_mm"] for r in rows)
    scale = 0.013  # inches per mm: ~ 200 px high at dpi 100, big enough to see the contour
    fig = plt.figure(figsize=(sum(widths) * scale, height * scale), dpi=100)
    fig.patch.set_facecolor("black")
    x = 0.0
    for r, w in zip(rows, widths):
        p = r["panels"][0]
        ax = fig.add_axes([x / sum(widths), 0, w / sum(widths), p["h_mm"] / height])
        ax.imshow(pal[p["index"]], origin="lower", extent=[0, p["w_mm"], 0, p["h_mm"]], interpolation="nearest")
        for line in p["lines"]:
            ax.plot(line[:, 0], line[:, 1], color=MASK_COLOR, lw=0.6)
        ax.set_xlim(0, p["w_mm"])
        ax.set_ylim(0, p["h_mm"])
        ax.axis("off")
        x += w

    def writer(tmp):
        buf = io.BytesIO()
        fig.savefig(buf, format="png", facecolor="black")
        plt.close(fig)
        buf.seek(0)
        Image.open(buf).convert("RGB").quantize(colors=128).save(tmp, format="PNG", optimize=True)

    try:
        return _atomic(out_file, writer)
    finally:
        plt.close(fig)
