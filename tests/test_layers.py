"""The house's layers: imports point down (tools/check_layers.py), and importing a low module stays cheap."""
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))

import check_layers  # noqa: E402


def test_every_import_points_down_and_none_cycles():
    deps = check_layers.graph()
    assert "qrecover.nn" in deps and "qrecover.format" in deps["qrecover.nn"]  # the parser sees relative imports
    assert check_layers.upward(deps) == []
    assert check_layers.cycles(deps) == []


def test_the_check_catches_an_upward_import_and_a_cycle():
    assert check_layers.upward({"qrecover.nn": {"qrecover.api", "qrecover.format"}}) == [
        "qrecover.nn (nn) imports qrecover.api (api)"
    ]
    assert check_layers.cycles({"qrecover.io": {"qrecover.models.shards"}, "qrecover.models.shards": {"qrecover.io"}}) == [
        "qrecover.io -> qrecover.models.shards -> qrecover.io"
    ]


def _run(code: str) -> str:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()


def test_a_low_module_loads_no_transformers_and_the_quantizer_registers_with_transformers():
    assert _run("import sys, qrecover.format, qrecover.quant.gptq; print('transformers' in sys.modules)") == "False"
    registered = "from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING as M; print('qrecover' in M)"
    assert _run(f"import qrecover\nimport transformers\n{registered}") == "True"  # qrecover first
    assert _run(f"import transformers\nimport qrecover\n{registered}") == "True"  # transformers first
    assert _run("import qrecover; print(qrecover.__version__, qrecover.QuantConfig.__name__)") == "0.1.0 QuantConfig"
