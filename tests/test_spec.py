"""The augmentation spec: DESIGN.md's recipe by default, and impossible settings refused when it is built."""

import pytest

from pipelines.spec import AugmentationSpec, ViewSpec


def test_defaults_are_the_official_recipe():
    spec = AugmentationSpec()
    for view in spec.views:
        assert (view.crop_scale, view.crop_ratio, view.flip_prob) == ((0.08, 1.0), (3 / 4, 4 / 3), 0.5)
        assert (view.color_jitter_prob, view.brightness, view.contrast, view.saturation, view.hue) == \
            (0.8, 0.4, 0.4, 0.2, 0.1)
        assert (view.grayscale_prob, view.blur_sigma, view.solarize_threshold) == (0.2, (0.1, 2.0), 0.5)
    assert [(view.blur_prob, view.solarize_prob) for view in spec.views] == [(1.0, 0.0), (0.1, 0.2)]
    assert (spec.image_size, spec.blur_kernel_size, spec.interpolation) == (224, 23, "bicubic")


@pytest.mark.parametrize("changes, message", [
    ({"blur_sigma": (0.0, 2.0)}, r"blur_sigma=\(0.0, 2.0\) must start above 0"),  # NaN blur kernels
    ({"crop_scale": (0.5, 0.2)}, r"crop_scale=\(0.5, 0.2\) must satisfy"),
    ({"crop_scale": (0.0, 0.0)}, "must allow a non-empty crop"),
    ({"flip_prob": 1.5}, "flip_prob=1.5 is a probability"),
    ({"hue": 0.6}, r"hue=0.6 must lie in \[0, 0.5\]"),
    ({"saturation": -0.1}, r"saturation=-0.1 must lie in \[0, 1\]"),
])
def test_impossible_view_settings_are_refused(changes, message):
    with pytest.raises(ValueError, match=message):
        ViewSpec(**changes)
