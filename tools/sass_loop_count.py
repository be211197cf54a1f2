"""Opcode counts of the steady-state key loop of the FP8 attention kernels, from SASS.

Usage::

    CUT=/work/venv/lib/python3.11/site-packages/cutlass_library/source/include
    nvcc -O3 --use_fast_math --expt-relaxed-constexpr -std=c++17 \\
        -gencode=arch=compute_90a,code=sm_90a -Icsrc/include -I$CUT -Xptxas=-v -cubin \\
        -o /tmp/ws.cubin csrc/cuda/sm90/fp8_attention_sm90_ws_kernels.cu
    cuobjdump -sass /tmp/ws.cubin > /tmp/ws.sass
    python tools/sass_loop_count.py /tmp/ws.sass ILi128E13__nv_bfloat16 ILi64E13__nv_bfloat16

For each function whose mangled name contains one of the given substrings, the loop is the
smallest backward branch (a BRA to a lower address) whose body holds both IGMMA and QGMMA
instructions: the key loop's steady state. Prints its instruction count, the count per opcode
(the part before the first dot), where the wgmma waits (``WARPGROUP.DEPBAR``) and mbarrier
arrives (``SYNCS.ARRIVE``) sit and how many ``MUFU`` come before each (the softmax under P.V),
and the highest register the function uses.
"""

from __future__ import annotations

import collections
import re
import sys

INS = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z0-9_.]+)([^;]*);")


def functions(text: str):
    """(mangled name, SASS lines) per function of a cuobjdump -sass listing."""
    name, lines = None, []
    for line in text.splitlines():
        m = re.match(r"\s*Function : (\S+)", line)
        if m:
            if name:
                yield name, lines
            name, lines = m.group(1), []
        elif name:
            lines.append(line)
    if name:
        yield name, lines


def parse(lines: list[str]) -> list[tuple[int, str, str]]:
    """(address, opcode, operands) per instruction."""
    out = []
    for line in lines:
        m = INS.search(line)
        if m:
            out.append((int(m.group(1), 16), m.group(3), m.group(4)))
    return out


def steady_loop(ins: list[tuple[int, str, str]]) -> list[tuple[int, str, str]] | None:
    """The smallest loop body holding IGMMA and QGMMA, or None."""
    index = {a: i for i, (a, _, _) in enumerate(ins)}
    best = None
    for i, (addr, op, args) in enumerate(ins):
        m = re.search(r"0x([0-9a-f]+)", args) if op.startswith("BRA") else None
        if not m:
            continue
        target = int(m.group(1), 16)
        if target >= addr or target not in index:
            continue
        body = ins[index[target]:i + 1]
        ops = {o.split(".")[0] for _, o, _ in body}
        if {"IGMMA", "QGMMA"} <= ops and (best is None or len(body) < len(best)):
            best = body
    return best


def report(name: str, ins: list[tuple[int, str, str]]) -> str:
    body = steady_loop(ins)
    if body is None:
        return f"{name}: no loop with IGMMA and QGMMA"
    ops = collections.Counter(o.split(".")[0] for _, o, _ in body)
    marks = []
    for k, (_, op, args) in enumerate(body):
        if op.startswith(("WARPGROUP.DEPBAR", "SYNCS.ARRIVE")):
            mufu = sum(1 for _, o, _ in body[:k] if o.startswith("MUFU"))
            marks.append(f"{op} {args.strip().split(',')[0]} @{k} ({mufu} MUFU before)")
    regs = [int(r) for _, _, args in ins for r in re.findall(r"\bR(\d+)\b", args)]
    return "\n".join([
        f"{name}",
        f"  loop {body[0][0]:#x}..{body[-1][0]:#x}: {len(body)} instructions",
        "  " + ", ".join(f"{k} {v}" for k, v in ops.most_common()),
        "  " + "; ".join(marks),
        f"  highest register: R{max(regs)}",
    ])


def main(argv: list[str]) -> int:
    if len(argv) < 3:
        print(__doc__)
        return 2
    text = open(argv[1]).read()
    for sub in argv[2:]:
        for name, lines in functions(text):
            if sub in name:
                print(report(name, parse(lines)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
