"""What scores a model's responses: judges (a rule, a regex, a callable, an LLM judge, a reward
model; `judges`), AI feedback that revises a response against a written constitution
(`feedback`), and reward functions with TRL's calling convention, weighted into one reward per
completion (`functions`: shipped checkers, your own callables, any judge). Online DPO rounds,
`temper eval judge=` and RL recipes all take their scores from here."""
