"""temper curate engine=ray on a local Ray cluster: the same corpus, rejects and report as the
single-process run, MinHash deduplication across input shards included."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from temper.config import load_config
from temper.configs import shipped_path
from temper.curate import pipeline
from temper.data.world import WorldConfig, build_world
from temper.errors import TemperError
from temper.stages import curate as stage

ray = pytest.importorskip("ray", reason="engine=ray needs the ray extra (pip install 'temper[ray]')")


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray cluster (2 CPUs) for the module; a run joins it instead of starting its own."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def world_shards(tmp_path_factory) -> list[Path]:
    """The small noisy world's pretraining corpus cut into three input files: a planted near-duplicate
    and its original mostly sit in different shards."""
    cfg = WorldConfig(num_people=8, docs_per_person=10, docs_per_town=2, num_arithmetic_docs=40, num_dialogue_docs=40,
                      noise_fraction=0.2, num_sft_train=0, num_sft_test=0, num_pref_train=0, num_pref_test=0,
                      num_rl_train=0, num_rl_test=0, num_prm_train=0, num_prm_test=0)
    rows = build_world(cfg).splits["pretrain/train"]
    folder = tmp_path_factory.mktemp("shards")
    paths = []
    for k in range(3):
        path = folder / f"part-{k}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows[k::3]), encoding="utf-8")
        paths.append(path)
    return paths


def run(paths, out, *overrides: str) -> dict:
    data = "[" + ",".join(map(str, paths)) + "]"
    report = stage.run(load_config(stage.Config, shipped_path("curate-world"),
                                   [f"data={data}", f"output_dir={out}", "line_dedup.min_docs=3", *overrides]))
    report.pop("config")
    return report


def outputs(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*.jsonl"))}


@pytest.mark.parametrize("verify", [False, pytest.param(True, marks=pytest.mark.slow)])  # verify: also in test_curate
def test_ray_engine_writes_the_single_process_corpus(local_ray, world_shards, tmp_path, monkeypatch, verify):
    monkeypatch.setattr(pipeline, "WORKER_BATCH", 16)  # several Ray batches per shard
    extra = ["near_dedup.verify=true"] if verify else []
    local = run(world_shards, tmp_path / "local", *extra)

    def not_here(*args, **kwargs):
        raise AssertionError("engine=ray ran a local step")

    monkeypatch.setattr(pipeline, "_compute", not_here)  # the per-document steps and the banding run on Ray
    monkeypatch.setattr(pipeline, "lsh_buckets", not_here)
    on_ray = run(world_shards, tmp_path / "ray", "engine=ray", "workers=2", *extra)
    near = local["near_dedup"]
    assert near["clusters"] > 0 and local["rules"]["near_dedup"]["documents"] > 0  # there is something to find
    # the near-duplicates removed include pairs whose two documents were read from different shards
    rejected = [json.loads(line) for line in (tmp_path / "local" / "rejected" / "near_dedup.jsonl").open()]
    assert any(r["source"].rsplit(":", 1)[0] != r["duplicate_of"].rsplit(":", 1)[0] for r in rejected)
    assert on_ray == local
    assert outputs(tmp_path / "ray") == outputs(tmp_path / "local")
    for run_dir in (tmp_path / "local", tmp_path / "ray"):  # no staging file or signature map stays behind
        assert not [p.name for p in run_dir.iterdir() if ".tmp-" in p.name or p.name.startswith(".staging")]


def test_ray_lsh_buckets_equal_numpy_banding(local_ray):
    from temper.curate.ray_engine import lsh_buckets as ray_buckets

    rng = np.random.default_rng(0)
    sig = rng.integers(0, 1 << 63, size=(300, 12), dtype=np.uint64)
    for dup, of in [(5, 200), (17, 3), (150, 3), (299, 0), (100, 101)]:  # equal signatures: every band collides
        sig[dup] = sig[of]
    for doc, of, band in [(40, 41, 0), (42, 41, 2), (250, 7, 1), (251, 8, 1)]:  # one band in common
        sig[doc, band * 4:(band + 1) * 4] = sig[of, band * 4:(band + 1) * 4]
    sig[251, 4:8] = sig[7, 4:8]  # 250, 251 and 7 share band 1; 8's band 1 differs now
    expected = [m.tolist() for m in pipeline.lsh_buckets(sig, 3, 4)]
    assert len(expected) >= 3 * 5  # the planted buckets (each full duplicate collides in all three bands)
    assert [m.tolist() for m in ray_buckets(sig, 3, 4, ray=local_ray)] == expected


def test_ray_engine_bad_input_is_one_line(local_ray, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a fine first document of several words here"}\n{"text": oops}\n', encoding="utf-8")
    with pytest.raises(TemperError, match=rf"^{bad}:2: not valid JSON"):
        run([bad], tmp_path / "out", "engine=ray")
    assert not (tmp_path / "out" / "data").exists()


def test_engine_and_ray_address_are_checked():
    with pytest.raises(TemperError, match="engine must be local or ray; got 'spark'"):
        load_config(stage.Config, None, ["data=x.jsonl", "engine=spark"])
    with pytest.raises(TemperError, match="ray_address is used only with engine=ray"):
        load_config(stage.Config, None, ["data=x.jsonl", "ray_address=auto"])


@pytest.mark.slow  # two Ray start-ups; a bad row's one line with Ray: test_ray_engine_bad_input_is_one_line
def test_cli_engine_ray_starts_its_own_ray_fails_in_one_line_and_resumes(tmp_path):
    """`temper curate engine=ray` as a user runs it (a local Ray started and stopped by the run): a bad
    row in the third file fails the run with one line; the rerun reads the two finished files back."""
    import subprocess
    import sys

    prose = ("The river runs past the old mill and the farmers bring their grain to it every week. "
             "People in the town say the water has shaped their lives for as long as anyone remembers.")
    a, b, c = (tmp_path / f"{k}.jsonl" for k in "abc")
    a.write_text(json.dumps({"text": prose}) + "\n" + json.dumps({"text": "Please mail bob@example.org about the river walk and the market on the square."}) + "\n")
    b.write_text(json.dumps({"text": prose}) + "\n")
    c.write_text(json.dumps({"text": "fine"}) + "\n{not json\n")
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "temper", "curate", f"data=[{a},{b},{c}]", f"output_dir={out}", "engine=ray",
           "workers=2", "gopher_quality.enabled=false", "c4.enabled=false", "fineweb.enabled=false",
           "gopher_repetition.top_ngram_fracs=[0,0,0]"]
    failed = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert failed.returncode == 2, failed.stderr[-2000:]
    assert failed.stderr.strip().splitlines() == [f"temper curate: error: {c}:2: not valid JSON (Expecting property "
                                                  "name enclosed in double quotes at column 2)"]
    assert len(list((out / ".work").glob("*.jsonl"))) == 2
    c.write_text(json.dumps({"text": "fine"}) + "\n")
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads((out / "report.json").read_text())
    assert report["input"]["files_resumed"] == [str(a), str(b)]
    assert report["kept"]["documents"] == 3 and report["rules"]["exact_dedup"]["documents"] == 1
    assert "<EMAIL>" in (out / "data" / "part-00000.jsonl").read_text()
