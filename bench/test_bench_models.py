"""End-to-end cases on a Llama-3.2-1B-shaped model (a small Llama on CPU): ours vs PEFT."""
import pytest

from bench_helpers import cases

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")


@pytest.mark.parametrize("case", cases("train_step"))
def test_train_step(measure, case):
    measure(case)


@pytest.mark.parametrize("case", cases("generate"))
def test_generate(measure, case):
    measure(case)
