"""NLVR2: the jsonl files, and accuracy and consistency.

An identifier is `split-set_id-pair_id-sentence_id` (e.g. `dev-850-0-0`); the pair's images are
`split-set_id-pair_id-img0.png` and `-img1.png`. One sentence is written for several image pairs
of its set: those examples share split, set id and sentence id, and consistency is the share of
sentences whose every example is answered right.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import InputDataError


@dataclass(frozen=True)
class Statement:
    identifier: str
    sentence: str
    label: bool | None  # None in an unlabeled test file
    images: tuple[str, str]  # image keys without extension: `<split>-<set>-<pair>-img0`, `…-img1`

    @property
    def sentence_group(self) -> str:
        split, set_id, _pair, sentence_id = self.identifier.split("-")
        return f"{split}-{set_id}-{sentence_id}"


def read_nlvr2(path: str | Path) -> list[Statement]:
    path = Path(path)
    out = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise InputDataError(f"{path}: NLVR2 file not found") from None
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            ident = str(row["identifier"])
            parts = ident.split("-")
            if len(parts) != 4:
                raise ValueError(f"identifier {ident!r} is not split-set_id-pair_id-sentence_id")
            label = row.get("label")
            if label is not None:
                if str(label) not in ("True", "False"):
                    raise ValueError(f"label {label!r} is not True or False")
                label = str(label) == "True"
            prefix = "-".join(parts[:3])
            out.append(Statement(ident, str(row["sentence"]), label, (f"{prefix}-img0", f"{prefix}-img1")))
        except json.JSONDecodeError as exc:
            raise InputDataError(f"{path}:{lineno}: not a JSON object ({exc.msg})") from None
        except (KeyError, TypeError, ValueError) as exc:
            raise InputDataError(f"{path}:{lineno}: expected identifier, sentence and label "
                                 f"({type(exc).__name__}: {exc})") from None
    return out


def evaluate(predictions: dict[str, bool], statements: list[Statement]) -> dict[str, float]:
    """Accuracy and consistency in %, over the labeled statements (a missing prediction is wrong)."""
    labeled = [s for s in statements if s.label is not None]
    if not labeled:
        return {}
    right = {s.identifier: predictions.get(s.identifier) == s.label for s in labeled}
    groups: dict[str, bool] = {}
    for s in labeled:
        groups[s.sentence_group] = groups.get(s.sentence_group, True) and right[s.identifier]
    return {"accuracy": 100 * sum(right.values()) / len(right),
            "consistency": 100 * sum(groups.values()) / len(groups)}
