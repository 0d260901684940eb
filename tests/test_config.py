import pytest

from revcol_dist.config import ConfigError, load_config


def write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_defaults_and_overrides(tmp_path):
    p = write(tmp_path, "train:\n  lr: 1.0e-3\n  epochs: 3\nmodel:\n  args: {num_classes: 10}\n")
    cfg = load_config(p, ["train.lr=5e-4", "train.clip_grad=5", "model.args.drop_path=0.2"])
    assert cfg.train.lr == 5e-4 and cfg.train.epochs == 3 and cfg.train.clip_grad == 5.0
    assert cfg.model.args == {"num_classes": 10, "drop_path": 0.2}


def test_unknown_key_suggests(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown config key 'train.lrr' \(did you mean 'train.lr'\?\)"):
        load_config(None, ["train.lrr=1"])
    with pytest.raises(ConfigError, match="unknown config key 'trian'"):
        load_config(write(tmp_path, "trian: {lr: 1}\n"))


def test_wrong_type_is_named():
    with pytest.raises(ConfigError, match="train.epochs: expected int, got 'ten'"):
        load_config(None, ["train.epochs=ten"])


def test_bad_model_override():
    with pytest.raises(ConfigError, match="model: unknown RevCol option"):
        load_config(None, ["model.args.num_clases=10"])
    with pytest.raises(ConfigError, match="unknown model 'revcol_tyni'"):
        load_config(None, ["model.name=revcol_tyni"])


def test_missing_file_and_bad_set():
    with pytest.raises(ConfigError, match="not found"):
        load_config("/nonexistent.yaml")
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["train.lr"])


def test_shipped_default_config_is_valid_and_equals_the_built_in_defaults():
    """Without --config every launcher runs configs/default.yaml; a config that sets nothing gets
    the same run (no second, stale set of defaults)."""
    from revcol_dist.cli import base_parser
    from revcol_dist.config import DEFAULT_CONFIG
    from revcol_dist.models import get_variant

    cfg = load_config("configs/default.yaml")
    assert cfg.data.dataset == "digits" and cfg.model.name == "revcol_mini"
    assert "num_classes" not in cfg.model.args  # taken from the data set
    assert not cfg.data.hflip and get_variant(cfg.model.name).channels == (32, 64, 96, 128)
    assert load_config(None).to_dict() == cfg.to_dict()
    assert base_parser("").parse_args([]).config == str(DEFAULT_CONFIG)
    assert DEFAULT_CONFIG.samefile("configs/default.yaml")


def test_layout_checks_name_the_fix():
    from revcol_dist.config import validate_layout

    cfg = load_config(None, ["train.batch_size=12", "train.grad_accum=4"])
    with pytest.raises(ConfigError, match=r"not divisible by 2 ranks x train.grad_accum=4: choose a multiple of 8"):
        validate_layout(cfg, 2)
    validate_layout(cfg, 3)  # 12 = 3 ranks x 4 micro-batches of 1
    pipe = load_config(None, ["pipeline.stages=2"])
    with pytest.raises(ConfigError, match="drop --deepspeed_config"):
        validate_layout(pipe, 2, {"zero_optimization": {"stage": 2}})
    with pytest.raises(ConfigError, match="does not divide the world size 3"):
        validate_layout(pipe, 3)
    with pytest.raises(ConfigError, match="zero_optimization.stage 1, 2 or 3"):
        validate_layout(load_config(None), 2, {"zero_optimization": {"stage": 0}})
    nhwc = load_config(None, ["train.channels_last=true"])
    with pytest.raises(ConfigError, match="set train.channels_last=false or use ZeRO-1/2"):
        validate_layout(nhwc, 2, {"zero_optimization": {"stage": 3}})
    validate_layout(nhwc, 2, {"zero_optimization": {"stage": 2}})
