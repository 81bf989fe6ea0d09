"""Shared pytest fixtures.

Each fixture is self-contained; add new ones below as separate blocks. Tests may only
talk to 127.0.0.1, so S3 tests run against moto's S3 server on loopback.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest

# Ray binds to this machine's network address unless this is set before ray is first imported:
# every Ray started by the tests stays on 127.0.0.1 (and so uses token auth).
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"

# --- S3 (moto) ----------------------------------------------------------------------

_S3_ENV = {
    # Dummy credentials: never let a test reach a real account with real ones.
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    # us-east-1 needs no LocationConstraint when creating buckets.
    "AWS_DEFAULT_REGION": "us-east-1",
}


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """URL of a moto S3 server on 127.0.0.1 (a free port), with dummy AWS credentials.

    The AWS_* variables are set for the whole session (overriding, so real credentials
    are never used) and restored afterwards; AWS_PROFILE is unset meanwhile.
    """
    from moto.server import ThreadedMotoServer

    saved = {k: os.environ.get(k) for k in [*_S3_ENV, "AWS_PROFILE"]}
    os.environ.update(_S3_ENV)
    os.environ.pop("AWS_PROFILE", None)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)  # 0: free port
    server.start()
    try:
        host, port = server.get_host_and_port()
        yield f"http://{host}:{port}"
    finally:
        server.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture
def s3_bucket(s3_endpoint: str) -> Iterator[str]:
    """A fresh, empty bucket on the moto server; yields ``s3://<bucket>``."""
    import boto3

    bucket = f"test-{uuid.uuid4().hex[:16]}"
    client = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    client.create_bucket(Bucket=bucket)
    yield f"s3://{bucket}"


# --- the bundled tiny model ---------------------------------------------------------


@pytest.fixture(scope="session")
def tiny_model():
    """The bundled tiny HunyuanVideo, loaded once (fp32, CPU)."""
    from pipeline.config import ModelConfig
    from pipeline.loading import load_pipeline

    return load_pipeline(ModelConfig(device="cpu"))


@pytest.fixture
def tiny_pipe(tiny_model):
    """The bundled pipeline; any SpeCa a test enables is removed afterwards."""
    from speca import disable_speca

    yield tiny_model.pipe
    disable_speca(tiny_model.pipe)


# --- a local Ray for in-process job runs ----------------------------------------------


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray on 127.0.0.1 (token auth) shared by a module's in-process job runs."""
    import ray

    from jobs.generate import NAMESPACE

    ray.init(num_cpus=2, namespace=NAMESPACE, include_dashboard=False, _node_ip_address="127.0.0.1")
    assert ray.get_runtime_context().gcs_address.startswith("127.0.0.1:")  # loopback only
    yield
    ray.shutdown()


# --- a tiny HunyuanVideo 1.5 ----------------------------------------------------------


@pytest.fixture(scope="session")
def hv15_model_dir(tmp_path_factory):
    """A tiny random HunyuanVideo 1.5 pipeline saved as a diffusers folder (`tests/hv15_tiny.py`), built once."""
    import hv15_tiny

    return hv15_tiny.save(tmp_path_factory.mktemp("hv15") / "model")


@pytest.fixture(scope="session")
def hv15_model(hv15_model_dir):
    """That folder loaded through `pipeline.loading` (fp32, CPU), once."""
    from pipeline.config import ModelConfig
    from pipeline.loading import load_pipeline

    return load_pipeline(ModelConfig(model=str(hv15_model_dir), device="cpu"))
