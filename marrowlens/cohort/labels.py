"""Label vocabularies: mutation names, the Munich (Matek) cell codes, and which cell types are blasts.

A cohort's labels are checked against these; a value outside them is an error that names the
allowed values, unless the user maps it (``--map-mutation APL=PML_RARA``), in which case the map's
targets join the allowed set. The set of mutation classes is therefore the data's, not hard-wired.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping

from marrowlens.errors import MarrowLensError, listing

MUTATIONS = ("PML_RARA", "NPM1", "CBFB_MYH11", "RUNX1_RUNX1T1", "control")

# Munich AML-Cytomorphology_LMU codes (Matek et al. 2019) -> cell type names.
MATEK_CODES = {
    "BAS": "basophil",
    "EBO": "erythroblast",
    "EOS": "eosinophil",
    "KSC": "smudge_cell",
    "LYA": "lymphocyte_atypical",
    "LYT": "lymphocyte",
    "MMZ": "metamyelocyte",
    "MOB": "monoblast",
    "MON": "monocyte",
    "MYB": "myelocyte",
    "MYO": "myeloblast",
    "NGB": "neutrophil_band",
    "NGS": "neutrophil_segmented",
    "PMB": "promyelocyte_bilobed",
    "PMO": "promyelocyte",
}

_NOT_BLASTS = ("erythroblast", "normoblast")


def _key(text: str) -> str:
    return re.sub(r"[^A-Z0-9]", "", text.upper())


_MUTATION_KEYS = {_key(name): name for name in MUTATIONS}


def parse_map(text: str | None) -> dict[str, str]:
    """``"APL=PML_RARA,AML=other_AML"`` -> {"APL": "PML_RARA", "AML": "other_AML"}."""
    mapping: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in (text or "").split(","))):
        source, sep, target = item.partition("=")
        if not sep or not source.strip() or not target.strip():
            raise MarrowLensError(f"map entry {item!r} is not of the form FROM=TO")
        mapping[source.strip()] = target.strip()
    return mapping


class MutationVocabulary:
    """Canonical mutation names, their spelling variants, and the user's own map."""

    def __init__(self, user_map: Mapping[str, str] | None = None) -> None:
        self.user_map = dict(user_map or {})
        self.allowed = list(MUTATIONS) + [t for t in dict.fromkeys(self.user_map.values()) if t not in MUTATIONS]

    def canonical(self, raw: str) -> str | None:
        """The canonical name of ``raw`` or None when it is unknown."""
        if raw in self.user_map:
            return self.user_map[raw]
        if raw in self.allowed:
            return raw
        return _MUTATION_KEYS.get(_key(raw))

    def map_all(self, values: Iterable[str], where: str) -> dict[str, str]:
        """Map every distinct value; one error lists every unknown one and the allowed names."""
        mapped, unknown = {}, []
        for value in dict.fromkeys(values):
            name = self.canonical(value)
            if name is None:
                unknown.append(value)
            else:
                mapped[value] = name
        if unknown:
            raise MarrowLensError(
                f"{len(unknown)} unknown mutation label(s) {listing(map(repr, unknown))} in {where}; allowed: "
                f"{', '.join(self.allowed)} (map others with --map-mutation {unknown[0]}=NAME)"
            )
        return mapped


def cell_type_name(raw: str) -> str:
    """Matek codes become names; other labels are kept as written (stripped)."""
    name = raw.strip()
    return MATEK_CODES.get(name.upper(), name)


def is_blast_type(cell_type: str, blast_classes: Iterable[str] | None = None) -> bool:
    """A blast by the user's list when given, else by name: '*blast*' but not erythroblasts."""
    if blast_classes is not None:
        return cell_type in set(blast_classes)
    name = cell_type.lower()
    return "blast" in name and not any(word in name for word in _NOT_BLASTS)


def parse_bool(value: object) -> bool | None:
    """Flexible truth values from CSVs; None for missing; error for anything else."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "y", "t", "blast"):
        return True
    if text in ("0", "false", "no", "n", "f", "other", ""):
        return False if text else None
    raise MarrowLensError(f"is_blast value {value!r} is not a truth value (use true/false or 1/0)")
