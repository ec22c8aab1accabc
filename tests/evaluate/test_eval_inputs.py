import pandas as pd
import pytest

from sail.errors import SailError
from sail.evaluate.inputs import load_eval_data, load_sparse, parse_config_name, read_final_metrics

from .eval_builders import build_workspace


def test_config_names_with_any_number_of_levels_and_suffixes():
    assert parse_config_name("D_128_512_2048_8192_K_20_40_80_160") == (
        [128, 512, 2048, 8192],
        [20, 40, 80, 160],
    )
    assert parse_config_name("D_64_256_K_40-global-h1a2b3c") == ([64, 256], [40])
    assert parse_config_name("D_1024_K_5") == ([1024], [5])
    assert parse_config_name("my_sae") is None


def test_final_metrics_are_the_last_validation_row_of_the_largest_level(tmp_path):
    path = tmp_path / "metrics.csv"
    pd.DataFrame(
        [
            {
                "step": 1,
                "split": "valid",
                "level": 1,
                "l0": 5.0,
                "fvu": 0.5,
                "r2_published": 0.5,
                "dead_frac": 0.2,
            },
            {
                "step": 2,
                "split": "valid",
                "level": 0,
                "l0": 2.0,
                "fvu": 0.7,
                "r2_published": 0.3,
                "dead_frac": 0.1,
            },
            {
                "step": 2,
                "split": "valid",
                "level": 1,
                "l0": 6.0,
                "fvu": 0.4,
                "r2_published": 0.6,
                "dead_frac": 0.1,
            },
            {
                "step": 3,
                "split": "train",
                "level": 1,
                "l0": 9.0,
                "fvu": 0.1,
                "r2_published": 0.9,
                "dead_frac": 0.0,
            },
        ]
    ).to_csv(path, index=False)
    assert read_final_metrics(path) == {
        "l0": 6.0,
        "fvu": 0.4,
        "r2_published": 0.6,
        "dead_frac": 0.1,
    }
    assert read_final_metrics(tmp_path / "missing.csv") == {}


def test_activations_missing_slices_of_the_split_name_the_file(tmp_path):
    ws = build_workspace(tmp_path / "ws")
    data = load_eval_data(ws)
    codes = load_sparse(ws, "enc", "matryoshka", "D_16_64_K_4_8", data)
    assert codes.shape == (len(data.slices), 64)
    split = pd.read_csv(ws.split_csv)
    split.loc[split.index[:3], "split"] = (
        "valid"  # the split changed after the activations were written
    )
    split.to_csv(ws.split_csv, index=False)
    with pytest.raises(SailError, match="activations"):
        load_sparse(ws, "enc", "matryoshka", "D_16_64_K_4_8", load_eval_data(ws))
