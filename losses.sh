#!/bin/bash
# the first 20 DPO steps on the built-in world's pairs, old (wt-base) vs new (this branch), padded and packed
set -e
for layout in false true; do
  for tree in /work/wt-base /work/wt-dpo; do
    out=/tmp/dpo_prof/loss_$(basename $tree)_pf$layout
    rm -rf $out
    (cd $tree && PYTHONPATH=$tree nice -n 5 python -m temper dpo model=/tmp/dpo_work/model \
      data=/tmp/dpo_work/world/preference/train.jsonl output_dir=$out max_steps=20 batch_size=4 \
      padding_free=$layout precision=fp32 eval_fraction=0 seed=0 logging.every=1 logging.eval_every=0 \
      logging.eval_at_start=false logging.progress=false checkpoint.every=0 > $out.log 2>&1)
  done
  python - "$layout" <<'PY'
import json, sys
layout = sys.argv[1]
rows = [[json.loads(l) for l in open(f"/tmp/dpo_prof/loss_{t}_pf{layout}/metrics.jsonl") if '"loss"' in l] for t in ("wt-base", "wt-dpo")]
a = [r["loss"] for r in rows[0] if "step" in r][:20]; b = [r["loss"] for r in rows[1] if "step" in r][:20]
print(f"padding_free={layout}: {len(a)} vs {len(b)} steps, max |loss gap| {max(abs(x - y) for x, y in zip(a, b)):.2e}; base {a[:3]}... branch {b[:3]}...")
PY
done
