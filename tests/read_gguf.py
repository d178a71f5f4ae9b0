"""gguf-py's view of a GGUF file, as JSON on stdout, for kiln's tests to compare with their own:
every metadata key (strings and numbers as values, arrays as their length and first item) and
every tensor's name, shape (GGUF order) and type name.

    python3 tests/read_gguf.py FILE.gguf
"""
import json
import sys

from gguf import GGUFReader, GGUFValueType


def value(field):
    if field.types and field.types[0] == GGUFValueType.ARRAY:
        items = [field.parts[i] for i in field.data]
        first = items[0] if items else None
        if first is not None and field.types[-1] == GGUFValueType.STRING:
            first = bytes(first).decode("utf-8")
        elif first is not None:
            first = first.tolist()[0]
        return {"len": len(items), "first": first}
    part = field.parts[field.data[0]]
    if field.types[0] == GGUFValueType.STRING:
        return bytes(part).decode("utf-8")
    return part.tolist()[0]


reader = GGUFReader(sys.argv[1])
print(json.dumps({
    "metadata": {f.name: value(f) for f in reader.fields.values() if not f.name.startswith("GGUF.")},
    "tensors": [[t.name, [int(d) for d in t.shape], t.tensor_type.name] for t in reader.tensors],
}))
