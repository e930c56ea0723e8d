"""The nipype interface of ANTs N4: bias-field correction inside the brain mask, and the skull-stripped image."""

import os
import time

import nibabel as nib
import numpy as np
from nipype.interfaces.base import BaseInterfaceInputSpec, File, SimpleInterface, TraitedSpec, traits

from ..nifti import like


class _N4InputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True)
    mask_file = File(exists=True, mandatory=True, desc="brain mask weighting the bias-field estimate")
    num_threads = traits.Int(1, usedefault=True)


class _N4OutputSpec(TraitedSpec):
    out_file = File(exists=True, desc="bias-corrected image, float32, native grid")
    out_brain = File(exists=True, desc="bias-corrected image times the brain mask")
    runtime_s = traits.Dict(desc="seconds per stage")


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
        self._results.update(out_file=out_file, out_brain=out_brain, runtime_s={"n4": n4_s})
        return runtime
