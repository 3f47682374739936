"""lora-llava serve: an OpenAI-compatible API and a chat page for a run folder, checkpoint or export."""

from __future__ import annotations

import argparse
import os

from ..errors import UsageError
from .common import positive_int
from .infer import model_args

__all__ = ["cmd_serve", "serve_args"]


def cmd_serve(args) -> int:
    """Serve PATH (a run folder, checkpoint or export, loaded as 'chat' loads it) over HTTP until Ctrl+C.

    POST /v1/chat/completions speaks OpenAI's chat-completions protocol (text and image_url parts, one image per
    conversation as a data: URI; stream: true for server-sent events); GET /v1/models, GET /health; a chat page at /.
    Answers are greedy unless the request sets a temperature. Binds 127.0.0.1 unless --host says otherwise.
    """
    from pathlib import Path

    try:
        import uvicorn

        from ..serve.app import create_app
    except ImportError as e:
        raise UsageError(f"serve needs the 'serve' extra: pip install 'lora-llava[serve]' ({e.name} is missing)") \
            from None
    from ..infer.load import load_for_inference
    from ..serve import Engine, Limits
    from .infer import check_template

    check_template(args.template)

    api_key = None
    if args.api_key_env:
        api_key = os.environ.get(args.api_key_env)
        if not api_key:
            raise UsageError(f"--api-key-env {args.api_key_env}: that environment variable is not set or empty")
    if args.image_root is not None and not Path(args.image_root).is_dir():
        raise UsageError(f"--image-root '{args.image_root}' is not a folder")
    loaded = load_for_inference(args.path, device=args.device, bits=args.bits)
    template = args.template or loaded.template
    engine = Engine(loaded.model, loaded.processor, template, loaded.image_aspect_ratio, max_batch=args.max_batch)
    name = args.model_name or Path(args.path).resolve().name
    limits = Limits(max_tokens=args.max_new_tokens, image_root=Path(args.image_root) if args.image_root else None)
    app = create_app(engine, name, limits, api_key, info={"template": template, "kind": loaded.kind})
    where = f"http://{args.host}:{args.port}"
    print(f"serving {name} ({loaded.kind}, template {template}) at {where}/  (API: {where}/v1/chat/completions"
          f"{', key required' if api_key else ''}); Ctrl+C stops", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    engine.close()
    return 0


def serve_args(p: argparse.ArgumentParser) -> None:
    model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=positive_int, default=8000, help="port (default 8000)")
    p.add_argument("--max-batch", type=positive_int, default=8, metavar="N",
                   help="answer up to N waiting requests together (default 8)")
    p.add_argument("--max-new-tokens", type=positive_int, default=512, metavar="N",
                   help="default and largest max_tokens of a request (default 512)")
    p.add_argument("--api-key-env", metavar="VAR",
                   help="require 'Authorization: Bearer KEY' with KEY read from this environment variable")
    p.add_argument("--image-root", metavar="DIR",
                   help="also accept file:// image URLs, for files under DIR only (default: data: URIs only)")
    p.add_argument("--model-name", metavar="NAME", help="the model id the API reports (default: the folder's name)")
