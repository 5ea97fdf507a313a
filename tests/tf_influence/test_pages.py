"""The report and the served index page, opened in headless Chromium: what a person sees (test points,
examples, highlighted tokens), a query typed into the page, bad queries answered with their message, and a
server that keeps serving after malformed requests."""

import threading
import urllib.parse

import numpy as np
import pytest
import requests

from tests.browser import browser, screenshot


@pytest.fixture(scope="module")
def evidence(tmp_path_factory):
    from experiments.evidence_lm import EvidenceArgs, run
    out = tmp_path_factory.mktemp("evidence")
    return run(EvidenceArgs(out=str(out), sequences=96, length=24, width=16, layers=1, epochs=1, top=3))


@pytest.fixture(scope="module")
def server(evidence):
    from werkzeug.serving import make_server

    from tf_influence.serve import IndexService, ServeArgs, create_app
    service = IndexService(ServeArgs(index=evidence["index"], model=evidence["model"], data=evidence["data"],
                                     key_feature="key", top_k=3))
    srv = make_server("127.0.0.1", 0, create_app(service), threaded=True)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{srv.server_port}", service
    srv.shutdown()


@pytest.fixture(scope="module")
def driver():
    d = browser()
    yield d
    d.quit()


def test_report_in_a_browser(evidence, driver):
    from selenium.webdriver.common.by import By
    from experiments.evidence_lm import QUESTIONS
    driver.get("file://" + evidence["report"])
    points = driver.find_elements(By.CSS_SELECTOR, "section.test-point")
    assert len(points) == len(QUESTIONS)
    for p in points:       # top 3 each side, in the page as a person sees it
        assert len(p.find_elements(By.CSS_SELECTOR, ".example.helpful")) == 3
        assert len(p.find_elements(By.CSS_SELECTOR, ".example.harmful")) == 3
        assert p.find_element(By.CSS_SELECTOR, ".example.test").is_displayed()
    spans = driver.find_elements(By.CSS_SELECTOR, "span.tok.hl")
    assert spans and spans[0].is_displayed()
    assert "rgba" in spans[0].value_of_css_property("background-color")
    assert all(img.get_property("naturalWidth") > 0 for img in driver.find_elements(By.CSS_SELECTOR, "img.plot"))
    assert evidence["token_sum_error"] < 1e-5
    # each shown example carries the test completion coloured by what its tokens owe to it; the completion
    # tokens' shares (one solve per token) sum to the sequence's score
    assert len(driver.find_elements(By.CSS_SELECTOR, ".example .completion")) == 6 * len(QUESTIONS)
    assert driver.find_elements(By.CSS_SELECTOR, ".completion span.tok.hl")
    assert evidence["completion_split_error"] < 1e-4
    screenshot(driver, "report_lm.png")


def test_query_typed_into_the_page(server, driver):
    from selenium.webdriver.common.by import By
    url, service = server
    driver.get(url + "/")
    driver.find_element(By.ID, "prompt").send_keys("def ")
    driver.find_element(By.ID, "completion").send_keys("self")
    driver.find_element(By.ID, "ask").click()
    from selenium.webdriver.support.ui import WebDriverWait
    WebDriverWait(driver, 60).until(lambda d: d.find_elements(By.CSS_SELECTOR, ".example, #error"))
    assert not driver.find_elements(By.ID, "error"), driver.find_element(By.ID, "error").text
    assert len(driver.find_elements(By.CSS_SELECTOR, ".example.harmful")) == 3
    assert len(driver.find_elements(By.CSS_SELECTOR, ".example.helpful")) == 3
    assert driver.find_elements(By.CSS_SELECTOR, "span.tok.hl")
    screenshot(driver, "serve_answer.png")
    # the page's answer is the library's: the index queried with ∇ log p(completion | prompt)
    res = service.ask("def ", "self")
    shown = [e.text.split(" · ")[0] for e in driver.find_elements(By.CSS_SELECTOR, ".example.harmful .score")]
    assert shown == [k for k, *_ in res["harmful"]]
    # highlighted per-token terms sum to the exact (unprojected) score of each shown example
    import tensorflow as tf

    import tf_influence as tfi
    from tf_influence.gradients import GradientKernels
    x, y, _ = service.encode("def ", "self")
    q = GradientKernels.get(service.measure, service.projector.group).sum_grad(x, tf.constant(y)).numpy()
    feats = [f for _, _, f, _ in res["harmful"]]
    exact = tfi.per_example_dot(service.objective, tf.data.Dataset.from_tensor_slices(service._batch(feats)).batch(3),
                                service.projector.group, q)
    np.testing.assert_allclose([t.sum() for *_, t in res["harmful"]], exact, rtol=1e-5)


@pytest.mark.parametrize("prompt, completion, message", [
    ("def ", "", "the completion is empty"),
    ("", "self", "the prompt is empty"),
    ("déf ", "self", "does not have: 'é'"),
    ("x" * 30, "self", "the model reads at most 24"),
])
def test_bad_queries_get_their_message(server, driver, prompt, completion, message):
    from selenium.webdriver.common.by import By
    url, _ = server
    driver.get(url + "/query?" + urllib.parse.urlencode({"prompt": prompt, "completion": completion}))
    assert message in driver.find_element(By.ID, "error").text
    assert requests.get(url + "/api/query", params={"prompt": prompt, "completion": completion},
                        timeout=30).status_code == 400


def test_server_keeps_answering_after_malformed_requests(server):
    url, _ = server
    rng = np.random.default_rng(0)
    bad = [{"prompt": "", "completion": ""}, {"prompt": "\x00\x01", "completion": "ok"},
           {"completion": "only"}, {"prompt": "a" * 5000, "completion": "b"}, {"prompt": "é", "completion": "ü"}]
    codes = []
    for i in range(100):
        params = bad[i % len(bad)] if i % 2 else {"prompt": "".join(map(chr, rng.integers(0, 0x2FF, 8))),
                                                  "completion": "x"}
        codes.append(requests.get(url + "/api/query", params=params, timeout=30).status_code)
    codes.append(requests.get(url + "/nowhere", timeout=30).status_code)
    assert set(codes[:-1]) <= {200, 400} and codes[-1] == 404
    ok = requests.get(url + "/api/query", params={"prompt": "def ", "completion": "self"}, timeout=30)
    assert ok.status_code == 200 and len(ok.json()["harmful"]) == 3


def test_another_model_is_named_on_the_page(evidence, tmp_path):
    import keras
    from flask import Flask  # noqa: F401  (the app below is Flask's)

    from tf_influence.serve import IndexService, ServeArgs, create_app
    model = keras.models.load_model(evidence["model"], compile=False)
    model.set_weights([w + 0.01 for w in model.get_weights()])
    other = str(tmp_path / "other.keras")
    model.save(other)
    service = IndexService(ServeArgs(index=evidence["index"], model=other, data=evidence["data"], key_feature="key"))
    client = create_app(service).test_client()
    r = client.get("/query", query_string={"prompt": "def ", "completion": "self"})
    assert r.status_code == 400 and b"fingerprint" in r.data and b"rebuild the index" in r.data


def test_a_saved_results_test_points_are_asked_on_the_page(evidence, driver, tmp_path):
    """--result: the page lists the saved result's test points; picking one queries the index with that
    column of its test vector, placed on the index's parameters — the library's answer."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait
    from werkzeug.serving import make_server

    from tf_influence.serve import IndexService, ServeArgs, create_app
    saved = evidence["result"].save(str(tmp_path / "result"))
    service = IndexService(ServeArgs(index=evidence["index"], model=evidence["model"], data=evidence["data"],
                                     key_feature="key", top_k=3, result=saved))
    srv = make_server("127.0.0.1", 0, create_app(service), threaded=True)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        driver.get(f"http://127.0.0.1:{srv.server_port}/")
        Select(driver.find_element(By.ID, "point")).select_by_value("1")
        driver.find_element(By.ID, "ask-point").click()
        WebDriverWait(driver, 60).until(lambda d: d.find_elements(By.CSS_SELECTOR, ".example, #error"))
        shown = [e.text.split(" · ")[0] for e in driver.find_elements(By.CSS_SELECTOR, ".example.harmful .score")]
        from tf_influence.index import QueryArgs
        want = service.index.query(service.objective, service.points[:, 1], QueryArgs(top_k=3),
                                   vector_group=service.result_group)
        assert shown == [k.decode() for k in want.harmful_keys[0]]
        assert driver.find_elements(By.CSS_SELECTOR, "span.tok.hl")
        r = requests.get(f"http://127.0.0.1:{srv.server_port}/point", params={"j": 99}, timeout=30)
        assert r.status_code == 400 and "test point 99 does not exist" in r.text
    finally:
        srv.shutdown()


def test_a_keras_hub_tokenizer_preset(tmp_path):
    """--tokenizer: a keras-hub tokenizer saved as a preset encodes the page's text (byte-level BPE: every
    character has ids) and draws the tokens back."""
    import keras_hub

    from tf_influence.report import TextRenderer
    from tf_influence.serve import Tokens
    vocab = {"<|endoftext|>": 0, "d": 1, "e": 2, "f": 3, "Ġ": 4, "s": 5, "l": 6, "de": 7, "def": 8, "Ġs": 9}
    tok = keras_hub.models.GPT2Tokenizer(vocabulary=vocab, merges=["d e", "de f", "Ġ s"])
    backbone = keras_hub.models.GPT2Backbone(vocabulary_size=len(vocab), num_layers=1, num_heads=1, hidden_dim=4,
                                             intermediate_dim=4, max_sequence_length=8)
    backbone.save_to_preset(str(tmp_path / "tok"))         # a model's preset: its config.json and its tokenizer
    tok.save_to_preset(str(tmp_path / "tok"))
    t = Tokens(tokenizer=str(tmp_path / "tok"))
    ids = t.encode("def sel", "prompt")
    assert ids == [8, 9, 2, 6]
    assert "".join(TextRenderer(tokenizer=t.tokenizer, padding_id=None).tokens(ids)) == "def sel"
    with pytest.raises(ValueError, match="not both"):
        Tokens(vocabulary="v.txt", tokenizer=str(tmp_path / "tok"))
