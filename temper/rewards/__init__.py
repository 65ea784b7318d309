"""What scores a model's responses: judges (a rule, a regex, a callable, an LLM judge, a reward
model; `judges`), AI feedback that revises a response against a written constitution
(`feedback`), and (from GRPO on) reward functions. Online DPO rounds, `temper eval judge=`
and RL recipes all take their scores from here."""
