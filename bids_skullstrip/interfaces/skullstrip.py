"""nipype interfaces around the core path: validate + skull-strip, N4, masking."""

import json
import os
import time
import warnings

import nibabel as nib
import numpy as np
from nipype.interfaces.base import (
    BaseInterfaceInputSpec,
    File,
    SimpleInterface,
    TraitedSpec,
    traits,
)

from ..io import geometry_warnings, like, load_t1w
from ..model.inference import import_tensorflow
from ..skullstrip import voxel_sizes


class _SkullStripInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True, desc="T1w image, any orientation and voxel size")
    threshold = traits.Range(low=0.0, high=1.0, mandatory=True)
    border_mm = traits.Float(0.0, usedefault=True, desc="grow (>0) or shrink (<0) the mask, mm")
    num_threads = traits.Int(1, usedefault=True)


class _SkullStripOutputSpec(TraitedSpec):
    out_t1w = File(exists=True, desc="validated T1w as float32 on the native grid (NaN/Inf set to 0)")
    out_mask = File(exists=True, desc="brain mask, uint8 {0, 1}, native grid")
    out_probseg = File(exists=True, desc="brain probability, float32, native grid")
    out_report = File(exists=True, desc="JSON: geometry, warnings, stage timings")


class SkullStrip(SimpleInterface):
    """Load and validate a T1w, run the bundled U-Net, write mask and probability on the native grid."""

    input_spec = _SkullStripInputSpec
    output_spec = _SkullStripOutputSpec

    def _run_interface(self, runtime):
        from ..skullstrip import skullstrip_array

        import_tensorflow(self.inputs.num_threads)
        t = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            img, data = load_t1w(self.inputs.in_file)
        messages = [str(w.message) for w in caught]
        messages += [f"{self.inputs.in_file}: {m}" for m in geometry_warnings(img)]
        load_s = time.perf_counter() - t

        result = skullstrip_array(data, img.affine, threshold=self.inputs.threshold,
                                  border_mm=self.inputs.border_mm)
        messages += [f"{self.inputs.in_file}: {w}" for w in result.warnings]
        if not result.mask.any():
            messages.append(f"{self.inputs.in_file}: the model found no brain (empty mask); is this a T1w head?")

        t = time.perf_counter()
        out = {name: os.path.join(runtime.cwd, f"{name}.nii") for name in ("t1w", "mask", "probseg")}
        nib.save(like(img, data, np.float32), out["t1w"])
        nib.save(like(img, result.mask, np.uint8), out["mask"])
        nib.save(like(img, result.probability, np.float32), out["probseg"])
        write_s = time.perf_counter() - t

        report = {
            "shape": [int(s) for s in data.shape],
            "voxel_size_mm": [round(float(v), 4) for v in voxel_sizes(img.affine)],
            "orientation": "".join(nib.aff2axcodes(img.affine)),
            "warnings": list(dict.fromkeys(messages)),
            "runtime_s": {"load": load_s, **result.timings, "write": write_s},
        }
        report_file = os.path.join(runtime.cwd, "skullstrip.json")
        with open(report_file, "w") as fh:
            json.dump(report, fh)
        self._results.update(out_t1w=out["t1w"], out_mask=out["mask"], out_probseg=out["probseg"],
                             out_report=report_file)
        return runtime


class _N4InputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True)
    mask_file = File(exists=True, mandatory=True, desc="brain mask weighting the bias-field estimate")
    num_threads = traits.Int(1, usedefault=True)


class _N4OutputSpec(TraitedSpec):
    out_file = File(exists=True, desc="bias-corrected image, float32, native grid")
    out_brain = File(exists=True, desc="bias-corrected image times the brain mask")
    out_report = File(exists=True, desc="JSON: stage timings")


class N4BiasFieldCorrection(SimpleInterface):
    """ANTs N4 (ANTsPy) estimated at low resolution inside the brain mask, applied on the native grid;
    also writes the skull-stripped image (the corrected image times the mask)."""

    input_spec = _N4InputSpec
    output_spec = _N4OutputSpec

    def _run_interface(self, runtime):
        os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(self.inputs.num_threads)
        from ..bias import n4_correct

        img = nib.load(self.inputs.in_file)
        data = np.asarray(img.dataobj, dtype=np.float32)
        mask = np.asarray(nib.load(self.inputs.mask_file).dataobj) > 0
        t = time.perf_counter()
        corrected = n4_correct(data, img.affine, mask)
        n4_s = time.perf_counter() - t
        out_file = os.path.join(runtime.cwd, "preproc.nii")
        out_brain = os.path.join(runtime.cwd, "brain.nii")
        nib.save(like(img, corrected, np.float32), out_file)
        nib.save(like(img, corrected * mask, np.float32), out_brain)
        report_file = os.path.join(runtime.cwd, "n4.json")
        with open(report_file, "w") as fh:
            json.dump({"runtime_s": {"n4": n4_s}}, fh)
        self._results.update(out_file=out_file, out_brain=out_brain, out_report=report_file)
        return runtime
