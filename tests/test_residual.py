"""The frozen residual (ABConfig.residual) and freeze_untargeted.

With ``residual=True`` every factorization keeps W_res = W - A B as a frozen tensor of the layer,
so converting is lossless, and every dense read (forward, matrix(), the export, merge, a sync,
the next factorization) is W_res + A B. The residual is never trained, never sent and the same
on every rank; ``freeze_untargeted`` freezes everything outside the factorized layers, so only
factor gradients are reduced. Distributed claims run in real gloo processes (one shared world).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from ab_accel import ABConfig, ABOptimizer, convert, merge
from ab_accel.checkpoint import load_checkpoint, save_checkpoint
from ab_accel.config import ABConfigError
from ab_accel.layers import ABConv1D, ABConv2d, ABLinear, factored_state_dict
from ab_accel.model import ab_layers, compression

from distributed import run_distributed


def mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(),
                         nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))


def factorize_all(model: nn.Module, rank: int) -> None:
    for _, layer in ab_layers(model):
        layer.factorize(rank)


# ---------------------------------------------------------------------------- layers
@pytest.mark.parametrize("make", [
    lambda: ABLinear.from_module(nn.Linear(12, 10)),
    lambda: ABConv2d(nn.Conv2d(3, 6, 3, padding=1)),
    lambda: ABConv1D(__import__("transformers.pytorch_utils").pytorch_utils.Conv1D(10, 12)),
])
def test_factorizing_with_a_residual_is_lossless_and_without_it_is_not(make):
    torch.manual_seed(0)
    layer = make()
    x = torch.randn(2, 3, 8, 8) if isinstance(layer, ABConv2d) else torch.randn(5, 12)
    before, w = layer(x).detach(), layer.matrix().clone()
    lossy = copy.deepcopy(layer)
    lossy.factorize(2)
    assert (lossy(x) - before).abs().max() > 1e-2  # what the residual is for
    layer.keep_residual = True
    layer.factorize(2)
    assert layer.residual is not None and layer.residual.shape == layer.weight_shape
    torch.testing.assert_close(layer(x), before, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer.matrix(), w, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(layer.weight, layer._matrix_to_weight(w), atol=1e-6, rtol=1e-6)
    # the factors are the principal ones (PiSSA): A B is the best rank-2 part of W
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    torch.testing.assert_close(layer.A @ layer.B, (u[:, :2] * s[:2]) @ vh[:2], atol=1e-5,
                               rtol=1e-5)


def test_the_residual_is_no_parameter_no_buffer_gets_no_gradient_and_moves_with_the_layer():
    layer = ABLinear.from_module(nn.Linear(12, 10))
    layer.keep_residual = True
    layer.factorize(3)
    names = [n for n, _ in layer.named_parameters()] + [n for n, _ in layer.named_buffers()]
    assert names == ["A", "B", "bias"]
    layer(torch.randn(4, 12)).sum().backward()
    assert layer.A.grad is not None and not layer.residual.requires_grad
    assert layer.residual.grad is None
    layer.double()
    assert layer.residual.dtype == torch.float64 and layer.A.dtype == torch.float64
    assert "residual=True" in repr(layer)


def test_refactorization_takes_the_svd_of_the_whole_w_and_keeps_it():
    torch.manual_seed(1)
    layer = ABLinear.from_module(nn.Linear(12, 10))
    layer.keep_residual = True
    layer.factorize(3)
    with torch.no_grad():  # as training would: move the factors
        layer.A.add_(0.3 * torch.randn_like(layer.A))
        layer.B.add_(0.3 * torch.randn_like(layer.B))
    w = layer.matrix().clone()
    x = torch.randn(6, 12)
    before = layer(x).detach()
    layer.factorize(layer.proposed_rank(0.0, fixed=3))
    torch.testing.assert_close(layer.matrix(), w, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer(x), before, atol=1e-5, rtol=1e-5)
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    torch.testing.assert_close(layer.A @ layer.B, (u[:, :3] * s[:3]) @ vh[:3], atol=1e-5,
                               rtol=1e-5)
    layer.to_full()  # W <- W_res + A B, the residual gone
    assert layer.residual is None
    torch.testing.assert_close(layer.weight, w, atol=1e-5, rtol=1e-5)


def test_factored_state_dict_holds_the_residual_once_and_loads_back_bit_identically():
    model = convert(mlp(), ABConfig(residual=True))
    factorize_all(model, 3)
    with factored_state_dict():
        state = model.state_dict()
    assert sorted(k for k in state if k.startswith("2.")) == ["2.A", "2.B", "2.bias",
                                                               "2.residual"]
    fresh = convert(mlp(seed=5), ABConfig(residual=True))  # full mode, other weights
    result = fresh.load_state_dict(state)
    assert not result.missing_keys and not result.unexpected_keys
    for (_, a), (_, b) in zip(ab_layers(model), ab_layers(fresh), strict=True):
        assert torch.equal(a.residual, b.residual) and torch.equal(a.A, b.A)
    x = torch.randn(5, 8)
    assert torch.equal(model(x), fresh(x))
    # a factored file without residual (a run without it) leaves none
    with factored_state_dict():
        plain = convert(mlp(), ABConfig())
        factorize_all(plain, 3)
        fresh.load_state_dict(plain.state_dict())
    assert all(layer.residual is None for _, layer in ab_layers(fresh))


def test_bf16_residual_under_fp32_factors():
    model = convert(mlp(), ABConfig(residual=True, residual_dtype="bf16"))
    x = torch.randn(5, 8)
    before = model(x).detach()
    factorize_all(model, 3)
    layer = model[2]
    assert layer.residual.dtype == torch.bfloat16 and layer.A.dtype == torch.float32
    torch.testing.assert_close(model(x), before, atol=2e-2, rtol=2e-2)  # rounded once
    with pytest.raises(ABConfigError, match="residual=true"):
        ABConfig(residual_dtype="bf16")


# ---------------------------------------------------------------------------- export
def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=2,
                                      n_head=2)).eval()


def _bert():
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(0)
    return BertForMaskedLM(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2,
                                      num_attention_heads=2, intermediate_size=48,
                                      max_position_embeddings=16)).eval()


@pytest.mark.parametrize("build", [_gpt2, _bert], ids=["gpt2", "bert"])
def test_conversion_is_lossless_and_the_export_loads_in_plain_transformers(build, tmp_path):
    model = build()
    ids = torch.randint(0, 64, (2, 10))
    with torch.no_grad():
        dense = model(ids).logits
    convert(model, ABConfig(residual=True, freeze_untargeted=True, target_modules="all"))
    factorize_all(model, 4)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, dense, atol=1e-4, rtol=1e-4)
        for _, layer in ab_layers(model):  # as fine-tuning would: move the factors
            layer.A.add_(0.05 * torch.randn_like(layer.A))
        tuned = model(ids).logits
    assert (tuned - dense).abs().max() > 1e-3
    model.save_pretrained(tmp_path / "export")
    plain = type(model).from_pretrained(tmp_path / "export").eval()
    assert not any(isinstance(m, (ABLinear, ABConv1D)) for m in plain.modules())
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, tuned, atol=1e-4, rtol=1e-4)
        merged = merge(copy.deepcopy(model))
        torch.testing.assert_close(merged(ids).logits, tuned, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------- model level
def test_freeze_untargeted_freezes_everything_but_the_targets_and_compression_is_honest():
    model = convert(mlp(), ABConfig(residual=True, freeze_untargeted=True))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable == ["2.weight", "4.weight"]  # the targets' weights; their biases frozen
    factorize_all(model, 2)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == [
        "2.A", "2.B", "4.A", "4.B"]
    c = compression(model)
    dense_targets = 2 * 16 * 16
    assert c["residual_now"] == dense_targets
    assert c["factorized_params_now"] == 2 * 2 * (16 + 16)
    assert c["params_dense"] == sum(p.numel() for p in mlp().parameters())
    # with the residual the model is LARGER than dense: the ratio says so
    assert c["ratio"] == c["params_dense"] / (c["params_now"] + dense_targets) < 1
    assert c["trainable_params_now"] == 2 * 2 * (16 + 16)
    with pytest.raises(ABConfigError, match="no AB layer"):
        convert(nn.Sequential(nn.Linear(3, 3)), ABConfig(freeze_untargeted=True,
                                                          target_modules=None))


def test_for_finetuning_defaults():
    cfg = ABConfig.for_finetuning(200, rank=8, target_modules=["q_proj"])
    assert (cfg.residual, cfg.freeze_untargeted, cfg.lean_memory) == (True, True, True)
    assert (cfg.warmup_steps, cfg.rebound_steps, cfg.sync_every, cfg.fixed_rank) == (0, 0, 50, 8)
    assert cfg.target_modules == ["q_proj"]
    with pytest.raises(ABConfigError, match="total_steps"):
        ABConfig.for_finetuning(2, cycles=4)


def test_single_process_training_touches_factors_only_and_checkpoint_round_trips(tmp_path):
    cfg = ABConfig.for_finetuning(8, rank=2, cycles=1)  # no sync in 3 steps
    model = convert(mlp(), cfg)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    opt = ABOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), model, cfg)
    residuals = {n: layer.residual.clone() for n, layer in ab_layers(model)}
    x, y = torch.randn(16, 8), torch.randn(16, 4)
    for _ in range(3):
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]) and p not in opt.state, n
    for n, layer in ab_layers(model):
        assert torch.equal(layer.residual, residuals[n])
        assert set(opt.state) >= {layer.A, layer.B}
    save_checkpoint(tmp_path / "ck", model, opt)
    model2 = convert(mlp(seed=3), cfg)
    opt2 = ABOptimizer(torch.optim.AdamW(model2.parameters(), lr=1e-2), model2, cfg)
    load_checkpoint(tmp_path / "ck", model2, opt2)
    for (_, a), (_, b) in zip(ab_layers(model), ab_layers(model2), strict=True):
        assert torch.equal(a.residual, b.residual) and torch.equal(a.B, b.B)
    assert torch.equal(model(x), model2(x))


# ---------------------------------------------------------------------------- 4 gloo ranks
def _expected_synced(mode: str, res: torch.Tensor, a: list, b: list, roles: list) -> torch.Tensor:
    """W after a sync of ``mode`` from every rank's factors (res: the shared residual)."""
    if mode == "with-stale":
        return res + torch.stack(a).mean(0) @ torch.stack(b).mean(0)
    if mode == "only-learned":
        ma = torch.stack([x for x, r in zip(a, roles, strict=True) if r == "A"]).mean(0)
        mb = torch.stack([x for x, r in zip(b, roles, strict=True) if r == "B"]).mean(0)
        return res + ma @ mb
    if mode == "full":
        return torch.stack([res + x @ y for x, y in zip(a, b, strict=True)]).mean(0)
    return res + a[0] @ torch.stack(b).mean(0)  # only-b: A never trains


def residual_world(rank: int, world: int) -> dict:
    """Every sync mode (and lean_memory) through an AB phase, a sync and a re-factorization,
    with the residual and freeze_untargeted; returns what the asserts read."""
    import torch.distributed as dist

    out: dict = {}
    modes = [("with-stale", False), ("only-learned", False), ("full", False),
             ("only-b", False), ("with-stale", True)]
    for mode, lean in modes:
        cfg = ABConfig(warmup_steps=0, sync_every=3 if lean else 4, rebound_steps=0 if lean else 1,
                       lr_rebound_steps=0, fixed_rank=2, sync_mode=mode, residual=True,
                       freeze_untargeted=True, lean_memory=lean,
                       group_size="world" if mode == "only-b" else None)
        model = convert(mlp(), cfg)
        frozen = {n: p.detach().clone() for n, p in model.named_parameters()
                  if not p.requires_grad}
        opt = ABOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), model, cfg)
        torch.manual_seed(100 + rank)
        x, y = torch.randn(8, 8), torch.randn(8, 4)
        layer = model[2]
        res0 = layer.residual.clone()
        rec: dict = {"ab_bytes": [], "expected_ab_bytes": [], "residual_in_state": False,
                     "residual_grad": False}
        for _ in range(2):  # the AB phase before the sync step
            before = opt.traffic.summary()["bytes_by_phase"]["ab"]
            nn.functional.mse_loss(model(x), y).backward()
            trained = opt.trained_params()
            opt.step()
            rec["ab_bytes"].append(opt.traffic.summary()["bytes_by_phase"]["ab"] - before)
            # the trained factors' gradients, and one flag per trained tensor + the NaN flag
            rec["expected_ab_bytes"].append(4 * (sum(p.numel() for p in trained)
                                                 + len(trained) + 1))
            rec["residual_grad"] |= layer.residual.grad is not None
            rec["residual_in_state"] |= any(t is layer.residual for t in opt.state)
            opt.zero_grad()
        # the last AB step, then the sync at its end: right after the wrapped optimizer's
        # update (before the sync), every rank's factors are gathered by a step hook
        seen: dict = {}

        def gather(*_args: object, layer: nn.Module = layer, seen: dict = seen) -> None:
            a = [torch.empty_like(layer.A) for _ in range(world)]
            b = [torch.empty_like(layer.B) for _ in range(world)]
            dist.all_gather(a, layer.A.detach())
            dist.all_gather(b, layer.B.detach())
            seen.update(a=a, b=b, res=layer.residual.clone())

        handle = opt.optimizer.register_step_post_hook(gather)
        nn.functional.mse_loss(model(x), y).backward()
        plan = opt.groups.plan
        roles = [str(plan.role_of(r)) for r in range(world)]
        opt.step()
        opt.zero_grad()
        handle.remove()
        rec["res_before_sync_equal_initial"] = torch.equal(seen["res"], res0)
        rec["expected_w"] = _expected_synced(mode, seen["res"], seen["a"], seen["b"], roles)
        rec["w_after_sync"] = layer.matrix().clone()
        rec["mode_after_sync"] = str(layer.mode)
        if not lean:  # the rebound step, then the factorization at its end
            nn.functional.mse_loss(model(x), y).backward()
            opt.step()
            opt.zero_grad()
            rec["w_before_refactor"] = layer.matrix().clone()
        rec["w_after_refactor"] = layer.matrix().clone()
        rec["residual_after"] = layer.residual.clone()
        rec["frozen_unchanged"] = all(torch.equal(p, frozen[n]) for n, p in
                                      model.named_parameters() if n in frozen)
        rec["roles"] = roles
        out[f"{mode}{'-lean' if lean else ''}"] = rec
    return out


@pytest.fixture(scope="module")
def world_results() -> list[dict]:
    return run_distributed(residual_world, 4)


def test_residual_is_identical_on_every_rank_and_never_trained(world_results):
    for key in world_results[0]:
        recs = [r[key] for r in world_results]
        for rec in recs:
            assert not rec["residual_grad"] and not rec["residual_in_state"], key
            assert rec["res_before_sync_equal_initial"], key
            assert rec["frozen_unchanged"], key
        first = recs[0]["residual_after"]
        assert all(torch.equal(rec["residual_after"], first) for rec in recs), key


def test_each_sync_mode_folds_the_residual_in_and_refactorization_keeps_w(world_results):
    for key in world_results[0]:
        for rank, r in enumerate(world_results):
            rec = r[key]
            torch.testing.assert_close(rec["w_after_sync"], rec["expected_w"], atol=1e-5,
                                       rtol=1e-5, msg=f"{key} rank {rank}")
            if "w_before_refactor" in rec:
                torch.testing.assert_close(rec["w_after_refactor"], rec["w_before_refactor"],
                                           atol=1e-5, rtol=1e-5)
            else:  # lean: the sync kept the factors, the factorization re-split W_res + A B
                torch.testing.assert_close(rec["w_after_refactor"], rec["w_after_sync"],
                                           atol=1e-5, rtol=1e-5)
        ws = [r[key]["w_after_refactor"] for r in world_results]
        assert all(torch.equal(w, ws[0]) for w in ws), key


def test_freeze_untargeted_sends_the_trained_factors_gradients_only(world_results):
    for key in world_results[0]:
        for r in world_results:
            rec = r[key]
            assert rec["ab_bytes"] == rec["expected_ab_bytes"], key


# ---------------------------------------------------------------------------- peft adapter
def test_the_change_exports_as_a_peft_lora_adapter_on_the_original_base(tmp_path):
    from peft import PeftModel

    from ab_accel.model import save_lora_adapter

    base = _gpt2()
    model = copy.deepcopy(base)
    convert(model, ABConfig(residual=True, freeze_untargeted=True, target_modules="all"))
    factorize_all(model, 3)
    with torch.no_grad():  # as fine-tuning would: move both factors
        for _, layer in ab_layers(model):
            layer.A.add_(0.05 * torch.randn_like(layer.A))
            layer.B.add_(0.05 * torch.randn_like(layer.B))
    ids = torch.randint(0, 64, (2, 10))
    with torch.no_grad():
        tuned, before = model(ids).logits, base(ids).logits
    errors = save_lora_adapter(model, base, str(tmp_path / "adapter"))
    assert max(errors.values()) <= 1e-4
    import json

    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["r"] == 6  # [A, A0][B; -B0]: twice the rank
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        out = loaded(input_ids=ids).logits
    torch.testing.assert_close(out, tuned, atol=1e-4, rtol=1e-4)
    assert (out - before).abs().max() > 1e-3
    # too small a rank, or a trained parameter outside the AB layers: refused, nothing written
    with pytest.raises(ABConfigError, match="Raise rank"):
        save_lora_adapter(model, base, str(tmp_path / "small"), rank=2)
    with torch.no_grad():
        model.transformer.wte.weight.add_(1.0)
    with pytest.raises(ABConfigError, match="freeze_untargeted"):
        save_lora_adapter(model, base, str(tmp_path / "other"))
    assert not (tmp_path / "small").exists() and not (tmp_path / "other").exists()
