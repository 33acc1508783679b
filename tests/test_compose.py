"""docker-compose.yml and the Dockerfile, checked without a Docker engine (there is none here): the services, their
healthchecks and dependencies, every SEMCACHE_* variable against the settings object, the commands against the
real CLI, and the image's torch build and user."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from cache_core.settings import Settings
from semcache.cli import cli

ROOT = Path(__file__).resolve().parent.parent
SETTINGS_VARS = {f"SEMCACHE_{name.upper()}" for name in Settings.model_fields}
APP_SERVICES = ("worker", "web", "demo")
INTERPOLATION = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}")


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


@pytest.fixture(scope="module")
def dockerfile() -> list[tuple[str, str]]:
    """(instruction, arguments) of every Dockerfile instruction, continuation lines joined."""
    text = (ROOT / "Dockerfile").read_text()
    joined = re.sub(r"\\\n", " ", text)
    out = []
    for line in joined.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            instruction, _, args = line.partition(" ")
            out.append((instruction.upper(), args.strip()))
    return out


def interpolate(value: str, env: dict[str, str]) -> str:
    """Compose's ${VAR}, ${VAR:-default} and ${VAR:?error}, as `docker compose` resolves them."""

    def sub(match: re.Match) -> str:
        name, op, arg = match.group(1), match.group(2), match.group(3)
        if name in env and (env[name] or not (op or "").startswith(":")):
            return env[name]
        if op in (":?", "?"):
            raise KeyError(f"{name} is required: {arg}")
        return arg or ""

    return INTERPOLATION.sub(sub, value)


def test_the_stack_has_redis_worker_web_and_an_optional_demo(compose):
    services = compose["services"]
    assert set(services) == {"redis", "worker", "web", "demo"}
    assert services["demo"]["profiles"] == ["demo"]
    for name in ("redis", "worker", "web"):
        assert "profiles" not in services[name], f"{name} must run by default"


def test_redis_is_redis_8_persistent_capped_and_evicts_only_entries_with_a_ttl(compose):
    redis = compose["services"]["redis"]
    assert redis["image"] == "redis:8"  # Search and JSON are built into Redis 8
    command = redis["command"]
    args = dict(zip(command[1::2], command[2::2]))
    assert command[0] == "redis-server"
    assert args["--appendonly"] == "yes"
    assert interpolate(args["--maxmemory"], {}) not in ("", "0")
    assert args["--maxmemory-policy"].startswith("volatile-")
    assert args["--maxmemory-policy"] == Settings().embedded_maxmemory_policy  # the same advice as the embedded one
    assert any(volume.endswith(":/data") for volume in redis["volumes"])
    assert redis["volumes"][0].split(":")[0] in compose["volumes"], "the append-only file lives on a named volume"
    assert redis["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]


@pytest.mark.parametrize("name", APP_SERVICES)
def test_app_services_are_built_here_and_wait_for_a_healthy_redis(compose, name):
    service = compose["services"][name]
    assert service["build"] == "."
    assert service["depends_on"]["redis"]["condition"] == "service_healthy"
    assert service.get("init") is True  # a real init as pid 1 reaps the workers' orphans
    assert service["image"] == compose["services"]["web"]["image"], "one image for every semcache service"


@pytest.mark.parametrize("name", ["worker", "web"])
def test_long_running_services_have_healthchecks_and_restart(compose, name):
    service = compose["services"][name]
    test = service["healthcheck"]["test"]
    assert test[0] == "CMD" and test[1:3] == ["python", "-c"]
    compile(test[3], f"{name} healthcheck", "exec")  # the snippet is valid Python
    assert service["restart"] == "unless-stopped"
    assert service["healthcheck"]["start_period"]  # the model loads before the first answer


def test_web_healthcheck_asks_healthz_on_the_port_it_serves(compose):
    web = compose["services"]["web"]
    assert "http://127.0.0.1:8000/healthz" in web["healthcheck"]["test"][3]
    assert web["command"][web["command"].index("--port") + 1] == "8000"
    assert web["command"][web["command"].index("--host") + 1] == "0.0.0.0"
    assert any(str(port).endswith(":8000") for port in web["ports"])


def test_worker_healthcheck_pings_its_own_node(compose):
    snippet = compose["services"]["worker"]["healthcheck"]["test"][3]
    assert "control.ping" in snippet and "socket.gethostname()" in snippet


@pytest.mark.parametrize("name", APP_SERVICES)
def test_configuration_is_only_semcache_variables_that_the_settings_know(compose, name):
    env = compose["services"][name]["environment"]
    assert isinstance(env, dict) and env
    unknown = set(env) - SETTINGS_VARS
    assert not unknown, f"{name} sets variables that cache_core.settings.Settings does not have: {unknown}"
    assert env["SEMCACHE_REDIS_URL"].startswith("redis://redis:6379/")


@pytest.mark.parametrize("name", APP_SERVICES)
def test_the_environment_validates_as_settings(compose, name, monkeypatch):
    env = compose["services"][name]["environment"]
    given = {"SEMCACHE_SECRET_KEY": "s" * 64, "SEMCACHE_ADMIN_TOKEN": "t" * 64}
    for key, value in env.items():
        monkeypatch.setenv(key, interpolate(str(value), given))
    settings = Settings()
    assert settings.redis_url.startswith("redis://redis:6379/")
    assert str(settings.data_dir) == "/data"


def test_required_secrets_fail_loudly_when_missing(compose):
    env = compose["services"]["web"]["environment"]
    for key in ("SEMCACHE_SECRET_KEY", "SEMCACHE_ADMIN_TOKEN"):
        assert ":?" in env[key], f"{key} must be required (compose refuses to start without it)"
        with pytest.raises(KeyError):
            interpolate(env[key], {})
    assert "SEMCACHE_ADMIN_TOKEN" not in compose["services"]["worker"]["environment"]
    assert "SEMCACHE_SECRET_KEY" not in compose["services"]["worker"]["environment"]


def test_the_demo_uses_its_own_index_and_broker(compose):
    demo = compose["services"]["demo"]["environment"]
    web = compose["services"]["web"]["environment"]
    assert interpolate(demo["SEMCACHE_INDEX"], {}) != interpolate(web["SEMCACHE_INDEX"], {})
    assert demo["SEMCACHE_BROKER_URL"] != "redis://redis:6379/1"  # the production broker (db 1 of the cache)
    assert demo["SEMCACHE_BROKER_URL"].startswith("redis://redis:6379/")
    assert compose["services"]["demo"]["command"][0] == "demo"


@pytest.mark.parametrize("name", ["worker", "web"])
def test_service_commands_exist_in_the_cli(compose, name):
    """The image's entry point is `semcache`: each command and its options must parse with the real CLI."""
    command = [interpolate(str(part), {}) for part in compose["services"][name]["command"]]
    result = CliRunner().invoke(cli, [*command, "--help"])
    assert result.exit_code == 0, f"`semcache {shlex.join(command)}`: {result.output}"


def test_dockerfile_installs_cpu_torch_first_and_runs_unprivileged(dockerfile):
    assert dockerfile[0] == ("FROM", "python:3.11-slim")
    runs = [(i, args) for i, (instruction, args) in enumerate(dockerfile) if instruction == "RUN"]
    torch_steps = [i for i, args in runs
                   if "torch==2.13.0" in args and "--index-url https://download.pytorch.org/whl/cpu" in args]
    project_steps = [i for i, args in runs if re.search(r"pip install .*-c constraints\.txt \.(\s|$)", args)]
    assert torch_steps and project_steps, "the torch CPU wheel and the project must both be installed"
    assert torch_steps[0] < project_steps[0], "torch (CPU) must be installed before the project"
    users = [args for instruction, args in dockerfile if instruction == "USER"]
    assert users and users[-1] not in ("root", "0", "0:0")
    last_user = max(i for i, (instruction, _) in enumerate(dockerfile) if instruction == "USER")
    assert all(i < last_user for i, _ in runs), "nothing runs as root after the switch to the unprivileged user"
    assert ("ENTRYPOINT", '["semcache"]') in dockerfile
    env_text = " ".join(args for instruction, args in dockerfile if instruction == "ENV")
    assert "HF_HUB_OFFLINE=1" in env_text  # the packaged model, never a download at run time
    assert "SEMCACHE_DATA_DIR=/data" in env_text


def test_dockerfile_copies_every_package_and_the_constraints(dockerfile):
    copied = " ".join(args for instruction, args in dockerfile if instruction == "COPY")
    for needed in ("cache_core", "worker", "web", "semcache", "pyproject.toml", "constraints.txt", "README.md"):
        assert needed in copied
    constraints = (ROOT / "constraints.txt").read_text().splitlines()
    assert "torch==2.13.0" in constraints  # the pin the image's torch step uses


def test_dockerignore_keeps_the_build_context_small_and_secret_free():
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    assert {".git", ".venv", ".env", "test-artifacts"} <= ignored
