"""The reward-hacking watch: online methods (GRPO, PPO) warn and mark the log when the reward they
optimise climbs while a signal they do not optimise does not (a held-out pass rate, or the KL to the
reference passing a bound), or when completions drift far from the reference policy's length or
repetition.

    watch = RewardHackingWatch(cfg.watch)                 # cfg.watch: WatchConfig (the `watch.*` keys)
    watch.set_reference(mean_length)                      # at the first generation batch (kept on resume)
    loop = TrainLoop(..., state={"rollout": source, "watch": watch}, on_log=watch.observe)

`observe(row)` is fed every logged metrics row (evaluation results merged into it) and returns the
keys that join it. The rules, each decided again at every row with a reward:

- **reward_vs_heldout**: over the last `window` steps, the reward rose by at least `reward_rise`, and
  by at least `noise` standard errors, while the held-out signal (`heldout`: eval_pass_rate, or a
  second judge's score logged under any name) moved by at most `heldout_flat` (down counts too); and
  so at `patience` logged rows in a row (noise makes brief trends, hacking lasting ones). A trend is
  the Theil–Sen slope (the median of the slopes between every two points: one outlying row moves it
  little) times `window`; the reward's needs `min_points` logged rows inside the window, the
  held-out one two evaluations (the newest one before the window counts, so sparse evaluations still
  give a trend). The standard error is the residuals' root mean square (n − 2 degrees of freedom)
  over √Σ(step − mean step)²: an outlier can only raise it, i.e. quieten the watch. On pure noise
  (reward σ 0.05, pass rate σ 0.03, 80 rows) the defaults flag 1 run in 200; a rise of 0.24 per
  window with the pass rate falling is flagged in 96 of 100 within 50 steps (simulated, window 40).
- **length**: the median `completions/mean_length` of the last 3 logged rows is at least
  `length_factor` times the reference's, or at most 1/`length_factor` of it.
- **kl** (`max_kl` > 0; PPO's default 10): the reward's trend climbs as above (`reward_rise`, `noise`,
  `patience` rows in a row) while the median KL to the reference of the last 3 rows (`kl_key`: PPO's
  objective/kl, GRPO's kl) is above `max_kl`: reward bought far from the reference.
- **repetition**: the median `completions/repetition_rate` (the share of a completion's 3-grams that
  repeat, `repetition_rate`) of the last 3 rows exceeds the reference's (the first rollout's) by
  `repetition_drift` or more. Rows without it (GRPO logs none) never hold it.

Keys added to a row: `hacking/reward_rise` and `hacking/heldout_rise` (the two trends) and
`hacking/reward_vs_heldout` (bool) once both trends exist, `hacking/length_ratio` once a
reference length is known, `hacking/kl_over_bound` (bool) when the kl rule is on and judged,
`hacking/repetition_drift` once a reference repetition rate is known, and `hacking`: the conditions holding at this row, comma-joined ("" for
none). The first time each condition holds, one warning line says so (never again in the run,
resumes included). The state is JSON-able (plain lists and floats) and goes in the checkpoint.
"""

from __future__ import annotations

import math
import statistics
import warnings
from dataclasses import dataclass
from typing import Any

from temper.config import check_range, opt

CONDITIONS = ("reward_vs_heldout", "length", "kl", "repetition")
LENGTH_ROWS = 3  # logged rows whose median length is compared with the reference's


@dataclass
class WatchConfig:
    enabled: bool = opt(True, "watch for reward hacking (false: no hacking/* keys, no warnings)")
    heldout: str = opt("eval_pass_rate", "the metric that should climb with the reward: the held-out pass "
                                         "rate, or a second judge's score")
    window: int = opt(100, "steps over which the reward's and the held-out signal's trends are compared")
    min_points: int = opt(4, "logged rows inside the window needed before the reward's trend is judged")
    reward_rise: float = opt(0.1, "a rise of the reward over the window of at least this (reward units) ...")
    noise: float = opt(3.0, "... and of at least this many standard errors of the trend counts as climbing")
    patience: int = opt(3, "logged rows in a row the reward must climb while the held-out signal does not before "
                           "it is flagged")
    heldout_flat: float = opt(0.0, "the held-out signal does not climb when it moves by at most this over the "
                                   "window (down counts too)")
    length_factor: float = opt(2.0, "flag completions this many times longer than the reference's, or shorter by "
                                    "the same factor")
    max_kl: float = opt(0.0, "flag the reward climbing while the KL to the reference (PPO's objective/kl, GRPO's kl) "
                             "is above this bound (0: off)")
    repetition_drift: float = opt(0.25, "flag completions whose repetition rate (completions/repetition_rate, where "
                                        "logged) exceeds the reference's by this much")

    def validate(self) -> None:
        check_range("watch.window", self.window, low=1)
        check_range("watch.min_points", self.min_points, low=2)
        check_range("watch.reward_rise", self.reward_rise, low=0.0)
        check_range("watch.noise", self.noise, low=0.0)
        check_range("watch.patience", self.patience, low=1)
        check_range("watch.length_factor", self.length_factor, low=1.0, low_open=True)
        check_range("watch.max_kl", self.max_kl, low=0.0)
        check_range("watch.repetition_drift", self.repetition_drift, low=0.0, low_open=True)


def theil_sen(points: list[list[float]]) -> tuple[float, float]:
    """(slope, its standard error) of (x, y) points: the median of the pairwise slopes, and the
    residuals' root mean square around the line (n − 2 degrees of freedom) over √Σ(x − mean x)²
    (inf when the points share one x)."""
    slopes = [(y2 - y1) / (x2 - x1) for i, (x1, y1) in enumerate(points) for x2, y2 in points[i + 1:] if x2 != x1]
    slope = statistics.median(slopes) if slopes else 0.0
    residuals = [y - slope * x for x, y in points]
    centre = statistics.median(residuals)
    scatter = math.sqrt(sum((r - centre) ** 2 for r in residuals) / max(len(points) - 2, 1))
    mean_x = statistics.fmean(x for x, _ in points)
    spread = math.sqrt(sum((x - mean_x) ** 2 for x, _ in points))
    return slope, scatter / spread if spread else math.inf


def repetition_rate(tokens: list[int], n: int = 3) -> float:
    """The share of a completion's n-grams (token n-grams, n = 3 by default) that repeat an n-gram seen
    earlier in it: 0 for all-distinct text, toward 1 for a loop ("a b c a b c ..."); 0 when shorter than n."""
    grams = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
    return (len(grams) - len(set(grams))) / len(grams) if grams else 0.0


def _finite(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


class RewardHackingWatch:
    """See the module docstring. `reward_key`, `length_key`, `kl_key` and `repetition_key` name the row's
    metrics (TRL's GRPO names by default; PPO passes objective/scores and objective/kl); `main`: whether
    this process prints the warnings (rank 0)."""

    def __init__(self, cfg: WatchConfig, *, reward_key: str = "reward", length_key: str = "completions/mean_length",
                 kl_key: str = "kl", repetition_key: str = "completions/repetition_rate", main: bool = True) -> None:
        self.cfg, self.reward_key, self.length_key, self.main = cfg, reward_key, length_key, main
        self.kl_key, self.repetition_key = kl_key, repetition_key
        self.reference_length: float | None = None
        self.reference_repetition: float | None = None
        self.kls: list[float] = []  # the last LENGTH_ROWS KLs
        self.repetitions: list[float] = []  # the last LENGTH_ROWS repetition rates
        self.kl_streak = 0  # logged rows in a row at which the reward climbed with the KL above watch.max_kl
        self.rewards: list[list[float]] = []  # [step, reward] inside the window
        self.heldout: list[list[float]] = []  # [step, value] inside the window, and the newest one before it
        self.lengths: list[float] = []  # the last LENGTH_ROWS mean lengths
        self.warned: list[str] = []  # the conditions already warned about
        self.streak = 0  # logged rows in a row at which the reward climbed while the held-out signal did not

    def set_reference(self, mean_length: float, repetition: float | None = None) -> None:
        """The reference (initial) policy's mean completion length (and repetition rate); the first ones
        given are kept."""
        if self.reference_length is None:
            self.reference_length = float(mean_length)
        if self.reference_repetition is None and repetition is not None:
            self.reference_repetition = float(repetition)

    def observe(self, row: dict) -> dict:
        """Take one logged row (its `step`, the reward, the held-out signal, the mean length, each
        optional); return the keys to add to it (none when the watch is off or the row has neither a
        reward nor a length)."""
        if not self.cfg.enabled:
            return {}
        step = float(row["step"])
        heldout, reward, length = (_finite(row.get(k)) for k in (self.cfg.heldout, self.reward_key, self.length_key))
        if heldout is not None:
            self.heldout.append([step, heldout])
        if reward is not None:
            self.rewards.append([step, reward])
        if length is not None:
            self.lengths = [*self.lengths, length][-LENGTH_ROWS:]
        kl, repetition = _finite(row.get(self.kl_key)), _finite(row.get(self.repetition_key))
        if kl is not None:
            self.kls = [*self.kls, kl][-LENGTH_ROWS:]
        if repetition is not None:
            self.repetitions = [*self.repetitions, repetition][-LENGTH_ROWS:]
        self._prune(step)
        if reward is None and length is None:
            return {}
        out: dict[str, Any] = {}
        holding = []
        if reward is not None and len(self.rewards) >= self.cfg.min_points and len(self.heldout) >= 2:
            reward_slope, error = theil_sen(self.rewards)
            reward_rise = reward_slope * self.cfg.window
            heldout_rise = theil_sen(self.heldout)[0] * self.cfg.window
            climbs = (reward_rise >= self.cfg.reward_rise and reward_slope >= self.cfg.noise * error
                      and heldout_rise <= self.cfg.heldout_flat)
            self.streak = self.streak + 1 if climbs else 0
            holds = self.streak >= self.cfg.patience
            out.update({"hacking/reward_rise": reward_rise, "hacking/heldout_rise": heldout_rise,
                        "hacking/reward_vs_heldout": holds})
            if holds:
                holding.append("reward_vs_heldout")
                self._warn("reward_vs_heldout", f"step {row['step']}: the reward's trend is {reward_rise:+.3g} per "
                           f"{self.cfg.window} steps while {self.cfg.heldout}'s is {heldout_rise:+.3g}: the "
                           "policy may be gaming the reward (read its completions; check the reward functions)")
        if self.reference_length is not None and self.lengths:
            ratio = statistics.median(self.lengths) / max(self.reference_length, 1.0)
            out["hacking/length_ratio"] = ratio
            factor = self.cfg.length_factor
            if ratio >= factor or ratio <= 1 / factor:
                holding.append("length")
                self._warn("length", f"step {row['step']}: completions are {ratio:.3g}x the reference's mean length "
                           f"({statistics.median(self.lengths):.4g} vs {self.reference_length:.4g} tokens), beyond "
                           f"watch.length_factor={factor:g}: the policy may be gaming the reward with "
                           f"{'length' if ratio > 1 else 'brevity'}")
        if self.cfg.max_kl > 0 and reward is not None and kl is not None and len(self.rewards) >= self.cfg.min_points:
            reward_slope, error = theil_sen(self.rewards)
            kl_now = statistics.median(self.kls)
            climbs = (reward_slope * self.cfg.window >= self.cfg.reward_rise and reward_slope >= self.cfg.noise * error
                      and kl_now > self.cfg.max_kl)
            self.kl_streak = self.kl_streak + 1 if climbs else 0
            holds = self.kl_streak >= self.cfg.patience
            out["hacking/kl_over_bound"] = holds
            if holds:
                holding.append("kl")
                self._warn("kl", f"step {row['step']}: the reward's trend is {reward_slope * self.cfg.window:+.3g} per "
                           f"{self.cfg.window} steps while the KL to the reference is {kl_now:.4g}, above "
                           f"watch.max_kl={self.cfg.max_kl:g}: the policy may be buying reward far from the "
                           "reference (raise the KL coefficient, or set target_kl)")
        if self.reference_repetition is not None and self.repetitions:
            drift = statistics.median(self.repetitions) - self.reference_repetition
            out["hacking/repetition_drift"] = drift
            if drift >= self.cfg.repetition_drift:
                holding.append("repetition")
                self._warn("repetition", f"step {row['step']}: {statistics.median(self.repetitions):.3g} of the "
                           f"completions' 3-grams repeat, {drift:+.3g} over the reference's "
                           f"{self.reference_repetition:.3g} (watch.repetition_drift={self.cfg.repetition_drift:g}): "
                           "the policy may be gaming the reward with repetition")
        out["hacking"] = ",".join(holding)
        return out

    def _prune(self, step: float) -> None:
        start = step - self.cfg.window
        self.rewards = [p for p in self.rewards if p[0] > start]
        before = [p for p in self.heldout if p[0] <= start]
        self.heldout = before[-1:] + [p for p in self.heldout if p[0] > start]

    def _warn(self, condition: str, message: str) -> None:
        if condition in self.warned:
            return
        self.warned.append(condition)
        if self.main:
            warnings.warn(f"reward hacking? {message}; marked `hacking` in metrics.jsonl", UserWarning, stacklevel=3)

    def state_dict(self) -> dict:
        return {"reference_length": self.reference_length, "rewards": self.rewards, "heldout": self.heldout,
                "lengths": self.lengths, "warned": self.warned, "streak": self.streak,
                "reference_repetition": self.reference_repetition, "kls": self.kls,
                "repetitions": self.repetitions, "kl_streak": self.kl_streak}

    def load_state_dict(self, state: dict) -> None:
        self.reference_length = state["reference_length"]
        self.rewards = [list(p) for p in state["rewards"]]
        self.heldout = [list(p) for p in state["heldout"]]
        self.lengths = list(state["lengths"])
        self.warned = list(state["warned"])
        self.streak = int(state["streak"])
        # absent from checkpoints written before the KL and repetition rules
        self.reference_repetition = state.get("reference_repetition")
        self.kls = list(state.get("kls", []))
        self.repetitions = list(state.get("repetitions", []))
        self.kl_streak = int(state.get("kl_streak", 0))
