"""Export the contract as JSON Schema files under schemas/jsonschema/ (checked in; a test fails on drift).

python -m schemas.export          # write the files
python -m schemas.export --check  # exit 1 if the checked-in files differ from the models
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from .events import EVENT_ADAPTER, EVENT_TYPES
from .topics import CATALOG

OUT = Path(__file__).parent / "jsonschema"


def rendered() -> dict[str, str]:
    """File name → exact file text, for every schema the contract defines."""
    files: dict[str, Any] = {
        f"{name}.json": cls.model_json_schema(mode="serialization") for name, cls in EVENT_TYPES.items()
    }
    files["AnyEvent.json"] = EVENT_ADAPTER.json_schema(mode="serialization")
    files["topics.json"] = [
        {
            "name": f"<namespace>.{t.suffix}",
            "description": t.description,
            "partitions": t.partitions,
            "key": t.key,
            "value_types": list(t.value_type_names) if t.value_types is not None else None,
            "config": t.config,
        }
        for t in CATALOG
    ]
    return {name: json.dumps(doc, indent=2, ensure_ascii=False, sort_keys=True) + "\n" for name, doc in files.items()}


def drift() -> list[str]:
    """Names of files that are missing, stale or no longer produced."""
    want = rendered()
    have = {p.name: p.read_text(encoding="utf-8") for p in OUT.glob("*.json")} if OUT.exists() else {}
    return sorted(n for n in want.keys() | have.keys() if want.get(n) != have.get(n))


def write() -> None:
    OUT.mkdir(exist_ok=True)
    want = rendered()
    for stale in OUT.glob("*.json"):
        if stale.name not in want:
            stale.unlink()
    for name, text in want.items():
        (OUT / name).write_text(text, encoding="utf-8")


def main(argv: list[str]) -> int:
    if "--check" in argv:
        stale = drift()
        if stale:
            print("JSON Schema out of date (run `make schemas`): " + ", ".join(stale), file=sys.stderr)
            return 1
        print(f"JSON Schema up to date ({len(rendered())} files)")
        return 0
    write()
    print(f"wrote {len(rendered())} files to {OUT}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
