"""Model config dataclasses from a checkpoint's JSON, and the one spelling of a settings field as a flag."""
from __future__ import annotations

import dataclasses


def flag_name(field: str) -> str:
    """The command-line flag of a settings field: batch_size -> --batch-size."""
    return "--" + field.replace("_", "-")


def config_from_dict(cls, d: dict, what: str):
    """A model config dataclass from its JSON (a checkpoint's): unknown fields refused with a ValueError naming them
    and the known ones; lists become tuples."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ValueError("unknown %s config fields: %s (known: %s)"
                         % (what, ", ".join(unknown), ", ".join(sorted(names))))
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})
