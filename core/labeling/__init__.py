"""Team labeling: labeler accounts, labeling batches and queues, a Gradio labeling server, agreement.

    store.py      the tables (in workbench.db), accounts, batches, assignment, validated submissions
    agreement.py  pairwise agreement and Kendall's tau between labelers (pure Python)
    passwords.py  scrypt hashes with a per-user salt
    batches.py    K answers per prompt sampled once (core.models.generate.sample) or read from a file
    server.py     the Gradio app (imports gradio; sign-in always, loopback by default)
    cli.py        `rlhf label ...`

Importing this package imports neither torch nor gradio.
"""
