"""The one error rule (`ptuning_fast.error_bound`) shared by `ptuning-fast verify` and the tests."""
import conftest
import pytest
import torch

from ptuning_fast import error_bound, verify


def test_verify_and_tests_use_the_same_rule(monkeypatch):
    # Tightening the library's rule must tighten both: neither keeps a copy of its own.
    exact = torch.ones(4, dtype=torch.float64)
    same_precision = exact + 0.25
    actual = (exact + 0.4).half()
    conftest.assert_error_within(actual, same_precision.half(), exact)
    monkeypatch.setattr(error_bound, "FACTOR", 1.0)
    with pytest.raises(AssertionError, match="allowed"):
        conftest.assert_error_within(actual, same_precision.half(), exact)
    assert verify.check_error is error_bound.check_error
    assert not hasattr(verify, "FACTOR") and not hasattr(verify, "FLOOR_EPS")


def test_rule_twice_the_same_precision_error_plus_ulps():
    exact = torch.tensor([3.0, -1.0], dtype=torch.float64)
    low = exact + torch.tensor([0.01, 0.0], dtype=torch.float64)
    eps = torch.finfo(torch.float16).eps
    floor = 2 * eps * 3.0                       # 2 ulps of the largest magnitude (3)
    ok = error_bound.check_error((exact + 0.02 + floor * 0.9).half().double(), low, exact,
                                 dtype=torch.float16)
    assert ok.allowed == pytest.approx(2 * 0.01 + floor)
    grad = error_bound.check_error(exact, low, exact, kind="grad", dtype=torch.float16)
    assert grad.allowed == pytest.approx(2 * 0.01 + 8 * eps * 3.0)     # gradients: 8 ulps
    assert not error_bound.check_error(exact + 0.05, low, exact, dtype=torch.float16).ok
    nan = error_bound.check_error(torch.full_like(exact, float("nan")), low, exact)
    assert not nan.ok and "non-finite" in nan.describe("out")
    with pytest.raises(ValueError, match="kind"):
        error_bound.check_error(exact, low, exact, kind="bwd")


def test_relative_rule_for_results_far_below_one():
    # Gradients of ~1e-3: the floor's magnitude of 1 lets a 30% error through; measured relative
    # to the largest element, the same error fails and a rounding-sized one passes.
    exact = torch.tensor([1e-3, -5e-4, 2e-4], dtype=torch.float64)
    low = (exact * (1 + 2 ** -8)).to(torch.bfloat16)
    wrong = (exact * 1.3).float()
    conftest.assert_error_within(wrong, low, exact, kind="grad", dtype=torch.bfloat16)
    with pytest.raises(AssertionError, match="allowed"):
        conftest.assert_error_within(wrong, low, exact, kind="grad", dtype=torch.bfloat16,
                                     relative=True)
    conftest.assert_error_within(exact.to(torch.bfloat16).float(), low, exact, kind="grad",
                                 dtype=torch.bfloat16, relative=True)


@pytest.mark.parametrize("on_gpu, dots, row", [
    (False, "tf32", conftest.FP32_IEEE), (False, "ieee", conftest.FP32_IEEE),
    (True, "tf32", conftest.FP32_TF32), (True, "ieee", conftest.FP32_IEEE)])
def test_fp32_tolerance_follows_the_dots(on_gpu, dots, row):
    # tf32 dots only on a GPU (the interpreter computes IEEE fp32 whatever the setting).
    assert conftest.fp32_tolerances(on_gpu, dots) is row
    assert row["fwd"] <= row["grad"]
    assert conftest.FP32_IEEE["fwd"] < conftest.FP32_TF32["fwd"]
