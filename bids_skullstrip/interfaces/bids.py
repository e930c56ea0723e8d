"""Writing BIDS-Derivatives: the sink that turns a structural image's results into named, atomically written files."""

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
from nipype.interfaces.base import (
    BaseInterfaceInputSpec,
    Directory,
    File,
    OutputMultiObject,
    SimpleInterface,
    TraitedSpec,
    traits,
)

from .. import outputs
from ..discovery import StructuralInput
from ..nifti import atomic_file, atomic_save, atomic_write_text, like, load_header


class _DerivativesSinkInputSpec(BaseInterfaceInputSpec):
    output_dir = Directory(mandatory=True)
    bids_dir = Directory(mandatory=True, desc="the raw dataset (the outputs mirror where the source lies in it)")
    source_file = File(exists=True, mandatory=True, desc="raw image: names and exact grid of the outputs")
    mask = File(exists=True, mandatory=True)
    preproc = File(exists=True, mandatory=True)
    brain = File(exists=True, mandatory=True)
    probseg = File(exists=True, mandatory=True)
    figure = File(exists=True, mandatory=True)
    brain_figure = File(exists=True, mandatory=True)
    geometry = traits.Dict(mandatory=True)
    warnings = traits.List(traits.Str, mandatory=True)
    runtime_s = traits.Dict(mandatory=True, desc="seconds per stage of the skull-strip")
    n4_runtime_s = traits.Dict(mandatory=True, desc="seconds per stage of N4")
    qc = traits.Dict(mandatory=True, desc="QC measures, flags, brain volume, model")
    save_probseg = traits.Bool(False, usedefault=True)
    threshold = traits.Float(mandatory=True)
    border_mm = traits.Float(mandatory=True)
    run_id = traits.Str("", usedefault=True, desc="the run writing the outputs (its log: logs/run-<run_id>.log), "
                                                  "recorded in the metrics JSON")


class _DerivativesSinkOutputSpec(TraitedSpec):
    out_files = OutputMultiObject(File(exists=True))


class DerivativesSink(SimpleInterface):
    """Write every output of one structural image under ``output_dir`` with BIDS-Derivatives names and sidecars.

    Images are rewritten on the raw image's exact grid (shape, affine, qform/sform and codes) whatever
    the intermediate files hold; the metrics JSON is written last and marks the image as finished.
    """

    input_spec = _DerivativesSinkInputSpec
    output_spec = _DerivativesSinkOutputSpec
    # its work is the files under output_dir, which nipype's cache does not see (as for nipype's DataSink): a run
    # asked to redo an image whose outputs were deleted or are redone with --overwrite writes them again
    always_run = True

    def _run_interface(self, runtime):
        image = StructuralInput.from_path(self.inputs.source_file, self.inputs.bids_dir)
        out_dir = Path(self.inputs.output_dir)
        reference = load_header(self.inputs.source_file)
        outputs.unmark_finished(out_dir, image)
        # an output an earlier run wrote and this one does not (a probseg, made with --save-probseg): it would
        # contradict the new mask
        for kind in set(outputs.OUTPUTS) - set(outputs.required_kinds(self.inputs.save_probseg)):
            stale = outputs.derivative_path(out_dir, image, kind)
            for path in (stale, outputs.sidecar_path(stale)):
                path.unlink(missing_ok=True)
        written = []
        for kind in outputs.required_kinds(self.inputs.save_probseg):
            if kind == "metrics":
                continue
            data = np.asarray(nib.load(getattr(self.inputs, kind)).dataobj)
            dest = outputs.derivative_path(out_dir, image, kind)
            atomic_save(like(reference, data, outputs.OUTPUTS[kind].dtype), dest)
            outputs.write_sidecar(dest, outputs.sidecar(kind, image, threshold=self.inputs.threshold,
                                                        border_mm=self.inputs.border_mm))
            written.append(str(dest))

        for kind, source in (("mask", self.inputs.figure), ("brain", self.inputs.brain_figure)):
            figure = outputs.figure_path(out_dir, image, kind)
            with atomic_file(figure) as tmp:
                shutil.copyfile(source, tmp)
            written.append(str(figure))

        dest = outputs.derivative_path(out_dir, image, "metrics")
        metrics = {"source": image.source_uri, "source_file": outputs.source_identity(image), "bids_name": image.stem,
                   "suffix": image.suffix, **self.inputs.geometry,
                   "warnings": list(self.inputs.warnings),
                   "runtime_s": {**self.inputs.runtime_s, **self.inputs.n4_runtime_s}, **self.inputs.qc,
                   "outputs": [Path(p).relative_to(out_dir).as_posix() for p in written],
                   "settings": outputs.run_settings(image, threshold=self.inputs.threshold,
                                                    border_mm=self.inputs.border_mm),
                   **({"run_id": self.inputs.run_id} if self.inputs.run_id else {})}
        atomic_write_text(dest, json.dumps(metrics, indent=1) + "\n")
        written.append(str(dest))
        self._results["out_files"] = written
        return runtime
