"""What the networks and the QC measures assume of an image's intensities: that air is about 0."""

import numpy as np

# The networks learned air as the darkest intensity of a head, about 0. A constant added to every voxel (a background
# that is not ~0, as some converters' and scanners' scalings leave it) made the whole field of view look like head:
# masks of 2000-6000 ml at an offset of a quarter of the brain's intensity. Such a background is a plateau: most of
# the voxels on the faces of the field of view (air around the head) share one value, the darkest of the image. It
# is recognised as that (at least 40 % of the face voxels within BACKGROUND_OFFSET_FRACTION of the 98th percentile
# of one another, at the image's dark end, above that fraction of it; none of the 69 images of ../shared/data and
# data/sample_bids, nor a brain cropped without air around it, whose faces are tissue) and taken off before the
# networks and the QC measures (the outputs keep the input as it is). A background below 0 (an image z-scored, or
# shifted to signed integers: air at -0.9 or -1024) is such a plateau too: the networks coped with it, but QC read
# the whole brain as dark, and flagged good masks.
BACKGROUND_OFFSET_FRACTION = 0.05


def background_offset(data):
    """The intensity of a background that is not about 0 (an air plateau on the faces of the field of view, farther
    from 0 than ``BACKGROUND_OFFSET_FRACTION`` of the 98th percentile of the positive voxels), else 0; from about
    5e4 voxels."""
    step = max(1, int(round((data.size / 5e4) ** (1 / 3))))
    sample = data[::step, ::step, ::step]
    faces = np.concatenate([np.take(sample, i, axis=a).ravel() for a in range(3) for i in (0, -1)])
    p10, level, p40 = (float(v) for v in np.percentile(faces, [10, 25, 40]))
    positive = sample[sample > 0]
    if level == 0 or not positive.size:  # most heads: air at 0
        return 0.0
    tolerance = BACKGROUND_OFFSET_FRACTION * float(np.percentile(positive, 98))
    plateau = p40 - p10 <= tolerance and level - float(np.percentile(sample, 1)) <= tolerance
    return level if plateau and abs(level) > tolerance else 0.0
