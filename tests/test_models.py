"""Encoders: torchvision-compatible trees, width multiplier, small-image stem."""

from __future__ import annotations

import pytest
import torch
import torchvision

from moco_scale.models import RESNET_SPECS, build_resnet


@pytest.mark.parametrize("arch", ["resnet18", "resnet50", "wide_resnet50_2", "resnext50_32x4d"])
def test_state_dict_loads_into_torchvision(arch: str) -> None:
    torch.manual_seed(0)
    ours = build_resnet(arch).eval()
    theirs = getattr(torchvision.models, arch)(weights=None).eval()
    state = ours.state_dict()
    missing, unexpected = theirs.load_state_dict(state, strict=False)
    assert set(missing) == {"fc.weight", "fc.bias"} and not unexpected
    theirs.fc = torch.nn.Identity()
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(ours(x), theirs(x))


def test_every_named_arch_has_torchvision_parameter_count() -> None:
    for arch in ("resnet34", "resnet101", "resnext101_32x8d"):
        ours = sum(p.numel() for p in build_resnet(arch).parameters())
        tv = getattr(torchvision.models, arch)(weights=None)
        assert ours == sum(p.numel() for p in tv.parameters()) - tv.fc.weight.numel() - tv.fc.bias.numel()
    assert set(RESNET_SPECS) >= {"resnet18", "resnet152", "wide_resnet101_2"}


def test_width_multiplier_and_small_stem() -> None:
    r50x2 = build_resnet("resnet50", width=2)
    assert r50x2.feature_dim == 4096 and r50x2.conv1.out_channels == 128
    small = build_resnet("resnet18", small_stem=True)
    assert small.conv1.kernel_size == (3, 3) and isinstance(small.maxpool, torch.nn.Identity)
    assert small(torch.randn(2, 3, 32, 32)).shape == (2, 512)


def test_unknown_arch_lists_choices() -> None:
    with pytest.raises(ValueError, match="unknown arch 'resnet51'.*resnet50"):
        build_resnet("resnet51")
