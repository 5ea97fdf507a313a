# tf-influence: every set-up step lives here so a fresh clone needs only `make test` / `make demo`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed

.PHONY: install browser test test-slow evidence serve-demo bench-serve test-experiments docs pipeline pipeline-compile penguin-pipeline presence-pipeline demo bench bench-presence bench-kfac bench-scale bench-hub bench-index bench-beam-scale bench-real-size bench-covariance-cap bench-eigh bench-products bench-vocab-side presence presence-quick presence-lm presence-lm-quick bazel-test reproduce reproduce-quick clean

install: $(STAMP) browser

# headless Chromium for the page tests (tests/browser.py): Debian's chromium + chromium-driver, installed when missing
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; \
	  else echo "install chromium and chromium-driver (apt-get install chromium chromium-driver) for the page tests"; fi; }

$(STAMP): requirements.txt requirements-tfx.txt requirements-hub.txt requirements-docs.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --disable-pip-version-check -q --upgrade pip==24.0
	$(PIP) install --disable-pip-version-check -q -r requirements.txt
	$(PIP) install --disable-pip-version-check -q --no-deps --ignore-requires-python -r requirements-tfx.txt
	$(PIP) install --disable-pip-version-check -q --no-deps -r requirements-hub.txt
	$(PIP) install --disable-pip-version-check -q --no-deps -r requirements-docs.txt
	$(PIP) install --disable-pip-version-check -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

test: install
	$(PY) -m pytest -q -n 3 --dist loadfile -m "not experiment and not slow" tests   # 3 workers on 2 cores (much is single-threaded tracing / Beam start-up: 7:22 vs 8:06 with 2); loadfile keeps module fixtures together

test-slow: install   # the other architectures / runners of checks make test runs once (~2 min)
	$(PY) -m pytest -q -n 2 --dist loadfile -m "slow and not experiment" tests

test-experiments: install
	$(PY) -m pytest -q -n 2 --dist loadfile -m experiment tests   # the reduced experiments end to end (~4 min)

docs: install
	$(VENV)/bin/mkdocs build --strict --quiet   # warnings are errors; the site lands in reports/site/

pipeline: install
	$(PY) -m pipelines.influence_pipeline --root reports/pipelines/influence

pipeline-compile: install
	$(PY) -m pipelines.influence_pipeline --root reports/pipelines/influence --runner kubeflow_v2

penguin-pipeline: install
	$(PY) -m pipelines.penguin_pipeline --two-stage --root reports/pipelines/penguin

presence-pipeline: install
	$(PY) -m pipelines.presence_pipeline --root reports/pipelines/presence

demo: install
	$(PY) -m experiments.demo

evidence: install   # the LM evidence end to end: model, corpus, index, report.html (per-token highlights)
	$(PY) -m experiments.evidence_lm --out reports/evidence/lm

serve-demo: evidence   # the index page on http://127.0.0.1:8765/
	$(PY) -m tf_influence.serve --index reports/evidence/lm/index --model reports/evidence/lm/model.keras \
	    --data 'reports/evidence/lm/data/*.tfrecord.gz' --key-feature key

bench: install
	$(PY) -m benchmarks.engine --out docs/results/engine.json

bench-presence: install
	$(PY) -m benchmarks.presence --out docs/results/presence.json

bench-kfac: install
	$(PY) -m benchmarks.kfac_digits --out reports/benchmarks/kfac_digits.json

bench-scale: install
	$(PY) -m benchmarks.scale --out docs/results/scale.json

bench-hub: install
	$(PY) -m benchmarks.hub --out docs/results/hub.json

bench-index: install
	$(PY) -m benchmarks.index --out docs/results/index.json

bench-serve: install   # the index page under load: 10⁵ indexed windows, 100 queries from 4 clients (~5 min)
	$(PY) -m benchmarks.serve --out docs/results/serve.json

bench-real-size: install   # ~3 h on 2 cores: every path on GPT-2 small, BERT base, a 100 M Llama, GPT-2-mid
	$(PY) -m benchmarks.real_size --out docs/results/real_size.json --models gpt2-small bert-base llama-100m gpt2-mid

bench-covariance-cap: install   # EK-FAC's covariances on fewer examples vs the full fit at the 100 M Llama (~30 min on 2 cores)
	$(PY) -m benchmarks.covariance_cap --model llama-100m --caps 128 64 --out docs/results/covariance_cap.json

bench-eigh: install   # the EK-FAC eigendecomposition's LAPACK driver and order (~2 min)
	$(PY) -m benchmarks.eigh --out docs/results/eigh.json

bench-products: install   # the factor passes' covariance and rotation products: einsum against kfac.products, GPT-2 small's compiled covariance and correction steps, those steps with each product_dtype, and the Llama's covariance pass with upper-tile against whole-matrix running sums (~15 min)
	$(PY) -m benchmarks.products --out docs/results/products.json --step-model gpt2-small --dtype-model gpt2-small --sums-model llama-100m

bench-vocab-side: install
	$(PY) -m benchmarks.vocab_side --out docs/results/vocab_side.json

bench-beam-scale: install
	$(PY) -m benchmarks.beam_scale --out reports/benchmarks/beam_scale.json

presence: install
	$(PY) -m experiments.presence_text --out reports/presence

presence-quick: install
	$(PY) -m experiments.presence_text --quick --out reports/presence

presence-lm: install
	$(PY) -m experiments.presence_lm --out reports/presence

presence-lm-quick: install
	$(PY) -m experiments.presence_lm --quick --out reports/presence-quick

reproduce: install
	$(PY) -m experiments.reproduce --out reports/reproduction

reproduce-quick: install
	$(PY) -m experiments.reproduce --quick --out reports/reproduction

bazel-test: install
	tools/bazel_offline.sh //:all

clean:
	rm -rf $(VENV) reports .pytest_cache
