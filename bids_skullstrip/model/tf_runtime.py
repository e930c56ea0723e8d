"""Importing TensorFlow (training, and the reference engine of inference) quietly, with fast CPU kernels."""

import contextlib
import os
import sys


@contextlib.contextmanager
def _native_stderr_silenced():
    """TensorFlow's C++ start-up notices (absl, oneDNN) bypass Python logging and TF_CPP_MIN_LOG_LEVEL."""
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def import_tensorflow(threads=None):
    """Import TensorFlow quietly; ``threads`` caps its intra-op threads (if TF has not run yet)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    # TensorFlow turns its oneDNN kernels on by default only on CPUs with AVX-512 VNNI or newer; without
    # them 3D convolutions fall back to Eigen: on this project's AVX2 machine, inference 2.4x and a
    # training step 5x slower (measured side by side).
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")
    with _native_stderr_silenced():
        import tensorflow as tf

        tf.constant(0.0) + 1.0  # the second start-up notice comes with the first op
    if threads:
        set_threads(tf, threads)
    return tf


def set_threads(tf, threads=None):
    """Each op on ``threads`` cores (all of them if None), one op at a time: ops run side by side add their float
    sums in varying order, so two runs of the same computation differ in the last bits (training: every weight);
    one at a time they are identical, and no slower on this project's 2-core machine. Returns False where
    TensorFlow already ran in this process with other settings, which then stay."""
    try:
        if threads:
            tf.config.threading.set_intra_op_parallelism_threads(int(threads))
        tf.config.threading.set_inter_op_parallelism_threads(1)
    except RuntimeError:
        return False
    return True
