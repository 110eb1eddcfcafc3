"""The conftest of timm's own tests/test_models.py (copied next to it by tests/test_timm_suite.py).

Keeps the tests of the models named in FASTVIT_TIMM_MODELS that timm's CI runs, passes every model timm's
``create_model`` builds through ``fastvit.optimize(backend="triton")`` when FASTVIT_TIMM_OPTIMIZE=1
(Triton runs through its interpreter on a CPU), and writes each test's outcome to FASTVIT_TIMM_OUTCOMES.
"""

import json
import os

_replaced: dict[str, int] = {}  # model name -> modules optimize replaced

if os.environ.get("FASTVIT_TIMM_OPTIMIZE") == "1":
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton
    import timm
    import timm.models

    import fastvit

    _create = timm.create_model

    def create_model(*args, **kwargs):
        model = _create(*args, **kwargs)
        _replaced[model.default_cfg.get("architecture", type(model).__name__)] = len(
            fastvit.optimize(model, backend="triton").replaced)
        return model

    timm.create_model = timm.models.create_model = create_model

MODELS = set(os.environ["FASTVIT_TIMM_MODELS"].split(","))
# the markers timm's own CI runs (its tests without one, such as the prune-every-layer contract, are
# "slow, excluded from CI" there)
CI_MARKERS = {"base", "cfg", "forward", "backward", "fxforward", "fxbackward", "torchscript", "features"}
_outcomes: dict[str, dict] = {}


def pytest_collection_modifyitems(config, items):
    keep, drop = [], []
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        ours = params.get("model_name") in MODELS and any(m.name in CI_MARKERS for m in item.iter_markers())
        (keep if ours else drop).append(item)
    config.hook.pytest_deselected(items=drop)
    items[:] = keep


def pytest_runtest_logreport(report):
    if report.when == "call" or report.outcome != "passed":
        _outcomes.setdefault(report.nodeid, {"outcome": report.outcome, "message": str(report.longrepr or "")[-2000:]})


def pytest_sessionfinish(session):
    with open(os.environ["FASTVIT_TIMM_OUTCOMES"], "w") as f:
        json.dump({"outcomes": _outcomes, "replaced": _replaced}, f, indent=1, sort_keys=True)
