"""docker/: the team stack's structure, checked without Docker (the development machines have none).

The compose file is parsed with PyYAML and interpolated the way Compose does it (`$$`, `${VAR}`, `${VAR:-default}`,
`${VAR:?message}`) with the values of `.env.example`; the servers' command lines are then parsed by the installed
MLflow's own `mlflow server` command, and the Dockerfiles' COPY sources are looked up in their build contexts.
What this cannot show (images pulled, containers healthy) is listed in docs/deployment.md.
"""

from __future__ import annotations

import configparser
import importlib.util
import re
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
COMPOSE_FILE = DOCKER / "docker-compose.yml"
ENV_EXAMPLE = DOCKER / ".env.example"

SERVICES = {"postgres", "minio", "minio-init", "mlflow", "mlflow-auth", "landscape"}
SERVERS = ("mlflow", "mlflow-auth")
S3_SERVICES = {"minio", "minio-init", *SERVERS}  # the only services that may hold object-store credentials
S3_VARIABLES = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "MLFLOW_S3_ENDPOINT_URL", "MINIO_ROOT_USER", "MINIO_ROOT_PASSWORD"}
SECRET_NAME = re.compile(r"PASSWORD|SECRET|ACCESS_KEY|TOKEN", re.IGNORECASE)
BUCKET = "mlflow-artifacts"
PLACEHOLDER = "change-me"

# Compose's interpolation: `$$` is a literal `$`; `${NAME}`, `${NAME:-default}`, `${NAME-default}`, `${NAME:?message}`,
# `${NAME?message}`; and a bare `$NAME`.
TOKEN = re.compile(r"\$\$|\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}|\$(?P<bare>[A-Za-z_][A-Za-z0-9_]*)")
WHOLE_INTERPOLATION = re.compile(r"\$\{[A-Za-z_][A-Za-z0-9_]*(?::?[-?][^}]*)?\}")
SHELL_REFERENCE = re.compile(r"\$\$\{?[A-Za-z_][A-Za-z0-9_]*\}?")  # `$${VAR}`: expanded by the container's shell
_PART = r"\$\{[^}]*\}|\$\$\{?[A-Za-z_][A-Za-z0-9_]*\}?"  # an interpolation or a shell reference, colons and all
URI_USERINFO = re.compile(rf"[a-z][a-z0-9+.-]*://(?P<user>{_PART}|[^\s:/@]+):(?P<password>{_PART}|[^\s@]+)@")


class MissingVariable(LookupError):
    pass


def interpolate(text: str, env: dict[str, str]) -> str:
    """Resolve Compose variables in `text` from `env`; a required variable that is unset (or empty, for `:?`) raises."""

    def one(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name = match.group("name") or match.group("bare")
        op, arg = match.group("op"), match.group("arg") or ""
        value = env.get(name)
        if op in (":?", "?") and (value is None or (op == ":?" and value == "")):
            raise MissingVariable(f"{name}: {arg}")
        if op == ":-" and not value:
            return arg
        if op == "-" and value is None:
            return arg
        return value or ""

    return TOKEN.sub(one, text)


def required_variables(text: str) -> set[str]:
    return {m.group("name") for m in TOKEN.finditer(text) if m.group("op") in (":?", "?")}


def parse_env_file(path: Path) -> dict[str, str]:
    env = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, sep, value = line.partition("=")
            assert sep, f"{path.name}: not KEY=VALUE: {line!r}"
            env[key.strip()] = value.strip()
    return env


def environment(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.partition("=")[::2] for item in env)
    return {key: "" if value is None else str(value) for key, value in env.items()}


def argv(value: str | list | None) -> list[str]:
    if value is None:
        return []
    return shlex.split(value) if isinstance(value, str) else [str(v) for v in value]


def option(args: list[str], name: str) -> str:
    assert name in args, f"{name} missing from {args}"
    return args[args.index(name) + 1]


def strings(node) -> list[str]:
    if isinstance(node, dict):
        return [s for key, value in node.items() for s in [str(key), *strings(value)]]
    if isinstance(node, list):
        return [s for item in node for s in strings(item)]
    return [] if node is None else [str(node)]


def literal_secrets(compose: dict) -> list[str]:
    """Where a credential would be written into the compose file itself instead of coming from the environment."""
    found = []
    for name, service in compose["services"].items():
        for key, value in environment(service).items():
            if not SECRET_NAME.search(key):
                continue
            whole = WHOLE_INTERPOLATION.fullmatch(value)
            default = whole and re.fullmatch(r"\$\{\w+:?-(?P<default>[^}]*)\}", value)
            if not whole:
                found.append(f"{name}: {key}={value!r} is not one ${{...}} interpolation")
            elif default and default.group("default"):
                found.append(f"{name}: {key}={value!r} has a literal default")
        for text in strings(service):
            for match in URI_USERINFO.finditer(text):
                for part in ("user", "password"):
                    if not (WHOLE_INTERPOLATION.fullmatch(match.group(part)) or SHELL_REFERENCE.fullmatch(match.group(part))):
                        found.append(f"{name}: literal {part} in {match.group(0)!r}")
            if PLACEHOLDER in text:
                found.append(f"{name}: the .env.example placeholder in {text!r}")
    return found


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def env_example() -> dict[str, str]:
    return parse_env_file(ENV_EXAMPLE)


def resolve(node, env: dict[str, str]):
    """Interpolate every string of a parsed compose model, as Compose does (after parsing the YAML)."""
    if isinstance(node, dict):
        return {key: resolve(value, env) for key, value in node.items()}
    if isinstance(node, list):
        return [resolve(item, env) for item in node]
    return interpolate(node, env) if isinstance(node, str) else node


@pytest.fixture(scope="module")
def resolved(compose, env_example) -> dict:
    """The compose model as Compose sees it after `cp .env.example .env`."""
    return resolve(compose, env_example)


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    joined, current = [], ""
    for line in path.read_text(encoding="utf-8").splitlines():
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            current += line.rstrip()[:-1] + " "
            continue
        joined.append(current + line)
        current = ""
    out = []
    for line in joined:
        word, _, rest = line.strip().partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def build_of(compose: dict, service: str) -> tuple[Path, Path]:
    build = compose["services"][service]["build"]
    context = (DOCKER / build["context"]).resolve()
    return context, context / build.get("dockerfile", "Dockerfile")


# --- the helpers can fail -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("environment_", "command", "expected"),
    [
        ({"POSTGRES_PASSWORD": "hunter2-hunter2"}, None, "is not one"),
        ({"POSTGRES_PASSWORD": "${POSTGRES_PASSWORD:-hunter2}"}, None, "literal default"),
        ({"MLFLOW_TRACKING_PASSWORD": "${A}extra"}, None, "is not one"),
        ({}, ["--backend-store-uri", "postgresql+psycopg://mlflow:hunter2@postgres:5432/mlflow"], "literal password"),
        ({}, ["--backend-store-uri", "postgresql+psycopg://${U:?u}:change-me@postgres/mlflow"], "literal password"),
        ({}, ["sh", "-c", "mc alias set m http://minio:9000 admin change-me"], "placeholder"),
    ],
)
def test_literal_secrets_finds_a_written_out_credential(environment_, command, expected):
    compose = {"services": {"x": {"environment": environment_, "command": command}}}
    found = literal_secrets(compose)
    assert any(expected in line for line in found), found


def test_literal_secrets_accepts_interpolations_and_shell_references():
    service = {
        "environment": {"POSTGRES_PASSWORD": "${POSTGRES_PASSWORD:?set it}", "MLFLOW_TRACKING_PASSWORD": "${MLFLOW_TRACKING_PASSWORD:-}"},
        "command": ["--uri", "postgresql+psycopg://${U:?u}:${P:?p}@postgres/db", "http://$${USER}:$${PASS}@minio:9000"],
    }
    assert literal_secrets({"services": {"x": service}}) == []


def test_interpolate_follows_compose_rules():
    env = {"SET": "v", "EMPTY": ""}
    assert interpolate("$${SET} ${SET} $SET ${UNSET:-d} ${EMPTY:-d} ${EMPTY-d} ${UNSET-d} ${SET:?m}", env) == "${SET} v v d d  d v"
    for text in ("${UNSET:?m}", "${EMPTY:?m}", "${UNSET?m}"):
        with pytest.raises(MissingVariable):
            interpolate(text, env)
    assert interpolate("${EMPTY?m}", env) == ""
    assert required_variables("${A:?x} ${B?y} ${C:-z} $${D}") == {"A", "B"}


# --- compose: services, health, order, ports, volumes ---------------------------------------------------------


def test_services_images_and_builds(compose, resolved):
    services = resolved["services"]
    assert set(services) == SERVICES
    assert re.fullmatch(r"postgres:16(\.\d+)*", services["postgres"]["image"])
    assert re.fullmatch(r"(quay\.io/)?minio/minio(:.+)?", services["minio"]["image"])
    assert re.fullmatch(r"(quay\.io/)?minio/mc(:.+)?", services["minio-init"]["image"])
    for server in SERVERS:
        context, dockerfile = build_of(compose, server)
        assert (context, dockerfile.name) == (DOCKER, "Dockerfile.mlflow") and dockerfile.is_file()
    context, dockerfile = build_of(compose, "landscape")
    assert (context, dockerfile) == (ROOT, DOCKER / "Dockerfile") and dockerfile.is_file()


def test_healthchecks(resolved):
    services = resolved["services"]
    tests = {name: " ".join(argv(s["healthcheck"]["test"])) for name, s in services.items() if "healthcheck" in s}
    assert set(tests) == {"postgres", "minio", *SERVERS}
    assert "pg_isready" in tests["postgres"] and "-d mlflow" in tests["postgres"]
    assert "mc ready local" in tests["minio"]
    for server in SERVERS:
        assert "http://localhost:5000/health" in tests[server]
        assert services[server]["healthcheck"]["test"][0] == "CMD"  # exec form: the image has python, not curl


def test_depends_on_waits_for_health_and_for_the_bucket(resolved):
    services = resolved["services"]
    for name, service in services.items():
        for target, spec in (service.get("depends_on") or {}).items():
            assert target in services, f"{name} depends on unknown {target}"
            if spec["condition"] == "service_healthy":
                assert "healthcheck" in services[target], f"{name} waits for {target}'s health, which has no healthcheck"
            if spec["condition"] == "service_completed_successfully":
                assert services[target].get("restart", "no") == "no", f"{target} is one-shot"
    assert services["minio-init"]["depends_on"] == {"minio": {"condition": "service_healthy"}}
    for server in SERVERS:
        depends = services[server]["depends_on"]
        assert depends["postgres"] == {"condition": "service_healthy"}
        assert depends["minio-init"] == {"condition": "service_completed_successfully"}
    assert "depends_on" not in services["landscape"]  # a job may run where the server is not this stack's


def test_published_ports_are_the_server_and_the_local_console(resolved):
    published = {}
    for name, service in resolved["services"].items():
        for port in service.get("ports") or []:
            parts = str(port).split("/")[0].split(":")
            published.setdefault(name, []).append((parts[0] if len(parts) == 3 else "0.0.0.0", parts[-2], parts[-1]))
    assert published.pop("mlflow") == [("0.0.0.0", "5000", "5000")]
    assert published.pop("mlflow-auth") == [("0.0.0.0", "5000", "5000")]
    assert published.pop("minio", []) in ([], [("127.0.0.1", "9001", "9001")])  # optional console, loopback only
    assert published == {}, "only the MLflow server (and the MinIO console) may be published"


def test_named_volumes_are_declared_and_used(resolved):
    declared = set(resolved.get("volumes") or {})
    used = {}
    for name, service in resolved["services"].items():
        for volume in service.get("volumes") or []:
            source, _, target = str(volume).partition(":")
            assert not source.startswith((".", "/", "~")), f"{name}: a bind mount, not a named volume: {volume}"
            used[source] = (name, target.split(":")[0])
    assert set(used) == declared
    assert used["postgres-data"] == ("postgres", "/var/lib/postgresql/data")
    assert used["minio-data"] == ("minio", "/data")
    assert used["mlflow-auth"] == ("mlflow-auth", "/var/lib/mlflow-auth")


# --- secrets ------------------------------------------------------------------------------------------------------


def test_no_literal_secrets_in_the_compose_file(compose):
    assert literal_secrets(compose) == []


def test_s3_credentials_only_reach_the_server_and_minio(compose):
    for name, service in compose["services"].items():
        env = environment(service)
        s3 = {key for key in env if key in S3_VARIABLES} | {key for key, value in env.items() if "MINIO_ROOT" in value}
        if name not in S3_SERVICES:
            assert not s3, f"{name} must not see object-store credentials: {sorted(s3)}"
    for server in SERVERS:
        env = environment(compose["services"][server])
        assert env["AWS_ACCESS_KEY_ID"].startswith("${MINIO_ROOT_USER:?")
        assert env["AWS_SECRET_ACCESS_KEY"].startswith("${MINIO_ROOT_PASSWORD:?")
        assert env["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"


def test_env_example_defines_every_required_variable(compose, env_example):
    required = required_variables(" ".join(strings(compose)))  # the parsed model: comments do not count
    assert {"POSTGRES_PASSWORD", "MINIO_ROOT_PASSWORD", "MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY"} <= required
    assert sorted(required - set(env_example)) == []
    assert all(env_example[name] for name in required), "a required variable is empty in .env.example"
    resolve(compose, env_example)  # raises on a missing one
    without = {k: v for k, v in env_example.items() if k != "POSTGRES_PASSWORD"}
    with pytest.raises(MissingVariable, match="POSTGRES_PASSWORD"):
        resolve(compose, without)
    with pytest.raises(MissingVariable, match="MLFLOW_AUTH_ADMIN_PASSWORD"):  # also with the auth profile off
        resolve(compose, {**env_example, "COMPOSE_PROFILES": "open", "MLFLOW_AUTH_ADMIN_PASSWORD": ""})


def test_env_example_holds_placeholders_not_secrets(env_example):
    for key, value in env_example.items():
        if SECRET_NAME.search(key):
            assert value == PLACEHOLDER, f".env.example: {key} must be the placeholder {PLACEHOLDER!r}"
    assert env_example["COMPOSE_PROFILES"] in ("open", "auth")


def test_the_real_env_file_is_not_tracked():
    try:
        tracked = subprocess.run(["git", "ls-files", "docker/.env"], cwd=ROOT, capture_output=True, text=True, timeout=30)
    except FileNotFoundError:
        pytest.skip("no git")
    if tracked.returncode != 0:
        pytest.skip("not a git checkout")
    assert tracked.stdout.strip() == "", "docker/.env holds the real secrets and must never be committed"


# --- the MLflow server ----------------------------------------------------------------------------------------


def server_args(resolved: dict, server: str) -> list[str]:
    args = argv(resolved["services"][server]["command"])
    assert args[:2] == ["mlflow", "server"], args
    return args[2:]


@pytest.mark.parametrize("server", SERVERS)
def test_server_command(resolved, env_example, server):
    args = server_args(resolved, server)
    uri = option(args, "--backend-store-uri")
    user, password = env_example["POSTGRES_USER"], env_example["POSTGRES_PASSWORD"]
    assert uri == f"postgresql+psycopg://{user}:{password}@postgres:5432/mlflow"  # psycopg 3 named: SQLAlchemy 2.1's default
    assert resolved["services"]["postgres"]["environment"]["POSTGRES_DB"] == "mlflow"
    assert "--serve-artifacts" in args and "--no-serve-artifacts" not in args
    assert option(args, "--artifacts-destination") == f"s3://{BUCKET}/"
    assert "--default-artifact-root" not in args  # new experiments get mlflow-artifacts:/ URIs: clients go through the proxy
    assert option(args, "--host") == "0.0.0.0" and option(args, "--port") == "5000"
    assert option(args, "--workers") == "1"  # MLFLOW_WORKERS, default 1 (more workers: +40 ms per request, benchmarks.md)


def test_server_workers_come_from_mlflow_workers(compose, env_example):
    for server in SERVERS:
        args = server_args(resolve(compose, {**env_example, "MLFLOW_WORKERS": "5"}), server)
        assert option(args, "--workers") == "5"


@pytest.mark.parametrize("server", SERVERS)
def test_server_command_parses_with_the_installed_mlflow(resolved, server):
    from mlflow.cli import server as mlflow_server

    ctx = mlflow_server.make_context("server", server_args(resolved, server))  # parses and converts; starts nothing
    assert ctx.params["serve_artifacts"] is True
    assert ctx.params["app_name"] == ("basic-auth" if server == "mlflow-auth" else None)


def test_the_bucket_mlflow_writes_to_is_the_one_minio_init_creates(resolved):
    script = " ".join(argv(resolved["services"]["minio-init"]["entrypoint"]) + argv(resolved["services"]["minio-init"]["command"]))
    alias = re.search(r"mc alias set (\S+) http://minio:9000 ", script)
    assert alias, script
    assert f"mc mb --ignore-existing {alias.group(1)}/{BUCKET}" in script
    assert '"${MINIO_ROOT_USER}" "${MINIO_ROOT_PASSWORD}"' in script  # from the container's environment, not the file


def test_allowed_hosts_let_the_job_and_the_team_in(env_example):
    from mlflow.server.security_utils import is_allowed_host_header

    hosts = [h.strip() for h in env_example["MLFLOW_ALLOWED_HOSTS"].split(",")]
    for host in ("mlflow:5000", "localhost:5000", "mlflow.example.org:5000"):
        assert is_allowed_host_header(hosts, host), host
    assert not is_allowed_host_header(hosts, "evil.example.com:5000")
    assert "*" not in hosts
    origins = env_example["MLFLOW_CORS_ALLOWED_ORIGINS"].split(",")
    assert all(re.fullmatch(r"https?://[^/\s]+", origin) for origin in origins), origins


# --- basic auth ---------------------------------------------------------------------------------------------------


def test_auth_profile_swaps_the_server(compose, resolved):
    services = compose["services"]
    assert services["mlflow"]["profiles"] == ["open"]
    assert services["mlflow-auth"]["profiles"] == ["auth"]
    assert all("profiles" not in services[name] for name in ("postgres", "minio", "minio-init"))
    assert server_args(resolved, "mlflow-auth") == [*server_args(resolved, "mlflow"), "--app-name", "basic-auth"]
    assert services["mlflow-auth"]["networks"]["default"]["aliases"] == ["mlflow"]  # the job's URI works with either
    env = environment(services["mlflow-auth"])
    for key in ("MLFLOW_AUTH_ADMIN_USERNAME", "MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY"):
        assert env[key].startswith(f"${{{key}:?"), env[key]
    assert not any(key.startswith("MLFLOW_AUTH") or "SECRET_KEY" in key for key in environment(services["mlflow"]))


def _auth_ini(tmp_path: Path) -> tuple[Path, str]:
    """The basic_auth.ini that Dockerfile.mlflow writes, and its MLFLOW_AUTH_CONFIG_PATH."""
    instructions = dockerfile_instructions(DOCKER / "Dockerfile.mlflow")
    env_lines = " ".join(args for word, args in instructions if word == "ENV")
    config_path = re.search(r"MLFLOW_AUTH_CONFIG_PATH=(\S+)", env_lines).group(1)
    run = next(args for word, args in instructions if word == "RUN" and config_path in args)
    printf = re.search(r"printf '%s\\n' (?P<lines>.*?) > (?P<path>\S+)", run)
    assert printf and printf.group("path") == config_path, run
    ini = tmp_path / "basic_auth.ini"
    ini.write_text("\n".join(shlex.split(printf.group("lines"))) + "\n", encoding="utf-8")
    return ini, config_path


def test_auth_config_has_no_secrets_and_stores_users_on_the_volume(tmp_path, monkeypatch):
    ini, _ = _auth_ini(tmp_path)
    parser = configparser.ConfigParser()
    parser.read(ini)
    assert not any(SECRET_NAME.search(key) for key in parser["mlflow"]), "no secret belongs in the image"
    spec = importlib.util.find_spec("mlflow")
    config_py = Path(spec.submodule_search_locations[0]) / "server" / "auth" / "config.py"
    if not config_py.is_file():
        pytest.skip("this MLflow has no mlflow/server/auth/config.py")
    # mlflow.server.auth's __init__ needs Flask-WTF (the server image has it via mlflow[auth]); its config reader
    # does not, so load that module by itself.
    loader = importlib.util.spec_from_file_location("_mlflow_auth_config", config_py)
    config = importlib.util.module_from_spec(loader)
    loader.loader.exec_module(config)
    monkeypatch.setenv("MLFLOW_AUTH_CONFIG_PATH", str(ini))
    monkeypatch.setenv("MLFLOW_AUTH_ADMIN_USERNAME", "team-admin")
    monkeypatch.setenv("MLFLOW_AUTH_ADMIN_PASSWORD", "from-the-environment")
    auth = config.read_auth_config()
    assert (auth.admin_username, auth.admin_password) == ("team-admin", "from-the-environment")
    assert auth.database_uri == "sqlite:////var/lib/mlflow-auth/basic_auth.db"  # the mlflow-auth volume
    assert auth.default_permission == "READ"


# --- the landscape job --------------------------------------------------------------------------------------------


def test_landscape_service(compose, resolved):
    service = resolved["services"]["landscape"]
    assert compose["services"]["landscape"]["profiles"] == ["jobs"]
    assert service["entrypoint"] == ["trainwatch", "landscape"]  # `docker compose run landscape RUN_ID` → trainwatch landscape RUN_ID
    assert "command" not in service
    env = environment(service)
    assert env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert env["MLFLOW_TRACKING_USERNAME"] == env["MLFLOW_TRACKING_PASSWORD"] == ""  # unset in .env.example: the open server
    devices = service["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}]


def test_landscape_entrypoint_takes_a_run_id(capsys):
    from trainwatch.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["landscape", "--help"])
    assert exit_.value.code == 0
    usage = capsys.readouterr().out
    assert "run_id" in usage and "--devices" in usage
    assert re.search(r'^trainwatch = "trainwatch\.cli:main"$', (ROOT / "pyproject.toml").read_text(encoding="utf-8"), re.MULTILINE)


# --- Dockerfiles --------------------------------------------------------------------------------------------------


def copy_sources(dockerfile: Path) -> list[str]:
    sources = []
    for word, args in dockerfile_instructions(dockerfile):
        if word in ("COPY", "ADD"):
            parts = [p for p in shlex.split(args) if not p.startswith("--")]
            assert not args.startswith("--from"), "no multi-stage copies expected"
            sources += parts[:-1]
    return sources


@pytest.mark.parametrize("service", ["mlflow", "landscape"])
def test_dockerfile_copies_exist_in_the_build_context(compose, service):
    context, dockerfile = build_of(compose, service)
    for source in copy_sources(dockerfile):
        assert (context / source).exists(), f"{dockerfile.name}: COPY {source} is not in the build context {context}"


def test_trainwatch_image_copies_what_pip_install_needs(compose):
    tomllib = pytest.importorskip("tomllib")
    context, dockerfile = build_of(compose, "landscape")
    project = tomllib.loads((context / "pyproject.toml").read_text(encoding="utf-8"))
    copied = {source.rstrip("/") for source in copy_sources(dockerfile)}
    packages = {p.rstrip("*") for p in project["tool"]["setuptools"]["packages"]["find"]["include"]}
    assert {"pyproject.toml", project["project"]["readme"], *packages} <= copied
    instructions = dockerfile_instructions(dockerfile)
    text = " ".join(f"{w} {a}" for w, a in instructions)
    base = re.search(r"ARG BASE_IMAGE=(\S+)", text).group(1)
    assert re.fullmatch(r"pytorch/pytorch:2\.[\d.]+-cuda12[\d.]*-cudnn\d+-runtime|nvidia/cuda:12\.[\d.]+-cudnn-runtime-ubuntu[\d.]+", base)
    assert ("FROM", "${BASE_IMAGE}") in instructions
    assert 'pip install --constraint /tmp/keep-torch.txt "/src"' in text  # the base image's CUDA torch stays
    assert ("ENTRYPOINT", '["trainwatch"]') in instructions


def test_server_image_installs_the_drivers(compose):
    _, dockerfile = build_of(compose, "mlflow")
    text = " ".join(f"{w} {a}" for w, a in dockerfile_instructions(dockerfile))
    assert '"mlflow[auth]==${MLFLOW_VERSION}"' in text
    assert '"psycopg[binary]' in text and '"boto3' in text
    assert "USER mlflow" in text
