"""The hot loops of a compiled kernel, read from its SASS (the machine code ptxas emitted).

A loop is a backward branch: `BRA` to a label at or before it; its body runs from that label to
the branch, both included, and holds no EXIT. (ptxas puts the retry loop of a failed mbarrier
wait out of line, after the kernel's EXIT, and branches back into the body from there: such a
branch spans the kernel's end and is no loop.) A *hot* loop holds tensor-core instructions (HGMMA on sm_90, HMMA on
sm_80) and no other such loop: the innermost loops that stream key or query blocks.

The figure reported per loop is the instruction economy of bench/NOTES.md ("The forward's hot
loop, from SASS"): the body's instructions other than the MMA ones, per 1000 FLOP of the
tensor-core work one pass through the body does. A SASS listing is one warp's instruction
stream, so both counts are per warp: FLOP = the program's FLOP per iteration / its warps, which
is the same ratio as warp-instructions per FLOP of the whole program. Static counts: a branch
inside the body that skips code still counts that code.

Needs only the cubin and Triton's own nvdisasm (no GPU).
"""
from __future__ import annotations

import re
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

_INSTRUCTION = re.compile(r"/\*([0-9a-f]+)\*/\s+(.*?)\s*;")
_LABEL = re.compile(r"^\s*(\.L_\w+):")
_EXIT = re.compile(r"^(@!?U?P\w+\s+)?EXIT\b")
_BRANCH_TO = re.compile(r"\bBRA\b[^`]*`\((\.L_\w+)\)")
# Hopper: HGMMA.64xNxK per warpgroup (4 warps); Ampere: HMMA.16816 / 1688 (m16 n8 kK) per warp.
_HGMMA = re.compile(r"\bHGMMA\.(\d+)x(\d+)x(\d+)")
_HMMA = re.compile(r"\bHMMA\.16(8)(\d+)")


@dataclass(frozen=True)
class Loop:
    start: int             # address of the body's first instruction
    end: int               # address of the backward branch
    instructions: int      # in the body, the branch included
    mma: int               # HGMMA / HMMA instructions among them
    mma_flop: int          # FLOP one warp's MMA instructions do per pass (from their shapes)

    @property
    def other(self) -> int:
        """Instructions that are not tensor-core instructions."""
        return self.instructions - self.mma

    def per_kflop(self, flop_per_warp: float) -> float:
        """Non-MMA instructions per 1000 FLOP, for one warp's share of an iteration's FLOP."""
        return 1000.0 * self.other / flop_per_warp


def mma_flop(instruction: str) -> int:
    """FLOP one warp does in one tensor-core instruction (0 for any other instruction): a
    warpgroup's HGMMA m x n x k is 2mnk, shared by its 4 warps; an HMMA m16 n8 kK is one warp's."""
    m = _HGMMA.search(instruction)
    if m:
        rows, cols, depth = map(int, m.groups())
        return 2 * rows * cols * depth // 4
    m = _HMMA.search(instruction)
    if m:
        return 2 * 16 * int(m.group(1)) * int(m.group(2))
    return 0


def parse(sass: str) -> tuple[list[tuple[int, str]], dict[str, int]]:
    """(instructions as (address, text), label -> index of the instruction it names) of an
    nvdisasm listing."""
    instructions, labels = [], {}
    for line in sass.splitlines():
        label = _LABEL.match(line)
        if label:
            labels[label.group(1)] = len(instructions)
            continue
        found = _INSTRUCTION.search(line)
        if found:
            instructions.append((int(found.group(1), 16), found.group(2)))
    return instructions, labels


def hot_loops(sass: str) -> list[Loop]:
    """The innermost loops holding MMA instructions, in code order."""
    instructions, labels = parse(sass)
    spans = []
    for i, (_, text) in enumerate(instructions):
        target = _BRANCH_TO.search(text)
        if target and labels.get(target.group(1), i + 1) <= i:
            spans.append((labels[target.group(1)], i))
    flops = [mma_flop(text) for _, text in instructions]
    exits = [i for i, (_, text) in enumerate(instructions) if _EXIT.search(text)]
    with_mma = [(a, b) for a, b in spans if any(flops[a:b + 1])
                and not any(a <= e <= b for e in exits)]
    loops = []
    for first, last in with_mma:
        if any(first <= a and b <= last and (a, b) != (first, last) for a, b in with_mma):
            continue                                  # an outer loop: its inner one is reported
        body = flops[first:last + 1]
        loops.append(Loop(instructions[first][0], instructions[last][0], len(body),
                          sum(f > 0 for f in body), sum(body)))
    return loops


def nvdisasm_path() -> str:
    from triton import knobs
    return knobs.nvidia.nvdisasm.path


def disassemble(cubin: bytes) -> str:
    """The cubin's SASS listing (nvdisasm -c: code sections only)."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "kernel.cubin"
        path.write_bytes(cubin)
        return subprocess.run([nvdisasm_path(), "-c", str(path)], check=True,
                              capture_output=True, text=True).stdout
