"""The offline, deterministic describer: a concept phrase built from enrichment statistics.

Modality and plane are named when the top-activating slices agree (>= 80%); structures and body
regions when they are enriched against the split's base rate and present in at least 70% of the
top slices (the bar sex and age must clear too), so a structure seen in barely half of them is
not offered as the feature's concept; sex and age only when enriched (so a 62% male feature in a
62% male dataset is not called "male").
"""

from __future__ import annotations

from sail.interpret.enrichment import DEMOGRAPHIC_SHARE, Enrichment

CONSISTENT = 0.8
NAMED_SHARE = DEMOGRAPHIC_SHARE  # structures and regions must hold for >= 70% of the top slices
MAX_STRUCTURES = 3


def display_name(structure: str) -> str:
    """kidney_left -> left kidney, urinary_bladder -> urinary bladder."""
    parts = structure.split("_")
    side = [p for p in parts if p in ("left", "right")]
    rest = [p for p in parts if p not in ("left", "right")]
    return " ".join(side + rest)


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def describe(ev: Enrichment) -> str:
    if ev.n_top == 0:
        return "Inactive feature"
    mod = ev.dominant("modality", CONSISTENT)
    plane = ev.dominant("plane", CONSISTENT)
    head = " ".join(
        x for x in [plane.capitalize() if plane else "", mod.upper() if mod else "CT or MRI"] if x
    )
    structures = [r for r in ev.enriched_structures() if r[1] >= NAMED_SHARE]
    regions = [r for r in ev.enriched_regions() if r[1] >= NAMED_SHARE]
    named = [s for s, *_ in structures[:MAX_STRUCTURES]]
    text = head
    if named:
        text += " of the " + _join([display_name(s) for s in named])
        from sail.data.labels import STRUCTURE_REGION

        covered = {STRUCTURE_REGION.get(s) for s in named}
        extra = [r for r, *_ in regions if r not in covered][:2]
        if extra:
            text += " (" + _join(extra) + " region" + ("s" if len(extra) > 1 else "") + ")"
    else:
        shown = [r for r, *_ in regions][:MAX_STRUCTURES]
        text += (" of the " + _join(shown)) if shown else " slices with no specific structure"
    demo = []
    sex = ev.enriched_value("sex")
    if sex:
        demo.append({"f": "female", "m": "male"}.get(sex, sex))
    age = ev.enriched_value("age_group")
    if demo or age:
        who = " ".join(demo + ["patients"])
        text += f" in {who}" + (f" aged {age}" if age else "")
    return text
