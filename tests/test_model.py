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


def test_patch_stem_divides_every_stage_side_by_the_stem_stride():
    model = ResNet([1, 1], [8, 16], num_classes=10, stem_stride=2)
    assert model.stem(torch.randn(1, 3, 32, 32)).shape == (1, 8, 16, 16)
    assert model.layers(model.stem(torch.randn(1, 3, 32, 32))).shape == (1, 16, 8, 8)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_bf16_precision_runs_the_convolutions_in_bf16_on_cpu_and_auto_stays_fp32():
    import devices
    conv, x = torch.nn.Conv2d(3, 4, 3), torch.randn(1, 3, 8, 8)
    with devices.autocast(torch.device("cpu"), "bf16"):
        assert conv(x).dtype == torch.bfloat16
    for precision in ("auto", "fp32"):
        with devices.autocast(torch.device("cpu"), precision):
            assert conv(x).dtype == torch.float32
