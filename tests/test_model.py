import torch

from resnet import ResNet


def test_report_resnet_has_4_35m_params_and_maps_images_to_100_logits():
    model = ResNet([3, 3, 3], [64, 128, 256])
    assert abs(model.num_params() - 4.35e6) / 4.35e6 < 0.01
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 100)


def test_stages_halve_resolution_and_project_shortcuts_only_when_shape_changes():
    model = ResNet([2, 1], [8, 16], num_classes=10)
    first, second, third = model.layers
    assert isinstance(first.shortcut, torch.nn.Identity) and isinstance(second.shortcut, torch.nn.Identity)
    assert third.conv1.stride == (2, 2) and isinstance(third.shortcut, torch.nn.Sequential)
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 10)
