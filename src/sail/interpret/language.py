"""Language-driven retrieval: a query -> matched features -> an image ranking -> precision@k.

Each query's constraints (modality, plane, body structures, sex, age) are parsed from its text; a
hit satisfies the query when it meets all of them. Matchers: ``embedding`` (MiniLM similarity of
query and feature descriptions), ``lexical`` (word overlap) and ``llm`` (a chat model picks from a
numbered list). Scorings over the matched features: ``published_cosine`` (direction of the mean
activations; with one matched feature the published 1/(1+|a - q|), labelled
``published_single_feature`` in ``scoring_rule``), ``weighted_sum`` and ``soft_and`` (geometric mean
of per-feature quantile ranks). One hit per volume; ties at the top-k boundary are reported; chance
is the expected precision of one random slice from each of k random volumes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from sail.data.labels import STRUCTURE_REGION
from sail.interpret.data import SplitData

PUBLISHED_QUERIES: list[tuple[str, str]] = [
    ("ct_thorax_coronal", "Coronal CT of the thorax and rib cage"),
    ("ct_spine_sagittal", "Sagittal CT of the thoracolumbar spine and spinal canal"),
    ("ct_lumbar_axial", "Axial CT of the lumbar spine and spinal canal"),
    ("ct_pelvis_coronal", "Coronal CT of the bony pelvis and lumbar spine"),
    ("ct_abdomen_pelvis_coronal", "Coronal CT of the abdomen and pelvis"),
    ("ct_skull_axial", "Axial CT of the skull and brain"),
    ("ct_female_pelvis", "Axial CT of the female pelvis"),
    ("ct_male_pelvis", "Axial CT of the male pelvis"),
    ("ct_thorax_female", "Axial CT of the thorax and mediastinum in a female patient"),
    ("ct_thorax_male", "Axial CT of the thorax and mediastinum in a male patient"),
    ("ct_abdomen_elderly", "Axial CT of the abdomen and retroperitoneum in an elderly patient"),
    ("mri_pelvis", "Axial MRI of the pelvis"),
]
SCORINGS = ("published_cosine", "weighted_sum", "soft_and")

_REGION_WORDS: dict[str, list[str]] = {
    "thorax": ["lungs", "heart", "mediastinum", "rib cage"],
    "chest": ["lungs", "heart", "mediastinum", "rib cage"],
    "abdomen": [
        "liver",
        "spleen",
        "pancreas",
        "stomach",
        "kidneys",
        "bowel",
        "gallbladder",
        "adrenal glands",
    ],
    "retroperitoneum": ["kidneys", "adrenal glands", "abdominal vasculature", "pancreas"],
    "pelvis": [
        "bony pelvis",
        "urinary bladder",
        "prostate",
        "sacrum",
        "pelvic vasculature",
        "gluteal muscles",
    ],
    "spine": ["cervical spine", "thoracic spine", "lumbar spine", "sacrum", "spinal canal"],
    "thoracolumbar": ["thoracic spine", "lumbar spine"],
    "head": ["brain", "skull"],
    "neck": ["cervical spine", "thyroid"],
}
_STOP = {
    "of",
    "the",
    "and",
    "in",
    "a",
    "an",
    "with",
    "patient",
    "patients",
    "ct",
    "mri",
    "mr",
    "axial",
    "coronal",
    "sagittal",
    "male",
    "female",
    "elderly",
    "young",
    "slice",
    "slices",
    "image",
    "images",
    "including",
    "or",
}


@dataclass
class Query:
    name: str
    text: str
    source: str = "user"
    modality: str | None = None
    plane: str | None = None
    sex: str | None = None
    age_min: float | None = None
    age_max: float | None = None
    structures: list[str] = field(default_factory=list)

    def row(self) -> dict:
        return {
            "query": self.name,
            "text": self.text,
            "source": self.source,
            "modality": self.modality,
            "plane": self.plane,
            "sex": self.sex,
            "age_min": self.age_min,
            "age_max": self.age_max,
            "structures": ";".join(self.structures),
        }


def _norm(text: str) -> str:
    return " " + re.sub(r"[^a-z0-9]+", " ", text.lower()) + " "


def parse_query(name: str, text: str, structures: list[str], source: str = "user") -> Query:
    """Constraints from the words of the query; anatomy becomes a set of acceptable structures."""
    t = _norm(text)
    q = Query(name, text, source)
    q.modality = _modality_of(t)
    q.plane = _plane_of(t)
    q.sex = _sex_of(t)
    if " elderly " in t or " older " in t:
        q.age_min = 65.0
    if " young " in t:
        q.age_max = 40.0
    q.structures = _structures_of(t, structures)
    return q


def _modality_of(t: str) -> str | None:
    """MRI wins over CT when a normalised query names both."""
    if " mri " in t or " mr " in t:
        return "mri"
    return "ct" if " ct " in t else None


def _plane_of(t: str) -> str | None:
    """The named plane; of several, the later in (axial, coronal, sagittal) order wins."""
    plane = None
    for p in ("axial", "coronal", "sagittal"):
        if f" {p} " in t:
            plane = p
    return plane


def _sex_of(t: str) -> str | None:
    """Female words win when a query names both sexes."""
    if re.search(r" (female|woman|women) ", t):
        return "f"
    if re.search(r" (male|man|men) ", t):
        return "m"
    return None


def _structures_of(t: str, structures: list[str]) -> list[str]:
    """Structures named directly, by region name, by region word, or by ' lumbar ', sorted."""
    from sail.interpret.backends.metadata_describer import display_name

    wanted: set[str] = set()
    regions = {
        r: [s for s in structures if STRUCTURE_REGION.get(s) == r]
        for r in set(STRUCTURE_REGION.values())
    }
    for s in structures:
        names = {_norm(display_name(s)).strip(), _norm(s.replace("_", " ")).strip()}
        if any(f" {n} " in t for n in names if n):
            wanted.add(s)
    for region, members in regions.items():
        if f" {region} " in t:
            wanted.update(members)
    for word, rs in _REGION_WORDS.items():
        if f" {word} " in t:
            for r in rs:
                wanted.update(regions.get(r, []))
    if re.search(r" lumbar ", t):
        wanted.update(regions.get("lumbar spine", []))
    return sorted(wanted)


def load_queries(
    published: bool,
    user: list[dict],
    structures: list[str],
    origin: str = "interpret.language.queries",
) -> list[Query]:
    from sail.errors import SailError

    out = (
        [parse_query(n, t, structures, "published") for n, t in PUBLISHED_QUERIES]
        if published
        else []
    )
    for i, item in enumerate(user):
        if isinstance(item, str):
            item = {"name": re.sub(r"[^a-z0-9]+", "_", item.lower()).strip("_"), "text": item}
        if not isinstance(item, dict) or not isinstance(item.get("text"), str):
            raise SailError(
                f"{origin}[{i}]: expected a string or a mapping with 'text' (and optional 'name')"
            )
        out.append(parse_query(str(item.get("name") or f"query_{i}"), item["text"], structures))
    names = [q.name for q in out]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise SailError(f"{origin}: duplicate query name(s) {dup}")
    return out


def satisfies(q: Query, data: SplitData) -> pd.DataFrame:
    """Per slice and constraint: does it meet it (True where the query does not constrain)."""
    m = data.meta
    out = pd.DataFrame(index=m.index)
    out["meets_modality"] = (m.modality == q.modality) if q.modality else True
    out["meets_plane"] = (m.plane == q.plane) if q.plane else True
    out["meets_sex"] = (m.sex == q.sex).fillna(False) if q.sex else True
    age = pd.to_numeric(m.age, errors="coerce")
    ok_age = pd.Series(True, index=m.index)
    if q.age_min is not None:
        ok_age &= (age >= q.age_min).fillna(False)
    if q.age_max is not None:
        ok_age &= (age < q.age_max).fillna(False)
    out["meets_age"] = ok_age
    if q.structures:
        cols = [data.structures.index(s) for s in q.structures if s in data.structures]
        out["meets_anatomy"] = data.H_NS[:, cols].any(1) if cols else False
    else:
        out["meets_anatomy"] = True
    out = out.astype(bool)
    out["meets_all"] = out.all(axis=1)
    return out


def match_embedding(query: str, descriptions: list[str], n: int) -> tuple[np.ndarray, np.ndarray]:
    from sail.interpret.text_embed import embed

    e = embed([query, *descriptions])
    sims = e[1:] @ e[0]
    order = np.lexsort((np.arange(len(sims)), -sims))[:n]
    return order, sims[order]


def _words(text: str) -> set[str]:
    return {w for w in _norm(text).split() if w not in _STOP and len(w) > 1} | {
        w
        for w in _norm(text).split()
        if w in ("ct", "mri", "axial", "coronal", "sagittal", "male", "female")
    }


def match_lexical(query: str, descriptions: list[str], n: int) -> tuple[np.ndarray, np.ndarray]:
    """Share of the query's words found in the description (ties by list order)."""
    qw = _words(query)
    scores = np.array([len(qw & _words(d)) / max(len(qw), 1) for d in descriptions])
    order = np.lexsort((np.arange(len(scores)), -scores))[:n]
    return order, scores[order]


def scoring_rule(scoring: str, n_features: int) -> str:
    """The rule behind a scoring's numbers: ``published_cosine`` over one matched feature is the
    published 1/(1+|a - q|), under which a slice where the feature is inactive scores 1/(1+q)."""
    if scoring == "published_cosine" and n_features == 1:
        from sail.interpret.fingerprint import SINGLE_FEATURE_RULE

        return SINGLE_FEATURE_RULE
    return scoring


def score_images(
    data: SplitData, features: np.ndarray, mean_act: np.ndarray, weights: np.ndarray, scoring: str
) -> np.ndarray:
    """Score every slice from its activations on the matched features."""
    A = data.csc[:, features].toarray().astype(np.float64)  # (N, m)
    if scoring == "published_cosine":
        q = mean_act.astype(np.float64)
        if len(features) == 1:
            return 1.0 / (1.0 + np.abs(A[:, 0] - q[0]))
        na = np.linalg.norm(A, axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(na > 0, A @ q / (na * np.linalg.norm(q)), 0.0)
    if scoring == "weighted_sum":
        w = np.clip(weights, 0, None)
        w = w / w.sum() if w.sum() > 0 else np.full(len(w), 1 / len(w))
        return (A / np.maximum(mean_act, 1e-12)) @ w
    if scoring == "soft_and":
        U = np.zeros_like(A)
        for j in range(A.shape[1]):
            act = A[:, j] > 0
            if act.any():
                r = pd.Series(A[act, j]).rank(method="average").to_numpy()
                U[act, j] = r / act.sum()
        return np.exp(np.log(U + 1e-3).mean(axis=1))
    raise ValueError(scoring)


def rank_per_volume(
    score_N: np.ndarray, data: SplitData, k: int
) -> tuple[np.ndarray, np.ndarray, bool]:
    """Top-k volumes by best slice (ties by volume order), and whether rank k ties rank k+1."""
    vmax = np.maximum.reduceat(score_N, data.vol_start)
    order = np.argsort(-vmax, kind="stable")
    top = order[:k]
    rows = np.array(
        [
            data.vol_start[v] + int(np.argmax(score_N[data.vol_start[v] : data.vol_end[v]]))
            for v in top
        ],
        dtype=int,
    )
    boundary_tie = len(order) > k and vmax[order[k - 1]] == vmax[order[k]]
    return rows, score_N[rows], bool(boundary_tie)


def chance_precision(meets: pd.Series, data: SplitData) -> float:
    """Expected share meeting the query for one random slice of a random volume."""
    per_vol = np.add.reduceat(meets.to_numpy(dtype=float), data.vol_start) / np.diff(
        np.r_[data.vol_start, data.n]
    )
    return float(per_vol.mean())
