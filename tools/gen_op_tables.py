"""Generate backends/op_tables.py from the vendor support matrices.

    python tools/gen_op_tables.py ../shared/reference > backends/op_tables.py

Inputs: tensorrt-8.5-onnx-operators.md, tensorrt-10-onnx-operators.md (onnx-tensorrt's own
support matrices) and rknn-onnx-operators.md (RKNN-Toolkit2's ONNX op list, condensed).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path


def trt_table(path: Path) -> dict:
    table = {}
    for line in path.read_text().splitlines():
        if not line.startswith("| ") or line.startswith("| Operator") or line.startswith("|---"):
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 2 or not re.match(r"^[A-Z][A-Za-z0-9]*$", cells[0]):
            continue
        op, sup = cells[0], cells[1]
        types = tuple(t.strip() for t in cells[2].split(",") if t.strip()) if len(cells) > 2 else ()
        restr = cells[3].replace("<br />", " ").strip() if len(cells) > 3 else ""
        table[op] = (sup == "Y", types, restr)
    return table


def rknn_tables(path: Path) -> tuple[list, dict, list]:
    text = path.read_text()

    def section(title: str) -> str:
        start = text.index(title) + len(title)
        end = min((text.find(t, start) for t in ("\nSupported with restrictions:", "\nSupported (no remark):",
                                                   "\nNote the cheap") if text.find(t, start) > 0), default=len(text))
        return text[start:end]

    def names(chunk: str) -> list:
        out = []
        for tok in re.split(r"[,\s]+", chunk):
            tok = tok.strip(".").strip()
            m = re.match(r"^([A-Z][A-Za-z0-9]*)\((\w+)\)$", tok)  # RandomNormal(Like)
            if m:
                out += [m.group(1), m.group(1) + m.group(2)]
            elif "/" in tok:  # BitwiseAnd/Not/Or/Xor
                first, *rest = tok.split("/")
                prefix = re.match(r"^[A-Z][a-z]+", first).group(0)
                out += [first] + [prefix + r for r in rest]
            elif re.match(r"^[A-Z][A-Za-z0-9]*\*?$", tok):
                out.append(tok)
        return out

    unsupported = names(section('Marked "Not Supported" in v2.1:'))
    restricted = {}
    for line in section("Supported with restrictions:").splitlines():
        m = re.match(r"^- (.+?): (.+)$", line.strip())
        if m:
            for op in names(m.group(1)):
                restricted[op] = m.group(2)
    supported = names(section("Supported (no remark):"))
    return unsupported, restricted, supported


def main(ref: str) -> None:
    ref_dir = Path(ref)
    trt85 = trt_table(ref_dir / "tensorrt-8.5-onnx-operators.md")
    trt10 = trt_table(ref_dir / "tensorrt-10-onnx-operators.md")
    unsupported, restricted, supported = rknn_tables(ref_dir / "rknn-onnx-operators.md")
    print('"""Operator support tables of the targets\' toolchains (generated: do not edit).')
    print()
    print("Regenerate with: python tools/gen_op_tables.py ../shared/reference > backends/op_tables.py")
    print("TRT*: op -> (supported, types, restrictions) from onnx-tensorrt's support matrices")
    print("(8.5: JetPack 5.1 / 8.6: JetPack 6.0, opsets <= 17; 10.x: JetPack 6.1+, opsets 9-20).")
    print("RKNN_*: RKNN-Toolkit2 v2.1 ONNX op list (opset <= 19); 2.5.0 accepts a few more.")
    print('"""')
    print()
    for name, table in (("TRT85", trt85), ("TRT10", trt10)):
        print(f"{name} = {{")
        for op in sorted(table):
            print(f"    {op!r}: {table[op]!r},")
        print("}")
        print()
    print("RKNN_UNSUPPORTED = frozenset({")
    for op in sorted(set(unsupported)):
        print(f"    {op!r},")
    print("})")
    print()
    print("RKNN_RESTRICTED = {")
    for op in sorted(restricted):
        print(f"    {op!r}: {restricted[op]!r},")
    print("}")
    print()
    print("RKNN_SUPPORTED = frozenset({")
    for op in sorted(set(supported)):
        print(f"    {op!r},")
    print("})")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "../shared/reference")
