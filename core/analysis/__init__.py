"""Analysis: readers of finished and live runs. The Evaluate page's table (eval_table), the token
view of log pi - log pi_ref (token_kl), the Monitor's readers of metrics (monitor) and a pipeline's
results card (results).

Imports stages and below (it measures with core.stages.evaluate and reports through
core.stages.events); never runs, the CLI or the app.
"""
