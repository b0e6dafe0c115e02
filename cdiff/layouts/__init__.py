"""Rename tables between cdiff's parameter names and foreign checkpoint layouts.

A table is a list of ``(cdiff_prefix, foreign_prefix)`` template pairs. A template is a
dotted module path whose ``{name}`` fields match a decimal index, e.g.
``("down.{i}.res.{j}", "down_blocks.{i}.resnets.{j}")``. A key is renamed by the rule whose
template matches the longest dotted prefix of it; the rest of the key (``.conv1.weight``)
is carried over unchanged. The same table renames in both directions, so a round trip is
exact by construction and a test checks it on every key of a real-layout state dict.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cached_property
from typing import Mapping

_FIELD = re.compile(r"\{(\w+)\}")


def _compile(template: str) -> re.Pattern:
    pattern = ""
    pos = 0
    for m in _FIELD.finditer(template):
        pattern += re.escape(template[pos : m.start()]) + rf"(?P<{m.group(1)}>\d+)"
        pos = m.end()
    pattern += re.escape(template[pos:])
    return re.compile(pattern + r"(?=\.|$)")


@dataclass(frozen=True)
class RenameTable:
    name: str  # the foreign layout, for error messages ("diffusers U-Net")
    rules: tuple[tuple[str, str], ...]  # (cdiff template, foreign template)

    @cached_property
    def _compiled(self):
        return [(_compile(ours), ours, _compile(theirs), theirs) for ours, theirs in self.rules]

    def _rename_key(self, key: str, to_foreign: bool) -> str | None:
        best = None
        for ours_re, ours, theirs_re, theirs in self._compiled:
            source_re, target = (ours_re, theirs) if to_foreign else (theirs_re, ours)
            m = source_re.match(key)
            if m and (best is None or m.end() > best[0].end()):
                best = (m, target)
        if best is None:
            return None
        m, target = best
        return target.format(**m.groupdict()) + key[m.end() :]

    def to_foreign(self, key: str) -> str | None:
        return self._rename_key(key, to_foreign=True)

    def to_cdiff(self, key: str) -> str | None:
        return self._rename_key(key, to_foreign=False)

    def rename(self, state_dict: Mapping, to: str) -> dict:
        """Rename every key of ``state_dict`` to ``to`` ("cdiff" or "foreign").

        Raises ``KeyError`` listing the first keys no rule matches, with their count.
        """
        if to not in ("cdiff", "foreign"):
            raise ValueError(f"to must be 'cdiff' or 'foreign', got {to!r}")
        out, unmatched = {}, []
        for key, value in state_dict.items():
            new = self._rename_key(key, to_foreign=(to == "foreign"))
            if new is None:
                unmatched.append(key)
            else:
                out[new] = value
        if unmatched:
            raise KeyError(
                f"{len(unmatched)} keys match no rule of the {self.name} rename table, "
                f"first: {unmatched[:5]}"
            )
        return out
