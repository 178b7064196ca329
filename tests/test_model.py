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


def test_avgpool_shortcut_averages_each_2x2_patch_before_its_1x1_projection_as_resnet_d():
    plain, d = (ResNet([1, 1], [8, 16], num_classes=10, shortcut=s) for s in ("conv", "avgpool"))
    pool, conv, _ = d.layers[1].shortcut
    assert isinstance(pool, torch.nn.AvgPool2d) and conv.stride == (1, 1) and conv.kernel_size == (1, 1)
    assert d.num_params() == plain.num_params()
    x = torch.randn(1, 8, 7, 7)       # an odd side: the pool's output has the strided convolution's
    assert d.layers[1](x).shape == plain.layers[1](x).shape == (1, 16, 4, 4)
    assert isinstance(d.layers[0].shortcut, torch.nn.Identity)


def test_bad_shortcut_is_one_error_line(monkeypatch, capsys):
    import run_train
    from fault_helpers import main_error
    assert "'shortcut' must be one of conv, avgpool" in main_error(run_train, ["--exp", "smoke", "--set",
                                                                              "shortcut=pool"], monkeypatch, capsys)


def test_bf16_precision_runs_the_convolutions_in_bf16_on_cpu_and_auto_stays_fp32():
    import devices
    conv, x = torch.nn.Conv2d(3, 4, 3), torch.randn(1, 3, 8, 8)
    with devices.autocast(torch.device("cpu"), "bf16"):
        assert conv(x).dtype == torch.bfloat16
    for precision in ("auto", "fp32"):
        with devices.autocast(torch.device("cpu"), precision):
            assert conv(x).dtype == torch.float32


def test_the_whitening_is_decomposed_on_the_cpu_and_lands_on_the_convs_device(monkeypatch):
    """A Mac's model on MPS: torch before mid-2026 has no eigh there (pytorch/pytorch#151874). Here fake CUDA tensors
    stand in for it (this torch builds no MPS, not even fake), and eigh raises off the CPU as it did on MPS."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from resnet import whiten_
    real_eigh, seen = torch.linalg.eigh, []

    def cpu_only_eigh(a, *args, **kwargs):
        seen.append(a.device.type)
        if a.device.type != "cpu":
            raise NotImplementedError("The operator 'aten::_linalg_eigh.eigenvalues' is not currently implemented "
                                      f"for the {a.device.type.upper()} device")
        return real_eigh(a, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "eigh", cpu_only_eigh)
    with FakeTensorMode():
        conv = torch.nn.Conv2d(3, 32, 2, 2, bias=False, device="cuda", dtype=torch.float16)
        whiten_(conv, torch.randn(16, 3, 32, 32, device="cuda"))
        assert (conv.weight.device.type, conv.weight.dtype) == ("cuda", torch.float16)
    assert seen == ["cpu"]
