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


def test_shipped_default_config_is_valid():
    cfg = load_config("configs/default.yaml")
    assert cfg.data.dataset == "digits" and cfg.model.args["num_classes"] == 10
