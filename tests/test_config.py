import dataclasses

import pytest

from utils.train.config import TrainConfig, parse_train_args


def test_command_line_builds_a_typed_config_with_backbone_flags():
    config = parse_train_args("BRN", ["--milestone", "2", "4", "--batch_size", "3"])
    assert isinstance(config, TrainConfig)
    assert config.batch_size == 3 and config.recipe.model_name == "BRN"
    assert config.backbone == {"inter_iter": 8, "milestone": [2, 4]}
    assert config.milestone == [2, 4]  # the recipe's scheduler reads its flag as an attribute
    with pytest.raises(AttributeError, match="no field or backbone flag 'milestones'"):
        _ = config.milestones
    flags = config.flags()
    assert flags["milestone"] == [2, 4] and flags["batch_size"] == 3 and "recipe" not in flags


def test_config_changed_in_code_and_rebuilt_from_checkpoint_flags():
    config = dataclasses.replace(parse_train_args("DRSformer", []), crop_size=32, lr=1e-4)
    assert (config.crop_size, config.lr, config.num_blocks) == (32, 1e-4, [4, 6, 6, 8])
    import argparse

    again = TrainConfig.from_namespace(argparse.Namespace(**config.flags(), recipe=config.recipe))
    assert again == config


def test_demo_fine_tune_of_published_weights_is_its_own_run():
    from utils.train.config import parse_train_args

    assert parse_train_args("BRN", ["--demo"]).save_path == "runs/demo_BRN"
    assert parse_train_args("BRN", ["--demo", "--pretrained", "baseline-brn"]).save_path == \
        "runs/demo_BRN_from_baseline-brn"  # never resumes (and reports) the from-scratch demo run
    assert parse_train_args("BRN", ["--demo", "--pretrained", "baseline-brn", "--save_path", "x"]).save_path == "x"
