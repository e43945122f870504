"""``rwkv-zoo serve`` as users run it: the command (in this process, on the main thread so that it
installs its signal handlers) on a free loopback port answers the openai client, and Ctrl-C (SIGINT)
stops it gracefully (a reply streaming at that moment is finished); its usage errors."""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
import urllib.request

from _deps import require

from rwkv_zoo import cli
from rwkv_zoo.generation import generate


def test_serve_answers_and_stops_on_ctrl_c(model, tok, capsys):
    openai = require("openai")
    require("uvicorn")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    seen: dict = {}
    main_done = threading.Event()

    def client_then_ctrl_c():
        try:
            deadline = time.monotonic() + 60
            while True:
                try:
                    with urllib.request.urlopen(url + "/health", timeout=5) as r:
                        seen["health"] = json.loads(r.read())
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)
            c = openai.OpenAI(base_url=url + "/v1", api_key="k1", timeout=30, max_retries=0)
            r = c.completions.create(model="v7-tiny", prompt="Hi", max_tokens=5, temperature=0,
                                     extra_body={"return_token_ids": True})
            seen["tokens"] = r.choices[0].model_extra["token_ids"]
            # Ctrl-C while a reply streams: the server stops taking connections but finishes the reply.
            stream = c.completions.create(model="v7-tiny", prompt="Go on", max_tokens=120, temperature=0,
                                          stream=True, extra_body={"return_token_ids": True})
            got = []
            for chunk in stream:
                got += chunk.choices[0].model_extra["token_ids"]
                if "sigint" not in seen:
                    seen["sigint"] = True
                    os.kill(os.getpid(), signal.SIGINT)  # what Ctrl-C sends
                finish = chunk.choices[0].finish_reason
            seen["streamed"] = (len(got), finish)
        except Exception as exc:
            seen["error"] = exc
        finally:
            if "sigint" not in seen and not main_done.is_set():
                os.kill(os.getpid(), signal.SIGINT)

    helper = threading.Thread(target=client_then_ctrl_c, daemon=True)
    helper.start()
    status = cli.main(["serve", "v7-tiny", "--port", str(port), "--max-batch", "2", "--api-key", "k1",
                       "--log-level", "warning"])
    main_done.set()
    helper.join(30)
    err = capsys.readouterr().err
    assert "error" not in seen, seen["error"]
    assert status == 0 and "server stopped" in err
    assert f"at {url}/v1" in err  # loopback unless told otherwise
    assert seen["health"]["model"] == "v7-tiny"
    assert seen["streamed"] == (120, "length")  # the reply running at Ctrl-C was finished, not cut
    # v7-tiny is built with seed 0 here and in the fixture: the same weights, so the same greedy tokens.
    assert seen["tokens"] == generate(model, tok.encode("Hi"), max_new_tokens=5, temperature=0).tokens


def test_serve_usage_errors(capsys):
    assert cli.main(["serve", "v7-tiny", "--max-batch", "0"]) == 2
    assert "--max-batch must be >= 1" in capsys.readouterr().err
    assert cli.main(["serve", "no/such/file.pth"]) == 2
    assert "no such file" in capsys.readouterr().err
