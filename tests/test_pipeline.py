"""Pipeline parallelism: stages, splitting, and real 2-process gloo runs against one process.

Each multi-process test spawns its ranks (`spawn` context, a file store in tmp_path so no
port is shared), writes each rank's results to tmp_path and fails with a rank's traceback.
"""

from __future__ import annotations

import copy
import multiprocessing
import time
import traceback
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from conftest import (
    ADAMW_EPS,
    FP32_EPS,
    adamw_drift,
    approx_reordered,
    decoder_lengths,
    reorder_tol,
)

from temper.errors import TemperError
from temper.losses.clm import IGNORE_INDEX, causal_lm_loss
from temper.models import build_model, preset
from temper.models.common import AttentionInputs
from temper.train.pipeline import DecoderStage, PipelineRunner, build_stage, split_blocks

B, T, MICRO = 8, 16, 4
TIMEOUT_S = 90
LR = 1e-3
# A pipeline computes the same maths as one process, its micro-batches summed in another order:
# conftest.reorder_tol over llama-tiny's reductions (3 blocks at most), a step over the B x T batch
CONFIG = preset("llama-tiny").replace(num_layers=3)
FORWARD, STEP = decoder_lengths(CONFIG, T) + (B * T,), decoder_lengths(CONFIG, T, tokens=B * T)


# ----------------------------------------------------------------------------- spawn harness


def _rank_main(fn_name: str, rank: int, world: int, tmp: str, kwargs: dict) -> None:
    torch.set_num_threads(1)  # two ranks share two cores
    out = Path(tmp)
    try:
        dist.init_process_group("gloo", init_method=f"file://{out}/store", rank=rank, world_size=world)
        result = globals()[fn_name](rank, world, **kwargs)
        torch.save(result, out / f"rank{rank}.pt")
    except BaseException:
        (out / f"rank{rank}.err").write_text(traceback.format_exc())
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(fn, world: int, tmp_path: Path, **kwargs) -> list:
    """Run fn(rank, world, **kwargs) on `world` gloo ranks; their return values, by rank."""
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_rank_main, args=(fn.__name__, r, world, str(tmp_path), kwargs))
             for r in range(world)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + TIMEOUT_S
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.terminate()
            p.join(5)
    errors = [(tmp_path / f"rank{r}.err").read_text() for r in range(world) if (tmp_path / f"rank{r}.err").exists()]
    if errors:
        pytest.fail("a rank failed:\n" + "\n".join(errors), pytrace=False)
    if hung:
        pytest.fail(f"ranks {hung} still running after {TIMEOUT_S} s", pytrace=False)
    bad = [(r, p.exitcode) for r, p in enumerate(procs) if p.exitcode != 0]
    assert not bad, f"ranks exited with {bad}"
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(world)]


# ----------------------------------------------------------------------------- what ranks run


def tiny_model(num_layers: int = 2):
    torch.manual_seed(0)  # the same weights on every rank
    return build_model(preset("llama-tiny").replace(num_layers=num_layers))


def batch(masked: bool):
    g = torch.Generator().manual_seed(1)
    vocab = preset("llama-tiny").vocab_size
    ids = torch.randint(0, vocab, (B, T), generator=g)
    targets = torch.randint(0, vocab, (B, T), generator=g)
    if masked:  # micro-batches of 2 rows hold 32, 19, 2 and 25 targets: each weighs by its count
        for row, keep in enumerate((16, 16, 3, 16, 0, 2, 9, 16)):
            targets[row, keep:] = IGNORE_INDEX
    return ids, targets


def _parity(rank: int, world: int, *, schedule: str, masked: bool, optimizer_step: bool, num_layers: int = 2) -> dict:
    ids, targets = batch(masked)
    reference = tiny_model(num_layers)
    loss_sum, count = causal_lm_loss(reference, ids, targets)
    (loss_sum / count).backward()
    runner = PipelineRunner(tiny_model(num_layers), pp_group=dist.group.WORLD, n_microbatches=MICRO, schedule=schedule)
    metrics = runner.step(ids, targets)
    by_name = dict(reference.named_parameters(remove_duplicate=False))
    result = {
        "metrics": metrics, "reference_loss": float(loss_sum.detach() / count), "reference_count": int(count),
        "names": sorted(n for n, _ in runner.module.named_parameters()),
        "grad_diff": {n: float((p.grad - by_name[n].grad).abs().max()) for n, p in runner.module.named_parameters()},
        "grad_scale": {n: float(by_name[n].grad.abs().max()) for n, _ in runner.module.named_parameters()},
    }
    if optimizer_step:
        result["norm"] = runner.clip_grad_norm_(0.0)
        # in float64: torch's fp32 CPU norm of the 131k-element embedding is itself 1e-5 off
        result["reference_norm"] = float(sum(p.grad.double().pow(2).sum() for p in reference.parameters()).sqrt())
        stage_opt = torch.optim.AdamW(runner.module.parameters(), lr=LR, eps=ADAMW_EPS)
        reference_opt = torch.optim.AdamW(reference.parameters(), lr=LR, eps=ADAMW_EPS)
        stage_opt.step()
        reference_opt.step()
        result["weight_diff"] = {n: float((p - by_name[n]).detach().norm()) for n, p in runner.module.named_parameters()}
        result["weight_norm"] = {n: float(by_name[n].detach().norm()) for n, _ in runner.module.named_parameters()}
        result["tied"] = runner.tied_weight.detach().clone()
        # a second step, on batches of another shape (the schedule is rebuilt for them)
        stage_opt.zero_grad()
        reference_opt.zero_grad()
        result["second_loss"] = runner.step(ids[:4, :8], targets[:4, :8])["loss"]
        second_sum, second_count = causal_lm_loss(reference, ids[:4, :8], targets[:4, :8])
        result["reference_second_loss"] = float(second_sum.detach() / second_count)
        full = runner.gather_state_dict()
        if full is not None:
            expected = reference.state_dict()
            assert set(full) == set(expected), set(full) ^ set(expected)
            result["export_diff"] = {k: float((full[k] - expected[k]).norm()) for k in expected}
            result["export_norm"] = {k: float(expected[k].norm()) for k in expected}
    return result


def _two_steps_accumulate(rank: int, world: int) -> dict:
    """Two steps before an optimiser step: each normalised by its own count, gradients added."""
    ids, targets = batch(masked=True)
    reference = tiny_model()
    runner = PipelineRunner(tiny_model(), n_microbatches=2, schedule="1f1b")
    for rows in (slice(0, 4), slice(4, 8)):
        loss_sum, count = causal_lm_loss(reference, ids[rows], targets[rows])
        (loss_sum / count).backward()
        runner.step(ids[rows], targets[rows])
    by_name = dict(reference.named_parameters(remove_duplicate=False))
    return {"grad_diff": {n: float((p.grad - by_name[n].grad).abs().max()) for n, p in runner.module.named_parameters()},
            "grad_scale": {n: float(by_name[n].grad.abs().max()) for n, _ in runner.module.named_parameters()}}


def _data_parallel_count(rank: int, world: int) -> dict:
    """pp=1 on each rank, dp=2: each rank its half of the batch, normalised by the global count."""
    ids, targets = batch(masked=True)
    reference = tiny_model()
    loss_sum, count = causal_lm_loss(reference, ids, targets)
    (loss_sum / count).backward()
    pp_group = dist.new_group([rank], use_local_synchronization=True)
    runner = PipelineRunner(tiny_model(), pp_group=pp_group, n_microbatches=2, schedule="gpipe",
                            dp_group=dist.group.WORLD)
    rows = slice(rank * B // 2, (rank + 1) * B // 2)
    metrics = runner.step(ids[rows], targets[rows])
    grads = {n: p.grad.clone() for n, p in runner.module.named_parameters()}
    for g in grads.values():
        dist.all_reduce(g)  # what the data-parallel wrapper does
    by_name = dict(reference.named_parameters())
    return {"metrics": metrics, "reference_loss": float(loss_sum.detach() / count), "reference_count": int(count),
            "grad_diff": {n: float((g - by_name[n].grad).abs().max()) for n, g in grads.items()},
            "grad_scale": {n: float(by_name[n].grad.abs().max()) for n in grads}}


# ----------------------------------------------------------------------------- tests

TWO_RANK_SCENARIOS = {  # one spawn runs them all: starting ranks costs more than the runs
    "gpipe": ("_parity", dict(schedule="gpipe", masked=False, optimizer_step=False)),
    "1f1b": ("_parity", dict(schedule="1f1b", masked=False, optimizer_step=False)),
    "uneven": ("_parity", dict(schedule="gpipe", masked=True, optimizer_step=False)),
    "adamw": ("_parity", dict(schedule="1f1b", masked=True, optimizer_step=True)),
    "data_parallel": ("_data_parallel_count", {}),
    "two_steps": ("_two_steps_accumulate", {}),
}


def _scenarios(rank: int, world: int, *, scenarios: dict) -> dict:
    """Each scenario's result, or its traceback (so one broken scenario fails its own test)."""
    results = {}
    for name, (fn_name, kwargs) in scenarios.items():
        try:
            results[name] = globals()[fn_name](rank, world, **kwargs)
        except Exception:
            results[name] = traceback.format_exc()
            break  # the other rank may be waiting in a collective this one left
    return results


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    by_rank = run_ranks(_scenarios, 2, tmp_path_factory.mktemp("two_ranks"), scenarios=TWO_RANK_SCENARIOS)

    def results(name: str) -> list[dict]:
        found = [r.get(name, "not run: an earlier scenario failed") for r in by_rank]
        failed = [f"rank {rank}:\n{r}" for rank, r in enumerate(found) if isinstance(r, str)]
        if failed:
            pytest.fail("\n".join(failed), pytrace=False)
        return found

    return results


def assert_grads_match(r: dict) -> None:
    """Every gradient entry within reorder_tol of its tensor's largest (conftest), the tied copies too."""
    bad = {n: (d, r["grad_scale"][n]) for n, d in r["grad_diff"].items() if d > reorder_tol(r["grad_scale"][n], *STEP)}
    assert not bad, bad


def check_parity(results: list[dict]) -> None:
    for r in results:  # the loss, on every rank, is the whole batch's
        assert r["metrics"]["count"] == r["reference_count"]
        assert r["metrics"]["loss"] == approx_reordered(r["reference_loss"], FORWARD)
    first, last = results[0], results[-1]
    assert "embed_tokens.weight" in first["names"] and "layers.0.attn.q_proj.weight" in first["names"]
    assert not any(n.startswith(("layers.1.", "norm.", "lm_head.")) for n in first["names"])
    assert "lm_head.weight" in last["names"] and "norm.weight" in last["names"]
    assert not any(n.startswith(("layers.0.", "embed_tokens.")) for n in last["names"])
    for middle in results[1:-1]:
        assert middle["names"] and all(n.startswith("layers.") for n in middle["names"])
    for r in results:  # every parameter's gradient, the tied copies included (both halves summed)
        assert_grads_match(r)


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_two_stages_match_one_process(two_ranks, schedule):
    check_parity(two_ranks(schedule))


def test_uneven_target_counts_per_micro_batch(two_ranks):
    results = two_ranks("uneven")
    assert results[0]["metrics"]["count"] == 78
    check_parity(results)


def test_adamw_step_matches_and_tied_copies_agree(two_ranks):
    results = two_ranks("adamw")
    check_parity(results)
    params = sum(p.numel() for p in tiny_model().parameters())
    # one AdamW step (no clipping) apart by its drift in 2-norm (conftest.adamw_drift), and a rounding
    drift = adamw_drift([LR], [results[0]["reference_norm"]], STEP, grad_clip=0)
    for r in results:  # the tied weight counted once: a norm over every parameter
        assert r["norm"] == approx_reordered(r["reference_norm"], STEP + (params,))
        bad = {n: d for n, d in r["weight_diff"].items() if d > drift + FP32_EPS * r["weight_norm"][n]}
        assert not bad, (drift, bad)
    assert torch.equal(results[0]["tied"], results[1]["tied"])
    for r in results:  # after one step, on a batch of 4 x 8
        assert r["second_loss"] == approx_reordered(r["reference_second_loss"], STEP + decoder_lengths(CONFIG, 8) + (32,))
    export = results[0]["export_diff"]
    assert all(d <= drift + FP32_EPS * results[0]["export_norm"][k] for k, d in export.items()), export
    assert "export_diff" not in results[1]


def test_target_count_is_summed_over_data_parallel_ranks(two_ranks):
    for r in two_ranks("data_parallel"):
        assert r["metrics"]["count"] == r["reference_count"] == 78
        assert r["metrics"]["loss"] == approx_reordered(r["reference_loss"], FORWARD)
        assert_grads_match(r)


def test_gradients_of_two_steps_add_up(two_ranks):
    for r in two_ranks("two_steps"):  # the tied copies too: only each step's own part is summed
        assert_grads_match(r)


def test_three_stages_with_a_middle_stage(tmp_path):
    results = run_ranks(_parity, 3, tmp_path, schedule="1f1b", masked=True, optimizer_step=False, num_layers=3)
    assert [r["names"][-1] for r in results] == ["layers.0.mlp_norm.weight", "layers.1.mlp_norm.weight",
                                                  "norm.weight"]
    check_parity(results)


def test_split_blocks():
    assert split_blocks(2, 1) == [(0, 2)]
    assert split_blocks(2, 2) == [(0, 1), (1, 2)]
    assert split_blocks(8, 4) == [(0, 2), (2, 4), (4, 6), (6, 8)]
    assert split_blocks(10, 4) == [(0, 3), (3, 6), (6, 8), (8, 10)]  # the earlier stages take the extra blocks
    assert split_blocks(7, 7) == [(i, i + 1) for i in range(7)]
    with pytest.raises(TemperError, match=r"^parallel.pp=8 is more than the model's 2 blocks$"):
        split_blocks(2, 8)
    with pytest.raises(TemperError, match="at least 1"):
        split_blocks(2, 0)


def test_run_blocks_in_slices_equals_the_forward():
    model = tiny_model()
    ids = torch.randint(0, 100, (2, 8))
    with torch.no_grad():
        x = model.input_embeddings(ids)
        positions, mask, causal = model._attention_inputs(8, x.device, None, None, None)
        x, rope = model._position_inputs(x, positions)
        inputs = AttentionInputs(mask, causal, None, rope)
        sliced = model.run_blocks(model.run_blocks(x, inputs, 0, 1), inputs, 1, 2)
        assert torch.equal(model.final_norm(sliced), model(ids, return_hidden=True))
        assert torch.equal(model.run_blocks(x, inputs), sliced)


@pytest.mark.parametrize("name", ["llama-tiny", "gpt2-tiny"])
def test_stages_chained_in_one_process_equal_the_model(name):
    torch.manual_seed(0)
    model = build_model(preset(name).replace(num_layers=4))
    ids = torch.randint(0, 100, (2, 8))
    with torch.no_grad():
        expected = model(ids, return_hidden=True)
        stages = [build_stage(copy.deepcopy(model), rank, 3) for rank in range(3)]
        assert [(s.start, s.stop) for s in stages] == [(0, 2), (2, 3), (3, 4)]
        assert torch.equal(stages[2](stages[1](stages[0](ids))), expected)
    # the freed parts are on the meta device; what a stage holds is real
    first_model, middle_model, last_model = (s.decoder for s in stages)
    assert all(p.is_meta for p in last_model.blocks[0].parameters())
    assert all(p.is_meta for p in first_model.blocks[2].parameters()) and first_model.final_norm.weight.is_meta
    assert middle_model.input_embeddings.weight.is_meta and middle_model.lm_head.weight.is_meta
    assert not any(p.is_meta for s in stages for p in s.parameters())
    assert last_model.lm_head.weight is last_model.input_embeddings.weight  # the tied copy stays on the last stage
    if name == "gpt2-tiny":  # learned positions live on the first stage only
        assert "wpe.weight" in dict(stages[0].named_parameters()) and last_model.wpe.weight.is_meta


def test_runner_refuses_masks_and_bad_settings(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        with pytest.raises(TemperError, match="gpipe, 1f1b"):
            PipelineRunner(tiny_model(), n_microbatches=2, schedule="zero-bubble")
        runner = PipelineRunner(tiny_model(), n_microbatches=2, schedule="gpipe")
        ids, targets = batch(masked=False)
        with pytest.raises(TemperError, match="pretraining windows"):
            runner.step(ids, targets, mask=torch.ones(1, 1, T, T, dtype=torch.bool))
        with pytest.raises(TemperError, match="does not split into"):
            runner.step(ids[:3], targets[:3])
        with pytest.raises(TemperError, match="every target is masked"):
            runner.step(ids, torch.full_like(targets, IGNORE_INDEX))
        assert runner.step(ids, targets)["count"] == B * T  # one stage: the plain model
    finally:
        dist.destroy_process_group()


def test_stage_is_a_plain_module_of_the_models_pieces():
    model = tiny_model()
    stage = DecoderStage(model, 0, 2, is_first=True, is_last=True)
    assert stage.embed_tokens is model.embed_tokens and stage.layers["1"] is model.layers[1]
    assert set(stage.state_dict()) == set(model.state_dict())
    assert "forward" not in vars(model)  # nothing patched
