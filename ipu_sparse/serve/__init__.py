"""``ipu-sparse serve``: an OpenAI-compatible HTTP server and the Lumi chat page.

``engine``: one served model (worker thread, bounded FIFO queue, bytes/FLOPs figures).
``protocol``: request checks, response bodies and errors in the OpenAI shape.
``app``: the Starlette application. ``server``: uvicorn in the foreground or on a thread.
``static/``: the chat page (plain HTML, CSS and JavaScript, no build step, no external assets).
Needs the ``serve`` extra (starlette, uvicorn).
"""
