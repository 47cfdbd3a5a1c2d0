"""convert / merge / compression on small models and on real transformers models."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

from ab_accel import ABConfig, ABConfigError, ABLayer, compression, convert, merge, select_layers
from ab_accel.model import ab_layers


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.conv = nn.Conv2d(8, 16, 3, padding=1)
        self.emb = nn.Embedding(10, 16)
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.fc = nn.Linear(16, 32)
        self.head = nn.Linear(32, 5)

    def forward(self, x, ids):
        h = self.conv(self.dw(self.stem(x))).mean((2, 3)).unsqueeze(1) + self.emb(ids)
        h, _ = self.attn(h, h, h)
        return self.head(torch.relu(self.fc(h)))


def test_default_selection_leaves_stem_head_grouped_embeddings_and_mha_dense():
    assert select_layers(Net(), ABConfig()) == ["conv", "fc"]


@pytest.mark.parametrize("target,exclude,expected", [
    (["fc", "head"], None, ["fc", "head"]),
    (r"(stem|conv)", None, ["stem", "conv"]),
    ("all", None, ["stem", "conv", "fc", "head"]),
    (None, ["fc"], ["conv"]),
    ("all", r".*e.*", ["conv", "fc"]),
])
def test_target_and_exclude_modules(target, exclude, expected):
    cfg = ABConfig(target_modules=target, exclude_modules=exclude)
    assert select_layers(Net(), cfg) == expected


def test_convert_keeps_outputs_keys_and_parameter_objects():
    torch.manual_seed(0)
    net = Net().eval()
    x, ids = torch.randn(2, 3, 6, 6), torch.randint(0, 10, (2, 1))
    before = net(x, ids)
    keys = list(net.state_dict())
    fc_weight = net.fc.weight
    convert(net, ABConfig())
    assert isinstance(net.fc, ABLayer) and isinstance(net.conv, ABLayer)
    assert net.fc.weight is fc_weight
    assert list(net.state_dict()) == keys
    assert torch.equal(net(x, ids), before)
    assert convert(net, ABConfig()) is net  # idempotent


def test_disabled_config_leaves_the_model_alone():
    net = Net()
    convert(net, ABConfig(enabled=False))
    assert not list(ab_layers(net))


def test_compression_counts_real_parameters():
    net = convert(Net(), ABConfig())
    dense = sum(p.numel() for p in Net().parameters())
    c = compression(net)
    assert c["params_now"] == c["params_dense"] == dense and c["ratio"] == 1.0
    net.fc.factorize(2)  # 32x16 -> A 32x2 + B 2x16
    net.conv.factorize(3)  # 16x72 -> A 16x3 + B 3x72
    c = compression(net)
    assert c["factorized_params_now"] == 2 * 48 + 3 * 88
    assert c["factorized_params_dense"] == 32 * 16 + 16 * 72
    assert c["params_now"] == sum(p.numel() for p in net.parameters())
    assert c["params_dense"] == dense
    assert c["ratio"] == pytest.approx(dense / c["params_now"])
    assert c["layers"]["fc"] == {"shape": [32, 16], "mode": "ab", "rank": 2, "max_rank": 10,
                                 "params_now": 96, "params_dense": 512}


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=97,
                                      n_positions=16))


def _vit():
    from transformers import ViTConfig, ViTForImageClassification

    return ViTForImageClassification(ViTConfig(image_size=8, patch_size=2, num_channels=1,
                                               hidden_size=32, num_hidden_layers=2,
                                               num_attention_heads=2, intermediate_size=64,
                                               num_labels=10))


@pytest.mark.parametrize("merged", [True, False], ids=["merged", "saved-in-ab-mode"])
@pytest.mark.parametrize("factory,inputs", [
    (_gpt2, lambda: {"input_ids": torch.randint(0, 97, (2, 7))}),
    (_vit, lambda: {"pixel_values": torch.randn(2, 1, 8, 8)}),
], ids=["gpt2-conv1d", "vit"])
def test_saved_model_loads_in_plain_transformers_without_ab_accel(factory, inputs, merged,
                                                                   tmp_path):
    """save_pretrained of a merged model, and of a model still in AB mode (the export writes
    the dense W = A B under the original keys), loads with no missing or unexpected keys."""
    torch.manual_seed(0)
    model = factory().eval()
    convert(model, ABConfig(rank_cutoff=0.3))
    layers = list(ab_layers(model))
    assert layers, "no layer converted"
    for _, layer in layers:
        layer.factorize(layer.proposed_rank(0.3))
    batch = inputs()
    with torch.no_grad():
        ab_logits = model(**batch).logits
    if merged:
        merge(model)
        assert not list(ab_layers(model))
        with torch.no_grad():
            assert torch.allclose(model(**batch).logits, ab_logits, atol=1e-5)
    model.save_pretrained(tmp_path / "merged")
    torch.save({"batch": batch, "logits": ab_logits}, tmp_path / "expected.pt")
    # A fresh interpreter in which `import ab_accel` fails: plain transformers only.
    script = textwrap.dedent(f"""
        import sys, torch
        sys.modules["ab_accel"] = None
        from transformers import AutoModel, {type(model).__name__} as Cls
        exp = torch.load({str(tmp_path / "expected.pt")!r})
        m, info = Cls.from_pretrained({str(tmp_path / "merged")!r}, output_loading_info=True)
        m.eval()
        assert not any(info[k] for k in ("missing_keys", "unexpected_keys",
                                          "mismatched_keys")), info
        with torch.no_grad():
            out = m(**exp["batch"]).logits
        err = (out - exp["logits"]).abs().max().item()
        assert err < 1e-5, err
        print("max-abs-err", err)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "max-abs-err" in proc.stdout


def test_gpt2_layers_are_chosen_by_type():
    model = convert(_gpt2(), ABConfig())
    kinds = {type(layer).__name__ for _, layer in ab_layers(model)}
    assert kinds == {"ABConv1D"}
    # lm_head (tied to the embedding) is the last factorizable layer: left dense.
    assert type(model.lm_head) is nn.Linear


# ----------------------------------------------------------------------------- shared weights
def _tiny_bert_pretraining():
    from transformers import BertConfig, BertForPreTraining

    return BertForPreTraining(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
                                         num_attention_heads=2, intermediate_size=32))


def _tiny_gpt2_double_heads():
    from transformers import GPT2Config, GPT2DoubleHeadsModel

    return GPT2DoubleHeadsModel(GPT2Config(vocab_size=50, n_embd=16, n_layer=1, n_head=2,
                                           n_positions=16))


@pytest.mark.parametrize("factory,tied,embedding", [
    (_tiny_bert_pretraining, "cls.predictions.decoder", "bert.embeddings.word_embeddings"),
    (_tiny_gpt2_double_heads, "lm_head", "transformer.wte"),
])
def test_a_tied_output_layer_is_never_factorized(factory, tied, embedding):
    """The tied head is not the last factorizable layer here (a classification head follows),
    so the first/last rule alone would have converted it, and at the first factorization the
    embedding would have lost its shared weight and silently stopped training."""
    model = factory()
    assert model.get_submodule(tied).weight is model.get_submodule(embedding).weight
    for target in (None, "all"):
        names = select_layers(model, ABConfig(target_modules=target))
        assert tied not in names and len(names) > 2
    convert(model, ABConfig(target_modules="all"))
    assert not isinstance(model.get_submodule(tied), ABLayer)
    assert model.get_submodule(tied).weight is model.get_submodule(embedding).weight
    with pytest.raises(ABConfigError, match=rf"names {tied}.*shared with {embedding}"):
        select_layers(model, ABConfig(target_modules=[tied.rpartition(".")[2]]))


def test_a_module_registered_under_two_names_is_never_factorized():
    net = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 2))
    net.alias = net[1]  # the same module object, reachable as "1" and as "alias"
    assert select_layers(net, ABConfig(target_modules="all")) == ["0", "2", "3"]
    with pytest.raises(ABConfigError, match="shared with alias"):
        select_layers(net, ABConfig(target_modules=["1"]))


# ----------------------------------------------------------------------------- bad selections
def test_target_modules_that_match_nothing_or_do_not_parse_are_clear_errors():
    with pytest.raises(ABConfigError, match="matches none of the model's 4 factorizable"):
        select_layers(Net(), ABConfig(target_modules=["q_proj"]))
    with pytest.raises(ABConfigError, match="not a valid regular expression"):
        select_layers(Net(), ABConfig(target_modules="fc(["))
    with pytest.raises(ABConfigError, match="exclude_modules.*not a valid regular expression"):
        select_layers(Net(), ABConfig(exclude_modules="*fc"))


def test_a_model_with_only_a_first_and_a_last_layer_says_how_to_include_them():
    from ab_accel import ABOptimizer

    model = convert(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)), ABConfig())
    with pytest.raises(ValueError, match=r"only factorizable layers, 0 and 2, are the first and "
                                         r"the last.*target_modules='all'"):
        ABOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model, ABConfig())
