"""Every model type with a causal-LM head in the installed transformers computes PEFT's function
under `wrap` (fast where verified, PEFT's own way elsewhere) or is refused by name: never a
silent difference. docs/model_zoo.md records each row (tests/model_zoo.py)."""
import pytest

from model_zoo import causal_lm_types, check_type, documented_rows, markdown_row

TYPES = causal_lm_types()


@pytest.fixture(scope="module")
def documented():
    return documented_rows()


@pytest.mark.parametrize("model_type", TYPES)
def test_computes_pefts_function_or_is_refused(model_type, documented, one_torch_thread):
    outcomes = check_type(model_type)
    failures = {m: o for m, o in outcomes.items() if o[0] not in ("equal", "refused",
                                                                  "no function", "unbuildable")}
    assert not failures, failures
    assert documented.get(model_type) == markdown_row(model_type, outcomes), \
        "docs/model_zoo.md is stale: regenerate it with `python -m tests.model_zoo --markdown`"


def test_the_zoo_is_large(documented):
    """At least 100 model types built and held to PEFT's function (or refused) by all three
    methods; every type of this transformers has a row."""
    assert set(documented) == set(TYPES)
    checked = [t for t, row in documented.items() if "not built here" not in row]
    assert len(checked) >= 100, len(checked)
