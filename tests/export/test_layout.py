"""Shape rules that pick and view the explained tensor, on the shapes real models produce."""
from __future__ import annotations

import pytest

from explainrt.errors import InvalidInputError
from explainrt.export.layout import ActivationView, classify, has_positions, user_view


@pytest.mark.parametrize("shape,input_hw,grids,expected", [
    ((2048, 7, 7), (224, 224), (), ("NCHW", 0, None)),  # ResNet-50 layer4
    ((2048, 8, 8), (299, 299), (), ("NCHW", 0, None)),  # Inception v3 at 299 (ceil strides)
    ((8, 30, 30), (32, 32), (), ("NCHW", 0, None)),  # an unstrided CNN
    ((7, 7, 768), (224, 224), (), ("NHWC", 0, None)),  # Swin-T's last stage before its permute
    ((197, 768), (224, 224), [(14, 14)], ("tokens", 1, (14, 14))),  # ViT-B/16: class token
    ((198, 768), (224, 224), [(14, 14)], ("tokens", 2, (14, 14))),  # DeiT distilled: class + distillation
    ((201, 768), (224, 224), [(14, 14)], ("tokens", 5, (14, 14))),  # class + 4 registers
    ((257, 1024), (224, 224), [], ("tokens", 1, (16, 16))),  # ViT-L/14 without a known patch grid
    ((281, 384), (224, 320), [], ("tokens", 1, (14, 20))),  # a non-square input
    ((49, 768), (224, 224), [(56, 56)], ("tokens", 0, (7, 7))),  # Swin in (N, L, C) form, last stage
])
def test_classify_real_shapes(shape, input_hw, grids, expected):
    view = classify(shape, input_hw, grids)
    assert (view.layout, view.prefix_tokens, view.grid) == expected


@pytest.mark.parametrize("shape", [
    (197, 12, 64),  # per-head queries
    (768, 196),  # a flattened conv map (N, C, h·w): channels are not tokens
    (1, 768),  # the class token alone
    (1024, 1, 1),  # after global pooling
])
def test_classify_refuses_non_grids(shape):
    # (attention probabilities (12, 197, 197) do read as a 197×197 map: the tokens after them win by order)
    assert classify(shape, (224, 224), [(14, 14)]) is None


def test_view_shapes_and_dropped_tokens():
    view = ActivationView("tokens", (201, 768), 5, (14, 14))
    assert view.nchw_shape == (768, 14, 14) and view.dropped_tokens == [0, 1, 2, 3, 4]
    assert ActivationView("tokens", (200, 8), 1, (14, 14)).dropped_tokens == [0, 197, 198, 199]  # suffix tokens too
    assert ActivationView("NHWC", (7, 7, 768)).nchw_shape == (768, 7, 7)
    assert has_positions((12, 197, 197)) and has_positions((84, 32)) and not has_positions((768,))
    assert not has_positions((1024, 1, 1))


def test_user_view_checks_what_it_is_given():
    assert user_view((201, 768), (224, 224), (14, 14), None, "t").prefix_tokens == 5
    assert user_view((201, 768), (224, 224), None, 5, "t").grid == (14, 14)
    assert user_view((512, 1, 1), (224, 224), None, None, "t").layout == "NCHW"  # a named 4-D tensor is taken
    with pytest.raises(InvalidInputError, match="prefix_tokens must be an integer >= 0"):
        user_view((201, 768), (224, 224), None, -1, "t")
    with pytest.raises(InvalidInputError, match="grid must be two positive integers"):
        user_view((201, 768), (224, 224), (0, 14), None, "t")
    with pytest.raises(InvalidInputError, match="no patch grid found .* after 3 dropped tokens"):
        user_view((201, 768), (224, 224), None, 3, "t")
