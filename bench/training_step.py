"""Seconds per training step of the two networks in float32 and in mixed bfloat16, side by side in one process
(rounds alternate, so a machine that gets busier slows both). A script that prints numbers, not a test.

    python bench/training_step.py                 # 3 rounds of 10 steps per network and precision
    python bench/training_step.py --rounds 2 --steps 5

Mixed bfloat16 pays only where the CPU multiplies bfloat16 in AMX tiles (the flags are printed: a Xeon with
AVX512-BF16 and no AMX took 1.58x as long as in float32); ``bids_skullstrip-train --precision auto`` chooses it
there and float32 elsewhere.
"""

import argparse
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bids_skullstrip.model.tf_runtime import import_tensorflow  # noqa: E402
from bids_skullstrip.training.train import (PRECISIONS, cpu_flags, dice_bce_loss, stages,  # noqa: E402
                                            training_dtype)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=10, help="timed steps per network, precision and round")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    tf = import_tensorflow(args.threads)
    import keras

    from bids_skullstrip.model.unet import build_unet

    flags = sorted({"amx_bf16", "avx512_bf16"} & cpu_flags())
    print(f"CPU bfloat16 flags: {flags or 'none'} (--precision auto: {training_dtype('auto')}); "
          f"TF {tf.__version__}, {args.threads} threads")
    rng = np.random.default_rng(0)
    models, batches = {}, {}
    for stage in stages():
        x = rng.random((1, *stage.patch_size, 1), dtype=np.float32)
        batches[stage.name] = (x, (x > 0.5).astype(np.float32))
        for precision, dtype in PRECISIONS.items():
            model = build_unet(**stage.architecture, dtype=dtype)
            model.compile(optimizer=keras.optimizers.Adam(1e-4), loss=dice_bce_loss)
            for _ in range(3):  # tracing and oneDNN's first-call kernel choice
                model.train_on_batch(*batches[stage.name])
            models[stage.name, precision] = model
    seconds = {key: [] for key in models}
    for _ in range(args.rounds):
        for (name, precision), model in models.items():
            t = time.perf_counter()
            for _ in range(args.steps):
                model.train_on_batch(*batches[name])
            seconds[name, precision].append((time.perf_counter() - t) / args.steps)
    print("\n| network | patch | float32 s/step | bfloat16 s/step | ratio |\n|---|---|---|---|---|")
    for stage in stages():
        f32, bf16 = (float(np.median(seconds[stage.name, p])) for p in PRECISIONS)
        print(f"| {stage.name} | {'x'.join(map(str, stage.patch_size))} | {f32:.3f} | {bf16:.3f} | {bf16 / f32:.2f} |")
    print(f"\nmedian of {args.rounds} rounds of {args.steps} steps each")
    return 0


if __name__ == "__main__":
    sys.exit(main())
