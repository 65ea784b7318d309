"""Training on 2 processes (torchrun, gloo on CPU) against one process with the same global batch:
DDP and FSDP2 give the same losses and weights, resume crosses world sizes (2 -> 1, 1 -> 2)
continuing the loss curve exactly, the exported model is the trained one, and mistakes end
every rank with one line, never a hang."""

import json
import os
import re
import subprocess
import sys

import pytest
import torch
from conftest import (
    ADAMW_EPS,
    SAMPLE_TEXT,
    adamw_drift,
    approx_reordered,
    assert_reorder_close,
    assert_weights_close,
    decoder_lengths,
)
from safetensors.torch import load_file

from temper.models import preset
from temper.train.rundir import read_metrics

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built")

COMMON = ["model=llama-tiny", "vocab_size=300", "seq_len=32", "batch_size=2", "peak_flops=1e9",
          "logging.progress=false", "samples=1", "sample_tokens=4", "optim.lr=3e-3", "logging.every=1",
          "eval_fraction=0.2", "schedule.name=constant", "schedule.warmup_steps=0", f"optim.eps={ADAMW_EPS}"]
# Every run here is the same maths as the one-process run, summed in another order (over ranks,
# shards, stages): step t agrees within the reordering bound of t chained forward-backward passes.
CONFIG = preset("llama-tiny", vocab_size=300)
TOKENS = 4 * 32  # a global batch: 2 ranks x 2 windows, or 1 process x 2 micro-batches x 2, of 32 tokens
FORWARD, STEP = decoder_lengths(CONFIG, 32), decoder_lengths(CONFIG, 32, tokens=TOKENS)


def temper(*args, ranks=1, timeout=240):
    """`temper ...` in one process, or under torchrun with `ranks` processes; never hangs."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}",
                "-m", "temper"] if ranks > 1 else [sys.executable, "-m", "temper"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([*launcher, *args], capture_output=True, text=True, timeout=timeout, env=env)


def check(result):
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def losses(out):
    return [r["loss"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r]


def assert_same_losses(out, reference, *, step=STEP, forward=FORWARD, tokens=TOKENS, key="loss"):
    got, expected = ([r[key] for r in read_metrics(d / "metrics.jsonl") if "loss" in r] for d in (out, reference))
    assert len(got) == len(expected) > 0
    for t, (a, b) in enumerate(zip(got, expected)):  # after t steps that differed only in rounding
        assert a == approx_reordered(b, step * t + forward + (tokens,)), (key, t + 1)


def assert_same_weights(a, b, step=STEP):
    """The weights of run `a` are those of the reference `b` within `adamw_drift` of its steps."""
    rows = [r for r in read_metrics(b / "metrics.jsonl") if "loss" in r]
    drift = adamw_drift([r["lr"] for r in rows], [r["grad_norm"] for r in rows], step)
    assert_weights_close(load_file(a / "model.safetensors"), load_file(b / "model.safetensors"), drift, len(rows))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One process with grad_accum=2 (the reference) and 2 processes x 1 micro-batch, DDP and FSDP."""
    root = tmp_path_factory.mktemp("dist")
    corpus = root / "corpus.txt"
    corpus.write_text(SAMPLE_TEXT * 3)
    common = [*COMMON, f"data={corpus}"]
    check(temper("pretrain", *common, "max_steps=4", "grad_accum=2", f"output_dir={root / 'single'}"))
    out = {"root": root, "common": common, "single": root / "single"}
    for strategy in ("ddp", "fsdp"):
        out[f"{strategy}_log"] = check(temper("pretrain", *common, "max_steps=4", f"strategy={strategy}",
                                              f"output_dir={root / strategy}", ranks=2))
        out[strategy] = root / strategy
    return out


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_train_exactly_like_one_with_the_same_global_batch(runs, strategy):
    single, multi = runs["single"], runs[strategy]
    assert len(losses(single)) == 4
    assert_same_losses(multi, single)
    assert_same_weights(multi, single)
    summary = json.loads((multi / "summary.json").read_text())
    assert summary["parallel"] == f"2 processes, {strategy} (dp=2)"
    # rank 0 alone logs and writes: one row per step, one summary printed, each line said once
    assert [r["step"] for r in read_metrics(multi / "metrics.jsonl")] == [1, 2, 3, 4]
    log = runs[f"{strategy}_log"]
    assert log.stdout.count(f"2 processes, {strategy} (dp=2)") == 1  # the summary, printed by rank 0 alone
    assert log.stderr.count("eval step 4:") == 1 and log.stderr.count("M params |") == 1
    if strategy == "fsdp":  # sharded checkpoints through torch.distributed.checkpoint, no pickle
        ckpt = multi / "checkpoints" / "step_00000004"
        assert sorted(p.suffix for p in (ckpt / "dcp").iterdir()) == [".safetensors", ".safetensors"]
        assert json.loads((ckpt / "state.json").read_text())["world_size"] == 2
        assert not any(p.name == ".metadata" or p.suffix in (".distcp", ".pt") for p in ckpt.rglob("*"))


@pytest.mark.parametrize("layout", [["parallel.tp=2"], ["parallel.pp=2", "parallel.pp_schedule=1f1b"],
                                    # 4 processes; a 2x2 mesh also in test_tensor_parallel (fsdp x tp)
                                    pytest.param(["parallel.pp=2", "parallel.tp=2"], marks=pytest.mark.slow)])
def test_tensor_and_pipeline_parallel_pretraining_equal_one_process(runs, layout):
    """TP=2 (each block's matmuls split over 2 ranks), a 2-stage 1F1B pipeline over 2
    micro-batches, and both at once on 4 processes train the same 4 steps as one process,
    and export the same model."""
    out = runs["root"] / "_".join(x.replace("=", "") for x in layout)
    result = check(temper("pretrain", *runs["common"], "max_steps=4", "global_batch_size=4", *layout,
                          f"output_dir={out}", ranks=2 if len([x for x in layout if x.endswith("=2")]) == 1 else 4))
    assert_same_losses(out, runs["single"])
    assert_same_weights(out, runs["single"])
    described = json.loads((out / "summary.json").read_text())["parallel"]
    assert all(x.split(".")[1] in described for x in layout if x.endswith("=2"))
    assert "returned a view tensor" not in result.stderr


def test_a_pipeline_checkpoint_resumes_on_one_process_and_back(runs):
    """Stages save their own tensors (the last stage's copy of the tied embedding under the
    embedding's name): pp=2 -> one process, and one process -> pp=2 (GPipe)."""
    for name, first, then in [("pp_to_one", (["parallel.pp=2"], 2), (["strategy=fsdp"], 1)),
                              ("one_to_pp", (["strategy=ddp"], 1), (["parallel.pp=2", "parallel.pp_schedule=gpipe"], 2))]:
        out = runs["root"] / name
        common = [*runs["common"], "global_batch_size=4", f"output_dir={out}"]
        check(temper("pretrain", *common, "max_steps=2", *first[0], ranks=first[1]))
        check(temper("pretrain", *common, "max_steps=4", "resume=auto", *then[0], ranks=then[1]))
        assert_same_losses(out, runs["single"])
        assert_same_weights(out, runs["single"])


def test_fsdp_options_zero2_and_bf16_mixed_precision(runs):
    """reshard_after_forward=false (parameters kept gathered from forward to backward) trains
    exactly the same; precision=bf16 is FSDP's mixed-precision policy: bf16 compute (losses
    differ from fp32's, yet track them), fp32 master weights saved; cpu_offload needs a GPU."""
    common = [*runs["common"], "max_steps=4", "global_batch_size=4", "strategy=fsdp"]
    zero2 = runs["root"] / "zero2"
    check(temper("pretrain", *common, "parallel.reshard_after_forward=false", f"output_dir={zero2}", ranks=2))
    assert_same_losses(zero2, runs["single"])
    bf16 = runs["root"] / "bf16"
    check(temper("pretrain", *common, "precision=bf16", f"output_dir={bf16}", ranks=2))
    gaps = [abs(a - b) for a, b in zip(losses(bf16), losses(runs["single"]))]
    assert max(gaps) > 1e-5 and max(gaps) < 0.05  # bf16 matmuls: not fp32's numbers, but close
    assert {t.dtype for t in load_file(bf16 / "model.safetensors").values()} == {torch.float32}
    offload = temper("pretrain", *common, "parallel.cpu_offload=true", f"output_dir={runs['root'] / 'off'}", ranks=2)
    assert "error (rank 0): parallel.cpu_offload=true moves FSDP's shards from GPU memory" in offload.stderr


def test_the_exported_model_is_the_trained_one(runs):
    """FSDP's final evaluation ran on the sharded model; the one HF directory it exported scores
    the same validation loss, and its logits are the one-process model's."""
    from temper.data.shards import TokenLoader
    from temper.eval.perplexity import evaluate_batches
    from temper.models import load_model

    fsdp, single = runs["fsdp"], runs["single"]
    summary = json.loads((fsdp / "summary.json").read_text())
    exported = load_model(fsdp)
    val = TokenLoader(fsdp / "data", "val", seq_len=32, batch_size=2, shuffle=False, drop_last=False)
    again = evaluate_batches(exported, val, device=torch.device("cpu"))
    # sharded and gathered weights, batches of 2: the same sums in another order
    assert again["val_loss"] == approx_reordered(summary["val_loss"], FORWARD + (TOKENS,))
    ids = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # after 4 steps
        assert_reorder_close(exported(ids), load_model(single)(ids), STEP * 4 + decoder_lengths(CONFIG, 16))


@pytest.mark.parametrize("first,then", [(2, 1), pytest.param(1, 2, marks=pytest.mark.slow)])
def test_resume_across_world_sizes_continues_the_loss_curve(runs, first, then):
    """Steps 1-2 on `first` processes, steps 3-4 resumed on `then`: the same 4 losses and final
    weights as the uninterrupted run (global_batch_size keeps the global batch fixed)."""
    out = runs["root"] / f"resume_{first}_{then}"
    common = [*runs["common"], "strategy=fsdp", "global_batch_size=4", f"output_dir={out}"]
    check(temper("pretrain", *common, "max_steps=2", ranks=first))
    second = check(temper("pretrain", *common, "max_steps=4", "resume=auto", ranks=then))
    assert "resumed from" in second.stderr and "at step 2" in second.stderr
    assert_same_losses(out, runs["single"])
    assert_same_weights(out, runs["single"])


def test_a_distributed_checkpoint_resumes_in_one_plain_process(runs):
    """strategy=none reads the sharded checkpoint of a 2-process run (2 -> 1 without torchrun)."""
    out = runs["root"] / "to_plain"
    common = [*runs["common"], f"output_dir={out}"]
    check(temper("pretrain", *common, "max_steps=2", "strategy=ddp", ranks=2))
    check(temper("pretrain", *common, "max_steps=4", "grad_accum=2", "strategy=none", "resume=auto"))
    assert_same_losses(out, runs["single"])


def test_sft_with_unequal_token_counts_per_rank_and_replay(tmp_path, tiny_model_dir):
    """The normalisation DDP needs: rows of different lengths give each rank a different number
    of target tokens; the loss and weights still equal one process's on the same global batch,
    with a second (replay) objective in every step."""
    rows = [{"messages": [{"role": "user", "content": f"What is {i * 37} plus {i}?"},
                          {"role": "assistant", "content": "It is " + "many " * (i % 5) + str(i * 38)}]}
            for i in range(32)]
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows))
    general = tmp_path / "general.txt"
    general.write_text("\n\n".join(f"Paragraph {i} of plain general text about numbers." for i in range(200)))
    common = [f"model={tiny_model_dir}", f"data={train}", f"general_data={general}", "replay_weight=0.3",
              "max_steps=3", "batch_size=2", "logging.progress=false", "logging.every=1",
              "logging.eval_at_start=false", "eval_max_new_tokens=2", "optim.lr=3e-3", "eval_batches=1",
              "schedule.name=constant", "schedule.warmup_steps=0", "template=chatml", f"optim.eps={ADAMW_EPS}"]
    # batch sizes are per rank: 2 ranks x 2 rows (and 2 replay windows) = 1 rank x 2 x 2 rows (and 4 windows)
    check(temper("sft", *common, "grad_accum=2", "replay_batch_size=4", f"output_dir={tmp_path / 'one'}"))
    check(temper("sft", *common, "strategy=ddp", "replay_batch_size=2", f"output_dir={tmp_path / 'two'}", ranks=2))
    one, two = read_metrics(tmp_path / "one" / "metrics.jsonl"), read_metrics(tmp_path / "two" / "metrics.jsonl")
    counts = [r["target_tokens"] for r in one if "loss" in r]
    assert len(set(counts)) > 1  # steps differ in trained tokens, so ranks do too
    assert [r["target_tokens"] for r in two if "loss" in r] == counts
    # rows of at most 256 tokens here, 2 x 2 rows and 4 replay windows of 256 a step: bounds to spare
    config, tokens = preset("llama-tiny", vocab_size=300), 8 * 256
    forward, step = decoder_lengths(config, 256), decoder_lengths(config, 256, tokens=tokens)
    for key in ("loss", "replay_loss"):
        assert_same_losses(tmp_path / "two", tmp_path / "one", step=step, forward=forward, tokens=tokens, key=key)
    params = sum(t.numel() for t in load_file(tmp_path / "one" / "model.safetensors").values())
    norms = [[r["grad_norm"] for r in rows if "loss" in r] for rows in (two, one)]
    for t, (a, b) in enumerate(zip(*norms), start=1):
        assert a == approx_reordered(b, step * t + (params,)), ("grad_norm", t)
    assert_same_weights(tmp_path / "two", tmp_path / "one", step=step)


@pytest.mark.parametrize("extra,message", [
    (["parallel.tp=3"], "2 processes cannot form a mesh of parallel.tp=3 x parallel.pp=1"),
    pytest.param(["global_batch_size=6"], "global_batch_size=6 is not a multiple of batch_size x data-parallel ranks "
                                          "= 2 x 2", marks=pytest.mark.slow),
    pytest.param(["strategy=none"], "strategy=none runs one process, but torchrun started 2", marks=pytest.mark.slow),
    (["parallel.tp=2", "model_config.hidden_size=48", "model_config.num_heads=3", "model_config.num_kv_heads=3",
      "model_config.head_dim=16"], "parallel.tp=2 does not divide the model's 3 attention heads"),
])
def test_mistakes_end_every_rank_with_one_line(runs, tmp_path, extra, message):
    common = [*runs["common"], "max_steps=1"]
    result = temper("pretrain", *common, *extra, f"output_dir={tmp_path / 'bad'}", ranks=2, timeout=120)
    assert result.returncode != 0
    for rank in (0, 1):
        assert f"temper pretrain: error (rank {rank}): {message}" in result.stderr, result.stderr[-2000:]
    assert not re.search(r'File ".*/temper/', result.stderr)  # no rank crashed (torchrun adds its own report)


def test_a_refusal_on_rank_0_reaches_every_rank(runs, tmp_path):
    """Rank 0 alone claims the output directory; held by another run, both ranks stop with its reason."""
    from temper.io import claim_output_dir, release_output_dir

    out = claim_output_dir(tmp_path / "held")
    try:
        result = temper("pretrain", *runs["common"], "max_steps=1", "strategy=ddp", f"output_dir={out}", ranks=2,
                        timeout=120)
    finally:
        release_output_dir(out)
    assert result.returncode != 0
    assert "error (rank 0): output_dir" in result.stderr and "is in use by another temper run" in result.stderr
    assert "error (rank 1): output_dir" in result.stderr and "(said by rank 0)" in result.stderr


def test_checkpoint_of_another_world_layout_is_refused(runs, tmp_path):
    """A one-process (strategy=none) checkpoint under a strategy gives one line on every rank."""
    out = tmp_path / "plain"
    common = [*runs["common"], f"output_dir={out}"]
    check(temper("pretrain", *common, "max_steps=1", "grad_accum=2"))
    result = temper("pretrain", *common, "max_steps=2", "strategy=fsdp", "resume=auto", ranks=2)
    assert result.returncode != 0
    assert "was written by a one-process run (strategy=none)" in result.stderr
    assert not re.search(r'File ".*/temper/', result.stderr)


@pytest.mark.slow  # a checkpoint of another model is refused in one process too (test_loop)
def test_checkpoint_of_another_model_is_refused_on_every_rank(runs, tmp_path):
    """A sharded checkpoint of another model shape gives one line on every rank, from the settings
    it recorded, before any cache is built."""
    other = tmp_path / "other"
    common = [*runs["common"], f"output_dir={other}", "strategy=fsdp", "global_batch_size=4"]
    check(temper("pretrain", *common, "max_steps=1"))
    ckpt = other / "checkpoints" / "step_00000001"
    common = [*runs["common"], f"output_dir={tmp_path / 'other2'}", "strategy=fsdp", "global_batch_size=4"]
    result = temper("pretrain", *common, "max_steps=2", f"resume={ckpt}", "model_config.intermediate_size=96",
                    ranks=2)
    assert result.returncode != 0
    # refused at the claim, from the settings the checkpoint recorded, before any cache is built
    assert "belongs to another run (model_config {} -> {'intermediate_size': 96})" in result.stderr


def test_gradients_are_reduced_once_per_step_and_fsdp_shards_each_block():
    """In one process (a group of one): DDP reduces gradients once for 3 accumulated micro-batches
    (no_sync on the others: with sync every time the hook would run 3 times per bucket), and
    FSDP2 makes every transformer block its own unit, then the root."""
    from torch.distributed.fsdp import FSDPModule

    from temper.losses import causal_lm_loss
    from temper.models import build_model, preset
    from temper.train import engine
    from temper.train.distributed import Parallel, ParallelConfig, wrap_model

    cpu = torch.device("cpu")
    par = Parallel("ddp", ParallelConfig(), cpu)
    try:
        torch.manual_seed(0)
        ddp = wrap_model(build_model(preset("llama-tiny", vocab_size=64)), par, precision="fp32",
                         activation_checkpointing=False, compile=False)
        calls = []

        def counting_hook(state, bucket):
            calls.append(bucket.index())
            return torch.distributed.all_reduce(bucket.buffer(), async_op=True).get_future().then(
                lambda f: f.value()[0])

        ddp.register_comm_hook(None, counting_hook)
        x = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
        autocast = engine.precision_context("fp32", cpu)
        engine.accumulate(ddp, [(x, x)] * 3, lambda b: causal_lm_loss(ddp, b[0], b[1]), autocast=autocast, par=par)
        buckets = len(set(calls))
        assert len(calls) == buckets  # each bucket once, on the last micro-batch only
        par.strategy = "fsdp"
        model = wrap_model(build_model(preset("llama-tiny", vocab_size=64)), par, precision="fp32",
                           activation_checkpointing=False, compile=False)
        assert isinstance(model, FSDPModule) and all(isinstance(b, FSDPModule) for b in model.blocks)
    finally:
        par.close()


# ----------------------------------------------------------------------------- ELECTRA (an encoder pair)

ELECTRA_WORLD = ["world.num_people=6", "world.num_towns=3", "world.docs_per_person=4", "world.docs_per_town=2",
                 "world.num_arithmetic_docs=8", "world.num_dialogue_docs=8"]
ELECTRA = ["objective=electra", "seq_len=48", "batch_size=4", "vocab_size=400", "max_steps=2", "eval_batches=1",
           "logging.progress=false", "logging.eval_at_start=false", "logging.every=1", "schedule.name=constant",
           "schedule.warmup_steps=0", f"optim.eps={ADAMW_EPS}", *ELECTRA_WORLD]
ELECTRA_CONFIG = preset("electra-tiny", vocab_size=400)  # the generator is narrower: its chains are shorter
ELECTRA_TOKENS = 8 * 48


@pytest.fixture(scope="module")
def electra_runs(tmp_path_factory):
    """ELECTRA (generator and discriminator sharing their embeddings): one process with grad_accum=2,
    and 2 processes x 1 micro-batch under DDP and FSDP, on one tokenizer (the first run's)."""
    root = tmp_path_factory.mktemp("electra")
    check(temper("pretrain", *ELECTRA, "grad_accum=2", f"output_dir={root / 'single'}"))
    for strategy in ("ddp", "fsdp"):
        check(temper("pretrain", *ELECTRA, f"tokenizer={root / 'single'}", f"strategy={strategy}",
                     f"output_dir={root / strategy}", ranks=2))
    return root


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_electra_with_shared_embeddings_trains_like_one_process(electra_runs, strategy):
    """The two models are one wrapped module: the losses (L_gen, L_disc, their sum) and both
    models' weights are the one-process run's, and the generator's embeddings are still the
    discriminator's (the same values after the steps). With BERT's dropout on: each micro-batch
    draws its masks from its own seed, so the ranks drop as the one process does."""
    single, multi = electra_runs / "single", electra_runs / strategy
    step = decoder_lengths(ELECTRA_CONFIG, 48, tokens=ELECTRA_TOKENS)
    forward = decoder_lengths(ELECTRA_CONFIG, 48)
    for key in ("loss", "gen_loss", "disc_loss"):
        assert_same_losses(multi, single, step=step, forward=forward, tokens=ELECTRA_TOKENS, key=key)
    assert len(losses(multi)) == 2
    rows = [r for r in read_metrics(single / "metrics.jsonl") if "loss" in r]
    drift = adamw_drift([r["lr"] for r in rows], [r["grad_norm"] for r in rows], step)
    for sub in ("model.safetensors", "generator/model.safetensors"):
        assert_weights_close(load_file(multi / sub), load_file(single / sub), drift, len(rows))
    disc, gen = load_file(multi / "model.safetensors"), load_file(multi / "generator" / "model.safetensors")
    assert any(k.startswith("electra.embeddings.") for k in gen)
    for k in gen:
        if k.startswith("electra.embeddings."):
            torch.testing.assert_close(gen[k], disc[k], rtol=0, atol=0, msg=k)
    assert json.loads((multi / "summary.json").read_text())["parallel"] == f"2 processes, {strategy} (dp=2)"


FINETUNE = ["task=classify", "model=bert-tiny", "seq_len=48", "batch_size=4", "max_steps=2", "logging.progress=false",
            "logging.eval_at_start=false", "logging.every=1", "logging.eval_every=0", "schedule.name=constant",
            "schedule.warmup_steps=0", f"optim.eps={ADAMW_EPS}", *ELECTRA_WORLD]


def test_finetune_encoder_on_two_ranks_trains_like_one_process(electra_runs):
    """`temper finetune-encoder` (bert-tiny, dropout 0.1) under DDP: each micro-batch draws its
    dropout masks from its own seed, so 2 ranks x 1 micro-batch give the losses and weights of one
    process with grad_accum=2 (ranks seeded alike would drop alike and differ from it)."""
    root = electra_runs / "finetune"
    tokenizer = f"tokenizer={electra_runs / 'single'}"
    check(temper("finetune-encoder", *FINETUNE, tokenizer, "grad_accum=2", f"output_dir={root / 'single'}"))
    check(temper("finetune-encoder", *FINETUNE, tokenizer, "strategy=ddp", f"output_dir={root / 'ddp'}", ranks=2))
    config = preset("bert-tiny", vocab_size=400)
    assert config.dropout > 0
    step, forward = decoder_lengths(config, 48, tokens=ELECTRA_TOKENS), decoder_lengths(config, 48)
    assert_same_losses(root / "ddp", root / "single", step=step, forward=forward, tokens=ELECTRA_TOKENS)
    assert len(losses(root / "ddp")) == 2
    assert_same_weights(root / "ddp", root / "single", step=step)
