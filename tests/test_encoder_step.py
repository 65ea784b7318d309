"""One training step of the encoder objectives: MLM+NSP and ELECTRA read every loss off ONE
forward per micro-batch (`engine.accumulate_shared`), giving the losses and gradients of one
`accumulate` per objective; ELECTRA's two models are one `ModuleGroup`, whose shared embeddings
a wrapper (FSDP) holds once."""

from __future__ import annotations

import torch
from conftest import approx_reordered, decoder_lengths, reorder_tol

from temper.cli import main
from temper.losses import IGNORE_INDEX
from temper.losses.encoder import masked_lm_loss, sentence_pair_loss
from temper.models import build_model, preset
from temper.models.bert import Bert, with_head
from temper.train import engine
from temper.train.rundir import read_metrics

TINY_WORLD = ["world.num_people=6", "world.num_towns=3", "world.docs_per_person=4", "world.docs_per_town=2",
              "world.num_arithmetic_docs=8", "world.num_dialogue_docs=8"]


def micro_batches(vocab: int, seed: int = 0) -> list[dict]:
    """Two micro-batches of different shapes and different numbers of masked tokens."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for B, T, share in ((3, 12, 0.2), (2, 9, 0.5)):
        ids = torch.randint(5, vocab, (B, T), generator=g)
        mask = torch.ones(B, T, dtype=torch.long)
        mask[0, T - 3:] = 0  # padding in one row
        labels = torch.where((torch.rand(B, T, generator=g) < share) & mask.bool(), ids, IGNORE_INDEX)
        labels[1, 1] = ids[1, 1]  # at least one selected position per micro-batch
        out.append({"input_ids": torch.where(labels != IGNORE_INDEX, 4, ids), "attention_mask": mask,
                    "token_type_ids": (torch.arange(T) >= T // 2).long().expand(B, T), "labels": labels,
                    "sentence_labels": torch.randint(0, 2, (B,), generator=g)})
    return out


def test_one_forward_gives_the_two_pass_losses_and_gradients():
    """BertForPreTraining's MLM and NSP losses from one forward (each divided by its own unit count
    of the whole step before the backward) equal two `accumulate` calls, one forward per objective:
    the same sums, the gradients within the reordering bound of one training step."""
    torch.manual_seed(0)
    config = with_head(preset("bert-tiny", vocab_size=97, dropout=0.0, attention_dropout=0.0), "BertForPreTraining")
    model = build_model(config)
    batches = micro_batches(config.vocab_size)
    autocast = engine.precision_context("fp32", torch.device("cpu"))
    forwards = []
    handle = model.register_forward_hook(lambda *_: forwards.append(1))

    def forward(b):
        selected = b["labels"] != IGNORE_INDEX
        out = model(b["input_ids"], attention_mask=b["attention_mask"], token_type_ids=b["token_type_ids"],
                    selected=selected)
        return out, b["labels"][selected]

    def mlm(b):
        out, targets = forward(b)
        return masked_lm_loss(out.logits, targets, reduction="sum"), len(targets)

    def nsp(b):
        out, _ = forward(b)
        return sentence_pair_loss(out.sentence_logits, b["sentence_labels"], reduction="sum"), len(b["labels"])

    two = [engine.accumulate(model, batches, fn, autocast=autocast) for fn in (mlm, nsp)]
    two_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    assert len(forwards) == 4
    model.zero_grad(set_to_none=True)
    forwards.clear()

    def both(b):
        out, targets = forward(b)
        return {"mlm": masked_lm_loss(out.logits, targets, reduction="sum"),
                "sentence": sentence_pair_loss(out.sentence_logits, b["sentence_labels"], reduction="sum")}, {}

    one = engine.accumulate_shared(model, batches, both, autocast=autocast, weights={"mlm": 1.0, "sentence": 1.0},
                                   units=lambda b: {"mlm": int((b["labels"] != IGNORE_INDEX).sum()),
                                                    "sentence": len(b["labels"])})
    handle.remove()
    assert len(forwards) == len(batches)  # one forward per micro-batch
    T, tokens = 12, sum(b["input_ids"].numel() for b in batches)
    forward_lengths, step_lengths = decoder_lengths(config, T), decoder_lengths(config, T, tokens=tokens)
    assert one["mlm_count"] == two[0]["count"] and one["sentence_count"] == two[1]["count"] == 5
    assert one["mlm"] == approx_reordered(two[0]["loss"], forward_lengths)
    assert one["sentence"] == approx_reordered(two[1]["loss"], forward_lengths)
    assert one["loss"] == approx_reordered(two[0]["loss"] + two[1]["loss"], forward_lengths)
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert grads.keys() == two_grads.keys()
    # the scale of every gradient's terms: the largest entry of any (a key bias's gradient is 0 up to rounding)
    tol = reorder_tol(max(float(g.abs().max()) for g in two_grads.values()), *step_lengths)
    for name, expected in two_grads.items():
        torch.testing.assert_close(grads[name], expected, rtol=0, atol=tol, msg=name)
    assert float(model.nsp.weight.grad.abs().max()) > 1e3 * tol and float(model.mlm.decoder.bias.grad.abs().max()) > 1e3 * tol
    # the loss weights apply per objective: weight 0 leaves only the other's gradient
    model.zero_grad(set_to_none=True)
    engine.accumulate_shared(model, batches, both, autocast=autocast, weights={"mlm": 1.0, "sentence": 0.0},
                             units=lambda b: {"mlm": int((b["labels"] != IGNORE_INDEX).sum()),
                                              "sentence": len(b["labels"])})
    assert float(model.nsp.weight.grad.abs().max()) == 0.0 and float(model.mlm.decoder.bias.grad.abs().max()) > 0


def count_forwards(argv: list[str]) -> tuple[list[tuple[str, bool]], list[dict]]:
    """Run `temper argv` in this process; every Bert forward as (its architecture, grad enabled)."""
    calls: list[tuple[str, bool]] = []

    def hook(module, args, output):
        if isinstance(module, Bert):
            calls.append((module.config.hf_architecture, torch.is_grad_enabled()))

    handle = torch.nn.modules.module.register_module_forward_hook(hook)
    try:
        assert main(argv) == 0
    finally:
        handle.remove()
    return calls


def test_the_recipe_runs_one_forward_per_micro_batch(tmp_path):
    """mlm+nsp: one BertForPreTraining forward per micro-batch in training and per batch in
    evaluation (it ran two); ELECTRA: one generator and one discriminator forward each."""
    common = ["seq_len=48", "batch_size=4", "grad_accum=2", "max_steps=1", "vocab_size=300", "eval_batches=2",
              "logging.progress=false", "logging.eval_at_start=false", "logging.every=1", "logging.eval_every=1",
              *TINY_WORLD]
    for objective, architectures in (("mlm+nsp", ["BertForPreTraining"]),
                                     ("electra", ["ElectraForMaskedLM", "ElectraForPreTraining"])):
        out = tmp_path / objective
        calls = count_forwards(["pretrain", f"objective={objective}", f"output_dir={out}", *common])
        for architecture in architectures:
            assert [grad for arch, grad in calls if arch == architecture] == [True] * 2 + [False] * 2, objective
        rows = [r for r in read_metrics(out / "metrics.jsonl") if "loss" in r]
        assert len(rows) == 1
        parts = ("mlm_loss", "sentence_loss") if objective == "mlm+nsp" else ("gen_loss", "disc_loss")
        weights = (1.0, 1.0) if objective == "mlm+nsp" else (1.0, 50.0)
        assert "eval_loss" in rows[-1]
        for r in rows:  # the logged loss is the weighted sum of the objectives' means
            for prefix in ("", "eval_") if "eval_loss" in r else ("",):
                total = sum(w * r[prefix + p] for w, p in zip(weights, parts))
                assert r[prefix + "loss"] == approx_reordered(total, (2,))


def test_a_module_group_holds_shared_embeddings_once_under_fsdp():
    """FSDP2 over ELECTRA's ModuleGroup (a group of one process): the embeddings are one sharded
    parameter that both models use, the optimiser sees it once, and a step moves both models'
    view of it alike (two FSDP roots failed here: overlapping meshes)."""
    from temper.config import OptimConfig
    from temper.recipes.encoder import build_generator
    from temper.train.distributed import ModuleGroup, Parallel, ParallelConfig, wrap_model
    from temper.train.optim import build_optimizer

    par = Parallel("fsdp", ParallelConfig(), torch.device("cpu"))
    try:
        torch.manual_seed(0)
        disc = build_model(preset("electra-tiny", vocab_size=64, dropout=0.0, attention_dropout=0.0))
        group = wrap_model(ModuleGroup({"discriminator": disc, "generator": build_generator(disc, 0.25, par.device)}),
                           par, precision="fp32", activation_checkpointing=False, compile=False)
        shared = group.discriminator.embeddings.word_embeddings.weight
        assert group.generator.embeddings.word_embeddings.weight is shared
        assert group.generator.generator.decoder.weight is shared  # the generator's tied output layer too
        optimizer = build_optimizer(group, OptimConfig(lr=1e-2))
        params = [p for g in optimizer.param_groups for p in g["params"]]
        assert len(params) == len({id(p) for p in params}) == len(list(group.parameters()))
        before = shared.detach().full_tensor().clone()
        ids = torch.randint(5, 64, (2, 8), generator=torch.Generator().manual_seed(1))
        loss = group("generator", ids).logits.square().mean() + group("discriminator", ids).logits.square().mean()
        loss.backward()
        optimizer.step()
        after = group.discriminator.embeddings.word_embeddings.weight
        assert after is group.generator.embeddings.word_embeddings.weight
        assert float((after.detach().full_tensor() - before).abs().max()) > 0
    finally:
        par.close()
