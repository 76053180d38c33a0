"""Small helpers shared by the test modules."""
import json


def write_jsonl(path, rows):
    """Rows as a JSON Lines fixture file; returns the path as a string (what --data takes)."""
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)
