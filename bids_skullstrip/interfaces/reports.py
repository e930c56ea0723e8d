"""nipype interfaces for what a person checks: QC measures + flags (the metrics JSON) and the mosaic reportlet."""

import json
import os

import nibabel as nib
import numpy as np
from nipype.interfaces.base import (
    BaseInterfaceInputSpec,
    File,
    InputMultiObject,
    SimpleInterface,
    Str,
    TraitedSpec,
)

from .. import __version__


class _QCMetricsInputSpec(BaseInterfaceInputSpec):
    in_t1w = File(exists=True, mandatory=True, desc="bias-corrected T1w, native grid")
    in_probseg = File(exists=True, mandatory=True)
    in_mask = File(exists=True, mandatory=True)
    in_reports = InputMultiObject(File(exists=True), desc="JSON reports of earlier nodes (timings, warnings...)")
    bids_name = Str(mandatory=True, desc="source stem, e.g. sub-01_ses-1_run-1")
    source_uri = Str(mandatory=True, desc="BIDS URI of the raw T1w")


class _QCMetricsOutputSpec(TraitedSpec):
    out_metrics = File(exists=True)


class QCMetrics(SimpleInterface):
    """The per-image metrics record: geometry, brain volume, timings, model, QC measures and flags."""

    input_spec = _QCMetricsInputSpec
    output_spec = _QCMetricsOutputSpec

    def _run_interface(self, runtime):
        from .. import qc
        from ..model.inference import model_card
        from ..skullstrip import voxel_sizes

        img = nib.load(self.inputs.in_t1w)
        t1w = np.asarray(img.dataobj, dtype=np.float32)
        prob = np.asarray(nib.load(self.inputs.in_probseg).dataobj, dtype=np.float32)
        mask = np.asarray(nib.load(self.inputs.in_mask).dataobj, dtype=np.uint8)
        record = {"source": self.inputs.source_uri, "bids_name": self.inputs.bids_name, "warnings": [],
                  "runtime_s": {}}
        for report in self.inputs.in_reports:
            with open(report) as fh:
                content = json.load(fh)
            record["warnings"] += content.pop("warnings", [])
            record["runtime_s"].update(content.pop("runtime_s", {}))
            record.update(content)
        measures = qc.qc_measures(t1w, prob, mask, voxel_sizes(img.affine))
        card = model_card()
        record.update(
            brain_volume_ml=measures["brain_volume_ml"],
            brain_voxels=int(np.count_nonzero(mask)),
            software_version=__version__,
            model={"name": card.get("name"), "sha256": card.get("sha256"), "voxel_mm": card.get("voxel_mm"),
                   "locator_sha256": (card.get("locator") or {}).get("sha256")},
            qc=measures,
            flags=qc.flag_image(measures),
        )
        out = os.path.join(runtime.cwd, "metrics.json")
        with open(out, "w") as fh:
            json.dump(record, fh, indent=1, allow_nan=True)
        self._results["out_metrics"] = out
        return runtime


class _MaskMosaicInputSpec(BaseInterfaceInputSpec):
    in_t1w = File(exists=True, mandatory=True)
    in_mask = File(exists=True, mandatory=True)
    in_probseg = File(exists=True, mandatory=True)
    title = Str("", usedefault=True)


class _MaskMosaicOutputSpec(TraitedSpec):
    out_figure = File(exists=True)


class MaskMosaic(SimpleInterface):
    """Axial/coronal/sagittal mosaic with the mask contour and the probability's uncertain band (SVG)."""

    input_spec = _MaskMosaicInputSpec
    output_spec = _MaskMosaicOutputSpec

    def _run_interface(self, runtime):
        from ..reports.reportlets import plot_mask_mosaic

        out = os.path.join(runtime.cwd, "mosaic.svg")
        plot_mask_mosaic(self.inputs.in_t1w, self.inputs.in_mask, self.inputs.in_probseg, out,
                         title=self.inputs.title or None)
        self._results["out_figure"] = out
        return runtime
