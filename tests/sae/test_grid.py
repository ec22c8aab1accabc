"""Grids: the published 28, demo, YAML files, variant rules, shards and families."""

from __future__ import annotations

import pytest

from sail.errors import SailError
from sail.sae.grid import families, load_grid, shard_entries, with_seeds
from sail.shards import parse_shard
from sail.workspace import hash_config


def test_paper_grid_has_28_configs_in_4_families():
    entries = load_grid("paper", ["sail"])
    assert len(entries) == 28
    names = [e.name for e in entries]
    assert names[0] == "D_16_64_256_1024_K_5_5_5_5"
    assert "D_128_512_2048_8192_K_20_40_80_160" in names
    assert "D_16_64_256_1024_K_20_20_20_20" not in names  # K > D at level 0: skipped as published
    assert [len(f) for f in families(entries)] == [4, 8, 8, 8]


def test_demo_grid_expands_variants_and_global_is_matryoshka_only():
    entries = load_grid("demo", ["matryoshka", "sail"])
    by_variant = {
        v: [e.name for e in entries if e.spec.variant == v] for v in ("matryoshka", "sail")
    }
    assert len(by_variant["matryoshka"]) == 3 and len(by_variant["sail"]) == 2
    assert any(n.startswith("D_16_64_256_K_16-global-h") for n in by_variant["matryoshka"])
    assert len(families(entries)) == 3


def test_yaml_grid_file_and_errors(tmp_path):
    path = tmp_path / "grid.yaml"
    path.write_text(
        "training: {recipe: published, epochs: 100, batch_size: 2048, lr: 1.0e-4, seed: 42}\n"
        "configs:\n"
        "  - {variant: sail, dict_sizes: [128, 512, 2048, 8192], k_values: [20, 40, 80, 160]}\n"
        "  - {variant: matryoshka, topk_mode: global, dict_sizes: [64, 256, 1024, 4096],"
        " k_values: [40]}\n"
    )
    entries = load_grid(str(path), ["matryoshka"])
    assert [e.name for e in entries] == [
        "D_128_512_2048_8192_K_20_40_80_160",
        "D_64_256_1024_4096_K_40-global",
    ]
    with pytest.raises(SailError, match="conflicts with --variant"):
        load_grid(str(path), ["matryoshka"], variants_explicit=True)
    path.write_text("configs:\n  - {dict_sizes: [4, 8], k_values: [1, 2], width: 3}\n")
    with pytest.raises(SailError, match=r"configs\[0\].*width"):
        load_grid(str(path), ["sail"])
    path.write_text("training: {epoch: 3}\nconfigs: []\n")
    with pytest.raises(SailError, match="epoch"):
        load_grid(str(path), ["sail"])
    with pytest.raises(SailError, match="nope.yaml"):
        load_grid("nope.yaml", ["sail"])


def test_non_default_settings_change_the_folder_name():
    a = load_grid([{"dict_sizes": [4, 8], "k_values": [1, 2]}], ["sail"])[0]
    b = load_grid([{"dict_sizes": [4, 8], "k_values": [1, 2]}], ["sail"], overrides={"epochs": 3})[
        0
    ]
    c = load_grid(
        [{"dict_sizes": [4, 8], "k_values": [1, 2]}], ["sail"], overrides={"auxk_alpha": 0.5}
    )[0]
    assert a.name == "D_4_8_K_1_2" and b.name.startswith("D_4_8_K_1_2-h") and c.name == a.name


def test_shards_are_contiguous_and_cover_the_grid():
    entries = load_grid("paper", ["sail"])
    parts = [shard_entries(entries, f"{i}/4") for i in range(4)]
    assert [e for p in parts for e in p] == entries
    assert [len(p) for p in parts] == [7, 7, 7, 7]
    assert shard_entries(entries, None) == entries
    for bad in ("4/4", "1-2", "0/0"):
        with pytest.raises(SailError, match="shard"):
            parse_shard(bad)


def test_recipe_naming_keeps_published_names_stable():
    cfg = [{"dict_sizes": [4, 8], "k_values": [1, 2]}]
    sail, mat = load_grid(cfg, ["sail", "matryoshka"])
    assert sail.name == "D_4_8_K_1_2"  # sail keeps the published recipe: import-sae's folder name
    assert mat.name.startswith("D_4_8_K_1_2-h")  # matryoshka trains with the auto recipe by default
    published = load_grid(cfg, ["matryoshka"], overrides={"recipe": "published"})[0]
    assert published.name == "D_4_8_K_1_2"
    # under auto an explicit value equal to the published default still changes the model
    assert load_grid(cfg, ["matryoshka"], overrides={"lr": 1e-4})[0].name != mat.name
    assert (
        load_grid(cfg, ["matryoshka"], overrides={"recipe": "published", "lr": 1e-4})[0].name
        == "D_4_8_K_1_2"
    )
    assert load_grid(cfg, ["sail"], overrides={"recipe": "auto"})[0].name.startswith(
        "D_4_8_K_1_2-h"
    )
    # configs/paper.yaml (recipe published, permutation fixed): the names from before recipes
    # existed
    paper = load_grid(
        "paper", ["sail", "matryoshka"], overrides={"recipe": "published", "permutation": "fixed"}
    )
    suffix = "-h" + hash_config({"permutation": "fixed"})[:6]
    assert all(e.name == e.spec.published_name + suffix for e in paper)


def test_seeds_add_replicates_after_the_configs_without_renaming_them():
    entries = load_grid("demo", ["matryoshka", "sail"])
    assert with_seeds(entries, None, []) == entries
    assert with_seeds(entries, [42], []) == entries  # the grid's own seed: nothing changes
    out = with_seeds(entries, [42, 1, 2], ["matryoshka/D_16_64_256_K_8_16_32"])
    assert out[: len(entries)] == entries
    replicates = out[len(entries) :]
    base = next(
        e.name
        for e in entries
        if e.spec.variant == "matryoshka" and e.name.startswith("D_16_64_256_K_8_16_32-h")
    )
    assert [(e.name, e.settings.seed) for e in replicates] == [
        (f"{base}/seed-1", 1),
        (f"{base}/seed-2", 2),
    ]
    assert replicates[0].record_config() != entries[2].record_config()
    assert len(families(out)) == 5  # a replicate never shares batches with other seeds
    every = with_seeds(entries, [0, 5], [])
    assert len(every) == 2 * len(entries)
    assert all(e.settings.seed == 0 for e in every[: len(entries)])
    assert {e.name for e in every[: len(entries)]}.isdisjoint(e.name for e in entries)
    with pytest.raises(SailError, match="replicate_configs.*'D_9_K_1'.*match no config"):
        with_seeds(entries, [42, 1], ["D_9_K_1"])


def test_seeds_config_errors():
    from pydantic import ValidationError

    from sail.config import TrainConfig

    with pytest.raises(ValidationError, match="repeat a seed"):
        TrainConfig(seeds=[1, 1])
    with pytest.raises(ValidationError, match="training.seed 3 and seeds"):
        TrainConfig(seeds=[1, 2], training={"seed": 3})
    assert TrainConfig(seeds=[3, 2], training={"seed": 3}).seeds == [3, 2]
