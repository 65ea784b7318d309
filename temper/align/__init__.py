"""Alignment from the policy's own samples: judges that score responses (`judges`), AI
feedback from a written constitution (`feedback`), and iterative (online) DPO rounds
(`online`, what `temper dpo rounds=N` runs)."""
