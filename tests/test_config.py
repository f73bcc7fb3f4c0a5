"""The typed config: defaults load, overrides apply, wrong keys and values are named."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from pipeline.config import DEFAULT_CONFIG_PATH, Config, config_from_dict, load_config
from pipeline.errors import ConfigError


def test_default_config_loads_with_its_documented_values():
    config = load_config()
    assert config.sampling.policy == "fps"
    assert config.sampling.fps == 1.0
    assert config.reader.model == "Qwen/Qwen2.5-14B-Instruct"
    assert config.captioner.name == "mmser"
    assert set(config.datasets) >= {"egoschema", "demo"}


def _leaf_paths(obj, prefix=""):
    if dataclasses.is_dataclass(obj):
        for f in dataclasses.fields(obj):
            yield from _leaf_paths(getattr(obj, f.name), f"{prefix}{f.name}.")
    elif isinstance(obj, dict) and obj and all(dataclasses.is_dataclass(v) for v in obj.values()):
        for k, v in obj.items():
            yield from _leaf_paths(v, f"{prefix}{k}.")
    else:
        yield prefix[:-1]


def test_config_yaml_spells_out_every_schema_key():
    """config.yaml is the documentation of every default: no schema key may be missing."""
    raw = yaml.safe_load(DEFAULT_CONFIG_PATH.read_text())
    missing = []
    for path in _leaf_paths(load_config()):
        node = raw
        for part in path.split("."):
            if not isinstance(node, dict) or part not in node:
                missing.append(path)
                break
            node = node[part]
    assert not missing, f"keys in the schema but not in config.yaml: {missing}"


def test_every_config_yaml_key_has_a_comment():
    lines = DEFAULT_CONFIG_PATH.read_text().splitlines()
    uncommented = []
    for i, line in enumerate(lines):
        stripped = line.strip()
        if not stripped or stripped.startswith("#") or stripped.startswith("- "):
            continue
        if "#" in line:
            continue
        # A section header or key is documented by a comment line just above it.
        previous = lines[i - 1].strip() if i else ""
        if stripped.endswith(":") or previous.startswith("#"):
            continue
        uncommented.append(stripped)
    # The demo dataset repeats the egoschema entry's documented keys.
    uncommented = [u for u in uncommented if not u.startswith(("download:", "hf_repo:",
                                                                "subset_only:", "format:"))]
    assert not uncommented, f"config.yaml keys without a comment: {uncommented}"


def test_overrides_are_parsed_as_yaml_and_typed():
    config = load_config(overrides=["sampling.fps=0.5", "sampling.resize=null",
                                    "ray.address=auto", "sampling.policy=uniform"])
    assert config.sampling.fps == 0.5
    assert config.sampling.resize is None
    assert config.ray.address == "auto"
    assert config.sampling.policy == "uniform"


def test_int_is_accepted_for_float_but_not_the_reverse():
    assert load_config(overrides=["sampling.fps=2"]).sampling.fps == 2.0
    with pytest.raises(ConfigError, match=r"sampling.num_frames.*2.5.*int"):
        load_config(overrides=["sampling.num_frames=2.5"])


@pytest.mark.parametrize(
    ("override", "pattern"),
    [
        ("sampling.bogus=1", r"unknown config key 'sampling.bogus'.*allowed keys.*fps"),
        ("nonsense=1", r"unknown config key 'nonsense'.*sampling"),
        ("sampling.fps=fast", r"'sampling.fps': got 'fast', expected float"),
        ("sampling.policy=random", r"'sampling.policy'.*'random'.*one of 'fps', 'uniform'"),
        ("ray.enabled=maybe", r"'ray.enabled'.*'maybe'.*bool"),
        ("sampling.resize=[336]", r"resize must be null or \[width, height\]"),
        ("sampling.fps=0", r"fps must be > 0"),
        ("sampling.num_frames=true", r"'sampling.num_frames'.*True.*int"),
        ("datasets.demo.format=zip", r"'datasets.demo.format'.*'zip'"),
        ("sampling", r"expected key.sub=value"),
    ],
)
def test_bad_keys_and_values_name_the_key_value_and_allowed(override, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config(overrides=[override])


def test_bad_files_are_named(tmp_path: Path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("sampling: [unclosed\n")
    with pytest.raises(ConfigError, match=r"broken.yaml is not valid YAML"):
        load_config(broken)
    listed = tmp_path / "list.yaml"
    listed.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(listed)


def test_partial_config_takes_defaults_for_the_rest():
    config = config_from_dict({"sampling": {"fps": 2.0}})
    assert isinstance(config, Config)
    assert config.sampling.fps == 2.0
    assert config.sampling.policy == "fps"
    assert config.ray.decode_workers == 2


def test_reader_url_is_one_url_or_a_list_of_replicas():
    one = load_config(overrides=["reader.mode=external", "reader.url=http://h:8000"]).reader
    assert one.base_urls == ["http://h:8000/v1"] and one.base_url == "http://h:8000/v1"
    many = load_config(overrides=["reader.mode=external",
                                  "reader.url=[http://a:8000/v1/, http://b:9000]"]).reader
    assert many.base_urls == ["http://a:8000/v1", "http://b:9000/v1"]
    managed = load_config(overrides=["reader.replicas=3", "reader.port=8100"]).reader
    assert managed.base_urls == [f"http://127.0.0.1:{p}/v1" for p in (8100, 8101, 8102)]


def test_managed_replicas_get_their_own_port_and_env():
    from qa.server import ManagedReplicas, server_command

    reader = load_config(overrides=[
        "reader.replicas=2", "reader.port=8100", "reader.env={VLLM_CPU_KVCACHE_SPACE: '1'}",
        "reader.replica_env=[{CUDA_VISIBLE_DEVICES: '0'}, {CUDA_VISIBLE_DEVICES: '1'}]"]).reader
    servers = ManagedReplicas(reader).servers
    assert [s.base_url for s in servers] == reader.base_urls
    assert [s.settings.env for s in servers] == [
        {"VLLM_CPU_KVCACHE_SPACE": "1", "CUDA_VISIBLE_DEVICES": str(i)} for i in (0, 1)]
    assert server_command(servers[1].settings)[server_command(servers[1].settings).index(
        "--port") + 1] == "8101"


@pytest.mark.parametrize(
    ("overrides", "pattern"),
    [
        (["reader.mode=external", "reader.url=[]"], r"reader.url is required.*a list"),
        (["reader.mode=external", "reader.url=[http://a:1, http://a:1/v1]"],
         r"reader.url lists http://a:1/v1 more than once"),
        (["reader.mode=external", "reader.url=[1, 2]"], r"'reader.url'.*a list of str"),
        (["reader.mode=external", "reader.url=http://a:1", "reader.replicas=2"],
         r"reader.replicas 2 starts managed servers; in external mode list"),
        (["reader.replicas=0"], r"reader.replicas must be >= 1"),
        (["reader.port=65535", "reader.replicas=2"], r"runs past port 65535"),
        (["reader.replica_recheck_s=0"], r"reader.replica_recheck_s must be > 0"),
        (["reader.replicas=2", "reader.replica_env=[{A: '1'}]"],
         r"reader.replica_env has 1 entries for reader.replicas 2"),
    ],
)
def test_bad_reader_replica_settings_are_named(overrides, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config(overrides=overrides)
