"""Our model against transformers' EXAONE 4.5, number for number (fp32)."""

import torch
from transformers import Exaone4_5_Config, Exaone4_5_ForConditionalGeneration

from model.config import preset
from model.hf import config_to_hf, load_pretrained, save_pretrained
from model.vlm import Exaone45

from .conftest import image_prompt


def test_text_only_logits_and_loss(hf_pair):
    hf, ours, _ = hf_pair
    vocab = hf.config.text_config.vocab_size
    ids = torch.randint(80, vocab, (2, 37), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(input_ids=ids, labels=ids)
        out = ours(ids, labels=ids, return_logits=True)
    assert (ref.logits - out.logits).abs().max() < 1e-4
    assert abs(ref.loss.item() - out.lm_loss.item()) < 1e-5


def test_image_logits_and_loss(hf_pair):
    hf, ours, _ = hf_pair
    # Two images, one of them not a multiple of the vision window, so windows are ragged.
    ids, pixels, grid = image_prompt(hf.config.text_config.vocab_size, grids=((1, 8, 8), (1, 6, 10)))
    labels = ids.masked_fill(ids == 67, -100)
    with torch.no_grad():
        ref = hf(input_ids=ids, pixel_values=pixels, image_grid_thw=grid, labels=labels)
        out = ours(ids, pixels, grid, labels=labels, return_logits=True)
    assert (ref.logits - out.logits).abs().max() < 1e-4
    assert abs(ref.loss.item() - out.lm_loss.item()) < 1e-5


def test_export_reloads_in_transformers(hf_pair, tmp_path):
    hf, ours, _ = hf_pair
    save_pretrained(ours, tmp_path / "export")
    back = Exaone4_5_ForConditionalGeneration.from_pretrained(tmp_path / "export").eval()
    ids, pixels, grid = image_prompt(hf.config.text_config.vocab_size, seed=3)
    with torch.no_grad():
        a = back(input_ids=ids, pixel_values=pixels, image_grid_thw=grid).logits
        b = ours(ids, pixels, grid).logits
    assert (a - b).abs().max() < 1e-4


def test_mtp_weights_survive_round_trip(tmp_path):
    """transformers drops mtp.*; our loader keeps them and our export writes them back."""
    cfg = preset("tiny")
    torch.manual_seed(0)
    model = Exaone45(cfg)
    model.init_weights()
    save_pretrained(model, tmp_path / "a")
    again = load_pretrained(tmp_path / "a")
    mtp_keys = [k for k in model.state_dict() if k.startswith("mtp.")]
    assert "mtp.fc.weight" in mtp_keys and "mtp.layers.0.mlp.down_proj.weight" in mtp_keys
    for k, v in model.state_dict().items():
        assert torch.equal(v, again.state_dict()[k]), k
    assert again.cfg.text_config.layer_types == cfg.text_config.layer_types


def test_released_config_with_mtp_entry_is_read(tmp_path):
    """The released config.json has num_nextn_predict_layers and one extra layer_types entry."""
    import json

    cfg = preset("tiny")
    d = config_to_hf(cfg)
    d["text_config"]["layer_types"] = cfg.text_config.layer_types  # trunk + MTP entry, as released
    d["text_config"].pop("mtp_layer_types")
    (tmp_path / "config.json").write_text(json.dumps(d))
    from model.hf import config_from_hf

    back = config_from_hf(json.loads((tmp_path / "config.json").read_text()))
    assert back.text_config.num_nextn_predict_layers == 1
    assert len(back.text_config.layer_types) == cfg.text_config.num_hidden_layers + 1


def test_33b_parameter_count_matches_transformers():
    cfg = preset("exaone4_5_33b")
    with torch.device("meta"):
        ours = Exaone45(cfg)
        ref = Exaone4_5_ForConditionalGeneration(Exaone4_5_Config(**config_to_hf(cfg)))
    trunk = sum(p.numel() for n, p in ours.named_parameters() if not n.startswith("mtp."))
    assert trunk == sum(p.numel() for p in ref.parameters())
    assert 32e9 < trunk < 35e9
