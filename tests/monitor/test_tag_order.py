"""Where the trainer's tags land on the pages TensorBoard 2.21 opens, without a browser: its
ordering rules ported from the bundled front end (tensorboard/webfiles.zip, index.js) and applied
to the tags. test_landing_page.py checks the same in a real browser where Chromium is installed.

- Time Series sorts *all* cards (scalars, histograms, images alike) by tag with
  ``compareTagNames``, groups them by the tag's first path component in that order, and expands
  the first two groups on first load (``tagGroupExpanded``: ``groups.slice(0, 2)``).
- Scalars sorts scalar tags the same way, one category per first path component, and opens the
  first two (``_shouldOpen(i)``: ``i <= 2``, index 0 being the hidden search-results category).
- Custom Scalars matches each chart's patterns with Python's ``re.match``: anchored at the start only.
"""

import functools
import re

import pytest

from revcol_dist.monitor.tensorboard import ALPHA, RECONSTRUCTIONS, TAGS, front_page, tag
from revcol_dist.monitor.throughput import missing_peak, peak_tflops

import torch

HEADLINE = ["1_overview/1_train_loss", "1_overview/2_val_top1", "1_overview/3_lr", "1_overview/4_images_per_sec"]
INTERNAL = ("alpha", "drift", "mem_peak")  # statistics of the method and the machine: after the first screen


def _number_end(s: str, i: int) -> int:
    """Where the number starting at s[i] ends (digits, a fraction, an exponent), as compareTagNames reads it."""
    state = "natural"
    while i < len(s):
        c = s[i]
        if state in ("natural", "real") and c in "eE":
            state = "sign"
        elif state == "natural" and c == ".":
            state = "real"
        elif state == "sign" and (c.isdigit() or c in "+-"):
            state = "exponent"
        elif not c.isdigit():
            break
        i += 1
    return i


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return float("nan")


def compare_tag_names(a: str, b: str) -> int:
    """TensorBoard's compareTagNames: numbers by value, '/' and digits before any other character."""
    i = j = 0
    while True:
        if i == len(a):
            return 0 if j == len(b) else -1
        if j == len(b):
            return 1
        if a[i].isdigit() and b[j].isdigit():
            i2, j2 = _number_end(a, i + 1), _number_end(b, j + 1)
            x, y = _number(a[i:i2]), _number(b[j:j2])
            if x < y or x > y:  # NaN (JavaScript's Number("1e")) compares neither way
                return -1 if x < y else 1
            i, j = i2, j2
            continue
        low_a, low_b = a[i] == "/" or a[i].isdigit(), b[j] == "/" or b[j].isdigit()
        if low_a != low_b:
            return -1 if low_a else 1
        if not low_a and a[i] != b[j]:
            return -1 if a[i] < b[j] else 1
        i, j = i + 1, j + 1


def groups(tags):
    """[(group, [tags])] in the order Time Series and Scalars show them."""
    out = {}
    for t in sorted(tags, key=functools.cmp_to_key(compare_tag_names)):
        out.setdefault(t.split("/", 1)[0], []).append(t)
    return list(out.items())


def trainer_tags(num_aux=3, levels=4):
    """Every tag a run with intermediate supervision and an EMA writes (MFU where the peak is known)."""
    scalars = set(TAGS.values()) | {tag(f"loss_cls_{i}") for i in range(num_aux + 1)} | \
        {tag(f"loss_rec_{i}") for i in range(num_aux)}
    return scalars, scalars | {ALPHA.format(l) for l in range(levels)} | {RECONSTRUCTIONS}


def test_ported_ordering_rules():
    order = sorted(["a/level_10", "a/level_2", "alpha/x", "1_b/y", "a/b", "a_b/c"], key=functools.cmp_to_key(compare_tag_names))
    assert order == ["1_b/y", "a/b", "a/level_2", "a/level_10", "a_b/c", "alpha/x"]


def test_landing_page_opens_on_how_training_goes():
    scalars, everything = trainer_tags()
    for tags in (everything, scalars):  # Time Series (every card), Scalars (scalar charts)
        shown = groups(tags)
        assert shown[0] == ("1_overview", HEADLINE)  # loss, validation top-1, LR, throughput
        opened = [t for _, ts in shown[:2] for t in ts]  # the two groups open on first load
        assert not [t for t in opened if any(k in t for k in INTERNAL)], opened
        assert [g for g, _ in shown][:3] == ["1_overview", "2_val", "3_loss_terms"]
    names = [g for g, _ in groups(everything)]
    assert names.index("7_alpha") == len(names) - 1  # the histograms last, not first as before
    assert not any(t.startswith("other/") for t in everything)  # every name the trainer logs has its place


def test_front_page_draws_one_scale_per_chart():
    scalars, _ = trainer_tags()
    layout = front_page(3, mfu=True)
    assert list(layout) == ["1. training", "2. validation", "3. health"]
    drawn = {(name[3:], title): sorted(t for t in scalars for p in chart[1] if re.match(p, t))
             for name, section in layout.items() for title, chart in section.items()}
    assert drawn["training", "loss"] == ["1_overview/1_train_loss"]  # the total alone: 2-3x any of its terms
    assert drawn["training", "classification loss per head"] == [f"3_loss_terms/cls_{i}" for i in range(4)]
    assert drawn["training", "reconstruction loss per decoder"] == [f"3_loss_terms/rec_{i}" for i in range(3)]
    assert drawn["training", "model FLOPs utilisation"] == ["5_speed/mfu"]
    assert drawn["validation", "top-1 (%)"] == ["1_overview/2_val_top1", "2_val/top1_ema"]
    assert drawn["validation", "loss"] == ["2_val/loss", "2_val/loss_ema"]
    every = [p for section in layout.values() for chart in section.values() for p in chart[1]]
    assert all(sum(bool(re.match(p, t)) for t in scalars) == 1 for p in every)  # no pattern draws two tags
    assert list(front_page(0)["1. training"])[:2] == ["loss", "learning rate"]  # no heads' terms without them


def test_mfu_chart_only_where_the_peak_is_known():
    assert "model FLOPs utilisation" not in front_page(3, mfu=False)["1. training"]
    assert peak_tflops(torch.device("cpu"), "fp32", False) is None
    note = missing_peak(torch.device("cpu"))
    assert "MFU not reported" in note and "monitor.peak_tflops=" in note and "CPU" in note


@pytest.mark.parametrize("name", ["loss", "val/top1", "lr", "images_per_sec"])
def test_headline_names(name):
    assert tag(name) in HEADLINE
