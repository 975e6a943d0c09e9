"""Issue 21's op-count target on torchvision's ResNet-50: a bf16 + channels_last training step of PWS fused and of
``gamma="auto"`` dispatches fewer ops than BN's (the proxy for launch-bound GPU time; ``benchmarks/count_ops.py``)."""

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("foreach", [False, True], ids=["sgd-loop", "sgd-foreach"])
def test_pws_and_auto_dispatch_fewer_ops_than_bn_on_torchvision_resnet50(foreach, tmp_path):
    spec = importlib.util.spec_from_file_location("count_ops", ROOT / "benchmarks" / "count_ops.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "ops.json"
    args = ["--model", "torchvision:resnet50", "--amp", "bf16", "--channels-last", "--json", str(out)]
    assert mod.main(args + (["--foreach"] if foreach else [])) == 0
    c = {k: v["total"] for k, v in json.loads(out.read_text())["counts"].items()}
    assert c["PWS fused"] < c["BN"] and c["auto fused"] < c["BN"], c
    # the node casts per group, autocast per layer: PWS's weights and biases cost fewer casts than BN's weights
    assert json.loads(out.read_text())["counts"]["PWS fused"]["by_op"]["aten._to_copy"] < \
        json.loads(out.read_text())["counts"]["BN"]["by_op"]["aten._to_copy"]
