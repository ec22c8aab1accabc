import numpy as np
import pandas as pd
import pytest

from sail.config import SplitConfig
from sail.data.split import make_split


def synthetic_scans(n: int = 600, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    df = pd.DataFrame(
        {
            "modality": rng.choice(["ct", "mri"], n, p=[0.67, 0.33]),
            "image_id": [f"s{i:04d}" for i in range(n)],
            "institute": rng.choice(list("ABCDEFGHIJ"), n),
            "sex": rng.choice(["f", "m"], n).astype(object),
            "age_group": rng.choice(["<40", "40-60", "60-80", ">=80"], n).astype(object),
        }
    )
    df.loc[rng.choice(n, min(25, n // 4), replace=False), "sex"] = None
    df.loc[rng.choice(n, min(25, n // 4), replace=False), "age_group"] = None
    # reuse some ids across modalities, as TotalSegmentator does
    df.loc[df.modality == "mri", "image_id"] = [
        f"s{i:04d}" for i in range((df.modality == "mri").sum())
    ]
    return df


@pytest.fixture(scope="module")
def split_df():
    return make_split(synthetic_scans(), SplitConfig())


def test_no_scan_in_two_splits(split_df):
    assert not split_df.duplicated(["modality", "image_id"]).any()
    assert set(split_df.split) == {"train", "valid", "test"}


def test_held_out_institutes_only_and_all_in_test(split_df):
    held = split_df.institute.isin(["A", "D", "E"])
    assert (split_df.loc[held, "split"] == "test").all()
    assert (split_df.loc[~held, "split"] != "test").all()


def test_proportions_within_tolerance(split_df):
    rest = split_df[split_df.split != "test"]
    assert abs((rest.split == "train").mean() - 0.8) < 0.02
    known = rest.dropna(subset=["sex", "age_group"])
    strata = known.groupby(["modality", "sex", "age_group"]).split.apply(
        lambda s: (s == "train").mean()
    )
    assert (strata.between(0.65, 0.95)).all(), strata


def test_deterministic_and_seed_dependent():
    a = make_split(synthetic_scans(), SplitConfig())
    b = make_split(synthetic_scans(), SplitConfig())
    c = make_split(synthetic_scans(), SplitConfig(seed=1))
    assert a.split.tolist() == b.split.tolist()
    assert a.split.tolist() != c.split.tolist()


def test_unknown_sex_or_age_assigned(split_df):
    unknown = split_df[
        (split_df.sex.isna() | split_df.age_group.isna()) & (split_df.split != "test")
    ]
    assert len(unknown) > 0 and set(unknown.split) <= {"train", "valid"}


def test_single_scan_stratum_is_merged_with_warning(caplog):
    df = synthetic_scans(200)
    df.loc[0, ["modality", "sex", "age_group", "institute"]] = ["mri", "m", ">=80", "B"]
    df = df[
        ~((df.modality == "mri") & (df.sex == "m") & (df.age_group == ">=80")) | (df.index == 0)
    ]
    caplog.set_level("WARNING")
    out = make_split(df, SplitConfig())
    assert "mri|m|>=80 has a single scan; merged into mri|" in caplog.text
    assert out.loc[out.index[0], "split"] in ("train", "valid")


def test_tiny_dataset_without_held_out_institutes_gets_a_seeded_test_split():
    df = synthetic_scans(6)
    df["institute"] = "B"
    out = make_split(df, SplitConfig())
    assert (out.split == "test").sum() == 1 and (out.split == "train").sum() >= 3
    two = make_split(synthetic_scans(2).assign(institute=None), SplitConfig())
    assert sorted(two.split) == ["test", "train"]  # never an empty test split


def test_patient_groups_stay_on_one_side_and_fallback_test_is_grouped():
    df = synthetic_scans(300, seed=3)
    df["group"] = [f"p{i // 3}" for i in range(len(df))]  # three volumes per patient
    df.loc[df.index[::7], "group"] = None  # some volumes without a patient key split alone
    for institutes in (["A", "D", "E"], ["Z"]):
        out = make_split(df, SplitConfig(test_institutes=institutes))
        per_group = out.dropna(subset=["group"]).groupby("group").split.nunique()
        assert (per_group == 1).all()
        assert set(out.split) == {"train", "valid", "test"}
        if institutes == ["Z"]:
            share = out.dropna(subset=["group"]).groupby("group").split.first().eq("test").mean()
            assert 0.1 < share < 0.3
    assert make_split(df, SplitConfig(test_institutes=["Z"])).split.tolist() == out.split.tolist()
