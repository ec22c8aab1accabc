"""Structure vocabularies, harmonised cross-modality flags, body regions and age groups.

The vocabularies are TotalSegmentator's own mask names (CT v2.0.1 task "total": 117; MRI v2.0.0
task "total_mr": 50). This module owns the one structure -> body-region map used by prompts and
queries.
"""

from __future__ import annotations

import re

import numpy as np
import pandas as pd

_RIBS = [f"rib_{side}_{i}" for side in ("left", "right") for i in range(1, 13)]
_CERVICAL = [f"vertebrae_C{i}" for i in range(1, 8)]
_THORACIC = [f"vertebrae_T{i}" for i in range(1, 13)]
_LUMBAR = [f"vertebrae_L{i}" for i in range(1, 6)]
LUNG_LOBES_LEFT = ["lung_lower_lobe_left", "lung_upper_lobe_left"]
LUNG_LOBES_RIGHT = ["lung_lower_lobe_right", "lung_middle_lobe_right", "lung_upper_lobe_right"]

_SHARED = [
    "adrenal_gland_left",
    "adrenal_gland_right",
    "aorta",
    "autochthon_left",
    "autochthon_right",
    "brain",
    "clavicula_left",
    "clavicula_right",
    "colon",
    "duodenum",
    "esophagus",
    "femur_left",
    "femur_right",
    "gallbladder",
    "gluteus_maximus_left",
    "gluteus_maximus_right",
    "gluteus_medius_left",
    "gluteus_medius_right",
    "gluteus_minimus_left",
    "gluteus_minimus_right",
    "heart",
    "hip_left",
    "hip_right",
    "humerus_left",
    "humerus_right",
    "iliac_artery_left",
    "iliac_artery_right",
    "iliac_vena_left",
    "iliac_vena_right",
    "iliopsoas_left",
    "iliopsoas_right",
    "inferior_vena_cava",
    "kidney_left",
    "kidney_right",
    "liver",
    "pancreas",
    "portal_vein_and_splenic_vein",
    "prostate",
    "sacrum",
    "scapula_left",
    "scapula_right",
    "small_bowel",
    "spinal_cord",
    "spleen",
    "stomach",
    "urinary_bladder",
]
_CT_ONLY = [
    "atrial_appendage_left",
    "brachiocephalic_trunk",
    "brachiocephalic_vein_left",
    "brachiocephalic_vein_right",
    "common_carotid_artery_left",
    "common_carotid_artery_right",
    "costal_cartilages",
    "kidney_cyst_left",
    "kidney_cyst_right",
    "pulmonary_vein",
    "skull",
    "sternum",
    "subclavian_artery_left",
    "subclavian_artery_right",
    "superior_vena_cava",
    "thyroid_gland",
    "trachea",
    "vertebrae_S1",
    *LUNG_LOBES_LEFT,
    *LUNG_LOBES_RIGHT,
    *_RIBS,
    *_CERVICAL,
    *_THORACIC,
    *_LUMBAR,
]
_MRI_ONLY = ["intervertebral_discs", "lung_left", "lung_right", "vertebrae"]

# Python string sort, as TotalSegmentator lists them (rib_left_1, rib_left_10, ...).
CT_STRUCTURES: list[str] = sorted(_SHARED + _CT_ONLY)
MRI_STRUCTURES: list[str] = sorted(_SHARED + _MRI_ONLY)
ALL_STRUCTURES: list[str] = sorted(set(CT_STRUCTURES) | set(MRI_STRUCTURES))
VOCABULARY = {"ct": CT_STRUCTURES, "mri": MRI_STRUCTURES}

# TotalSegmentator's class ids (its multilabel output and label tables: map_to_binary.py's class_map
# "total" for CT, "total_mr" for MRI, current releases): the name of id i is entry i - 1. Early v2
# releases numbered ribs 92-115 in another order.
_CT_CLASS_ORDER = [
    "spleen", "kidney_right", "kidney_left", "gallbladder", "liver", "stomach", "pancreas",
    "adrenal_gland_right", "adrenal_gland_left", "lung_upper_lobe_left", "lung_lower_lobe_left",
    "lung_upper_lobe_right", "lung_middle_lobe_right", "lung_lower_lobe_right", "esophagus",
    "trachea", "thyroid_gland", "small_bowel", "duodenum", "colon", "urinary_bladder", "prostate",
    "kidney_cyst_left", "kidney_cyst_right", "sacrum", "vertebrae_S1",
    *reversed(_LUMBAR), *reversed(_THORACIC), *reversed(_CERVICAL),
    "heart", "aorta", "pulmonary_vein", "brachiocephalic_trunk", "subclavian_artery_right",
    "subclavian_artery_left", "common_carotid_artery_right", "common_carotid_artery_left",
    "brachiocephalic_vein_left", "brachiocephalic_vein_right", "atrial_appendage_left",
    "superior_vena_cava", "inferior_vena_cava", "portal_vein_and_splenic_vein",
    "iliac_artery_left", "iliac_artery_right", "iliac_vena_left", "iliac_vena_right",
    "humerus_left", "humerus_right", "scapula_left", "scapula_right", "clavicula_left",
    "clavicula_right", "femur_left", "femur_right", "hip_left", "hip_right", "spinal_cord",
    "gluteus_maximus_left", "gluteus_maximus_right", "gluteus_medius_left", "gluteus_medius_right",
    "gluteus_minimus_left", "gluteus_minimus_right", "autochthon_left", "autochthon_right",
    "iliopsoas_left", "iliopsoas_right", "brain", "skull",
    *_RIBS, "sternum", "costal_cartilages",
]  # fmt: skip
_MRI_CLASS_ORDER = [
    "spleen", "kidney_right", "kidney_left", "gallbladder", "liver", "stomach", "pancreas",
    "adrenal_gland_right", "adrenal_gland_left", "lung_left", "lung_right", "esophagus",
    "small_bowel", "duodenum", "colon", "urinary_bladder", "prostate", "sacrum", "vertebrae",
    "intervertebral_discs", "spinal_cord", "heart", "aorta", "inferior_vena_cava",
    "portal_vein_and_splenic_vein", "iliac_artery_left", "iliac_artery_right", "iliac_vena_left",
    "iliac_vena_right", "humerus_left", "humerus_right", "scapula_left", "scapula_right",
    "clavicula_left", "clavicula_right", "femur_left", "femur_right", "hip_left", "hip_right",
    "gluteus_maximus_left", "gluteus_maximus_right", "gluteus_medius_left", "gluteus_medius_right",
    "gluteus_minimus_left", "gluteus_minimus_right", "autochthon_left", "autochthon_right",
    "iliopsoas_left", "iliopsoas_right", "brain",
]  # fmt: skip
CLASS_IDS: dict[str, dict[str, int]] = {
    modality: {name: i + 1 for i, name in enumerate(order)}
    for modality, order in (("ct", _CT_CLASS_ORDER), ("mri", _MRI_CLASS_ORDER))
}

# MRI names that CT splits into parts: the CT flag is the OR of its parts, so one column means
# the same thing in both modalities.
HARMONISED: dict[str, list[str]] = {
    "lung_left": LUNG_LOBES_LEFT,
    "lung_right": LUNG_LOBES_RIGHT,
    "vertebrae": _CERVICAL + _THORACIC + _LUMBAR + ["vertebrae_S1"],
}


def _regions() -> dict[str, str]:
    groups: dict[str, list[str]] = {
        "cervical spine": _CERVICAL,
        "thoracic spine": _THORACIC,
        "lumbar spine": _LUMBAR,
        "sacrum": ["sacrum", "vertebrae_S1"],
        "spinal canal": ["spinal_cord", "intervertebral_discs", "vertebrae"],
        "paraspinal muscles": ["autochthon_left", "autochthon_right"],
        "brain": ["brain"],
        "skull": ["skull"],
        "thyroid": ["thyroid_gland"],
        "lungs": ["lung_left", "lung_right", *LUNG_LOBES_LEFT, *LUNG_LOBES_RIGHT],
        "heart": ["heart", "atrial_appendage_left", "pulmonary_vein"],
        "mediastinum": [
            "trachea",
            "esophagus",
            "brachiocephalic_trunk",
            "brachiocephalic_vein_left",
            "brachiocephalic_vein_right",
            "superior_vena_cava",
            "subclavian_artery_left",
            "subclavian_artery_right",
            "common_carotid_artery_left",
            "common_carotid_artery_right",
        ],
        "rib cage": ["sternum", "costal_cartilages", *_RIBS],
        "shoulder girdle": [
            "scapula_left",
            "scapula_right",
            "humerus_left",
            "humerus_right",
            "clavicula_left",
            "clavicula_right",
        ],
        "liver": ["liver"],
        "gallbladder": ["gallbladder"],
        "spleen": ["spleen"],
        "pancreas": ["pancreas"],
        "stomach": ["stomach"],
        "kidneys": ["kidney_left", "kidney_right", "kidney_cyst_left", "kidney_cyst_right"],
        "adrenal glands": ["adrenal_gland_left", "adrenal_gland_right"],
        "bowel": ["colon", "small_bowel", "duodenum"],
        "abdominal vasculature": ["aorta", "inferior_vena_cava", "portal_vein_and_splenic_vein"],
        "pelvic vasculature": [
            "iliac_artery_left",
            "iliac_artery_right",
            "iliac_vena_left",
            "iliac_vena_right",
        ],
        "bony pelvis": ["hip_left", "hip_right"],
        "proximal femur": ["femur_left", "femur_right"],
        "gluteal muscles": [
            "gluteus_maximus_left",
            "gluteus_maximus_right",
            "gluteus_medius_left",
            "gluteus_medius_right",
            "gluteus_minimus_left",
            "gluteus_minimus_right",
        ],
        "hip flexors": ["iliopsoas_left", "iliopsoas_right"],
        "urinary bladder": ["urinary_bladder"],
        "prostate": ["prostate"],
    }
    return {s: region for region, names in groups.items() for s in names}


STRUCTURE_REGION: dict[str, str] = _regions()
REGIONS: list[str] = sorted(set(STRUCTURE_REGION.values()))
assert set(STRUCTURE_REGION) == set(ALL_STRUCTURES), set(ALL_STRUCTURES) ^ set(STRUCTURE_REGION)

AGE_GROUPS: list[str] = ["<40", "40-60", "60-80", ">=80"]


def regions_of(structures) -> list[str]:
    """Sorted, de-duplicated body regions of the given structures (unknown names ignored)."""
    return sorted({STRUCTURE_REGION[s] for s in structures if s in STRUCTURE_REGION})


def age_group(age, style: str = "canonical") -> pd.Series:
    """Age groups with left-closed edges [0,40) [40,60) [60,80) [80,inf) (canonical) or the
    published right-closed bins [0,40] (40,60] (60,80] (80,inf). Missing ages give null."""
    ages = pd.to_numeric(pd.Series(age), errors="coerce").astype(float)
    edges = [0.0, 40.0, 60.0, 80.0, np.inf]
    right = style == "published"
    groups = pd.cut(ages, bins=edges, labels=AGE_GROUPS, right=right, include_lowest=True)
    return groups.astype(object).where(groups.notna(), None)


_SEX_WORDS = {"m": "m", "male": "m", "man": "m", "f": "f", "female": "f", "woman": "f", "w": "f"}
_AGE_UNITS = {"y": 1.0, "m": 1 / 12, "w": 7 / 365.25, "d": 1 / 365.25}
_AGE_RE = re.compile(
    r"(\d+(?:\.\d+)?)\s*(y|yr|yrs|years?|m|mo|months?|w|weeks?|d|days?)?", re.IGNORECASE
)


def normalise_sex(value: str | None) -> tuple[str | None, bool]:
    """``Male`` -> ``m``, ``F`` -> ``f``; (None, False) for a value that says neither."""
    if value is None or not str(value).strip():
        return None, True
    sex = _SEX_WORDS.get(str(value).strip().lower())
    return sex, sex is not None


def normalise_age(value: str | None) -> tuple[float | None, bool]:
    """Years from ``45``, ``45.5``, ``045Y`` (DICOM), ``6M``, ``45 years``; else (None, False)."""
    if value is None or not str(value).strip():
        return None, True
    m = _AGE_RE.fullmatch(str(value).strip())
    if not m:
        return None, False
    unit = (m.group(2) or "y")[0].lower()
    years = float(m.group(1)) * _AGE_UNITS[unit]
    return (years, True) if years < 150 else (None, False)
