"""The step kinds the communication test runs on two processes and plans alike (tiny BERT, rows per process)."""

ROWS = 4
STEPS = {
    "plain": dict(chunk=None, loss={}),
    "token_budget": dict(chunk=None, budget=24, loss={}),
    "grad_cache": dict(chunk=2, loss={}),
}
