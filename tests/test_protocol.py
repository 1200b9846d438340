"""The config round trip server -> client, and the client's cache of decoded configs."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf
from omegaconf.errors import ReadonlyConfigError

from conf.schema import default_config, settings_from_flat, to_flat
from gating.federated import protocol
from gating.federated.evaluation import report_problem
from gating.federated.protocol import (
    REG_WEIGHT_KEY,
    REPORT_RANGES,
    ROUND_KEY,
    TRAIN_METRIC_RANGES,
    decode_config,
    encode_config,
    range_problem,
)


def changed_config():
    cfg = default_config()
    cfg.strategy.name = "fedmeta"
    cfg.dataset.path = "/data/x.npz"
    cfg.federation.train_nodes = 7
    cfg.gating["lambda"] = 0.25
    return cfg


@pytest.mark.parametrize("make", [default_config, changed_config])
def test_cached_decode_equals_uncached(make):
    cfg = make()
    record = encode_config(cfg, **{ROUND_KEY: 3, REG_WEIGHT_KEY: 0.5})
    uncached = settings_from_flat(
        {k: v for k, v in record.items() if k not in (ROUND_KEY, REG_WEIGHT_KEY)}
    )
    for _ in range(2):  # a miss, then a hit
        decoded, per_round = decode_config(record)
        assert OmegaConf.to_container(decoded) == OmegaConf.to_container(uncached)
        assert OmegaConf.to_container(decoded) == OmegaConf.to_container(cfg)
        assert per_round == {ROUND_KEY: 3, REG_WEIGHT_KEY: 0.5}


def test_cache_hits_across_rounds_and_tells_configs_apart():
    protocol._decode_settings.cache_clear()
    first, _ = decode_config(encode_config(default_config(), **{ROUND_KEY: 1}))
    again, per_round = decode_config(encode_config(default_config(), **{ROUND_KEY: 2}))
    assert again is first and per_round == {ROUND_KEY: 2}  # per-round values are not settings
    assert protocol._decode_settings.cache_info().hits == 1
    other, _ = decode_config(encode_config(changed_config(), **{ROUND_KEY: 2}))
    assert other.strategy.name == "fedmeta" and first.strategy.name == "metagater"


def test_value_types_are_part_of_the_key():
    # 2 == 2.0 == True as dict keys; the decode must not hand one's result to the other.
    flat = to_flat(default_config())
    as_int = decode_config({**flat, "adapt.backbone_lr": 2})[0]
    as_float = decode_config({**flat, "adapt.backbone_lr": 2.0})[0]
    assert as_int.adapt.backbone_lr == as_float.adapt.backbone_lr == 2.0
    with pytest.raises(Exception, match=r"task\.ways"):
        decode_config({**flat, "task.ways": 2.5})


def test_decoded_config_is_read_only_and_errors_are_not_cached():
    cfg, _ = decode_config(encode_config(default_config()))
    with pytest.raises(ReadonlyConfigError):
        cfg.task.ways = 3
    assert decode_config(encode_config(default_config()))[0].task.ways == 5
    for _ in range(2):
        with pytest.raises(KeyError, match=r"task\.wayz"):
            decode_config({**to_flat(default_config()), "task.wayz": 3})


def plausible_report(**changes):
    report = {key: (low + min(high, 1.0)) / 2 for key, (low, high) in REPORT_RANGES.items()}
    report.update({"dense-macs": 1000.0, "layer-active": [1.0, 0.5], "open-frequency": [1.0] * 4})
    return {**report, **changes}


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({}, None),
        ({"accuracy": 1.5}, "accuracy=1.5 is outside [0.0, 1.0]"),
        ({"loss": float("nan")}, "loss=nan is outside"),
        ({"macs": True}, "macs is True, not a number"),
        ({"flops-ratio": None}, "no flops-ratio"),
        ({"layer-active": [1.0]}, "layer-active must list 2 ratios"),
        ({"open-frequency": [1.0, 1.0, 1.0, 2.0]}, "open-frequency values must lie in [0, 1]"),
    ],
)
def test_one_range_check_judges_training_replies_and_evaluation_reports(changes, reason):
    """Training metrics and target-node reports go through the same check (range_problem)."""
    problem = report_problem(plausible_report(**changes), layers=2, channels=4)
    assert problem == reason or (reason is not None and problem.startswith(reason))
    train = {
        key: high if high < float("inf") else 3.0 for key, (_, high) in TRAIN_METRIC_RANGES.items()
    }
    assert range_problem(train, TRAIN_METRIC_RANGES) is None
    lying = {**train, "query-accuracy": 1.01}
    assert range_problem(lying, TRAIN_METRIC_RANGES) == "query-accuracy=1.01 is outside [0.0, 1.0]"
