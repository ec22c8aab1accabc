"""Prompt texts and answer schemas (paraphrasing the published prompts, plus enrichment statistics).

``TEMPLATE_VERSION`` is part of every cache key: change it whenever a text here changes.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd

from sail.interpret.enrichment import Enrichment

TEMPLATE_VERSION = "sail-interpret-v1"

SYSTEM = (
    "You are an expert radiologist analysing the features of a sparse autoencoder trained on "
    "embeddings "
    "of CT and MRI slices. Answer with JSON only."
)

CONCEPT_SCHEMA = {
    "type": "object",
    "properties": {"concept": {"type": "string", "minLength": 3, "maxLength": 200}},
    "required": ["concept"],
    "additionalProperties": False,
}

_PLANE = {"axial": "Axial", "coronal": "Coronal", "sagittal": "Sagittal"}


def sample_blocks(
    samples: pd.DataFrame,
    structures: list[str],
    H_NS: np.ndarray,
    rows: np.ndarray,
    acts: np.ndarray,
) -> str:
    """One 'Sample i:' block per image: modality, plane, sex, age, structures (organ columns
    only), regions."""
    from sail.data.labels import regions_of

    blocks = []
    for i, (r, a) in enumerate(zip(rows, acts, strict=True), 1):
        m = samples.iloc[r]
        present = [structures[j] for j in np.flatnonzero(H_NS[r])]
        lines = [
            f"Sample {i}:",
            f"- Modality: {str(m['modality']).upper()}",
            f"- Plane: {_PLANE.get(str(m['plane']), m['plane'])}",
        ]
        if pd.notna(m["sex"]):
            lines.append(f"- Sex: {str(m['sex']).upper()}")
        if pd.notna(m["age"]):
            lines.append(f"- Age: {float(m['age']):.0f} years")
        lines.append(
            f"- Anatomical structures ({len(present)} total): {', '.join(present) or 'none'}"
        )
        lines.append(f"- Anatomical regions: {', '.join(regions_of(present)) or 'none'}")
        lines.append(f"- Activation: {float(a):.3f}")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def enrichment_text(ev: Enrichment) -> str:
    """The population statistics: share among the top slices vs the dataset base rate."""
    out = [
        f"Population statistics over the {ev.n_top} top-activating slices, from {ev.n_volumes} "
        "volumes "
        "(share vs dataset base rate):"
    ]
    for attr, rows in ev.categorical.items():
        parts = [f"{v} {s:.0%} (base {b:.0%})" for v, s, b, _, _ in rows[:4]]
        out.append(f"- {attr}: {'; '.join(parts) or 'unknown'}")
    enr = ev.enriched_structures()[:8]
    out.append(
        "- enriched structures: "
        + ("; ".join(f"{v} {s:.0%} (base {b:.0%})" for v, s, b, _, _ in enr) or "none")
    )
    enr = ev.enriched_regions()[:6]
    out.append(
        "- enriched regions: "
        + ("; ".join(f"{v} {s:.0%} (base {b:.0%})" for v, s, b, _, _ in enr) or "none")
    )
    out.append(
        "Demographic values whose share is close to the base rate are NOT characteristic of the "
        "feature."
    )
    return "\n".join(out)


def concept_prompt(n: int, blocks: str, enrichment: str) -> str:
    return (
        "Context: you are studying one mono-semantic feature of a sparse autoencoder. A "
        "mono-semantic feature encodes one concept shared by all samples that strongly activate "
        "it.\n"
        "\n"
        f"The feature fired strongly on the {n} samples shown (2D CT or MRI slices, in this "
        "order), with this metadata:\n"
        "\n"
        f"{blocks}\n"
        "\n"
        f"{enrichment}\n"
        "\n"
        "Task: name the single concept these samples share, concisely, focusing on anatomy or "
        "imaging characteristics.\n"
        "Guidelines:\n"
        "- give the concept, not a visual description; use the metadata and statistics to find "
        "what is common, the images as supporting evidence;\n"
        "- group minor structures into regions; name at most 3 key structures;\n"
        "- mention modality and plane only when consistent; mention sex or age only when "
        "enriched against the base rate;\n"
        "- no pathology unless consistently present;\n"
        '- a single phrase without preamble, e.g. "CT of the spleen", "Coronal CT of the thorax '
        'and mediastinum", "Axial CT of the pelvis in female patients".\n'
        'Answer as JSON: {"concept": "..."}'
    )


def judge_schema(labels: list[str]) -> dict:
    return {
        "type": "object",
        "properties": {
            "ranking": {
                "type": "array",
                "items": {"type": "string", "enum": labels},
                "minItems": len(labels),
                "maxItems": len(labels),
            }
        },
        "required": ["ranking"],
        "additionalProperties": False,
    }


def judge_prompt(n: int, blocks: str, labels: list[str], concepts: list[str]) -> str:
    cands = "\n".join(f"{lab}: {c}" for lab, c in zip(labels, concepts, strict=True))
    ranking = ", ".join(f'"{lab}"' for lab in labels)
    return (
        f"A sparse-autoencoder feature fired strongly on the {n} samples shown, with this "
        "metadata:\n"
        "\n"
        f"{blocks}\n"
        "\n"
        f"Here are {len(labels)} candidate concepts:\n"
        f"{cands}\n"
        "\n"
        f"Rank all {len(labels)} candidates from the one that best describes what this feature "
        "detects to the worst. Consider consistency with the metadata, what the feature detects "
        "rather than how the images look, and specificity.\n"
        f'Answer as JSON: {{"ranking": [{ranking}]}} reordered best first.'
    )


def match_schema(n: int, n_total: int) -> dict:
    return {
        "type": "object",
        "properties": {
            "feature_numbers": {
                "type": "array",
                "items": {"type": "integer", "minimum": 1, "maximum": n_total},
                "minItems": n,
                "maxItems": n,
            }
        },
        "required": ["feature_numbers"],
        "additionalProperties": False,
    }


def match_prompt(query: str, descriptions: list[str], n: int) -> str:
    listing = "\n".join(f"Feature [{i}]: {d}" for i, d in enumerate(descriptions, 1))
    numbers = ", ".join(f"n{i}" for i in range(1, n + 1))
    return (
        "Below is a numbered list of mono-semantic features of a sparse autoencoder trained on "
        "medical image embeddings, each with its description.\n"
        "\n"
        f"{listing}\n"
        "\n"
        f'Query: "{query}"\n'
        "\n"
        f"Pick the {n} features that best match the query. Match modality first, then plane; "
        "exact anatomy beats a nearby region, which beats demographics only; match only what the "
        "query specifies; pick the closest features if none fits exactly; no duplicates; use "
        f"only numbers 1..{len(descriptions)}.\n"
        f'Answer as JSON: {{"feature_numbers": [{numbers}]}} with integers.'
    )


_BOILERPLATE = re.compile(
    r"^(?:(?:these|the|all)\s+(?:\w+\s+){0,4}?(?:show|shows|depict|depicts|demonstrate|demonstrates)\s+|consistently\s+|predominantly\s+)",
    re.I,
)


def parse_concept(raw: str) -> str:
    from sail.interpret.backends.base import extract_json

    obj = extract_json(raw)
    if not isinstance(obj, dict) or not isinstance(obj.get("concept"), str):
        raise ValueError('expected {"concept": "<text>"}')
    text = " ".join(obj["concept"].split()).strip("\"'` .")
    text = _BOILERPLATE.sub("", text).strip()
    if not 3 <= len(text) <= 200:
        raise ValueError(f"concept must be 3-200 characters, got {len(text)}")
    return text[0].upper() + text[1:]


def make_parse_ranking(labels: list[str]):
    def parse(raw: str) -> list[str]:
        from sail.interpret.backends.base import extract_json

        obj = extract_json(raw)
        ranking = obj.get("ranking") if isinstance(obj, dict) else None
        if not isinstance(ranking, list) or sorted(map(str, ranking)) != sorted(labels):
            raise ValueError(f"'ranking' must be a permutation of {labels}")
        return [str(x) for x in ranking]

    return parse


def make_parse_match(n: int, n_total: int):
    def parse(raw: str) -> list[int]:
        from sail.interpret.backends.base import extract_json

        obj = extract_json(raw)
        nums = obj.get("feature_numbers") if isinstance(obj, dict) else None
        if not isinstance(nums, list) or not all(
            isinstance(x, int) and not isinstance(x, bool) for x in nums
        ):
            raise ValueError("'feature_numbers' must be a list of integers")
        if len(nums) != n or len(set(nums)) != n:
            raise ValueError(f"need exactly {n} distinct numbers, got {nums}")
        if not all(1 <= x <= n_total for x in nums):
            raise ValueError(f"numbers must lie in 1..{n_total}")
        return nums

    return parse


def dumps(obj) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))
