"""Synthetic dataset in TotalSegmentator's exact on-disk layout, with planted concepts.

A body is drawn in RAS millimetres (z = 0 at the feet, ~1750 at the vertex) from labelled
primitives, painted in order so masks are mutually exclusive as in TotalSegmentator. Each scan
takes a study type that fixes the body range it covers. Planted concepts, all recorded in
``phantom_truth.json``: anatomy per structure, sex (prostate; breasts and wider hips in women),
age (lower bone density, brain atrophy, more subcutaneous fat), institute (noise, gain, field of
view, scanner), and a lesion where meta.csv's ``pathology`` says so.

Structures are visible the way anatomy is, never through a label-specific code: CT is rendered in
the portal-venous phase most TotalSegmentator scans were taken in (enhancing parenchyma and
vessels, water-dense bile and urine), organs sit in visceral fat inside a muscular body wall as
in a real abdomen, and each tissue has its own texture (mottled bowel gas, lung vessels, marrow
trabeculae, fine parenchymal grain), so shape, position, texture and context identify them.
"""

from __future__ import annotations

import gzip
import logging
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy.ndimage import gaussian_filter

from sail.artifacts import PHANTOM_TRUTH
from sail.config import PhantomConfig
from sail.console import track
from sail.data.labels import VOCABULARY, age_group
from sail.data.totalseg import DATASET_FOLDERS, IMAGE_FILES, META_COLUMNS
from sail.workspace import write_bytes_atomic, write_json_atomic, write_text_atomic

log = logging.getLogger(__name__)

# body range (z0, z1) in mm and in-plane field of view per study type
CT_STUDIES: dict[str, tuple[float, float, float]] = {
    "ct head": (1500, 1760, 260),
    "ct neck": (1330, 1560, 260),
    "ct thorax": (1130, 1440, 440),
    "ct abdomen": (900, 1170, 440),
    "ct pelvis": (700, 950, 440),
    "ct abdomen-pelvis": (720, 1170, 440),
    "ct thorax-abdomen-pelvis": (720, 1440, 460),
    "ct whole body": (400, 1760, 520),
    "ct polytrauma": (650, 1760, 520),
}
MRI_STUDIES: dict[str, tuple[float, float, float]] = {
    "mri head": (1500, 1760, 260),
    "mri thorax": (1130, 1440, 440),
    "mri abdomen": (900, 1170, 440),
    "mri pelvis": (700, 950, 440),
    "mri whole body": (650, 1760, 520),
}
# Institutes A-J; A, D and E (the held-out test institutes) carry about 20% of scans.
INSTITUTES: dict[str, dict] = {
    "A": dict(
        weight=0.07,
        noise=18.0,
        gain=1.00,
        fov=1.00,
        manufacturer="siemens",
        scanner="Somatom Definition Flash",
        mr="Skyra",
        kvp=120,
    ),
    "B": dict(
        weight=0.22,
        noise=8.0,
        gain=1.05,
        fov=0.95,
        manufacturer="siemens",
        scanner="Somatom Force",
        mr="Avanto_fit",
        kvp=100,
    ),
    "C": dict(
        weight=0.20,
        noise=14.0,
        gain=0.92,
        fov=1.10,
        manufacturer="philips",
        scanner="IQon Spectral CT",
        mr="Achieva",
        kvp=120,
    ),
    "D": dict(
        weight=0.07,
        noise=25.0,
        gain=1.10,
        fov=1.05,
        manufacturer="ge",
        scanner="Revolution CT",
        mr="Signa HDxt",
        kvp=80,
    ),
    "E": dict(
        weight=0.06,
        noise=10.0,
        gain=0.95,
        fov=0.90,
        manufacturer="toshiba",
        scanner="Aquilion ONE",
        mr="Vantage Titan",
        kvp=140,
    ),
    "F": dict(
        weight=0.14,
        noise=20.0,
        gain=1.02,
        fov=1.15,
        manufacturer="ge",
        scanner="LightSpeed VCT",
        mr="Signa Premier",
        kvp=120,
    ),
    "G": dict(
        weight=0.14,
        noise=6.0,
        gain=0.98,
        fov=1.00,
        manufacturer="philips",
        scanner="Brilliance 64",
        mr="Ingenia",
        kvp=100,
    ),
    "H": dict(
        weight=0.10,
        noise=12.0,
        gain=1.08,
        fov=0.92,
        manufacturer="siemens",
        scanner="Sensation 64",
        mr="Skyra",
        kvp=140,
    ),
}
PATHOLOGY_SITES = {"liver": "liver", "lung_lower_lobe_right": "lung", "kidney_left": "kidney"}


@dataclass(frozen=True)
class Primitive:
    """A labelled solid: ellipsoid (optionally a shell) or a z-aligned elliptic cylinder."""

    name: str
    centre: tuple[float, float, float]
    radii: tuple[float, float, float]
    kind: str = "ellipsoid"  # ellipsoid | cylinder | shell
    thickness: float = 0.0
    z_range: tuple[float, float] | None = None  # cylinders: z extent; ellipsoids: optional clip

    def mask(self, X, Y, Z) -> np.ndarray:
        cx, cy, cz = self.centre
        rx, ry, rz = self.radii
        if self.kind == "cylinder":
            inside = ((X - cx) / rx) ** 2 + ((Y - cy) / ry) ** 2 <= 1.0
        else:
            q = ((X - cx) / rx) ** 2 + ((Y - cy) / ry) ** 2 + ((Z - cz) / rz) ** 2
            inside = q <= 1.0
            if self.kind == "shell":
                t = self.thickness
                inner = (
                    ((X - cx) / (rx - t)) ** 2
                    + ((Y - cy) / (ry - t)) ** 2
                    + ((Z - cz) / (rz - t)) ** 2
                )
                inside = inside & (inner > 1.0)
        if self.z_range is not None:
            inside = inside & (self.z_range[0] <= Z) & (self.z_range[1] >= Z)
        return inside


def _anatomy(sex: str, age: float, rng: np.random.Generator, modality: str) -> list[Primitive]:
    """The body's structures in painting order (later ones overwrite earlier ones)."""
    j = lambda s=4.0: float(rng.normal(0, s))  # noqa: E731 - positional jitter in mm
    sc = lambda: float(rng.uniform(0.92, 1.08))  # noqa: E731 - size jitter
    brain_scale = 1.0 - 0.0025 * max(age - 40, 0)
    shoulder = 185 if sex == "m" else 165
    hip = 150 if sex == "m" else 172
    p: list[Primitive] = []
    add = lambda *a, **k: p.append(Primitive(*a, **k))  # noqa: E731 - one-line shorthand for the primitive table below
    # large containers first
    add("colon", (j(), 15 + j(), 975 + j()), (125, 75, 85), kind="shell", thickness=18)
    add("small_bowel", (j(), 45 + j(), 965 + j()), (85 * sc(), 40, 55 * sc()))
    add(
        "lung_upper_lobe_right",
        (85 + j(), j(), 1270 + j()),
        (75 * sc(), 85, 125),
        z_range=(1285, 1500),
    )
    add(
        "lung_middle_lobe_right",
        (85 + j(), 10 + j(), 1270 + j()),
        (75 * sc(), 75, 125),
        z_range=(1205, 1285),
    )
    add(
        "lung_lower_lobe_right",
        (85 + j(), j(), 1260 + j()),
        (75 * sc(), 85, 130),
        z_range=(1100, 1205),
    )
    add(
        "lung_upper_lobe_left",
        (-85 + j(), j(), 1270 + j()),
        (70 * sc(), 85, 125),
        z_range=(1245, 1500),
    )
    add(
        "lung_lower_lobe_left",
        (-85 + j(), j(), 1260 + j()),
        (70 * sc(), 85, 130),
        z_range=(1100, 1245),
    )
    add("heart", (-25 + j(), 30 + j(), 1225 + j()), (60 * sc(), 50, 55 * sc()))
    add("liver", (70 + j(), 10 + j(), 1100 + j()), (95 * sc(), 85 * sc(), 70 * sc()))
    add("gallbladder", (55 + j(), 68 + j(), 1052 + j()), (16, 15, 26 * sc()))
    add("spleen", (-95 + j(), -30 + j(), 1110 + j()), (30, 40 * sc(), 50 * sc()))
    add("stomach", (-50 + j(), 35 + j(), 1112 + j()), (45 * sc(), 35, 45))
    add("pancreas", (-10 + j(), j(2), 1062 + j(2)), (55, 12, 14))
    add("kidney_left", (-65 + j(), -45 + j(), 1030 + j()), (25, 25, 55 * sc()))
    add("kidney_right", (65 + j(), -45 + j(), 1010 + j()), (25, 25, 55 * sc()))
    add("adrenal_gland_left", (-48 + j(2), -38, 1092 + j(2)), (10, 8, 12))
    add("adrenal_gland_right", (48 + j(2), -38, 1074 + j(2)), (10, 8, 12))
    add("urinary_bladder", (j(), 60 + j(), 850 + j()), (45 * sc(), 35, 35 * sc()))
    if sex == "m":
        add("prostate", (j(2), 42 + j(2), 800 + j(2)), (18, 15, 16))
    add("gluteus_maximus_left", (-85, -95, 860), (60, 35, 75))
    add("gluteus_maximus_right", (85, -95, 860), (60, 35, 75))
    add("iliopsoas_left", (-50, -30, 0), (18, 18, 1), kind="cylinder", z_range=(850, 1060))
    add("iliopsoas_right", (50, -30, 0), (18, 18, 1), kind="cylinder", z_range=(850, 1060))
    add("autochthon_left", (-30, -88, 0), (18, 15, 1), kind="cylinder", z_range=(880, 1400))
    add("autochthon_right", (30, -88, 0), (18, 15, 1), kind="cylinder", z_range=(880, 1400))
    add("aorta", (-20, -28, 0), (12, 12, 1), kind="cylinder", z_range=(880, 1250))
    add("aorta", (5, 25, 0), (14, 14, 1), kind="cylinder", z_range=(1200, 1330))
    add("inferior_vena_cava", (25, -22, 0), (11, 11, 1), kind="cylinder", z_range=(900, 1200))
    add("esophagus", (-8, -20, 0), (7, 7, 1), kind="cylinder", z_range=(1150, 1470))
    add("hip_left", (-(hip - 60), -5, 880), (50, 42, 65))
    add("hip_right", (hip - 60, -5, 880), (50, 42, 65))
    add("sacrum", (0, -62, 858), (35, 20, 38))
    add("femur_left", (-(hip - 60), 0, 0), (20, 20, 1), kind="cylinder", z_range=(420, 850))
    add("femur_right", (hip - 60, 0, 0), (20, 20, 1), kind="cylinder", z_range=(420, 850))
    add("sternum", (j(2), 97, 0), (16, 8, 1), kind="cylinder", z_range=(1180, 1360))
    add("clavicula_left", (-80, 50, 1405), (75, 9, 9))
    add("clavicula_right", (80, 50, 1405), (75, 9, 9))
    add("scapula_left", (-(shoulder - 60), -80, 1320), (45, 10, 70))
    add("scapula_right", (shoulder - 60, -80, 1320), (45, 10, 70))
    add(
        "humerus_left", (-(shoulder + 25), 0, 0), (14, 14, 1), kind="cylinder", z_range=(1130, 1400)
    )
    add("humerus_right", (shoulder + 25, 0, 0), (14, 14, 1), kind="cylinder", z_range=(1130, 1400))
    add("trachea", (0, 35, 0), (9, 9, 1), kind="cylinder", z_range=(1290, 1480))
    add("thyroid_gland", (j(2), 40, 1450), (25, 10, 15))
    levels = [("S1", 850, 880)]
    levels += [(f"L{i}", 1060 - 36 * i, 1060 - 36 * (i - 1)) for i in range(1, 6)]
    levels += [(f"T{i}", 1380 - 26.5 * i, 1380 - 26.5 * (i - 1)) for i in range(1, 13)]
    levels += [(f"C{i}", 1480 - 14 * i, 1480 - 14 * (i - 1)) for i in range(1, 8)]
    for level, z0, z1 in levels:
        add(
            f"vertebrae_{level}",
            (0, -45, 0),
            (22, 18, 1),
            kind="cylinder",
            z_range=(z0 + 1.5, z1 - 1.5),
        )
        add(
            "intervertebral_discs",
            (0, -45, 0),
            (20, 16, 1),
            kind="cylinder",
            z_range=(z1 - 1.5, z1 + 1.5),
        )
    add("spinal_cord", (0, -72, 0), (7, 7, 1), kind="cylinder", z_range=(880, 1500))
    add("skull", (0, 0, 1632), (82, 98, 80), kind="shell", thickness=8)
    add("brain", (0, 0, 1632), (72 * brain_scale, 88 * brain_scale, 70 * brain_scale))
    if modality == "mri":
        merged = {
            "lung_upper_lobe_right": "lung_right",
            "lung_middle_lobe_right": "lung_right",
            "lung_lower_lobe_right": "lung_right",
            "lung_upper_lobe_left": "lung_left",
            "lung_lower_lobe_left": "lung_left",
        }
        p = [
            Primitive(merged.get(q.name, q.name), q.centre, q.radii, q.kind, q.thickness, q.z_range)
            for q in p
        ]
        p = [
            Primitive("vertebrae", q.centre, q.radii, q.kind, q.thickness, q.z_range)
            if q.name.startswith("vertebrae_")
            else q
            for q in p
        ]
    vocab = set(VOCABULARY[modality])
    return [q for q in p if q.name in vocab]


# intensity per structure: (CT HU in the portal-venous phase, MRI T1-like signal)
_TISSUE = {
    "lung": (-850, 30),
    "heart": (150, 320),  # enhanced blood pool
    "liver": (95, 450),
    "gallbladder": (8, 150),  # bile: water
    "spleen": (110, 300),
    "stomach": (40, 250),
    "pancreas": (85, 420),
    "kidney": (170, 380),  # enhancing cortex
    "adrenal": (45, 350),
    "bowel": (45, 280),
    "bladder": (8, 120),  # urine: water
    "prostate": (45, 330),
    "muscle": (55, 330),
    "vessel": (165, 90),  # contrast in the lumen; flow void on T1
    "esophagus": (45, 300),
    "trachea": (-950, 20),
    "thyroid": (110, 360),
    "brain": (35, 520),
    "disc": (80, 260),
    "cord": (30, 300),
}
# Texture: amplitude of a smooth random field (HU, MRI signal) per tissue; gas pockets below.
_TEXTURE = {"lung": (90, 12), "bowel": (60, 90), "stomach": (40, 60), "bone": (90, 90)}
_GRAIN = (6.0, 25.0)  # fine parenchymal grain of every other tissue
_GAS = (-800.0, 20.0)  # bowel and stomach gas
FAT = (-95.0, 850.0)  # subcutaneous and visceral fat
WALL_MM = 16.0  # muscular body wall between subcutaneous and visceral fat
PELVIC_FLOOR = 785.0  # the trunk's lower end (mm): the prostate sits just above it


_BONES = (
    "vertebrae",
    "hip_",
    "femur",
    "sacrum",
    "sternum",
    "clavicula",
    "scapula",
    "humerus",
    "skull",
)


def _tissue(name: str, bone_hu: float, marrow: float) -> tuple[float, float]:
    if name.startswith(_BONES):
        return bone_hu, marrow
    for key, value in (
        ("lung", "lung"),
        ("kidney", "kidney"),
        ("adrenal", "adrenal"),
        ("colon", "bowel"),
        ("small_bowel", "bowel"),
        ("urinary", "bladder"),
        ("gluteus", "muscle"),
        ("iliopsoas", "muscle"),
        ("autochthon", "muscle"),
        ("aorta", "vessel"),
        ("vena", "vessel"),
        ("thyroid", "thyroid"),
        ("intervertebral", "disc"),
        ("spinal", "cord"),
    ):
        if name.startswith(key) or key in name:
            return _TISSUE[value]
    return _TISSUE.get(name.split("_")[0], (40, 300))


def _texture_class(name: str) -> str:
    """Which texture a structure has: lung, bowel (gas-mottled), stomach, bone or plain grain."""
    if name.startswith("lung"):
        return "lung"
    if name.startswith(("colon", "small_bowel")):
        return "bowel"
    if name == "stomach":
        return "stomach"
    if name.startswith(_BONES):
        return "bone"
    return "grain"


def _body_mask(X, Y, Z, sex: str, age: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(body, inner-muscle, visceral cavity) masks: an outline of head, neck, trunk, arms and legs;
    the cavity is the trunk's inside less a muscular wall, where the organs lie in fat."""
    fat = 14 + 0.25 * max(age - 20, 0)
    shoulder = 185 if sex == "m" else 165
    hip = 172 if sex == "f" else 150
    trunk_rx = np.interp(Z, [PELVIC_FLOOR, 900, 1150, 1400, 1420], [hip, hip, 160, shoulder, 70])
    trunk_ry = np.interp(Z, [PELVIC_FLOOR, 1150, 1420], [115, 118, 70]) + 0.1 * fat
    trunk = ((X / trunk_rx) ** 2 + (Y / trunk_ry) ** 2 <= 1) & (Z >= PELVIC_FLOOR) & (Z <= 1420)
    neck = (X**2 + Y**2 <= 60**2) & (Z > 1420) & (Z <= 1540)
    head = (X / 85) ** 2 + (Y / 102) ** 2 + ((Z - 1632) / 118) ** 2 <= 1
    leg_r = np.interp(Z, [0, 500, 830], [45, 60, 75])
    legs = (((np.abs(X) - (hip - 60)) / leg_r) ** 2 + (Y / leg_r) ** 2 <= 1) & (Z < 830)
    arms = ((np.abs(X) - (shoulder + 25)) ** 2 + Y**2 <= 38**2) & (Z > 950) & (Z < 1410)
    body = trunk | neck | head | legs | arms
    if sex == "f":
        breasts = ((np.abs(X) - 75) / 60) ** 2 + ((Y - 110) / 45) ** 2 + ((Z - 1270) / 55) ** 2 <= 1
        body |= breasts
    inner = (
        ((X / np.maximum(trunk_rx - fat, 1)) ** 2 + (Y / np.maximum(trunk_ry - fat, 1)) ** 2 <= 1)
        & (Z >= PELVIC_FLOOR)
        & (Z <= 1420)
    )
    inner |= ((60 - fat / 3) ** 2 >= X**2 + Y**2) & (Z > 1420) & (Z <= 1540)
    inner |= head | (
        legs
        & (
            ((np.abs(X) - (hip - 60)) / np.maximum(leg_r - fat, 1)) ** 2
            + (Y / np.maximum(leg_r - fat, 1)) ** 2
            <= 1
        )
    )
    inner |= arms & ((np.abs(X) - (shoulder + 25)) ** 2 + Y**2 <= (38 - fat / 3) ** 2)
    cav_rx = np.maximum(trunk_rx - fat - WALL_MM, 1)
    cav_ry = np.maximum(trunk_ry - fat - WALL_MM, 1)
    cavity = ((X / cav_rx) ** 2 + (Y / cav_ry) ** 2 <= 1) & (Z >= 840) & (Z <= 1400)
    return body, inner, cavity


@dataclass(frozen=True)
class ScanPlan:
    modality: str
    image_id: str
    index: int
    seed: int
    size: int
    sex: str
    age: int
    institute: str
    study_type: str
    pathology: str
    pathology_site: str | None
    acquisition_axis: int  # MRI: the thick-slice axis (0 sagittal, 1 coronal, 2 axial)


def _plan_scans(cfg: PhantomConfig) -> list[ScanPlan]:
    rng = np.random.default_rng([cfg.seed, 0])
    names = list(INSTITUTES)
    weights = np.array([INSTITUTES[n]["weight"] for n in names])
    plans = []
    for modality, n, studies in (("ct", cfg.n_ct, CT_STUDIES), ("mri", cfg.n_mri, MRI_STUDIES)):
        study_names = list(studies)
        for i in range(n):
            sex = "m" if rng.random() < 0.5 else "f"
            age = int(rng.integers(18, 92))
            institute = str(rng.choice(names, p=weights / weights.sum()))
            study = (
                study_names[i % len(study_names)]
                if i < len(study_names)
                else str(rng.choice(study_names))
            )
            pathology, site = "no_pathology", None
            if modality == "ct" and rng.random() < 0.3:
                site = str(rng.choice(list(PATHOLOGY_SITES)))
                pathology = "tumor"
            plans.append(
                ScanPlan(
                    modality,
                    f"s{i:04d}",
                    i,
                    cfg.seed,
                    cfg.size,
                    sex,
                    age,
                    institute,
                    study,
                    pathology,
                    site,
                    int(rng.integers(0, 3)),
                )
            )
    return plans


def _render(plan: ScanPlan) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray], dict]:
    """Image, affine, masks by structure, and the scan's truth record."""
    rng = np.random.default_rng([plan.seed, 1 if plan.modality == "ct" else 2, plan.index])
    inst = INSTITUTES[plan.institute]
    studies = CT_STUDIES if plan.modality == "ct" else MRI_STUDIES
    z0, z1, fov = studies[plan.study_type]
    fov *= inst["fov"]
    spacing = np.full(3, fov / plan.size)
    shift = rng.normal(0, 10)
    nz = int(np.clip(round((z1 - z0) / spacing[2]), plan.size // 2, 2 * plan.size))
    shape = [plan.size, plan.size, nz]
    if plan.modality == "mri":
        spacing[plan.acquisition_axis] *= 2.0
        shape[plan.acquisition_axis] = max(8, int(round(shape[plan.acquisition_axis] / 2)))
    zc = (z0 + z1) / 2 + shift
    origin = -(np.array(shape) - 1) / 2 * spacing + np.array([0.0, 0.0, zc])
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = origin
    X = (origin[0] + np.arange(shape[0]) * spacing[0]).reshape(-1, 1, 1).astype(np.float32)
    Y = (origin[1] + np.arange(shape[1]) * spacing[1]).reshape(1, -1, 1).astype(np.float32)
    Z = (origin[2] + np.arange(shape[2]) * spacing[2]).reshape(1, 1, -1).astype(np.float32)
    full = tuple(shape)

    ct = plan.modality == "ct"
    bone_hu = max(300.0, 950.0 - 7.0 * (plan.age - 20))
    marrow = 420.0 + 4.0 * plan.age  # fatty marrow brightens T1 with age
    body, inner, cavity = _body_mask(X, Y, Z, plan.sex, plan.age)
    fat = FAT[0] if ct else FAT[1]
    image = np.where(body, fat, -1000.0 if ct else 0.0).astype(np.float32)
    image = np.where(inner, _TISSUE["muscle"][0 if ct else 1], image)
    image = np.where(cavity, fat, image)
    image = np.broadcast_to(image, full).copy()
    body_full = np.broadcast_to(body, full)
    anatomy = _anatomy(plan.sex, plan.age, rng, plan.modality)
    label = np.zeros(full, dtype=np.int16)
    names: list[str] = []
    field = gaussian_filter(rng.standard_normal(full, dtype=np.float32), sigma=1.0)
    field /= max(float(field.std()), 1e-6)
    for prim in anatomy:
        if prim.name not in names:
            names.append(prim.name)
        m = np.broadcast_to(prim.mask(X, Y, Z), full) & body_full
        label[m] = names.index(prim.name) + 1
        hu, mr = _tissue(prim.name, bone_hu, marrow)
        texture = _texture_class(prim.name)
        amp = _TEXTURE.get(texture, _GRAIN)[0 if ct else 1]
        image[m] = (hu if ct else mr) + amp * field[m]
        if texture in ("bowel", "stomach"):
            gas = m & (field > (0.8 if texture == "bowel" else 1.4))
            image[gas] = _GAS[0 if ct else 1]
    lesion = None
    if plan.pathology_site is not None and plan.pathology_site in names:
        organ = label == names.index(plan.pathology_site) + 1
        if organ.sum() > 50:
            pts = np.argwhere(organ)
            centre_vox = pts[rng.integers(len(pts))]
            centre = origin + centre_vox * spacing
            radius = float(rng.uniform(9, 15))
            sphere = (
                (X - centre[0]) ** 2 + (Y - centre[1]) ** 2 + (Z - centre[2]) ** 2
            ) <= radius**2
            hit = np.broadcast_to(sphere, full) & organ
            image[hit] = image[hit] - 45 if plan.pathology_site == "liver" else 40.0
            lesion = {
                "structure": plan.pathology_site,
                "centre_mm": centre.round(1).tolist(),
                "radius_mm": round(radius, 1),
                "voxels": int(hit.sum()),
            }
    if ct:
        image = image * inst["gain"] + rng.normal(0, inst["noise"], full).astype(np.float32)
        image = np.clip(np.rint(image), -1024, 3071).astype(np.int16)
    else:
        ax = [np.linspace(-1, 1, n, dtype=np.float32) for n in full]
        bias = 1 + 0.15 * inst["gain"] * (ax[0][:, None, None] + 0.5 * ax[2][None, None, :])
        image = np.abs(
            image * bias * inst["gain"] + rng.normal(0, inst["noise"], full).astype(np.float32)
        )
        image = np.rint(image).astype(np.int16)
    masks = {name: (label == i + 1).astype(np.uint8) for i, name in enumerate(names)}
    truth = {
        "modality": plan.modality,
        "image_id": plan.image_id,
        "sex": plan.sex,
        "age": plan.age,
        "age_group": age_group([plan.age]).iloc[0],
        "institute": plan.institute,
        "study_type": plan.study_type,
        "shape": list(full),
        "spacing_mm": spacing.round(4).tolist(),
        "body_range_mm": [round(float(Z.min()), 1), round(float(Z.max()), 1)],
        "acquisition_plane": ["sagittal", "coronal", "axial"][plan.acquisition_axis]
        if not ct
        else None,
        "structures_present": sorted(n for n, m in masks.items() if m.any()),
        "lesion": lesion,
        "effects": {
            "noise_sd": inst["noise"],
            "gain": inst["gain"],
            "fov_scale": inst["fov"],
            "bone_hu": round(bone_hu, 1) if ct else None,
            "marrow_signal": None if ct else round(marrow, 1),
            "sex_specific": ["prostate"] if plan.sex == "m" else ["breasts", "wide_pelvis"],
        },
    }
    return image, affine, masks, truth


def _save_nifti(path: Path, data: np.ndarray, affine: np.ndarray) -> None:
    """Gzipped NIfTI-1 with a zero gzip timestamp, so the same seed gives the same bytes."""
    img = nib.Nifti1Image(data, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm")
    write_bytes_atomic(path, gzip.compress(img.to_bytes(), compresslevel=1, mtime=0))


def write_scan(plan: ScanPlan, root: Path) -> dict:
    image, affine, masks, truth = _render(plan)
    scan_dir = root / DATASET_FOLDERS[plan.modality] / plan.image_id
    seg_dir = scan_dir / "segmentations"
    seg_dir.mkdir(parents=True, exist_ok=True)
    empty = np.zeros(image.shape, dtype=np.uint8)
    for name in VOCABULARY[plan.modality]:
        _save_nifti(seg_dir / f"{name}.nii.gz", masks.get(name, empty), affine)
    _save_nifti(scan_dir / IMAGE_FILES[plan.modality], image, affine)
    return truth


def _meta_row(plan: ScanPlan, truth: dict, rng: np.random.Generator) -> dict:
    inst = INSTITUTES[plan.institute]
    split = str(rng.choice(["train", "val", "test"], p=[0.8, 0.1, 0.1]))
    row = {
        "image_id": plan.image_id,
        "age": plan.age,
        "gender": plan.sex,
        "institute": plan.institute,
        "study_type": plan.study_type,
        "split": split,
        "manufacturer": inst["manufacturer"],
    }
    if plan.modality == "ct":
        row |= {
            "scanner_model": inst["scanner"],
            "kvp": f"{float(inst['kvp']):.1f}",
            "pathology": plan.pathology,
            "pathology_location": PATHOLOGY_SITES.get(truth["lesion"]["structure"], "")
            if truth["lesion"]
            else "no_location",
        }
        if truth["lesion"] is None:
            row["pathology"] = "no_pathology"
    else:
        row |= {
            "scanner_model": inst["mr"],
            "magnetic_field_strength": "3.0" if plan.institute in "ABG" else "1.5",
            "slice_thickness": f"{max(truth['spacing_mm']):.2f}",
            "repetition_time": f"{rng.uniform(3, 700):.1f}",
            "echo_time": f"{rng.uniform(1, 20):.2f}",
            "scanning_sequence": str(rng.choice(["GR", "SE", "GR\\IR"])),
            "source": "phantom",
        }
    return row


def write_phantom_dataset(out_dir: str | Path, cfg: PhantomConfig, workers: int = 1) -> Path:
    """Write ``cfg.n_ct`` CT and ``cfg.n_mri`` MRI scans plus meta.csv files and
    phantom_truth.json."""
    root = Path(out_dir)
    plans = _plan_scans(cfg)
    if workers > 1 and len(plans) > 1:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            truths = list(
                track(
                    pool.map(write_scan, plans, [root] * len(plans)),
                    "phantom scans",
                    total=len(plans),
                )
            )
    else:
        truths = [write_scan(p, root) for p in track(plans, "phantom scans")]
    meta_rng = np.random.default_rng([cfg.seed, 3])
    for modality in ("ct", "mri"):
        rows = [
            _meta_row(p, t, meta_rng)
            for p, t in zip(plans, truths, strict=True)
            if p.modality == modality
        ]
        if not rows:
            continue
        cols = META_COLUMNS[modality]
        lines = [";".join(cols)] + [";".join(str(r.get(c, "")) for c in cols) for r in rows]
        write_text_atomic(
            root / DATASET_FOLDERS[modality] / "meta.csv", "\ufeff" + "\n".join(lines) + "\n"
        )
    write_json_atomic(
        root / PHANTOM_TRUTH,
        {
            "generator": "sail.data.phantom",
            "seed": cfg.seed,
            "size": cfg.size,
            "n_ct": cfg.n_ct,
            "n_mri": cfg.n_mri,
            "concepts": {
                "structures": (
                    "one labelled solid per TotalSegmentator structure, masks mutually "
                    "exclusive; portal-venous CT, organs in visceral fat, texture per tissue"
                ),
                "sex": "male: prostate, broader shoulders; female: breasts, wider pelvis",
                "age": (
                    "bone density falls (CT HU), marrow brightens (MRI), brain shrinks, "
                    "subcutaneous fat grows"
                ),
                "institute": (
                    "noise, gain, field of view, scanner model and manufacturer per institute"
                ),
                "pathology": "a lesion sphere in the organ named by pathology_location (tumor)",
            },
            "institutes": {
                k: {kk: vv for kk, vv in v.items() if kk != "weight"} for k, v in INSTITUTES.items()
            },
            "scans": truths,
        },
    )
    log.info("phantom: %d CT + %d MRI scans in %s", cfg.n_ct, cfg.n_mri, root)
    return root
