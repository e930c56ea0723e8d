"""The nipype interface of the predictor: validate an image, skull-strip it, write mask and probability."""

import os

import nibabel as nib
import numpy as np
from nibabel.affines import voxel_sizes
from nipype.interfaces.base import BaseInterfaceInputSpec, File, SimpleInterface, TraitedSpec, isdefined, traits


class _SkullStripInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True, desc="T1w image, any orientation and voxel size")
    weights = File(exists=True, desc="the networks' model card (the model.json beside their weights files); "
                                    "default: the bundled ones")
    threshold = traits.Range(low=0.0, high=1.0, desc="brain probability threshold (default: the weights')")
    border_mm = traits.Float(0.0, usedefault=True, desc="grow (>0) or shrink (<0) the mask, mm")
    num_threads = traits.Int(1, usedefault=True)


class _SkullStripOutputSpec(TraitedSpec):
    out_t1w = File(exists=True, desc="validated T1w as float32 on the native grid (NaN/Inf set to 0)")
    out_mask = File(exists=True, desc="brain mask, uint8 {0, 1}, native grid")
    out_probseg = File(exists=True, desc="brain probability, float32, native grid (independent of the threshold)")
    out_qc_mask = File(exists=True, desc="the mask QC judges: out_mask, or with a border the mask before it")
    geometry = traits.Dict(desc="shape, voxel_size_mm and orientation of the input")
    warnings = traits.List(traits.Str, desc="doubts about the input and the result, each naming the file")
    runtime_s = traits.Dict(desc="seconds per stage")
    model_measures = traits.Dict(desc="QC measures of the networks' own (view_disagreement), for QCMetrics")
    noise_smoothing_mm = traits.Float(desc="the Gaussian a very noisy image was smoothed by before the networks: "
                                           "QCMetrics reads the image so")


class SkullStrip(SimpleInterface):
    """Load and validate an image, run the networks (``weights``), write mask and probability on its grid."""

    input_spec = _SkullStripInputSpec
    output_spec = _SkullStripOutputSpec

    def _run_interface(self, runtime):
        from ..model.inference import set_threads
        from ..nifti import like
        from ..strip import skullstrip_file

        set_threads(self.inputs.num_threads)
        out = {name: os.path.join(runtime.cwd, f"{name}.nii") for name in ("t1w", "mask", "probseg")}
        result = skullstrip_file(self.inputs.in_file, mask=out["mask"], probseg=out["probseg"],
                                 weights=self.inputs.weights or None,
                                 threshold=self.inputs.threshold if isdefined(self.inputs.threshold) else None,
                                 border_mm=self.inputs.border_mm)
        nib.save(like(result.image, result.data, np.float32), out["t1w"])
        qc_mask = out["mask"]
        if result.mask_before_border is not None:
            qc_mask = os.path.join(runtime.cwd, "mask_before_border.nii")
            nib.save(like(result.image, result.mask_before_border, np.uint8), qc_mask)
        img = result.image
        self._results.update(
            out_t1w=out["t1w"], out_mask=out["mask"], out_probseg=out["probseg"], out_qc_mask=qc_mask,
            geometry={"shape": [int(s) for s in result.data.shape],
                      "voxel_size_mm": [round(float(v), 4) for v in voxel_sizes(img.affine)],
                      "orientation": "".join(nib.aff2axcodes(img.affine))},
            warnings=result.warnings, runtime_s=result.timings,
            model_measures={} if result.view_disagreement is None else {"view_disagreement": result.view_disagreement},
            noise_smoothing_mm=result.noise_smoothing_mm)
        return runtime
