import pytest

from sail.config import PUBLISHED_PROBE_STRUCTURES
from sail.data import labels
from sail.data.labels import age_group


def test_vocabularies_match_totalsegmentator():
    assert len(labels.CT_STRUCTURES) == 117 and len(labels.MRI_STRUCTURES) == 50
    assert (
        labels.CT_STRUCTURES[0] == "adrenal_gland_left"
        and labels.CT_STRUCTURES[-1] == "vertebrae_T9"
    )
    assert labels.MRI_STRUCTURES[-1] == "vertebrae"
    assert set(labels.MRI_STRUCTURES) - set(labels.CT_STRUCTURES) == {
        "intervertebral_discs",
        "lung_left",
        "lung_right",
        "vertebrae",
    }
    assert len(labels.ALL_STRUCTURES) == 121
    assert set(PUBLISHED_PROBE_STRUCTURES) <= set(labels.CT_STRUCTURES)


def test_every_structure_has_one_region():
    assert set(labels.STRUCTURE_REGION) == set(labels.ALL_STRUCTURES)
    assert len(labels.REGIONS) == 30
    assert labels.regions_of(["liver", "kidney_left", "kidney_cyst_right", "nonsense"]) == [
        "kidneys",
        "liver",
    ]


@pytest.mark.parametrize(
    "age,expected",
    [
        (0, "<40"),
        (39.99, "<40"),
        (40, "40-60"),
        (59.9, "40-60"),
        (60, "60-80"),
        (79.9, "60-80"),
        (80, ">=80"),
        (104, ">=80"),
    ],
)
def test_canonical_age_group_edges(age, expected):
    assert age_group([age]).iloc[0] == expected


def test_published_age_group_edges_are_right_closed():
    assert list(age_group([40, 80, 80.5, 0], "published")) == ["<40", "60-80", ">=80", "<40"]


def test_missing_age_gives_null():
    assert list(age_group([None, float("nan"), "unknown"])) == [None, None, None]
