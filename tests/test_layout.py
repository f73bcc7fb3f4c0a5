"""The house's rule: the libraries (captioner/, qa/) import nothing from the orchestrator
(pipeline/), at the top of a file or inside a function."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _imports(path: Path) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
    return found


@pytest.mark.parametrize("library", ["captioner", "qa"])
def test_libraries_import_nothing_from_the_orchestrator(library: str) -> None:
    files = sorted((ROOT / library).glob("*.py"))
    assert files
    upward = [f"{f.relative_to(ROOT)}:{line}: {name}" for f in files
              for line, name in _imports(f) if name.split(".")[0] == "pipeline"]
    assert upward == []


def test_the_orchestrator_re_exports_the_libraries_own_types() -> None:
    import captioner.errors
    import pipeline.errors
    import pipeline.records
    import qa.errors
    import qa.records

    assert pipeline.errors.CaptionerError is captioner.errors.CaptionerError
    assert pipeline.errors.DatasetError is captioner.errors.DatasetError
    assert pipeline.errors.ReaderError is qa.errors.ReaderError
    assert pipeline.records.Transcript is qa.records.Transcript
    for error in (captioner.errors.CaptionerError, qa.errors.ReaderError):
        assert error in pipeline.errors.KNOWN_ERRORS


def test_the_cluster_is_divided_up_in_one_place() -> None:
    from pipeline.config import RaySettings
    from pipeline.ray_cluster import plan_ray

    settings = RaySettings(decode_workers=4, cpu_caption_actors=1)
    cpu = plan_ray(settings, {"CPU": 2.0})
    assert (cpu.decode_workers, cpu.caption_actors, cpu.caption_threads) == (1, 1, 1)
    assert cpu.caption_actor_options == {"num_cpus": 1}
    big = plan_ray(settings, {"CPU": 16.0})
    assert (big.decode_workers, big.caption_threads) == (4, 8)
    gpu = plan_ray(settings, {"CPU": 16.0, "GPU": 2.0})
    assert (gpu.caption_actors, gpu.decode_workers, gpu.caption_threads) == (2, 4, None)
    assert gpu.caption_actor_options == {"num_gpus": 1, "num_cpus": 1}


def test_random_weight_checkpoints_are_written_in_one_place() -> None:
    """Size presets and random-weights checkpoint writers live once, beside the models
    (captioner/random_weights*.py), for tests, the demo and the benchmarks."""
    import re

    writer = re.compile(r"(write|build)_(tiny_)?(mmser|llava|tag2text|checkpoint|components)"
                        r"|official_\w*state_dict")
    home = {"captioner/random_weights.py", "captioner/random_weights_baselines.py"}
    elsewhere = []
    for folder in ("captioner", "pipeline", "benchmarks", "tests"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            name = str(path.relative_to(ROOT))
            for node in ast.walk(ast.parse(path.read_text(), name)):
                if (isinstance(node, ast.FunctionDef) and writer.fullmatch(node.name)
                        and name not in home):
                    elsewhere.append(f"{name}:{node.lineno}: {node.name}")
    assert elsewhere == []


def test_no_module_registers_anything_when_imported() -> None:
    """Registration (transformers' Auto classes, Ray remote functions) happens when a caller
    asks for it, never as a side effect of an import: no `.register(...)` at module level."""
    found = []
    for package in ("captioner", "qa", "pipeline", "benchmarks"):
        for path in sorted((ROOT / package).rglob("*.py")):
            for node in ast.parse(path.read_text(), str(path)).body:
                call = node.value if isinstance(node, ast.Expr) else None
                if (isinstance(call, ast.Call) and isinstance(call.func, ast.Attribute)
                        and call.func.attr == "register"):
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert found == []
