"""nipype interfaces for what a person checks: QC measures + flags (the metrics JSON) and the mosaic reportlet."""

import os

import nibabel as nib
import numpy as np
from nibabel.affines import voxel_sizes
from nipype.interfaces.base import BaseInterfaceInputSpec, File, SimpleInterface, TraitedSpec, isdefined, traits

from .. import __version__
from ..intensity import HEAVY_NOISE_SMOOTHING_MM


class _QCMetricsInputSpec(BaseInterfaceInputSpec):
    in_t1w = File(exists=True, mandatory=True, desc="bias-corrected T1w, native grid")
    in_probseg = File(exists=True, mandatory=True)
    in_mask = File(exists=True, mandatory=True, desc="the output mask (its volume is the record's)")
    in_qc_mask = File(exists=True, desc="the mask the measures judge (default: in_mask; with a border, the mask "
                                        "before it: the border is the user's choice, not the networks')")
    weights = File(exists=True, desc="the model card of the networks that made the mask (default: the bundled "
                                    "ones), recorded by checksum")
    contrast = traits.Str("T1w", usedefault=True, desc="the image's BIDS suffix (its QC limits)")
    model_measures = traits.Dict(desc="the SkullStrip node's own QC measures (view_disagreement)")
    noise_smoothing_mm = traits.Float(HEAVY_NOISE_SMOOTHING_MM, usedefault=True,
                                      desc="the SkullStrip node's: how a very noisy image was read")


class _QCMetricsOutputSpec(TraitedSpec):
    qc = traits.Dict(desc="brain volume, software and model, QC measures, flags and notes (of the metrics JSON)")


class QCMetrics(SimpleInterface):
    """The QC part of the per-image metrics record: brain volume, model, QC measures, flags (the mask probably
    failed) and notes (the image is unusual)."""

    input_spec = _QCMetricsInputSpec
    output_spec = _QCMetricsOutputSpec

    def _run_interface(self, runtime):
        from .. import qc
        from ..model.card import ModelCard

        img = nib.load(self.inputs.in_t1w)
        t1w = np.asarray(img.dataobj, dtype=np.float32)
        prob = np.asarray(nib.load(self.inputs.in_probseg).dataobj, dtype=np.float32)
        mask = np.asarray(nib.load(self.inputs.in_mask).dataobj, dtype=np.uint8)
        judged = mask if not isdefined(self.inputs.in_qc_mask) else np.asarray(
            nib.load(self.inputs.in_qc_mask).dataobj, dtype=np.uint8)
        measures = qc.qc_measures(t1w, prob, judged, voxel_sizes(img.affine),
                                  view_disagreement=(self.inputs.model_measures or {}).get("view_disagreement"),
                                  noise_smoothing_mm=self.inputs.noise_smoothing_mm)
        card = ModelCard.load(self.inputs.weights or None)
        self._results["qc"] = dict(
            brain_volume_ml=float(np.count_nonzero(mask)) * float(np.prod(voxel_sizes(img.affine))) / 1000.0,
            brain_voxels=int(np.count_nonzero(mask)),
            software_version=__version__,
            model=card.record(),
            qc=measures,
            flags=qc.flag_image(measures, self.inputs.contrast),
            notes=qc.note_image(measures, self.inputs.contrast),
        )
        return runtime


class _MaskMosaicInputSpec(BaseInterfaceInputSpec):
    in_t1w = File(exists=True, mandatory=True)
    in_mask = File(exists=True, mandatory=True)
    in_probseg = File(exists=True, mandatory=True)
    source_file = File(mandatory=True, desc="the raw image (its BIDS name, or else its file name, is the figure's title)")


class _MaskMosaicOutputSpec(TraitedSpec):
    out_figure = File(exists=True, desc="the image with the mask contour and the uncertain band")
    out_brain_figure = File(exists=True, desc="the skull-stripped image, on the same layout")


def _title(source_file):
    """The entities of a BIDS name; any other file (the workflow is embeddable anywhere) by its name."""
    from ..discovery import StructuralInput

    try:
        return StructuralInput.from_path(source_file).name
    except (KeyError, ValueError):
        return os.path.basename(source_file)


class MaskMosaic(SimpleInterface):
    """Axial/coronal/sagittal mosaic with the mask contour and the probability's uncertain band (SVG)."""

    input_spec = _MaskMosaicInputSpec
    output_spec = _MaskMosaicOutputSpec

    def _run_interface(self, runtime):
        from ..reports.reportlets import plot_mask_mosaic

        out, brain = (os.path.join(runtime.cwd, name) for name in ("mosaic.svg", "brain.svg"))
        plot_mask_mosaic(self.inputs.in_t1w, self.inputs.in_mask, self.inputs.in_probseg, out, brain_file=brain,
                         title=_title(self.inputs.source_file))
        self._results.update(out_figure=out, out_brain_figure=brain)
        return runtime
