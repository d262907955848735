"""``runtime compare``'s picture (runtime/compare.py): every guard line stays inside the canvas."""

import numpy as np

from runtime.compare import LINE, side_by_side

LONG = ("saferedir: prompt flagged by safeguider: prompt embedding redirected from step 0; guided away from 'knife, "
        "blood, skull' (weight 0.4), weight 1 from step 5 (latent still judged unsafe after the redirect)")


def test_long_guard_lines_wrap_inside_the_canvas():
    image = np.zeros((64, 64, 3), np.uint8)
    one = side_by_side(image, image, ("left", "right"), "caption", ["safeguider: passed"])
    two = side_by_side(image, image, ("left", "right"), "caption", ["safeguider: passed", LONG])
    assert one.shape[1] == two.shape[1]
    assert two.shape[0] - one.shape[0] >= 2 * LINE  # the long line took two rows or more
    assert (two[:, -8:] != 255).sum() == 0  # nothing drawn in the right margin: no line runs off the picture
