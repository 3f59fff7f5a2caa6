"""`rlhf label ...`: team labeling from the command line.

    rlhf label add-user NAME [--password ...]          # prompts (twice) when --password is omitted
    rlhf label batch --name B [--prompts store|demo|FILE] [--limit N] [--model bundled] [--k 4]
                     [--temperature 1.0] [--overlap 0.2] [--per-overlap 2] [--labelers a,b]
    rlhf label batch --name B --answers answers.jsonl     # given answers: {"prompt", "responses": [...]}
    rlhf label serve [--host 127.0.0.1] [--port 7860]
    rlhf label status [--batch ID]                        # progress per labeler and agreement, as JSON

Building this parser imports neither torch nor gradio; each command imports what it needs.
"""

from __future__ import annotations

import getpass
import json
import sys


def _labeling():
    from core.data.store import Store
    from core.labeling.store import LabelingStore

    store = Store()
    return store, LabelingStore(store)


def cmd_add_user(args) -> int:
    _, labeling = _labeling()
    password = args.password
    if password is None:
        password = getpass.getpass(f"password for {args.name}: ")
        if getpass.getpass("again: ") != password:
            raise ValueError("the two passwords differ; nothing was stored")
    name = labeling.add_user(args.name, password)
    print(f"labeler {name} can sign in (password stored as a scrypt hash)")
    return 0


def cmd_batch(args) -> int:
    store, labeling = _labeling()
    labelers = [n.strip() for n in args.labelers.split(",") if n.strip()] if args.labelers else None
    if args.answers:
        from core.labeling.batches import read_answers_file

        result = labeling.create_batch(args.name, read_answers_file(args.answers), labelers, args.overlap,
                                       args.per_overlap, seed=args.seed)
    else:
        from core.data.sources import load_prompts
        from core.labeling.batches import sample_batch

        labeling.check_batch_options(args.name, labelers, args.overlap, args.per_overlap, args.k)
        prompts = load_prompts(args.prompts, store)
        if args.limit:
            prompts = prompts[:args.limit]
        result = sample_batch(store, args.name, prompts, args.model, args.k, args.temperature, labelers,
                              args.overlap, args.per_overlap, args.max_new_tokens, args.seed)
    for line in result.skipped:
        print(f"skipped {line}", file=sys.stderr)
    print(json.dumps({"batch_id": result.batch_id, "name": result.name, "items": result.items,
                      "overlap_items": result.overlap_items, "assignments": result.assignments,
                      "skipped": len(result.skipped)}))
    return 0


def cmd_serve(args) -> int:
    store, _ = _labeling()
    from core.labeling.server import LabelingServer

    server = LabelingServer(store)
    url = server.start(args.host, args.port)
    print(f"labeling server at {url} (sign-in required; Ctrl+C stops it)", flush=True)
    try:
        server.wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    return 0


def cmd_status(args) -> int:
    _, labeling = _labeling()
    print(json.dumps({"batches": labeling.list_batches(), "progress": labeling.progress(batch_id=args.batch),
                      "agreement": labeling.agreement(args.batch)}, indent=2))
    return 0


def add_parser(sub) -> None:
    """Register `rlhf label` on the main parser's sub-commands."""
    label = sub.add_parser("label", help="team labeling: accounts, batches, the Gradio labeling server, agreement")
    cmds = label.add_subparsers(dest="label_command", required=True)

    p = cmds.add_parser("add-user", help="create a labeler account (or set a new password)")
    p.add_argument("name")
    p.add_argument("--password", help="prompted for when omitted (better: it stays out of the shell history)")
    p.set_defaults(func=cmd_add_user)

    p = cmds.add_parser("batch", help="sample K answers per prompt once and assign them to labelers")
    p.add_argument("--name", required=True, help="batch name (letters, digits, . _ -)")
    p.add_argument("--prompts", default="store", help="'store', 'demo' or a JSONL/CSV file with a \"prompt\" column")
    p.add_argument("--limit", type=int, default=0, help="use only the first N prompts (0: all)")
    p.add_argument("--answers", help="given answers instead of sampling: JSONL/CSV with prompt and responses")
    p.add_argument("--model", default="bundled", help="checkpoint to sample from")
    p.add_argument("--k", type=int, default=4, help="answers sampled per prompt (2..9)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--overlap", type=float, default=0.2, help="share of items given to several labelers (agreement)")
    p.add_argument("--per-overlap", type=int, default=2, help="labelers per overlap item")
    p.add_argument("--labelers", help="comma-separated accounts (default: every active account)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_batch)

    p = cmds.add_parser("serve", help="serve the labeling UI (sign-in required; loopback by default)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback only)")
    p.add_argument("--port", type=int, default=7860)
    p.set_defaults(func=cmd_serve)

    p = cmds.add_parser("status", help="batches, progress per labeler and agreement, as JSON")
    p.add_argument("--batch", type=int, help="one batch's id (default: all)")
    p.set_defaults(func=cmd_status)
