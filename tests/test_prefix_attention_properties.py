"""Property test: fused prefix attention matches the reference on random small shapes."""
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_prefix_attention import Case, check_against_reference


@st.composite
def cases(draw):
    Hkv = draw(st.integers(1, 2))
    Lk = draw(st.integers(0, 40))
    prefix = draw(st.sampled_from(["none", "shared", "row", "task"]))
    if Lk == 0 and prefix == "none":
        prefix = "shared"                       # some key must exist
    P = 0 if prefix == "none" else draw(st.integers(1 if Lk == 0 else 0, 40))
    return Case(
        B=draw(st.integers(1, 3)), Hq=Hkv * draw(st.sampled_from([1, 2, 3])), Hkv=Hkv,
        Lq=draw(st.integers(1, 40)), Lk=Lk, D=draw(st.sampled_from([8, 16, 24, 32, 48, 64, 80])),
        P=P, prefix=prefix,
        mask=draw(st.sampled_from(["none", "left", "right", "random", "empty_row"]))
        if Lk > 0 else "none",
        causal=draw(st.booleans()), layout=draw(st.sampled_from(["bhld", "blhd", "d_strided"])))


@settings(max_examples=25, deadline=None)
@given(case=cases(), dtype=st.sampled_from([torch.float32, torch.float16]))
def test_property_random_shapes(case, dtype):
    check_against_reference(case, dtype, rule="table")
