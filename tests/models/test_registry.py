import pytest
import torch

from revcol_dist.models import RevColConfig, create_model, get_variant, list_models

# Exact parameter counts of the published definitions (shared/REFERENCE.md).
PUBLISHED_COUNTS = {
    "revcol_tiny": (30_456_168, 33_063_984, 79_494_852),
    "revcol_small": (60_568_424, 63_176_240, 109_607_108),
    "revcol_base": (138_616_408, 141_694_960, 193_772_980),
    "revcol_large": (273_095_400, 280_372_272, 371_077_188),
    "revcol_xlarge": (833_807_400, 851_958_576, 1_005_203_844),
    "revcol_huge": (2_157_600_160, 2_199_107_704, 2_433_000_700),
}


def test_all_six_variants_registered():
    assert list_models() == list(PUBLISHED_COUNTS) + ["revcol_mini"]  # the main job's, not published


@pytest.mark.parametrize("name", list(PUBLISHED_COUNTS))
def test_parameter_counts_match_published(name):
    deploy, inter_1k, inter_22k = PUBLISHED_COUNTS[name]
    with torch.device("meta"):
        counts = [
            sum(p.numel() for p in create_model(name, **kw).parameters())
            for kw in ({}, {"inter_supv": True}, {"inter_supv": True, "num_classes": 21841})
        ]
    assert counts == [deploy, inter_1k, inter_22k]


def test_meta_construction_allocates_nothing():
    with torch.device("meta"):
        m = create_model("revcol_huge")
    assert all(p.is_meta for p in m.parameters())


def test_published_hyperparameters():
    t = get_variant("revcol_tiny")
    assert (t.channels, t.layers, t.num_columns, t.kernel_size, t.drop_path) == ((64, 128, 256, 512), (2, 2, 4, 2), 4, 3, 0.1)
    b = get_variant("revcol_base")
    assert (b.channels, b.layers, b.num_columns, b.drop_path) == ((72, 144, 288, 576), (1, 1, 3, 2), 16, 0.4)
    assert get_variant("revcol_huge").level0_up2 and not get_variant("revcol_xlarge").level0_up2


def test_overrides_apply():
    m = create_model("revcol_tiny", num_classes=10, drop_path=0.0, kernel_size=5, reversible=False, inter_supv=True)
    assert m.config.num_classes == 10 and m.heads[-1].classifier[1].out_features == 10
    assert m.columns[0].level0.blocks[0].dwconv.kernel_size == (5, 5)
    assert len(m.heads) == 4 and len(m.decoders) == 3
    assert not m.reversible


def test_unknown_model_suggests_name():
    with pytest.raises(KeyError, match="revcol_tiny"):
        create_model("revcol_tiyn")


def test_unknown_override_names_valid_options():
    with pytest.raises(TypeError, match="num_clases.*valid options"):
        create_model("revcol_tiny", num_clases=10)


@pytest.mark.parametrize(
    "kw, msg",
    [
        (dict(channels=(1, 2, 3)), "channels"),
        (dict(kernel_size=4), "kernel_size"),
        (dict(drop_path=1.0), "drop_path"),
        (dict(num_columns=0), "num_columns"),
        (dict(boundary_interval=0), "boundary_interval"),
    ],
)
def test_invalid_config_is_rejected(kw, msg):
    base = dict(channels=(8, 8, 8, 8), layers=(1, 1, 1, 1), num_columns=2)
    base.update(kw)
    with pytest.raises(ValueError, match=msg):
        RevColConfig(**base)


def test_drop_path_schedule_is_per_column_linspace():
    m = create_model("revcol_tiny")
    rates = [b.drop_path.p for l in range(4) for b in getattr(m.columns[2], f"level{l}").blocks]
    expected = torch.linspace(0, 0.1, 10).tolist()
    assert rates == expected
    rates0 = [b.drop_path.p for l in range(4) for b in getattr(m.columns[0], f"level{l}").blocks]
    assert rates0 == expected


def test_inter_supv_head_columns():
    assert get_variant("revcol_tiny").head_columns == (0, 1, 2, 3)
    assert get_variant("revcol_small").head_columns == (1, 3, 5, 7)
    assert get_variant("revcol_base").head_columns == (3, 7, 11, 15)
