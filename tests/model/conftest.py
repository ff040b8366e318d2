import pytest
import torch
from transformers import Exaone4_5_Config, Exaone4_5_ForConditionalGeneration

from model.hf import load_pretrained

# Two differently shaped random configs, written with transformers' own classes.
HF_CONFIGS = {
    "gqa2_window8": dict(
        text_config=dict(
            model_type="exaone4", vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=8,
            layer_types=["sliding_attention"] * 3 + ["full_attention"], rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        ),
        vision_config=dict(
            depth=2, hidden_size=32, intermediate_size=48, num_heads=4, num_key_value_heads=2, out_hidden_size=64,
            fullatt_block_indexes=[1], window_size=56,
        ),
    ),
    "llama3_mqa_window5": dict(
        text_config=dict(
            model_type="exaone4", vocab_size=280, hidden_size=96, intermediate_size=160, num_hidden_layers=6,
            num_attention_heads=6, num_key_value_heads=1, head_dim=24, sliding_window=5,
            layer_types=["sliding_attention", "full_attention", "sliding_attention", "sliding_attention", "full_attention", "full_attention"],
            rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                             "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
            num_nextn_predict_layers=1,
        ),
        vision_config=dict(
            depth=3, hidden_size=48, intermediate_size=40, num_heads=2, num_key_value_heads=1, out_hidden_size=96,
            fullatt_block_indexes=[0, 2], window_size=112,
        ),
    ),
}


def perturbed_hf_model(name: str, seed: int = 0):
    torch.manual_seed(seed)
    model = Exaone4_5_ForConditionalGeneration(Exaone4_5_Config(**HF_CONFIGS[name])).eval()
    with torch.no_grad():
        for p in model.parameters():  # norms away from 1, weights large enough to matter
            p.add_(torch.randn_like(p) * 0.05)
    return model


@pytest.fixture(scope="module", params=sorted(HF_CONFIGS))
def hf_pair(request, tmp_path_factory):
    """(transformers model, our model loaded from its save_pretrained directory, that directory)."""
    hf = perturbed_hf_model(request.param)
    path = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(path)
    return hf, load_pretrained(path).eval(), path


def image_prompt(vocab: int, image_token: int = 67, grids=((1, 8, 8),), seed: int = 0, text_len: int = 20):
    """input_ids with one run of image tokens per grid, pixel patches and grid_thw."""
    g = torch.Generator().manual_seed(seed)
    ids, pixels = [], []
    for t, h, w in grids:
        ids += torch.randint(80, vocab, (text_len,), generator=g).tolist() + [73] + [image_token] * (t * h * w // 4) + [74]
        pixels.append(torch.randn(t * h * w, 3 * 2 * 14 * 14, generator=g))
    ids += torch.randint(80, vocab, (text_len,), generator=g).tolist()
    return torch.tensor([ids]), torch.cat(pixels), torch.tensor(grids)
