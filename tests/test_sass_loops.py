"""sass_loops: the hot loops of a SASS listing, on a fixed listing written here and on one real
compile of a small matmul loop for sm_90 and sm_80 (seconds, no GPU)."""
import json
import os
import subprocess
import sys
import textwrap

from ptuning_fast.benchmarks.sass_loops import hot_loops, mma_flop, parse

# An outer loop (.L_x_1) around an inner one holding HGMMA (.L_x_2), a loop with no MMA
# (.L_x_3), a forward branch (.L_x_4), and an mbarrier wait's retry loop put out of line after
# EXIT (.L_x_5), which branches back into the body (.L_x_6): only .L_x_2 is a hot loop.
LISTING = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
.L_x_1:
        /*0010*/                   IADD3 R2, R2, 0x1, RZ ;
.L_x_2:
        /*0020*/                   WARPGROUP.ARRIVE ;
        /*0030*/                   HGMMA.64x64x16.F32.BF16 R88, gdesc[UR24], RZ, !UPT ;
        /*0040*/                   HGMMA.64x128x16.F32.BF16 R24, R120, gdesc[UR12].tnspB, R24, gsb0 ;
        /*0050*/              @!P4 BRA `(.L_x_5) ;
.L_x_6:
        /*0060*/                   FMUL R3, R3, R4 ;
        /*0070*/              @P0 BRA `(.L_x_4) ;
        /*0080*/                   MUFU.EX2 R5, R5 ;
.L_x_4:
        /*0090*/              @!P1 BRA `(.L_x_2) ;
        /*00a0*/              @!P2 BRA `(.L_x_1) ;
.L_x_3:
        /*00b0*/                   IADD3 R6, R6, 0x1, RZ ;
        /*00c0*/              @!P3 BRA `(.L_x_3) ;
        /*00d0*/                   EXIT ;
.L_x_5:
        /*00e0*/                   SYNCS.PHASECHK.TRANS64.TRYWAIT P4, [R7+URZ], R8 ;
        /*00f0*/              @!P4 BRA `(.L_x_5) ;
        /*0100*/                   BRA `(.L_x_6) ;
"""


def test_hot_loops_of_a_fixed_listing():
    instructions, labels = parse(LISTING)
    assert len(instructions) == 17 and labels[".L_x_2"] == 2 and labels[".L_x_6"] == 6
    (loop,) = hot_loops(LISTING)
    assert (loop.start, loop.end) == (0x20, 0x90)
    assert (loop.instructions, loop.mma, loop.other) == (8, 2, 6)
    # A warpgroup's 64 x N x 16 HGMMA is 2 * 64 * N * 16 FLOP, a quarter of it per warp.
    assert loop.mma_flop == (2 * 64 * 64 * 16 + 2 * 64 * 128 * 16) // 4
    assert loop.per_kflop(2000.0) == 3.0


def test_mma_flop_of_ampere_and_other_instructions():
    assert mma_flop("HMMA.16816.F32.BF16 R4, R8, R12, R4") == 2 * 16 * 8 * 16
    assert mma_flop("HMMA.1688.F32.TF32 R4, R8, R12, R4") == 2 * 16 * 8 * 8
    assert mma_flop("FFMA R1, R2, R3, R4") == 0


# A K-loop of tl.dot: one hot loop whose MMA work per warp is the tile's FLOP / warps.
KERNEL = textwrap.dedent('''
    import json, sys
    import triton, triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from ptuning_fast.benchmarks.sass_loops import disassemble, hot_loops

    @triton.jit
    def matmul_loop(A, B, C, K, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
        rm, rn, rk = tl.arange(0, BM), tl.arange(0, BN), tl.arange(0, BK)
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k in range(0, K, BK):
            a = tl.load(A + rm[:, None] * K + (k + rk)[None, :])
            b = tl.load(B + (k + rk)[:, None] * BN + rn[None, :])
            acc = tl.dot(a, b, acc)
        tl.store(C + rm[:, None] * BN + rn[None, :], acc)

    rows = {}
    for arch in (90, 80):
        src = ASTSource(matmul_loop, {"A": "*bf16", "B": "*bf16", "C": "*fp32", "K": "i32"},
                        {(4,): 64, (5,): 64, (6,): 32})
        cubin = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                               options={"num_warps": 4, "num_stages": 2}).asm["cubin"]
        rows[arch] = [[l.instructions, l.mma, l.mma_flop] for l in hot_loops(disassemble(cubin))]
    print(json.dumps(rows))
''')


def test_hot_loop_of_a_real_compile(tmp_path):
    script = tmp_path / "matmul_loop.py"
    script.write_text(KERNEL)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(proc.stdout.splitlines()[-1])
    for arch, loops in rows.items():
        assert len(loops) == 1, (arch, loops)
        instructions, mma, flop = loops[0]
        assert 0 < mma < instructions
        assert flop == 2 * 64 * 64 * 32 // 4, arch     # the tile's FLOP over 4 warps
