"""Op-level cases: prefix attention (fwd, fwd_bwd), a decode step, prompt embedding vs copy."""
import pytest

from bench_helpers import cases

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.mark.parametrize("case", cases("prefix_attention"))
def test_prefix_attention(measure, case):
    measure(case)


@pytest.mark.parametrize("case", cases("decode"))
def test_decode(measure, case):
    measure(case)


@pytest.mark.parametrize("case", cases("prompt_embedding"))
def test_prompt_embedding(measure, case):
    measure(case)
