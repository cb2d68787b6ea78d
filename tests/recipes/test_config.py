"""Configuration: presets, TOML files and --key value overrides, with errors for bad input."""

from __future__ import annotations

import pytest

from recipes.memdlm.config import PRESETS, ConfigError, build_config, parse_overrides


def test_default_preset_is_cpu_tiny_with_the_scanned_inner_lr():
    cfg = build_config()
    assert cfg.preset == "cpu-tiny"
    assert (cfg.memdlm.rank, cfg.memdlm.alpha, cfg.memdlm.grad_transform) == (8, 16.0, "clip")
    assert (cfg.memdlm.inner_lr, cfg.memdlm.inner_clip) == (0.3, 1.0)


def test_gpu_preset_keeps_the_papers_inner_loop():
    m = build_config("gpu").memdlm
    assert (m.inner_steps, m.s_pre, m.inner_lr, m.inner_clip) == (2, 1.5, 0.1, 1.0)
    assert (m.rank, m.alpha, m.layer_fraction, m.grad_transform) == (32, 64.0, 0.1, "clip")
    assert m.targets == ["gate_proj", "up_proj", "down_proj"]


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset_validates(preset):
    assert build_config(preset).preset == preset


def test_overrides_are_typed_and_nested():
    tree = parse_overrides(
        [
            "--memdlm.inner_lr",
            "0.3",
            "--seed=7",
            "--memdlm.targets",
            "gate_proj,down_proj",
            "--memdlm.per_sample",
            "true",
        ]
    )
    cfg = build_config(overrides=tree)
    assert cfg.memdlm.inner_lr == 0.3 and cfg.seed == 7 and cfg.memdlm.per_sample is True
    assert cfg.memdlm.targets == ["gate_proj", "down_proj"]


def test_toml_then_overrides(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text("seed = 3\n[train]\nsteps = 12\nlr = 0.001\n")
    cfg = build_config("smoke", path, parse_overrides(["--train.steps", "5"]))
    assert (cfg.seed, cfg.train.steps, cfg.train.lr) == (3, 5, 0.001)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--memdlm.inner_lrr", "1"], "unknown config key 'memdlm.inner_lrr'"),
        (["--train.steps", "0"], "train.steps"),
        (["--memdlm.strategy", "nope"], "memdlm.strategy"),
        (["--model.n_heads", "3"], "not divisible"),
        (["--memdlm.layer_fraction", "1.5"], "memdlm.layer_fraction"),
        (
            [
                "--data.pretrain_curriculum",
                '[{"tasks": [], "context_lengths": [48], "fraction": 0.2}]',
            ],
            "data.pretrain_curriculum.0.tasks",
        ),
        (
            ["--data.pretrain_curriculum", '[{"tasks": ["single"], "context_lengths": [48]}]'],
            "data.pretrain_curriculum.0.fraction",
        ),
    ],
)
def test_bad_values_name_the_key(args, message):
    with pytest.raises(ConfigError, match=message):
        build_config(overrides=parse_overrides(args))


def test_model_shorthand_names_the_model_path():
    assert parse_overrides(["--model", "/m", "--model.dtype=bfloat16"]) == {
        "model": {"path": "/m", "dtype": "bfloat16"}
    }


def test_malformed_override_syntax():
    with pytest.raises(ConfigError, match="needs a value"):
        parse_overrides(["--seed"])
    with pytest.raises(ConfigError, match="expected an option"):
        parse_overrides(["seed", "3"])


def test_bad_toml_and_missing_file(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("seed = = 3\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        build_config("smoke", bad)
    with pytest.raises(ConfigError, match="does not exist"):
        build_config("smoke", tmp_path / "missing.toml")
    with pytest.raises(ConfigError, match="unknown preset"):
        build_config("huge")


def test_a_curriculum_stage_is_a_toml_array_of_tables(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text(
        '[[data.pretrain_curriculum]]\ntasks = ["single"]\ncontext_lengths = [48]\n'
        "fraction = 0.25\n\n"
        '[[data.pretrain_curriculum]]\ntasks = ["single", "multikey"]\n'
        "context_lengths = [88]\nfraction = 0.25\n"
    )
    stages = build_config("smoke", path).data.pretrain_curriculum
    assert [(s.tasks, s.context_lengths, s.fraction) for s in stages] == [
        (["single"], [48], 0.25),
        (["single", "multikey"], [88], 0.25),
    ]


def test_variants_and_the_compute_matched_standard():
    from recipes.memdlm.config import VARIANTS, variant_config

    cfg = build_config("smoke", overrides={"variants": "leak_free"})
    assert cfg.variants == ["leak_free"] and cfg.standard_anchors() == 1
    method, matched = variant_config(cfg, "standard_matched")
    assert method == "standard" and matched.variants == []
    assert matched.standard_anchors() == cfg.memdlm.inner_passes() + 1 == 3
    deeper = build_config(
        "smoke",
        overrides={
            "memdlm": {"inner_steps": 3, "inner_epochs": 2},
            "standard": {"anchors": "matched"},
        },
    )
    assert deeper.standard_anchors() == 7
    for name in VARIANTS:
        variant_config(cfg, name)  # every named variant is a valid configuration
    with pytest.raises(ConfigError, match="unknown variant"):
        build_config("smoke", overrides={"variants": ["nope"]})
    with pytest.raises(ConfigError, match="standard.anchors"):
        build_config("smoke", overrides={"standard": {"anchors": 0}})
