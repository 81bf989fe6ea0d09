"""Validation at the edge: every bad field gets an error that names it and what is allowed."""

import pytest

from pipeline.config import InvalidRequest, ModelConfig, ModelLimits, SampleRequest
from pipeline.generate import Generator
from pipeline.loading import read_model_info, set_attention_backend

LIMITS = ModelLimits(spatial_stride=16, temporal_stride=4, vae_spatial=8, patch=2)
GOOD = dict(prompt="a cat", seed=1, height=32, width=48, num_frames=17, num_inference_steps=4,
            guidance_scale=6.0, true_cfg_scale=1.0, negative_prompt="")


@pytest.mark.parametrize("field,value,hint", [
    ("height", 30, "multiple of 16"),
    ("width", 0, "multiple of 16"),
    ("width", 40.0, "multiple of 16"),
    ("num_frames", 16, "4k+1"),
    ("num_frames", 0, "4k+1"),
    ("num_inference_steps", 0, ">= 1"),
    ("prompt", "   ", "non-empty"),
    ("prompt", None, "non-empty"),
    ("seed", -1, "[0, 2**63)"),
    ("guidance_scale", float("nan"), "finite"),
    ("id", "a/b", "without '/'"),
])
def test_bad_field_is_named(field, value, hint):
    req = SampleRequest(**{**GOOD, field: value})
    with pytest.raises(InvalidRequest) as e:
        req.validate(LIMITS)
    assert e.value.field == field
    assert f"{field}={value!r}" in str(e.value) and hint in str(e.value)


def test_error_suggests_valid_neighbours():
    with pytest.raises(InvalidRequest, match="e.g. 13 or 17"):
        SampleRequest(**{**GOOD, "num_frames": 16}).validate(LIMITS)
    with pytest.raises(InvalidRequest, match="e.g. 32 or 48"):
        SampleRequest(**{**GOOD, "height": 40}).validate(LIMITS)


def test_good_request_passes_and_id_is_stable():
    req = SampleRequest(prompt="a cat", seed=3).resolve(read_model_info("bundled").defaults)
    req.validate(read_model_info("bundled").limits)
    again = SampleRequest(prompt="a cat", seed=3).resolve(read_model_info("bundled").defaults)
    other = SampleRequest(prompt="a cat", seed=4).resolve(read_model_info("bundled").defaults)
    assert req.id == again.id != other.id


@pytest.mark.parametrize("kwargs,field", [
    (dict(dtype="float8"), "dtype"),
    (dict(device="tpu"), "device"),
    (dict(model=""), "model"),
])
def test_model_config_fields(kwargs, field):
    with pytest.raises(InvalidRequest) as e:
        ModelConfig(**kwargs)
    assert e.value.field == field


def test_unavailable_device_and_dtype():
    import torch

    if not torch.cuda.is_available():
        with pytest.raises(InvalidRequest, match="CUDA is not available") as e:
            ModelConfig(device="cuda").resolve_device()
        assert e.value.field == "device"
    with pytest.raises(InvalidRequest, match="float16 is not supported on CPU") as e:
        ModelConfig(dtype="float16").resolve_dtype("cpu")
    assert e.value.field == "dtype"


def test_model_that_is_not_a_model(tmp_path):
    with pytest.raises(InvalidRequest) as e:
        read_model_info(str(tmp_path))
    assert e.value.field == "model" and str(tmp_path) in str(e.value)


def test_attention_backend_errors(tiny_model):
    t = tiny_model.pipe.transformer
    with pytest.raises(InvalidRequest, match="expected one of") as e:
        set_attention_backend(t, "no-such-backend", "cpu", tiny_model.dtype)
    assert e.value.field == "attention_backend"
    # flash-attn refuses HunyuanVideo's padding mask (or is not installed here): either way the
    # error comes at load time, names the backend and says what to use instead.
    with pytest.raises(InvalidRequest, match="use 'native'") as e:
        set_attention_backend(t, "flash", "cpu", tiny_model.dtype)
    assert e.value.field == "attention_backend"


def test_generator_validates_before_model_work(tiny_model):
    gen = Generator(tiny_model)
    calls = []
    handle = tiny_model.pipe.transformer.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(InvalidRequest) as e:
            gen.generate([SampleRequest(prompt="ok", num_frames=17), SampleRequest(prompt="bad", num_frames=18)])
    finally:
        handle.remove()
    assert e.value.field == "num_frames"
    assert calls == []  # the valid first request was not generated either
