import os
import pickle

import pytest
import torch

from revcol_dist.models import create_model, load_official_checkpoint, to_official_state_dict
from revcol_dist.models.official import CheckpointError

TINY = dict(channels=(8, 16, 24, 32), layers=(1, 1, 2, 1), num_classes=5)


def tiny(seed, **kw):
    torch.manual_seed(seed)
    args = dict(TINY)
    args.update(kw)
    return create_model("revcol_tiny", **args)


def _released_file(path, sd, with_config=True):
    """A file in the authors' layout: model/optimizer/epoch/... plus a yacs CfgNode and a builtin."""
    obj = {"model": sd, "optimizer": {"state": {}, "param_groups": []}, "max_accuracy": 82.2, "epoch": 299,
           "state_dict_ema": {k: v + 1 for k, v in sd.items()}}
    if with_config:
        from yacs.config import CfgNode

        obj["config"] = CfgNode({"MODEL": CfgNode({"TYPE": "revcol_tiny", "DROP_PATH_RATE": 0.1}), "TAG": "x"})
        obj["input"] = input
    torch.save(obj, path)


def test_official_key_names():
    sd = to_official_state_dict(tiny(0, inter_supv=True))
    for key in [
        "stem.0.weight", "stem.1.weight", "subnet0.alpha0", "subnet3.alpha3",
        "subnet3.level2.blocks.1.pwconv1.weight", "subnet2.level1.blocks.0.gamma",
        "subnet1.level1.fusion.down.0.weight", "subnet1.level1.fusion.down.1.bias",
        "subnet1.level0.fusion.up.channel_reschedule.0.weight", "subnet1.level2.fusion.up.channel_reschedule.1.bias",
        "cls_blocks.2.classifier.1.bias", "cls_blocks.3.classifier.0.weight",
        "decoder_blocks.0.proj_layers.2.0.weight", "decoder_blocks.2.proj_layers.0.1.bias",
        "decoder_blocks.1.normal_layers.0.0.pwconv2.weight", "decoder_blocks.0.projback.0.weight",
    ]:
        assert key in sd, key
    assert not any(k.startswith(("columns.", "heads.", "decoders.", "cls.")) for k in sd)
    assert not any("level0.fusion.down" in k or "subnet0.level0.fusion.up" in k for k in sd)
    deploy = to_official_state_dict(tiny(0))
    assert "cls.classifier.0.weight" in deploy and not any(k.startswith("cls_blocks") for k in deploy)
    huge = to_official_state_dict(tiny(0, level0_up2=True))
    assert "subnet1.level0.fusion.up2.channel_reschedule.0.weight" in huge
    assert "subnet0.level0.fusion.up2.channel_reschedule.0.weight" not in huge
    sim = to_official_state_dict(tiny(0, inter_supv=True, num_classes=1001))
    assert {"decoder_blocks.0.projback.0.weight", "decoder_blocks.0.projback.1.weight"} <= set(sim)


@pytest.mark.parametrize("kw", [dict(), dict(inter_supv=True), dict(level0_up2=True, inter_supv=True)])
def test_round_trip_is_exact(kw, tmp_path):
    a, b = tiny(0, **kw), tiny(1, **kw)
    sd = to_official_state_dict(a)
    assert any(not torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
    path = tmp_path / "ckpt.pth"
    _released_file(path, sd)
    report = load_official_checkpoint(b, path)
    assert report.loaded == len(sd) and not report.missing and not report.dropped
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k
    sd_b = to_official_state_dict(b)
    assert sd_b.keys() == sd.keys() and all(torch.equal(sd[k], sd_b[k]) for k in sd)


def test_module_prefix_and_bare_state_dict(tmp_path):
    a, b = tiny(0), tiny(1)
    sd = {"module." + k: v for k, v in to_official_state_dict(a).items()}
    torch.save(sd, tmp_path / "bare.pth")
    load_official_checkpoint(b, tmp_path / "bare.pth")
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())


def test_ema_entry(tmp_path):
    a, b = tiny(0), tiny(1)
    _released_file(tmp_path / "c.pth", to_official_state_dict(a))
    load_official_checkpoint(b, tmp_path / "c.pth", use_ema=True)
    assert torch.equal(b.stem[0].weight, a.stem[0].weight + 1)


def test_wrong_variant_names_what_it_looks_like(tmp_path):
    with torch.device("meta"):
        sd = to_official_state_dict(create_model("revcol_small"))
    model = tiny(0)
    with pytest.raises(CheckpointError, match=r"revcol_small .*8 columns.*create_model\('revcol_small'\)"):
        load_official_checkpoint(model, sd)


def test_22k_into_1k_drops_heads_and_reports(tmp_path):
    src = tiny(0, inter_supv=True, num_classes=1001)  # SimDecoder, 1001 classes
    dst = tiny(1, num_classes=5)
    head_before = dst.heads[0].classifier[1].weight.clone()
    report = load_official_checkpoint(dst, to_official_state_dict(src))
    assert any(k.startswith("cls_blocks.") for k in report.dropped)
    assert any(k.startswith("decoder_blocks.") for k in report.dropped)
    assert not any(k.startswith(("cls", "decoder")) for k in report.dropped if not k.startswith(("cls_blocks.", "decoder_blocks.")))
    assert all(k.startswith("heads.") for k in report.missing) and report.missing
    assert torch.equal(dst.heads[0].classifier[1].weight, head_before)
    assert torch.equal(dst.columns[2].level1.blocks[0].pwconv1.weight, src.columns[2].level1.blocks[0].pwconv1.weight)
    assert "dropped" in report.summary()


def test_inter_supv_checkpoint_into_deploy_model_keeps_final_head():
    src, dst = tiny(0, inter_supv=True), tiny(1)
    report = load_official_checkpoint(dst, to_official_state_dict(src))
    assert torch.equal(dst.heads[0].classifier[1].weight, src.heads[3].classifier[1].weight)
    assert not report.missing
    assert {k.split(".")[0] + "." + k.split(".")[1] for k in report.dropped} == {
        "cls_blocks.0", "cls_blocks.1", "cls_blocks.2", "decoder_blocks.0", "decoder_blocks.1", "decoder_blocks.2"}


def test_strict_reports_missing_tensors():
    src = tiny(0)
    sd = to_official_state_dict(src)
    del sd["subnet1.level2.blocks.0.gamma"]
    with pytest.raises(CheckpointError, match="lacks 1 tensors.*subnet|lacks 1 tensors.*columns"):
        load_official_checkpoint(tiny(1), sd)
    report = load_official_checkpoint(tiny(1), sd, strict=False)
    assert report.missing == ["columns.1.level2.blocks.0.gamma"]


def test_shape_mismatch_is_named():
    sd = to_official_state_dict(tiny(0))
    sd["subnet1.level2.blocks.0.gamma"] = torch.zeros(3)
    with pytest.raises(CheckpointError, match=r"gamma has shape \(3,\)"):
        load_official_checkpoint(tiny(1), sd)


def test_missing_file():
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_official_checkpoint(tiny(0), "/nonexistent/nope.pth")


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_arbitrary_code_is_refused_not_run(tmp_path):
    marker = tmp_path / "pwned"
    sd = to_official_state_dict(tiny(0))
    torch.save({"model": sd, "payload": _Evil(marker)}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match="refusing to load.*system"):
        load_official_checkpoint(tiny(1), tmp_path / "evil.pth")
    assert not marker.exists()
    # the same file through plain pickle would have run the payload: the test is meaningful
    with open(tmp_path / "evil.pkl", "wb") as f:
        pickle.dump(_Evil(marker), f)
    with open(tmp_path / "evil.pkl", "rb") as f:
        pickle.load(f)
    assert marker.exists()


def test_not_a_revcol_checkpoint():
    with pytest.raises(CheckpointError, match="not a RevCol checkpoint"):
        load_official_checkpoint(tiny(0), {"fc.weight": torch.zeros(2, 2)})
