"""`lemoe serve` through an in-process HTTP client on a tiny model: every endpoint, streaming, auth, bad
input, an edit then a completion that uses it, rollback, restart after a kill, a read-only follower."""

from __future__ import annotations

import copy
import json
import time

import pytest

pytest.importorskip("fastapi")  # the extra lemoe[serve]; dev installs it, so CI runs every test below
from fastapi.testclient import TestClient  # noqa: E402

from conftest import make_model, records, tiny_config, tiny_tokenizer  # noqa: E402
from lemoe import persistence  # noqa: E402
from lemoe.cli import main  # noqa: E402
from lemoe.server import Limits, create_app, serve_model  # noqa: E402

CHAT_TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
                 "{% if add_generation_prompt %}<assistant>{% endif %}")
KEY = "s3cret"


def _tokenizer():
    tok = copy.deepcopy(tiny_tokenizer())
    tok.chat_template = CHAT_TEMPLATE
    return tok


def _served(directory, follow=False):
    return serve_model(make_model("llama"), _tokenizer(), directory, "tiny", follow=follow,
                       config=None if follow else tiny_config(max_steps=40))


@pytest.fixture
def served(tmp_path):
    served = _served(tmp_path / "adapter")
    yield served
    served.close()


@pytest.fixture
def client(served):
    return TestClient(create_app(served, limits=Limits(max_tokens=32, max_edits=4, max_body_bytes=4096)))


def _edit_body(recs):
    return {"edits": [r.to_dict() for r in recs]}


def _complete(client, prompt, tokens=4, **extra):
    response = client.post("/v1/completions", json={"prompt": prompt, "max_tokens": tokens, "temperature": 0,
                                                     **extra})
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]


def test_models_and_health(client):
    assert client.get("/v1/models").json()["data"][0]["id"] == "tiny"
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["experts"] == 0 and health["read_only"] is False


def test_an_edit_is_saved_before_the_reply_and_the_next_completion_uses_it(client, served, tmp_path):
    target = records(2)[0]
    before = _complete(client, target.prompt)
    assert before[MISSING_EXPERT] is None
    response = client.post("/v1/edits", json=_edit_body(records(2)))
    assert response.status_code == 200, response.text
    report = response.json()
    assert report["expert"] == 0 and report["edits_total"] == 2
    saved, _ = persistence.load_adapter(tmp_path / "adapter")  # on disk when the client hears of it
    assert len(saved.edits) == 2
    after = _complete(client, target.prompt, tokens=8)
    assert after[MISSING_EXPERT] == 0 and after["text"].strip().startswith(target.target)
    page = client.get("/v1/edits", params={"offset": 1, "limit": 1}).json()
    assert page["total"] == 2 and [e["index"] for e in page["data"]] == [1] and page["data"][0]["expert"] == 0


MISSING_EXPERT = "lemoe_expert"


def test_chat_and_streaming(client):
    response = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Who wrote it?"}],
                                                          "max_tokens": 5, "temperature": 0})
    body = response.json()
    assert response.status_code == 200 and body["object"] == "chat.completion"
    text = body["choices"][0]["message"]["content"]
    assert body["usage"]["completion_tokens"] <= 5
    with client.stream("POST", "/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "Who wrote it?"}], "max_tokens": 5, "temperature": 0,
            "stream": True}) as streamed:
        lines = [line for line in streamed.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant"}
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == text
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    with client.stream("POST", "/v1/completions", json={"prompt": "the quick brown", "max_tokens": 6,
                                                        "temperature": 0, "stream": True}) as streamed:
        pieces = [json.loads(line[6:]) for line in streamed.iter_lines()
                  if line.startswith("data: ") and line != "data: [DONE]"]
    assert "".join(p["choices"][0]["text"] for p in pieces) == _complete(client, "the quick brown", 6)["text"]


def test_stop_strings_and_seeded_sampling(client):
    free = _complete(client, "the quick brown", 8)["text"]
    assert len(free) > 2
    stop = free[1:3]
    stopped = _complete(client, "the quick brown", 8, stop=[stop])
    assert stopped["finish_reason"] == "stop" and stop not in stopped["text"] and free.startswith(stopped["text"])
    sample = {"prompt": "the quick brown", "max_tokens": 8, "temperature": 1.0, "seed": 7}
    first = client.post("/v1/completions", json=sample).json()["choices"][0]["text"]
    assert client.post("/v1/completions", json=sample).json()["choices"][0]["text"] == first


def test_rollback_removes_the_expert_from_answers(client):
    assert client.post("/v1/edits", json=_edit_body(records(2))).status_code == 200
    assert client.post("/v1/edits", json=_edit_body(records(2, offset=2))).status_code == 200
    rolled = client.post("/v1/edits/rollback", json={"batches": 1}).json()
    assert rolled["removed_edits"] == 2 and rolled["experts"] == 1
    assert _complete(client, records(4)[2].prompt)[MISSING_EXPERT] in (None, 0)
    bad = client.post("/v1/edits/rollback", json={"batches": 5})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "batches"


@pytest.mark.parametrize("path, body, param", [
    ("/v1/completions", {"prompt": "hi", "max_tokens": 1000}, "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "temperature": -1}, "temperature"),
    ("/v1/completions", {"prompt": ""}, "prompt"),
    ("/v1/completions", {"max_tokens": 3}, "prompt"),
    ("/v1/completions", {"prompt": "hi", "n": 2}, "n"),
    ("/v1/completions", {"prompt": "hi", "model": "gpt-4"}, "model"),
    ("/v1/chat/completions", {"messages": []}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role"),
    ("/v1/edits", {"edits": [{"prompt": "Where?", "target": ""}]}, "edits"),
    ("/v1/edits", {"edits": [{"prompt": "Where?"}] * 5}, "edits"),
    ("/v1/edits", {"edits": []}, "edits"),
    ("/v1/edits/rollback", {"batches": -1}, "batches"),
])
def test_bad_requests_get_a_4xx_naming_the_field(client, path, body, param):
    response = client.post(path, json=body)
    assert 400 <= response.status_code < 500, response.text
    assert response.json()["error"]["param"] == param


def test_malformed_json_and_oversized_bodies_are_refused_and_nothing_is_saved(client, tmp_path):
    response = client.post("/v1/edits", content=b'{"edits": [', headers={"content-type": "application/json"})
    assert response.status_code == 400 and "error" in response.json()
    huge = client.post("/v1/completions", json={"prompt": "x" * 10_000})
    assert huge.status_code == 413
    assert not (tmp_path / "adapter" / persistence.WEIGHTS_NAME).exists()


def test_every_endpoint_needs_the_key_when_one_is_set(served):
    client = TestClient(create_app(served, api_key=KEY))
    for method, path, body in [("get", "/health", None), ("get", "/v1/models", None), ("get", "/v1/edits", None),
                               ("post", "/v1/completions", {"prompt": "hi", "max_tokens": 1}),
                               ("post", "/v1/edits/rollback", {"batches": 0})]:
        call = getattr(client, method)
        kwargs = {"json": body} if body else {}
        assert call(path, **kwargs).status_code == 401
        assert call(path, headers={"Authorization": "Bearer wrong"}, **kwargs).status_code == 401
        assert call(path, headers={"Authorization": f"Bearer {KEY}"}, **kwargs).status_code == 200


def test_a_kill_while_training_loses_only_that_batch(tmp_path, monkeypatch):
    directory = tmp_path / "adapter"
    first = _served(directory)
    client = TestClient(create_app(first))
    assert client.post("/v1/edits", json=_edit_body(records(2))).status_code == 200  # acknowledged
    monkeypatch.setattr(persistence, "_atomic_write_bytes", lambda *a: (_ for _ in ()).throw(OSError("killed")))
    failed = client.post("/v1/edits", json=_edit_body(records(2, offset=2)))
    assert failed.status_code == 500 and "not saved" in failed.json()["error"]["message"]
    assert client.get("/health").json()["experts"] == 1  # the unsaved expert is not served either
    monkeypatch.undo()
    restarted = _served(directory)  # a new process on the same directory
    again = TestClient(create_app(restarted))
    assert again.get("/health").json()["edits"] == 2
    target = records(1)[0]
    assert _complete(again, target.prompt)[MISSING_EXPERT] == 0


def test_a_follower_serves_the_writers_edits_read_only(tmp_path):
    directory = tmp_path / "adapter"
    writer = _served(directory)
    write = TestClient(create_app(writer))
    assert write.post("/v1/edits", json=_edit_body(records(2))).status_code == 200
    follower = _served(directory, follow=True)
    follower.close()  # poll by hand below instead of the background thread
    read = TestClient(create_app(follower))
    assert read.post("/v1/edits", json=_edit_body(records(2))).status_code == 403
    assert write.post("/v1/edits", json=_edit_body(records(2, offset=2))).status_code == 200
    assert follower.editor.reload(directory) is True and follower.editor.reload(directory) is False
    assert read.get("/health").json()["experts"] == 2
    assert _complete(read, records(4)[2].prompt)[MISSING_EXPERT] == _complete(write, records(4)[2].prompt)[
        MISSING_EXPERT]


def test_the_follower_thread_picks_up_a_replaced_adapter(tmp_path):
    directory = tmp_path / "adapter"
    writer = _served(directory)
    TestClient(create_app(writer)).post("/v1/edits", json=_edit_body(records(2)))
    follower = serve_model(make_model("llama"), _tokenizer(), directory, "tiny", follow=False)
    follower.read_only = True
    follower.follow(every=0.05)
    writer.edit(records(2, offset=2))
    deadline = time.time() + 30
    while follower.editor.num_experts != 2 and time.time() < deadline:
        time.sleep(0.05)
    follower.close()
    assert follower.editor.num_experts == 2


def test_serve_refuses_a_public_address_without_a_key(tmp_path, capsys):
    assert main(["serve", "--adapter", str(tmp_path / "a"), "--host", "0.0.0.0"]) == 2
    assert "--api-key" in capsys.readouterr().err


def test_an_adapter_made_for_another_model_is_refused(tmp_path):
    from lemoe import AdapterError

    directory = tmp_path / "adapter"
    TestClient(create_app(_served(directory))).post("/v1/edits", json=_edit_body(records(2)))
    with pytest.raises(AdapterError, match="another model|made for"):
        serve_model(make_model("llama", seed=1), _tokenizer(), directory, "tiny")
