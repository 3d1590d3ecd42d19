"""The DeepSpeed JSON is resolved once, by the same function, wherever a run is predicted or checked: `gptpipe plan`
and `gptpipe doctor` refuse a JSON that contradicts the params as train does, and accept one that agrees."""

import json

import pytest

from pipeline import params
from pipeline.errors import UserError
from pipeline.tools.doctor import run_checks
from pipeline.tools.plan import make_plan


def with_json(tmp_path, content: dict, **train):
    (tmp_path / "ds.json").write_text(json.dumps(content))
    return params.validate_params({"train": {"deepspeed_config": str(tmp_path / "ds.json"), **train},
                                   "tokenize": {"kind": "char", "out_dir": str(tmp_path / "no-tokens")},
                                   "model": {"n_layer": 1, "n_head": 2, "n_embd": 32, "block_size": 32}})


def test_plan_refuses_a_json_that_contradicts_the_params_as_train_does(tmp_path):
    """Before, plan read train.zero_stage: 0 and divided nothing, while the engine would have run ZeRO 2."""
    with pytest.raises(UserError, match=r"ds.json sets zero_optimization.stage=2 where train.zero_stage gives 0"):
        make_plan(with_json(tmp_path, {"zero_optimization": {"stage": 2}}))
    plan = make_plan(with_json(tmp_path, {"zero_optimization": {"stage": "auto", "reduce_bucket_size": 5e7}}))
    assert plan.shape.n_params > 0


def test_doctor_names_a_contradicting_json_with_the_param_to_set(tmp_path):
    checks = {name: (ok, detail) for name, ok, detail in run_checks(with_json(tmp_path, {"gradient_clipping": 0.0}))}
    ok, detail = checks["deepspeed json"]
    assert not ok and "gradient_clipping=0.0 where train.grad_clip gives 1.0" in detail
    checks = {name: (ok, detail) for name, ok, detail in run_checks(with_json(tmp_path, {"gradient_clipping": "auto"}))}
    assert checks["deepspeed json"][0]
