"""Writing BIDS-Derivatives: the sink that turns a T1w's results into named, atomically written files."""

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
    Str,
    TraitedSpec,
    traits,
)

from .. import outputs
from ..discovery import T1wInput
from ..io import atomic_save, atomic_write_text, like, tmp_sibling

_DTYPES = {"mask": np.uint8, "preproc": np.float32, "brain": np.float32, "probseg": np.float32}


class _DerivativesSinkInputSpec(BaseInterfaceInputSpec):
    output_dir = Directory(mandatory=True)
    source_file = File(exists=True, mandatory=True, desc="raw T1w: names and exact grid of the outputs")
    bids_relpath = Str(mandatory=True, desc="source path relative to the BIDS root")
    subject = Str(mandatory=True)
    session = Str("", usedefault=True)
    in_mask = File(exists=True, mandatory=True)
    in_preproc = File(exists=True, mandatory=True)
    in_brain = File(exists=True, mandatory=True)
    in_probseg = File(exists=True, mandatory=True)
    in_metrics = File(exists=True, mandatory=True)
    in_figure = File(exists=True, mandatory=True)
    save_probseg = traits.Bool(False, usedefault=True)
    threshold = traits.Float(mandatory=True)
    border_mm = traits.Float(mandatory=True)


class _DerivativesSinkOutputSpec(TraitedSpec):
    out_files = OutputMultiObject(File(exists=True))


class DerivativesSink(SimpleInterface):
    """Write every output of one T1w under ``output_dir`` with BIDS-Derivatives names and sidecars.

    Images are rewritten on the raw image's exact grid (shape, affine, qform/sform and codes) whatever
    the intermediate files hold; the metrics JSON is written last and marks the image as finished.
    """

    input_spec = _DerivativesSinkInputSpec
    output_spec = _DerivativesSinkOutputSpec

    def _run_interface(self, runtime):
        t1w = T1wInput(path=Path(self.inputs.source_file), relpath=self.inputs.bids_relpath,
                       subject=self.inputs.subject, session=self.inputs.session or None)
        out_dir = Path(self.inputs.output_dir)
        reference = nib.load(self.inputs.source_file)
        written = []
        sources = {"mask": self.inputs.in_mask, "preproc": self.inputs.in_preproc,
                   "brain": self.inputs.in_brain, "probseg": self.inputs.in_probseg}
        for kind in outputs.required_kinds(self.inputs.save_probseg):
            if kind == "metrics":
                continue
            data = np.asarray(nib.load(sources[kind]).dataobj)
            dest = outputs.derivative_path(out_dir, t1w, kind)
            atomic_save(like(reference, data, _DTYPES[kind]), dest)
            outputs.write_sidecar(dest, outputs.sidecar(kind, t1w, threshold=self.inputs.threshold,
                                                        border_mm=self.inputs.border_mm))
            written.append(str(dest))

        figure = outputs.figure_path(out_dir, t1w)
        figure.parent.mkdir(parents=True, exist_ok=True)
        tmp = tmp_sibling(figure, figure.suffix)
        shutil.copyfile(self.inputs.in_figure, tmp)
        tmp.replace(figure)
        written.append(str(figure))

        metrics = json.loads(Path(self.inputs.in_metrics).read_text())
        metrics["outputs"] = [Path(p).relative_to(out_dir).as_posix() for p in written]
        metrics["settings"] = outputs.run_settings(threshold=self.inputs.threshold, border_mm=self.inputs.border_mm)
        dest = outputs.derivative_path(out_dir, t1w, "metrics")
        atomic_write_text(dest, json.dumps(metrics, indent=1) + "\n")
        written.append(str(dest))
        self._results["out_files"] = written
        return runtime
