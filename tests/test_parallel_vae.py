"""Tile-parallel VAE decode (pipeline/parallel/vae.py) equals one process's tiled decode.

The bundled VAE (2x spatial, 4x temporal) with small tiles so that 32 x 32 pixels make 3 x 3
spatial tiles, and framewise decoding so that 25 frames also make 3 temporal tiles: 9 and 27
decoder calls, spread over 2 and 3 gloo ranks on 127.0.0.1.
"""

from __future__ import annotations

import pytest
import torch

from pipeline.parallel import spawn_local
from pipeline.parallel.vae import parallel_decode

TOL = 1e-5  # fp32 on CPU: the same decoder calls, only the thread count differs between processes
PRELOAD = ["diffusers.models.autoencoders.autoencoder_kl_hunyuan_video", "pipeline.parallel.vae"]
CASES = {"spatial": (2, 16, 5, 16, 16), "spatial+temporal": (1, 16, 7, 16, 16)}


def _vae():
    from diffusers import AutoencoderKLHunyuanVideo

    from pipeline.loading import bundled_model_dir

    vae = AutoencoderKLHunyuanVideo.from_pretrained(bundled_model_dir() / "vae").eval()
    vae.enable_tiling(tile_sample_min_height=16, tile_sample_min_width=16, tile_sample_stride_height=12,
                      tile_sample_stride_width=12)  # temporal tiles: diffusers' 16 frames, stride 12
    return vae


def _latents(shape) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(sum(shape)))


def _worker(rank: int, names: list[str]) -> dict:
    import torch.distributed as dist

    vae = _vae()
    out = {}
    for name in names:
        vae.use_framewise_decoding = name != "spatial"
        video, share = parallel_decode(vae, _latents(CASES[name]), dist.group.WORLD)
        out[name] = (video, share)
    return out


@pytest.fixture(scope="module")
def reference() -> dict:
    vae, out = _vae(), {}
    for name, shape in CASES.items():
        vae.use_framewise_decoding = name != "spatial"
        with torch.no_grad():
            out[name] = (vae.decode(_latents(shape), return_dict=False)[0], parallel_decode(vae, _latents(shape))[1])
    return out


@pytest.mark.parametrize("world,names", [(2, list(CASES)), (3, ["spatial"])])
def test_tiles_spread_over_the_ranks_and_gathered_on_rank_0_equal_one_process(world, names, reference):
    ranks = spawn_local(_worker, world, names, timeout=300, preload=PRELOAD)
    for name in names:
        expected, alone = reference[name]
        video, share = ranks[0][name]
        assert video.shape == expected.shape
        assert (video - expected).abs().max().item() <= TOL, name
        assert all(r[name][0] is None for r in ranks[1:])  # gathered on rank 0 only
        tiles = alone.tiles[0]  # decoder calls of the one-process decode
        assert tiles == {"spatial": 9, "spatial+temporal": 27}[name]
        assert share.tiles == [len(range(r, tiles, world)) for r in range(world)] and sum(share.tiles) == tiles
        assert all(r[name][1] == share for r in ranks)  # every rank knows every rank's share
        assert len(share.seconds) == world and min(share.seconds) > 0 and min(share.peak_memory_bytes) > 0


def test_untiled_decode_is_one_call_and_the_hooks_are_gone():
    vae = _vae()
    vae.disable_tiling()
    vae.use_framewise_decoding = False
    z = _latents(CASES["spatial"])
    with torch.no_grad():
        video, share = parallel_decode(vae, z)
        assert torch.equal(video, vae.decode(z, return_dict=False)[0]) and share.tiles == [1]
    assert not vae.decoder._forward_pre_hooks and vae.decoder.forward.__func__ is type(vae.decoder).forward


def _engine(rank: int) -> dict:
    from pipeline.config import ModelConfig, SampleRequest
    from pipeline.generate import Generator
    from pipeline.parallel import ParallelConfig

    gen = Generator.load(ModelConfig(device="cpu", vae_tile_size=16), None, ParallelConfig(ulysses_degree=2))
    [sample] = gen.generate([SampleRequest(prompt="a red circle moving quickly left on a blue background",
                                           num_inference_steps=2)])
    pipe = gen.model.pipe
    return {"text_encoders": [m is not None for m in (pipe.text_encoder, pipe.text_encoder_2, pipe.tokenizer,
                                                      pipe.tokenizer_2)],
            "frames": sample.frames, "tiles": sample.stats.rank_decode_tiles}


def test_rank_1_holds_no_text_encoder_and_decodes_its_share():
    """Rank 0 encodes the batch's prompts and broadcasts them; rank 1 loaded no Llama / CLIP."""
    lead, other = spawn_local(_engine, 2, timeout=300, preload=PRELOAD)
    assert lead["text_encoders"] == [True] * 4 and other["text_encoders"] == [False] * 4
    assert lead["frames"].shape == (17, 32, 32, 3) and other["frames"] is None
    assert lead["tiles"] == other["tiles"] == [5, 4]
