"""docker-compose.yml and the Dockerfile, checked without a Docker engine: every service can
start (an image, or a command that names a module or CLI subcommand the project has), speaks
only settings its service knows, and points at services that exist."""

from __future__ import annotations

import importlib
import re
import tomllib
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml
from pydantic_settings import BaseSettings

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES: dict[str, dict] = COMPOSE["services"]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PACKAGE_DIRS: dict[str, str] = PYPROJECT["tool"]["setuptools"]["package-dir"]
OURS = sorted(name for name, svc in SERVICES.items() if "build" in svc)


def command_text(service: dict) -> str:
    command = service.get("command", "")
    return " ".join(command) if isinstance(command, list) else command


def entry_of(service: dict) -> tuple[str, str]:
    """("module", "kunserve.gateway") or ("cli", "make-tiny-model")."""
    text = command_text(service)
    if match := re.search(r"python3? -m ([\w.]+)", text):
        return "module", match.group(1)
    if match := re.search(r"(?:^|[\s;|&])kunserve ([\w-]+)", text):
        return "cli", match.group(1)
    raise AssertionError(f"command {text!r} runs neither `python -m <module>` nor `kunserve`")


def module_file(module: str) -> Path:
    """Where setuptools' package-dir puts a module: kunserve.planner -> planner-svc/..."""
    parts = module.split(".")
    for cut in range(len(parts), 0, -1):
        package = ".".join(parts[:cut])
        if package in PACKAGE_DIRS:
            base = ROOT / PACKAGE_DIRS[package] / Path(*parts[cut:])
            return base / "__main__.py" if (base / "__init__.py").exists() or base.is_dir() \
                else base.with_suffix(".py")
    raise AssertionError(f"{module} is not under any package-dir of pyproject.toml")


def settings_names(package: str) -> set[str]:
    """KUNSERVE_* names of the settings classes in ``<package>.settings``."""
    module = importlib.import_module(f"{package}.settings")
    names = set()
    for value in vars(module).values():
        if isinstance(value, type) and issubclass(value, BaseSettings) and value is not BaseSettings:
            prefix = value.model_config.get("env_prefix", "")
            names |= {f"{prefix}{field}".upper() for field in value.model_fields}
    return names


def environment(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


def test_every_service_has_an_image_or_a_build():
    assert {"nats", "redis", "gateway", "router", "planner", "worker"} <= set(SERVICES)
    for name, service in SERVICES.items():
        assert service.get("image") or service.get("build"), name
        if "build" in service:
            context = service["build"] if isinstance(service["build"], str) \
                else service["build"]["context"]
            assert (ROOT / context / "Dockerfile").is_file(), name
    assert SERVICES["nats"]["image"].startswith("nats:")
    assert SERVICES["redis"]["image"].startswith("redis:")


@pytest.mark.parametrize("name", OURS)
def test_commands_name_a_module_or_subcommand_that_exists(name):
    kind, entry = entry_of(SERVICES[name])
    if kind == "module":
        assert module_file(entry).is_file(), f"{name}: {module_file(entry)} does not exist"
    else:
        from kunserve.cli import build_parser

        assert "kunserve" in PYPROJECT["project"]["scripts"]
        subcommands = build_parser()._subparsers._group_actions[0].choices
        assert entry in subcommands, f"{name}: `kunserve {entry}` is not a subcommand"


@pytest.mark.parametrize("name", OURS)
def test_environment_uses_only_settings_the_service_knows(name):
    kind, entry = entry_of(SERVICES[name])
    if kind == "module":
        known = settings_names("kunserve") | settings_names(entry)
    else:  # the CLI: variables the shell command hands on are some service's settings
        known = set().union(*(settings_names(p) for p in PACKAGE_DIRS
                              if (module_file(p).parent / "settings.py").is_file()))
    env = environment(SERVICES[name])
    unknown = {k for k in env if k.startswith("KUNSERVE_")} - known
    assert not unknown, f"{name} sets settings no class of {entry} reads: {sorted(unknown)}"
    assert all(k.startswith("KUNSERVE_") for k in env), f"{name}: non-KUNSERVE_ variable"


def test_urls_and_depends_on_point_at_services():
    for name, service in SERVICES.items():
        depends = service.get("depends_on") or []
        for other in depends:  # list or mapping form
            assert other in SERVICES and other != name, f"{name} depends on {other!r}"
        for key, value in environment(service).items():
            if key.endswith("_URL") and "://" in value:
                host = urlsplit(value).hostname
                assert host in SERVICES, f"{name}: {key} points at unknown host {host!r}"
                assert host in depends, f"{name} uses {host} without depending on it"


def test_workers_scale_and_name_themselves():
    worker = SERVICES["worker"]
    scalable = worker.get("deploy", {}).get("replicas", 1) > 1 \
        or "--scale worker=" in (ROOT / "docker-compose.yml").read_text()
    assert scalable
    # replicas share this definition: a fixed name, id or host port would collide
    assert "container_name" not in worker and "ports" not in worker
    assert "KUNSERVE_INSTANCE_ID" not in environment(worker)
    assert "hostname" not in worker


def test_named_volumes_are_declared():
    declared = set(COMPOSE.get("volumes") or {})
    for name, service in SERVICES.items():
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0] if isinstance(volume, str) else volume["source"]
            if not source.startswith((".", "/", "~")):
                assert source in declared, f"{name} mounts undeclared volume {source!r}"
    assert any("/models" in v for v in SERVICES["worker"]["volumes"])


def test_dockerfile_installs_the_pinned_cpu_torch_and_every_service_folder():
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11-slim", dockerfile, re.M)
    ci_pin = re.search(r"torch==[\d.]+", (ROOT / ".ci" / "run").read_text()).group(0)
    assert re.search(rf"pip install {re.escape(ci_pin)} --index-url "
                     r"https://download\.pytorch\.org/whl/cpu", dockerfile)
    ignored = (ROOT / ".dockerignore").read_text().split()
    for folder in set(PACKAGE_DIRS.values()):
        assert f"COPY {folder}/ {folder}/" in dockerfile, f"the image lacks {folder}/"
        assert folder not in ignored and f"{folder}/" not in ignored
