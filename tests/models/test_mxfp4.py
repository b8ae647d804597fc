"""MXFP4 experts, as the released gpt-oss checkpoints hold them: dequantized as transformers does
it, and a tiny gpt-oss saved that way gives the greedy tokens of the HF model whose weights are
those values."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers.integrations.mxfp4 import convert_moe_packed_tensors

from lmserve import LLM
from lmserve.models.mxfp4 import dequantize_mxfp4
from tests.conftest import _randomize
from tests.engine.test_llm import hf_greedy, run_greedy
from tests.models.test_moe import _build, _prompts


def _packed(*shape: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random MXFP4 blocks [..., groups, 16] and scales [..., groups] of moderate magnitude."""
    gen = torch.Generator().manual_seed(seed)
    blocks = torch.randint(0, 256, (*shape, 16), generator=gen, dtype=torch.uint8)
    scales = torch.randint(121, 127, shape, generator=gen, dtype=torch.uint8)
    return blocks, scales


def test_dequantized_as_transformers_does() -> None:
    blocks, scales = _packed(3, 10, 4, seed=0)
    ours = dequantize_mxfp4(blocks, scales)
    theirs = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)  # [E, in, out]
    assert torch.equal(ours, theirs.transpose(1, 2))
    with pytest.raises(ValueError, match="do not match"):
        dequantize_mxfp4(blocks, scales[..., :3])


@pytest.fixture(scope="module")
def mxfp4_gpt_oss(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module]:
    """A tiny gpt-oss whose experts are MXFP4 values, saved with `*_blocks`/`*_scales` and the
    released checkpoints' quantization_config."""
    root = tmp_path_factory.mktemp("tiny_gpt_oss_mxfp4")
    torch.manual_seed(12)
    model = _build("gpt_oss").eval()
    _randomize(model)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("sinks"):  # as large as scores, so they take real weight
                param.normal_(0.0, 1.0)
    state = {}
    for name, tensor in model.state_dict().items():
        if not name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            state[name] = tensor.contiguous()
            continue
        experts, rows, cols = tensor.shape[0], tensor.shape[2], tensor.shape[1]  # [E, in, out]
        blocks, scales = _packed(experts, rows, cols // 32, seed=len(state))
        with torch.no_grad():
            tensor.copy_(convert_moe_packed_tensors(blocks, scales, dtype=torch.float32))
        state[f"{name}_blocks"], state[f"{name}_scales"] = blocks, scales
    model.config.architectures = ["GptOssForCausalLM"]
    model.config.save_pretrained(root)
    save_file(state, root / "model.safetensors")
    config = json.loads((root / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "mxfp4"}
    (root / "config.json").write_text(json.dumps(config))
    return root, model


def test_mxfp4_checkpoint_gives_the_dequantized_models_tokens(mxfp4_gpt_oss) -> None:
    path, hf = mxfp4_gpt_oss
    prompts = _prompts()
    expected = [hf_greedy(hf, p, 12) for p in prompts]
    assert run_greedy(LLM(str(path), max_num_batched_tokens=16), prompts, num_new=12) == expected
