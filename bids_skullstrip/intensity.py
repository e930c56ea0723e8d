"""What the networks and the QC measures assume of an image's intensities: that air is about 0."""

import numpy as np

# The networks learned air as the darkest intensity of a head. A constant added to every voxel (a background that
# is not ~0, as some converters' and scanners' scalings leave it) made the whole field of view look like head:
# masks of 2000-6000 ml at an offset of a quarter of the brain's intensity. The 1st percentile of a real head is its
# air: at most 0.7 % of the 98th percentile on the 65 images of ../shared/data, so a 1st percentile above
# BACKGROUND_OFFSET_FRACTION of it is an offset, taken off before the networks and the QC measures (the outputs
# keep the input as it is).
BACKGROUND_OFFSET_FRACTION = 0.05


def background_offset(data):
    """The intensity of a background that is not dark (the 1st percentile, where it is above
    ``BACKGROUND_OFFSET_FRACTION`` of the 98th percentile of the positive voxels), else 0; from about 2e5 voxels."""
    step = max(1, int(round((data.size / 2e5) ** (1 / 3))))
    sample = data[::step, ::step, ::step]
    low = float(np.percentile(sample, 1))
    positive = sample[sample > 0]
    if low <= 0 or positive.size == 0:
        return 0.0
    return low if low > BACKGROUND_OFFSET_FRACTION * float(np.percentile(positive, 98)) else 0.0
