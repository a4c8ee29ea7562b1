"""docker-compose.yml's optional Ray profile (docs/scale.md), read as YAML.

No Docker engine runs on the development machines, so the profile cannot be started here; this
reads what `docker compose --profile ray up` would start and checks the parts the Ray engine relies
on: a head and a GPU worker that exist only under the profile, the app's image (same code, same
pinned ray), the cache volume at the app's path (so `--ray-write worker` writes into the app's
store), and the app told where the cluster is.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def services() -> dict:
    return yaml.safe_load((REPO / "docker-compose.yml").read_text())["services"]


def _mounts(svc: dict) -> dict[str, str]:
    """container path → source (named volume or host path) of a service's volumes."""
    out = {}
    for v in svc.get("volumes", []):
        v = re.sub(r":(ro|rw)$", "", v)
        src, dst = v.rsplit(":", 1)  # the source may hold ${VAR:-default}
        out[dst] = src
    return out


def _flags(svc: dict) -> dict[str, str]:
    """``--name=value`` flags of a service's command (a list, as compose takes it)."""
    cmd = svc["command"]
    assert isinstance(cmd, list), "command as a list: no shell in between"
    return dict(a[2:].split("=", 1) if "=" in a else (a[2:], "") for a in cmd if a.startswith("--"))


def test_ray_head_and_worker_run_only_under_the_ray_profile(services):
    ray_services = {name for name, svc in services.items() if "ray" in svc.get("profiles", [])}
    assert ray_services == {"ray-head", "ray-worker"}
    assert "profiles" not in services["probing"]  # the app starts without the profile
    head, worker = services["ray-head"], services["ray-worker"]
    assert head["command"][:3] == ["ray", "start", "--head"]
    assert worker["command"][:2] == ["ray", "start"] and "--head" not in worker["command"]
    # The worker joins the head by its service name, on the port the head listens on.
    assert _flags(worker)["address"] == f"ray-head:{_flags(head)['port']}"
    assert "ray-head" in worker["depends_on"]
    assert "--block" in head["command"] and "--block" in worker["command"]  # the container lives as long as Ray
    # Ray Client for a driver that is not a node (the app's container): docs/scale.md uses 10001.
    assert _flags(head)["ray-client-server-port"] == "10001"


def test_the_ray_worker_reserves_a_gpu_and_offers_it_to_ray(services):
    worker = services["ray-worker"]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert len(devices) == 1 and devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    assert int(devices[0]["count"]) == float(_flags(worker)["num-gpus"]) == 1  # Ray offers the GPU it reserved
    assert "deploy" not in services["ray-head"]  # the head schedules; it needs no GPU
    assert int(re.match(r"(\d+)gb$", worker["shm_size"]).group(1)) >= 2  # Ray's object store lives in /dev/shm


def test_head_and_worker_run_the_apps_image_and_share_its_cache_volume(services):
    app = services["probing"]
    app_mounts = _mounts(app)
    cache_volume = app_mounts["/data/cache"]
    assert cache_volume in yaml.safe_load((REPO / "docker-compose.yml").read_text())["volumes"]  # a named volume
    for name in ("ray-head", "ray-worker"):
        svc = services[name]
        assert svc["image"] == app["image"], f"{name}: same code and pinned ray as the app"
        mounts = _mounts(svc)
        # Same volume at the same path: a worker writes shards where the app's store reads them.
        assert mounts["/data/cache"] == cache_volume, name
        assert mounts.get("/data/models") == app_mounts["/data/models"], name  # the same local model folders
        assert svc["volumes"][-1].endswith(":ro"), f"{name}: model folders read-only"
        env = svc["environment"]
        assert env["RAY_AUTH_MODE"] == "token" and "RAY_AUTH_TOKEN" in env


def test_the_app_gets_the_ray_address_and_the_token(services):
    env = services["probing"]["environment"]
    assert env["PROBING_RAY_ADDRESS"] == "${PROBING_RAY_ADDRESS:-}"  # unset by default: Home builds locally only
    # Passed through from the shell when set (a null value in compose), never a fixed secret in the file.
    assert env["RAY_AUTH_TOKEN"] is None and env["RAY_AUTH_MODE"] is None
    # Home's pool settings (RayOptions.from_env) pass through too.
    assert all(env[v] is None for v in ("PROBING_RAY_WORKERS", "PROBING_RAY_GPUS_PER_WORKER", "PROBING_RAY_WRITE"))
    text = (REPO / "docker-compose.yml").read_text()
    assert "PROBING_RAY_ADDRESS=ray://ray-head:10001" in text  # the comment says what to set with the profile
