"""The nipype interface of the predictor: validate a T1w, skull-strip it, write mask and probability."""

import os
import time
import warnings

import nibabel as nib
import numpy as np
from nibabel.affines import voxel_sizes
from nipype.interfaces.base import BaseInterfaceInputSpec, File, SimpleInterface, TraitedSpec, traits

from ..nifti import geometry_warnings, like, load_t1w


class _SkullStripInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True, desc="T1w image, any orientation and voxel size")
    threshold = traits.Range(low=0.0, high=1.0, mandatory=True)
    border_mm = traits.Float(0.0, usedefault=True, desc="grow (>0) or shrink (<0) the mask, mm")
    num_threads = traits.Int(1, usedefault=True)


class _SkullStripOutputSpec(TraitedSpec):
    out_t1w = File(exists=True, desc="validated T1w as float32 on the native grid (NaN/Inf set to 0)")
    out_mask = File(exists=True, desc="brain mask, uint8 {0, 1}, native grid")
    out_probseg = File(exists=True, desc="brain probability, float32, native grid (independent of the threshold)")
    geometry = traits.Dict(desc="shape, voxel_size_mm and orientation of the input")
    warnings = traits.List(traits.Str, desc="doubts about the input and the result, each naming the file")
    runtime_s = traits.Dict(desc="seconds per stage")


class SkullStrip(SimpleInterface):
    """Load and validate a T1w, run the bundled networks, write mask and probability on the native grid."""

    input_spec = _SkullStripInputSpec
    output_spec = _SkullStripOutputSpec

    def _run_interface(self, runtime):
        from ..model.predictor import Skullstripper
        from ..model.tf_runtime import import_tensorflow

        import_tensorflow(self.inputs.num_threads)
        in_file = self.inputs.in_file
        t = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            img, data = load_t1w(in_file)
        messages = [str(w.message) for w in caught] + [f"{in_file}: {m}" for m in geometry_warnings(img)]
        load_s = time.perf_counter() - t

        result = Skullstripper().mask(data, img.affine, threshold=self.inputs.threshold,
                                      border_mm=self.inputs.border_mm)
        messages += [f"{in_file}: {w}" for w in result.warnings]
        if not result.mask.any():
            messages.append(f"{in_file}: the model found no brain (empty mask); is this a T1w head?")

        t = time.perf_counter()
        out = {name: os.path.join(runtime.cwd, f"{name}.nii") for name in ("t1w", "mask", "probseg")}
        nib.save(like(img, data, np.float32), out["t1w"])
        nib.save(like(img, result.mask, np.uint8), out["mask"])
        nib.save(like(img, result.probability, np.float32), out["probseg"])
        self._results.update(
            out_t1w=out["t1w"], out_mask=out["mask"], out_probseg=out["probseg"],
            geometry={"shape": [int(s) for s in data.shape],
                      "voxel_size_mm": [round(float(v), 4) for v in voxel_sizes(img.affine)],
                      "orientation": "".join(nib.aff2axcodes(img.affine))},
            warnings=list(dict.fromkeys(messages)),
            runtime_s={"load": load_s, **result.timings, "write": time.perf_counter() - t})
        return runtime
